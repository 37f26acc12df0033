"""A lost learner rank is survived in-job: the learner group is rebuilt from the newest
checkpoint (or the initial weights when there is none), the generators get its weights, and
the steps after it are redone. On a multi-node ``ray.cluster_utils.Cluster``; in sync mode on
CPU the finished run's metrics and exported policy equal an uninterrupted run's.

Kills land while the learner's call is in flight: the hooks fire right after the update, the
weight sync or the checkpoint save was started on the ranks (``on_dispatch``), and the ranks'
PIDs are looked up beforehand, while they are idle."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from rlhf_dist.config import load_config
from rlhf_dist.ledger import read_ledger
from rlhf_dist.orchestrator import Orchestrator
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from clusters import local_cluster  # noqa: E402
from pinned_runs import pinned  # noqa: E402
from ppo_runs import assert_taken_equals_trained  # noqa: E402

STEPS, PROMPTS = 4, 8


@pytest.fixture(scope="module")
def cluster():
    # the learner ranks live on the two worker nodes; either one can hold the whole group
    learner_nodes = [{"num_cpus": 2, "resources": {"learner_node": 2}}] * 2
    with local_cluster({"main": 10}, learner_nodes) as c:
        yield c


def make_cfg(tiny_assets, run_dir, *extra):
    return load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            f"run.dir={run_dir}",
            f"run.steps={STEPS}",
            "rollout.num_workers=2",
            f"rollout.prompts_per_step={PROMPTS}",
            "rollout.chunk_prompts=2",
            "rollout.max_new_tokens=8",
            "rollout.resources={main: 1}",
            "reward.resources={main: 1}",
            "reference.resources={main: 1}",
            "learner.num_workers=2",
            "learner.resources={learner_node: 1}",
            "learner.lr=1e-3",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=2",
            "checkpoint.every=2",
            # every piece of run state that can change moves: the KL coefficient adapts
            "ppo.adaptive_kl=true",
            "ppo.kl_target=0.001",
            "ppo.kl_horizon=100",
            "ray.placement_timeout_s=60",
            "wandb.enabled=false",
            *extra,
        ],
    )


def run(cfg, make_hook=None) -> list[dict]:
    orch = Orchestrator(cfg, resolve_inputs(cfg), cfg.run.dir)
    try:
        if make_hook:
            orch.on_dispatch = make_hook(orch)
        orch.run(log=print)
        orch.export_policy(Path(cfg.run.dir) / "policy")
    finally:
        orch.shutdown()
    lines = (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def assert_same_as(rows, reference, run_dir, ref_dir):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for got, want in zip(rows, reference, strict=True):
        g = {k: v for k, v in pinned(got).items() if not k.startswith("fault/")}
        w = {k: v for k, v in pinned(want).items() if not k.startswith("fault/")}
        assert g.keys() == w.keys()
        for key, value in w.items():
            expected = (
                pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value
            )
            assert g[key] == expected, (want["step"], key)
    a = load_file(Path(run_dir) / "policy" / "model.safetensors")
    b = load_file(Path(ref_dir) / "policy" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def learner_pids(orch) -> list[int]:
    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in orch.learners.actors])


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


@pytest.fixture(scope="module")
def undisturbed(cluster, tiny_assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("undisturbed")
    rows = run(make_cfg(tiny_assets, run_dir))
    assert rows[-1]["fault/learner_restarts"] == 0
    return rows, run_dir


def test_rank_killed_mid_update_and_rank_0_during_the_sync(
    cluster, tiny_assets, tmp_path, undisturbed
):
    """SIGKILL of rank 1 while step 3's update runs, then ray.kill of rank 0 while step 4's
    weights are being sent: two rebuilds from step 2's checkpoint."""
    kills = []

    def make(orch):
        pids = {}

        def hook(name, slot, task):
            if name == "rollout":  # the ranks are idle while generators sample
                pids["now"] = learner_pids(orch)
            elif name == "learner" and slot == 1 and orch.step_idx == 2 and not kills:
                os.kill(pids["now"][1], signal.SIGKILL)
                kills.append("update")
            elif name == "weight_sync" and orch.step_idx == 4 and kills == ["update"]:
                ray.kill(orch.learners.actors[0])
                kills.append("sync")

        return hook

    rows = run(make_cfg(tiny_assets, tmp_path / "run"), make)
    assert kills == ["update", "sync"]
    assert rows[-1]["fault/learner_restarts"] == 2
    ref_rows, ref_dir = undisturbed
    assert_same_as(rows, ref_rows, tmp_path / "run", ref_dir)
    aside = (tmp_path / "run" / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside] == [3]  # step 3 was recorded, then redone


