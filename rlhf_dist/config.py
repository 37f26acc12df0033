"""One typed config tree for a whole job.

Loaded from a YAML file plus ``section.key=value`` overrides (values parsed as YAML, so
``ppo.epochs=2`` is an int and ``run.name=foo`` a string). Unknown keys, wrong types and
sizes that do not divide are refused with a :class:`ConfigError` that names the key.
Validation never rewrites a value the user set; derived sizes live in :class:`Sizes`.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_dist.algo.estimators import DEFAULT_ESTIMATOR, ESTIMATORS


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key at fault."""


@dataclass
class RunConfig:
    name: str = "ppo"
    """Run name: the run directory is ``<dir>`` or ``runs/<name>-<timestamp>``."""
    dir: str = ""
    """Run directory; empty means ``runs/<name>-<timestamp>``."""
    seed: int = 0
    """Seed for data order, sampling and model init."""
    steps: int = 10
    """Number of PPO steps (one step = generate, score, update, sync)."""
    resume: Literal["no", "auto"] = "no"
    """auto: continue from the latest good checkpoint in ``run.dir`` (stages already done are
    not rerun); ``launch.py --resume <run_dir>`` sets this and ``run.dir``."""
    max_bad_steps: int = 3
    """Stop after this many consecutive PPO steps skipped for non-finite numbers."""
    max_restarts: int = 20
    """Lost generators and scorers (process killed, node lost) are replaced and their
    unfinished work redone; the run stops after this many replacements."""
    ledger: bool = True
    """Write ``samples.jsonl``: one line per sample a PPO step took (its data row, chunk,
    generator, policy version, reward, ...; see ``rlhf_dist/ledger.py``)."""
    stage: Literal["sft", "rm", "ppo", "all"] = "ppo"
    """What to run: one stage of the RLHF recipe, or all of them in order (``all``: SFT, the
    reward model when PPO uses it, i.e. ``reward.model``, ``model.policy`` or
    ``model.critic`` is ``run:rm``, then PPO). A stage run alone reuses earlier stages'
    outputs from ``run.dir`` (``run:sft``, ``run:rm``)."""

    def check(self, cfg: Config) -> None:
        _need("run", self, "steps", "max_bad_steps")
        _need("run", self, "seed", "max_restarts", allow_zero=True)


@dataclass
class SupervisedConfig:
    """What the two supervised stages share; the defaults are SFT's."""

    data: str = "builtin:describe"
    """Training data (any source ``data.prompts`` takes, split ``data.split``), or a built-in
    task: for SFT demonstrations ``{"prompt": ..., "response": ...}`` or whole conversations
    ``{"messages": [...]}`` (trained on the assistant turns); for the reward model comparisons
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``, or HH-style transcripts
    ``{"chosen", "rejected"}`` split at their common prefix. Fields may hold chat messages (a
    built-in task's gold labeler labels pairs of demonstrations, with noise)."""
    init: str = "builtin:describe"
    """Model the stage starts from (path or hub id, a built-in task, or ``run:<stage>``); the
    reward model gets a fresh scalar head."""
    epochs: int = 3
    """Passes over the data."""
    batch_size: int = 64
    """Examples (SFT) or pairs (RM) per optimizer step, across all learner ranks."""
    micro_batch_size: int = 32
    """Examples or pairs per forward/backward on one rank."""
    lr: float = 1e-3
    """AdamW learning rate."""
    eval_frac: float = 0.05
    """Fraction of the data held out (``sft/eval_loss``, ``rm/eval_accuracy``)."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed lines of ``data`` instead of refusing the file."""
    lora_rank: int = 0
    """LoRA rank of the adapters this stage trains (``peft``); 0 = off: every weight trains."""
    lora_alpha: float = 0.0
    """LoRA scale numerator (the update is ``alpha / rank * B @ A``); 0 = twice the rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Names (or name suffixes) of the layers that get adapters; empty = every linear layer
    but the output head."""

    def check(self, stage: str, cfg: Config) -> None:
        """Positive sizes; the batch split over the ranks when this run goes through the
        stage (sizes of a stage it does not run are not held against it)."""
        _need(stage, self, "epochs", "batch_size", "micro_batch_size", "lr")
        if cfg.run.stage not in (stage, "all"):
            return
        key = f"{stage}.batch_size"
        workers = cfg.learner.num_workers
        per_rank = _divides(key, self.batch_size, "learner.num_workers", workers)
        _divides(
            f"{key} / learner.num_workers",
            per_rank,
            f"{stage}.micro_batch_size",
            self.micro_batch_size,
        )
        if not 0 <= self.eval_frac < 1:
            raise ConfigError(f"{stage}.eval_frac: must be in [0, 1), got {self.eval_frac}")


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning of the policy on demonstrations."""


@dataclass
class RMConfig(SupervisedConfig):
    """Reward-model training on comparisons (Bradley-Terry); its own defaults below."""

    init: str = "run:sft"
    """Model the reward model starts from, e.g. the SFT policy."""
    epochs: int = 2
    """Passes over the comparisons."""
    lr: float = 5e-4
    """AdamW learning rate."""
    eval_frac: float = 0.1
    """Fraction of the comparisons held out to report ``rm/eval_accuracy``."""


@dataclass
class EvalConfig:
    gold: str = ""
    """Gold scorer ``module:function(prompts, responses) -> list[float]`` that evaluates the
    policy on held-out prompts (never used for training); empty = no evaluation."""
    prompts: str = ""
    """Held-out prompts (JSONL like ``data.prompts``, or a built-in task); empty = ``data.prompts``."""
    every: int = 5
    """Evaluate before PPO, every this many steps, and after the last step."""
    num_prompts: int = 128
    """Held-out prompts per evaluation (one sample each, fixed seed)."""

    def check(self, cfg: Config) -> None:
        _need("eval", self, "every", "num_prompts")


@dataclass
class ModelConfig:
    policy: str = "builtin:tiny"
    """Policy: a local HF model directory or hub id (``AutoModelForCausalLM``). ``builtin:tiny``
    builds a tiny GPT-2 and its tokenizer locally (offline) into ``assets_dir``."""
    tokenizer: str = ""
    """Tokenizer path; empty means the policy's."""
    critic: str = ""
    """Value model init (``AutoModelForTokenClassification``, 1 label); empty means the policy.
    Only ``ppo.estimator=gae`` has a critic."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of every model (bf16 is what GPUs want; fp32 is exact on CPU)."""
    assets_dir: str = "runs/_assets"
    """Where ``builtin:*`` models and tokenizers are built (reused when already there)."""
    lora_rank: int = 0
    """LoRA rank of the policy's adapters (``peft``); 0 = off, every weight trains. With
    LoRA the learner trains, checkpoints and syncs only the adapters; the generators apply
    them to their frozen copy of the base."""
    lora_alpha: float = 0.0
    """LoRA scale numerator (the update is ``alpha / rank * B @ A``); 0 = twice the rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input while training (PPO runs the model in eval mode, so
    it acts in the SFT and RM stages only)."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Names (or name suffixes) of the layers that get adapters; empty = every linear layer
    but the output head."""
    critic_lora_rank: int = 0
    """LoRA rank of the critic's adapters (``ppo.estimator=gae``); 0 = off. Its fresh value
    head always trains in full."""
    critic_lora_alpha: float = 0.0
    """The critic's LoRA scale numerator; 0 = twice ``critic_lora_rank``."""
    critic_lora_dropout: float = 0.0
    """Dropout on the critic's adapters' input while training."""
    critic_lora_target_modules: list[str] = field(default_factory=list)
    """The critic's layers that get adapters; empty = every linear layer but the head."""

    def check(self, cfg: Config) -> None:
        if not self.policy:
            raise ConfigError("model.policy: must name a model directory, hub id or builtin:tiny")


