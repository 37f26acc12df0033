"""Fixed-seed runs whose metrics pin the driver's behaviour (issue #13's refactor guard).

Each run writes ``metrics.jsonl`` through the public path (``launch.train``). Every value of
every row is compared with the values recorded before the driver redesign, except the keys
that measure time, speed or the machine (``time/``, ``perf/``, ``pool/``).

Regenerate the recorded values only when a change is *meant* to change what the runs learn:
``python tests/helpers/pinned_runs.py --write`` (then say why in the commit message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "pinned_metrics.json"
# timings and the machine; and what a sync moved, which depends on the transport
# ``sync.backend=auto`` picks here (0 bytes with shared-memory zero copy, the policy's bytes
# over gloo on a machine whose /dev/shm has no room)
# The engine/trainer log-prob difference of the HF generator is float rounding between two
# forwards of the same weights (~1e-7), which another CPU rounds otherwise; that it reads ~0 is
# tested in tests/roles/test_roles_inprocess.py.
UNPINNED = ("time/", "perf/", "pool/", "sync/bytes", "rollout/logprob_diff_")

# name -> (config file, overrides); short runs of the configs the issue names
RUNS = {
    "smoke": ("configs/smoke.yaml", []),
    "tiny": ("configs/tiny.yaml", ["run.steps=3"]),
    "async0": ("configs/smoke.yaml", ["mode=async", "async.max_staleness=0"]),
}


def pinned(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(UNPINNED)}


def run(name: str, assets_dir: Path, run_dir: Path) -> list[dict]:
    from rlhf_dist.config import load_config
    from rlhf_dist.launch import train

    config, overrides = RUNS[name]
    cfg = load_config(
        ROOT / config,
        [
            *overrides,
            f"model.assets_dir={assets_dir}",
            f"run.dir={run_dir}",
            "wandb.enabled=false",
            # threads as on the 2-core machine that recorded them, whatever the cores here
            "ray.block_cores=2",
        ],
    )
    train(cfg, log=lambda _: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [pinned(r) for r in rows]


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    import ray

    sys.path.insert(0, str(ROOT))
    from rlhf_dist.ray_env import worker_runtime_env  # noqa: E402

    ray.init(
        address="local",
        num_cpus=8,
        object_store_memory=512 << 20,
        include_dashboard=False,
        runtime_env=worker_runtime_env(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        from rlhf_dist.tasks.tiny import build_assets

        assets = build_assets(Path(tmp) / "assets" / "tiny").parent
        out = {name: run(name, assets, Path(tmp) / name) for name in RUNS}
    ray.shutdown()
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}: " + ", ".join(f"{k} {len(v)} rows" for k, v in out.items()))
