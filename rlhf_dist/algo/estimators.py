"""The advantage estimators as data: one table, read by the config's validation, the learner,
the preflight and the docs.

Every estimator turns a step's scores (one per response) into per-token advantages over the
response tokens. Two kinds:
- ``gae`` learns a critic (a value model) and runs GAE over KL-penalised token rewards;
- the critic-free ones put a *shaped* sequence score on the response's last token, add the
  per-token KL penalty, and take the return over the response (``discounted_returns``): with
  ``kl_coef = 0`` and ``gamma = 1`` the shaped score is broadcast over the response.

A new estimator is one entry of ``ESTIMATORS`` (its shaping function in ``advantages.py``,
its source) plus a test of that function against a plain loop
(``tests/algo/test_algo_critic_free.py``). Nothing else names estimators: the config reads
``needs_critic`` / ``uses_groups``, the learner reads all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .advantages import (
    discounted_returns,
    gae_advantages,
    group_relative_scores,
    leave_one_out_scores,
)
from .kl import kl_penalized_rewards

Shaping = Callable[[torch.Tensor, int, float], torch.Tensor]
"""(scores (B,), group size, std epsilon) -> shaped scores (B,)."""


@dataclass(frozen=True)
class Estimator:
    name: str
    needs_critic: bool
    """A learned value model: the learner builds, trains and checkpoints a critic."""
    uses_groups: bool
    """The baseline compares the samples of one prompt: a group is the
    ``rollout.samples_per_prompt`` (>= 2) consecutive samples of a prompt, each learner rank
    must receive whole groups, and the advantage is the sequence's (``ppo.gamma`` = 1)."""
    whitened: bool
    """``ppo.whiten_advantages`` whitens its advantages over the step's batch (across learner
    ranks); a group estimator is normalised within each group instead (a batch-wide shift
    would push the samples of a group that all scored the same)."""
    whiten_ddof: int
    """The divisor of the whitening variance is N - ``whiten_ddof`` (N: the batch's valid
    tokens): what the estimator's source does. GAE: 1, TRL's ``masked_whiten`` (unbiased);
    REINFORCE++ and its baseline variant: 0, OpenRLHF's advantage normalisation (``/ N``);
    unused where ``whitened`` is false."""
    has_returns: bool
    """Its returns are defined (the critic's targets, or the return-to-go that is whitened into
    the advantage): the learner reports ``train/returns_mean``."""
    shape: Shaping | None
    """The sequence score put on the last token (critic-free); ``None`` for GAE."""
    source: str
    """Where the formula comes from."""
    title: str = ""
    """How a person names the algorithm it makes (the run summary's word): PPO, GRPO, ..."""


def _grpo(scores: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    return group_relative_scores(scores, group_size, scale_by_std=True, eps=eps)


def _centred(scores: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    return group_relative_scores(scores, group_size, scale_by_std=False)


def _rloo(scores: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    return leave_one_out_scores(scores, group_size)


def _identity(scores: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    return scores


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "gae",
            title="PPO",
            needs_critic=True,
            uses_groups=False,
            whitened=True,
            whiten_ddof=1,
            has_returns=True,
            shape=None,
            source='Schulman et al. 2016, "High-Dimensional Continuous Control Using '
            'Generalized Advantage Estimation", eq. 16',
        ),
        Estimator(
            "grpo",
            title="GRPO",
            needs_critic=False,
            uses_groups=True,
            whitened=False,
            whiten_ddof=0,
            has_returns=False,
            shape=_grpo,
            source='Shao et al. 2024, "DeepSeekMath", section 4.1.2: (score - group mean) / '
            "(group std + eps)",
        ),
        Estimator(
            "dr_grpo",
            title="Dr. GRPO",
            needs_critic=False,
            uses_groups=True,
            whitened=False,
            whiten_ddof=0,
            has_returns=False,
            shape=_centred,
            source='Liu et al. 2025, "Understanding R1-Zero-Like Training", section 3.2: '
            "score - group mean (pair it with loss_agg=seq_mean_token_sum)",
        ),
        Estimator(
            "rloo",
            title="RLOO",
            needs_critic=False,
            uses_groups=True,
            whitened=False,
            whiten_ddof=0,
            has_returns=False,
            shape=_rloo,
            source='Ahmadian et al. 2024, "Back to Basics", eq. 7: score - mean of the '
            "prompt's other samples",
        ),
        Estimator(
            "reinforce_pp",
            title="REINFORCE++",
            needs_critic=False,
            uses_groups=False,
            whitened=True,
            whiten_ddof=0,
            has_returns=True,
            shape=_identity,
            source='Hu 2025, "REINFORCE++", section 3: the score, advantages whitened over '
            "the batch",
        ),
        Estimator(
            "reinforce_pp_baseline",
            title="REINFORCE++-baseline",
            needs_critic=False,
            uses_groups=True,
            whitened=True,
            whiten_ddof=0,
            has_returns=True,
            shape=_centred,
            source="OpenRLHF reinforce_baseline: score - group mean, then as reinforce_pp",
        ),
    )
}

DEFAULT_ESTIMATOR = "gae"
"""``ppo.estimator``'s default: PPO with a critic, the RLHF recipe of InstructGPT."""

CRITIC_FREE_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if not e.needs_critic)
"""Advantage estimators that need no value model."""
GROUP_ESTIMATORS = tuple(n for n, e in ESTIMATORS.items() if e.uses_groups)
"""The estimators whose baseline is computed from the other samples of the same prompt."""