@dataclass
class DataConfig:
    prompts: str = "builtin:tiny"
    """Prompt source: a JSONL file with one object per line, a JSON, CSV, parquet or arrow
    file, a folder written by ``datasets``' ``save_to_disk``, a Hugging Face hub dataset id
    (with ``data.split``), or a built-in task (``builtin:tiny``)."""
    prompt_key: str = "prompt"
    """Field (column) of each row that holds the prompt: a string or a list of
    ``{role, content}`` messages. Every other field travels with the row to the reward
    functions."""
    split: str = "train"
    """Split of a hub dataset or of a saved ``DatasetDict`` folder (also for ``sft.data`` and
    ``rm.data``); a slice such as ``train[:1000]`` works for hub datasets and files."""
    eval_split: str = ""
    """Split of ``eval.prompts`` when it is a hub dataset or a ``DatasetDict`` folder; empty =
    ``data.split``."""
    chat_template: Literal["auto", True, False] = "auto"
    """``auto``: render message lists with the tokenizer's chat template when it has one
    (plain ``role: content`` lines when not); ``true``: always (a string is one user turn; a
    tokenizer without a template is refused); ``false``: never. The policy's own template
    renders prompts (with the generation prompt); the reward model renders the conversation
    with its own tokenizer's template; SFT trains on the assistant turns only."""
    shuffle: bool = True
    """Reshuffle prompts every epoch (seeded by ``run.seed``)."""


@dataclass
class AutoscaleConfig:
    max_workers: int = 0
    """Upper bound on generators; 0 = autoscaling off."""
    generate_frac: float = 0.5
    """Add one generator after a step whose generation took more than this fraction of the
    step time (and the cluster has room for one more)."""
    cooldown_steps: int = 2
    """Steps to wait after a change before the rule is applied again."""

    def check(self, cfg: Config) -> None:
        if not self.max_workers:
            return
        key = "rollout.autoscale"
        if self.cooldown_steps < 0:
            raise ConfigError(f"{key}.cooldown_steps: must be >= 0, got {self.cooldown_steps}")
        if self.max_workers < cfg.rollout.num_workers:
            raise ConfigError(
                f"{key}.max_workers={self.max_workers} is below "
                f"rollout.num_workers={cfg.rollout.num_workers} (0 turns autoscaling off)"
            )
        if not 0 < self.generate_frac < 1:
            raise ConfigError(f"{key}.generate_frac: must be in (0, 1), got {self.generate_frac}")
        if cfg.mode == "async":
            raise ConfigError(
                f"{key}.max_workers: autoscaling reads the share of a synchronous step spent "
                f"generating; with mode=async set it to 0 and size rollout.num_workers"
            )


POOL_SECTIONS = ("learner", "rollout", "reward", "reference")
"""The config sections that are pools of Ray actors (each a :class:`PoolConfig`)."""


@dataclass
class PoolConfig:
    """A pool of identical Ray actors: how many, and what each one is given. The four pool
    sections (``POOL_SECTIONS``) are these fields with defaults of their own
    (``pool_section``) plus their own settings."""

    num_workers: int = 1
    """Number of actors in the pool (learner: data-parallel DeepSpeed ranks, called
    ``learner.world_size`` before)."""
    num_cpus: float = 1.0
    """CPUs per actor."""
    num_gpus: float = 0.0
    """GPUs per actor (learner: 0 = CPU with gloo, > 0 = CUDA with NCCL)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Ray custom resources per actor, e.g. ``{rollout_node: 1}``: places the pool on the
    nodes that offer them (``ray start --resources '{"rollout_node": 8}'``)."""

    def check_pool(self, section: str) -> None:
        """A positive number of workers, each asking for something Ray can place."""
        _need(section, self, "num_workers")
        _need(section, self, "num_cpus", "num_gpus", allow_zero=True)
        for res, amount in self.resources.items():
            if res in ("CPU", "GPU", "memory") or not amount > 0 or not math.isfinite(amount):
                raise ConfigError(
                    f"{section}.resources.{res}: must be a custom resource with an amount > 0 "
                    f"(CPUs and GPUs are {section}.num_cpus / num_gpus), got {amount}"
                )
        if not (self.num_cpus > 0 or self.num_gpus > 0 or self.resources):
            raise ConfigError(
                f"{section}.num_cpus: a worker must be given some CPU, GPU or custom resource "
                f"({section}.num_cpus, {section}.num_gpus and {section}.resources are all empty)"
            )


