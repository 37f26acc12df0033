"""Lost workers on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two
worker nodes on this machine). Generators and scorers that die are replaced and their work is
redone; since each chunk of prompts is sampled with a seed of its own, a run that lost workers
trains on exactly the samples an undisturbed run does, so every metric, its final weights and
its sample ledger must equal the undisturbed run's (``compare_runs.assert_same_runs``), the
fault counters aside.

Every kill lands inside a named call, for certain: the call is trapped by a kill point
(``tests/helpers/kill_points.py``). The test arms it at a quiet moment before the call (the
trap is put into the live actors through ``actor.__ray_call__``: a reward scorer's
``_score_fns``, a generator's HF ``model.generate``, or its weight-sync ``receiver.receive``
(a receive over gloo, an attach over shared memory); the first trapped call after that writes
its PID to the kill point's directory and
sleeps. The ``on_dispatch`` hook, at the first submission of that call's step, waits for the
PID, then kills that worker (SIGKILL of the PID, ``ray.kill`` of its actor, or removal of its
node), so the kill lands after the call started and before it could return. No production
code knows of it.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray

from rlhf_dist.config import load_config
from rlhf_dist.ledger import read_ledger
from rlhf_dist.orchestrator import Orchestrator, TrainingError
from rlhf_dist.pools import PoolError
from rlhf_dist.preflight import resolve_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from clusters import local_cluster  # noqa: E402
from compare_runs import assert_same_runs  # noqa: E402
from kill_points import KillPoint  # noqa: E402
from ppo_runs import run_checked  # noqa: E402

STEPS = 3
PROMPTS = 8
# what a faulted run counts and an undisturbed one does not; each test asserts them itself
# (a weight sync redone after a lost generator moves its bytes again: sync/bytes)
FAULT_COUNTERS = {"fault/restarts", "fault/redone_chunks", "sync/bytes"}


# Worker nodes by kind: reward scorers go to scorer nodes (``reward.resources``), and
# generators to rollout nodes where a test pins them there (``rollout.resources``).
NODE_KINDS = {
    "scorer": {"num_cpus": 2, "resources": {"scorer_slot": 1}},
    "rollout": {"num_cpus": 2, "resources": {"rollout_slot": 2}},
}


@pytest.fixture(scope="module")
def cluster():
    with local_cluster({"learner_slot": 1}, list(NODE_KINDS.values())) as c:
        yield c


def replace_node(cluster, node_id: str) -> None:
    """Take the worker node ``node_id`` out of the cluster (no graceful drain) and, once Ray
    has marked it dead, add a fresh node of the same kind, as a cloud would."""
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    (info,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
    (kind,) = [k for k in NODE_KINDS.values() if set(k["resources"]) <= set(info["Resources"])]
    cluster.remove_node(node, allow_graceful=False)
    deadline = time.monotonic() + 60
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "Ray never marked the removed node dead"
        time.sleep(0.2)
    cluster.add_node(**kind)
    cluster.wait_for_nodes()


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


def scripted(actions: dict):
    """An ``on_dispatch`` hook maker, and the actions it has not run yet. ``actions["start"]``
    runs before the run; ``actions[(pool, step)]`` once, at the first submission to ``pool``
    in PPO step ``step`` (1-based; ``weight_sync`` is the sync after step ``step``'s
    update). Each action is called with the orchestrator."""
    left = dict(actions)

    def make(orch):
        if "start" in left:
            left.pop("start")(orch)

        def hook(name, slot, task):
            # the step counter moves on after the update, before the weight sync
            step = orch.step_idx + (0 if name == "weight_sync" else 1)
            action = left.pop((name, step), None)
            if action is not None:
                action(orch)

        return hook

    return make, left


def rewards(orch):
    return orch.scorers.rewards


def generators(orch):
    return orch.generators


def arm(point: KillPoint, pool, path: str):
    """Trap ``path`` in every worker ``pool(orch)`` holds now and arm ``point``."""
    return lambda orch: point.arm(pool(orch).actors, path)


def kill(point: KillPoint, how: str, cluster=None):
    """Wait until a worker is held inside the call ``point`` traps, then kill it."""

    def action(orch):
        pid = point.caught()
        actor, node_id = point.actors[pid]
        if how == "SIGKILL":
            os.kill(pid, signal.SIGKILL)
        elif how == "ray.kill":
            ray.kill(actor)
        else:
            replace_node(cluster, node_id)

    return action


@pytest.mark.parametrize("how", ["SIGKILL", "ray.kill"])
def test_workers_killed_inside_their_calls_are_replaced_and_the_work_redone(
    cluster, tiny_assets, tmp_path, undisturbed, how
):
    score, sample, receive = (KillPoint(tmp_path / n) for n in ("score", "sample", "receive"))
    make, left = scripted(
        {
            "start": arm(score, rewards, "_score_fns"),
            ("reward", 1): kill(score, how),  # the reward scorer, inside step 1's first call
            ("weight_sync", 1): arm(sample, generators, "model.generate"),
            ("rollout", 2): kill(sample, how),  # a generator inside step 2's first chunk
            ("reward", 2): arm(receive, generators, "receiver.receive"),
            ("weight_sync", 2): kill(receive, how),  # a generator receiving step 2's weights
        }
    )
    rows = run_checked(make_cfg(tiny_assets), tmp_path / "run", make)
    assert not left, f"never reached: {list(left)}"
    restarts = [r["fault/restarts"] for r in rows]
    # Step 2 lost the sampling generator, then the receiving one and any generator left
    # waiting on the broken group; the sync was redone, and step 3 lost nothing.
    assert restarts[0] == 1 and restarts[1] >= 3 and restarts[2] == restarts[1]
    # the unfinished scorer call and the unfinished chunk were redone, once each
    assert [r["fault/redone_chunks"] for r in rows] == [1, 2, 2]
    # step 2's weights were sent twice: the broken sync, then the redone one
    sent = [r["sync/bytes"] for r in rows]
    assert sent[1] == 2 * sent[0] and sent[2] == sent[0] > 0
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


@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_generator_killed_while_attaching_over_shared_memory(
    cluster, tiny_assets, tmp_path, undisturbed, zero_copy
):
    """``sync.backend=shm`` (every node of this cluster is this machine): a generator killed
    inside its attach is the only one replaced, since no group breaks under the others, and
    the redone sync writes the other slot while the survivor samples on. With
    ``sync.zero_copy`` the replacement attaches to the learner's own parameters afresh (and is
    checksummed), and no sync moves a byte."""
    attach = KillPoint(tmp_path / "attach")
    make, left = scripted(
        {
            ("reward", 2): arm(attach, generators, "receiver.receive"),
            ("weight_sync", 2): kill(attach, "SIGKILL"),  # inside step 2's attach
        }
    )
    cfg = make_cfg(tiny_assets, "sync.backend=shm", f"sync.zero_copy={zero_copy}")
    rows = run_checked(cfg, tmp_path / "run", make)
    assert not left, f"never reached: {list(left)}"
    assert [r["fault/restarts"] for r in rows] == [0, 1, 1]
    sent = [r["sync/bytes"] for r in rows]
    if zero_copy:
        assert sent == [0, 0, 0]
    else:
        assert sent[1] == 2 * sent[0] and sent[2] == sent[0] > 0  # step 2's sync was redone
    assert_same_training(tmp_path / "run", undisturbed)


# Last in the module: it replaces nodes of the cluster.
def test_nodes_lost_with_a_worker_inside_its_call(cluster, tiny_assets, tmp_path, undisturbed):
    cfg = make_cfg(tiny_assets, "rollout.resources={rollout_slot: 1}")  # both on the rollout node
    score, sample = KillPoint(tmp_path / "score"), KillPoint(tmp_path / "sample")
    make, left = scripted(
        {
            "start": arm(score, rewards, "_score_fns"),
            ("reward", 1): kill(score, "node", cluster),  # the scorer's node, inside a call
            ("weight_sync", 1): arm(sample, generators, "model.generate"),
            ("rollout", 2): kill(sample, "node", cluster),  # the generators' node, mid-chunk
        }
    )
    rows = run_checked(cfg, tmp_path / "run", make)
    assert not left, f"never reached: {list(left)}"
    # Whatever ran on a lost node (the reference scorer may have too) was replaced on the
    # node that took its place, and the unfinished calls were redone.
    restarts = [r["fault/restarts"] for r in rows]
    redone = [r["fault/redone_chunks"] for r in rows]
    assert restarts[0] >= 1 and redone[0] >= 1
    assert restarts[1] >= restarts[0] + 2 and redone[1] >= redone[0] + 1  # both generators
    assert_same_training(tmp_path / "run", undisturbed)


GROUPS = ("ppo.estimator=grpo", "rollout.samples_per_prompt=2", "ppo.minibatch_size=16")


def test_a_generator_killed_mid_chunk_keeps_groups_whole(cluster, tiny_assets, tmp_path):
    """GRPO's groups: a prompt's samples come from one chunk, so a generator lost inside a
    chunk loses whole groups, which are redone whole, and the group statistics are those of
    the undisturbed run."""
    reference = tmp_path / "undisturbed"
    run_checked(make_cfg(tiny_assets, "run.steps=2", *GROUPS), reference)
    sample = KillPoint(tmp_path / "sample")
    make, left = scripted(
        {
            ("weight_sync", 1): arm(sample, generators, "model.generate"),
            ("rollout", 2): kill(sample, "SIGKILL"),  # a generator inside step 2's first chunk
        }
    )
    rows = run_checked(make_cfg(tiny_assets, "run.steps=2", *GROUPS), tmp_path / "run", make)
    assert not left, f"never reached: {list(left)}"
    assert [r["fault/redone_chunks"] for r in rows] == [0, 1]
    groups: dict = {}
    for s in read_ledger(tmp_path / "run"):
        groups.setdefault((s["step"], s["row"]), []).append(s)
    assert len(groups) == 2 * PROMPTS
    for samples in groups.values():
        assert sorted(s["sample"] for s in samples) == [0, 1]
        # one chunk, sampled by one worker, even the chunk whose first worker was killed
        assert len({(s["chunk"], s["seed"], s["slot"], s["worker"]) for s in samples}) == 1
    assert_same_training(tmp_path / "run", reference)
