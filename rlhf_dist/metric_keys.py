"""Every metric key the run writes to ``metrics.jsonl`` (and wandb), defined once.

The loops, the SFT/RM stages and evaluation write these keys; ``launch.py``'s end summary,
``report.py`` and the benchmarks read them. The strings are the metrics files' format: changing
one breaks every run directory already written. Imports nothing, so anything may import it.

Use as ``from rlhf_dist import metric_keys as K`` and ``K.REWARD_MEAN``, ``K.time_key("train")``.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- namespaces

ROLLOUT = "rollout"  # what the generators produced and the reward model scored
TRAIN = "train"  # the PPO update: losses, KL, statistics of the learner
EVAL = "eval"  # held-out evaluation (gold score) before PPO and every eval.every steps
TIME = "time"  # seconds per block of a step, the step, and since PPO started
PERF = "perf"  # throughput
SYNC = "sync"  # the policy version and how stale the trained samples were
FAULT = "fault"  # restarts, redone work, skipped steps
POOL = "pool"  # the actor pools: their size, load and resource use
DATA = "data"  # where in the prompt data the run is
ASYNC = "async"  # async mode: the sample queue and what it dropped
SFT = "sft"  # the supervised fine-tuning stage (its rows carry "stage": "sft")
RM = "rm"  # the reward-model stage (its rows carry "stage": "rm")

# The namespaces of PPO rows (wandb plots them against "step"); SFT and RM rows have their own.
PPO_NAMESPACES = (ROLLOUT, TRAIN, EVAL, TIME, PERF, SYNC, FAULT, POOL, DATA, ASYNC)
SUPERVISED_STAGES = (SFT, RM)


def time_key(block: str) -> str:
    """The key of a timed block of a step: ``time_key("generate") == "time/generate"``."""
    return f"{TIME}/{block}"


def stage_key(stage: str, name: str) -> str:
    """A key of the SFT or RM stage: ``stage_key("rm", "eval_accuracy") == "rm/eval_accuracy"``."""
    return f"{stage}/{name}"


def pool_key(pool: str, stat: str) -> str:
    """A pool's resource use: ``pool_key("learner", "rss_mb") == "pool/learner_rss_mb"``."""
    return f"{POOL}/{pool}_{stat}"


def reward_part_key(name: str) -> str:
    """The mean score of one of several combined reward functions (unweighted), by the
    function's name: ``reward_part_key("accuracy") == "rollout/reward_accuracy"``."""
    return f"{ROLLOUT}/reward_{name}"


def in_namespace(key: str, namespace: str) -> bool:
    return key.startswith(f"{namespace}/")


# ----------------------------------------------------------------------------- rollout/
# one step's samples: proxy reward (mean and spread), response length, cut at max length;
# with several reward functions, each one's mean is reward_part_key(<function name>)
REWARD_MEAN = "rollout/reward_mean"
SCORE_STD = "rollout/score_std"
RESPONSE_LENGTH_MEAN = "rollout/response_length_mean"
TRUNCATED_FRAC = "rollout/truncated_frac"
DROPPED_GROUPS = "rollout/dropped_groups"  # rollout.drop_uniform_groups: groups set aside
FILL_ROUNDS = "rollout/fill_rounds"  # rounds of extra sampling it took to fill the step
SAMPLES_TABLE = "rollout/samples"  # wandb only: a table of prompts, responses, rewards
# the sampling engine against the trainer at equal weights (the tokens of the learner's own
# version): |logp_trainer - logp_engine| per token, mean and max; rho = exp(trainer - engine),
# its mean and extremes; the share of tokens ppo.rollout_correction clipped or masked. An HF
# generator reads ~0 (the same forward); vLLM's kernels differ
LOGPROB_DIFF_MEAN = "rollout/logprob_diff_mean"
LOGPROB_DIFF_MAX = "rollout/logprob_diff_max"
ENGINE_RATIO_MEAN = "rollout/engine_ratio_mean"
ENGINE_RATIO_MIN = "rollout/engine_ratio_min"
ENGINE_RATIO_MAX = "rollout/engine_ratio_max"
CORRECTED_FRAC = "rollout/corrected_frac"
# multi-turn rollouts (rollout.env): turns and tool calls per trajectory, tool errors, observations
# cut to rollout.max_observation_tokens, trajectories that failed (a time-out, an error, too many
# invalid calls) or overran (turns or tokens), and of them the time-outs; chunks whose reward
# function ran out of reward.timeout_s
TURNS_MEAN = "rollout/turns_mean"
TOOL_CALLS_MEAN = "rollout/tool_calls_mean"
TOOL_ERRORS = "rollout/tool_errors"
OBSERVATION_TRUNCATIONS = "rollout/observation_truncations"
ENV_FAILURES = "rollout/env_failures"
ENV_TIMEOUTS = "rollout/env_timeouts"
REWARD_TIMEOUTS = "rollout/reward_timeouts"

