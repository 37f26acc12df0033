"""PPO policy / value losses and the explained-variance diagnostic."""

from __future__ import annotations

import torch

from .stats import _as_bool, masked_mean, masked_var


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, token-level mean over the valid tokens of the batch.

    Formula (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7):
        ratio_t = exp(logp_t - old_logp_t)
        l_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)
        l_t    *= w_t                       (optional ``importance_weights``, detached)
        loss    = sum_t mask_t * l_t / sum_t mask_t
    ``clip_eps_high`` defaults to ``clip_eps`` (a larger value is the asymmetric "clip-higher" of
    DAPO, Yu et al. 2025). ``importance_weights`` are the behaviour -> proximal policy weights of
    decoupled PPO (AReaL, Fu et al. 2025, arXiv 2505.24298): they scale the loss, get no gradient.
    Stats (detached 0-dim tensors, over valid tokens):
        clipfrac  = mean(1[-A * clip(ratio) > -A * ratio]): fraction of tokens where the clipped
                    term strictly wins the min, i.e. where the clip is active and the token's
                    gradient is zero (verl's ``pg_clipfrac``; rather than baselines'
                    mean(|ratio - 1| > clip_eps), which also counts tokens the clip does not affect)
        approx_kl = mean((ratio - 1) - log ratio)   (k3 estimate of KL(old || new))
        ratio_mean, ratio_max                      (ratio_max is 0 if there are no valid tokens)
    Shapes: logp, old_logp, advantages, mask, importance_weights (B, T) -> ((), dict of ()).
    """
    valid = _as_bool(mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Zero padding before exp: where() alone would still back-propagate 0 * inf = NaN through
    # an overflowing ratio computed from garbage in padded positions.
    log_ratio = torch.where(valid, logp - old_logp, zero)
    advantages = torch.where(valid, advantages.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        per_token = per_token * torch.where(valid, importance_weights.detach(), 0.0)
    loss = masked_mean(per_token, valid)

    with torch.no_grad():
        has_token = valid.any()
        ratio_max = torch.where(valid, ratio, float("-inf")).amax() if ratio.numel() else zero
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, valid),
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss, token-level mean over valid tokens.

    Formula (OpenAI baselines PPO2 ``ppo2/model.py``):
        v_clipped = old_values + clamp(values - old_values, -clip_eps, clip_eps)
        loss      = 0.5 * masked_mean(max((values - R)^2, (v_clipped - R)^2))
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
    loss = 0.5 * masked_mean(per_token, valid)
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
