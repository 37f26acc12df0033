"""The collective transport (``sync.backend`` gloo or nccl): learner rank 0 broadcasts each
bucket to every generator over a group of their own.

The group (learner rank 0 = rank 0, generator ``i`` = rank ``i + 1``) is separate from
DeepSpeed's: it meets through a ``TCPStore`` that learner rank 0 hosts (bound at port 0, so
no other process can take its port first), under a prefix of its own, so a new membership
forms a new group without touching the learner's. The sender packs each bucket into one of
two reusable buffers and alternates between them, so packing bucket k+1 overlaps the transfer
of bucket k; a receiver posts every bucket's broadcast into its target's buffers at once.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
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
from rlhf_dist.weight_sync.layout import Hasher, ParamSpec, pack


def host_store(timeout_s: float) -> dist.TCPStore:
    """A ``TCPStore`` server bound at port 0: the OS picks a free port as it binds, so no other
    process can take the port between choosing and binding it. Hand ``store.port`` to the
    members that connect to it (the server listens on every interface)."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class SyncGroup:
    """One membership of the weight-sync group; rank 0 passes the store it hosts (``store``,
    whose port is ``m.port``); the other ranks connect to ``m.host:m.port``. The sender hosts
    its store at port 0 (``CollectiveSender.open`` without a membership hands the port out),
    so a group forms in two steps: open, then every member opens with its ``Membership``."""

    def __init__(self, m: Membership, backend: str, store: dist.TCPStore | None = None):
        timeout = timedelta(seconds=m.timeout_s)
        self.rank, self.world_size, self.backend = m.rank, m.world_size, backend
        if store is not None and (m.rank != 0 or store.port != m.port):
            raise ValueError(
                f"weight sync: rank {m.rank} given a store on port {store.port}, not {m.port}"
            )
        if store is None:
            store = dist.TCPStore(
                m.host,
                m.port,
                m.world_size,
                is_master=(m.rank == 0),
                timeout=timeout,
                wait_for_workers=False,
            )
        self.store = store
        prefixed = dist.PrefixStore(m.prefix, store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, m.rank, m.world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # a lost member fails the sync instead of hanging it
            self.pg = dist.ProcessGroupNCCL(prefixed, m.rank, m.world_size, options)
        else:
            raise ValueError(f"sync.backend: unknown backend {backend!r}")
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self.buffers: list[Tensor | None] = [None, None]

    def buffer(self, slot: int, nbytes: int) -> Tensor:
        """A reusable uint8 buffer (one of two slots) of at least ``nbytes``; grows once."""
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes]

    def broadcast(self, tensor: Tensor):
        """Start a broadcast from rank 0; returns the work to ``wait()`` on."""
        return self.pg.broadcast(tensor, 0)


class CollectiveSender(Sender):
    def __init__(self, backend: str, timeout_s: float):
        self.backend, self.timeout_s = backend, timeout_s
        self.store: dist.TCPStore | None = None
        self.group: SyncGroup | None = None
        self.nbytes = 0

    def open(self, params, manifest, bucket_bytes, membership=None, zero_copy=False) -> dict:
        """Without ``membership``: host the store every group of the run meets through (once)
        and hand out its port. With one: join that group as rank 0."""
        if self.store is None:
            self.store = host_store(self.timeout_s)
        self.nbytes = sum(s.nbytes for s in manifest)
        if membership is not None:
            self.group = SyncGroup(membership, self.backend, store=self.store)
        return {"port": self.store.port, "bytes_per_push": self.nbytes}

    def send(self, buckets: Buckets, version: int, verify: bool, full: bool = False):
        """Broadcast each bucket, packing bucket k+1 while bucket k is on the wire. Each
        bucket is packed before the next is asked for (under ZeRO-3 the caller gathers a
        bucket only for that long)."""
        t0 = time.perf_counter()
        if self.group is None:
            raise RuntimeError(
                "weight sync: the sender has joined no group; open it with a Membership first"
            )
        h = Hasher() if verify else None
        works = [None, None]
        try:
            for k, (bucket, tensors) in enumerate(buckets):
                slot = k % 2
                if works[slot] is not None:
                    works[slot].wait()  # this buffer's previous bucket has left
                flat = pack(bucket, tensors, self.group.buffer(slot, bucket.nbytes))
                works[slot] = self.group.broadcast(flat)
                if h is not None:  # overlaps the transfer
                    for b in bucket.slices(flat.cpu()):
                        h.update(b)
            for w in works:
                if w is not None:
                    w.wait()
        except Exception:
            # The group broke (a generator was lost): still take part in gathering the
            # remaining buckets, or the other learner ranks would wait in the all-gather.
            for _ in buckets:
                pass
            raise
        digest = h.hexdigest() if h is not None else None
        return Receipt(version, self.nbytes, digest, time.perf_counter() - t0), None


class CollectiveReceiver(Receiver):
    def __init__(self, backend: str):
        self.backend = backend
        self.group: SyncGroup | None = None
        self.manifest: list[ParamSpec] = []
        self.bucket_bytes = 0

    def open(self, channel: Channel, membership: Membership | None = None) -> None:
        self.manifest, self.bucket_bytes = channel.manifest, channel.bucket_bytes
        if membership is not None:
            self.group = SyncGroup(membership, self.backend)

    @torch.no_grad()
    def receive(self, target: WeightTarget, version: int, verify: bool, handoff=None) -> Receipt:
        """Every bucket broadcast by rank 0 straight into the target's buffers (all posted at
        once, then waited on). Called between two samplings (a Ray actor runs one method at a
        time, so a batch never sees half-swapped weights)."""
        t0 = time.perf_counter()
        if self.group is None:
            raise RuntimeError(
                "weight sync: the receiver has joined no group; open it with a Membership first"
            )
        buffers = target.buffers(self.manifest, self.bucket_bytes)
        for w in [self.group.broadcast(flat) for flat in buffers]:
            w.wait()
        target.loaded(self.manifest, self.bucket_bytes)
        digest = target.checksum(self.manifest) if verify else None
        nbytes = sum(s.nbytes for s in self.manifest)
        return Receipt(version, nbytes, digest, time.perf_counter() - t0)
