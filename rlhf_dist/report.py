"""Offline report for a run directory: PNG figures plus a text summary from ``metrics.jsonl``.

Usage::

    python -m rlhf_dist.report <run_dir> [--out DIR]

Only the standard library and :mod:`rlhf_dist.metric_keys` (which imports nothing) are imported
at module level; matplotlib is imported lazily inside :func:`write_report`, and never through
``pyplot``: every figure is a standalone ``matplotlib.figure.Figure`` rendered by the Agg
canvas, so no global backend is switched, no figure registry grows, and the module works in any
process (headless, inside Ray, in tests).

Rows: one JSON object per line. Rows without a ``stage`` field (or ``"stage": "ppo"``) are PPO
rows and are plotted against ``step``; rows that share a step are merged (later keys win), which
covers both eval metrics logged on their own line and a resumed run that re-logs a step. Rows of
other stages (``sft``, ``rm``, ...) only appear in the text summary. Missing or non-numeric
values are skipped, a figure whose keys are all absent is not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_dist import metric_keys as K

logger = logging.getLogger(__name__)

__all__ = [
    "FIGURES",
    "ReportError",
    "build_summary",
    "load_metrics",
    "main",
    "read_metrics",
    "write_report",
]

METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"
SUMMARY_FILE = "summary.txt"

# The training losses and statistics losses.png plots, in this order.
LOSS_KEYS = (K.POLICY_LOSS, K.VALUE_LOSS, K.ENTROPY, K.APPROX_KL, K.CLIPFRAC)

# File names of every figure this module can write, in the order they are written.
FIGURES = ("rlhf.png", "reward.png", "kl.png", "losses.png", "time.png", "turns.png")

# Multi-turn rollouts (rollout.env / rollout.tools): turns.png plots these, in this order.
TURN_KEYS = (K.TURNS_MEAN, K.TOOL_CALLS_MEAN)
TURN_COUNTS = (K.TOOL_ERRORS, K.OBSERVATION_TRUNCATIONS, K.ENV_FAILURES, K.ENV_TIMEOUTS)


class ReportError(ValueError):
    """The metrics exist but cannot make a report (e.g. no rows at all)."""


# --------------------------------------------------------------------------------------------
# Reading


def load_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Read a metrics.jsonl; return ``(rows, ignored)``.

    Blank lines are skipped. A line that is not valid UTF-8, not valid JSON, or not a JSON
    object is malformed: if it is the last non-blank line (a run killed mid-write) it is dropped,
    logged as a warning and counted in ``ignored``; anywhere else it raises ``ValueError`` naming
    the file and the (1-based) line number.
    """
    path = Path(path)
    raw_lines = path.read_bytes().split(b"\n")
    numbered = [(i, line) for i, line in enumerate(raw_lines, start=1) if line.strip()]
    rows: list[dict[str, Any]] = []
    ignored = 0
    for idx, (lineno, raw) in enumerate(numbered):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if idx == len(numbered) - 1:
                ignored += 1
                logger.warning(
                    "%s, line %d: ignoring truncated/malformed last line (%s)", path, lineno, err
                )
                continue
            raise ValueError(f"{path}, line {lineno}: malformed metrics line: {err}") from err
        rows.append(row)
    return rows, ignored


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (see :func:`load_metrics` for the error rules)."""
    return load_metrics(path)[0]


# --------------------------------------------------------------------------------------------
# Row helpers


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, bool, str, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stage(row: dict[str, Any]) -> str:
    stage = row.get("stage")
    return "ppo" if stage is None else str(stage).lower()


def _ppo_steps(rows: Iterable[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """PPO rows merged per step and sorted by step; rows without a numeric step are dropped."""
    merged: dict[float, dict[str, Any]] = {}
    for row in rows:
        if _stage(row) != "ppo":
            continue
        step = _num(row.get("step"))
        if step is None:
            continue
        merged.setdefault(step, {}).update(row)
    return sorted(merged.items())


def _series(steps: list[tuple[float, dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for step, row in steps:
        value = _num(row.get(key))
        if value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def _has(steps: list[tuple[float, dict[str, Any]]], key: str) -> bool:
    return any(_num(row.get(key)) is not None for _, row in steps)


def _time_components(steps: list[tuple[float, dict[str, Any]]]) -> list[str]:
    """``time/*`` keys except ``time/step`` and ``time/elapsed`` (a clock, not a phase): the
    known phases first, then the rest sorted."""
    keys = {
        k
        for _, row in steps
        for k, v in row.items()
        if K.in_namespace(k, K.TIME) and k not in (K.STEP_TIME, K.ELAPSED) and _num(v) is not None
    }
    return [k for k in K.TIME_PHASES if k in keys] + sorted(keys - set(K.TIME_PHASES))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _fmt_step(step: float) -> str:
    return str(int(step)) if step == int(step) else _fmt(step)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------
# Summary


def build_summary(
    rows: list[dict[str, Any]], *, ignored: int = 0, source: str | None = None
) -> str:
    """The plain-text summary of a run (what ``summary.txt`` holds)."""
    steps = _ppo_steps(rows)
    lines: list[str] = [f"run: {source}"] if source else []
    if steps:
        lines.append(
            f"steps: {len(steps)} (step {_fmt_step(steps[0][0])} -> {_fmt_step(steps[-1][0])})"
        )
    else:
        lines.append("steps: 0 (no PPO rows)")
    lines += _learning_lines(steps)
    lines += _turn_lines(steps)
    lines += _time_lines(steps)
    lines += _stage_lines(rows)
    if ignored:
        lines.append(f"ignored {ignored} truncated/malformed last line(s) in {METRICS_FILE}")
    return "\n".join(lines) + "\n"


def _learning_lines(steps: list) -> list[str]:
    """Reward, gold score, the other evaluation keys and the final KL."""
    lines = []
    xs, ys = _series(steps, K.REWARD_MEAN)
    if ys:
        best = max(range(len(ys)), key=ys.__getitem__)
        lines.append(
            f"reward ({K.REWARD_MEAN}): first {_fmt(ys[0])} (step {_fmt_step(xs[0])}) -> "
            f"last {_fmt(ys[-1])} (step {_fmt_step(xs[-1])}), "
            f"best {_fmt(ys[best])} (step {_fmt_step(xs[best])})"
        )
    gold = [
        (s, g, _num(r.get(K.GOLD_STDERR)))
        for s, r in steps
        if (g := _num(r.get(K.GOLD))) is not None
    ]
    if gold:

        def one(g: tuple[float, float, float | None]) -> str:
            err = "" if g[2] is None else f" +/- {_fmt(g[2])}"
            return f"{_fmt(g[1])}{err} (step {_fmt_step(g[0])})"

        lines.append(
            f"gold score ({K.GOLD}, {len(gold)} evals): first {one(gold[0])} -> last {one(gold[-1])}"
        )
    other_eval = sorted(
        {
            k
            for _, r in steps
            for k in r
            if K.in_namespace(k, K.EVAL) and k not in (K.GOLD, K.GOLD_STDERR)
        }
    )
    finals = [f"{key}={_fmt(ky[-1])}" for key in other_eval if (ky := _series(steps, key)[1])]
    if finals:
        lines.append("last eval: " + ", ".join(finals))
    kx, ky = _series(steps, K.KL)
    if ky:
        text = f"final KL ({K.KL}): {_fmt(ky[-1])} (step {_fmt_step(kx[-1])})"
        _, cy = _series(steps, K.KL_COEF)
        if cy:
            text += f", kl_coef {_fmt(cy[-1])}"
        lines.append(text)
    return lines


def _turn_lines(steps: list) -> list[str]:
    """Multi-turn runs: turns and tool calls per trajectory, first -> last step, and the
    guards' totals."""
    lines = []
    for key in TURN_KEYS:
        xs, ys = _series(steps, key)
        if ys:
            lines.append(
                f"{key}: first {_fmt(ys[0])} (step {_fmt_step(xs[0])}) -> last {_fmt(ys[-1])} "
                f"(step {_fmt_step(xs[-1])})"
            )
    totals = [(k, sum(_series(steps, k)[1])) for k in TURN_COUNTS if _has(steps, k)]
    if lines and totals:
        lines.append("over the run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in totals))
    return lines


def _time_lines(steps: list) -> list[str]:
    """The step time and its breakdown by block, the evaluation's own time, throughput. The
    evaluation runs on some steps only and outside time/step: its mean per evaluated step is
    shown on its own, never as a share of the step."""
    lines = []
    components = [k for k in _time_components(steps) if k != K.TIME_EVAL]
    comp_means = {k: _mean(_series(steps, k)[1]) for k in components}
    _, step_times = _series(steps, K.STEP_TIME)
    if step_times or comp_means:
        if step_times:
            total = _mean(step_times)
            text = f"step time ({K.STEP_TIME}): mean {_fmt(total)} s over {len(step_times)} steps"
        else:
            total = sum(comp_means.values())
            text = f"step time (sum of time/*): mean {_fmt(total)} s"
        if comp_means and total > 0:
            parts = [f"{k.split('/', 1)[1]} {100 * v / total:.1f}%" for k, v in comp_means.items()]
            other = total - sum(comp_means.values())
            if step_times and other > 0.0005 * total:
                parts.append(f"other {100 * other / total:.1f}%")
            text += "; breakdown: " + ", ".join(parts)
        lines.append(text)
    _, eval_times = _series(steps, K.TIME_EVAL)
    if eval_times:
        lines.append(
            f"evaluation ({K.TIME_EVAL}): mean {_fmt(_mean(eval_times))} s on the "
            f"{len(eval_times)} evaluated steps, not counted in {K.STEP_TIME}"
        )
    _, tps = _series(steps, K.TOKENS_PER_S)
    if tps:
        lines.append(f"throughput ({K.TOKENS_PER_S}): mean {_fmt(_mean(tps))} tokens/s")
    return lines


def _stage_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Other stages (sft, rm, ...): row count and the last value of each of their own keys."""
    lines = []
    stages: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if _stage(row) != "ppo":
            stages.setdefault(_stage(row), []).append(row)
    for stage, srows in stages.items():
        last: dict[str, float] = {}
        for row in srows:
            for key, value in row.items():
                if K.in_namespace(key, stage) and _num(value) is not None:
                    last[key] = float(value)
        text = f"stage {stage}: {len(srows)} rows"
        if last:
            shown = sorted(last.items())[:8]
            text += "; last " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown)
            if len(last) > len(shown):
                text += f", ... ({len(last) - len(shown)} more)"
        lines.append(text)
    return lines


# --------------------------------------------------------------------------------------------
# Figures


def _new_figure(**kwargs: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot, no global backend
    return fig


def _save(fig: Any, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100, format="png")
    finally:
        fig.clear()  # the figure is owned by no registry; clearing drops its artists now


def _plot_reward(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    if not (_has(steps, K.REWARD_MEAN) or _has(steps, K.GOLD)):
        return False
    fig = _new_figure(figsize=(8, 5))
    ax = fig.add_subplot()
    xs, ys = _series(steps, K.REWARD_MEAN)
    if ys:
        ax.plot(xs, ys, marker=".", label=K.REWARD_MEAN)
        band = [
            (s, m, sd)
            for s, r in steps
            if (m := _num(r.get(K.REWARD_MEAN))) is not None
            and (sd := _num(r.get(K.SCORE_STD))) is not None
        ]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] - b[2] for b in band],
                [b[1] + b[2] for b in band],
                alpha=0.25,
                label=f"+/- {K.SCORE_STD}",
            )
    gold = [
        (s, g, _num(r.get(K.GOLD_STDERR)))
        for s, r in steps
        if (g := _num(r.get(K.GOLD))) is not None
    ]
    if gold:
        ax.errorbar(
            [g[0] for g in gold],
            [g[1] for g in gold],
            yerr=[g[2] or 0.0 for g in gold],
            marker="o",
            capsize=3,
            label=f"{K.GOLD} (+/- stderr)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("reward / score")
    ax.set_title("Reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)
    return True


def _plot_kl(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    has_kl, has_coef = _has(steps, K.KL), _has(steps, K.KL_COEF)
    if not (has_kl or has_coef):
        return False
    fig = _new_figure(figsize=(8, 5))
    ax = fig.add_subplot()
    handles = []
    if has_kl:
        handles += ax.plot(*_series(steps, K.KL), marker=".", color="C0", label=K.KL)
        ax.set_ylabel("KL")
    if has_coef:
        cax = ax.twinx() if has_kl else ax
        handles += cax.plot(*_series(steps, K.KL_COEF), linestyle="--", color="C1", label=K.KL_COEF)
        cax.set_ylabel("KL coefficient")
    ax.set_xlabel("step")
    ax.set_title("KL to the reference policy")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="best")
    _save(fig, path)
    return True


def _plot_losses(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    keys = [k for k in LOSS_KEYS if _has(steps, k)]
    if not keys:
        return False
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(figsize=(4.5 * ncols, 3.5 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        ax.plot(*_series(steps, key), marker=".", label=key)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(key.split("/", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle("Training losses and statistics")
    _save(fig, path)
    return True


def _plot_time(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    components = _time_components(steps)
    has_step = _has(steps, K.STEP_TIME)
    if not (components or has_step):
        return False
    fig = _new_figure(figsize=(9, 5))
    ax = fig.add_subplot()
    xs = [s for s, _ in steps]
    gaps = sorted(b - a for a, b in zip(xs, xs[1:]) if b > a)
    width = 0.8 * (gaps[len(gaps) // 2] if gaps else 1.0)
    bottom = [0.0] * len(steps)
    for key in components:
        heights = [_num(row.get(key)) or 0.0 for _, row in steps]
        ax.bar(xs, heights, width=width, bottom=bottom, label=key)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if has_step:
        ax.plot(*_series(steps, K.STEP_TIME), color="black", marker=".", label=K.STEP_TIME)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("Time per step")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)
    return True


def _plot_turns(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    """Multi-turn rollouts: turns and tool calls per trajectory, and the guards' counts."""
    means = [k for k in TURN_KEYS if _has(steps, k)]
    if not means:
        return False
    counts = [k for k in TURN_COUNTS if _has(steps, k)]
    fig = _new_figure(figsize=(8, 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    for key in means:
        axes[0].plot(*_series(steps, key), marker=".", label=key)
    axes[0].set_ylabel("per trajectory")
    axes[0].set_title("Multi-turn rollouts: turns, tool calls, guards")
    for key in counts:
        axes[1].plot(*_series(steps, key), marker=".", label=key)
    axes[1].set_ylabel("per step (count)")
    axes[1].set_xlabel("PPO step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    _save(fig, path)
    return True


def _plot_rlhf(steps: list[tuple[float, dict[str, Any]]], path: Path) -> bool:
    """The picture of an RLHF run: proxy reward, gold score and KL on one shared step axis
    (over-optimisation shows as proxy rising while gold stalls or falls as KL grows)."""
    if not _has(steps, K.GOLD):
        return False
    fig = _new_figure(figsize=(8, 8))
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(*_series(steps, K.REWARD_MEAN), marker=".", color="C0")
    axes[0].set_ylabel("proxy reward")
    axes[0].set_title("Proxy reward, gold score and KL")
    gold = [
        (s, g, _num(r.get(K.GOLD_STDERR)) or 0.0)
        for s, r in steps
        if (g := _num(r.get(K.GOLD))) is not None
    ]
    axes[1].errorbar(
        [g[0] for g in gold],
        [g[1] for g in gold],
        yerr=[g[2] for g in gold],
        marker="o",
        capsize=3,
        color="C2",
    )
    axes[1].set_ylabel("gold score (+/- stderr)")
    axes[2].plot(*_series(steps, K.KL), marker=".", color="C3")
    axes[2].set_ylabel("KL to reference")
    axes[2].set_xlabel("PPO step")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


_PLOTTERS = {
    "rlhf.png": _plot_rlhf,
    "reward.png": _plot_reward,
    "kl.png": _plot_kl,
    "losses.png": _plot_losses,
    "time.png": _plot_time,
    "turns.png": _plot_turns,
}


# --------------------------------------------------------------------------------------------
# Report


EVAL_SAMPLES_FILE = "eval_samples.jsonl"  # a few held-out responses of each evaluation


def eval_samples_text(path: Path, shown: int = 3) -> str:
    """A few held-out responses of the first evaluation and of the last (before and after
    training), with their gold scores; empty without the file."""
    if not path.is_file():
        return ""
    evals = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            evals.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    if not evals:
        return ""
    lines = []
    for label, ev in (("before", evals[0]), ("after", evals[-1])):
        if label == "after" and ev is evals[0]:
            break
        lines.append(f"sample responses {label} (step {ev['step']}):")
        for s in ev["samples"][:shown]:
            lines.append(f"  prompt:   {_one_line(s['prompt'])}")
            lines.append(f"  response: {_one_line(s['response'])}  (gold {s['gold']:g})")
    return "\n".join(lines) + "\n"


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the figures and ``summary.txt`` of a run into ``run_dir/report`` (or ``out_dir``).

    Returns ``{"files": [paths written, figures then summary.txt], "summary": text}``.
    Raises ``FileNotFoundError`` when the run directory or its metrics.jsonl does not exist,
    ``ReportError`` (a ``ValueError``) when it holds no rows, and ``ValueError`` for a malformed
    line that is not the last one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in run directory {run_dir}")
    rows, ignored = load_metrics(metrics_path)
    if not rows:
        raise ReportError(f"{metrics_path} holds no metric rows")

    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    steps = _ppo_steps(rows)
    files: list[str] = []
    for name in FIGURES:
        path = out / name
        if _PLOTTERS[name](steps, path):
            files.append(str(path))
    summary = build_summary(rows, ignored=ignored, source=str(run_dir))
    summary += eval_samples_text(run_dir / EVAL_SAMPLES_FILE)
    summary_path = out / SUMMARY_FILE
    summary_path.write_text(summary, encoding="utf-8")
    files.append(str(summary_path))
    return {"files": files, "summary": summary}


def samples_report(run_dir: str, epoch: int | None) -> int:
    """Print the ledger summary and each epoch's coverage; 1 when an epoch the run finished
    (or the one asked for) trained a prompt more or fewer times than it should."""
    from rlhf_dist import ledger

    try:
        rows, meta = ledger.read_ledger(run_dir), ledger.read_meta(run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(ledger.summary_lines(rows)))
    n, g = meta["num_prompts"], meta["samples_per_prompt"]
    updates = meta.get("updates_per_sample")
    epochs = sorted({r["epoch"] for r in rows}) if epoch is None else [epoch]
    bad = False
    for e in epochs:
        cov = ledger.epoch_coverage(rows, e, n, g, updates)
        last_open = epoch is None and e == epochs[-1] and cov["missing"] and not cov["repeated"]
        state = "exact" if cov["exact"] else ("in progress" if last_open else "NOT exact")
        uniform = f", {cov['uniform']} set aside by dynamic sampling" if cov["uniform"] else ""
        print(
            f"epoch {e}: every one of {n} prompts trained exactly {g} times: {state} "
            f"(missing {len(cov['missing'])} prompts, repeated {len(cov['repeated'])}, "
            f"trained another number of times than ppo.epochs {len(cov['miscounted'])}{uniform})"
        )
        bad |= state == "NOT exact"
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_dist.report",
        description="Write PNG figures and a text summary from a run's metrics.jsonl.",
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument(
        "--samples",
        action="store_true",
        help="summarise the sample ledger (samples.jsonl) instead: per generator, per "
        "staleness, reward by length, and whether each epoch trained every prompt exactly "
        "samples_per_prompt times",
    )
    parser.add_argument(
        "--epoch", type=int, default=None, help="with --samples: check this epoch only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.samples:
        return samples_report(args.run_dir, args.epoch)
    try:
        result = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:  # ValueError covers ReportError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result["summary"], end="")
    print("wrote:")
    for path in result["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
