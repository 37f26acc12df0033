"""A whole PPO run on the real cluster, checked the same way by the fault and async tests."""

import json

import ray

from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs


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
    return rows
