"""Weight sync from learner rank 0 to the generators over a dedicated collective group.

The group (learner rank 0 = rank 0, generator ``i`` = rank ``i + 1``) is separate from
DeepSpeed's: it rendezvous through a ``TCPStore`` that learner rank 0 hosts, under a prefix
of its own, so a new membership forms a new group without touching the learner's.

Parameters travel as raw bytes in flat buckets of about ``bucket_mb`` (dtypes are kept: a
bf16 tensor travels as bf16), in the order of a *manifest* that both sides agree on. Tied
weights appear once (``named_parameters`` de-duplicates shared ``Parameter`` objects).

The checksum is a BLAKE2b digest of the parameters' bytes in manifest order. The learner
hashes the buckets it sends; a generator hashes the parameters it holds after loading. The
two digests are equal exactly when the generator holds the learner's weights bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
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


def checksum(tensors: Iterable[Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
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

    def broadcast(self, tensor: Tensor) -> None:
        self.pg.broadcast(tensor, 0).wait()


def send(group: SyncGroup, flat_buckets: Iterable[Tensor], verify: bool) -> str | None:
    """Broadcast each flat uint8 bucket from rank 0; return the checksum of what was sent."""
    h = hashlib.blake2b(digest_size=16) if verify else None
    for flat in flat_buckets:
        group.broadcast(flat.to(group.device))
        if h is not None:
            _update_hash(h, flat)
    return h.hexdigest() if h is not None else None


def flat_bucket(tensors: Iterable[Tensor]) -> Tensor:
    """The raw bytes of ``tensors`` back to back (a copy)."""
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
    """Receive every bucket broadcast by rank 0 into ``model``'s parameters."""
    params = dict(model.named_parameters())
    _check_manifest(params, manifest)
    for idx in plan_buckets(manifest, bucket_bytes):
        specs = [manifest[i] for i in idx]
        flat = torch.empty(sum(s.nbytes for s in specs), dtype=torch.uint8, device=group.device)
        group.broadcast(flat)
        _unpack(params, specs, flat)


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
