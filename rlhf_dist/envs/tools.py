"""The simpler path: plain type-hinted Python functions are the tools (``rollout.tools``).

``rollout.tools: module:function,module:function`` makes an environment (``tool_env``) whose
conversation is the prompt, whose tools the chat template renders (their signatures and
docstrings, ``apply_chat_template(..., tools=[...])``, as transformers turns functions into
JSON schemas), and whose every turn is read for tool calls in the format the Hermes / Qwen /
SmolLM2 templates ask for (and TRL's tool parsing reads):

    <tool_call>
    {"name": "multiply", "arguments": {"a": 7, "b": 8}}
    </tool_call>

Each call runs (guarded by ``rollout.env_timeout_s`` like any step) and its result comes back
as a ``tool`` message; a malformed call, an unknown tool or a tool that raises gives an error
message, counted (``tool_errors``) and marked invalid. A turn without a tool call is the final
answer: the episode ends, and the reward comes from ``reward.function`` (or the reward model),
which reads the whole trajectory's text.
"""

from __future__ import annotations

import json
import re

from rlhf_dist.envs.base import Env, EnvError
from rlhf_dist.envs.guards import guarded

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def load_tools(spec: str) -> list:
    """The functions ``spec`` names (comma-separated ``module:function``)."""
    from transformers.utils import get_json_schema

    from rlhf_dist.roles.scorers import import_reward_function

    fns = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            fn = import_reward_function(part)
        except ValueError as e:
            raise EnvError(str(e).replace("reward.function", "rollout.tools", 1)) from None
        try:  # what the chat template will render: fails on a missing hint or docstring
            get_json_schema(fn)
        except Exception as e:
            raise EnvError(
                f"rollout.tools: {part} cannot be described to the model ({e}); a tool needs "
                "type hints and a docstring with an 'Args:' line for each parameter"
            ) from None
        fns.append(fn)
    names = [f.__name__ for f in fns]
    if len(set(names)) < len(names):
        raise EnvError(f"rollout.tools: two tools share a name ({names})")
    return fns


def parse_calls(text: str) -> list[tuple[str, dict] | str]:
    """Each ``<tool_call>`` block of ``text``: (name, arguments), or why it is not a call."""
    out = []
    for block in CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            out.append(f"not JSON ({e.msg})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append('no "name"')
            continue
        args = call.get("arguments", {})
        out.append((call["name"], args) if isinstance(args, dict) else '"arguments" is no object')
    return out


class ToolEnv(Env):
    """Subclassed by ``tool_env`` with its ``tools``; one instance per trajectory."""

    tools: list = []
    timeout_s: float = 10.0

    def reset(self, row: dict):
        return row["prompt"]

    def step(self, text: str):
        calls = parse_calls(text)
        if not calls:
            return None, 0.0, True, {}  # no call: the final answer
        by_name = {f.__name__: f for f in self.tools}
        messages, errors = [], 0
        for call in calls:
            if isinstance(call, str):
                content, ok = f"error: malformed tool call: {call}", False
            elif call[0] not in by_name:
                content, ok = f"error: unknown tool {call[0]!r} (tools: {sorted(by_name)})", False
            else:
                content, ok = _run(by_name[call[0]], call[1], self.timeout_s)
            errors += not ok
            messages.append({"role": "tool", "content": content})
        info = {"tool_calls": len(calls), "tool_errors": errors, "invalid": errors == len(calls)}
        return messages, 0.0, False, info


def _run(fn, args: dict, timeout_s: float) -> tuple[str, bool]:
    """A tool's result as text, or its error; (text, whether it worked)."""
    out = guarded(lambda: fn(**args), timeout_s=timeout_s)
    if out.timed_out:
        return f"error: the tool took longer than {timeout_s:g} s", False
    if out.error is not None:
        return f"error: {type(out.error).__name__}: {out.error}", False
    return str(out.value), True


def tool_env(spec: str, timeout_s: float = 10.0) -> type:
    """An environment class whose tools are the functions ``spec`` names."""
    fns = load_tools(spec)
    if not fns:
        raise EnvError(f"rollout.tools: no function in {spec!r}")
    return type("Tools", (ToolEnv,), {"tools": fns, "timeout_s": timeout_s})
