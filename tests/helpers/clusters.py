"""A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``) for the tests
that lose workers or nodes: a head plus worker nodes, health checks fast enough that a killed
node is marked dead within seconds, and this process connected as the driver."""

from contextlib import contextmanager

import ray

FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


@contextmanager
def local_cluster(head_resources: dict, nodes: list[dict], head_cpus: int = 3):
    """The cluster (head with ``head_cpus`` CPUs and ``head_resources``; one worker node per
    entry of ``nodes``, as ``Cluster.add_node`` keyword arguments), shut down on exit."""
    from ray.cluster_utils import Cluster

    from rlhf_dist.ray_env import worker_runtime_env

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "resources": head_resources,
            "_system_config": FAST_HEALTH,
        },
    )
    for node in nodes:
        c.add_node(**node)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env=worker_runtime_env())
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
