"""Generalized Advantage Estimation over padded token sequences."""

from __future__ import annotations

import torch

from .stats import _as_bool


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets, per row, over the valid tokens only.

    Formula, walking each row backwards over the positions where mask == 1:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t
    where "next" is the next valid position in the same row, and V_next = A_next = 0 after the
    last valid token (the episode ends with the response). Masked positions are skipped entirely
    (their rewards and values are ignored), so left padding, right padding and holes give the same
    result on the valid tokens; masked outputs are 0.
    gamma = lam = 1 gives A_t = sum_{k >= t} r_k - V_t (Monte-Carlo return minus baseline);
    lam = 0 gives the one-step TD error A_t = delta_t.
    Shapes: rewards, values, mask (B, T) -> (advantages (B, T), returns (B, T)).
    Targets carry no gradient by design: call under ``torch.no_grad()`` or pass detached inputs.
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eq. 16; TRL ``PPOTrainer.compute_advantages``, OpenRLHF
    ``get_advantages_and_returns`` (which instead assume right padding).
    """
    valid = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = values.new_zeros(values.shape[:-1])
    next_adv = values.new_zeros(values.shape[:-1])
    advantages_rev = []
    # A Python loop over T is inherent to the recursion; it is vectorised over the batch.
    for t in reversed(range(values.shape[-1])):
        m = valid[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        adv = delta + gamma * lam * next_adv
        advantages_rev.append(torch.where(m, adv, zero))
        # Carry state only through valid positions, which is what skips padding and holes.
        next_value = torch.where(m, values[..., t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    if advantages_rev:
        advantages = torch.stack(advantages_rev[::-1], dim=-1)
    else:
        advantages = torch.zeros_like(values)
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


# ----------------------------------------------------------------------------- critic-free


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / G, G): row g holds samples g*G .. g*G + G - 1 (one prompt's group)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare samples, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"{scores.shape[0]} scores do not split into whole groups of {group_size}: a group "
            f"must be the consecutive samples of one prompt"
        )
    return scores.reshape(-1, group_size)


def group_relative_scores(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Each score relative to the other samples of its prompt: GRPO and Dr. GRPO.

    Groups are contiguous: samples i*G .. i*G + G - 1 are the G samples of one prompt (the
    generator repeats each prompt G times consecutively). Formula, per group g:
        mean_g = (1/G) sum_j r_j,   std_g = sqrt(sum_j (r_j - mean_g)^2 / (G - 1))
        A_i = (r_i - mean_g) / (std_g + eps)     if ``scale_by_std``   (GRPO)
        A_i =  r_i - mean_g                      otherwise             (Dr. GRPO)
    A group whose samples all score the same gets A = 0 (no signal), never NaN.
    The std is Bessel-corrected (``torch.std``) as in veRL ``compute_grpo_outcome_advantage``,
    OpenRLHF ``group_norm`` and TRL ``GRPOTrainer``; eps = 1e-6 is veRL's (OpenRLHF uses 1e-9,
    TRL 1e-4). The centred form without the division is also the REINFORCE++-baseline shaping
    of the score (OpenRLHF ``reinforce_baseline``).
    Shapes: scores (B,) with B divisible by G >= 2 -> (B,).
    Source: Shao et al. 2024, "DeepSeekMath" (GRPO), section 4.1.2, outcome supervision;
    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO),
    section 3.2: the division by std_g biases towards too easy and too hard questions.
    """
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=-1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each score minus the mean of the *other* samples of its prompt.

    Formula, per group g of G contiguous samples:
        A_i = r_i - (1/(G-1)) sum_{j != i} r_j  =  G/(G-1) * (r_i - mean_g)
    (the baseline of each sample is independent of that sample, so the estimate is unbiased).
    Computed as in the first form, like OpenRLHF's ``rloo``; veRL uses the second.
    Shapes: scores (B,) with B divisible by G >= 2 -> (B,).
    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", eq. 7 (after Kool et al. 2019).
    """
    g = _groups(scores, group_size)
    others = (g.sum(dim=-1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def uniform_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which prompts' groups carry no learning signal: all their samples scored the same.

    Formula, per group g of G contiguous samples: uniform_g = (max_j r_j == min_j r_j).
    Under a group baseline every advantage of such a group is 0 (GRPO, Dr. GRPO, RLOO and the
    REINFORCE++ baseline all subtract the group mean), so it only dilutes the batch; DAPO's
    dynamic sampling drops these groups and samples more prompts to fill the batch.
    Shapes: scores (B,) with B divisible by G >= 2 -> (B / G,) bool.
    Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    section 3.2 (dynamic sampling: keep groups with 0 < accuracy < 1).
    """
    g = _groups(scores, group_size)
    return g.amax(dim=-1) == g.amin(dim=-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE returns-to-go over the valid tokens of each row.

    Formula, walking each row backwards over the positions where mask == 1:
        G_t = r_t + gamma * G_next,   G_next = 0 after the last valid token.
    Masked positions are skipped (their rewards ignored, output 0), as in ``gae_advantages``;
    it equals ``gae_advantages(rewards, 0, mask, gamma, 1)``. With token rewards from
    ``kl_penalized_rewards`` (score on the last token, -kl_coef * kl_t on every token) and
    gamma = 1: G_t = score - kl_coef * sum_{s >= t} kl_s; with kl_coef = 0 the score is
    broadcast over the response.
    Shapes: rewards, mask (B, T) -> (B, T). No gradient by design (targets).
    Source: Williams 1992 (REINFORCE); Hu 2025, "REINFORCE++", section 3 (token-level KL
    penalty in the return); OpenRLHF ``get_cumulative_returns``, veRL
    ``compute_reinforce_plus_plus_outcome_advantage`` (both assume right padding).
    """
    valid = _as_bool(mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    running = rewards.new_zeros(rewards.shape[:-1])
    out = []
    for t in reversed(range(rewards.shape[-1])):
        m = valid[..., t]
        running = torch.where(m, rewards[..., t] + gamma * running, running)
        out.append(torch.where(m, running, zero))
    return torch.stack(out[::-1], dim=-1) if out else torch.zeros_like(rewards)
