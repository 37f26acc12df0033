"""Pure tensor RLHF/PPO algorithms: masked statistics, log-probs, KL, GAE and the critic-free
advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++), PPO/GSPO losses and their aggregation.

Depends only on torch and the standard library, so it can be imported (and unit-tested) without
ray, deepspeed, transformers or wandb.
"""

from .advantages import (
    discounted_returns,
    gae_advantages,
    group_relative_scores,
    leave_one_out_scores,
    uniform_groups,
)
from .estimators import (
    CRITIC_FREE_ESTIMATORS,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    Estimator,
    estimator,
    estimator_advantages,
    shaped_scores,
)
from .kl import kl_estimate, kl_penalized_rewards
from .kl_controller import AdaptiveKLController, FixedKLController
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import (
    LOSS_AGG_MODES,
    RATIO_LEVELS,
    aggregate_loss,
    decoupled_importance_weights,
    explained_variance,
    loss_denominator,
    ppo_policy_loss,
    reference_kl_loss,
    value_loss,
)
from .rollout_correction import MIS_LEVELS, ROLLOUT_CORRECTIONS, rollout_correction
from .stats import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "CRITIC_FREE_ESTIMATORS",
    "ESTIMATORS",
    "Estimator",
    "GROUP_ESTIMATORS",
    "LOSS_AGG_MODES",
    "MIS_LEVELS",
    "RATIO_LEVELS",
    "ROLLOUT_CORRECTIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "decoupled_importance_weights",
    "discounted_returns",
    "entropy_from_logits",
    "estimator",
    "estimator_advantages",
    "explained_variance",
    "gae_advantages",
    "group_relative_scores",
    "kl_estimate",
    "kl_penalized_rewards",
    "leave_one_out_scores",
    "uniform_groups",
    "logprobs_from_logits",
    "loss_denominator",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "reference_kl_loss",
    "rollout_correction",
    "shaped_scores",
    "value_loss",
]
