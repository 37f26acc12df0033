"""Torch threads per worker: in sync mode the learner ranks share the node's cores."""

import pytest

from rlhf_dist import pools
from rlhf_dist.config import load_config


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(pools, "node_cpus", lambda: n)

    return set_cores


def test_sync_mode_gives_the_learner_ranks_the_node(cores):
    cores(8)
    assert pools.worker_threads(load_config(None, []), "learner") == 8
    assert pools.worker_threads(load_config(None, ["learner.num_workers=2"]), "learner") == 4


def test_generators_and_scorers_keep_their_reservation_whatever_the_pool_sizes(cores):
    """Their thread count would change their float sums, and so the samples."""
    cores(8)
    for n in (1, 2, 3):
        cfg = load_config(None, [f"rollout.num_workers={n}", f"reward.num_workers={n}"])
        assert [pools.worker_threads(cfg, s) for s in ("rollout", "reward", "reference")] == [
            1,
            1,
            1,
        ]


def test_never_fewer_than_the_cpus_reserved(cores):
    cores(2)
    cfg = load_config(None, ["learner.num_workers=2", "learner.num_cpus=3"])
    assert pools.worker_threads(cfg, "learner") == 3


def test_async_mode_keeps_each_worker_to_its_reservation(cores):
    cores(8)
    cfg = load_config(None, ["mode=async", "learner.num_cpus=2"])
    assert pools.worker_threads(cfg, "rollout") == 1
    assert pools.worker_threads(cfg, "learner") == 2


def test_gpu_workers_keep_their_reservation(cores):
    cores(8)
    cfg = load_config(None, ["learner.num_gpus=1", "learner.num_cpus=1"])
    assert pools.worker_threads(cfg, "learner") == 1


def test_block_cores_fixes_the_share_whatever_the_node(cores):
    cores(16)
    cfg = load_config(None, ["ray.block_cores=2"])
    assert pools.worker_threads(cfg, "learner") == 2


def test_openmp_threads_sleep_while_waiting_in_async_mode_only():
    """Async mode overlaps generation and training on the same cores, so OpenMP threads must
    not spin; in sync mode the blocks take turns and libgomp's spinning default is faster."""
    from rlhf_dist.ray_env import ASYNC_ENV, WORKER_ENV, worker_env

    assert worker_env("sync", {}) == WORKER_ENV
    assert worker_env("async", {}) == {**WORKER_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    assert set(ASYNC_ENV) == {"OMP_WAIT_POLICY"}
    # the driver's shell wins in both modes, for these keys and the common ones
    shell = {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "true"}
    for mode in ("sync", "async"):
        env = worker_env(mode, shell)
        assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["TOKENIZERS_PARALLELISM"] == "true"


def test_the_cluster_started_for_a_run_gets_its_modes_environment(monkeypatch):
    import ray

    from rlhf_dist import launch

    seen = []
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw["runtime_env"]["env_vars"]))
    for mode in ("sync", "async"):
        launch.init_ray(load_config(None, [f"mode={mode}"]), "")
        launch.init_ray(load_config(None, [f"mode={mode}"]), "ray://head:10001")
    assert [e.get("OMP_WAIT_POLICY") for e in seen] == [None, None, "PASSIVE", "PASSIVE"]