# ----------------------------------------------------------------------------- train/
# the PPO losses and statistics, means over the step's micro-batches; the value loss, value
# clip fraction, critic grad norm and lr, and explained variance only with a critic
# (ppo.estimator=gae); the KL loss only when ppo.kl_loss_coef > 0 (aggregated like the policy
# loss, before the coefficient)
POLICY_LOSS = "train/policy_loss"
VALUE_LOSS = "train/value_loss"
KL_LOSS = "train/kl_loss"
ENTROPY = "train/entropy"
CLIPFRAC = "train/clipfrac"
APPROX_KL = "train/approx_kl"
RATIO_MEAN = "train/ratio_mean"
RATIO_MAX = "train/ratio_max"
VALUE_CLIPFRAC = "train/value_clipfrac"
# gradient norms (means over optimizer steps), learning rates, optimizer steps per rank
GRAD_NORM = "train/grad_norm"
CRITIC_GRAD_NORM = "train/critic_grad_norm"
LR = "train/lr"
CRITIC_LR = "train/critic_lr"
OPTIMIZER_STEPS = "train/optimizer_steps"
# KL to the reference policy: per token (the one reported), per sequence (what the adaptive
# controller uses) and the coefficient of the KL penalty
KL = "train/kl"
KL_PER_SEQUENCE = "train/kl_per_sequence"
KL_COEF = "train/kl_coef"
# advantages (before whitening), returns (gae: the critic's targets; reinforce_pp*: the
# return-to-go, whitened into the advantage; grpo, dr_grpo and rloo have none) and how well
# the critic explains them
ADVANTAGES_MEAN = "train/advantages_mean"
ADVANTAGES_STD = "train/advantages_std"
RETURNS_MEAN = "train/returns_mean"
EXPLAINED_VARIANCE = "train/explained_variance"
# off-policy (async) samples: the stale share and their importance weights
STALE_TOKEN_FRAC = "train/stale_token_frac"
IS_WEIGHT_MEAN = "train/is_weight_mean"
IS_TRUNCATED_FRAC = "train/is_truncated_frac"

# ----------------------------------------------------------------------------- eval/
# held-out prompts: gold score (mean, standard error), proxy reward, response length, count
GOLD = "eval/gold_score"
GOLD_STDERR = "eval/gold_score_stderr"
EVAL_PROXY_REWARD = "eval/proxy_reward"
EVAL_RESPONSE_LENGTH_MEAN = "eval/response_length_mean"
EVAL_NUM_PROMPTS = "eval/num_prompts"

# ----------------------------------------------------------------------------- time/
# the blocks of a synchronous step, in their order (time_key(block) each)
STEP_BLOCKS = ("generate", "score", "train", "weight_sync")
TIME_GENERATE = "time/generate"
TIME_SCORE = "time/score"
TIME_TRAIN = "time/train"
TIME_WEIGHT_SYNC = "time/weight_sync"
TIME_PHASES = (TIME_GENERATE, TIME_SCORE, TIME_TRAIN, TIME_WEIGHT_SYNC)
TIME_EVAL = "time/eval"  # the evaluation, on the steps that have one
STEP_TIME = "time/step"  # the whole step
ELAPSED = "time/elapsed"  # a clock: seconds since PPO started (not a block of the step)

