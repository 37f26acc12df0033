import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster owned by the test module (never `ray stop` the machine's)."""
    import ray

    from rlhf_dist.ray_env import worker_runtime_env

    ray.init(
        address="local",
        num_cpus=8,
        object_store_memory=512 << 20,
        include_dashboard=False,
        runtime_env=worker_runtime_env(),
    )
    yield ray
    ray.shutdown()