def pool_section(*, num_workers: int, num_cpus: float):
    """Class decorator: a dataclass section that is a pool (a ``PoolConfig``) with its own
    defaults for ``num_workers`` and ``num_cpus``; the fields stay declared once, in
    ``PoolConfig``."""

    def wrap(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {"num_workers": "int", "num_cpus": "float", **own}
        cls.num_workers, cls.num_cpus = num_workers, num_cpus
        return dataclass(cls)

    return wrap


@pool_section(num_workers=2, num_cpus=0.5)
class RolloutConfig(PoolConfig):
    """The generators (rollout workers)."""

    prompts_per_step: int = 8
    """Prompts sampled per PPO step. They are cut into chunks of ``chunk_prompts`` and dealt
    by load: each generator takes the next chunk when it finishes one, so a slow or busy
    worker gets less."""
    chunk_prompts: int = 0
    """Prompts per chunk (one ``generate`` call); 0 = one chunk per configured generator (the
    fewest calls, each as large as it can be; a lost generator's chunk is still redone by
    another; set it smaller for finer load balancing between uneven generators). Each chunk
    is sampled with a seed of its own, so which generator takes it, and how many generators
    there are, does not change the samples."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt."""
    max_prompt_tokens: int = 64
    """Longest prompt accepted (tokens); longer prompts are refused up front."""
    max_new_tokens: int = 16
    """Response length limit (tokens)."""
    temperature: float = 1.0
    """Sampling temperature; behaviour log-probs are those of ``logits / temperature``."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """The generators' engine: ``hf`` (transformers ``generate``), ``vllm`` (vLLM, one
    in-process engine per generator; ``make vllm`` installs it), or ``auto``: vLLM where it is
    installed and the generators have GPUs (``num_gpus > 0``), HF otherwise (on CPU vLLM
    samples 1.7x faster at 135M and runs even on small models, ``benchmarks/engines.py``; HF
    keeps a synchronous run's weight sync zero copy: docs/engines.md)."""
    vllm_kv_cache_gb: float = 1.0
    """With the vLLM engine: the KV cache each generator's engine holds (GiB, on its device)."""
    drop_uniform_groups: bool = False
    """DAPO's dynamic sampling: drop the prompts whose ``samples_per_prompt`` samples all got
    the same reward (under a group baseline they teach nothing), and sample more prompts
    until the step holds ``prompts_per_step`` prompts with differing rewards. Dropped groups
    are counted (``rollout/dropped_groups``) and recorded in the sample ledger. Sync mode."""
    max_fill_rounds: int = 8
    """With ``drop_uniform_groups``: rounds of extra sampling a step may take to fill its
    batch; past them the run stops, saying the rewards give no signal on this data."""
    autoscale: AutoscaleConfig = field(default_factory=lambda: AutoscaleConfig())
    """Grow the pool while generation dominates the step."""
    env: str = ""
    """Multi-turn, tool-using rollouts: the environment class ``module:Class`` (subclass of
    ``rlhf_dist.envs.base.Env``: ``reset(row)`` gives the starting conversation, ``step(text)``
    answers each turn with (observation, reward, done, info); one instance per trajectory), or
    ``builtin:calc``. Empty = single-turn: one response per sample. With an environment,
    ``max_new_tokens`` caps one turn, and the trajectory's tokens are kept as sampled (token in,
    token out; observations appended as their template's tokens, never re-rendered)."""
    tools: str = ""
    """Multi-turn with plain Python functions as tools, no environment class to write:
    ``module:function,module:function`` (type-hinted, with docstrings: the chat template
    renders them). Each turn's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    blocks run and their results come back as ``tool`` messages; a turn without a call is the
    final answer, scored by ``reward.function`` or the reward model. Not with ``env`` (an
    environment lists its tools in its class's ``tools``)."""
    max_turns: int = 4
    """With ``env``: the turns a trajectory may take; one still going after them is ended as
    an overrun (``on_env_failure``)."""
    max_total_tokens: int = 256
    """With ``env``: tokens after the prompt (sampled and observation) a trajectory may hold."""
    max_observation_tokens: int = 128
    """With ``env``: an observation's content is cut to this many tokens (counted)."""
    env_timeout_s: float = 30.0
    """With ``env``: seconds a ``reset`` or ``step`` may take; past it the trajectory ends as
    failed (a tool that hangs costs its trajectory, never the run)."""
    max_invalid_tool_calls: int = 2
    """With ``env``: invalid tool calls in a row (the environment's ``info["invalid"]``) a
    trajectory may make; one more ends it as failed."""
    on_env_failure: Literal["zero", "mask"] = "zero"
    """With ``env``: a trajectory that failed (time-out, error, invalid calls) or overran (turns
    or tokens) is rewarded 0 (``zero``), or also left out of the loss (``mask``); counted."""
    turn_rewards: bool = False
    """With ``env``: each turn's reward goes on that turn's last sampled token (token-level
    credit, for an estimator with token-level returns: gae, reinforce_pp) instead of into the
    trajectory's reward."""

    @property
    def multi_turn(self) -> bool:
        """Whether rollouts take turns (``env`` or ``tools``)."""
        return bool(self.env or self.tools)

    def check(self, cfg: Config) -> None:
        names = ("prompts_per_step", "samples_per_prompt", "max_prompt_tokens", "max_new_tokens")
        _need("rollout", self, *names, "temperature")
        _need("rollout", self, "top_k", "chunk_prompts", allow_zero=True)
        _need("rollout", self, "vllm_kv_cache_gb")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        self.autoscale.check(cfg)
        _check_env_section(self, cfg)
        if not self.drop_uniform_groups:
            return
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"rollout.drop_uniform_groups: needs rollout.samples_per_prompt >= 2 (got "
                f"{self.samples_per_prompt}): a prompt with one sample is always a uniform group"
            )
        if cfg.mode == "async":
            raise ConfigError(
                "rollout.drop_uniform_groups: not supported with mode=async yet (the async "
                "loop hands out whole steps' chunks ahead of scoring); use mode=sync"
            )
        if self.max_fill_rounds < 1:
            raise ConfigError(f"rollout.max_fill_rounds: must be >= 1, got {self.max_fill_rounds}")


