"""Per-token KL estimates and KL-penalised token rewards for RLHF."""

from __future__ import annotations

import torch

from .stats import _as_bool

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token single-sample estimate of KL(pi || pi_ref), tokens sampled from pi.

    Formula, with r = ref_logp - logp = log(pi_ref / pi):
        k1 = -r                   (unbiased, can be negative, high variance)
        k2 = 0.5 * r**2           (biased, non-negative, low variance)
        k3 = exp(r) - 1 - r       (unbiased, non-negative, low variance)
    k3 uses ``expm1`` because exp(r) - 1 cancels catastrophically for the small r typical here.
    Shapes: logp, ref_logp (B, T) -> (B, T).
    Source: J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards: a KL penalty on every response token plus the sequence score at the end.

    Formula: kl_t = kl_estimate(logp_t, ref_logp_t) on valid tokens (0 elsewhere);
    rewards_t = -kl_coef * kl_t, plus scores[b] on the last t with response_mask[b, t] == 1.
    The last valid position is found from the mask itself, so left padding, right padding and
    holes all work; a row without valid tokens gets all-zero rewards and no score.
    Shapes: scores (B,), logp / ref_logp / response_mask (B, T) -> (rewards (B, T), kl (B, T)).
    Rewards are targets for GAE, so call this under ``torch.no_grad()`` (it does not detach).
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2;
    Ouyang et al. 2022 (InstructGPT), eq. 2; TRL ``PPOTrainer.compute_rewards``.
    """
    valid = _as_bool(response_mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = torch.where(valid, kl_estimate(logp, ref_logp, estimator), zero)
    rewards = -kl_coef * kl

    seq_len = valid.shape[-1]
    positions = torch.arange(seq_len, device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=-1)  # (B,), -1 for rows with no token
    has_token = last >= 0
    row_score = torch.where(has_token, scores.to(rewards.dtype), zero)
    score_bonus = torch.zeros_like(rewards).scatter(
        -1, last.clamp(min=0).unsqueeze(-1), row_score.unsqueeze(-1)
    )
    return rewards + score_bonus, kl
