import math

import pytest
import torch

from rlhf_dist.algo import kl_estimate, kl_penalized_rewards


def _k_loop(logp, ref_logp, estimator):
    """Plain-float formulas with r = ref_logp - logp."""
    out = []
    for lp_row, rf_row in zip(logp.tolist(), ref_logp.tolist()):
        row = []
        for lp, rf in zip(lp_row, rf_row):
            r = rf - lp
            row.append({"k1": -r, "k2": 0.5 * r * r, "k3": math.exp(r) - 1 - r}[estimator])
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _logps(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(*shape, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(*shape, generator=g, dtype=torch.float64) * 3
    return logp, ref


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_formulas(estimator):
    logp, ref = _logps()
    out = kl_estimate(logp, ref, estimator)
    assert out.shape == logp.shape
    assert torch.allclose(out, _k_loop(logp, ref, estimator), atol=1e-12)


def test_estimator_signs_and_hand_case():
    # logp = -1, ref = -2 -> r = -1: k1 = 1, k2 = 0.5, k3 = e^-1 - 1 + 1 = 0.3679
    # logp = -2, ref = -1 -> r = +1: k1 = -1, k2 = 0.5, k3 = e - 1 - 1 = 0.7183
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    assert kl_estimate(logp, ref, "k1")[0].tolist() == pytest.approx([1.0, -1.0])
    assert kl_estimate(logp, ref, "k2")[0].tolist() == pytest.approx([0.5, 0.5])
    assert kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-1), math.e - 2])
    logp, ref = _logps(seed=1, shape=(8, 50))
    assert (kl_estimate(logp, ref, "k1") < 0).any()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_k3_is_exact_for_tiny_log_ratios():
    # expm1 keeps k3 ~ r^2 / 2 accurate where exp(r) - 1 - r would cancel to 0 in fp32.
    logp = torch.zeros(1)
    ref = torch.full((1,), 1e-4)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5e-8, rel=1e-3)


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_k1_and_k3_unbiased_on_categorical_samples():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # KL(p || q) ~ 0.1446
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g).view(1, -1)
    logp, ref = p.log()[x], q.log()[x]
    for estimator in ("k1", "k3"):
        est = kl_estimate(logp, ref, estimator).mean().item()
        assert est == pytest.approx(true_kl, abs=5e-3), estimator


def _rewards_loop(scores, logp, ref, mask, coef, estimator):
    """Per row: -coef * k on valid tokens, score added at the last valid index."""
    k = _k_loop(logp, ref, estimator).tolist()
    rewards, kls = [], []
    for b, row in enumerate(mask.tolist()):
        kl_row = [k[b][t] if row[t] else 0.0 for t in range(len(row))]
        r_row = [-coef * v for v in kl_row]
        valid = [t for t in range(len(row)) if row[t]]
        if valid:
            r_row[valid[-1]] += float(scores[b])
        rewards.append(r_row)
        kls.append(kl_row)
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(kls, dtype=torch.float64)


def test_penalized_rewards_hand_case():
    # k1 = logp - ref = [0.5, -1.0, 0.0]; coef 0.1 -> [-0.05, 0.1, 0.0]; score 3 on last token
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    rewards, kl = kl_penalized_rewards(torch.tensor([3.0]), logp, ref, torch.ones(1, 3), 0.1)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 3.0])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_penalized_rewards_match_loop_with_mixed_padding(estimator):
    logp, ref = _logps(seed=2, shape=(5, 6))
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],  # right padded
            [0, 0, 1, 1, 1, 1],  # left padded
            [0, 1, 0, 1, 1, 0],  # holes
            [0, 0, 0, 0, 0, 0],  # empty: no score anywhere
            [0, 0, 0, 1, 0, 0],  # one-token response
        ]
    )
    scores = torch.tensor([1.0, -2.0, 0.5, 7.0, 4.0], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, 0.2, estimator)
    exp_rewards, exp_kl = _rewards_loop(scores, logp, ref, mask, 0.2, estimator)
    assert torch.allclose(rewards, exp_rewards, atol=1e-12)
    assert torch.allclose(kl, exp_kl, atol=1e-12)
    assert torch.all(rewards[3] == 0)
    assert rewards[4].tolist() == pytest.approx([0, 0, 0, 4.0 - 0.2 * exp_kl[4, 3].item(), 0, 0])


def test_penalized_rewards_left_vs_right_padding_agree():
    logp, ref = _logps(seed=3, shape=(1, 4))
    scores = torch.tensor([2.5], dtype=torch.float64)
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    pad = torch.full((1, 2), -9.0, dtype=torch.float64)  # garbage in the padding
    right = kl_penalized_rewards(
        scores, torch.cat([logp, pad], 1), torch.cat([ref, pad * 2], 1), right_mask, 0.05, "k3"
    )
    left = kl_penalized_rewards(
        scores, torch.cat([pad, logp], 1), torch.cat([pad * 2, ref], 1), left_mask, 0.05, "k3"
    )
    for r_out, l_out in zip(right, left):
        assert torch.allclose(r_out[:, :4], l_out[:, 2:])
        assert torch.all(r_out[:, 4:] == 0) and torch.all(l_out[:, :2] == 0)


def test_penalized_rewards_tensor_coef_and_bool_mask():
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    rewards, _ = kl_penalized_rewards(
        torch.tensor([1.0]), logp, ref, torch.tensor([[True, True]]), torch.tensor(0.5)
    )
    # k1 = [1, 0] -> [-0.5, 0 + 1]
    assert rewards[0].tolist() == pytest.approx([-0.5, 1.0])
