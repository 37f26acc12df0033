"""PPO policy / value losses, the KL-to-reference loss, loss aggregation, explained variance."""

from __future__ import annotations

import torch

from .stats import _as_bool, masked_mean, masked_sum, masked_var

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
RATIO_LEVELS = ("token", "sequence")


def loss_denominator(mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """What a minibatch's loss is divided by under ``mode``: its valid tokens (``token_mean``)
    or its sequences (the ``seq_mean_*`` modes). Take it over the whole minibatch, summed over
    its micro-batches and learner ranks, and pass it to ``aggregate_loss`` as
    ``denominator``. Shapes: mask (B, T) -> () float."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")
    if mode == "token_mean":
        return _as_bool(mask).sum().to(torch.float64)
    return torch.tensor(float(mask.shape[0]), dtype=torch.float64)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    norm: float = 1.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the valid tokens.

    Formula, with n_b = sum_t mask_bt, B the number of rows and D the ``denominator``:
        token_mean          = sum_bt mask_bt * l_bt / D              D: the valid tokens
        seq_mean_token_mean = sum_b (sum_t mask_bt * l_bt / n_b) / D  D: the sequences
        seq_mean_token_sum  = sum_b (sum_t mask_bt * l_bt) / (D * norm)
    ``seq_mean_token_sum`` with a constant ``norm`` (the generation budget, max_new_tokens) is
    Dr. GRPO's fix of GRPO's length bias: dividing each sequence's loss by its own length n_b
    weighs the tokens of short responses more, so a wrong answer's tokens are penalised less
    the longer it is (Liu et al. 2025, "Understanding R1-Zero-Like Training", section 3.2,
    eq. 3: the 1/|o_i| term removed; their code divides the token sum by a constant). A row
    without valid tokens counts as a sequence with loss 0 (never NaN); ``token_mean`` of no
    valid token is 0.
    ``denominator`` defines the loss over a whole minibatch rather than this micro-batch: the
    minibatch's token (or sequence) count summed over its micro-batches and the learner ranks
    (``loss_denominator``, all-reduced). The micro-batches' losses then add up (over
    accumulation steps and ranks) to exactly the minibatch's loss, so the gradient does not
    depend on ``ppo.micro_batch_size`` or on the number of ranks: one token mean over the
    minibatch, as DAPO's token-level loss (Yu et al. 2025, section 3.3), veRL's global token
    count (``agg_loss`` with the data-parallel batch's ``global_batch_size``/token count) and
    OpenRLHF's ``utils/loss_utils.py`` take it. Without it (None) the micro-batch's own count:
    the loss of this batch alone.
    veRL calls these ``token-mean``, ``seq-mean-token-mean`` and ``seq-mean-token-sum``
    (its ``seq-mean-token-sum-norm`` is sum_b sum_t / T, without the 1/B).
    Shapes: per_token, mask (B, T) -> ().
    """
    valid = _as_bool(mask)
    if denominator is None:
        denominator = loss_denominator(valid, mode)
    denominator = torch.as_tensor(denominator, dtype=per_token.dtype, device=per_token.device)
    denominator = denominator.clamp(min=1)
    if mode == "token_mean":
        return masked_sum(per_token, valid) / denominator
    if mode == "seq_mean_token_sum":
        return masked_sum(per_token, valid) / (denominator * norm)
    if mode == "seq_mean_token_mean":
        return masked_mean(per_token, valid, dim=-1).sum() / denominator
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")


def reference_kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    norm: float = 1.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(pi_theta || pi_ref) as a loss term (GRPO's), k3 per token, aggregated like the loss.

    Formula, per valid token with d_t = ref_logp_t - logp_t:
        kl_t = exp(d_t) - d_t - 1          (k3: unbiased, non-negative; expm1 for small d)
        loss = aggregate_loss(kl, mask, mode, norm, denominator)
    The gradient flows through ``logp`` (the policy being trained); ``ref_logp`` is a constant.
    Unlike the KL penalty in the reward (``kl_penalized_rewards``), which the advantage carries
    and the ratio clip bounds, this term pulls every token straight towards the reference.
    Shapes: logp, ref_logp, mask (B, T) -> ().
    Source: Shao et al. 2024, "DeepSeekMath", eq. 3-4 (GRPO's objective: -beta * D_KL with
    this estimator); Schulman, "Approximating KL Divergence" (k3); veRL ``kl_penalty`` with
    ``low_var_kl`` (which also clamps to [-10, 10]; not here), OpenRLHF ``--use_kl_loss``.
    """
    valid = _as_bool(mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero padding first: garbage log-probs there must not reach the gradient (0 * inf = NaN).
    d = torch.where(valid, ref_logp.detach() - logp, zero)
    return aggregate_loss(torch.expm1(d) - d, valid, mode, norm, denominator)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_weights: torch.Tensor | None = None,
    ratio_level: str = "token",
    loss_agg: str = "token_mean",
    loss_norm: float = 1.0,
    loss_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss over the valid tokens, aggregated by ``aggregate_loss``.

    Formula (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7):
        ratio_t = exp(logp_t - old_logp_t)
        l_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)
        l_t    *= w_t                       (optional ``importance_weights``, detached)
        loss    = aggregate_loss(l, mask, loss_agg, loss_norm, loss_denominator)
                  (default token_mean: sum_t mask_t * l_t / sum_t mask_t, or over the
                  minibatch's tokens with ``loss_denominator``)
    ``clip_eps_high`` defaults to ``clip_eps`` (a larger value is the asymmetric "clip-higher" of
    DAPO, Yu et al. 2025). ``importance_weights`` are the behaviour -> proximal policy weights of
    decoupled PPO (AReaL, Fu et al. 2025, arXiv 2505.24298): they scale the loss, get no gradient.
    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization",
    eq. 7 and its GSPO-token form, eq. 13-14): every token of row b uses the sequence ratio
        s_b = exp((1/n_b) sum_t mask_bt * (logp_bt - old_logp_bt))       (n_b valid tokens)
    as its value, so the clip acts on the sequence (all its tokens are clipped or none, for a
    sequence-level advantage), with gradient s_b * grad logp_bt on each token
    (ratio_bt = sg[s_b] * pi_bt / sg[pi_bt]). For an advantage constant over the sequence
    (grpo, rloo, ...) and any of the aggregations above this is exactly the gradient of GSPO's
    sequence objective -A_b * s_b; with per-token advantages it is GSPO-token. As in veRL's
    ``compute_policy_loss_gspo``; the GSPO paper clips far tighter (3e-4 / 4e-4) than token
    PPO's 0.2, because a sequence ratio moves much less than token ratios.
    Stats (detached 0-dim tensors, token means over valid tokens):
        clipfrac  = mean(1[-A * clip(ratio) > -A * ratio]): fraction of tokens where the clipped
                    term strictly wins the min, i.e. where the clip is active and the token's
                    gradient is zero (verl's ``pg_clipfrac``; rather than baselines'
                    mean(|ratio - 1| > clip_eps), which also counts tokens the clip does not affect)
        approx_kl = mean((r_t - 1) - log r_t) with the token ratio r_t
                    (k3 estimate of KL(old || new), whatever ``ratio_level``)
        ratio_mean, ratio_max  of the ratio the loss used (ratio_max is 0 with no valid token)
    Shapes: logp, old_logp, advantages, mask, importance_weights (B, T) -> ((), dict of ()).
    """
    valid = _as_bool(mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Zero padding before exp: where() alone would still back-propagate 0 * inf = NaN through
    # an overflowing ratio computed from garbage in padded positions.
    log_ratio = torch.where(valid, logp - old_logp, zero)
    advantages = torch.where(valid, advantages.detach(), 0.0)
    token_ratio = torch.exp(log_ratio)
    if ratio_level == "token":
        ratio = token_ratio
    elif ratio_level == "sequence":
        n = valid.sum(dim=-1, keepdim=True).clamp(min=1)
        seq_log_ratio = (log_ratio.sum(dim=-1, keepdim=True) / n).detach()
        own = torch.where(valid, logp, zero)
        ratio = torch.exp(torch.where(valid, seq_log_ratio + own - own.detach(), zero))
    else:
        raise ValueError(f"unknown ratio level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        per_token = per_token * torch.where(valid, importance_weights.detach(), 0.0)
    loss = aggregate_loss(per_token, valid, loss_agg, loss_norm, loss_denominator)

    with torch.no_grad():
        has_token = valid.any()
        ratio_max = torch.where(valid, ratio, float("-inf")).amax() if ratio.numel() else zero
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "approx_kl": masked_mean((token_ratio - 1.0) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": torch.where(has_token, ratio_max, zero),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def decoupled_importance_weights(
    proximal_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    stale: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of decoupled PPO (AReaL, Fu et al. 2025, arXiv 2505.24298).

    Formula: w_t = min(exp(proximal_logp_t - behaviour_logp_t), cap) where ``stale_t``, else 1.
    A token sampled by the policy the learner holds (not stale) is on-policy: its behaviour and
    proximal policies are the same weights, so its weight is exactly 1, whatever small numerical
    difference the two log-prob computations have. Returns (weights, truncated) where
    ``truncated`` marks the stale tokens whose raw weight exceeded ``cap``. No gradient.
    Shapes: proximal_logp, behaviour_logp, stale (B, T) -> ((B, T), (B, T) bool).
    """
    with torch.no_grad():
        stale = _as_bool(stale)
        log_w = torch.where(stale, proximal_logp - behaviour_logp, 0.0)
        raw = torch.exp(log_w)
        weights = torch.where(stale, raw.clamp(max=cap), 1.0)
        return weights, stale & (raw > cap)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss, token-level mean over valid tokens.

    Formula (OpenAI baselines PPO2 ``ppo2/model.py``):
        v_clipped = old_values + clamp(values - old_values, -clip_eps, clip_eps)
        loss      = 0.5 * sum_t mask_t * max((values - R)^2, (v_clipped - R)^2) / D
    with D the valid tokens here, or, given as ``denominator``, the whole minibatch's
    (``aggregate_loss``'s ``token_mean``: the gradient then does not depend on the
    micro-batching).
    The max makes the clip pessimistic: a value update that moves far from ``old_values`` cannot
    reduce the loss beyond what the clipped prediction allows. ``clip_eps=None`` disables
    clipping (loss = 0.5 * masked_mean((values - R)^2)).
    Stats: ``value_clipfrac`` = fraction of valid tokens where the clipped term is strictly larger
    (0 when clipping is disabled).
    Shapes: values, old_values, returns, mask (B, T) -> ((), dict of ()).
    """
    valid = _as_bool(mask)
    returns = returns.detach()
    unclipped = (values - returns).square()
    if clip_eps is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old_values = old_values.detach()
        v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clipped - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), valid)
    loss = 0.5 * aggregate_loss(per_token, valid, "token_mean", 1.0, denominator)
    return loss, {"value_clipfrac": clipfrac.detach()}


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of the variance of the returns explained by the value predictions.

    Formula: ev = 1 - Var[R - V] / Var[R] over valid tokens (1: perfect, 0: no better than a
    constant, < 0: worse). Returns 0 (not NaN) when Var[R] == 0, including when there are fewer
    than two valid tokens. Computed without gradient.
    Shapes: values, returns, mask (B, T) -> () detached.
    Source: OpenAI baselines ``common/math_util.explained_variance``.
    """
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
        return torch.where(var_returns > 0, 1.0 - var_residual / safe, torch.zeros_like(safe))
