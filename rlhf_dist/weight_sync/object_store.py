"""The object-store transport (``sync.backend=object_store``): for setups without a shared
collective backend. Learner rank 0 packs its buckets into CPU tensors and returns them; the
driver hands them to every generator by reference (Ray's object store moves them, the driver
never fetches them), and each receiver copies them into its target's buffers."""

from __future__ import annotations

import time

import torch

from rlhf_dist.weight_sync.base import (
    Buckets,
    Channel,
    Membership,
    Receipt,
    Receiver,
    Sender,
    WeightTarget,
)
from rlhf_dist.weight_sync.layout import ParamSpec, buckets_checksum, flat_bucket


class ObjectStoreSender(Sender):
    backend = "object_store"

    def __init__(self):
        self.nbytes = 0

    def open(self, params, manifest, bucket_bytes, membership=None, zero_copy=False) -> dict:
        self.nbytes = sum(s.nbytes for s in manifest)
        return {"bytes_per_push": self.nbytes}

    def send(self, buckets: Buckets, version: int, verify: bool, full: bool = False):
        t0 = time.perf_counter()
        plan, flats = [], []
        for bucket, tensors in buckets:
            plan.append(bucket)
            flats.append(flat_bucket(bucket, tensors))
        digest = buckets_checksum(plan, flats) if verify else None
        return Receipt(version, self.nbytes, digest, time.perf_counter() - t0), flats


class ObjectStoreReceiver(Receiver):
    backend = "object_store"

    def __init__(self):
        self.manifest: list[ParamSpec] = []
        self.bucket_bytes = 0

    def open(self, channel: Channel, membership: Membership | None = None) -> None:
        self.manifest, self.bucket_bytes = channel.manifest, channel.bucket_bytes

    @torch.no_grad()
    def receive(self, target: WeightTarget, version: int, verify: bool, handoff=None) -> Receipt:
        """``handoff``: the sender's buckets (one copy each into the target's buffers)."""
        t0 = time.perf_counter()
        if handoff is None:
            raise ValueError("weight sync: an object-store receive needs the sender's buckets")
        buffers = target.buffers(self.manifest, self.bucket_bytes)
        if len(buffers) != len(handoff):
            raise ValueError(f"weight sync: expected {len(buffers)} buckets, got {len(handoff)}")
        for buf, flat in zip(buffers, handoff):
            buf.copy_(flat)
        target.loaded(self.manifest, self.bucket_bytes)
        digest = target.checksum(self.manifest) if verify else None
        nbytes = sum(s.nbytes for s in self.manifest)
        return Receipt(version, nbytes, digest, time.perf_counter() - t0)