def test_rank_killed_during_the_first_checkpoint_save_restarts_from_the_initial_weights(
    cluster, tiny_assets, tmp_path, undisturbed
):
    """Rank 0 is SIGKILLed as step 2's checkpoint save starts: that checkpoint never commits
    (a half-written one is never loaded), so the new group starts again from step 0."""
    kills = []

    def make(orch):
        pids = {}

        def hook(name, slot, task):
            if name == "rollout":
                pids["now"] = learner_pids(orch)
            elif name == "checkpoint" and slot == 0 and not kills:
                os.kill(pids["now"][0], signal.SIGKILL)
                kills.append(orch.step_idx)

        return hook

    rows = run(make_cfg(tiny_assets, tmp_path / "run"), make)
    assert kills == [2] and rows[-1]["fault/learner_restarts"] == 1
    aside = (tmp_path / "run" / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside] == [1, 2]  # redone from the start
    ref_rows, ref_dir = undisturbed
    assert_same_as(rows, ref_rows, tmp_path / "run", ref_dir)
    # every sample slot of the finished run was trained once; the undone steps are set aside
    ledger = read_ledger(tmp_path / "run")
    assert len(ledger) == STEPS * PROMPTS
    assert len({(r["epoch"], r["row"], r["sample"]) for r in ledger}) == len(ledger)
    cfg = make_cfg(tiny_assets, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "samples.meta.json").read_text())
    assert_taken_equals_trained(tmp_path / "run", cfg, meta["num_prompts"])


def test_async_run_survives_the_node_of_a_rank_lost_mid_update(cluster, tiny_assets, tmp_path):
    """The node holding rank 0 is removed as step 3's update starts (the failure shows in the
    update or the sync after it, as Ray notices): the run rebuilds the group on the other node
    and still trains every prompt exactly once."""
    removed = []

    def make(orch):
        def hook(name, slot, task):
            if name != "learner" or slot != 0 or orch.step_idx != 2 or removed:
                return
            node_id = node_of(orch.learners.actors[0])
            (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
            removed.append(node_id)
            cluster.remove_node(node, allow_graceful=False)
            # once Ray has marked the node dead, every later call to that rank fails for
            # certain (the update in flight, or the sync after it)
            deadline = time.monotonic() + 60
            while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                assert time.monotonic() < deadline, "Ray never marked the removed node dead"
                time.sleep(0.2)

        return hook

    cfg = make_cfg(tiny_assets, tmp_path / "run", "mode=async", "async.max_staleness=1")
    rows = run(cfg, make)
    assert removed and rows[-1]["fault/learner_restarts"] == 1
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ledger = read_ledger(tmp_path / "run")
    assert len(ledger) == STEPS * PROMPTS  # each prompt trained once despite the rebuild
    assert len({(r["epoch"], r["row"], r["sample"]) for r in ledger}) == len(ledger)
    # and they are the prompts the steps took, by id, each trained by the learner's count
    meta = json.loads((tmp_path / "run" / "samples.meta.json").read_text())
    assert_taken_equals_trained(tmp_path / "run", cfg, meta["num_prompts"])
