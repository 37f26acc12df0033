import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster owned by the test module (never `ray stop` the machine's)."""
    import ray

    from rlhf_dist.launch import WORKER_ENV

    ray.init(
        num_cpus=8,
        object_store_memory=512 << 20,
        include_dashboard=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    yield ray
    ray.shutdown()
