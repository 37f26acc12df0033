"""Checks that run in the driver before any actor starts, so bad input fails fast and clearly.

Resolves ``builtin:*`` sources (building the tiny assets locally), checks that every model
path loads its config, imports the reward function, loads the prompts and checks their
lengths against ``rollout.max_prompt_tokens`` and the policy's context window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_dist.config import Config, ConfigError
from rlhf_dist.data import DataError, load_prompts

BUILTIN = "builtin:tiny"


@dataclass
class Inputs:
    policy: str
    tokenizer: str
    critic: str
    prompts: list[str]
    pad_token_id: int


def _check_model(key: str, path: str) -> None:
    from transformers import AutoConfig

    # A hub id is "name" or "org/name"; anything else that is not on disk is a missing path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"{key}: model path {path!r} does not exist")
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/HF hub errors
        raise ConfigError(f"{key}: cannot load a model config from {path!r}: {e}") from None


def context_length(path: str) -> int | None:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_inputs(cfg: Config) -> Inputs:
    from rlhf_dist.models import load_tokenizer
    from rlhf_dist.roles.scorers import import_reward_function
    from rlhf_dist.tasks import tiny

    assets = None
    if BUILTIN in (cfg.model.policy, cfg.data.prompts):
        assets = tiny.build_assets(cfg.model.assets_dir)
    policy = str(assets / "policy") if cfg.model.policy == BUILTIN else cfg.model.policy
    tokenizer_path = cfg.model.tokenizer or policy
    critic = cfg.model.critic or policy
    _check_model("model.policy", policy)
    if cfg.model.critic:
        _check_model("model.critic", critic)
    if cfg.reward.model:
        _check_model("reward.model", cfg.reward.model)
    else:
        try:
            import_reward_function(cfg.reward.function)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except Exception as e:
        raise ConfigError(
            f"model.tokenizer: cannot load a tokenizer from {tokenizer_path!r}: {e}"
        ) from None

    prompt_file = str(assets / "prompts.jsonl") if cfg.data.prompts == BUILTIN else cfg.data.prompts
    try:
        prompts, lines = load_prompts(prompt_file, cfg.data.prompt_key)
    except DataError as e:
        raise ConfigError(str(e)) from None
    limit = cfg.rollout.max_prompt_tokens
    ctx = context_length(policy)
    if ctx is not None and limit + cfg.rollout.max_new_tokens > ctx:
        raise ConfigError(
            f"rollout.max_prompt_tokens + rollout.max_new_tokens = "
            f"{limit + cfg.rollout.max_new_tokens} exceeds the policy's context of {ctx} tokens"
        )
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    for n, line in zip(lengths, lines):
        if n > limit:
            raise ConfigError(
                f"{prompt_file}:{line}: prompt is {n} tokens, longer than "
                f"rollout.max_prompt_tokens={limit}"
            )
    return Inputs(policy, tokenizer_path, critic, prompts, tokenizer.pad_token_id)
