"""A whole PPO run on the real cluster, checked the same way by the fault and async tests."""

import json
from collections import Counter
from pathlib import Path

import ray

from rlhf_dist.data import PromptCursor
from rlhf_dist.ledger import read_ledger
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs


def assert_taken_equals_trained(run_dir, cfg, num_prompts: int) -> None:
    """Prompts taken == prompts trained, by id: the prompts the run's steps took (the cursor
    walked again from ``run.seed``: each step's ``rollout.prompts_per_step``) are, sample by
    sample, exactly the samples the ledger says were trained, each once, each ``ppo.epochs``
    times by the learner's own count (``updates``). Counting alone cannot see a prompt skipped
    and another trained twice; this can."""
    assert not cfg.rollout.drop_uniform_groups, "dynamic sampling takes more prompts"
    cursor = PromptCursor(num_prompts, cfg.run.seed, cfg.data.shuffle)
    taken = Counter()
    for _ in range(cfg.run.steps * cfg.rollout.prompts_per_step):
        (row,) = cursor.take(1)
        for s in range(cfg.rollout.samples_per_prompt):
            taken[cursor.epoch, row, s] += 1
    rows = read_ledger(run_dir)
    kept = [r for r in rows if not r.get("dropped")]
    trained = Counter((r["epoch"], r["row"], r["sample"]) for r in kept)
    assert trained == taken, (sorted((trained - taken).items()), sorted((taken - trained).items()))
    wrong = [r for r in kept if r["updates"] != cfg.ppo.epochs]
    assert not wrong, f"the learner trained these another number of times: {wrong[:3]}"


def run_checked(cfg, run_dir, on_dispatch=None, resume=None) -> list[dict]:
    """Run every step and return the metric rows, after checking that every generator holds
    the learner's final weights, that metrics.jsonl has one row per step, and that every
    prompt taken was trained exactly once. The final policy is exported to
    ``run_dir/policy``, so that ``compare_runs.assert_same_runs`` can compare two runs' weights.
    ``on_dispatch(orch)`` makes the orchestrator's dispatch hook (fault injection). ``resume``:
    the checkpoint the run must continue from (its newest usable one)."""
    orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
    try:
        orch.on_dispatch = on_dispatch(orch) if on_dispatch else None
        if resume is not None:
            assert orch.restore(log=lambda _: None) == resume
        rows = orch.run(log=lambda _: None)
        learner = ray.get(orch.learners.call("policy_checksum"))[0]
        held = [(s["version"], s["checksum"]) for s in ray.get(orch.generators.call("status"))]
        assert held == [(orch.version, learner)] * len(orch.generators)
        orch.export_policy(run_dir / "policy")
    finally:
        orch.shutdown()
    saved = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = cfg.run.steps
    assert [r["step"] for r in saved] == list(range(1, steps + 1))
    last = rows[-1]
    prompts = steps * cfg.rollout.prompts_per_step
    assert last["data/prompts_consumed"] == last["data/prompts_trained"] == prompts
    if cfg.run.ledger and not cfg.rollout.drop_uniform_groups:
        meta = json.loads((Path(run_dir) / "samples.meta.json").read_text())
        assert_taken_equals_trained(run_dir, cfg, meta["num_prompts"])
    return rows
