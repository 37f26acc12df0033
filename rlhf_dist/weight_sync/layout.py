"""What a weight sync moves and how it is laid out, for every transport: the manifest, the
buckets, the checksum.

Parameters travel as raw bytes in flat uint8 buckets of at most ``bucket_bytes`` (a larger
parameter gets a bucket of its own), in the order of a *manifest* that both sides agree on;
dtypes are kept (a bf16 tensor travels as bf16). Tied weights appear once
(``named_parameters`` de-duplicates shared ``Parameter`` objects). ``plan_buckets`` lays the
buckets out for both sides: each parameter starts at a multiple of ``ALIGN`` bytes, so its
slice of a bucket can be viewed as its dtype and shape; the padding between parameters
carries nothing. A LoRA model syncs its adapters only (``sync_params``): every generator
holds the frozen base already and applies the adapters it receives to it.

The checksum is an XXH3-128 digest of the parameters' bytes in manifest order (never the
padding). The learner hashes the parameter slices of the buckets it sends; a generator
hashes the parameters its engine holds after loading. The two digests are equal exactly when
the generator holds the learner's weights bit for bit (barring a 2^-128 collision; XXH3 is
not cryptographic, and needs not be: it checks a transfer, and it is ~40x faster than
BLAKE2b, which mattered at 100M parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
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
        return n * torch.empty((), dtype=to_dtype(self.dtype)).element_size()


def to_dtype(name: str) -> torch.dtype:
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
            b.view(to_dtype(s.dtype)).view(s.shape) for b, s in zip(self.slices(flat), self.specs)
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


def as_bytes(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def pack(bucket: Bucket, tensors: list[Tensor], flat: Tensor) -> Tensor:
    """Copy ``tensors`` (the bucket's full parameters) into their slices of ``flat``."""
    for b, t in zip(bucket.slices(flat), tensors):
        b.copy_(as_bytes(t))
    return flat


def flat_bucket(bucket: Bucket, tensors: list[Tensor]) -> Tensor:
    """One bucket packed into a new CPU tensor (for the object store)."""
    return pack(bucket, tensors, torch.zeros(bucket.nbytes, dtype=torch.uint8))


class Hasher:
    """The running checksum of parameters in manifest order."""

    def __init__(self):
        self.h = xxhash.xxh3_128()

    def update(self, t: Tensor) -> None:
        self.h.update(as_bytes(t).cpu().numpy())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def checksum(tensors: Iterable[Tensor]) -> str:
    h = Hasher()
    for t in tensors:
        h.update(t)
    return h.hexdigest()


def model_checksum(model: nn.Module) -> str:
    """The checksum of the parameters a sync moves (``sync_params``)."""
    return checksum(p for _, p in sync_params(model))


def buckets_checksum(plan: list[Bucket], flats: list[Tensor]) -> str:
    """The checksum of the parameters that flat buckets hold."""
    return checksum(b for bucket, flat in zip(plan, flats) for b in bucket.slices(flat))


def check_manifest(params: dict[str, Tensor], manifest: list[ParamSpec]) -> None:
    """Every manifest entry is a parameter of ``params`` with its shape and dtype."""
    for spec in manifest:
        p = params.get(spec.name)
        if p is None or tuple(p.shape) != spec.shape or str(p.dtype) != spec.dtype:
            got = None if p is None else (tuple(p.shape), str(p.dtype))
            raise ValueError(
                f"weight sync: generator parameter {spec.name!r} is {got}, learner sends "
                f"{(spec.shape, spec.dtype)}: the generator and learner models differ"
            )
