"""The resolved inputs of a PPO run: what the preflight hands the driver and its groups.

A module of its own (plain data, no imports of the project), so the worker groups need not
import the preflight for the type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Inputs:
    """Resolved PPO inputs."""

    policy: str
    tokenizer: str
    critic: str
    prompts: Sequence[str]
    """The text each prompt row gives the policy (a chat row rendered with its template); a
    ``datasets`` source is read and rendered row by row when indexed."""
    pad_token_id: int
    reward_model: str = ""
    eval_prompts: Sequence[str] = field(default_factory=list)
    prompt_fields: dict[str, Sequence] = field(default_factory=dict)
    """The other fields of data.prompts' rows: field -> one value per prompt (None where a
    row lacks it), for reward functions that take them."""
    eval_prompt_fields: dict[str, Sequence] = field(default_factory=dict)
    """The same for ``eval_prompts``."""
    prompt_messages: Sequence[list[dict]] | None = None
    """Chat data: each prompt row as messages, which travel with the samples to a reward model
    to render the conversation with its own template; None when the prompts are plain text."""
    eval_prompt_messages: Sequence[list[dict]] | None = None
    add_special_tokens: bool = True
    """Whether the generators' tokenizer adds its special tokens to the prompts (not to text a
    chat template rendered: the template holds them)."""
