"""tests/helpers/compare_runs.py: the full comparison of two runs finds every kind of
difference a disturbed run could show (a row missing, a key missing, a value off, weights off),
and only those."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from compare_runs import assert_same_runs  # noqa: E402

ROWS = [
    {"stage": "ppo", "step": 1, "train/kl": 0.01, "fault/restarts": 0, "time/step": 1.0},
    {"stage": "ppo", "step": 2, "train/kl": 0.02, "fault/restarts": 0, "pool/rss_mb": 5.0},
]
WEIGHTS = {"wte": torch.arange(6.0).reshape(2, 3), "head": torch.ones(3)}


def make_run(path: Path, rows=ROWS, weights=WEIGHTS) -> Path:
    (path / "policy").mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file(weights, path / "policy" / "model.safetensors")
    return path


def test_a_run_equals_its_copy_whatever_its_timings(tmp_path):
    other = [dict(r) for r in ROWS]
    other[0]["time/step"], other[1]["pool/rss_mb"] = 9.0, 7.0  # never compared
    other[1]["perf/tokens_per_s"] = 3.0  # nor is a timing key present on one side only
    assert_same_runs(make_run(tmp_path / "a"), make_run(tmp_path / "b", other))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda rows: rows[:1], r"rows \(stage, step\) differ"),
        (lambda rows: rows + [{**rows[1], "step": 3}], r"rows \(stage, step\) differ"),
        (lambda rows: [rows[0], {**rows[1], "step": 1}], r"rows \(stage, step\) differ"),
        (lambda rows: [rows[0], {**rows[1], "train/kl": 0.020001}], r"2\) train/kl"),
        (lambda rows: [rows[0], {**rows[1], "fault/restarts": 1}], r"fault/restarts: 1 != 0"),
        (lambda rows: [rows[0], {**rows[1], "eval/extra": 1}], r"only in got \['eval/extra'\]"),
        (lambda rows: [{k: v for k, v in rows[0].items() if k != "train/kl"}, rows[1]], "want"),
        (lambda rows: [rows[0], {**rows[1], "train/kl": float("nan")}], "train/kl: nan"),
    ],
    ids=[
        "row_missing",
        "row_extra",
        "step_differs",
        "value_off",
        "counter_off",
        "key_extra",
        "key_missing",
        "nan",
    ],
)
def test_every_metric_difference_is_found(tmp_path, change, match):
    got = make_run(tmp_path / "got", change([dict(r) for r in ROWS]))
    with pytest.raises(AssertionError, match=match):
        assert_same_runs(got, make_run(tmp_path / "want"))


def test_ignored_keys_may_differ_or_be_missing(tmp_path):
    rows = [{**ROWS[0], "fault/restarts": 1}, {**ROWS[1], "fault/restarts": 2, "async/x": 1}]
    assert_same_runs(
        make_run(tmp_path / "got", rows),
        make_run(tmp_path / "want"),
        ignore={"fault/restarts", "async/x"},
    )


@pytest.mark.parametrize(
    "weights, match",
    [
        ({**WEIGHTS, "head": torch.ones(3) + 1e-4}, r"head: max abs difference 0\.0001"),
        ({**WEIGHTS, "head": torch.ones(4)}, r"head: shape \(4,\) != \(3,\)"),
        ({"wte": WEIGHTS["wte"]}, r"tensor names differ: \['head'\]"),
        ({**WEIGHTS, "wte": torch.full((2, 3), float("nan"))}, "wte: max abs difference nan"),
    ],
    ids=["value_off", "shape", "tensor_missing", "nan"],
)
def test_exported_weights_are_compared(tmp_path, weights, match):
    got = make_run(tmp_path / "got", weights=weights)
    with pytest.raises(AssertionError, match=match):
        assert_same_runs(got, make_run(tmp_path / "want"))


def test_weights_within_the_tolerance_asked_for_pass(tmp_path):
    got = make_run(tmp_path / "got", weights={**WEIGHTS, "head": torch.ones(3) + 1e-4})
    assert_same_runs(got, make_run(tmp_path / "want"), weights_atol=1e-3)


SAMPLES = [
    {
        "step": s,
        "epoch": 0,
        "row": r,
        "sample": 0,
        "chunk": r,
        "seed": 7 + r,
        "version": s - 1,
        "slot": 0,
        "reward": 0.5 * r,
    }
    for s, r in [(1, 0), (1, 1), (2, 2), (2, 3)]
]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda rows: rows[:-1], r"sample \(2, 0, 3, 0, 3, 10, 1\) trained 0x, want 1x"),
        (lambda rows: rows + rows[-1:], r"trained 2x, want 1x"),  # a chunk trained twice
        (lambda rows: [{**r, "reward": 9.0} if r["row"] == 1 else r for r in rows], "reward"),
        (lambda rows: [{**r, "seed": 99} if r["row"] == 2 else r for r in rows], "trained 0x"),
    ],
    ids=["sample lost", "sample trained twice", "reward off", "other seed"],
)
def test_sample_ledgers_must_agree_sample_by_sample(tmp_path, change, match):
    want, got = make_run(tmp_path / "want"), make_run(tmp_path / "got")
    (want / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    rows = [{**r, "slot": 1} for r in SAMPLES]  # another generator: not a difference
    (got / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_same_runs(got, want)
    (got / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in change(rows)))
    with pytest.raises(AssertionError, match=match):
        assert_same_runs(got, want)
