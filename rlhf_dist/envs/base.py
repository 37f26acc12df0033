"""What a user implements for multi-turn rollouts: an environment, one instance per trajectory
(in the spirit of SkyRL's ``BaseTextEnv`` and TRL's ``environment_factory``).

``rollout.env: module:Class`` names it. ``reset(row)`` takes the prompt's data row (its prompt
field and every other field) and returns the conversation the policy starts from (a message
list, or a string read as one user turn); ``step(assistant_text)`` takes what the policy said
in its turn and returns ``(observation, reward, done, info)``: the messages to append (a tool's
output, a user's reply; None for nothing), a reward for the turn (the trajectory's reward is
their sum, or the turn's when ``rollout.turn_rewards``), whether the episode ended, and a dict
the rollout counts from (``info["tool_calls"]``, ``info["tool_errors"]``, ``info["invalid"]``).
A single-turn rollout is the special case with no environment: nothing of this runs then.

The rollout side owns the tokens (``envs.episodes``): an environment only sees and returns
text, so it can never make the trained tokens differ from the sampled ones.
"""

from __future__ import annotations

import importlib
from typing import Any

Observation = list[dict] | str | None


class Env:
    """Subclass and override ``reset`` and ``step``; ``tools`` (optional) lists plain Python
    functions the chat template renders (``apply_chat_template(..., tools=...)``)."""

    tools: list = []

    def reset(self, row: dict) -> list[dict] | str:
        """The conversation this trajectory starts from (``row``: the prompt's data row)."""
        return row["prompt"]

    def step(self, assistant_text: str) -> tuple[Observation, float, bool, dict]:
        """What happens after the policy's turn: (observation, reward, done, info)."""
        raise NotImplementedError


class EnvError(ValueError):
    """``rollout.env`` cannot be loaded; the message says why."""


def load_env(spec: str) -> type:
    """The environment class ``spec`` names (``module:Class``, or a built-in:
    ``builtin:calc``)."""
    if spec == "builtin:calc":
        spec = "rlhf_dist.tasks.calc:CalcEnv"
    module, _, name = spec.partition(":")
    if not module or not name:
        raise EnvError(f"rollout.env: expected 'module:Class', got {spec!r}")
    try:
        cls: Any = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise EnvError(f"rollout.env: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise EnvError(f"rollout.env: module {module!r} has no {name!r}") from None
    if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
        raise EnvError(f"rollout.env: {spec} is not a class with reset() and step()")
    return cls
