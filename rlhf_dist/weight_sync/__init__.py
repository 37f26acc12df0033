"""Weight sync from learner rank 0 to the generators: the bucket layout and checksum
(``layout``), one interface (``base``: a ``Sender`` and a ``Receiver`` per transport, a
``Receipt`` per push, a ``WeightTarget`` per generator engine), and one module per transport:
a collective group (``collective``: gloo, NCCL), shared memory with zero copy (``shm``) and
Ray's object store (``object_store``). ``sender`` / ``receiver`` pick the transport; nothing
else branches on it (docs/architecture.md, "Weight sync").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlhf_dist.weight_sync.base import (
    Channel,
    Membership,
    Receipt,
    Receiver,
    Sender,
    WeightTarget,
)
from rlhf_dist.weight_sync.collective import (
    CollectiveReceiver,
    CollectiveSender,
    SyncGroup,
    host_store,
)
from rlhf_dist.weight_sync.layout import (
    ALIGN,
    Bucket,
    ParamSpec,
    checksum,
    flat_bucket,
    manifest_bytes,
    manifest_of,
    model_checksum,
    plan_buckets,
    sync_params,
)
from rlhf_dist.weight_sync.module import ModuleWeights
from rlhf_dist.weight_sync.object_store import ObjectStoreReceiver, ObjectStoreSender
from rlhf_dist.weight_sync.shm import (
    SHM_DIR,
    ShmError,
    ShmHandle,
    ShmLive,
    ShmReceiver,
    ShmSender,
    ShmSlots,
    free_bytes,
)
from rlhf_dist.weight_sync.vllm import VLLMWeights


@dataclass(frozen=True)
class Transport:
    """One transport's two sides and what the driver must know to run a push with it."""

    make_sender: Callable[[float], Sender]  # (timeout_s) -> learner rank 0's side
    make_receiver: Callable[[], Receiver]  # a generator's side
    collective: bool  # each membership forms a group of its own (``open`` with a Membership)
    handoff: bool  # the receivers need what the send returned (a slot, the buckets) first


TRANSPORTS: dict[str, Transport] = {
    "gloo": Transport(
        lambda t: CollectiveSender("gloo", t), lambda: CollectiveReceiver("gloo"), True, False
    ),
    "nccl": Transport(
        lambda t: CollectiveSender("nccl", t), lambda: CollectiveReceiver("nccl"), True, False
    ),
    "shm": Transport(lambda t: ShmSender(), ShmReceiver, False, True),
    "object_store": Transport(lambda t: ObjectStoreSender(), ObjectStoreReceiver, False, True),
}
"""Every ``sync.backend`` transport (``auto`` is resolved by the driver)."""


def transport(backend: str) -> Transport:
    try:
        return TRANSPORTS[backend]
    except KeyError:
        raise ValueError(
            f"sync.backend: unknown transport {backend!r}; expected one of {list(TRANSPORTS)}"
        ) from None


def sender(backend: str, timeout_s: float = 300.0) -> Sender:
    """Learner rank 0's side of transport ``backend`` (``timeout_s``: its store's, for a
    collective; each group's own is its ``Membership``'s)."""
    return transport(backend).make_sender(timeout_s)


def receiver(backend: str) -> Receiver:
    """A generator's side of transport ``backend``."""
    return transport(backend).make_receiver()


__all__ = [
    "VLLMWeights",
    "ALIGN",
    "SHM_DIR",
    "Bucket",
    "Channel",
    "CollectiveReceiver",
    "CollectiveSender",
    "Membership",
    "ModuleWeights",
    "ObjectStoreReceiver",
    "ObjectStoreSender",
    "ParamSpec",
    "Receipt",
    "Receiver",
    "Sender",
    "ShmError",
    "ShmHandle",
    "ShmLive",
    "ShmReceiver",
    "ShmSender",
    "ShmSlots",
    "SyncGroup",
    "TRANSPORTS",
    "Transport",
    "WeightTarget",
    "checksum",
    "flat_bucket",
    "free_bytes",
    "host_store",
    "manifest_bytes",
    "manifest_of",
    "model_checksum",
    "plan_buckets",
    "receiver",
    "sender",
    "sync_params",
    "transport",
]
