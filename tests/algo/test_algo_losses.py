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


# ----------------------------------------------------------------------------- aggregation


def _t(nested):
    return torch.tensor(nested, dtype=torch.float64)


def _agg_loop(per_token, mask, mode, norm=1.0):
    """Plain floats: token mean, mean over rows of token means, mean over rows of token sums."""
    rows = [[x for x, m in zip(r, mr) if m] for r, mr in zip(per_token, mask)]
    if mode == "token_mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / max(len(flat), 1)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / len(rows) / norm


def _agg_weights(mask, mode, norm=1.0):
    """d loss / d l_bt of each aggregation, as plain floats."""
    n_rows = len(mask)
    total = sum(sum(r) for r in mask)
    out = []
    for r in mask:
        n = sum(r)
        if mode == "token_mean":
            w = 1.0 / max(total, 1)
        elif mode == "seq_mean_token_mean":
            w = 1.0 / (n_rows * max(n, 1))
        else:
            w = 1.0 / (n_rows * norm)
        out.append([w if m else 0.0 for m in r])
    return out


AGG_MASK = torch.tensor(
    [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
)
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def test_aggregate_loss_hand_case():
    from rlhf_dist.algo import aggregate_loss

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(x, m).item() == pytest.approx(10 / 4)
    assert aggregate_loss(x, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(x, m, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(x, m, "seq_mean_token_sum", norm=8).item() == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        aggregate_loss(x, m, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_matches_loop_with_garbage_padding(mode):
    from rlhf_dist.algo import aggregate_loss

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[AGG_MASK == 0] = float("nan")  # padding never leaks
    x.requires_grad_()
    got = aggregate_loss(x, AGG_MASK, mode, norm=16.0)
    assert got.item() == pytest.approx(
        _agg_loop(x.tolist(), AGG_MASK.tolist(), mode, 16.0), abs=1e-12
    )
    got.backward()
    assert torch.allclose(x.grad, _t(_agg_weights(AGG_MASK.tolist(), mode, 16.0)), atol=1e-12)


def test_seq_mean_token_sum_has_no_length_bias():
    """Dr. GRPO's point: with a per-sequence length division the same advantage pushes each
    token of a short response harder than each token of a long one; with a constant norm both
    are pushed alike."""
    from rlhf_dist.algo import aggregate_loss

    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    per_token = torch.ones(2, 8, requires_grad=True)
    aggregate_loss(per_token, mask, "seq_mean_token_mean").backward()
    short, long = per_token.grad[0, 0].item(), per_token.grad[1, 0].item()
    assert short == pytest.approx(4 * long)
    per_token.grad = None
    aggregate_loss(per_token, mask, "seq_mean_token_sum", norm=8).backward()
    assert per_token.grad[0, 0].item() == per_token.grad[1, 0].item() == pytest.approx(1 / 16)


# ----------------------------------------------------------------------------- GSPO


def _ppo_loop_general(logp, old, adv, mask, eps_low, eps_high, ratio_level, mode, norm):
    """Per-token clipped loss with the token or the sequence ratio, aggregated by _agg_loop;
    also the gradient d loss / d logp (0 where the clip wins)."""
    per_token, grad_scale = [], []
    for b, row in enumerate(mask):
        valid = [t for t in range(len(row)) if row[t]]
        seq = math.exp(sum(logp[b][t] - old[b][t] for t in valid) / max(len(valid), 1))
        lrow, grow = [], []
        for t in range(len(row)):
            ratio = seq if ratio_level == "sequence" else math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
            unclipped_loss, clipped_loss = -ratio * a, -clipped_ratio * a
            lrow.append(max(unclipped_loss, clipped_loss) if row[t] else 0.0)
            # d(-ratio * a) / d logp_t = -a * ratio (GSPO-token: -a * s_b) when not clipped
            grow.append(0.0 if clipped_loss > unclipped_loss or not row[t] else -a * ratio)
        per_token.append(lrow)
        grad_scale.append(grow)
    loss = _agg_loop(per_token, mask, mode, norm)
    weights = _agg_weights(mask, mode, norm)
    grad = [[g * w for g, w in zip(gr, wr)] for gr, wr in zip(grad_scale, weights)]
    return loss, grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_levels_and_aggregations_match_loop(mode, ratio_level):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp.requires_grad_()
    loss, stats = ppo_policy_loss(
        logp, old, adv, AGG_MASK, 0.2, 0.28, ratio_level=ratio_level, loss_agg=mode, loss_norm=6.0
    )
    want, want_grad = _ppo_loop_general(
        logp.tolist(),
        old.tolist(),
        adv.tolist(),
        AGG_MASK.tolist(),
        0.2,
        0.28,
        ratio_level,
        mode,
        6,
    )
    assert loss.item() == pytest.approx(want, abs=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, _t(want_grad), atol=1e-12)
    # approx_kl is the token-level k3 whatever the ratio level
    r = (logp - old).detach()[AGG_MASK.bool()]
    assert stats["approx_kl"].item() == pytest.approx((r.exp() - 1 - r).mean().item())


def test_gspo_hand_case_clips_whole_sequences():
    # row 0: token log-ratios (0.3, -0.1) -> s = e^0.1 = 1.105, inside 1 +- 0.2, A = +1
    # row 1: token log-ratios (0.5, 0.5, 0.5) -> s = e^0.5 = 1.65 > 1.2, A = +1: clipped
    #        (every token at 1.2, no gradient), although a token ratio would be clipped too
    # row 2: log-ratios (0.6, -0.6) -> s = 1, A = -1: token ratios e^0.6 / e^-0.6 would be
    #        clipped on the first token; the sequence ratio is not
    old = torch.zeros(3, 3)
    logp = torch.tensor([[0.3, -0.1, 0.0], [0.5, 0.5, 0.5], [0.6, -0.6, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0] * 3, [1.0] * 3, [-1.0] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, ratio_level="sequence")
    s0 = math.exp(0.1)
    assert loss.item() == pytest.approx((-2 * s0 - 3 * 1.2 + 2 * 1.0) / 7)
    assert stats["clipfrac"].item() == pytest.approx(3 / 7)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.5))
    loss.backward()
    want = [[-s0 / 7, -s0 / 7, 0.0], [0.0, 0.0, 0.0], [1 / 7, 1 / 7, 0.0]]
    assert torch.allclose(logp.grad, torch.tensor(want), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gspo_equals_the_sequence_objective_for_sequence_advantages(mode):
    """With one advantage per sequence the GSPO-token form used here has the gradient of GSPO's
    sequence objective -A_b * s_b(theta) (s_b differentiated through the mean log-ratio)."""
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = logp + 0.05 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    seq_adv = torch.randn(4, generator=g, dtype=torch.float64)
    adv = seq_adv[:, None].expand(4, 6)
    mask = AGG_MASK.clone()
    mask[3, 0] = 1  # every row has a token here
    a = logp.clone().requires_grad_()
    loss, _ = ppo_policy_loss(a, old, adv, mask, 0.2, ratio_level="sequence", loss_agg=mode)
    loss.backward()

    b = logp.clone().requires_grad_()
    valid = mask.bool()
    n = valid.sum(-1)
    s = torch.exp(torch.where(valid, b - old, 0.0).sum(-1) / n)  # differentiable
    per_seq = torch.maximum(-seq_adv * s, -seq_adv * s.clamp(0.8, 1.2))
    per_token = torch.where(valid, per_seq[:, None].expand(4, 6), 0.0)
    from rlhf_dist.algo import aggregate_loss

    direct = aggregate_loss(per_token, valid, mode)
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_unknown_ratio_level_refused():
    with pytest.raises(ValueError, match="unknown ratio level 'seq'"):
        ppo_policy_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.ones(1, 2),
            torch.ones(1, 2),
            0.2,
            ratio_level="seq",
        )


def test_gspo_garbage_padding_keeps_gradient_finite():
    logp = torch.tensor([[0.0, 1000.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1000.0]])
    adv = torch.tensor([[1.0, float("inf")]])
    loss, stats = ppo_policy_loss(
        logp, old, adv, torch.tensor([[1, 0]]), 0.2, ratio_level="sequence"
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and torch.isfinite(logp.grad).all()
    assert stats["ratio_max"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- KL loss


@pytest.mark.parametrize("mode", MODES)
def test_reference_kl_loss_matches_loop(mode):
    from rlhf_dist.algo import reference_kl_loss

    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp[AGG_MASK == 0] = float("inf")  # garbage in padding
    logp.requires_grad_()
    loss = reference_kl_loss(logp, ref, AGG_MASK, mode, norm=6.0)
    per_token, grad_scale = [], []
    for b in range(4):
        lrow, grow = [], []
        for t in range(6):
            if AGG_MASK[b, t]:
                d = ref[b, t].item() - logp[b, t].item()
                lrow.append(math.exp(d) - d - 1)
                grow.append(1 - math.exp(d))  # d/dlogp of e^(ref - logp) - (ref - logp) - 1
            else:
                lrow.append(0.0)
                grow.append(0.0)
        per_token.append(lrow)
        grad_scale.append(grow)
    mask = AGG_MASK.tolist()
    assert loss.item() == pytest.approx(_agg_loop(per_token, mask, mode, 6.0), abs=1e-12)
    loss.backward()
    weights = _agg_weights(mask, mode, 6.0)
    want = [[g_ * w for g_, w in zip(gr, wr)] for gr, wr in zip(grad_scale, weights)]
    assert torch.allclose(logp.grad, _t(want), atol=1e-12)


def test_reference_kl_loss_is_zero_at_the_reference_and_grows_away():
    from rlhf_dist.algo import reference_kl_loss

    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2)
    assert reference_kl_loss(logp, logp.clone(), mask).item() == 0.0
    # d = ln 2 on both tokens: e^d - d - 1 = 1 - ln 2
    ref = logp + math.log(2)
    assert reference_kl_loss(logp, ref, mask).item() == pytest.approx(1 - math.log(2))


# ----------------------------------------------------------------------------- minibatch-level


def _loop_minibatch_loss(per_token, mask, mode, norm):
    """The minibatch's loss by hand: one mean over the whole minibatch."""
    rows = []
    for l_row, m_row in zip(per_token.tolist(), mask.tolist()):
        toks = [x for x, m in zip(l_row, m_row) if m]
        rows.append(toks)
    if mode == "token_mean":
        toks = [x for r in rows for x in r]
        return sum(toks) / max(len(toks), 1)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * norm)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("micro", [1, 2, 3, 6])
def test_micro_batch_losses_with_the_minibatch_denominator_add_up_to_its_loss(mode, micro):
    """``aggregate_loss`` with ``denominator=loss_denominator(minibatch)``: the micro-batches'
    losses add up to the minibatch's loss (a plain loop), whatever the micro-batching; without
    it, the mean of micro-batch means differs when micro-batches hold different token counts."""
    from rlhf_dist.algo import aggregate_loss, loss_denominator

    g = torch.Generator().manual_seed(3)
    per_token = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lengths = [5, 1, 3, 0, 4, 2]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths], dtype=torch.float64)
    per_token = torch.where(mask.bool(), per_token, torch.tensor(float("nan")))  # padding junk
    want = _loop_minibatch_loss(per_token, mask, mode, norm=5.0)
    denominator = loss_denominator(mask, mode)
    got = sum(
        aggregate_loss(per_token[i : i + micro], mask[i : i + micro], mode, 5.0, denominator)
        for i in range(0, 6, micro)
    )
    assert float(got) == pytest.approx(want, abs=1e-12)
    if mode == "token_mean" and micro in (2, 3):  # the old mean of micro-batch means
        old = sum(
            aggregate_loss(per_token[i : i + micro], mask[i : i + micro], mode, 5.0)
            for i in range(0, 6, micro)
        ) / (6 // micro)
        assert abs(float(old) - want) > 1e-3


def test_loss_denominator_counts_tokens_or_sequences():
    from rlhf_dist.algo import loss_denominator

    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert float(loss_denominator(mask)) == 3.0
    assert float(loss_denominator(mask, "seq_mean_token_mean")) == 3.0
    assert float(loss_denominator(mask, "seq_mean_token_sum")) == 3.0
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        loss_denominator(mask, "sum")


def test_value_loss_over_the_minibatch_adds_up_across_micro_batches():
    values = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    whole, _ = value_loss(values, values, returns, mask, None)
    halves = [
        value_loss(
            values[i : i + 1], values[i : i + 1], returns[i : i + 1], mask[i : i + 1], None, 3.0
        )[0]
        for i in (0, 1)
    ]
    # 0.5 * (0.25 + 0 + 4) / 3 tokens
    assert float(whole) == pytest.approx(0.5 * 4.25 / 3) == float(sum(halves))
