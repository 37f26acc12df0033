"""Weight sync, learner rank 0 -> G generators: time per sync for each transport.

    python benchmarks/weight_sync.py --sizes 1m,10m,50m,100m,small-tensors --generators 1,2,3

Starts a local Ray cluster with one sender actor (standing in for learner rank 0, without ZeRO
gathering) and G receiver actors (standing in for generators), each holding the same GPT-2
(built with ``rlhf_dist.tasks.tiny.build_policy``, loaded fp32 with the roles' own
``load_policy``). One sync group of G+1 members over gloo (``weight_sync.CollectiveSender`` /
``CollectiveReceiver``, each joined with a ``weight_sync.Membership``) is formed per generator
count. Transports, each timed end to end from the driver (every member's call submitted, then
wait for all):

- ``limit``: one broadcast of a single preallocated flat uint8 buffer of the model's byte size
  over the same group (no packing, no unpacking): what this backend can do at best.
- ``buckets``: ``CollectiveSender.send`` / ``CollectiveReceiver.receive`` (into a
  ``weight_sync.ModuleWeights``) with ``--bucket-mb`` buckets, verify off; ``+verify`` is the
  extra time when verify is on (the sender hashes what it sends, each receiver hashes its model
  afterwards), as the roles do with ``sync.verify``.
- ``per-tensor``: one broadcast per parameter over the same group, the receiver allocating
  each tensor and copying it into its parameter (OpenRLHF's transport).
- ``object store``: the sender packs the buckets and returns them (into Ray's object store;
  ``weight_sync.ObjectStoreSender``); each receiver gets that ObjectRef as an argument and
  loads them (``weight_sync.ObjectStoreReceiver``).
- ``shm``: shared memory (``sync.backend=shm``, what ``auto`` picks on a one-machine CPU
  cluster): the sender packs the model into the next of its two ``/dev/shm`` slots
  (``weight_sync.ShmSender``, its ``ShmSlots``), then every receiver points its parameters at
  that slot (``weight_sync.ShmReceiver``); ``+verify`` as for buckets. Not a broadcast, so no
  ``limit`` applies: one copy of the model (``copy`` column, in the sender's memory) is its
  floor.

Each transport is first run once with freshly perturbed sender weights and checked (every
receiver's model checksum equals the sender's; for ``limit``, the received buffer's), then
the transports take turns for ``--repeats`` timed rounds and the median is reported. MB/s is
the model's bytes per second of sync (each generator receives all of them).

Targets: buckets >= 70% of the limit's throughput from 10M parameters up, and >= 5x the
per-tensor transport on the ``small-tensors`` preset (about 1M parameters in ~960 tensors).
With the defaults (5 repeats for every size) the whole run takes about 8 minutes on a 2-core,
24 GiB machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402

# name -> (n_layer, n_embd, n_head) of a GPT-2 on the tiny task's vocabulary (52 words)
SIZES = {
    "1m": (5, 128, 4),  # 1.0M params, 64 tensors
    "10m": (6, 384, 6),  # 10.7M, 76 tensors
    "50m": (12, 592, 8),  # 50.7M, 148 tensors
    "100m": (12, 832, 8),  # 100.0M, 148 tensors
    "small-tensors": (80, 32, 2),  # 1.0M params in 964 tensors
}
LIMIT_TARGET, LIMIT_FROM_PARAMS = 0.70, 9_000_000  # buckets/limit target, from "10m" up
PER_TENSOR_TARGET, PER_TENSOR_SIZES = 5.0, ("small-tensors",)
TRANSPORTS = [
    "limit",
    "buckets",
    "buckets+verify",
    "per-tensor",
    "object store",
    "shm",
    "shm+verify",
    "copy",
]
HOST = "127.0.0.1"
TIMEOUT_S = 600.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@ray.remote(num_cpus=1)
class Member:
    """One member of the sync group; rank 0 sends, the others receive."""

    def __init__(self, path: str):
        import torch

        from rlhf_dist import weight_sync
        from rlhf_dist.models import load_policy

        torch.set_num_threads(1)
        self.ws = weight_sync
        self.model = load_policy(path, "float32").eval()
        self.manifest = weight_sync.manifest_of(self.model)
        self.target = weight_sync.ModuleWeights(self.model)  # where the receivers write
        self.sender = weight_sync.sender("gloo", TIMEOUT_S)  # used by rank 0 only
        self.receiver = weight_sync.receiver("gloo")
        self.group = None
        self.limit_buf = None
        self.version = 0  # of the pushes through the transports' send / receive

    def info(self) -> dict:
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "tensors": len(self.manifest),
            "bytes": sum(s.nbytes for s in self.manifest),
        }

    def host(self, bucket_bytes: int) -> dict:
        """The sender hosts the store every group meets through; returns ``Channel.info``."""
        return self.sender.open(self._params(), self.manifest, bucket_bytes)

    def join(self, info: dict, bucket_bytes: int, rank: int, world_size: int, prefix: str):
        m = self.ws.Membership(HOST, info["port"], rank, world_size, prefix, TIMEOUT_S)
        if rank == 0:
            self.sender.open(self._params(), self.manifest, bucket_bytes, m)
            self.group = self.sender.group
        else:
            self.receiver.open(self.ws.Channel("gloo", bucket_bytes, self.manifest, info), m)
            self.group = self.receiver.group

    def leave(self) -> None:
        self.group = None

    def perturb(self, delta: float) -> None:
        import torch

        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(delta)

    def checksum(self) -> str:
        return self.ws.model_checksum(self.model)

    def _params(self) -> list:
        return [p for _, p in self.model.named_parameters()]

    # ------------------------------------------------------------- limit
    def prepare_limit(self, fill: bool) -> None:
        """The sender's buffer holds its model's bytes; a receiver's is allocated once."""
        import torch

        if fill:
            self.limit_buf = torch.cat(
                [p.detach().view(-1).view(torch.uint8) for p in self._params()]
            )
        elif self.limit_buf is None:
            n = sum(s.nbytes for s in self.manifest)
            self.limit_buf = torch.empty(n, dtype=torch.uint8)

    def limit(self) -> None:
        self.group.broadcast(self.limit_buf).wait()

    def limit_checksum(self) -> str:
        return self.ws.checksum([self.limit_buf])

    # ------------------------------------------------------------- buckets (the roles' path)
    def _buckets(self, bucket_bytes: int):
        params = self._params()
        plan = self.ws.plan_buckets(self.manifest, bucket_bytes)
        return ((b, params[b.start : b.stop]) for b in plan)

    def _next_version(self) -> int:
        self.version += 1
        return self.version

    def send_buckets(self, bucket_bytes: int, verify: bool) -> str | None:
        buckets = self._buckets(bucket_bytes)
        receipt, _ = self.sender.send(buckets, self._next_version(), verify, full=False)
        return receipt.checksum

    def receive_buckets(self, bucket_bytes: int, verify: bool) -> str | None:
        return self.receiver.receive(self.target, self._next_version(), verify).checksum

    # ------------------------------------------------------------- one broadcast per tensor
    def send_per_tensor(self) -> None:
        for p in self._params():
            self.group.broadcast(p.detach().contiguous()).wait()

    def receive_per_tensor(self) -> None:
        import torch

        with torch.no_grad():
            for spec, p in zip(self.manifest, self._params()):
                t = torch.empty(spec.shape, dtype=p.dtype)
                self.group.broadcast(t).wait()
                p.copy_(t)

    # ------------------------------------------------------------- Ray's object store
    def object_store_buckets(self, bucket_bytes: int) -> dict:
        if getattr(self, "os_sender", None) is None:
            self.os_sender = self.ws.sender("object_store", TIMEOUT_S)
            self.os_sender.open(self._params(), self.manifest, bucket_bytes)
        buckets = self._buckets(bucket_bytes)
        _, flats = self.os_sender.send(buckets, self._next_version(), False, full=False)
        return {"buckets": flats}

    def load_object_store(self, bucket_bytes: int, sent: dict) -> None:
        if getattr(self, "os_receiver", None) is None:
            self.os_receiver = self.ws.receiver("object_store")
            channel = self.ws.Channel("object_store", bucket_bytes, self.manifest)
            self.os_receiver.open(channel)
        self.os_receiver.receive(self.target, self._next_version(), False, sent["buckets"])

    # ------------------------------------------------------------- shared memory
    def host_shm(self, bucket_bytes: int) -> dict:
        self.shm_sender = self.ws.sender("shm", TIMEOUT_S)
        return self.shm_sender.open(self._params(), self.manifest, bucket_bytes)

    def write_shm(self, bucket_bytes: int, verify: bool) -> tuple[int, str | None]:
        buckets = self._buckets(bucket_bytes)
        receipt, slot = self.shm_sender.send(buckets, self._next_version(), verify, full=False)
        return slot, receipt.checksum

    def attach_shm(self, bucket_bytes: int, info: dict, slot: int, verify: bool):
        # a model of its own: the other transports keep their buffers between rounds
        if getattr(self, "shm_model", None) is None:
            import copy

            self.shm_model = copy.deepcopy(self.model)
            self.shm_target = self.ws.ModuleWeights(self.shm_model)
            self.shm_receiver = self.ws.receiver("shm")
            self.shm_receiver.open(self.ws.Channel("shm", bucket_bytes, self.manifest, info))
        got = self.shm_receiver.receive(self.shm_target, self._next_version(), verify, slot)
        return got.checksum

    def shm_checksum(self) -> str:
        return self.ws.model_checksum(self.shm_model)

    def copy(self) -> None:
        """The floor of any sync that leaves the sender's weights free to change: one copy of
        them (into a buffer of the same layout, as the plain process's weight sync does)."""
        import torch

        if getattr(self, "copy_buf", None) is None:
            self.copy_buf = [torch.empty_like(p) for p in self._params()]
        with torch.no_grad():
            torch._foreach_copy_(self.copy_buf, [p.detach() for p in self._params()])


