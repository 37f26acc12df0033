"""Rollout correction (``algo.rollout_correction``) against plain loops: TIS, MIS at both
levels, IcePop, and the mismatch statistics; padding garbage never leaks."""

import math

import pytest
import torch

from rlhf_dist.algo import rollout_correction

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64)


def _logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    engine = -torch.rand(4, 4, generator=g, dtype=torch.float64) * 3
    trainer = engine + torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.8
    trainer = torch.where(MASK.bool(), trainer, torch.tensor(float("nan")))  # padding junk
    return trainer, engine


def _loop(
    mode, trainer, engine, mask, cap=2.0, lo=0.5, hi=2.0, level="geometric", ilo=0.5, ihi=5.0
):
    out = []
    for b in range(len(mask)):
        valid = [t for t in range(len(mask[b])) if mask[b][t]]
        rho = {t: math.exp(trainer[b][t] - engine[b][t]) for t in valid}
        row = [1.0] * len(mask[b])
        if mode == "tis":
            for t in valid:
                row[t] = min(rho[t], cap)
        elif mode == "mis" and valid:
            logs = [math.log(rho[t]) for t in valid]
            seq = math.exp(sum(logs) if level == "product" else sum(logs) / len(logs))
            if not lo <= seq <= hi:
                for t in valid:
                    row[t] = 0.0
        elif mode == "icepop":
            for t in valid:
                row[t] = rho[t] if ilo <= rho[t] <= ihi else 0.0
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("none", {}),
        ("tis", {"tis_cap": 1.5}),
        ("mis", {"mis_level": "geometric", "mis_low": 0.8, "mis_high": 1.25}),
        ("mis", {"mis_level": "product", "mis_low": 0.5, "mis_high": 2.0}),
        ("icepop", {"icepop_low": 0.7, "icepop_high": 1.4}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_a_plain_loop(mode, kw, seed):
    trainer, engine = _logps(seed)
    got, stats = rollout_correction(mode, trainer, engine, MASK, **kw)
    loop_kw = {
        "cap": kw.get("tis_cap", 2.0),
        "lo": kw.get("mis_low", 0.5),
        "hi": kw.get("mis_high", 2.0),
        "level": kw.get("mis_level", "geometric"),
        "ilo": kw.get("icepop_low", 0.5),
        "ihi": kw.get("icepop_high", 5.0),
    }
    want = _loop(mode, trainer.tolist(), engine.tolist(), MASK.tolist(), **loop_kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all() and not got.requires_grad
    valid = MASK.bool()
    rho = torch.exp(torch.where(valid, trainer - engine, 0.0))
    hit = {
        "none": torch.zeros_like(valid),
        "tis": valid & (rho > loop_kw["cap"]),
        "mis": valid & (got == 0),
        "icepop": valid & (got == 0),
    }[mode]
    assert float(stats["corrected_frac"]) == pytest.approx(float(hit.sum() / valid.sum()))
    if mode != "none":
        assert 0 < float(stats["corrected_frac"]) < 1  # the case exercises the rule


def test_statistics_match_a_plain_loop():
    trainer, engine = _logps(2)
    _, stats = rollout_correction("none", trainer, engine, MASK)
    diffs, rhos = [], []
    for b in range(4):
        for t in range(4):
            if MASK[b, t]:
                d = float(trainer[b, t] - engine[b, t])
                diffs.append(abs(d))
                rhos.append(math.exp(d))
    assert float(stats["logprob_diff_mean"]) == pytest.approx(sum(diffs) / len(diffs))
    assert float(stats["logprob_diff_max"]) == pytest.approx(max(diffs))
    assert float(stats["ratio_mean"]) == pytest.approx(sum(rhos) / len(rhos))
    assert float(stats["ratio_min"]) == pytest.approx(min(rhos))
    assert float(stats["ratio_max"]) == pytest.approx(max(rhos))
    assert float(stats["corrected_frac"]) == 0.0


def test_equal_log_probs_correct_nothing_and_read_zero():
    _, engine = _logps(3)
    for mode in ("none", "tis", "mis", "icepop"):
        w, stats = rollout_correction(mode, engine, engine, MASK)
        assert torch.equal(w, torch.ones_like(w))
        assert float(stats["logprob_diff_max"]) == 0.0 and float(stats["ratio_max"]) == 1.0


def test_unknown_modes_are_refused():
    _, engine = _logps()
    with pytest.raises(ValueError, match="unknown rollout correction 'is'"):
        rollout_correction("is", engine, engine, MASK)
    with pytest.raises(ValueError, match="unknown MIS level"):
        rollout_correction("mis", engine, engine, MASK, mis_level="arith")
