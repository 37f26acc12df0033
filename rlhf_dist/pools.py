"""Ray side of the system: pools of role actors placed with placement groups.

The role classes know nothing of Ray; ``ray.remote`` is applied here, from outside.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.config import ENV_REWARD, POOL_SECTIONS, Config, PoolConfig
from rlhf_dist.dispatch import LOST, failed_to_start


class PoolError(RuntimeError):
    """A pool could not be placed; the message names the pool and what is missing."""


def _noop(_self) -> None:
    return None


def _node_ip(_self) -> str:
    return ray.util.get_node_ip_address()


def bundle_of(section: PoolConfig) -> dict[str, float]:
    """One worker's placement-group bundle: CPUs, GPUs and custom resources of a pool section."""
    out = {"CPU": section.num_cpus} | ({"GPU": section.num_gpus} if section.num_gpus > 0 else {})
    return out | dict(section.resources)


def pool_requests(cfg: Config) -> dict[str, tuple[int, dict[str, float]]]:
    """Each pool's (workers, bundle per worker), keyed by config section; no reference pool
    when the reference is the LoRA policy's base (``reference.from_base``), no reward pool
    when the environment gives the rewards (``reward.function=env``)."""
    return {
        name: (getattr(cfg, name).num_workers, bundle_of(getattr(cfg, name)))
        for name in POOL_SECTIONS
        if not (name == "reference" and cfg.reference.from_base)
        and not (name == "reward" and cfg.reward.function == ENV_REWARD and not cfg.reward.model)
    }


def node_cpus() -> int:
    """The CPUs of the largest alive node: what Ray offers there, and on this process's node
    no more than its cores (a local cluster may declare more CPUs than the machine has)."""
    here = ray.util.get_node_ip_address()
    cpus = []
    for n in ray.nodes():
        if n.get("Alive"):
            c = n["Resources"].get("CPU", 0.0)
            cpus.append(min(c, os.cpu_count() or 1) if n["NodeManagerAddress"] == here else c)
    return max(1, math.floor(max(cpus, default=1.0)))


