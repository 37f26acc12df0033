"""Weight sync from learner rank 0 to the generators over a dedicated collective group.

The group (learner rank 0 = rank 0, generator ``i`` = rank ``i + 1``) is separate from
DeepSpeed's: it rendezvous through a ``TCPStore`` that learner rank 0 hosts, under a prefix
of its own, so a new membership forms a new group without touching the learner's.

Parameters travel as raw bytes in flat uint8 buckets of at most ``bucket_bytes`` (a larger
parameter gets a bucket of its own), in the order of a *manifest* that both sides agree on;
dtypes are kept (a bf16 tensor travels as bf16). Tied weights appear once
(``named_parameters`` de-duplicates shared ``Parameter`` objects). ``plan_buckets`` lays the
buckets out for both sides: each parameter starts at a multiple of ``ALIGN`` bytes, so its
slice of a bucket can be viewed as its dtype and shape; the padding between parameters
carries nothing. A LoRA model syncs its adapters only (``sync_params``): every generator
holds the frozen base already and applies the adapters it receives to it.

The learner packs each bucket into one of two reusable buffers and alternates between them,
so packing bucket k+1 overlaps the transfer of bucket k. A generator receives in place: the
first time it sees a layout it moves its parameters into one persistent buffer per bucket
(each parameter's ``.data`` becomes a view of its slice), and from then on every bucket is
broadcast straight into them, with no unpacking copy and no allocation.

The checksum is an XXH3-128 digest of the parameters' bytes in manifest order (never the
padding). The learner hashes the parameter slices of the buckets it sends; a generator
hashes the parameters it holds after loading. The two digests are equal exactly when the
generator holds the learner's weights bit for bit (barring a 2^-128 collision; XXH3 is not
cryptographic, and needs not be: it checks a transfer, and it is ~40x faster than BLAKE2b,
which mattered at 100M parameters).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=_dtype(self.dtype)).element_size()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def full_shape(p: Tensor) -> tuple[int, ...]:
    """The unpartitioned shape (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def sync_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters a sync moves: all of them, or, when some are frozen (a LoRA model's
    base, which every generator holds already), the trainable ones only (the adapters)."""
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    return trainable if trainable and len(trainable) < len(named) else named


def manifest_of(model: nn.Module) -> list[ParamSpec]:
    return [ParamSpec(n, full_shape(p), str(p.dtype)) for n, p in sync_params(model)]


def manifest_bytes(manifest: list[ParamSpec]) -> int:
    """What one sync moves: the parameters' bytes (the alignment padding not counted)."""
    return sum(s.nbytes for s in manifest)


ALIGN = 64  # bytes; a multiple of every dtype's element size


@dataclass(frozen=True)
class Bucket:
    """Manifest entries ``start`` to ``stop - 1`` in one flat buffer of ``nbytes`` bytes,
    entry ``i`` at byte ``offsets[i]``."""

    start: int
    specs: tuple[ParamSpec, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @property
    def stop(self) -> int:
        return self.start + len(self.specs)

    def slices(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's bytes in ``flat`` (this bucket's buffer), padding left out."""
        return [flat[o : o + s.nbytes] for o, s in zip(self.offsets, self.specs)]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's slice of ``flat`` seen as its dtype and shape."""
        return [
            b.view(_dtype(s.dtype)).view(s.shape) for b, s in zip(self.slices(flat), self.specs)
        ]


def plan_buckets(manifest: list[ParamSpec], bucket_bytes: int) -> list[Bucket]:
    """The bucket layout both sides use: consecutive parameters, each at an ``ALIGN``-ed
    offset, in buckets of at most ``bucket_bytes`` (a larger parameter gets its own)."""
    buckets: list[Bucket] = []
    start, offsets, end = 0, [], 0
    for i, spec in enumerate(manifest):
        offset = -(-end // ALIGN) * ALIGN  # the end so far, rounded up
        if offsets and offset + spec.nbytes > bucket_bytes:
            buckets.append(Bucket(start, tuple(manifest[start:i]), tuple(offsets), end))
            start, offsets, offset = i, [], 0
        offsets.append(offset)
        end = offset + spec.nbytes
    if offsets:
        buckets.append(Bucket(start, tuple(manifest[start:]), tuple(offsets), end))
    return buckets


def _as_bytes(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _update_hash(h, t: Tensor) -> None:
    h.update(_as_bytes(t).cpu().numpy())


def _new_hash():
    return xxhash.xxh3_128()


def checksum(tensors: Iterable[Tensor]) -> str:
    h = _new_hash()
    for t in tensors:
        _update_hash(h, t)
    return h.hexdigest()


def model_checksum(model: nn.Module) -> str:
    """The checksum of the parameters a sync moves (``sync_params``)."""
    return checksum(p for _, p in sync_params(model))


class SyncGroup:
    """One membership of the weight-sync group; rank 0 hosts the store.

    Rank 0 passes the store it already hosts (``store``, bound at port 0 so that no other
    process can take its port first; ``port`` is then its port); without one, rank 0 opens
    a server at ``port``. The other ranks connect to ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        prefix: str,
        backend: str,
        timeout_s: float,
        store: dist.TCPStore | None = None,
    ):
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if store is not None and (rank != 0 or store.port != port):
            raise ValueError(
                f"weight sync: rank {rank} given a store on port {store.port}, not {port}"
            )
        if store is None:
            store = dist.TCPStore(
                host,
                port,
                world_size,
                is_master=(rank == 0),
                timeout=timeout,
                wait_for_workers=False,
            )
        self.store = store
        store = dist.PrefixStore(prefix, self.store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # a lost member fails the sync instead of hanging it
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            raise ValueError(f"sync.backend: unknown backend {backend!r}")
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")

        self._buffers: list[Tensor | None] = [None, None]

    def buffer(self, slot: int, nbytes: int) -> Tensor:
        """A reusable uint8 buffer (one of two slots) of at least ``nbytes``; grows once."""
        buf = self._buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes]

    def broadcast(self, tensor: Tensor):
        """Start a broadcast from rank 0; returns the work to ``wait()`` on."""
        return self.pg.broadcast(tensor, 0)


def _pack(bucket: Bucket, tensors: list[Tensor], flat: Tensor) -> Tensor:
    """Copy ``tensors`` (the bucket's full parameters) into their slices of ``flat``."""
    for b, t in zip(bucket.slices(flat), tensors):
        b.copy_(_as_bytes(t))
    return flat


def send(
    group: SyncGroup, buckets: Iterable[tuple[Bucket, list[Tensor]]], verify: bool
) -> str | None:
    """Broadcast each bucket (its layout and its full tensors, in manifest order) from rank 0,
    packing bucket k+1 while bucket k is on the wire. Each bucket is packed before the next
    is asked for (under ZeRO-3 the caller gathers a bucket only for that long). Returns the
    checksum."""
    h = _new_hash() if verify else None
    works = [None, None]
    for k, (bucket, tensors) in enumerate(buckets):
        slot = k % 2
        if works[slot] is not None:
            works[slot].wait()  # this buffer's previous bucket has left
        flat = _pack(bucket, tensors, group.buffer(slot, bucket.nbytes))
        works[slot] = group.broadcast(flat)
        if h is not None:  # overlaps the transfer
            for b in bucket.slices(flat.cpu()):
                _update_hash(h, b)
    for w in works:
        if w is not None:
            w.wait()
    return h.hexdigest() if h is not None else None


def flat_bucket(bucket: Bucket, tensors: list[Tensor]) -> Tensor:
    """One bucket packed into a new CPU tensor (for the object store)."""
    return _pack(bucket, tensors, torch.zeros(bucket.nbytes, dtype=torch.uint8))


def buckets_checksum(plan: list[Bucket], flats: list[Tensor]) -> str:
    """The checksum of the parameters that flat buckets hold."""
    return checksum(b for bucket, flat in zip(plan, flats) for b in bucket.slices(flat))


def _check_manifest(params: dict[str, Tensor], manifest: list[ParamSpec]) -> None:
    for spec in manifest:
        p = params.get(spec.name)
        if p is None or tuple(p.shape) != spec.shape or str(p.dtype) != spec.dtype:
            got = None if p is None else (tuple(p.shape), str(p.dtype))
            raise ValueError(
                f"weight sync: generator parameter {spec.name!r} is {got}, learner sends "
                f"{(spec.shape, spec.dtype)}: the generator and learner models differ"
            )


@torch.no_grad()
def bucket_buffers(model: nn.Module, manifest: list[ParamSpec], bucket_bytes: int) -> list[Tensor]:
    """The persistent buffers (one per bucket) that ``model``'s parameters live in. The first
    call for a layout (or after a parameter was moved out of them) allocates them on the
    model's device, copies the parameters in and makes each parameter's ``.data`` a view of
    its slice; later calls return the same buffers."""
    params = dict(model.named_parameters())
    _check_manifest(params, manifest)
    ptrs = [params[s.name].data_ptr() for s in manifest]
    key, held = (tuple(manifest), bucket_bytes), getattr(model, "_weight_sync_buffers", None)
    if held is not None and held[0] == key and held[1] == ptrs:
        return held[2]
    buffers = []
    for bucket in plan_buckets(manifest, bucket_bytes):
        ps = [params[s.name] for s in bucket.specs]
        flat = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=ps[0].device)
        for p, view in zip(ps, bucket.views(flat)):
            view.copy_(p.data)
            p.data = view  # a tied Parameter is one object: every module sees the view
        buffers.append(flat)
    ptrs = [params[s.name].data_ptr() for s in manifest]
    model._weight_sync_buffers = (key, ptrs, buffers)
    return buffers


@torch.no_grad()
def receive(
    group: SyncGroup, model: nn.Module, manifest: list[ParamSpec], bucket_bytes: int
) -> None:
    """Receive every bucket broadcast by rank 0 straight into ``model``'s parameters (all
    buckets posted at once, then waited on)."""
    works = [group.broadcast(flat) for flat in bucket_buffers(model, manifest, bucket_bytes)]
    for w in works:
        w.wait()


@torch.no_grad()
def load_buckets(
    model: nn.Module, manifest: list[ParamSpec], bucket_bytes: int, buckets: list[Tensor]
) -> None:
    """Fallback transport: load buckets that came through Ray's object store (one copy each
    into the parameters' buffers)."""
    buffers = bucket_buffers(model, manifest, bucket_bytes)
    if len(buffers) != len(buckets):
        raise ValueError(f"weight sync: expected {len(buffers)} buckets, got {len(buckets)}")
    for buf, flat in zip(buffers, buckets):
        buf.copy_(flat)


# ----------------------------------------------------------------------------- shared memory

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
        h = _new_hash() if verify else None
        for k, (bucket, tensors) in enumerate(buckets):
            region = self.slots[slot][self.offsets[k] : self.offsets[k] + bucket.nbytes]
            _pack(bucket, tensors, region)
            if h is not None:
                for b in bucket.slices(region):
                    _update_hash(h, b)
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


def _map_slot(handle: ShmHandle) -> Tensor:
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


@torch.no_grad()
def attach(
    model: nn.Module,
    manifest: list[ParamSpec],
    bucket_bytes: int,
    handles: list[ShmHandle],
    slot: int,
) -> bool:
    """Point ``model``'s synced parameters at slot ``slot`` of the sender's shared memory
    (each ``.data`` becomes a view of its bytes there; a tied ``Parameter`` is one object,
    so every module sees it). Each slot is mapped once per sender and kept on the model.
    Returns whether any parameter was not there already (a fresh attach)."""
    params = dict(model.named_parameters())
    _check_manifest(params, manifest)
    maps = getattr(model, "_weight_sync_shm", None)
    if maps is None or maps[0] != handles:
        maps = model._weight_sync_shm = (handles, [None] * len(handles))
    if maps[1][slot] is None:
        maps[1][slot] = _map_slot(handles[slot])
    flat = maps[1][slot]
    plan, offsets = shm_layout(manifest, bucket_bytes)
    fresh = False
    for bucket, off in zip(plan, offsets):
        region = flat[off : off + bucket.nbytes]
        for spec, view in zip(bucket.specs, bucket.views(region)):
            p = params[spec.name]
            if p.data_ptr() != view.data_ptr():
                p.data = view
                fresh = True
    return fresh
