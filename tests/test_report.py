"""rlhf_dist.report: reading metrics.jsonl, figures, summary, CLI, and import isolation; and
the end-of-run summary ``launch.train`` prints (``launch.summarise``)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_dist.report import FIGURES, ReportError, load_metrics, read_metrics, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 10
EVAL_EVERY = 3


def _row(step: int) -> dict:
    row = {
        "step": step,
        "rollout/reward_mean": round(0.40 + 0.03 * step, 4),
        "rollout/score_std": 0.1,
        "rollout/response_length_mean": 12.0,
        "rollout/truncated_frac": 1.0,
        "train/policy_loss": -0.01 * step,
        "train/value_loss": 0.05 / step,
        "train/entropy": 3.9 - 0.01 * step,
        "train/clipfrac": 0.01,
        "train/approx_kl": 0.0003 * step,
        "train/grad_norm": 1.9,
        "train/kl": 0.01 * step,
        "train/kl_coef": 0.05,
        "train/explained_variance": -8.4,
        "time/generate": 0.04,
        "time/score": 0.02,
        "time/train": 0.18,
        "time/weight_sync": 0.01,
        "time/step": 0.26,
        "perf/tokens_per_s": 300.0 + 10 * step,
        "sync/version": step,
        "pool/num_generators": 2,
        # a multi-turn run's (rollout.env): turns.png
        "rollout/turns_mean": 1.5 + 0.1 * step,
        "rollout/tool_calls_mean": 0.5 + 0.1 * step,
        "rollout/tool_errors": 1,
        "rollout/env_timeouts": 0,
    }
    if step % EVAL_EVERY == 0:
        row["eval/gold_score"] = round(0.3 + 0.01 * step, 4)
        row["eval/gold_score_stderr"] = 0.02
    return row


ROWS = [_row(s) for s in range(1, N_STEPS + 1)]
# Best reward is not the last one: bump step 7.
ROWS[6]["rollout/reward_mean"] = 0.95


def _write(run_dir: Path, rows, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:4] == b"\x89PNG", path
    assert len(data) > 5000, (path, len(data))
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _pngs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    _write(d, ROWS)
    return d


def test_full_report_writes_all_figures_and_summary(run_dir):
    result = write_report(run_dir)
    out = run_dir / "report"
    assert _pngs(out) == set(FIGURES)
    assert result["files"] == [str(out / n) for n in FIGURES] + [str(out / "summary.txt")]
    for name in FIGURES:
        _check_png(out / name)

    text = result["summary"]
    assert (out / "summary.txt").read_text(encoding="utf-8") == text
    rewards = [r["rollout/reward_mean"] for r in ROWS]
    assert f"steps: {N_STEPS}" in text
    assert f"first {rewards[0]:.4g} (step 1)" in text
    assert f"last {rewards[-1]:.4g} (step {N_STEPS})" in text
    assert f"best {max(rewards):.4g} (step 7)" in text
    gold = [r for r in ROWS if "eval/gold_score" in r]
    assert f"{len(gold)} evals" in text
    assert f"first {gold[0]['eval/gold_score']:.4g} +/- 0.02 (step {gold[0]['step']})" in text
    assert f"last {gold[-1]['eval/gold_score']:.4g} +/- 0.02 (step {gold[-1]['step']})" in text
    assert f"final KL (train/kl): {ROWS[-1]['train/kl']:.4g}" in text
    assert "mean 0.26 s" in text
    # 0.18 / 0.26 = 69.2 %, 0.01 / 0.26 = 3.8 %, remainder 0.01 -> "other 3.8%"
    assert "train 69.2%" in text and "weight_sync 3.8%" in text and "other 3.8%" in text
    mean_tps = sum(r["perf/tokens_per_s"] for r in ROWS) / len(ROWS)
    assert f"mean {mean_tps:.4g} tokens/s" in text
    assert "ignored" not in text


def test_turns_and_tool_calls_are_plotted_and_summarised_for_multi_turn_runs_only(tmp_path):
    multi = write_report(_write(tmp_path / "multi", ROWS).parent)
    last = ROWS[-1]
    assert (
        f"rollout/turns_mean: first 1.6 (step 1) -> last {last['rollout/turns_mean']:.4g}"
        in (multi["summary"])
    )
    assert f"rollout/tool_errors {N_STEPS}" in multi["summary"]
    single = [{k: v for k, v in r.items() if "turn" not in k and "tool" not in k} for r in ROWS]
    single = [{k: v for k, v in r.items() if "env_" not in k} for r in single]
    plain = write_report(_write(tmp_path / "single", single).parent)
    assert "turns.png" not in _pngs(tmp_path / "single" / "report")
    assert "rollout/turns_mean" not in plain["summary"] and "tool_errors" not in plain["summary"]


def test_out_dir_option(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "rep"
    result = write_report(run_dir, out_dir=out)
    assert _pngs(out) == set(FIGURES)
    assert all(Path(f).parent == out for f in result["files"])
    assert not (run_dir / "report").exists()


def test_truncated_last_line_is_tolerated_and_counted(tmp_path, caplog):
    path = _write(tmp_path / "run", ROWS, tail='{"step": 11, "rollout/rew')
    with caplog.at_level("WARNING", logger="rlhf_dist.report"):
        rows, ignored = load_metrics(path)
    assert len(rows) == N_STEPS and ignored == 1
    assert "line 11" in caplog.text
    assert read_metrics(path) == rows
    summary = write_report(tmp_path / "run")["summary"]
    assert "ignored 1 truncated" in summary
    assert f"steps: {N_STEPS}" in summary


def test_truncated_utf8_last_line_and_blank_lines(tmp_path):
    path = _write(tmp_path / "run", ROWS[:3])
    with path.open("ab") as f:
        f.write(b"\n\n" + '{"step": 4, "note": "\u00e9'.encode()[:-1])  # cut mid-character
    rows, ignored = load_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and ignored == 1


def test_malformed_middle_line_raises_naming_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:6]]
    lines[4] = '{"step": 5, oops}'
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 5"):
        read_metrics(path)


def test_non_utf8_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2, "x": "\xff"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 3"):
        read_metrics(path)


def test_non_object_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_missing_keys_skip_figures(tmp_path):
    rows = [{"step": s, "rollout/reward_mean": 0.1 * s} for s in range(1, 6)]
    rows[2]["rollout/reward_mean"] = None  # non-numeric values are skipped, not fatal
    run = tmp_path / "run"
    _write(run, rows)
    result = write_report(run)
    assert _pngs(run / "report") == {"reward.png"}
    _check_png(run / "report" / "reward.png")
    assert "final KL" not in result["summary"] and "step time" not in result["summary"]
    assert "first 0.1 (step 1) -> last 0.5 (step 5)" in result["summary"]


def test_only_timing_and_kl_coef(tmp_path):
    rows = [{"step": s, "time/generate": 0.1, "train/kl_coef": 0.05} for s in range(1, 4)]
    run = tmp_path / "run"
    _write(run, rows)
    write_report(run)
    assert _pngs(run / "report") == {"kl.png", "time.png"}


def test_other_stages_are_summarised_not_plotted(tmp_path):
    rows = [
        {"stage": "sft", "step": 1, "sft/loss": 2.0},
        {"stage": "sft", "step": 2, "sft/loss": 1.5},
        {"stage": "rm", "step": 1, "rm/accuracy": 0.75, "rm/loss": 0.6},
        # ppo rows, one with an explicit stage; eval logged on its own line for step 2
        {"step": 1, "rollout/reward_mean": 0.2},
        {"stage": "ppo", "step": 2, "rollout/reward_mean": 0.3},
        {"step": 2, "eval/gold_score": 0.4, "eval/gold_score_stderr": 0.05, "eval/win_rate": 0.6},
    ]
    run = tmp_path / "run"
    _write(run, rows)
    result = write_report(run)
    text = result["summary"]
    # gold score present: the combined proxy/gold/KL picture is drawn too
    assert _pngs(run / "report") == {"reward.png", "rlhf.png"}
    assert "steps: 2" in text
    assert "first 0.2 (step 1) -> last 0.3 (step 2)" in text
    assert "stage sft: 2 rows; last sft/loss=1.5" in text
    assert "stage rm: 1 rows; last rm/accuracy=0.75, rm/loss=0.6" in text
    assert "first 0.4 +/- 0.05 (step 2)" in text
    assert "eval/win_rate=0.6" in text


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ReportError, match="no metric rows"):
        write_report(tmp_path)


def _run(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
        **kwargs,
    )


def test_cli_writes_report_and_prints_paths(run_dir, tmp_path):
    out = tmp_path / "cli_out"
    result = _run("-m", "rlhf_dist.report", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in (*FIGURES, "summary.txt"):
        assert str(out / name) in result.stdout
    assert f"steps: {N_STEPS}" in result.stdout
    assert _pngs(out) == set(FIGURES)


def test_cli_errors_exit_2_without_traceback(tmp_path):
    missing = tmp_path / "does-not-exist"
    result = _run("-m", "rlhf_dist.report", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "run directory not found" in lines[0] and str(missing) in lines[0]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("", encoding="utf-8")
    for run in (tmp_path, tmp_path / "empty"):  # no metrics.jsonl / empty metrics.jsonl
        result = _run("-m", "rlhf_dist.report", str(run))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# sys.modules[name] = None makes `import name` raise ImportError: the report must need none of
# the heavy runtime dependencies, and must not go through pyplot (no global figure registry).
ISOLATION_SCRIPT = textwrap.dedent(
    """
    import sys

    for name in ("ray", "deepspeed", "transformers", "wandb"):
        sys.modules[name] = None

    from rlhf_dist.report import write_report

    result = write_report(sys.argv[1])
    assert "matplotlib.pyplot" not in sys.modules
    print(len(result["files"]))
    """
)


def test_report_works_without_heavy_dependencies(run_dir):
    result = _run("-c", ISOLATION_SCRIPT, str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(FIGURES) + 1)
    assert _pngs(run_dir / "report") == set(FIGURES)


def test_elapsed_clock_is_not_a_time_phase():
    from rlhf_dist.report import _time_components

    rows = [
        (s, {"time/train": 1.0, "time/wait_batch": 0.2, "time/elapsed": 3.0 * s}) for s in (1, 2)
    ]
    assert _time_components(rows) == ["time/train", "time/wait_batch"]


def test_evaluation_time_is_not_a_share_of_the_step(tmp_path):
    """The evaluation runs on some steps only, after the step (outside ``time/step``): a share
    of the step would read "eval 305.6%". It gets its own line, per evaluated step."""
    rows = [dict(r) for r in ROWS]
    evaluated = [r for r in rows if "eval/gold_score" in r]
    for r, seconds in zip(evaluated, (0.7, 0.8, 0.9)):
        r["time/eval"] = seconds
    run = tmp_path / "run"
    _write(run, rows)
    text = write_report(run)["summary"]
    (step_line,) = [line for line in text.splitlines() if line.startswith("step time")]
    assert "eval" not in step_line
    # the shares are those of the rows without time/eval (test_full_report_...)
    assert "train 69.2%" in step_line and "other 3.8%" in step_line
    assert (
        f"evaluation (time/eval): mean 0.8 s on the {len(evaluated)} evaluated steps, "
        "not counted in time/step" in text
    )


def test_no_evaluation_line_without_eval_times(run_dir):
    assert "evaluation (" not in write_report(run_dir)["summary"]


@pytest.mark.parametrize(
    "estimator, name",
    [
        ("gae", "PPO"),
        ("grpo", "GRPO"),
        ("dr_grpo", "Dr. GRPO"),
        ("rloo", "RLOO"),
        ("reinforce_pp", "REINFORCE++"),
        ("reinforce_pp_baseline", "REINFORCE++-baseline"),
    ],
)
def test_run_summary_names_the_algorithm(estimator, name):
    """The summary ``launch.train`` prints names the RL stage by ``ppo.estimator``: a GRPO run
    is not called "PPO"."""
    from rlhf_dist.config import Config
    from rlhf_dist.launch import summarise

    cfg = Config()
    cfg.ppo.estimator = estimator
    ppo = [
        {"step": 0, "eval/gold_score": 0.25, "eval/gold_score_stderr": 0.01},
        {"step": 1, "rollout/reward_mean": 0.1, "train/kl": 0.0},
        {
            "step": 2,
            "rollout/reward_mean": 0.3,
            "train/kl": 0.125,
            "eval/gold_score": 0.35,
            "eval/gold_score_stderr": 0.01,
        },
    ]
    lines = summarise({"sft": {}, "rm": {}, "ppo": ppo}, cfg)
    assert lines[2] == (
        f"gold score on held-out prompts: 0.250 +- 0.010 (before {name}) -> "
        "0.350 +- 0.010 (after 2 steps)"
    )
    assert lines[3] == f"{name}: proxy reward 0.100 -> 0.300, final KL 0.1250 per token"
    if estimator != "gae":
        assert not any("PPO" in line for line in lines)


def test_the_summary_shows_held_out_responses_before_and_after(tmp_path):
    """eval_samples.jsonl (a few samples of each evaluation): the summary shows the first
    evaluation's and the last's; a line cut short by a kill is skipped; none: nothing."""
    from rlhf_dist.report import EVAL_SAMPLES_FILE, eval_samples_text

    path = tmp_path / EVAL_SAMPLES_FILE
    assert eval_samples_text(path) == ""
    evals = [
        {"step": 0, "samples": [{"prompt": "2+2?", "response": "5", "gold": 0.0}]},
        {"step": 10, "samples": [{"prompt": "2+2?", "response": "4", "gold": 1.0}]},
        {"step": 20, "samples": [{"prompt": "2+2?", "response": "The answer\nis 4", "gold": 1.0}]},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in evals) + '{"step": 30, "sam')
    text = eval_samples_text(path)
    assert "before (step 0)" in text and "after (step 20)" in text and "step 10" not in text
    assert "response: The answer is 4  (gold 1)" in text  # one line, whatever it held
    path.write_text(json.dumps(evals[0]) + "\n")
    assert "before (step 0)" in eval_samples_text(path) and "after" not in eval_samples_text(path)