def _check_env_section(r: RolloutConfig, cfg: Config) -> None:
    if r.env and r.tools:
        raise ConfigError(
            f"rollout.tools: not with rollout.env={r.env!r} (rollout.tools makes its own "
            "environment; an environment class lists its tools in its 'tools' attribute)"
        )
    if not r.env and cfg.reward.function == ENV_REWARD:
        raise ConfigError(
            "reward.function=env: the reward comes from the environment, but rollout.env "
            "is empty (name one, e.g. builtin:calc)"
        )
    if not r.multi_turn:
        return
    _need("rollout", r, "max_turns", "max_total_tokens", "max_observation_tokens")
    _need("rollout", r, "env_timeout_s", "max_invalid_tool_calls", allow_zero=True)
    if r.max_total_tokens < r.max_new_tokens:
        raise ConfigError(
            f"rollout.max_total_tokens={r.max_total_tokens} is below rollout.max_new_tokens="
            f"{r.max_new_tokens} (one turn's cap): a trajectory could not take one whole turn"
        )
    if (
        r.turn_rewards
        and ESTIMATORS.get(cfg.ppo.estimator)
        and ESTIMATORS[cfg.ppo.estimator].uses_groups
    ):
        raise ConfigError(
            f"rollout.turn_rewards: per-turn rewards need token-level returns; "
            f"ppo.estimator={cfg.ppo.estimator} gives each response one advantage (use gae or "
            f"reinforce_pp, or leave turn_rewards off: the turns' rewards are then summed)"
        )


ENV_REWARD = "env"
"""``reward.function=env``: the reward is what the environment's steps returned."""


@pool_section(num_workers=1, num_cpus=0.25)
class RewardConfig(PoolConfig):
    """The reward scorers."""

    model: str = ""
    """Reward model: ``AutoModelForSequenceClassification`` with one label (path or hub id)."""
    function: str = "rlhf_dist.tasks.tiny:reward"
    """Reward function ``module:function(prompts, responses) -> list[float]``; used when
    ``model`` is empty. ``env``: the rewards the environment of ``rollout.env`` returned. A function may also take fields of the prompt's data row by name
    (``function(prompts, responses, answer)``, the row's ``answer`` for each sample) or all
    of them (``**fields``), as TRL's reward functions do. Several comma-separated
    ``module:function`` specs are combined: the reward is their weighted sum
    (``weights``), and with two or more each one's mean is logged as
    ``rollout/reward_<function name>``."""
    weights: list[float] = field(default_factory=list)
    """One weight per function in ``function``, in order; empty = 1.0 each. A weight of 0
    logs a function without rewarding it."""
    timeout_s: float = 0.0
    """Seconds a reward function may take on one chunk; past it the chunk's samples score 0
    and are counted (``rollout/reward_timeouts``), the run goes on. 0 = no limit."""

    def check(self, cfg: Config) -> None:
        """One or more distinct ``module:function`` (or a model); ``weights``: one finite
        weight per function (or none)."""
        if not self.model and not self.function:
            raise ConfigError("reward.model / reward.function: one of them must be set")
        _need("reward", self, "timeout_s", allow_zero=True)
        if self.function == ENV_REWARD:
            if self.weights:
                raise ConfigError("reward.weights: reward.function=env has no functions to weigh")
            return
        specs = reward_function_specs(self.function) if self.function else []
        for spec in specs:
            module, _, fn = spec.partition(":")
            if not module.strip() or not fn.strip():
                raise ConfigError(
                    f"reward.function: expected 'module:function' (comma-separated for "
                    f"several), got {spec!r} in {self.function!r}"
                )
        if len(set(specs)) < len(specs):
            twice = next(s for s in specs if specs.count(s) > 1)
            raise ConfigError(f"reward.function: {twice!r} is listed twice in {self.function!r}")
        if self.weights:
            self._check_weights(specs)

    def _check_weights(self, specs: list[str]) -> None:
        if self.model:
            raise ConfigError(
                "reward.weights: weigh the functions of reward.function, but reward.model is "
                "set (the reward model's score is used alone); leave reward.weights empty"
            )
        if len(self.weights) != len(specs):
            raise ConfigError(
                f"reward.weights: {len(self.weights)} weights for {len(specs)} functions in "
                f"reward.function ({', '.join(specs)}); give one weight per function, or none "
                f"(1.0 each)"
            )
        for i, w in enumerate(self.weights):
            if not math.isfinite(w):
                raise ConfigError(f"reward.weights[{i}]: must be a finite number, got {w}")