# ----------------------------------------------------------------------------- perf/
# trained tokens and samples per second of step time; generated tokens per second of
# generation; the share of the step not spent computing in any actor
TOKENS_PER_S = "perf/tokens_per_s"
SAMPLES_PER_S = "perf/samples_per_s"
GENERATE_TOKENS_PER_S = "perf/generate_tokens_per_s"
OVERHEAD_FRAC = "perf/overhead_frac"

# ----------------------------------------------------------------------------- sync/
# the policy version after the step; how many versions behind the trained samples were
VERSION = "sync/version"
STALENESS_MEAN = "sync/staleness_mean"
STALENESS_MAX = "sync/staleness_max"
# what the step's weight sync moved: the synced parameters' bytes (with LoRA the adapters only)
SYNC_BYTES = "sync/bytes"

# ----------------------------------------------------------------------------- fault/
# workers replaced, rollout chunks redone, steps skipped (and why), non-finite losses
RESTARTS = "fault/restarts"
LEARNER_RESTARTS = "fault/learner_restarts"  # learner groups rebuilt from a checkpoint
REDONE_CHUNKS = "fault/redone_chunks"
SKIPPED_STEPS = "fault/skipped_steps"
SKIP_REASON = "fault/skip_reason"  # only on a skipped step's row (a string)
NONFINITE_LOSSES = "fault/nonfinite_losses"

# ----------------------------------------------------------------------------- pool/
# generators in the pool and how evenly the step's chunks spread over them; per-pool resource
# use is pool_key(<learner|rollout|reward|reference>, <rss_mb|cpu_percent|gpu_mem_mb|...>)
NUM_GENERATORS = "pool/num_generators"
CHUNKS_PER_GENERATOR_MIN = "pool/chunks_per_generator_min"
CHUNKS_PER_GENERATOR_MAX = "pool/chunks_per_generator_max"

# ----------------------------------------------------------------------------- data/
# the epoch over the prompts; prompts taken from the data and prompts trained on so far
DATA_EPOCH = "data/epoch"
PROMPTS_CONSUMED = "data/prompts_consumed"
PROMPTS_TRAINED = "data/prompts_trained"

# ----------------------------------------------------------------------------- async/
# samples dropped as too stale (then resampled); samples queued now; the queue's bound
DROPPED_STALE = "async/dropped_stale"
QUEUE_SAMPLES = "async/queue_samples"
QUEUE_MAX = "async/queue_max"

# ----------------------------------------------------------------------------- sft/, rm/
# per training step: loss (RM: pairwise accuracy and margin too), epoch, compute seconds; at the
# end of each epoch the same on the held-out split (eval_*); at the end, records skipped as bad;
# <stage>/step is their x axis in wandb (metrics.jsonl rows carry "step")
SFT_STEP = "sft/step"
SFT_EPOCH = "sft/epoch"
SFT_LOSS = "sft/loss"
SFT_STEP_TIME = "sft/step_time"
SFT_EVAL_LOSS = "sft/eval_loss"
SFT_SKIPPED_RECORDS = "sft/skipped_records"
RM_STEP = "rm/step"
RM_EPOCH = "rm/epoch"
RM_LOSS = "rm/loss"
RM_ACCURACY = "rm/accuracy"
RM_MARGIN = "rm/margin"
RM_STEP_TIME = "rm/step_time"
RM_EVAL_LOSS = "rm/eval_loss"
RM_EVAL_ACCURACY = "rm/eval_accuracy"
RM_EVAL_MARGIN = "rm/eval_margin"
RM_SKIPPED_RECORDS = "rm/skipped_records"
