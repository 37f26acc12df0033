"""The learner's distributed math on a real Ray cluster with real DeepSpeed ranks.

One fixed scored batch (the real Generator, a reference model that is not the policy, fixed
scores) is trained by learner groups of world size 1 and 2 at ZeRO 0, 2 and 3. Every
configuration must end with the same policy and report the same metrics: gradients averaged
over ranks and accumulation steps, advantages whitened with statistics gathered across ranks,
metrics summed over ranks. Then, at world size 2: a group resumed from a checkpoint trains the
next update exactly as the group that saved it, and NaN log-probs or values on one rank make
every rank skip the update together, naming the cause, without touching any weight.

Which configurations must agree: each rank shuffles its own shard, so samples are grouped
into minibatches differently at different world sizes. The groupings cannot change the result
when the optimizer step covers the whole batch (``ppo.minibatch_size`` = the batch): each
loss is then one mean over the whole batch at every world size (and every micro-batching:
``tests/integration/test_loss_aggregation.py``), and only float summation order differs.
"""

from __future__ import annotations

import math

import pytest
import ray
import torch

from rlhf_dist.config import load_config
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.models import load_policy
from rlhf_dist.roles import Generator, Learner, ReferenceScorer
from rlhf_dist.tasks.tiny import build_policy

PROMPTS = ["describe : red cat", "describe : sun", "describe : blue owl tree", "describe : cup"]
SCORES = [0.9, -0.3, 0.5, 0.1, -0.8, 0.4, 0.0, 0.7]
KL_COEF = 0.1
# (learner.num_workers, learner.zero_stage); the first is the reference
CONFIGS = [(1, 0), (1, 2), (1, 3), (2, 0), (2, 2), (2, 3)]
# fp32 on CPU; only the order of float sums differs between configurations. Measured against
# (1, 0): metrics within 1.1e-6 relative. Weights within 1.4e-6 except GPT-2's attention key
# biases, up to 3.9e-6: their exact gradient is zero (softmax ignores a shift shared by every
# key), so Adam divides rounding noise by its own size and moves them by noise. The updates are
# up to 2e-3 (lr 1e-3, two steps); without the gradient all-reduce they differ by 4e-3.
RTOL, ATOL = 1e-5, 1e-6
W_ATOL = 1e-5
UPDATES = [(0, KL_COEF), (1, KL_COEF), (2, 0.2)]  # (seed, kl_coef) of updates 1, 2, 3


def _cfg(tiny_policy, world_size, zero_stage):
    return load_config(
        None,
        [
            f"model.policy={tiny_policy}",
            "reward.function=rlhf_dist.tasks.tiny:reward",
            f"learner.num_workers={world_size}",
            f"learner.zero_stage={zero_stage}",
            "learner.num_cpus=0.5",
            "learner.lr=1e-3",
            "learner.critic_lr=1e-3",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=12",
            "ppo.epochs=2",
            "ppo.minibatch_size=8",  # one optimizer step per epoch, over the whole batch
            "ppo.micro_batch_size=2",  # micro-batches of different token counts: one mean still
            "sync.timeout_s=120",  # a rank left waiting in a collective fails, never hangs
        ],
    )


@pytest.fixture(scope="module")
def batch(tiny_policy, tmp_path_factory):
    """8 samples of the tiny policy with fixed scores and a reference that disagrees with it
    (another random model), so the KL penalty shapes the rewards from the first update."""
    from transformers import AutoTokenizer

    gen = Generator(tiny_policy, max_new_tokens=12)
    b = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=2)
    # Each rank's half holds a short response, and the halves hold different token counts:
    # per-rank token means or per-rank whitening statistics would differ from global ones.
    halves = b.response_mask.sum(-1).view(2, 4)
    assert (halves.min(-1).values < 12).all() and halves[0].sum() != halves[1].sum()
    ref_dir = tmp_path_factory.mktemp("reference")
    build_policy(ref_dir, AutoTokenizer.from_pretrained(tiny_policy), seed=1)
    b.scores = torch.tensor(SCORES)
    b.ref_logprobs = ReferenceScorer(str(ref_dir)).ref_logprobs(b)["ref_logprobs"]
    return b


def _start(cfg, tiny_policy) -> LearnerGroup:
    group = LearnerGroup("learner", Learner, cfg)
    group.handshake(tiny_policy, tiny_policy)
    return group


def _rank_checksums(group) -> list[str]:
    """Each rank's own copy of the full policy (ZeRO 0-2 keep one on every rank)."""

    def local_checksum(learner):
        from rlhf_dist import weight_sync

        return weight_sync.model_checksum(learner.policy.module)

    return ray.get([a.__ray_call__.remote(local_checksum) for a in group.actors])


def _train(group, batch, update):
    seed, kl_coef = update
    result = group.update(batch, kl_coef, seed)
    assert not result.skipped, result
    assert result.trained == [2] * len(batch)  # ppo.epochs passes of every sample
    return result.metrics, group.run("policy_state")[0]