def submit(transport: str, sender, receivers: list, bucket_bytes: int) -> tuple[list, list]:
    """Start one sync; returns (refs to wait for, refs whose values to fetch)."""
    if transport == "limit":
        refs = [m.limit.remote() for m in (sender, *receivers)]
        return refs, refs
    if transport in ("buckets", "buckets+verify"):
        verify = transport == "buckets+verify"
        refs = [sender.send_buckets.remote(bucket_bytes, verify)]
        refs += [r.receive_buckets.remote(bucket_bytes, verify) for r in receivers]
        return refs, refs
    if transport == "per-tensor":
        refs = [sender.send_per_tensor.remote()]
        refs += [r.receive_per_tensor.remote() for r in receivers]
        return refs, refs
    if transport == "object store":
        sent = sender.object_store_buckets.remote(bucket_bytes)
        loads = [r.load_object_store.remote(bucket_bytes, sent) for r in receivers]
        # The buckets are not fetched into the driver: the receivers pull them.
        return [sent, *loads], loads
    if transport in ("shm", "shm+verify"):
        verify = transport == "shm+verify"
        slot, digest = ray.get(sender.write_shm.remote(bucket_bytes, verify))
        refs = [r.attach_shm.remote(bucket_bytes, SHM_INFO[0], slot, verify) for r in receivers]
        return refs, [ray.put(digest), *refs]
    if transport == "copy":
        refs = [sender.copy.remote()]
        return refs, refs
    raise ValueError(transport)


