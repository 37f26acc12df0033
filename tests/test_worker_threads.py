"""Torch threads per worker: in sync mode a block's workers share the node's cores."""

import pytest

from rlhf_dist import pools
from rlhf_dist.config import load_config


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(pools, "node_cpus", lambda: n)

    return set_cores


def test_sync_mode_shares_the_node_between_a_blocks_workers(cores):
    cores(8)
    cfg = load_config(None, ["rollout.num_workers=2", "reward.num_workers=1"])
    assert pools.worker_threads(cfg, "rollout") == 4  # two generators sample together
    assert pools.worker_threads(cfg, "reward") == 4  # with one reference scorer
    assert pools.worker_threads(cfg, "reference") == 4
    assert pools.worker_threads(cfg, "learner") == 8  # trains alone


def test_never_fewer_than_the_cpus_reserved(cores):
    cores(2)
    cfg = load_config(None, ["rollout.num_workers=4", "learner.num_cpus=3"])
    assert pools.worker_threads(cfg, "rollout") == 1
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
    assert pools.worker_threads(cfg, "rollout") == 1
