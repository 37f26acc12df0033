"""The weight-sync group: learner rank 0 plus every generator, the transport between them, and
the policy version the generators hold.

A collective backend (gloo on CPUs, NCCL on GPUs) needs a group whose members are known: rank
0 hosts a ``TCPStore`` and each membership forms a group under a fresh prefix. The object-store
transport needs no group: each generator pulls rank 0's buckets by reference; neither does
shared memory (one machine, CPUs): rank 0 writes the policy into the next of its two slots and
each generator points its parameters at that slot (``weight_sync.ShmSlots``); in sync mode
with one full-precision ZeRO-0 learner rank (``sync.zero_copy``), the learner's parameters
live in one slot the generators read as it is, and a push only hands out the version
(``weight_sync.ShmLive``). Either way a
push returns what it cost, or the generator slots that were lost and must be replaced before
it is tried again (the generator group does that, docs/architecture.md "Weight sync").
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import ray

from rlhf_dist import weight_sync
from rlhf_dist.config import Config
from rlhf_dist.dispatch import LOST
from rlhf_dist.driver.errors import LearnerLost, SyncStalled, WeightSyncError


@dataclass
class PushOutcome:
    """One push: the slowest member's compute, or the generator slots lost during it, or
    ``regroup``: the transport changed (shared memory could not reach a generator) and the
    group must form before the push is tried again."""

    compute_s: float = 0.0
    lost: list[int] = field(default_factory=list)
    regroup: bool = False


SHM_HEADROOM = 64 << 20  # bytes /dev/shm keeps free beside the slots for auto to pick shm


def sync_backend(cfg: Config, nbytes: int = 0) -> str:
    """The transport ``sync.backend`` names; ``auto``: nccl when learner and generators have
    GPUs; on CPUs, shared memory when the cluster is one machine and ``/dev/shm`` holds two
    copies of the ``nbytes`` a sync moves, else gloo (a generator may land on any node)."""
    if cfg.sync.backend != "auto":
        return cfg.sync.backend
    if cfg.learner.num_gpus > 0 and cfg.rollout.num_gpus > 0:
        return "nccl"
    one_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    room = weight_sync.free_bytes(weight_sync.SHM_DIR) >= 2 * nbytes + SHM_HEADROOM
    return "shm" if one_node and room else "gloo"


class WeightSyncGroup:
    def __init__(self, cfg: Config, learners):
        self.cfg, self.learners = cfg, learners  # a LearnerGroup
        self.bucket_bytes = int(cfg.sync.bucket_mb * (1 << 20))
        self.version: int | None = None  # what every generator was verified to hold last
        rank0 = learners.actors[0]
        manifest = ray.get(rank0.sync_manifest.remote())
        self.nbytes = weight_sync.manifest_bytes(manifest)  # what one push moves
        self.backend = sync_backend(cfg, self.nbytes)
        self.manifest = ray.put(manifest)
        self.on_dispatch = None  # (pool name, slot, task) after each receive is started
        self.shm_handles = None
        self.zero_copy = False  # the generators read the learner's own parameters
        if self.backend == "shm":
            share = cfg.sync.zero_copy and cfg.mode == "sync"
            try:
                held = ray.get(rank0.host_shm_sync.remote(self.bucket_bytes, share))
                self.shm_handles, self.zero_copy = held["handles"], held["zero_copy"]
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, weight_sync.ShmError):
                    raise WeightSyncError(str(e.cause)) from None
                raise

    @property
    def bytes_per_push(self) -> int:
        """What one push moves: nothing when the generators read the learner's parameters."""
        return 0 if self.zero_copy else self.nbytes

    @property
    def collective(self) -> bool:
        """Whether the transport is a collective group that each membership forms anew (gloo,
        NCCL); the object store and shared memory need none."""
        return self.backend not in ("object_store", "shm")

    def form(self, generators: list) -> bool:
        """A new group of learner rank 0 and ``generators`` under a fresh prefix; False when a
        generator was lost while joining (replace it and form again)."""
        if not self.collective:
            return True
        rank0 = self.learners.actors[0]
        host = self.learners.pool.node_ip(0)
        port = ray.get(rank0.host_weight_sync.remote())  # bound already: no race
        members = [rank0, *generators]
        prefix = f"wsync-{time.time_ns()}"
        args = (len(members), prefix, self.backend, self.cfg.sync.timeout_s)
        joins = [m.join_weight_sync.remote(host, port, r, *args) for r, m in enumerate(members)]
        try:
            ray.get(joins[1:])
        except LOST:  # the learner's join fails at sync.timeout_s without it
            try:
                ray.get(joins[0])
            except ray.exceptions.RayTaskError:
                pass
            return False
        ray.get(joins[0])
        return True

    def push(self, generators: list, version: int) -> PushOutcome:
        """Send the learner's policy to every generator as ``version`` and verify it."""
        verify = self.cfg.sync.verify
        if self.collective:
            send = self.learners.call("broadcast_weights", self.bucket_bytes, version, verify)
            recv = [
                g.receive_weights.remote(self.manifest, self.bucket_bytes, version, verify)
                for g in generators
            ]
        elif self.zero_copy:
            # nothing to write: the learner checks its parameters are in the shared slot
            # while each generator takes the version (and, new to the slot, attaches)
            send = [self.learners.actors[0].share_weights.remote(version)]
            recv = [
                g.attach_weights.remote(
                    self.manifest, self.bucket_bytes, self.shm_handles, 0, version, verify, True
                )
                for g in generators
            ]
        elif self.backend == "shm":
            # the learner writes its next slot first; then each generator attaches to it
            send = self.learners.call("write_weights", self.bucket_bytes, version, verify)
            try:
                slot = ray.get(send)[0]["slot"]
            except LOST:
                raise LearnerLost("a learner rank died during the weight sync") from None
            recv = [
                g.attach_weights.remote(
                    self.manifest, self.bucket_bytes, self.shm_handles, slot, version, verify
                )
                for g in generators
            ]
        else:
            out = [
                a.weight_buckets.options(num_returns=2).remote(self.bucket_bytes, version, verify)
                for a in self.learners.actors
            ]
            send = [meta for meta, _ in out]
            # Rank 0's buckets go to the generators by reference: each pulls them from the
            # object store; the driver only reads the metadata.
            recv = [
                g.load_weight_buckets.remote(
                    self.manifest, self.bucket_bytes, out[0][1], version, verify
                )
                for g in generators
            ]
        if self.on_dispatch is not None:
            for slot in range(len(recv)):
                self.on_dispatch("weight_sync", slot, 0)
        try:
            got, lost, hung = self._wait_receivers(recv, send)
        except ray.exceptions.RayTaskError as e:
            if self.backend == "shm" and isinstance(e.cause, weight_sync.ShmError):
                return self._leave_shared_memory(e.cause)
            raise
        if lost:
            self._wait_send_after_loss(send)
            return PushOutcome(lost=sorted(lost | hung))
        sent = ray.get(send)[0]
        if sent.get("moved"):
            warnings.warn(
                f"weight sync: {sent['moved']} of the learner's parameters had left the shared "
                f"memory the generators read (their .data was replaced); copied back",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.zero_copy and any(g["checksum"] is not None for g in got):
            # a generator attached afresh: compare its bytes with the learner's once
            sent = {**sent, "checksum": ray.get(self.learners.actors[0].shared_checksum.remote())}
        if verify:
            for i, g in enumerate(got):
                if self.zero_copy and g["checksum"] is None:
                    bad = g["version"] != version  # reads the learner's own bytes
                else:
                    bad = g["checksum"] != sent["checksum"] or g["version"] != version
                if bad:
                    raise WeightSyncError(
                        f"generator {i} holds version {g['version']} checksum {g['checksum']}, "
                        f"learner sent version {version} checksum {sent['checksum']}"
                    )
        self.version = version
        return PushOutcome(compute_s=max([sent["compute_s"]] + [g["compute_s"] for g in got]))

    def _leave_shared_memory(self, cause: Exception) -> PushOutcome:
        """A generator cannot attach to the learner's slots (placed on another machine after
        ``auto`` chose shared memory for a one-machine cluster, which then grew): ``auto``
        goes on over gloo, a set ``sync.backend=shm`` stops with the reason."""
        if self.cfg.sync.backend != "auto":
            raise WeightSyncError(str(cause))
        warnings.warn(f"{cause}; sync.backend=auto goes on over gloo", RuntimeWarning, stacklevel=2)
        self.backend, self.zero_copy = "gloo", False
        return PushOutcome(regroup=True)

    def _wait_send_after_loss(self, send: list) -> None:
        """The learner's send fails or ends with the broken group; a dead learner rank raises
        (the top level ends the run)."""
        try:
            ray.get(send, timeout=self.cfg.sync.timeout_s + 60)
        except ray.exceptions.RayTaskError:
            pass
        except ray.exceptions.GetTimeoutError:
            raise SyncStalled(
                f"weight sync: a generator was lost and the learner's send did not end "
                f"within sync.timeout_s={self.cfg.sync.timeout_s:g}"
            ) from None

    def _wait_receivers(self, recv: list, send: list) -> tuple[list, set[int], set[int]]:
        """Results of the generators' receive calls, the slots lost, and (once one is lost)
        the slots left waiting on the broken group: those still receiving a moment after the
        learner's send has ended (it fails, or gloo times out after ``sync.timeout_s``)."""
        slot = {ref: i for i, ref in enumerate(recv)}
        got: list = [None] * len(recv)
        lost: set[int] = set()
        errors: list = []
        pending, sending = list(recv), list(send)
        while pending:
            # the learner's send is watched too: receivers whose sender died would wait for
            # sync.timeout_s, a dead learner rank is known at once
            [ref], _ = ray.wait(pending + sending, num_returns=1)
            if ref in sending:
                sending.remove(ref)
                try:
                    ray.get(ref)
                except LOST:
                    raise LearnerLost("a learner rank died during the weight sync") from None
                except ray.exceptions.RayTaskError:
                    pass  # the group broke under it: a receiver's loss shows next
                continue
            pending.remove(ref)
            try:
                got[slot[ref]] = ray.get(ref)
            except LOST:
                lost.add(slot[ref])
                break
            except ray.exceptions.RayTaskError:
                errors.append(ref)  # the group broke under it: a loss shows next
        if lost:
            ray.wait(send, num_returns=len(send), timeout=self.cfg.sync.timeout_s + 10)
            # Over the object store a receiver does not depend on the others: wait for all.
            grace = 1.0 if self.collective else None
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=grace)
            for ref in done:
                try:
                    ray.get(ref)
                except LOST:
                    lost.add(slot[ref])
                except ray.exceptions.RayTaskError:
                    pass
        elif errors:
            ray.get(errors[0])  # a failure with no member lost: a real error, raise it
        return got, lost, {slot[r] for r in pending}