SHM_INFO: list = [None]  # where the sender's shared-memory slots are (Channel.info), per size


def run_once(transport: str, sender, receivers: list, bucket_bytes: int) -> float:
    t0 = time.perf_counter()
    wait, fetch = submit(transport, sender, receivers, bucket_bytes)
    ray.wait(wait, num_returns=len(wait), fetch_local=False)
    out = ray.get(fetch)
    dt = time.perf_counter() - t0
    if transport in ("buckets+verify", "shm+verify") and len(set(out)) != 1:
        raise RuntimeError(f"{transport}: sender and receivers disagree: {out}")
    return dt


def check(transport: str, sender, receivers: list) -> None:
    """Every receiver holds the sender's weights (bit for bit)."""
    want = ray.get(sender.checksum.remote())
    if transport == "copy":  # nothing reaches the receivers
        return
    if transport == "limit":  # the received buffer, not the model: nothing is unpacked
        got = ray.get([r.limit_checksum.remote() for r in receivers])
    elif transport.startswith("shm"):
        got = ray.get([r.shm_checksum.remote() for r in receivers])
    else:
        got = ray.get([r.checksum.remote() for r in receivers])
    if any(g != want for g in got):
        raise RuntimeError(f"{transport}: receivers hold {got}, sender holds {want}")


def run_generators(
    actors: list, g: int, repeats: int, bucket_bytes: int, delta: list[float]
) -> dict[str, list[float]]:
    sender, receivers = actors[0], actors[1 : g + 1]
    info = ray.get(sender.host.remote(bucket_bytes))
    prefix = f"bench-wsync-{time.time_ns()}"
    members = enumerate([sender, *receivers])
    ray.get([m.join.remote(info, bucket_bytes, rank, g + 1, prefix) for rank, m in members])
    try:
        for t in TRANSPORTS:
            # Fresh weights on the sender, so a transport that moves nothing cannot pass.
            delta[0] += 1.0 / 1024
            ray.get(sender.perturb.remote(delta[0]))
            if t == "limit":
                ray.get([sender.prepare_limit.remote(True)])
                ray.get([r.prepare_limit.remote(False) for r in receivers])
            run_once(t, sender, receivers, bucket_bytes)  # warm-up
            check(t, sender, receivers)
            log(f"  g={g} {t}: warm-up done, checksums match")
        times: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        for i in range(repeats):
            for t in TRANSPORTS:  # taking turns, so load from elsewhere hits all alike
                times[t].append(run_once(t, sender, receivers, bucket_bytes))
            log(f"  g={g} round {i + 1}/{repeats}: " + fmt_round(times))
    finally:
        ray.get([m.leave.remote() for m in [sender, *receivers]])
    return times


def fmt_round(times: dict[str, list[float]]) -> str:
    return ", ".join(f"{t} {v[-1]:.3f}s" for t, v in times.items())


