"""In-process weight syncs between a learner (or a stand-in sender) and generators through the
roles' public sync methods: ``open_weight_sync`` and ``send_weights`` / ``receive_weights``."""

from __future__ import annotations

from rlhf_dist import weight_sync
from rlhf_dist.roles.common import in_threads

HOST = "127.0.0.1"


def open_gloo(learner, generator, bucket_bytes: int = 4096, prefix: str = "t", timeout=60):
    """A gloo weight-sync group of ``learner`` (rank 0) and ``generator`` (rank 1)."""
    port = learner.open_weight_sync("gloo", bucket_bytes)["port"]
    manifest = weight_sync.manifest_of(learner.policy.module)
    channel = weight_sync.Channel("gloo", bucket_bytes, manifest, {"port": port})

    def member(rank):
        return weight_sync.Membership(HOST, port, rank, 2, prefix, timeout)

    in_threads(
        lambda: learner.open_weight_sync("gloo", bucket_bytes, member(0)),
        lambda: generator.open_weight_sync(channel, member(1)),
    )
    return channel


def push(learner, generator, version: int, bucket_bytes: int = 4096, verify: bool = True):
    """One push over an open collective group: (the learner's receipt, the generator's)."""
    (sent, _), got = in_threads(
        lambda: learner.send_weights(bucket_bytes, version, verify),
        lambda: generator.receive_weights(version, verify),
    )
    return sent, got


def push_object_store(learner, generator, version: int, bucket_bytes: int = 4096):
    """One push through the object-store transport, in process (the buckets handed over)."""
    info = learner.open_weight_sync("object_store", bucket_bytes)
    manifest = weight_sync.manifest_of(learner.policy.module)
    generator.open_weight_sync(weight_sync.Channel("object_store", bucket_bytes, manifest, info))
    sent, buckets = learner.send_weights(bucket_bytes, version, True)
    return sent, generator.receive_weights(version, True, buckets)


def stand_in_sender(generator, manifest, bucket_bytes: int, prefix: str = "t"):
    """A collective sender (learner rank 0's side, without a learner) joined with
    ``generator`` as rank 1; returns the sender."""
    sender = weight_sync.CollectiveSender("gloo", 60)
    port = sender.open([], manifest, bucket_bytes)["port"]
    channel = weight_sync.Channel("gloo", bucket_bytes, manifest, {"port": port})

    def member(rank):
        return weight_sync.Membership(HOST, port, rank, 2, prefix, 60)

    in_threads(
        lambda: sender.open([], manifest, bucket_bytes, member(0)),
        lambda: generator.open_weight_sync(channel, member(1)),
    )
    return sender


def buckets_of(model, bucket_bytes: int):
    """(layout, parameters) of each bucket of ``model``'s synced parameters."""
    params = [p for _, p in weight_sync.sync_params(model)]
    plan = weight_sync.plan_buckets(weight_sync.manifest_of(model), bucket_bytes)
    return ((b, params[b.start : b.stop]) for b in plan)
