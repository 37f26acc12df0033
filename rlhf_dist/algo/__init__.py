"""Pure tensor RLHF/PPO algorithms: masked statistics, log-probs, KL, GAE and PPO losses.

Depends only on torch and the standard library, so it can be imported (and unit-tested) without
ray, deepspeed, transformers or wandb.
"""

from .advantages import gae_advantages
from .kl import kl_estimate, kl_penalized_rewards
from .kl_controller import AdaptiveKLController, FixedKLController
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import decoupled_importance_weights, explained_variance, ppo_policy_loss, value_loss
from .stats import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "decoupled_importance_weights",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "value_loss",
]