@pool_section(num_workers=1, num_cpus=0.25)
class ReferenceConfig(PoolConfig):
    """The reference scorers: frozen copies of the initial policy."""

    from_base: bool = False
    """With LoRA (``model.lora_rank > 0``): the learner takes the reference log-probs from
    its own base model with the adapters disabled, so no reference scorer (and no second
    copy of the model) is started; ``num_workers`` and the rest of this section are unused."""


@pool_section(num_workers=1, num_cpus=1.0)
class LearnerConfig(PoolConfig):
    """The learner's data-parallel DeepSpeed ranks."""

    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage for policy and critic (and the SFT and reward-model stages).
    ``auto``: 0 with one learner rank, where ZeRO has nothing to partition and stage 2 only
    copies every gradient into its buckets and every update back (the train block 1.6-1.9x a
    plain process instead of 1.04x, ``benchmarks/vs_pure.py``); 2 with more ranks. A resumed
    run keeps the stage its checkpoint was written with (``rlhf_dist.checkpoint.resume_layout``)."""
    lr: float = 1e-5
    """Policy learning rate (AdamW)."""
    critic_lr: float = 5e-5
    """Critic learning rate (AdamW; ``ppo.estimator=gae`` only)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (DeepSpeed ``gradient_clipping``); 0 = off."""

    def check(self, cfg: Config) -> None:
        _need("learner", self, "lr")
        _need("learner", self, "critic_lr", "weight_decay", "max_grad_norm", allow_zero=True)


@dataclass
class PPOConfig:
    estimator: str = DEFAULT_ESTIMATOR
    """Advantage estimator: a name in ``rlhf_dist.algo.ESTIMATORS``, the one table that says
    what each is and needs (a critic, groups of ``rollout.samples_per_prompt`` >= 2 samples,
    whitening over the batch) and where its formula comes from; docs/algorithms.md prints it.
    ``gae`` (PPO with a learned critic) or a critic-free one: ``grpo``, ``dr_grpo``, ``rloo``,
    ``reinforce_pp``, ``reinforce_pp_baseline``. A critic-free learner builds, trains and
    checkpoints no critic and logs no value metrics."""
    epochs: int = 1
    """Passes over each step's samples."""
    minibatch_size: int = 8
    """Samples per optimizer step, across all learner ranks."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank (gradient accumulation makes up the rest)."""
    clip_eps: float = 0.2
    """PPO ratio clip range (GSPO, ``ratio_level=sequence``, is published with 3e-4)."""
    clip_eps_high: float | None = None
    """Upper clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]; a larger
    value than ``clip_eps`` is DAPO's "clip-higher" (Yu et al. 2025 use 0.28 with 0.2), which
    keeps low-probability tokens able to grow. Empty (null) = ``clip_eps``."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio the clip acts on. ``token``: per token (PPO). ``sequence``: GSPO (Zheng
    et al. 2025): every token of a response uses exp(mean over its tokens of logp - old_logp),
    so a response is clipped as a whole."""
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    """How a minibatch's per-token policy loss (and KL loss and entropy bonus) becomes one
    number, over the whole minibatch whatever its micro-batching and the number of learner
    ranks (the counts are summed over micro-batches and ranks; ``algo.aggregate_loss``).
    ``token_mean``: mean over its valid tokens (DAPO's token-level loss). ``seq_mean_token_mean``:
    mean over its sequences of each one's token mean (GRPO's paper form). ``seq_mean_token_sum``:
    mean over its sequences of each one's token sum, divided by ``rollout.max_new_tokens``, a
    constant: Dr. GRPO's fix of the length bias (Liu et al. 2025). veRL: ``token-mean``,
    ``seq-mean-token-mean``, ``seq-mean-token-sum``. The critic's value loss is a token mean
    over the minibatch too."""
    value_clip_eps: float = 0.2
    """Value clip range around the old values; 0 = off (``estimator=gae`` only)."""
    vf_coef: float = 1.0
    """Weight of the value loss (critic has its own optimizer; this scales its gradient;
    ``estimator=gae`` only)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """Discount (``gae`` and ``reinforce_pp``; the group estimators need 1: their advantage is
    the sequence's)."""
    lam: float = 0.95
    """GAE lambda (``estimator=gae`` only)."""
    rollout_correction: Literal["none", "tis", "mis", "icepop"] = "none"
    """Correct the policy loss for the mismatch between the sampling engine's log-probs and
    the trainer's at equal weights (``algo.rollout_correction``: rho = trainer / engine per
    token). ``tis``: weight each token by min(rho, ``tis_cap``) (Yao et al. 2025); ``mis``: mask
    a sequence whose ratio (``mis_level``: geometric mean or product) leaves [``mis_low``,
    ``mis_high``]; ``icepop``: weight by rho inside [``icepop_low``, ``icepop_high``], mask
    outside (Ling Team 2025). The learner recomputes the old log-probs either way (the ratio's
    denominator); stale async tokens keep decoupled PPO's weights instead. The mismatch is
    reported whatever the mode (``rollout/logprob_diff_mean``...)."""
    tis_cap: float = 2.0
    """``rollout_correction=tis``: the truncation C of min(rho, C)."""
    mis_level: Literal["geometric", "product"] = "geometric"
    """``rollout_correction=mis``: a sequence's ratio is its tokens' geometric mean (does not
    grow with length) or their product."""
    mis_low: float = 0.5
    """``rollout_correction=mis``: sequences whose ratio is below this are masked."""
    mis_high: float = 2.0
    """``rollout_correction=mis``: sequences whose ratio is above this are masked."""
    icepop_low: float = 0.5
    """``rollout_correction=icepop``: tokens whose rho is below this are masked."""
    icepop_high: float = 5.0
    """``rollout_correction=icepop``: tokens whose rho is above this are masked."""
    grpo_std_eps: float = 1e-6
    """GRPO's epsilon in (score - group mean) / (group std + eps): veRL's value; TRL uses
    1e-4, OpenRLHF 1e-9. It matters for groups whose scores barely differ."""
    whiten_advantages: bool = True
    """Whiten advantages over the step's valid tokens (statistics across learner ranks) for the
    estimators whose table entry says so (``whitened``: gae, reinforce_pp, reinforce_pp_baseline;
    the variance's divisor is their source's, ``whiten_ddof``). grpo, dr_grpo and rloo never
    whiten over the batch: their advantages are normalised within each prompt's group, and a
    batch-wide shift would push the samples of a group that all scored the same (as in veRL
    and OpenRLHF)."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient (per-token reward -kl_coef * KL to the reference), with
    every estimator; GRPO usually sets it to 0 and uses ``kl_loss_coef`` instead."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator in the reward (Schulman, "Approximating KL divergence")."""
    kl_loss_coef: float = 0.0
    """Weight of KL(policy || reference) as a loss term, the k3 estimate
    exp(ref - logp) - (ref - logp) - 1 per token aggregated like the policy loss (DeepSeekMath's
    GRPO objective); 0 = off. Independent of ``kl_coef`` (the KL in the reward)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (per sequence) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller (samples)."""

    def check(self, cfg: Config) -> None:
        _need("ppo", self, "epochs", "minibatch_size", "micro_batch_size")
        names = ("clip_eps", "value_clip_eps", "vf_coef", "entropy_coef", "kl_coef")
        _need("ppo", self, *names, "kl_loss_coef", "grpo_std_eps", allow_zero=True)
        if self.clip_eps_high is not None:
            _need("ppo", self, "clip_eps_high", allow_zero=True)
        _need("ppo", self, "tis_cap", "mis_high", "icepop_high")
        _need("ppo", self, "mis_low", "icepop_low", allow_zero=True)
        for low, high in (("mis_low", "mis_high"), ("icepop_low", "icepop_high")):
            if getattr(self, low) >= getattr(self, high):
                raise ConfigError(
                    f"ppo.{low}={getattr(self, low)} must be below ppo.{high}={getattr(self, high)}"
                )
        for key in ("gamma", "lam"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ConfigError(f"ppo.{key}: must be in [0, 1], got {v}")
        if self.adaptive_kl:
            _need("ppo", self, "kl_target", "kl_horizon")
        self._check_estimator(cfg)

    def _check_estimator(self, cfg: Config) -> None:
        """What the estimator's table entry needs: a critic only where it has one, and for a
        group baseline, groups of 2 or more that no learner rank splits, and gamma 1.

        The learner computes group statistics once over its rank's whole shard, before
        cutting it into minibatches, so only the split of the step's batch over the ranks
        can cut a group: ``RolloutBatch.split`` deals contiguous shards, and a prompt's
        samples are consecutive."""
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"ppo.estimator: {self.estimator!r} is not one of {list(ESTIMATORS)}")
        est, name = ESTIMATORS[self.estimator], self.estimator
        with_critic = [n for n, e in ESTIMATORS.items() if e.needs_critic]
        if not est.needs_critic and cfg.model.critic:
            raise ConfigError(
                f"model.critic: ppo.estimator={name} builds no critic; leave model.critic empty "
                f"(only ppo.estimator={'/'.join(with_critic)} has one)"
            )
        if not est.needs_critic and cfg.model.critic_lora_rank:
            raise ConfigError(
                f"model.critic_lora_rank: ppo.estimator={name} builds no critic; leave it 0 "
                f"(only ppo.estimator={'/'.join(with_critic)} has one)"
            )
        if not est.uses_groups:
            return
        group, prompts = cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step
        if group < 2:
            raise ConfigError(
                f"rollout.samples_per_prompt={group} must be >= 2 for ppo.estimator={name}: "
                f"its baseline is computed from the other samples of the same prompt"
            )
        if prompts % cfg.learner.num_workers:
            raise ConfigError(
                f"rollout.prompts_per_step={prompts} must be divisible by "
                f"learner.num_workers={cfg.learner.num_workers} for ppo.estimator={name}: each "
                f"learner rank must receive whole groups (the rollout.samples_per_prompt="
                f"{group} samples of a prompt) to compute their statistics"
            )
        if self.gamma != 1:
            raise ConfigError(
                f"ppo.gamma: must be 1 for ppo.estimator={name} (its advantage is the "
                f"sequence's, broadcast over the response), got {self.gamma}"
            )


@dataclass
class SyncConfig:
    backend: Literal["auto", "gloo", "nccl", "shm", "object_store"] = "auto"
    """Weight-sync transport: a collective group (``gloo``, ``nccl``); ``shm``, shared memory
    on one machine (CPUs): learner rank 0 writes the policy into one of two ``/dev/shm`` slots
    and the generators' parameters become views of it, one copy in all; or ``object_store``
    (Ray's object store, for setups without a shared collective backend). ``auto``: nccl when
    learner and generators have GPUs; on CPUs shm when the cluster is one machine and
    ``/dev/shm`` has room for two copies, else gloo."""
    zero_copy: bool = True
    """With ``shm`` in ``mode=sync``, when the learner is one full-precision ZeRO-0 rank
    (``learner.num_workers=1``, ``model.dtype=float32``): the learner's policy parameters
    live in shared memory and the generators read them as they are, so a sync copies and
    moves nothing (``weight_sync.ShmLive``). Sound because no generator samples while the
    learner updates in sync mode. Elsewhere (async mode, ZeRO 1-3, bf16) ``shm`` writes
    two alternating slots."""
    bucket_mb: float = 64.0
    """Size of the flat buffers the weights travel in."""
    verify: bool = True
    """Compare every generator's checksum with the learner's after each sync. With
    ``zero_copy`` there is no transfer to check: a generator's bytes are compared with the
    learner's when it attaches to the learner's memory, and each later sync checks that the
    learner's parameters are still there (one found moved is copied back)."""
    timeout_s: float = 300.0
    """Timeout of the weight-sync collectives."""

    def check(self, cfg: Config) -> None:
        _need("sync", self, "bucket_mb", "timeout_s")
        gpus = cfg.learner.num_gpus > 0, cfg.rollout.num_gpus > 0
        if self.backend == "shm" and any(gpus):
            raise ConfigError(
                "sync.backend=shm shares CPU memory between processes on one machine; it needs "
                "learner.num_gpus and rollout.num_gpus = 0 (use nccl or auto on GPUs)"
            )
        if self.backend == "nccl" and not all(gpus):
            raise ConfigError(
                "sync.backend=nccl needs GPUs on both sides (learner.num_gpus and "
                "rollout.num_gpus > 0); use gloo or auto on CPUs"
            )


@dataclass
class AsyncConfig:
    max_staleness: int = 1
    """How many policy versions a trained sample may lag the learner. Generators are given a
    chunk only while it will be trained within this bound; a sample older than it is dropped
    (counted in ``async/dropped_stale``) and its prompt sampled again. 0 learns exactly like
    ``mode=sync``."""
    is_cap: float = 2.0
    """Decoupled PPO: a stale token's loss is weighted by pi_proximal / pi_behaviour,
    truncated at this value."""
    queue_samples: int = 0
    """Bound on samples generated (or being generated) and not yet trained; 0 = two steps'
    worth."""

    def check(self, cfg: Config) -> None:
        if self.max_staleness < 0:
            raise ConfigError(f"async.max_staleness: must be >= 0, got {self.max_staleness}")
        if not self.is_cap >= 1 or not math.isfinite(self.is_cap):
            raise ConfigError(f"async.is_cap: must be >= 1 (a finite cap), got {self.is_cap}")
        samples = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        if self.queue_samples and self.queue_samples < samples:
            raise ConfigError(
                f"async.queue_samples={self.queue_samples} cannot hold one step's samples "
                f"(rollout.prompts_per_step * rollout.samples_per_prompt = {samples}); "
                f"0 means two steps' worth"
            )


@dataclass
class CheckpointConfig:
    every: int = 10
    """Save a checkpoint every this many PPO steps (0 = never), and after the last step."""
    keep: int = 2
    """Keep the last K checkpoints."""
    save_hf: bool = False
    """Also write the policy as a Hugging Face directory (``policy_hf/``) into each checkpoint."""

    def check(self, cfg: Config) -> None:
        _need("checkpoint", self, "every", allow_zero=True)
        _need("checkpoint", self, "keep")


@dataclass
class WandbConfig:
    enabled: bool = True
    """Log to wandb too (``metrics.jsonl`` is always written). false never imports wandb."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when a wandb API key is configured, else offline (``wandb sync`` later)."""
    project: str = "rlhf_dist"
    """wandb project."""
    entity: str = ""
    """wandb entity (team or user); empty = your default."""
    name: str = ""
    """wandb run name; empty = the run directory's name."""
    group: str = ""
    """wandb run group."""
    tags: str = ""
    """Comma-separated wandb tags."""
    table_every: int = 10
    """Log a table of sample prompts, responses and rewards every this many PPO steps (0 = off)."""
    table_rows: int = 8
    """Rows in each samples table."""

    def check(self, cfg: Config) -> None:
        _need("wandb", self, "table_every", "table_rows", allow_zero=True)


@dataclass
class RayConfig:
    address: str = ""
    """Ray cluster to join (``auto`` or host:port); empty starts a local one."""
    num_cpus: int = 0
    """CPUs of a local cluster (0 = Ray's default: the machine's cores)."""
    object_store_mb: int = 1024
    """Object store size of a local cluster."""
    block_cores: int = 0
    """Cores the learner ranks share in ``mode=sync``, where they train alone (their torch
    threads are these cores divided among them, never fewer than ``learner.num_cpus``); 0 =
    the node's CPUs as Ray sees them, on the driver's node at most its cores. Fixing it makes
    the learner's float sums independent of the machine's core count (the pinned-behaviour
    runs set 2)."""
    placement_timeout_s: float = 60.0
    """How long to wait for a pool's resources before failing with a clear error."""


@dataclass
class Config:
    mode: Literal["sync", "async"] = "sync"
    """sync: generate, score, train, sync in turn. async: generators sample continuously into
    a bounded queue while the learner trains (see the ``async`` section)."""
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)  # ``async:`` in YAML
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True)
class Sizes:
    """Sizes derived from the config, computed once and checked for exact division."""

    samples_per_step: int
    chunk_prompts: int
    queue_samples: int
    minibatches_per_epoch: int
    minibatch_per_rank: int
    grad_accum_steps: int


