"""The weight-sync interface every transport implements, and what travels with it.

A transport is a ``Sender`` (learner rank 0; the other ranks only help gather under ZeRO-3)
and a ``Receiver`` (each generator) with the same two methods: ``open`` (set up, or join a
new membership) and ``send`` / ``receive`` (one version of the weights), each push ending in
a ``Receipt``. A receiver puts what it receives into a ``WeightTarget``: the generator's
engine. The HF engine's target (``ModuleWeights``) makes its parameters views of the bucket
buffers or of shared memory, so nothing is copied twice; another engine (vLLM) implements
the same four methods with its own loading, and every transport then reaches it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rlhf_dist.weight_sync.layout import Bucket, ParamSpec

Buckets = Iterable[tuple[Bucket, list[Tensor] | None]]
"""What a sender sends: each bucket's layout and its full parameters (``None`` on the learner
ranks other than 0, which iterate only to take part in gathering under ZeRO-3)."""


@dataclass(frozen=True)
class Receipt:
    """What one member did in one push."""

    version: int
    bytes: int  # what it wrote or sent (0: nothing moved, as with zero copy)
    checksum: str | None  # of the weights it sent, or its engine holds after loading
    seconds: float
    fresh: bool = False  # a receiver that (re)pointed its weights at shared memory, and hashed
    moved: int = 0  # zero copy: learner parameters found outside the shared memory, brought back


@dataclass(frozen=True)
class Membership:
    """A collective group to join: rank 0 is learner rank 0, generator ``i`` is rank
    ``i + 1``; they meet through the store rank 0 hosts at ``host:port`` under ``prefix``."""

    host: str
    port: int
    rank: int
    world_size: int
    prefix: str
    timeout_s: float


@dataclass(frozen=True)
class Channel:
    """What a generator needs to open its receiver: the transport, the layout, and what the
    sender's ``open`` handed out (``info``: shared-memory handles, the store's port...)."""

    backend: str
    bucket_bytes: int
    manifest: list[ParamSpec]
    info: dict = field(default_factory=dict)


class WeightTarget(ABC):
    """Where received weights go: a generator's engine. ``manifest`` entries are named as the
    learner's module names its parameters."""

    @abstractmethod
    def buffers(self, manifest: list[ParamSpec], bucket_bytes: int) -> list[Tensor]:
        """One persistent uint8 buffer per bucket of ``plan_buckets`` for transports to write
        into (kept from one push to the next for the same layout)."""

    @abstractmethod
    def loaded(self, manifest: list[ParamSpec], bucket_bytes: int) -> None:
        """Every bucket of ``buffers`` now holds the new weights: an engine that copies them
        into its own parameters does it now."""

    @abstractmethod
    def adopt(self, manifest: list[ParamSpec], regions: list[Tensor], bucket_bytes: int) -> bool:
        """Take ``regions`` (one per bucket, shared memory that stays valid until the next
        push) as the weights. Returns whether anything was re-pointed or copied (a fresh
        attach)."""

    @abstractmethod
    def checksum(self, manifest: list[ParamSpec]) -> str:
        """The checksum (``layout.checksum``, manifest order) of the weights the engine holds,
        read from its own parameters."""


class Sender(ABC):
    """Learner rank 0's side of a transport."""

    backend: str = ""

    @abstractmethod
    def open(
        self,
        params: list[Tensor],
        manifest: list[ParamSpec],
        bucket_bytes: int,
        membership: Membership | None = None,
        zero_copy: bool = False,
    ) -> dict:
        """Set up (or join ``membership``); returns the ``Channel.info`` receivers need, with
        ``bytes_per_push`` (what a push moves). ``params``: the synced parameters, in manifest
        order (a sender that shares them in place needs them; ``zero_copy`` asks for that where
        the learner's engine allows it)."""

    @abstractmethod
    def send(
        self, buckets: Buckets, version: int, verify: bool, full: bool = False
    ) -> tuple[Receipt, Any]:
        """Send ``version``; returns the receipt and the handoff for the receivers (None when
        they need none). ``full``: compute the checksum even where nothing moved."""

    def close(self) -> None:  # noqa: B027 (most senders hold nothing to free)
        """Free what ``open`` held."""


class Receiver(ABC):
    """A generator's side of a transport."""

    backend: str = ""

    @abstractmethod
    def open(self, channel: Channel, membership: Membership | None = None) -> None:
        """Take the channel's layout (and join ``membership``, a collective's)."""

    @abstractmethod
    def receive(
        self, target: WeightTarget, version: int, verify: bool, handoff: Any = None
    ) -> Receipt:
        """Put ``version`` into ``target``; with ``verify`` the receipt holds the checksum of
        what the target holds afterwards."""
