"""The learner group: the DeepSpeed ranks of one model stage (PPO, SFT or reward model).

Every rank is a Ray actor of a role class from ``rlhf_dist.roles``; the group starts them,
does the start-up handshake (rank 0's address and the port of the store it hosts, then
``setup`` on every rank together), and fans each collective call out to all ranks. A learner
rank cannot be replaced in-job: losing one ends the run (the top level names the last
checkpoint).
"""

from __future__ import annotations

import ray

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import Config
from rlhf_dist.driver.healing import PoolGroup, unresponsive_slots
from rlhf_dist.driver.sync_group import WeightSyncGroup
from rlhf_dist.pools import Pool, bundle_of, worker_threads


class LearnerGroup(PoolGroup):
    def __init__(self, name: str, role_cls: type, cfg: Config):
        self.name, self.role_cls, self.cfg = name, role_cls, cfg
        world = cfg.learner.num_workers
        self.pool = Pool(
            name,
            role_cls,
            world,
            bundle_of(cfg.learner),
            lambda i: ((cfg, i, world), {}),
            cfg.ray.placement_timeout_s,
            threads=worker_threads(cfg, "learner"),
        )
        self.on_dispatch = None  # (group name, rank, 0) once a collective call is started

    def _started(self, what: str) -> None:
        if self.on_dispatch is not None:
            for rank in range(len(self)):
                self.on_dispatch(what, rank, 0)

    def run(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank, waited for (results in rank order)."""
        return ray.get(self.call(method, *args, **kwargs))

    def handshake(self, *setup_args) -> list:
        """Join the ranks into one DeepSpeed group: ``setup(*setup_args, addr, port)`` on
        every rank, rank 0 hosting the rendezvous."""
        addr = self.pool.node_ip(0)
        port = ray.get(self.actors[0].host_rendezvous.remote())  # bound already: no race
        return self.run("setup", *setup_args, addr, port)

    def each(self, method: str, shards: list, *args) -> list[ray.ObjectRef]:
        """``method(shard, *args)`` on each rank with its own shard."""
        return [getattr(a, method).remote(s, *args) for a, s in zip(self.actors, shards)]

    def rebuilt(self, generators, inputs) -> LearnerGroup:
        """After a rank died: this group shut down, a new one placed (on other nodes if need
        be) from the initial weights, and the generators joined to its weight-sync group. The
        caller loads a checkpoint and pushes its weights."""
        self.shutdown()
        # generators still receiving from the dead rank would block the new group's forming
        generators.replace(unresponsive_slots(generators.pool, 2.0))
        new = LearnerGroup(self.name, self.role_cls, self.cfg)
        new.on_dispatch = self.on_dispatch
        new.handshake(inputs.policy, inputs.critic)
        generators.connect(WeightSyncGroup(self.cfg, new))
        return new

    # ----------------------------------------------------------------- PPO

    def start_update(
        self, batch: RolloutBatch, kl_coef: float, seed: int, is_cap: float | None = None
    ) -> list[ray.ObjectRef]:
        """Start one PPO update on the step's batch, split across the ranks."""
        args = (kl_coef, seed) if is_cap is None else (kl_coef, seed, is_cap)
        refs = self.each("ppo_update", batch.split(len(self)), *args)
        self._started("learner")
        return refs

    @staticmethod
    def update_result(results: list[dict]) -> dict:
        """Rank 0's metrics (already averaged over ranks) and the slowest rank's compute."""
        metrics = dict(results[0])
        metrics["compute_s"] = max(r["compute_s"] for r in results)
        return metrics

    def update(self, batch: RolloutBatch, kl_coef: float, seed: int) -> dict:
        return self.update_result(ray.get(self.start_update(batch, kl_coef, seed)))

    def save(self, ckpt_dir: str) -> None:
        refs = self.call("save_checkpoint", ckpt_dir)
        self._started("checkpoint")
        ray.get(refs)

    def load(self, ckpt_dir: str, version: int) -> None:
        self.run("load_checkpoint", ckpt_dir, version)

    def export(self, out_dir: str, tokenizer: str) -> str:
        self.run("export_policy", out_dir, tokenizer)
        return out_dir
