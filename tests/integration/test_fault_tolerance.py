"""Lost workers on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two
worker nodes on this machine). Generators and scorers that die are replaced and their work is
redone; since each chunk of prompts is sampled with a seed of its own, a run that lost workers
trains on exactly the samples an undisturbed run does, so every metric and its final weights must equal the undisturbed run's
(``compare_runs.assert_same_runs``), the fault counters aside."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray

from rlhf_dist.config import load_config
from rlhf_dist.orchestrator import Orchestrator, TrainingError
from rlhf_dist.pools import PoolError
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from compare_runs import assert_same_runs  # noqa: E402
from ppo_runs import run_checked  # noqa: E402

STEPS = 3
PROMPTS = 8
# what a faulted run counts and an undisturbed one does not; each test asserts them itself
FAULT_COUNTERS = {"fault/restarts", "fault/redone_chunks"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from rlhf_dist.ray_env import worker_runtime_env

    fast_health = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
    }
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 3,
            "resources": {"learner_slot": 1},
            "_system_config": fast_health,
        },
    )
    for _ in range(2):
        c.add_node(num_cpus=2, resources={"scorer_slot": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env=worker_runtime_env())
    yield c
    ray.shutdown()
    c.shutdown()


def make_cfg(tiny_assets, *extra):
    return load_config(
        None,
        [
            f"model.assets_dir={tiny_assets.parent}",
            f"run.steps={STEPS}",
            "rollout.num_workers=2",
            f"rollout.prompts_per_step={PROMPTS}",
            "rollout.chunk_prompts=2",
            "rollout.max_new_tokens=8",
            "learner.resources={learner_slot: 1}",
            "reward.resources={scorer_slot: 1}",
            "learner.lr=1e-3",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "checkpoint.every=0",
            "ray.placement_timeout_s=30",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def undisturbed(cluster, tiny_assets, tmp_path_factory):
    """The run directory of a run nobody disturbed (its metrics and exported policy)."""
    run_dir = tmp_path_factory.mktemp("undisturbed")
    rows = run_checked(make_cfg(tiny_assets), run_dir)
    assert [(r["fault/restarts"], r["fault/redone_chunks"]) for r in rows] == [(0, 0)] * STEPS
    return run_dir


def assert_same_training(run_dir, reference):
    """The run learned what the undisturbed run learned (same samples, same updates): every
    metric of every step but the fault counters, and the final weights. (``run_checked``
    already checked that every prompt taken was trained exactly once.)"""
    assert_same_runs(run_dir, reference, ignore=FAULT_COUNTERS)


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def kill_once(pool_name: str, at_step: int, how: str):
    """An ``on_dispatch`` hook that kills the worker just handed work in ``pool_name`` during
    step ``at_step`` (1-based), once."""

    def make(orch):
        done = []

        def hook(name, slot, task):
            # the step counter moves on after the update, before the weight sync
            step = orch.step_idx + (0 if name == "weight_sync" else 1)
            if name != pool_name or step != at_step or done:
                return
            done.append(slot)
            pool = orch.generators if name in ("rollout", "weight_sync") else orch.scorers.rewards
            actor = pool.actors[slot]
            if how == "ray.kill":
                ray.kill(actor)
            else:
                os.kill(pid_of(actor), signal.SIGKILL)

        return hook

    return make


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_generator_killed_mid_step_is_replaced_and_its_chunk_redone(
    cluster, tiny_assets, tmp_path, undisturbed, how
):
    rows = run_checked(make_cfg(tiny_assets), tmp_path / "run", kill_once("rollout", 2, how))
    assert [r["fault/restarts"] for r in rows] == [0, 1, 1]
    assert rows[0]["fault/redone_chunks"] == 0 and rows[1]["fault/redone_chunks"] >= 1
    assert_same_training(tmp_path / "run", undisturbed)


def test_generator_killed_during_weight_sync(cluster, tiny_assets, tmp_path, undisturbed):
    # 10 KB buckets: the receive takes long enough for the kill to land in it (were it to lose
    # the race, the loss would show at step 3's generate and rows[1] would say 0 restarts).
    cfg = make_cfg(tiny_assets, "sync.bucket_mb=0.01")
    rows = run_checked(cfg, tmp_path / "run", kill_once("weight_sync", 2, "ray.kill"))
    # the killed generator, and any left waiting on the broken group, were replaced
    assert rows[0]["fault/restarts"] == 0 and rows[1]["fault/restarts"] >= 1
    assert_same_training(tmp_path / "run", undisturbed)


def test_reward_scorer_killed_mid_step(cluster, tiny_assets, tmp_path, undisturbed):
    rows = run_checked(make_cfg(tiny_assets), tmp_path / "run", kill_once("reward", 1, "ray.kill"))
    assert [r["fault/restarts"] for r in rows] == [1, 1, 1]
    assert rows[0]["fault/redone_chunks"] >= 1
    assert_same_training(tmp_path / "run", undisturbed)


def test_autoscale_adds_generators_that_hold_current_weights(
    cluster, tiny_assets, tmp_path, undisturbed
):
    cfg = make_cfg(
        tiny_assets,
        "rollout.autoscale={max_workers: 3, generate_frac: 0.01, cooldown_steps: 0}",
    )
    rows = run_checked(
        cfg, tmp_path / "run"
    )  # run() checks every generator holds the final weights
    assert [r["pool/num_generators"] for r in rows] == [2, 3, 3]
    # 4 chunks dealt to 3 idle generators: the new one sampled part of step 2's batch
    assert rows[1]["pool/chunks_per_generator_min"] >= 1
    assert rows[-1]["fault/restarts"] == 0
    # the pool's size does not change the samples: no counter ignored
    assert_same_runs(tmp_path / "run", undisturbed)


def test_remove_generators_between_steps(cluster, tiny_assets, tmp_path):
    cfg = make_cfg(tiny_assets, "rollout.num_workers=3", "run.steps=2")
    orch = Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")
    try:
        orch.step()
        orch.generators.remove(2)
        m = orch.step()
        assert m["pool/num_generators"] == 1 and m["pool/chunks_per_generator_min"] == 4
        learner = ray.get(orch.learners.call("policy_checksum"))[0]
        assert [(s["version"], s["checksum"]) for s in ray.get(orch.generators.call("status"))] == [
            (2, learner)
        ]
        with pytest.raises(ValueError, match="cannot remove 1 of 1 generators"):
            orch.generators.remove(1)
    finally:
        orch.shutdown()


def test_learner_death_with_no_restarts_left_stops_naming_the_last_checkpoint(
    cluster, tiny_assets, tmp_path
):
    cfg = make_cfg(tiny_assets, "run.steps=2", "checkpoint.every=1", "run.max_restarts=0")
    orch = Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")
    try:
        orch.step()
        ckpt = orch.save_checkpoint()
        ray.kill(orch.learners.actors[0])
        with pytest.raises(TrainingError, match="learner rank 0 died at step 2") as e:
            orch.run(log=lambda _: None)
        assert "run.max_restarts=0" in str(e.value)
        assert str(ckpt) in str(e.value) and "--resume" in str(e.value)
    finally:
        orch.shutdown()


def test_missing_custom_resource_is_refused_naming_the_pool(cluster, tiny_assets, tmp_path):
    cfg = make_cfg(tiny_assets, "reference.resources={fast_node: 1}")
    with pytest.raises(PoolError, match=r"reference: .*reference.resources.fast_node=1 .*has 0"):
        Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")


def test_unplaceable_worker_fails_after_the_placement_timeout(cluster, tiny_assets, tmp_path):
    # 7 CPUs in the cluster, but no node has 2.5 free CPUs for one scorer
    cfg = make_cfg(tiny_assets, "reward.num_cpus=2.5", "ray.placement_timeout_s=3")
    with pytest.raises(PoolError, match=r"reward: 1 more workers .* within 3s"):
        Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")
    # nothing is left behind (actors and placement groups are released asynchronously)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 7 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 7


# Last in the module: it takes a node out of the cluster.
def test_node_holding_the_reward_scorer_is_lost(cluster, tiny_assets, tmp_path, undisturbed):
    def make(orch):
        done = []

        def hook(name, slot, task):
            if name != "reward" or orch.step_idx != 1 or done:
                return
            node_id = node_of(orch.scorers.rewards.actors[slot])
            (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
            done.append(node_id)
            cluster.remove_node(node, allow_graceful=False)
            deadline = time.monotonic() + 60
            while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                assert time.monotonic() < deadline, "Ray never marked the removed node dead"
                time.sleep(0.2)

        return hook

    rows = run_checked(make_cfg(tiny_assets), tmp_path / "run", make)
    # The scorer, and whatever else ran on that node, were replaced on the other nodes: in
    # step 2, or in step 3 where the node went down after its step-2 results came back.
    assert rows[0]["fault/restarts"] == 0 and rows[-1]["fault/restarts"] >= 1
    assert_same_training(tmp_path / "run", undisturbed)