def markdown_table() -> str:
    """The table as docs/algorithms.md shows it (a test keeps the page equal to this)."""
    yes = {True: "yes", False: "no"}
    lines = [
        "| `ppo.estimator` | algorithm | critic | groups | whitened over the batch | source |",
        "|---|---|---|---|---|---|",
    ]
    for e in ESTIMATORS.values():
        lines.append(
            f"| `{e.name}` | {e.title} | {yes[e.needs_critic]} | {yes[e.uses_groups]} | "
            f"{yes[e.whitened]} | {e.source} |"
        )
    return "\n".join(lines) + "\n"


def estimator(name: str) -> Estimator:
    """The table's entry for ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {list(ESTIMATORS)}"
        ) from None


def shaped_scores(
    estimator_name: str, scores: torch.Tensor, group_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """The sequence score a critic-free estimator puts on a response's last token (its
    ``shape``). The per-token advantage is then
    ``discounted_returns(kl_penalized_rewards(shaped, ...), mask, gamma)``: the shaped score
    broadcast over the response, plus the return of the per-token KL penalty when kl_coef > 0
    (OpenRLHF ``RemoteExperienceMaker.compute_advantages_and_returns`` does the same: it shapes
    the scores per group, then takes cumulative returns of the KL-penalised rewards).
    Shapes: scores (B,) -> (B,); ``group_size`` is ignored by ``reinforce_pp``."""
    est = ESTIMATORS.get(estimator_name)
    if est is None or est.shape is None:
        raise ValueError(
            f"unknown critic-free estimator {estimator_name!r}; expected {CRITIC_FREE_ESTIMATORS}"
        )
    return est.shape(scores, group_size, eps)


def estimator_advantages(
    est: Estimator,
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    std_eps: float = 1e-6,
    token_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, kl) of one estimator, before any whitening.

    GAE: token rewards ``kl_penalized_rewards(scores, ...)``, then ``gae_advantages`` with the
    critic's ``values`` (required). Critic-free: ``kl_penalized_rewards`` of the shaped score,
    then ``discounted_returns``; the advantages are those returns. Groups are the rows cut
    every ``group_size`` (the caller holds whole groups). ``std_eps`` is GRPO's epsilon.
    ``token_rewards`` (B, T), optional: rewards on given tokens (a multi-turn trajectory's
    turn rewards, on each turn's last sampled token), added to the token rewards before the
    returns: per-turn credit for the estimators with token-level returns (GAE, REINFORCE++).
    Shapes: scores (B,), logp / ref_logp / mask / values (B, T) -> three (B, T).
    No gradient by design: call under ``torch.no_grad()``.
    """
    if est.needs_critic:
        if values is None:
            raise ValueError(f"estimator {est.name!r} needs the critic's values")
        rewards, kl = kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef, kl_estimator)
        if token_rewards is not None:
            rewards = rewards + token_rewards * mask
        adv, returns = gae_advantages(rewards, values, mask, gamma, lam)
        return adv, returns, kl
    shaped = est.shape(scores, group_size, std_eps)
    rewards, kl = kl_penalized_rewards(shaped, logp, ref_logp, mask, kl_coef, kl_estimator)
    if token_rewards is not None:
        rewards = rewards + token_rewards * mask
    adv = discounted_returns(rewards, mask, gamma)
    return adv, adv, kl
