"""What the learner's PPO update works on, and the metrics it reports (no ray, no deepspeed).

``Experience`` is one learner rank's shard of a step once prepared (as OpenRLHF's
``Experience``): the samples with the old log-probs recomputed, the advantages and returns of
the estimator, and the decoupled-PPO weights in async mode. ``learner_metrics`` turns the
statistics the minibatch loop summed (over micro-batches, then over ranks) into the
``train/`` metrics, every key a ``metric_keys`` constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_dist import metric_keys as K


@dataclass
class Experience:
    sequences: Tensor  # (B, P + R) long
    attention_mask: Tensor  # (B, P + R)
    mask: Tensor  # (B, R) float, 1 on response tokens
    prompt_len: int  # P
    old_logp: Tensor  # (B, R) the policy's log-probs before the update (the proximal policy)
    ref_logp: Tensor  # (B, R) the reference policy's
    advantages: Tensor  # (B, R) as trained on (whitened where the estimator says)
    raw_advantages: Tensor  # (B, R) before whitening (reported)
    returns: Tensor  # (B, R) the critic's targets, or the critic-free return-to-go
    kl: Tensor  # (B, R) the KL estimate in the reward
    scores: Tensor  # (B,)
    old_values: Tensor | None  # (B, R) the critic's values before the update (gae only)
    stale: Tensor  # (B, R) bool: a token sampled by an older policy than the learner's
    is_weights: Tensor | None = None  # (B, R) decoupled-PPO weights (async mode only)
    is_truncated: Tensor | None = None  # (B, R) bool: a stale token whose weight hit the cap
    loss_weights: Tensor | None = None  # (B, R) what the policy loss is weighted by, if any
    correction: dict | None = None  # engine/trainer mismatch stats (algo.rollout_correction)
    fresh_tokens: float = 0.0  # the valid tokens of the learner's own version (its stats')
    trained: Tensor | None = None  # (B,) long: the passes of the minibatch loop that trained it

    def __post_init__(self):
        if self.trained is None:
            self.trained = torch.zeros(self.sequences.shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.sequences.shape[0]


# statistics the minibatch loop sums per micro-batch weighed by its tokens, reported as token
# means over everything the update trained (every pass, micro-batch and rank), so they do not
# depend on the micro-batching or the world size
TOKEN_MEANS = {
    "entropy": K.ENTROPY,
    "clipfrac": K.CLIPFRAC,
    "approx_kl": K.APPROX_KL,
    "ratio_mean": K.RATIO_MEAN,
    "value_clipfrac": K.VALUE_CLIPFRAC,
}
# the losses: each micro-batch's share of its minibatch's loss, summed over micro-batches and
# ranks (each minibatch's loss), reported as the mean over the minibatches (optimizer steps)
MINIBATCH_LOSSES = {
    "policy_loss": K.POLICY_LOSS,
    "value_loss": K.VALUE_LOSS,
    "kl_loss": K.KL_LOSS,
}


def learner_metrics(t: dict[str, float], world_size: int, kl_coef: float, returns: bool) -> dict:
    """The update's metrics from ``t``, the statistics summed over every micro-batch of every
    rank. ``returns``: the estimator's returns are defined (``Estimator.has_returns``). The
    critic's metrics appear where the critic's statistics do (``ev_res_sq``), the decoupled
    PPO ones where its weights do (``is_weight_sum``)."""
    opt_n, tok = max(t["optimizer_steps"], 1.0), max(t["tokens"], 1)
    adv_mean = t["adv_sum"] / tok
    stat_tok = max(t["stat_tokens"], 1.0)
    metrics = {key: t[name] / stat_tok for name, key in TOKEN_MEANS.items() if name in t}
    steps = opt_n / world_size  # minibatches trained (every rank steps each one)
    metrics.update({key: t[n] / steps for n, key in MINIBATCH_LOSSES.items() if n in t})
    metrics.update(
        {
            K.GRAD_NORM: t["grad_norm"] / opt_n,
            K.KL: t["kl_sum"] / tok,
            K.KL_PER_SEQUENCE: t["kl_sum"] / t["sequences"],
            K.KL_COEF: kl_coef,
            K.ADVANTAGES_MEAN: adv_mean,
            K.ADVANTAGES_STD: math.sqrt(max(t["adv_sq_sum"] / tok - adv_mean**2, 0.0)),
            K.OPTIMIZER_STEPS: t["optimizer_steps"] / world_size,
            K.NONFINITE_LOSSES: t["nonfinite_losses"],
            K.STALE_TOKEN_FRAC: t["stale_tokens"] / tok,
        }
    )
    fresh = max(t["fresh_tokens"], 1.0)
    metrics[K.LOGPROB_DIFF_MEAN] = t["diff_sum"] / fresh
    metrics[K.ENGINE_RATIO_MEAN] = t["rho_sum"] / fresh if t["fresh_tokens"] else 1.0
    metrics[K.CORRECTED_FRAC] = t["corrected"] / fresh
    if returns:
        metrics[K.RETURNS_MEAN] = t["returns_sum"] / tok
    if "ev_res_sq" in t:
        ret_mean = t["returns_sum"] / tok
        ret_var = t["ret_sq"] / tok - ret_mean**2
        metrics[K.CRITIC_GRAD_NORM] = t["critic_grad_norm"] / opt_n
        metrics[K.EXPLAINED_VARIANCE] = (
            1.0 - (t["ev_res_sq"] / tok) / ret_var if ret_var > 0 else 0.0
        )
    if "is_weight_sum" in t:
        n_stale = max(t["stale_tokens"], 1.0)
        stale = t["stale_tokens"]
        metrics[K.IS_WEIGHT_MEAN] = t["is_weight_sum"] / n_stale if stale else 1.0
        metrics[K.IS_TRUNCATED_FRAC] = t["is_truncated"] / n_stale
    return metrics
