"""The weight-sync group: learner rank 0 plus every generator, the transport between them, and
the policy version the generators hold.

The transports are ``rlhf_dist.weight_sync``'s (each a sender on learner rank 0 and a receiver
on each generator); this group runs them through one sequence whatever the transport: the
learner opens its sender (once, or per membership for a collective, whose group forms anew
under a fresh prefix), every generator opens its receiver on the channel it handed out, and a
push is the learner's send, then (after it, where the receivers need its handoff: a slot, the
buckets) every receive, each ending in a ``Receipt`` the group verifies. A push returns what it
cost, or the generator slots lost during it, which the generator group replaces before it is
tried again (docs/architecture.md, "Weight sync").
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
        self.manifest = learners.manifest
        self.nbytes = weight_sync.manifest_bytes(self.manifest)  # the synced parameters' bytes
        self.on_dispatch = None  # (pool name, slot, task) after each receive is started
        self._open(sync_backend(cfg, self.nbytes))

    def _open(self, backend: str) -> None:
        """Set up learner rank 0's sender of ``backend``; what it hands out becomes the
        channel every generator's receiver opens."""
        self.backend, self.transport = backend, weight_sync.transport(backend)
        share = self.cfg.sync.zero_copy and self.cfg.mode == "sync"
        try:
            info = self.learners.get(
                self.learners.open_weight_sync(backend, self.bucket_bytes, share)
            )
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, weight_sync.ShmError):
                raise WeightSyncError(str(e.cause)) from None
            raise
        self.zero_copy = info["zero_copy"]  # the generators read the learner's own parameters
        self.bytes_per_push = info["bytes_per_push"]  # what one push moves
        self.port = info.get("port")  # a collective's store
        channel = weight_sync.Channel(backend, self.bucket_bytes, self.manifest, info)
        self.channel = ray.put(channel)

    @property
    def collective(self) -> bool:
        """Whether the transport is a collective group that each membership forms anew (gloo,
        NCCL); the object store and shared memory need none."""
        return self.transport.collective

    def form(self, generators: list) -> bool:
        """Every generator opens its receiver; a collective forms a new group of learner rank
        0 and ``generators`` under a fresh prefix. False when a generator was lost meanwhile
        (replace it and form again)."""
        if not self.collective:
            try:
                ray.get([g.open_weight_sync.remote(self.channel) for g in generators])
            except LOST:
                return False
            return True
        host = self.learners.host()
        size, prefix = len(generators) + 1, f"wsync-{time.time_ns()}"
        timeout = self.cfg.sync.timeout_s

        def member(rank: int) -> weight_sync.Membership:
            return weight_sync.Membership(host, self.port, rank, size, prefix, timeout)

        bb = self.bucket_bytes
        own = self.learners.open_weight_sync(self.backend, bb, membership=member(0))
        joins = [
            g.open_weight_sync.remote(self.channel, member(r + 1)) for r, g in enumerate(generators)
        ]
        try:
            ray.get(joins)
        except LOST:  # the learner's join fails at sync.timeout_s without it
            try:
                self.learners.get(own, "forming the weight-sync group")
            except ray.exceptions.RayTaskError:
                pass
            return False
        self.learners.get(own, "forming the weight-sync group")
        return True

    def push(self, generators: list, version: int) -> PushOutcome:
        """Send the learner's policy to every generator as ``version`` and verify it."""
        verify = self.cfg.sync.verify
        sends, handoff = self.learners.send_weights(self.bucket_bytes, version, verify)
        if self.transport.handoff:
            # the receivers need what the send returned (a slot, the buckets)
            self.learners.get(sends, "the weight sync")
        else:
            handoff = None  # a collective's receivers take part in the send itself
        recv = [g.receive_weights.remote(version, verify, handoff) for g in generators]
        if self.on_dispatch is not None:
            for slot in range(len(recv)):
                self.on_dispatch("weight_sync", slot, 0)
        try:
            got, lost, hung = self._wait_receivers(recv, sends)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, weight_sync.ShmError):
                return self._leave_shared_memory(e.cause)
            raise
        if lost:
            self._wait_send_after_loss(sends)
            return PushOutcome(lost=sorted(lost | hung))
        sent = self.learners.get(sends, "the weight sync")[0]
        if sent.moved:
            warnings.warn(
                f"weight sync: {sent.moved} of the learner's parameters had left the shared "
                f"memory the generators read (their .data was replaced); copied back",
                RuntimeWarning,
                stacklevel=2,
            )
        if verify and sent.checksum is None and any(g.fresh for g in got):
            # a receiver attached afresh to what the learner did not hash: hash it now
            again = self.learners.send_weights(self.bucket_bytes, version, True, True)[0]
            sent = self.learners.get(again, "the weight sync")[0]
        if verify:
            self._verify(got, sent, version)
        self.version = version
        return PushOutcome(compute_s=max([sent.seconds] + [g.seconds for g in got]))

    def verify_held(self, generators: list, version: int) -> None:
        """After a replacement, before anyone samples: every generator holds ``version`` and
        the learner's weights, read from its own parameters and the learner's (not from the
        push's receipts: a replacement that no push reached is caught here too)."""
        refs = [g.status.remote() for g in generators]
        want = self.learners.get(self.learners.call("policy_checksum"), "a checksum")[0]
        for i, ref in enumerate(refs):
            try:
                h = ray.get(ref)
            except LOST:
                continue  # lost since: it is replaced (and checked) before it is used again
            if h["version"] != version or h["checksum"] != want:
                raise WeightSyncError(
                    f"generator {i} holds version {h['version']} checksum {h['checksum']} "
                    f"before it samples; the learner holds version {version} checksum {want}"
                )

    @staticmethod
    def _verify(got: list, sent, version: int) -> None:
        """Every receiver holds ``version`` and, where it hashed (where nothing moved it reads
        the learner's own bytes), the learner's checksum."""
        for i, g in enumerate(got):
            bad = g.version != version or (g.checksum is not None and g.checksum != sent.checksum)
            if bad:
                raise WeightSyncError(
                    f"generator {i} holds version {g.version} checksum {g.checksum}, "
                    f"learner sent version {version} checksum {sent.checksum}"
                )

    def _leave_shared_memory(self, cause: Exception) -> PushOutcome:
        """A generator cannot attach to the learner's slots (placed on another machine after
        ``auto`` chose shared memory for a one-machine cluster, which then grew): ``auto``
        goes on over gloo, a set ``sync.backend=shm`` stops with the reason."""
        if self.cfg.sync.backend != "auto":
            raise WeightSyncError(str(cause))
        warnings.warn(f"{cause}; sync.backend=auto goes on over gloo", RuntimeWarning, stacklevel=2)
        self._open("gloo")
        return PushOutcome(regroup=True)

    def _wait_send_after_loss(self, send: list) -> None:
        """The learner's send fails or ends with the broken group; a dead learner rank raises
        (the top level ends the run)."""
        try:
            ray.get(send, timeout=self.cfg.sync.timeout_s + 60)
        except LOST as e:
            raise LearnerLost(None, type(e).__name__, "the weight sync") from None
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
                except LOST as e:
                    raise LearnerLost(None, type(e).__name__, "the weight sync") from None
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
