"""Two runs compared fully, for every test that claims a run is "the same as an undisturbed
run" or learns "exactly like sync": every metric of every row of ``metrics.jsonl`` except the
keys that measure time, speed or the machine (``pinned_runs.UNPINNED``), the same rows with the
same steps and the same keys, the exported policy weights, and, sample by sample, what the
two runs trained (the sample ledgers, ``samples.jsonl``: the same data rows and sample slots,
from the same chunks and seeds, by the same policy versions, with the same rewards; nothing
lost, nothing trained twice).

A run that legitimately differs in a few counters (a faulted run's ``fault/restarts``) names
them in ``ignore``; the test then asserts those counters on their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pinned_runs import UNPINNED


def metric_rows(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def compared(row: dict, ignore=()) -> dict:
    """The keys of ``row`` a comparison looks at."""
    return {k: v for k, v in row.items() if not k.startswith(UNPINNED) and k not in ignore}


def _differs(got, want, rel: float, abs_: float) -> bool:
    if isinstance(got, bool) or isinstance(want, bool) or isinstance(got, str):
        return got != want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        if isinstance(got, int) and isinstance(want, int):
            return got != want
        if math.isnan(got) or math.isnan(want):
            return not (math.isnan(got) and math.isnan(want))
        return not math.isclose(got, want, rel_tol=rel, abs_tol=abs_)
    return got != want


def row_differences(got: list[dict], want: list[dict], ignore=(), rel=1e-5, abs=1e-7) -> list:
    """Every difference between two runs' rows, as readable strings (empty: the same)."""
    where = [(r.get("stage"), r.get("step")) for r in got]
    expected = [(r.get("stage"), r.get("step")) for r in want]
    if where != expected:
        return [f"rows (stage, step) differ: {where} != {expected}"]
    diffs = []
    for g, w in zip(got, want, strict=True):
        g, w, at = compared(g, ignore), compared(w, ignore), (w.get("stage"), w.get("step"))
        if sorted(g) != sorted(w):
            diffs.append(
                f"{at}: keys only in got {sorted(set(g) - set(w))}, "
                f"only in want {sorted(set(w) - set(g))}"
            )
        for key in sorted(set(g) & set(w)):
            if _differs(g[key], w[key], rel, abs):
                diffs.append(f"{at} {key}: {g[key]!r} != {w[key]!r}")
    return diffs


def weight_differences(got_dir: Path, want_dir: Path, atol: float) -> list[str]:
    """Tensors of two exported policies (``model.safetensors``) that differ by more than
    ``atol`` anywhere, or are missing on one side."""
    from safetensors.torch import load_file

    got = load_file(Path(got_dir) / "model.safetensors")
    want = load_file(Path(want_dir) / "model.safetensors")
    if sorted(got) != sorted(want):
        return [f"tensor names differ: {sorted(set(got) ^ set(want))}"]
    diffs = []
    for name in sorted(want):
        if got[name].shape != want[name].shape:
            diffs.append(f"{name}: shape {tuple(got[name].shape)} != {tuple(want[name].shape)}")
            continue
        err = (got[name].double() - want[name].double()).abs().max().item()
        if not err <= atol:  # NaN differs too
            diffs.append(f"{name}: max abs difference {err:.3g} > {atol:g}")
    return diffs


LEDGER_KEYS = ("step", "epoch", "row", "sample", "chunk", "seed", "version")


def ledger_differences(got_dir: Path, want_dir: Path, rel: float, abs_: float) -> list[str]:
    """Samples one run trained and the other did not (or trained a different number of
    times), and rewards that differ, by (step, data position, chunk, seed, version)."""
    from collections import Counter

    from rlhf_dist.ledger import read_ledger

    def trained(run_dir):
        rows = [r for r in read_ledger(run_dir) if not r.get("dropped")]
        return Counter(tuple(r[k] for k in LEDGER_KEYS) for r in rows), {
            tuple(r[k] for k in LEDGER_KEYS): r["reward"] for r in rows
        }

    (got, got_reward), (want, want_reward) = trained(got_dir), trained(want_dir)
    diffs = [
        f"sample {k} trained {got[k]}x, want {want[k]}x"
        for k in sorted(set(got) | set(want))
        if got[k] != want[k]
    ]
    for k in sorted(set(got) & set(want)):
        if _differs(got_reward[k], want_reward[k], rel, abs_):
            diffs.append(f"sample {k}: reward {got_reward[k]!r} != {want_reward[k]!r}")
    return diffs


def assert_same_runs(
    got_dir: Path,
    want_dir: Path,
    *,
    ignore=(),
    rel: float = 1e-5,
    abs: float = 1e-7,
    weights_atol: float = 1e-6,
    policy: str = "policy",
) -> None:
    """``got_dir``'s run is ``want_dir``'s: the same rows (stage, step) in the same order, the
    same keys in each, every value equal (floats within ``rel``/``abs``), and the exported
    policies (``<run dir>/<policy>/model.safetensors``) equal within ``weights_atol``.
    Keys in ``ignore`` (and ``UNPINNED`` prefixes) are left out on both sides."""
    got_dir, want_dir = Path(got_dir), Path(want_dir)
    diffs = row_differences(metric_rows(got_dir), metric_rows(want_dir), ignore, rel, abs)
    diffs += weight_differences(got_dir / policy, want_dir / policy, weights_atol)
    if (want_dir / "samples.jsonl").exists() or (got_dir / "samples.jsonl").exists():
        diffs += ledger_differences(got_dir, want_dir, rel, abs)
    assert not diffs, f"{got_dir} differs from {want_dir}:\n" + "\n".join(diffs[:40])
