"""Rollout correction: the sampling engine's log-probs differ from the trainer's, even at equal
weights (other kernels, bf16, fused ops; a peer measured ~0.01 nats per token typical with
vLLM), so the samples are slightly off-policy for the trainer. The learner recomputes the old
log-probs with its own forward (the PPO ratio's denominator), and these corrections weigh or
mask each token by how far the engine's probability was from the trainer's.

With rho_t = exp(logp_trainer_t - logp_engine_t) on the valid tokens (the trainer's old
log-prob over the engine's behaviour log-prob of the sampled token):
- ``tis``: truncated importance sampling, w_t = min(rho_t, C) (Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training", the TIS note; C = 2);
- ``mis``: masked importance sampling at the sequence level: a sequence whose ratio leaves
  [low, high] is left out of the policy loss whole; its ratio is the product of its tokens'
  rho_t (``level="product"``) or their geometric mean, exp(mean_t log rho_t)
  (``level="geometric"``, the default: it does not scale with length); veRL's rollout
  correction (``rollout_is`` with a sequence-level mask);
- ``icepop``: w_t = rho_t inside [low, high] = [0.5, 5], and 0 outside, both sides: the
  tokens whose probabilities the two engines disagree on most are masked, the rest weighted
  (IcePop, Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for
  Trillion-Scale Thinking Model", arXiv 2510.18855: M(k) = k on [alpha, beta], 0 outside).
A weight multiplies the token's policy loss (it carries no gradient); a masked token gets
weight 0: it adds nothing to the gradient and still counts in the loss's denominator, so
masking does not scale the other tokens up.
"""

from __future__ import annotations

import torch

from .stats import _as_bool

ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "icepop")
MIS_LEVELS = ("geometric", "product")


def rollout_correction(
    mode: str,
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    tis_cap: float = 2.0,
    mis_low: float = 0.5,
    mis_high: float = 2.0,
    mis_level: str = "geometric",
    icepop_low: float = 0.5,
    icepop_high: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weights of ``mode`` (see the module docstring) and the mismatch statistics.

    Returns (weights (B, T): 1 where nothing is corrected and on padding, detached; stats):
        logprob_diff_mean / _max  mean and max |logp_trainer - logp_engine| over valid tokens
        ratio_mean / _min / _max  of rho_t over valid tokens
        corrected_frac            share of valid tokens clipped (tis: rho_t > C) or masked
                                  (mis, icepop: weight 0)
    Shapes: trainer_logp, engine_logp, mask (B, T) -> ((B, T), dict of ()).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; expected {ROLLOUT_CORRECTIONS}")
    if mis_level not in MIS_LEVELS:
        raise ValueError(f"unknown MIS level {mis_level!r}; expected {MIS_LEVELS}")
    with torch.no_grad():
        valid = _as_bool(mask)
        zero = torch.zeros((), dtype=trainer_logp.dtype, device=trainer_logp.device)
        log_rho = torch.where(valid, trainer_logp - engine_logp, zero)
        rho = torch.exp(log_rho)
        ones = torch.ones_like(rho)
        if mode == "tis":
            weights = torch.where(valid, rho.clamp(max=tis_cap), ones)
            corrected = valid & (rho > tis_cap)
        elif mode == "mis":
            n = valid.sum(-1).clamp(min=1)
            seq_log = log_rho.sum(-1) if mis_level == "product" else log_rho.sum(-1) / n
            seq = torch.exp(seq_log)
            keep = (seq >= mis_low) & (seq <= mis_high)
            weights = torch.where(valid & ~keep[:, None], zero, ones)
            corrected = valid & ~keep[:, None]
        elif mode == "icepop":
            keep = (rho >= icepop_low) & (rho <= icepop_high)
            weights = torch.where(valid, torch.where(keep, rho, zero), ones)
            corrected = valid & ~keep
        else:
            weights, corrected = ones, torch.zeros_like(valid)
        stats = _stats(log_rho, rho, corrected, valid)
    return weights, stats


def _stats(log_rho, rho, corrected, valid) -> dict[str, torch.Tensor]:
    zero = torch.zeros((), dtype=rho.dtype, device=rho.device)
    n = valid.sum().clamp(min=1)
    diff = log_rho.abs()
    has = valid.any()
    return {
        "logprob_diff_mean": torch.where(valid, diff, zero).sum() / n,
        "logprob_diff_max": torch.where(has, torch.where(valid, diff, zero).amax(), zero),
        "ratio_mean": torch.where(valid, rho, zero).sum() / n,
        "ratio_min": torch.where(has, torch.where(valid, rho, float("inf")).amin(), zero + 1),
        "ratio_max": torch.where(has, torch.where(valid, rho, float("-inf")).amax(), zero + 1),
        "corrected_frac": corrected.sum() / n,
    }