def run_size(
    name: str, gens: list[int], repeats: int, bucket_bytes: int, workdir: Path
) -> tuple[dict, dict[int, dict[str, list[float]]]]:
    from rlhf_dist.tasks.tiny import build_policy, build_tokenizer

    n_layer, n_embd, n_head = SIZES[name]
    path = workdir / name
    build_policy(path, build_tokenizer(path), n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    gc.collect()
    actors = [Member.remote(str(path)) for _ in range(1 + max(gens))]
    try:
        info = ray.get(actors[0].info.remote())
        ray.get([a.info.remote() for a in actors])
        SHM_INFO[0] = ray.get(actors[0].host_shm.remote(bucket_bytes))
        log(
            f"{name}: {info['params'] / 1e6:.1f}M params, {info['tensors']} tensors, "
            f"{info['bytes'] / 1e6:.1f} MB; actors ready"
        )
        delta = [0.0]
        results = {g: run_generators(actors, g, repeats, bucket_bytes, delta) for g in gens}
    finally:
        for a in actors:
            ray.kill(a)
    return info, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1m,10m,50m,100m,small-tensors", help=f"of {list(SIZES)}")
    ap.add_argument("--generators", default="1,2,3", help="comma list of generator counts")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    ap.add_argument("--bucket-mb", type=float, default=64)
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}: expected some of {list(SIZES)}")
    gens = sorted({int(g) for g in args.generators.split(",")})
    bucket_bytes = int(args.bucket_mb * (1 << 20))

    from rlhf_dist.ray_env import worker_env

    t_start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2 + max(gens),
        object_store_memory=3 << 30,
        include_dashboard=False,
        runtime_env={"env_vars": {**worker_env(), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
    )
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            for name in sizes:
                info, results = run_size(name, gens, args.repeats, bucket_bytes, Path(d))
                for g, times in results.items():
                    rows.append(
                        (name, g, info, {t: statistics.median(v) for t, v in times.items()})
                    )
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t_start

    print("`" + " ".join(["python benchmarks/weight_sync.py", *sys.argv[1:]]) + "`")
    print(
        f"\ngloo (and shm) on CPU, bucket {args.bucket_mb:g} MB, median of {args.repeats} syncs after a "
        f"warm-up; MB/s = model bytes / sync time; {os.cpu_count()} cores; "
        f"whole run {wall / 60:.1f} min.\n"
    )
    head = ["size", "gens", "params", "tensors", "MB"]
    for t in ("limit", "buckets"):
        head += [f"{t} s", f"{t} MB/s"]
    head += ["+verify s"]
    for t in ("per-tensor", "object store", "shm"):
        head += [f"{t} s", f"{t} MB/s"]
    head += ["shm +verify s", "copy s", "buckets/limit", "buckets/per-tensor", "buckets/shm"]
    head += ["targets"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    verdicts = []
    for name, g, info, med in rows:
        mb = info["bytes"] / 1e6
        cells = [name, str(g), f"{info['params'] / 1e6:.1f}M", str(info["tensors"]), f"{mb:.1f}"]
        for t in ("limit", "buckets"):
            cells += [f"{med[t]:.3f}", f"{mb / med[t]:.0f}"]
        cells += [f"{med['buckets+verify'] - med['buckets']:+.3f}"]
        for t in ("per-tensor", "object store", "shm"):
            cells += [f"{med[t]:.3f}", f"{mb / med[t]:.0f}"]
        cells += [f"{med['shm+verify'] - med['shm']:+.3f}", f"{med['copy']:.3f}"]
        vs_limit = med["limit"] / med["buckets"]
        vs_per_tensor = med["per-tensor"] / med["buckets"]
        cells += [f"{100 * vs_limit:.0f}%", f"{vs_per_tensor:.1f}x"]
        cells += [f"{med['buckets'] / med['shm']:.1f}x"]
        marks = []
        if info["params"] >= LIMIT_FROM_PARAMS:
            ok = vs_limit >= LIMIT_TARGET
            marks.append(f"limit {'met' if ok else 'MISSED'}")
            verdicts.append(ok)
        if name in PER_TENSOR_SIZES:
            ok = vs_per_tensor >= PER_TENSOR_TARGET
            marks.append(f"per-tensor {'met' if ok else 'MISSED'}")
            verdicts.append(ok)
        cells.append(", ".join(marks) or "-")
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nTargets: buckets/limit >= {100 * LIMIT_TARGET:.0f}% from 10M parameters up; "
        f"buckets/per-tensor >= {PER_TENSOR_TARGET:g}x on {', '.join(PER_TENSOR_SIZES)}. "
        f"Met in {sum(verdicts)} of {len(verdicts)} checked rows."
    )


if __name__ == "__main__":
    main()
