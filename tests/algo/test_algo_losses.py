import math

import pytest
import torch

from rlhf_dist.algo import explained_variance, ppo_policy_loss, value_loss


def _ppo_loop(logp, old_logp, adv, mask, eps_low, eps_high, weights=None):
    """Plain-float clipped surrogate, token-mean over valid tokens."""
    total, count, clipped_count = 0.0, 0, 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            a = adv[b][t]
            clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
            unclipped_loss, clipped_loss = -ratio * a, -clipped_ratio * a
            loss = max(unclipped_loss, clipped_loss)
            if weights is not None:
                loss *= weights[b][t]
            total += loss
            count += 1
            clipped_count += clipped_loss > unclipped_loss
    return total / max(count, 1), clipped_count / max(count, 1)


def _hand_inputs():
    # ratios [1.5, 0.5, 1.5, 0.5], advantages [1, 1, -1, -1]
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return logp, old, adv, torch.ones(1, 4)


def test_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 4.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.randn(2, 3)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 4.0 + 0.5) / 4)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.0)


def test_hand_case_clip_active_for_both_signs():
    # eps 0.2, per token -min(r A, clip(r) A):
    #   r=1.5, A=+1: min(1.5, 1.2) = 1.2   -> loss -1.2, clipped (no gradient)
    #   r=0.5, A=+1: min(0.5, 0.8) = 0.5   -> loss -0.5
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5 -> loss 1.5
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped (no gradient)
    # mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clipfrac = 2 / 4
    logp, old, adv, mask = _hand_inputs()
    logp.requires_grad_()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    k = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.5, 0.5)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k) / 4)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())

    loss.backward()
    # d loss / d logp_t = -A_t * ratio_t / 4 on unclipped tokens, 0 on clipped ones
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0])


def test_clip_eps_high():
    # eps_high 0.28: token 0 now min(1.5, 1.28) = 1.28 -> (-1.28 - 0.5 + 1.5 + 0.8) / 4 = 0.13
    logp, old, adv, mask = _hand_inputs()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(0.13)


def test_importance_weights_scale_and_are_detached():
    logp, old, adv, mask = _hand_inputs()
    logp.requires_grad_()
    weights = torch.tensor([[2.0, 1.0, 0.5, 0.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, importance_weights=weights)
    # (-1.2 * 2 - 0.5 * 1 + 1.5 * 0.5 + 0.8 * 0) / 4 = -0.5375
    assert loss.item() == pytest.approx(-0.5375)
    loss.backward()
    assert weights.grad is None
    # unclipped tokens 1 and 2: -A * ratio * w / 4 -> -0.5 / 4 and 1.5 * 0.5 / 4
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5 / 4, 0.75 / 4, 0.0])


@pytest.mark.parametrize("eps_high", [None, 0.3])
def test_policy_loss_matches_loop(eps_high):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 7, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    weights = torch.rand(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.3
    mask[2] = False
    high = 0.2 if eps_high is None else eps_high
    for w in (None, weights):
        loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, eps_high, w)
        exp_loss, exp_clipfrac = _ppo_loop(
            logp.tolist(),
            old.tolist(),
            adv.tolist(),
            mask.tolist(),
            0.2,
            high,
            None if w is None else w.tolist(),
        )
        assert loss.item() == pytest.approx(exp_loss)
        assert stats["clipfrac"].item() == pytest.approx(exp_clipfrac)


def test_policy_loss_all_masked_and_garbage_padding():
    logp = torch.tensor([[0.0, 1000.0]], requires_grad=True)  # exp(1000) would overflow
    old = torch.tensor([[0.0, -1000.0]])
    adv = torch.tensor([[1.0, float("inf")]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.tensor([[1, 0]]), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all()
    assert stats["ratio_max"].item() == pytest.approx(1.0)

    loss, stats = ppo_policy_loss(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2
    )
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in stats.values())


def test_value_loss_hand_case():
    # clip 0.2:
    #   token 0: v - old = 0.5 -> clamp 0.2 -> v_clip 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69 -> 1.69
    #   token 1: v - old = 0 -> v_clip 2; both (2 - 0)^2 = 4 (not strictly larger) -> 4
    # loss = 0.5 * (1.69 + 4) / 2 = 1.4225, clipfrac 1 / 2; token 2 is masked out
    values = torch.tensor([[1.0, 2.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(1.4225)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped term wins on token 0 -> no gradient; token 1: 0.5 * 2 * (2 - 0) / 2 = 1
    assert values.grad[0].tolist() == pytest.approx([0.0, 1.0, 0.0])

    # no clipping: 0.5 * (1 + 4) / 2 = 1.25
    loss, stats = value_loss(values, old, returns, mask, None)
    assert loss.item() == pytest.approx(1.25)
    assert stats["value_clipfrac"].item() == 0.0


def test_value_loss_unclipped_inside_range():
    # |v - old| <= eps everywhere -> same as the plain squared error
    values = torch.tensor([[1.0, 1.1]])
    old = torch.tensor([[1.05, 1.0]])
    returns = torch.tensor([[0.0, 3.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.9**2) / 2)
    assert stats["value_clipfrac"].item() == 0.0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # constant prediction at the mean explains nothing
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == (
        pytest.approx(0.0)
    )
    # residuals [1, 0, -1, 0]: Var = 0.5 (biased) vs Var[R] = 1.25 -> 1 - 0.4 = 0.6
    values = torch.tensor([[0.0, 2.0, 4.0, 4.0, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.6)
    # Var[R] == 0 (constant returns, a single token, or nothing valid) -> 0, never NaN
    assert explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)).item() == 0.0
    assert explained_variance(values, returns, torch.tensor([[1, 0, 0, 0, 0]])).item() == 0.0
    assert explained_variance(values, returns, torch.zeros(1, 5)).item() == 0.0


def test_decoupled_weights_hand_case():
    from rlhf_dist.algo import decoupled_importance_weights

    prox = torch.tensor([[-1.0, -1.0, -1.0, -2.0]])
    behav = torch.tensor([[-1.5, -0.5, -4.0, -2.0]])
    stale = torch.tensor([[1, 1, 1, 0]])
    w, truncated = decoupled_importance_weights(prox, behav, stale, cap=2.0)
    # e^0.5 = 1.65 (kept), e^-0.5 = 0.61 (kept), e^3 = 20.1 (capped at 2), fresh token: 1
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-0.5), 2.0, 1.0]]))
    assert truncated.tolist() == [[False, False, True, False]]


def test_decoupled_weights_are_exactly_one_on_policy_and_scale_the_loss():
    from rlhf_dist.algo import decoupled_importance_weights

    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    behav = old + 0.3 * torch.randn(3, 5, generator=g)  # numerically a bit off
    adv, mask = torch.randn(3, 5, generator=g), torch.ones(3, 5)
    fresh, _ = decoupled_importance_weights(old, behav, torch.zeros(3, 5), cap=2.0)
    assert torch.equal(fresh, torch.ones(3, 5))
    plain, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    same, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, importance_weights=fresh)
    assert torch.equal(plain, same)
    stale_w, _ = decoupled_importance_weights(old, behav, torch.ones(3, 5), cap=2.0)
    weighted, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, importance_weights=stale_w)
    assert not torch.allclose(weighted, plain)
