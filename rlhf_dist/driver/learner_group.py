"""The learner group: the DeepSpeed ranks of one model stage (PPO, SFT or reward model).

Every rank is a Ray actor of a role class from ``rlhf_dist.roles``; the group starts them,
does the start-up handshake (rank 0's address and the port of the store it hosts, then
``setup`` on every rank together), and fans each collective call out to all ranks. A lost
rank (its process or node gone, or a collective that failed on a surviving rank because a
peer is gone) is raised as ``LearnerLost`` by the group itself, whatever call saw it; the top
level rebuilds the group from the newest checkpoint (``rebuilt``; docs/architecture.md,
"Failures").
"""

from __future__ import annotations

import dataclasses

import ray

from rlhf_dist.batch import RolloutBatch, UpdateResult
from rlhf_dist.config import Config
from rlhf_dist.dispatch import LOST, failed_to_start
from rlhf_dist.driver.errors import LearnerLost, WorkerFailedToStart
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
        self.manifest = None  # what a weight sync moves (rank 0's, from the handshake)

    def _started(self, what: str) -> None:
        if self.on_dispatch is not None:
            for rank in range(len(self)):
                self.on_dispatch(what, rank, 0)

    def get(self, refs, what: str = "a call"):
        """``ray.get`` of calls on the ranks, with a lost rank raised as ``LearnerLost``: the
        rank's own loss, or a collective failing on a surviving rank because a peer is gone (a
        ``RayTaskError`` with every rank alive is the role's own error, raised as it is)."""
        try:
            return ray.get(refs)
        except LOST as e:
            if failed_to_start(e):
                raise WorkerFailedToStart(f"{self.name}: {e}") from e
            dead = self.dead()
            raise LearnerLost(dead[0] if dead else None, type(e).__name__, what) from e
        except ray.exceptions.RayTaskError as e:
            dead = self.dead()
            if not dead:
                raise
            raise LearnerLost(dead[0], type(e).__name__, what) from e

    def run(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank, waited for (results in rank order)."""
        return self.get(self.call(method, *args, **kwargs), method)

    def handshake(self, *setup_args) -> list:
        """Join the ranks into one DeepSpeed group: ``setup(*setup_args, addr, port)`` on
        every rank, rank 0 hosting the rendezvous."""
        addr = self.host()
        port = self.get(self.actors[0].host_rendezvous.remote())  # bound already: no race
        infos = self.run("setup", *setup_args, addr, port)
        self.manifest = infos[0].get("sync_manifest")
        return infos

    def host(self) -> str:
        """Rank 0's node address (it hosts the stores the other processes meet through)."""
        return self.pool.node_ip(0)

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

    # ----------------------------------------------------------------- weight sync

    def open_weight_sync(self, backend: str, bucket_bytes: int, zero_copy=False, membership=None):
        """Rank 0 opens its side of the transport (``Learner.open_weight_sync``): a ref."""
        return self.actors[0].open_weight_sync.remote(backend, bucket_bytes, membership, zero_copy)

    def send_weights(self, bucket_bytes: int, version: int, verify: bool, full: bool = False):
        """Every rank's send (``Learner.send_weights``): (the refs of their receipts, the ref
        of rank 0's handoff for the receivers)."""
        out = [
            a.send_weights.options(num_returns=2).remote(bucket_bytes, version, verify, full)
            for a in self.actors
        ]
        return [receipt for receipt, _ in out], out[0][1]

    # ----------------------------------------------------------------- PPO

    def start_update(
        self, batch: RolloutBatch, kl_coef: float, seed: int, is_cap: float | None = None
    ) -> list[ray.ObjectRef]:
        """Start one PPO update on the step's batch, split across the ranks."""
        args = (kl_coef, seed) if is_cap is None else (kl_coef, seed, is_cap)
        refs = self.each("ppo_update", batch.split(len(self)), *args)
        self._started("learner")
        return refs

    def finish_update(self, refs: list[ray.ObjectRef]) -> UpdateResult:
        """Rank 0's result (its metrics already averaged over ranks) with the slowest rank's
        compute and every rank's count of what it trained, in batch order."""
        results = self.get(refs, "the PPO update")
        return dataclasses.replace(
            results[0],
            compute_s=max(r.compute_s for r in results),
            trained=[n for r in results for n in r.trained],  # the shards are contiguous
        )

    def update(self, batch: RolloutBatch, kl_coef: float, seed: int) -> UpdateResult:
        return self.finish_update(self.start_update(batch, kl_coef, seed))

    def save(self, ckpt_dir: str) -> None:
        refs = self.call("save_checkpoint", ckpt_dir)
        self._started("checkpoint")
        self.get(refs, "a checkpoint")

    def load(self, ckpt_dir: str, version: int) -> None:
        self.run("load_checkpoint", ckpt_dir, version)

    def export(self, out_dir: str, tokenizer: str) -> str:
        self.run("export_policy", out_dir, tokenizer)
        return out_dir