# ----------------------------------------------------------------------------- loading


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; only widens int → float, never rewrites."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads "1e-5" as a string; it is plainly a number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (etp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, etp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vtp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vtp) for k, v in value.items()}
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _yaml_key(attr: str) -> str:
    """A field named after a Python keyword carries a trailing underscore (``async_``)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _attr(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


_RENAMED = {
    "learner.world_size": "learner.num_workers (the data-parallel DeepSpeed ranks)",
}
"""Keys that were renamed: dotted old key -> the new key (with a word on what it is). A file or
override that still uses an old key is refused with a message naming the new one."""


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [_yaml_key(f.name) for f in dataclasses.fields(cls)]
    for key in data:
        if f"{prefix}{key}" in _RENAMED:
            raise ConfigError(f"{prefix}{key}: renamed to {_RENAMED[f'{prefix}{key}']}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint} (valid: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        attr = _attr(name)
        tp = hints[attr]
        if dataclasses.is_dataclass(tp):
            section = {} if data[name] is None else data[name]  # "rollout:" left empty
            kwargs[attr] = _build(tp, section, f"{prefix}{name}.")
        else:
            kwargs[attr] = _coerce(f"{prefix}{name}", data[name], tp)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["ppo.epochs=2", "run.name=x"]`` → nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {e}") from None
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {p} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently: a second ``reward:`` section would drop the first)."""


