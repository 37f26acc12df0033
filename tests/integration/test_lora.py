"""LoRA end to end on the real cluster: PPO trains the adapters only and learns, each sync moves
the adapters only (what they weigh; in this sync-mode run the generators read them from the
learner's shared memory, zero copy, while the async test below moves them), the generators hold
what the learner holds, the reference comes from the base (``reference.from_base``: no reference scorer), both
exports load with plain ``transformers`` / ``peft``, and a resumed LoRA run (ZeRO-3)
reproduces the uninterrupted one."""

import sys
from pathlib import Path

import pytest
import ray
import torch

from rlhf_dist import lora
from rlhf_dist.checkpoint import checkpoint_dirs
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.models import load_policy
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from compare_runs import assert_same_runs, metric_rows  # noqa: E402
from ppo_runs import run_checked  # noqa: E402

LORA = ["model.lora_rank=8", "model.lora_alpha=16"]


def _cfg(tiny_assets, run_dir, *extra):
    return load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            f"run.dir={run_dir}",
            "rollout.num_workers=2",
            "rollout.max_new_tokens=8",
            "reward.num_workers=1",
            "learner.num_workers=1",
            "ppo.micro_batch_size=8",
            "wandb.enabled=false",
            *LORA,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def learned(ray_cluster, tiny_assets, tmp_path_factory):
    """A short LoRA PPO run (GRPO, reference from the base) with the task's reward as gold."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    cfg = _cfg(
        tiny_assets,
        run_dir,
        "run.steps=6",
        "rollout.prompts_per_step=32",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=4",
        "ppo.estimator=grpo",
        "ppo.minibatch_size=32",
        "ppo.epochs=2",
        "ppo.kl_coef=0",
        "learner.lr=3e-2",
        "reference.from_base=true",
        "eval.gold=rlhf_dist.tasks.tiny:reward",
        "eval.every=3",
        "eval.num_prompts=64",
        "checkpoint.every=0",
    )
    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        orch.run(log=lambda _: None)
        learner = ray.get(orch.learners.call("policy_checksum"))[0]
        held = [(s["version"], s["checksum"]) for s in ray.get(orch.generators.call("status"))]
        assert held == [(orch.version, learner)] * len(orch.generators)
        orch.export_policy(run_dir / "policy")
        scorer_pools = [p.name for p in orch.scorers.pools]
        sync = {"zero_copy": orch.generators.sync.zero_copy, "nbytes": orch.generators.sync.nbytes}
    finally:
        orch.shutdown()
    assert scorer_pools == ["reward"]  # no reference scorer: the generators computed them
    return cfg, metric_rows(run_dir), sync


def test_lora_ppo_learns_with_the_reference_from_the_base(learned):
    cfg, rows, _ = learned
    steps = [r for r in rows if "train/kl" in r]
    evals = [r for r in rows if "eval/gold_score" in r]
    assert len(evals) == 3  # before the first step, after step 3 and after the last
    first, last = evals[0]["eval/gold_score"], evals[-1]["eval/gold_score"]
    assert last > first + 0.08, (first, last)  # 0.43 -> 0.55 at this seed
    assert len(steps) == cfg.run.steps
    assert steps[-1]["train/kl"] > 0  # the adapters moved the policy off its base


def test_each_sync_carries_what_the_adapters_weigh(learned, tiny_policy):
    """The sync manifest is the adapters only; here (sync mode, one fp32 ZeRO-0 rank, shared
    memory) the generators read them where the learner keeps them, so no sync moved a byte."""
    cfg, rows, sync = learned
    rows = [r for r in rows if "train/kl" in r]
    assert len(rows) == cfg.run.steps
    model = lora.wrap(load_policy(tiny_policy), lora.lora_settings(cfg, "policy"), "causal")
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    weigh = sum(p.numel() * p.element_size() for p in adapters)
    full = sum(p.numel() * p.element_size() for p in load_policy(tiny_policy).parameters())
    assert sync["nbytes"] == weigh and weigh < full / 5
    assert sync["zero_copy"] and [r["sync/bytes"] for r in rows] == [0] * len(rows)


def test_both_exports_load_with_plain_transformers_and_peft(learned, tiny_policy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, _, _ = learned
    out = Path(cfg.run.dir) / "policy"  # run_checked's export
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[5, 9, 12, 7, 30, 8]])
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, want)
        with with_adapter.disable_adapter():
            assert not torch.allclose(with_adapter(input_ids=ids).logits, want, atol=1e-3)


def _stopped_after(cfg, step: int) -> None:
    """Run ``cfg`` until ``step`` is recorded, then abandon it (as a kill would)."""
    orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
    try:
        for out in orch.loop.steps():
            orch.record(out)
            if orch.state.step == step:
                break
    finally:
        orch.shutdown()


def test_a_resumed_lora_run_reproduces_the_uninterrupted_run(ray_cluster, tiny_assets, tmp_path):
    """ZeRO-3, a critic with adapters of its own: checkpoints of the adapters (and the
    critic's head) alone resume to the very same run."""
    extra = [
        "run.steps=4",
        "rollout.prompts_per_step=8",
        "ppo.minibatch_size=8",
        "learner.zero_stage=3",
        "learner.lr=1e-2",
        "model.critic_lora_rank=4",
        "checkpoint.every=2",
    ]
    straight = tmp_path / "straight"
    run_checked(_cfg(tiny_assets, straight, *extra), straight)

    resumed = tmp_path / "resumed"
    cfg = _cfg(tiny_assets, resumed, *extra)
    _stopped_after(cfg, 3)  # step 2's checkpoint is the newest, step 3's row comes after it
    ckpt = resumed / "checkpoints" / "step-00000002"
    assert {p.parent.parent.name for p in ckpt.rglob("*model_states.pt")} == {"policy", "critic"}
    # Learners of another stage cannot load these states: the resume stops naming the key
    # (not "unusable, trying the one before" down to step 0, which would overwrite them).
    other = _cfg(tiny_assets, resumed, *extra, "learner.zero_stage=0")
    orch = Orchestrator(other, resolve_inputs(other), resumed)
    try:
        with pytest.raises(ConfigError, match=r"learner.zero_stage=0: .* hold ZeRO-3 engine"):
            orch.restore(log=lambda _: None)
    finally:
        orch.shutdown()
    assert checkpoint_dirs(resumed)[-1] == ckpt
    run_checked(cfg, resumed, resume=ckpt)
    assert [r["step"] for r in metric_rows(resumed)] == [1, 2, 3, 4]
    assert_same_runs(resumed, straight, abs=1e-6, weights_atol=1e-5)


def test_lora_in_async_mode_with_two_learner_ranks(ray_cluster, tiny_assets, tiny_policy, tmp_path):
    """Two ZeRO-2 learner ranks in async mode: only the adapters travel (over shared memory,
    this one-machine cluster's default), the generators sample on while the learner trains,
    and they end holding the learner's adapters; every prompt is trained once
    (``run_checked``)."""
    run_dir = tmp_path / "run"
    cfg = _cfg(
        tiny_assets,
        run_dir,
        "run.steps=4",
        "mode=async",
        "async.max_staleness=1",
        "learner.num_workers=2",
        "rollout.prompts_per_step=8",
        "ppo.minibatch_size=8",
        "ppo.micro_batch_size=4",
        "checkpoint.every=0",
    )
    rows = run_checked(cfg, run_dir)
    assert max(r["sync/staleness_max"] for r in rows) == 1  # sampled while the learner trained
    full = sum(p.numel() * p.element_size() for p in load_policy(tiny_policy).parameters())
    assert {r["sync/bytes"] for r in rows} == {rows[0]["sync/bytes"]}
    assert 0 < rows[0]["sync/bytes"] < full / 5
