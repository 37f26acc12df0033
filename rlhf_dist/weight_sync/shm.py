"""The shared-memory transport (``sync.backend=shm``; CPUs, one machine), with zero copy.

``ShmSlots``: learner rank 0 keeps two slots in ``/dev/shm``, each the whole policy in the
bucket layout, and a push packs the policy into the next slot (one copy, the only one); each
generator then points its parameters at that slot. ``ShmLive`` (zero copy, ``sync.zero_copy``):
the learner's own parameters live in one slot and a push moves nothing. Generators find a
slot through rank 0's open file (``/proc/<pid>/fd/<fd>``), checked by device and inode, so
one on another machine is refused with a clear error (``ShmError``) rather than misled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_dist.weight_sync.base import (
    Buckets,
    Channel,
    Membership,
    Receipt,
    Receiver,
    Sender,
    WeightTarget,
)
from rlhf_dist.weight_sync.layout import (
    ALIGN,
    Bucket,
    Hasher,
    ParamSpec,
    checksum,
    pack,
    plan_buckets,
)

SHM_DIR = "/dev/shm"


class ShmError(RuntimeError):
    """The shared-memory transport cannot be used here; the message says why."""


@dataclass(frozen=True)
class ShmHandle:
    """Where a generator finds one slot: the sender's open file (``/proc/<pid>/fd/<fd>``),
    identified by its device and inode, so that a generator on another machine (or in another
    PID namespace), where that path is some other file or none, is refused, never misled."""

    pid: int
    fd: int
    dev: int
    ino: int
    nbytes: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


def shm_layout(manifest: list[ParamSpec], bucket_bytes: int) -> tuple[list[Bucket], list[int]]:
    """The buckets of ``plan_buckets`` laid end to end in one slot: (buckets, each bucket's
    ``ALIGN``-ed byte offset); the slot's size is the last offset plus the last bucket."""
    plan, offsets, end = plan_buckets(manifest, bucket_bytes), [], 0
    for bucket in plan:
        offsets.append(-(-end // ALIGN) * ALIGN)
        end = offsets[-1] + bucket.nbytes
    return plan, offsets


class ShmSlots:
    """Sender side of the shared-memory transport (CPU, one machine): two slots, each the
    whole policy in the bucket layout, written alternately. A write packs the parameters into
    the slot (one copy, the only one), and each generator then points its parameters at that
    slot: no transfer, no receive copy, and one copy of the weights for every generator.

    Alternating keeps the weights a generator samples with still: the slot a write overwrites
    is the one of the write before the last, and every live generator has moved off it, since
    each push reaches every generator and ends only when all have attached (a generator that
    missed a push was lost, and its replacement attaches afresh). The files are unlinked at
    once: a killed sender leaves nothing in ``/dev/shm``, and the memory is freed when the last
    process holding it lets go."""

    def __init__(
        self, manifest: list[ParamSpec], bucket_bytes: int, directory: str = SHM_DIR, count: int = 2
    ):
        import tempfile

        self.plan, self.offsets = shm_layout(manifest, bucket_bytes)
        self.nbytes = self.offsets[-1] + self.plan[-1].nbytes if self.plan else 0
        self.key = (tuple(manifest), bucket_bytes)
        self.fds: list[int] = []
        self.slots: list[Tensor] = []
        self.handles: list[ShmHandle] = []
        self.writes = 0
        try:
            for _ in range(count):
                fd, path = tempfile.mkstemp(prefix="rlhf_dist-wsync-", dir=directory)
                self.fds.append(fd)
                try:
                    # reserve the pages now: a full /dev/shm fails here, not as a SIGBUS later
                    os.posix_fallocate(fd, 0, max(self.nbytes, 1))
                    slot = torch.from_file(path, shared=True, size=self.nbytes, dtype=torch.uint8)
                finally:
                    os.unlink(path)
                st = os.fstat(fd)
                self.slots.append(slot)
                self.handles.append(ShmHandle(os.getpid(), fd, st.st_dev, st.st_ino, self.nbytes))
        except OSError as e:
            self.close()
            free = free_bytes(directory)
            raise ShmError(
                f"weight sync: cannot hold {('one', 'two')[count - 1]} "
                f"{self.nbytes / 2**20:.1f} MiB slot{'s' * (count > 1)} in "
                f"{directory} ({e}; {free / 2**20:.0f} MiB free there); give it more room "
                f"(docker: --shm-size) or set sync.backend=gloo"
            ) from None

    def write(self, buckets: Iterable[tuple[Bucket, list[Tensor]]], verify: bool):
        """Pack each bucket (its layout and full tensors, in manifest order) into the next
        slot; returns (the slot, the checksum or None)."""
        slot = self.writes % 2
        h = Hasher() if verify else None
        for k, (bucket, tensors) in enumerate(buckets):
            region = self.slots[slot][self.offsets[k] : self.offsets[k] + bucket.nbytes]
            pack(bucket, tensors, region)
            if h is not None:
                for b in bucket.slices(region):
                    h.update(b)
        self.writes += 1
        return slot, (h.hexdigest() if h is not None else None)

    def close(self) -> None:
        self.slots = []
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class ShmLive:
    """Zero-copy sender (``sync.zero_copy``): the learner's own parameters live in one
    shared-memory slot, in the layout of ``ShmSlots``, and each generator's parameters are
    views of the same bytes. The optimizer updates them in place, so a sync copies nothing and
    moves nothing: it only tells the generators the new version.

    Sound only while no generator samples during an update, which holds in ``mode=sync``
    (generate, score, train and sync run one after another), and only for an engine whose
    optimizer steps the module's parameters themselves: one rank at ZeRO-0 in full precision
    (ZeRO 1-3 and bf16 keep the weights in flat buffers of their own). The learner calls
    ``home`` before each sync: a parameter found moved out of the slot (something replaced
    its ``.data``) is copied back in and pointed at it again, so the generators never read
    weights the learner stopped updating."""

    def __init__(
        self,
        params: list[Tensor],
        manifest: list[ParamSpec],
        bucket_bytes: int,
        directory: str = SHM_DIR,
    ):
        self.slots = ShmSlots(manifest, bucket_bytes, directory, count=1)
        self.key, self.handles = self.slots.key, self.slots.handles
        flat = self.slots.slots[0]
        self.views = [
            v
            for bucket, off in zip(self.slots.plan, self.slots.offsets)
            for v in bucket.views(flat[off : off + bucket.nbytes])
        ]
        if len(params) != len(self.views):
            raise ValueError(f"weight sync: {len(params)} parameters for {len(manifest)} specs")
        self.params = params
        self.home()

    @torch.no_grad()
    def home(self) -> int:
        """Point every parameter not in the slot at its place there (its values copied in
        first); returns how many had to be moved."""
        moved = 0
        for p, view in zip(self.params, self.views):
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.data)
                p.data = view  # a tied Parameter is one object: every module sees the view
                moved += 1
        return moved

    def checksum(self) -> str:
        return checksum(self.params)

    def close(self) -> None:
        self.slots.close()


def free_bytes(directory: str) -> int:
    """Bytes free for an unprivileged writer in ``directory`` (0 when it cannot be read)."""
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


def map_slot(handle: ShmHandle) -> Tensor:
    """Map the sender's slot, after checking that the path is that very file."""
    try:
        fd = os.open(handle.path, os.O_RDWR)
    except OSError as e:
        raise ShmError(
            f"weight sync: cannot open the learner's shared-memory slot {handle.path} ({e}); "
            f"sync.backend=shm needs every generator on the machine (and in the PID namespace) "
            f"of learner rank 0: use sync.backend=gloo"
        ) from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (handle.dev, handle.ino):
            raise ShmError(
                f"weight sync: {handle.path} is not the learner's shared-memory slot here "
                f"(another machine or PID namespace); sync.backend=shm needs every generator "
                f"on learner rank 0's machine: use sync.backend=gloo"
            )
        return torch.from_file(
            f"/proc/self/fd/{fd}", shared=True, size=handle.nbytes, dtype=torch.uint8
        )
    finally:
        os.close(fd)


class ShmSender(Sender):
    """Rank 0's slots: ``ShmLive`` when zero copy is asked for and allowed, else ``ShmSlots``
    (made once per layout)."""

    backend = "shm"

    def __init__(self, directory: str = SHM_DIR):
        self.directory = directory
        self.slots: ShmSlots | None = None
        self.live: ShmLive | None = None

    def open(self, params, manifest, bucket_bytes, membership=None, zero_copy=False) -> dict:
        key = (tuple(manifest), bucket_bytes)
        nbytes = sum(s.nbytes for s in manifest)
        if zero_copy:
            if self.live is None or self.live.key != key:
                self.close()
                self.live = ShmLive(params, manifest, bucket_bytes, self.directory)
            return {"handles": self.live.handles, "zero_copy": True, "bytes_per_push": 0}
        if self.slots is None or self.slots.key != key:
            self.close()
            self.slots = ShmSlots(manifest, bucket_bytes, self.directory)
        return {"handles": self.slots.handles, "zero_copy": False, "bytes_per_push": nbytes}

    def send(self, buckets: Buckets, version: int, verify: bool, full: bool = False):
        """Two slots: pack the next one; the handoff is its index. Zero copy: check that every
        parameter is still in the shared slot (one found moved is copied back and re-pointed,
        counted in ``moved``); nothing is written, and the checksum is computed only when
        ``full`` asks for it (a receiver attached afresh)."""
        t0 = time.perf_counter()
        if self.live is not None:
            moved = self.live.home()
            digest = self.live.checksum() if verify and full else None
            return Receipt(version, 0, digest, time.perf_counter() - t0, moved=moved), 0
        slot, digest = self.slots.write(buckets, verify)
        nbytes = sum(s.nbytes for s in self.slots.key[0])  # the parameters', padding not counted
        return Receipt(version, nbytes, digest, time.perf_counter() - t0), slot

    def close(self) -> None:
        for held in (self.slots, self.live):
            if held is not None:
                held.close()
        self.slots = self.live = None


class ShmReceiver(Receiver):
    """Attaches its target to the sender's slot named by each push (each slot mapped once per
    sender and kept here)."""

    backend = "shm"

    def __init__(self):
        self.channel: Channel | None = None
        self.maps: list[Tensor | None] = []

    def open(self, channel: Channel, membership: Membership | None = None) -> None:
        if self.channel is None or self.channel.info["handles"] != channel.info["handles"]:
            self.maps = [None] * len(channel.info["handles"])
        self.channel = channel

    def regions(self, slot: int) -> list[Tensor]:
        """Slot ``slot``'s bucket regions (the slot mapped on first use)."""
        c = self.channel
        if self.maps[slot] is None:
            self.maps[slot] = map_slot(c.info["handles"][slot])
        flat = self.maps[slot]
        plan, offsets = shm_layout(c.manifest, c.bucket_bytes)
        return [flat[off : off + b.nbytes] for b, off in zip(plan, offsets)]

    @torch.no_grad()
    def receive(self, target: WeightTarget, version: int, verify: bool, handoff=None) -> Receipt:
        """Take slot ``handoff`` as the weights. With zero copy the slot holds the learner's
        own parameters: attached once, they are hashed then; later pushes only take the
        version (the bytes read are the learner's)."""
        t0 = time.perf_counter()
        c = self.channel
        if c is None or not isinstance(handoff, int):
            raise ValueError(
                f"weight sync: a shared-memory receive needs an opened receiver and the slot "
                f"the send wrote (got {handoff!r})"
            )
        fresh = target.adopt(c.manifest, self.regions(handoff), c.bucket_bytes)
        hashed = verify and (fresh or not c.info["zero_copy"])
        digest = target.checksum(c.manifest) if hashed else None
        return Receipt(version, 0, digest, time.perf_counter() - t0, fresh=fresh)