def _no_duplicate_keys(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML) plus overrides, check types and sizes; raise :class:`ConfigError`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.load(p.read_text(), Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain data, keyed as in YAML (``async``, not ``async_``)."""

    return {_yaml_key(k): v for k, v in dataclasses.asdict(cfg).items()}


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _need(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    """Each field ``names`` of section ``obj`` is > 0 (>= 0 with ``allow_zero``) and finite."""
    for name in names:
        v = getattr(obj, name)
        ok = v >= 0 if allow_zero else v > 0  # written so that NaN fails
        if not ok or not math.isfinite(v):
            need = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{section}.{name}: must be {need}, got {v}")


def _divides(key: str, value: int, by_key: str, by: int) -> int:
    if by <= 0 or value % by:
        raise ConfigError(f"{key}={value} must be divisible by {by_key}={by}")
    return value // by


def reward_function_specs(value: str) -> list[str]:
    """The ``module:function`` specs of ``reward.function`` (comma-separated), stripped."""
    return [s.strip() for s in value.split(",")]


LORA_PREFIXES = (("model", "lora_"), ("model", "critic_lora_"), ("sft", "lora_"), ("rm", "lora_"))
"""The LoRA settings in the config: (section, field prefix); ``rlhf_dist.lora.LORA_KEYS`` says
which model each one is for."""


def _check_lora(cfg: Config) -> None:
    """LoRA ranks >= 0; a rank > 0 wherever another LoRA key is set; sane scale and dropout.
    What needs the model (target modules, a class peft cannot wrap) is checked by
    ``rlhf_dist.preflight``."""
    for section, prefix in LORA_PREFIXES:
        sec = getattr(cfg, section)
        key = f"{section}.{prefix}"
        rank, alpha = getattr(sec, f"{prefix}rank"), getattr(sec, f"{prefix}alpha")
        dropout, targets = getattr(sec, f"{prefix}dropout"), getattr(sec, f"{prefix}target_modules")
        asked = [
            f"{key}{name}"
            for name, on in (
                ("alpha", alpha != 0),
                ("dropout", dropout != 0),
                ("target_modules", targets),
            )
            if on
        ]
        if rank < 0 or (rank == 0 and asked):
            why = f" ({', '.join(asked)} set: LoRA is asked for)" if asked else " (0 = LoRA off)"
            raise ConfigError(f"{key}rank: must be > 0 for LoRA{why}, got {rank}")
        if not alpha >= 0 or not math.isfinite(alpha):
            raise ConfigError(f"{key}alpha: must be >= 0 (0 = twice the rank), got {alpha}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"{key}dropout: must be in [0, 1), got {dropout}")
        if any(not t.strip() for t in targets):
            raise ConfigError(f"{key}target_modules: an empty module name in {targets}")
    if cfg.reference.from_base and cfg.model.lora_rank <= 0:
        raise ConfigError(
            "reference.from_base: the reference is the base model under the policy's LoRA "
            "adapters; it needs model.lora_rank > 0 (without LoRA the policy has no frozen "
            "base, use the reference scorers)"
        )


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage the learner engines use: ``learner.zero_stage``, with ``auto`` resolved
    (0 for a single learner rank, 2 for more)."""
    stage = cfg.learner.zero_stage
    if stage == "auto":
        return 0 if cfg.learner.num_workers == 1 else 2
    return stage


CHECKED_SECTIONS = ("run", "eval", "model", "rollout", "reward", "learner", "ppo", "sync")
CHECKED_SECTIONS += ("async_", "checkpoint", "wandb")
"""The sections whose ``check(cfg)`` ``validate`` runs, in this order (after every pool's
``check_pool``; then SFT's and RM's ``check``, then the LoRA rules)."""


def validate(cfg: Config) -> Sizes:
    """Refuse what is wrong, naming the key; return the derived sizes. Each rule lives with
    its section (``check``), the estimator rules with ``PPOConfig`` (from the estimator
    table), the LoRA rules with ``LORA_PREFIXES``."""
    for section in POOL_SECTIONS:
        getattr(cfg, section).check_pool(section)
    for section in CHECKED_SECTIONS:
        getattr(cfg, section).check(cfg)
    for stage in ("sft", "rm"):
        getattr(cfg, stage).check(stage, cfg)
    _check_lora(cfg)
    return _sizes(cfg)


def _sizes(cfg: Config) -> Sizes:
    """The derived sizes, each checked for exact division."""
    r = cfg.rollout
    samples = r.prompts_per_step * r.samples_per_prompt
    minibatches = _divides(
        "samples per step (rollout.prompts_per_step * rollout.samples_per_prompt)",
        samples,
        "ppo.minibatch_size",
        cfg.ppo.minibatch_size,
    )
    per_rank = _divides(
        "ppo.minibatch_size", cfg.ppo.minibatch_size, "learner.num_workers", cfg.learner.num_workers
    )
    accum = _divides(
        "ppo.minibatch_size / learner.num_workers",
        per_rank,
        "ppo.micro_batch_size",
        cfg.ppo.micro_batch_size,
    )
    return Sizes(
        samples_per_step=samples,
        chunk_prompts=r.chunk_prompts or math.ceil(r.prompts_per_step / r.num_workers),
        queue_samples=cfg.async_.queue_samples or 2 * samples,
        minibatches_per_epoch=minibatches,
        minibatch_per_rank=per_rank,
        grad_accum_steps=accum,
    )
