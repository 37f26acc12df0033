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
