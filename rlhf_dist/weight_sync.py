"""Weight sync from learner rank 0 to the generators over a dedicated collective group.

The group (learner rank 0 = rank 0, generator ``i`` = rank ``i + 1``) is separate from
DeepSpeed's: it rendezvous through a ``TCPStore`` that learner rank 0 hosts, under a prefix
of its own, so a new membership forms a new group without touching the learner's.

Parameters travel as raw bytes in flat buckets of about ``bucket_mb`` (dtypes are kept: a
bf16 tensor travels as bf16), in the order of a *manifest* that both sides agree on. Tied
weights appear once (``named_parameters`` de-duplicates shared ``Parameter`` objects).

Each side keeps two bucket buffers for the life of the group and alternates between them, so
packing (or unpacking) one bucket overlaps the transfer of the next, and no sync allocates.

The checksum is an XXH3-128 digest of the parameters' bytes in manifest order. The learner
hashes the buckets it sends; a generator hashes the parameters it holds after loading. The
two digests are equal exactly when the generator holds the learner's weights bit for bit
(barring a 2^-128 collision; XXH3 is not cryptographic, and needs not be: it checks a transfer,
and it is ~40x faster than BLAKE2b, which mattered at 100M parameters).
"""

from __future__ import annotations

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


def manifest_of(model: nn.Module) -> list[ParamSpec]:
    return [ParamSpec(n, full_shape(p), str(p.dtype)) for n, p in model.named_parameters()]


def plan_buckets(manifest: list[ParamSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices grouped into buckets of at most ``bucket_bytes``
    (a single larger parameter gets a bucket of its own)."""
    buckets: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, spec in enumerate(manifest):
        if cur and size + spec.nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += spec.nbytes
    if cur:
        buckets.append(cur)
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
    return checksum(p for _, p in model.named_parameters())


class SyncGroup:
    """One membership of the weight-sync group; rank 0 hosts the store."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        prefix: str,
        backend: str,
        timeout_s: float,
    ):
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store = dist.TCPStore(
            host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
        )
        store = dist.PrefixStore(prefix, self.store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size)
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


def send(group: SyncGroup, buckets: Iterable[list[Tensor]], verify: bool) -> str | None:
    """Broadcast each bucket (a list of full tensors, in manifest order) from rank 0, packing
    bucket k+1 while bucket k is on the wire. Each list is packed before the next is asked
    for (under ZeRO-3 the caller gathers a bucket only for that long). Returns the checksum."""
    h = _new_hash() if verify else None
    works = [None, None]
    for k, tensors in enumerate(buckets):
        slot = k % 2
        if works[slot] is not None:
            works[slot].wait()  # this buffer's previous bucket has left
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        flat = group.buffer(slot, nbytes)
        torch.cat([_as_bytes(t).to(flat.device) for t in tensors], out=flat)
        works[slot] = group.broadcast(flat)
        if h is not None:
            _update_hash(h, flat)  # overlaps the transfer
    for w in works:
        if w is not None:
            w.wait()
    return h.hexdigest() if h is not None else None


def flat_bucket(tensors: Iterable[Tensor]) -> Tensor:
    """The raw bytes of ``tensors`` back to back (a new tensor, for the object store)."""
    return torch.cat([_as_bytes(t) for t in tensors])


def _check_manifest(params: dict[str, Tensor], manifest: list[ParamSpec]) -> None:
    for spec in manifest:
        p = params.get(spec.name)
        if p is None or tuple(p.shape) != spec.shape or str(p.dtype) != spec.dtype:
            got = None if p is None else (tuple(p.shape), str(p.dtype))
            raise ValueError(
                f"weight sync: generator parameter {spec.name!r} is {got}, learner sends "
                f"{(spec.shape, spec.dtype)}: the generator and learner models differ"
            )


def _unpack(params: dict[str, Tensor], specs: list[ParamSpec], flat: Tensor) -> None:
    """Copy one bucket's bytes into the parameters it holds."""
    offset = 0
    for s in specs:
        p = params[s.name]
        p.data.copy_(flat[offset : offset + s.nbytes].view(p.dtype).view(p.shape).to(p.device))
        offset += s.nbytes


@torch.no_grad()
def receive(
    group: SyncGroup, model: nn.Module, manifest: list[ParamSpec], bucket_bytes: int
) -> None:
    """Receive every bucket broadcast by rank 0 into ``model``'s parameters, unpacking
    bucket k while bucket k+1 arrives."""
    params = dict(model.named_parameters())
    _check_manifest(params, manifest)
    plan = [[manifest[i] for i in idx] for idx in plan_buckets(manifest, bucket_bytes)]

    def post(k: int):
        flat = group.buffer(k % 2, sum(s.nbytes for s in plan[k]))
        return flat, group.broadcast(flat)

    pending = post(0) if plan else None
    for k in range(len(plan)):
        flat, work = pending
        work.wait()
        pending = post(k + 1) if k + 1 < len(plan) else None
        _unpack(params, plan[k], flat)


@torch.no_grad()
def load_buckets(
    model: nn.Module, manifest: list[ParamSpec], bucket_bytes: int, buckets: list[Tensor]
) -> None:
    """Fallback transport: load buckets that came through Ray's object store."""
    params = dict(model.named_parameters())
    _check_manifest(params, manifest)
    plan = plan_buckets(manifest, bucket_bytes)
    if len(plan) != len(buckets):
        raise ValueError(f"weight sync: expected {len(plan)} buckets, got {len(buckets)}")
    for idx, flat in zip(plan, buckets):
        _unpack(params, [manifest[i] for i in idx], flat)