def _compared(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "compute_s"}


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_policy, batch, tmp_path_factory):
    """Update 1 in every configuration. The (2, 2) group also saves a checkpoint after it and
    trains updates 2 and 3, for the resume and non-finite tests."""
    out = {}
    for ws, zero in CONFIGS:
        group = _start(_cfg(tiny_policy, ws, zero), tiny_policy)
        try:
            metrics, state = _train(group, batch, UPDATES[0])
            rank_sums = _rank_checksums(group) if zero < 3 else None
            out[ws, zero] = {"metrics": metrics, "state": state, "rank_checksums": rank_sums}
            if (ws, zero) == (2, 2):
                ckpt = tmp_path_factory.mktemp("ckpt") / "after-update-1"
                group.save(str(ckpt))
                out["ckpt"] = ckpt
                out["later"] = [_train(group, batch, u) for u in UPDATES[1:]]
        finally:
            group.shutdown()
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def test_world_size_and_zero_stage_give_the_same_update(runs, tiny_policy):
    initial = {k: p.detach() for k, p in load_policy(tiny_policy).named_parameters()}
    ref = runs[CONFIGS[0]]
    assert _max_diff(ref["state"], initial) > 1e-3, "the update did not move the policy"
    m_ref = _compared(ref["metrics"])
    failures = []
    for config in CONFIGS[1:]:
        got = runs[config]
        m_got = _compared(got["metrics"])
        assert got["state"].keys() == ref["state"].keys() and m_got.keys() == m_ref.keys()
        failures += [
            f"{config} {name}: max abs diff {float((got['state'][name] - w).abs().max()):.2e}"
            for name, w in ref["state"].items()
            if not torch.allclose(got["state"][name], w, rtol=RTOL, atol=W_ATOL)
        ]
        failures += [
            f"{config} {k}: {m_got[k]!r} != {m_ref[k]!r}"
            for k in m_ref
            if not math.isclose(m_got[k], m_ref[k], rel_tol=RTOL, abs_tol=ATOL)
        ]
        if got["rank_checksums"] is not None and len(set(got["rank_checksums"])) != 1:
            failures.append(f"{config}: the ranks hold different weights")
    assert not failures, f"against {CONFIGS[0]}:\n" + "\n".join(failures)
    # what was compared is not trivially equal: KL, losses, advantages, gradients are non-zero
    assert m_ref["train/optimizer_steps"] == 2
    assert m_ref["train/kl"] > 0 and m_ref["train/policy_loss"] != 0
    assert m_ref["train/value_loss"] > 0 and m_ref["train/advantages_std"] > 0
    assert m_ref["train/grad_norm"] > 0 and m_ref["train/critic_grad_norm"] > 0


@pytest.fixture(scope="module")
def resumed(runs, tiny_policy, batch):
    """A fresh (2, 2) group that loads the checkpoint saved after update 1 and trains update 2.
    (The group that saved it never synced weights, so it still holds version 0.)"""
    group = _start(_cfg(tiny_policy, 2, 2), tiny_policy)
    try:
        group.load(str(runs["ckpt"]), 0)
        yield group, _train(group, batch, UPDATES[1])
    finally:
        group.shutdown()


def _assert_same_update(got, expected):
    (m_got, w_got), (m_exp, w_exp) = got, expected
    assert _compared(m_got) == _compared(m_exp)
    assert w_got.keys() == w_exp.keys()
    assert [k for k in w_exp if not torch.equal(w_got[k], w_exp[k])] == []


def test_resumed_group_trains_the_next_update_as_the_uninterrupted_one(runs, resumed):
    _, update_2 = resumed
    uninterrupted_2 = runs["later"][0]
    _assert_same_update(update_2, uninterrupted_2)
    # update 2 started from the checkpoint's weights, not the initial ones
    assert update_2[0]["train/kl"] != runs[2, 2]["metrics"]["train/kl"]


def test_nan_logprobs_or_values_on_one_rank_skip_the_update_on_every_rank(resumed, runs, batch):
    """Rank 1's policy (NaN log-probs) or critic (NaN values) is poisoned; rank 0's numbers are
    fine. Both ranks skip, both name the cause, no weight moves; with rank 1 healed, the next
    update is exactly the one the uninterrupted group trained (the skip left no trace)."""
    group, _ = resumed

    def poison(learner, which):
        module = learner.policy.module if which == "policy" else learner.critic.module
        # the policy's final norm (every logit NaN) or the critic's value head
        p = module.transformer.ln_f.weight if which == "policy" else module.classifier.weight
        saved = p.detach().clone()
        with torch.no_grad():
            p.fill_(float("nan"))
        return saved

    def heal(learner, which, saved):
        module = learner.policy.module if which == "policy" else learner.critic.module
        p = module.transformer.ln_f.weight if which == "policy" else module.classifier.weight
        with torch.no_grad():
            p.copy_(saved)

    before = group.run("policy_checksum")[0]
    seed, kl_coef = UPDATES[2]
    for which, reason in [
        ("policy", ["logprobs", "advantages"]),
        ("critic", ["values", "advantages"]),
    ]:
        saved = ray.get(group.actors[1].__ray_call__.remote(poison, which))
        results = ray.get(group.start_update(batch, kl_coef, seed))
        assert [r.skipped for r in results] == [tuple(reason)] * 2, which
        recorded = group.finish_update(group.start_update(batch, kl_coef, seed))
        assert recorded.skipped == tuple(reason)  # what the driver records
        assert recorded.trained == [0] * len(batch)  # nothing trained, as the learner says
        ray.get(group.actors[1].__ray_call__.remote(heal, which, saved))
        assert group.run("policy_checksum")[0] == before
    assert len(set(_rank_checksums(group))) == 1
    _assert_same_update(_train(group, batch, UPDATES[2]), runs["later"][1])