def worker_threads(cfg: Config, section: str) -> int:
    """Torch threads for one worker of pool ``section``: the CPUs it reserved (at least one),
    except for the learner ranks in ``mode=sync``. There one block computes at a time and the
    learner's block has no other workers, so its ranks share the node's cores
    (``ray.block_cores``, default all of them) instead of one each while the rest idle.
    Generators and scorers keep their reservation, so the samples and reference log-probs stay
    bit for bit the same whatever the pool sizes (a thread count changes float sums); in
    ``mode=async`` both sides compute at once and every worker keeps its reservation."""
    pool = getattr(cfg, section)
    own = max(1, math.floor(pool.num_cpus))
    if cfg.mode != "sync" or pool.num_gpus > 0 or section != "learner":
        return own
    return max(own, (cfg.ray.block_cores or node_cpus()) // pool.num_workers)


def total_cpus(cfg: Config) -> float:
    return sum(n * b["CPU"] for n, b in pool_requests(cfg).values())


def _key(name: str, res: str) -> str:
    return f"{name}.num_{res.lower()}s" if res in ("CPU", "GPU") else f"{name}.resources.{res}"


def check_cluster_resources(cfg: Config, only: tuple[str, ...] | None = None) -> None:
    """Refuse a job whose pools cannot fit the cluster, naming the first pool that does not."""
    have = ray.cluster_resources()
    used: dict[str, float] = {}
    for name, (n, bundle) in pool_requests(cfg).items():
        if only is not None and name not in only:
            continue
        for res, per in bundle.items():
            used[res] = used.get(res, 0.0) + n * per
            if used[res] > have.get(res, 0.0) + 1e-9:
                raise PoolError(
                    f"{name}: {n} workers x {_key(name, res)}={per:g} need "
                    f"{used[res]:g} {res} in total with the pools before it, but the cluster "
                    f"has {have.get(res, 0.0):g} {res}"
                )


def _kill(actor) -> None:
    try:
        ray.kill(actor)
    except ValueError:  # not an actor handle any more (already gone)
        pass


class Pool:
    """Actors of one role class. Each actor has a placement group of its own (one bundle), so
    a pool can grow, shrink and replace a lost worker at runtime, and a worker that cannot be
    placed fails clearly."""

    def __init__(
        self,
        name: str,
        role_cls: type,
        num_workers: int,
        bundle: dict[str, float],
        make_args: Callable[[int], tuple[tuple, dict]],
        placement_timeout_s: float,
        threads: int = 0,
    ):
        self.name, self.bundle = name, dict(bundle)
        # torch threads per worker (``worker_threads``); 0: the CPUs of the bundle
        self.threads = threads or max(1, math.floor(self.bundle["CPU"]))
        self.make_args, self.timeout = make_args, placement_timeout_s
        self.remote_cls = ray.remote(role_cls)
        self.actors: list = []
        self.pgs: list = []
        self.worker_ids: list[int] = []  # each slot's worker, numbered as started
        self.started = 0
        self.add(num_workers)

    def _place(self, n: int) -> list:
        pgs = [placement_group([dict(self.bundle)]) for _ in range(n)]
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=n, timeout=self.timeout)
        if len(ready) < n:
            for pg in pgs:
                remove_placement_group(pg)
            raise PoolError(
                f"{self.name}: {n} more workers x {self.bundle} could not be placed within "
                f"{self.timeout:g}s (ray.placement_timeout_s); cluster resources "
                f"available: {ray.available_resources()}"
            )
        return pgs

    def _start(self, i: int, pg):
        self.started += 1
        args, kwargs = self.make_args(i)
        extra = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        return self.remote_cls.options(
            num_cpus=self.bundle["CPU"],
            num_gpus=self.bundle.get("GPU", 0),
            resources=extra or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg),
            # OMP/torch threads: the CPUs a worker was given, or ``worker_threads``.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.threads)}},
        ).remote(*args, **kwargs)

    def add(self, n: int) -> list:
        """Start ``n`` more actors; returns them."""
        new = []
        for pg in self._place(n):
            actor = self._start(len(self.actors), pg)
            self.actors.append(actor)
            self.pgs.append(pg)
            self.worker_ids.append(self.started)
            new.append(actor)
        return new

    def has_room(self) -> bool:
        """Whether the cluster has the resources for one more worker right now."""
        free = ray.available_resources()
        return all(free.get(k, 0.0) + 1e-9 >= v for k, v in self.bundle.items())

    def replace(self, i: int):
        """Stop actor ``i`` (lost or hung) and start a new one in its place, on a new placement
        group (the old one may be on a node that is gone). Returns the new actor."""
        _kill(self.actors[i])
        remove_placement_group(self.pgs[i])
        (pg,) = self._place(1)
        self.actors[i], self.pgs[i] = self._start(i, pg), pg
        self.worker_ids[i] = self.started
        return self.actors[i]

    def remove(self, i: int) -> None:
        """Stop actor ``i`` and free its resources."""
        actor, pg = self.actors.pop(i), self.pgs.pop(i)
        self.worker_ids.pop(i)
        _kill(actor)
        remove_placement_group(pg)

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every actor."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def probe(self, timeout_s: float) -> tuple[list[int], list[int]]:
        """A no-op call on each actor: the slots whose actor is gone, and those that did not
        answer within ``timeout_s`` (idle actors answer at once, busy ones when their call
        ends). An actor whose constructor raised raises its error."""
        refs = [a.__ray_call__.remote(_noop) for a in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        lost, silent = [], []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0)
            except LOST as e:
                if failed_to_start(e):
                    raise
                lost.append(i)
            except ray.exceptions.GetTimeoutError:
                silent.append(i)
        return lost, silent

    def node_ip(self, i: int) -> str:
        return ray.get(self.actors[i].__ray_call__.remote(_node_ip))

    def shutdown(self) -> None:
        while self.actors:
            self.remove(len(self.actors) - 1)
