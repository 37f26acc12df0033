"""Loss aggregation is defined over the minibatch, not the micro-batch (issue #27): for every
``ppo.loss_agg`` the gradient of one minibatch is the same for micro-batches of 1, 2 and the
whole minibatch, and for one and two learner ranks, on a batch whose responses have different
lengths, on real DeepSpeed ranks on Ray.

The gradient is read at the optimizer step (``engine.step`` wrapped on each rank: at ZeRO-0
every rank then holds the gradient already averaged over the ranks), with ``learner.lr=1e-30`` (no fp32 weight moves) so
that every loss mode is taken at the same weights. The policy loss carries the entropy bonus
and the k3 KL loss too (both aggregated like the loss), and GAE's critic its value loss; GRPO
runs the same comparison across world sizes (a group split over two ranks would change its
statistics).

Planted bugs, run against this test by hand while writing it (tolerance 1e-6):
- each micro-batch's loss divided by its own count (``loss_denominator=None`` in
  ``Learner._micro_step``): every mode fails at every micro-batching, max gradient difference
  0.19-1.8;
- DeepSpeed's mean over the ranks not undone (``engine.backward(loss, ...)`` without
  ``* world_size``): every mode fails on two ranks, policy 0.09-0.12, critic 0.08.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch
from ray import cloudpickle

from rlhf_dist.algo import LOSS_AGG_MODES
from rlhf_dist.config import load_config
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.roles import Generator, Learner, ReferenceScorer

# the helpers below run inside the learner actors: send them by value (the workers need not
# import this test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPTS = ["describe : red cat", "describe : sun", "describe : blue owl tree", "describe : cup"]
SCORES = [0.9, -0.3, 0.5, 0.1, -0.8, 0.4, 0.0, 0.7]
ATOL, RTOL = 1e-6, 1e-5


def _cfg(policy, estimator, world_size, micro):
    return load_config(
        None,
        [
            f"model.policy={policy}",
            "reward.function=rlhf_dist.tasks.tiny:reward",
            f"ppo.estimator={estimator}",
            f"learner.num_workers={world_size}",
            "learner.zero_stage=0",
            "learner.num_cpus=0.5",
            "learner.lr=1e-30",  # moves no fp32 weight: every mode at the same weights
            "learner.critic_lr=0",
            "learner.max_grad_norm=0",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=12",
            "ppo.epochs=1",
            "ppo.minibatch_size=8",  # one minibatch: the whole batch
            f"ppo.micro_batch_size={micro}",
            "ppo.kl_loss_coef=0.1",
            "ppo.entropy_coef=0.01",
            "sync.timeout_s=120",
        ],
    )


@pytest.fixture(scope="module")
def batch(tiny_policy):
    gen = Generator(tiny_policy, max_new_tokens=12)
    b = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=2)
    lengths = b.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2, "responses of different lengths are the point"
    b.scores = torch.tensor(SCORES)
    ref = ReferenceScorer(tiny_policy, temperature=0.7).ref_logprobs(b)["ref_logprobs"]
    b.ref_logprobs = ref  # another temperature: a reference that differs from the policy
    return b


def _record_gradients(learner):
    """Wrap each engine's ``step``: at an accumulation boundary, keep its full gradient."""
    import torch

    learner.recorded = {}
    for name, engine in learner.engines().items():

        def step(*args, _engine=engine, _name=name, _step=engine.step, **kwargs):
            if _engine.is_gradient_accumulation_boundary():
                grads = [p.grad.detach().flatten() for p in _engine.module.parameters()]
                learner.recorded[_name] = torch.cat(grads).clone()
            return _step(*args, **kwargs)

        engine.step = step


def _recorded(learner):
    return learner.recorded


def _set_loss_agg(learner, mode):
    learner.cfg.ppo.loss_agg = mode


def _gradients(policy, batch, estimator, world_size, micro) -> dict:
    """{loss_agg: {engine: rank 0's gradient}} of one update in each mode."""
    group = LearnerGroup("learner", Learner, _cfg(policy, estimator, world_size, micro))
    try:
        group.handshake(policy, policy)
        ray.get([a.__ray_call__.remote(_record_gradients) for a in group.actors])
        out = {}
        for mode in LOSS_AGG_MODES:
            ray.get([a.__ray_call__.remote(_set_loss_agg, mode) for a in group.actors])
            result = group.update(batch, kl_coef=0.05, seed=0)
            assert not result.skipped and result.trained == [1] * len(batch)
            ranks = ray.get([a.__ray_call__.remote(_recorded) for a in group.actors])
            for name in ranks[0]:  # ZeRO-0: every rank holds the averaged gradient
                assert all(torch.equal(r[name], ranks[0][name]) for r in ranks)
            out[mode] = ranks[0]
        return out
    finally:
        group.shutdown()


def _compare(got: dict, want: dict, label: str) -> list[str]:
    failures = []
    for mode, engines in want.items():
        for name, g in engines.items():
            h = got[mode][name]
            if not torch.allclose(h, g, atol=ATOL, rtol=RTOL):
                failures.append(f"{label} {mode} {name}: max diff {float((h - g).abs().max()):.2e}")
    return failures


def test_the_gradient_of_a_minibatch_does_not_depend_on_micro_batches_or_ranks(
    ray_cluster, tiny_policy, batch
):
    # the reference: one rank, the whole minibatch in one micro-batch
    want = _gradients(tiny_policy, batch, "gae", 1, 8)
    assert set(want[LOSS_AGG_MODES[0]]) == {"policy", "critic"}
    for engines in want.values():
        assert all(float(g.abs().max()) > 1e-4 for g in engines.values())  # not trivially 0
    # the modes are different losses: a test that mixed them up would see it
    assert not torch.allclose(want["token_mean"]["policy"], want["seq_mean_token_mean"]["policy"])
    failures = []
    for world_size, micro in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4)]:
        got = _gradients(tiny_policy, batch, "gae", world_size, micro)
        failures += _compare(got, want, f"ranks {world_size} micro {micro}")
    assert not failures, "\n".join(failures)


def test_a_group_estimator_trains_the_same_on_two_ranks(ray_cluster, tiny_policy, batch):
    """GRPO's groups (2 samples a prompt) are whole on each rank: two ranks, micro-batches of
    one, give the gradient of one rank holding the whole batch."""
    want = _gradients(tiny_policy, batch, "grpo", 1, 8)
    assert set(want[LOSS_AGG_MODES[0]]) == {"policy"}
    got = _gradients(tiny_policy, batch, "grpo", 2, 1)
    failures = _compare(got, want, "grpo ranks 2 micro 1")
    assert not failures, "\n".join(failures)
