"""Scorers: the reward (a reward model, or ``module:function`` reward functions, weighted)
and the reference policy."""

from __future__ import annotations

import importlib
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.chat import encode, reward_input
from rlhf_dist.config import reward_function_specs
from rlhf_dist.envs.guards import guarded
from rlhf_dist.models import (
    load_policy,
    load_reward_model,
    load_tokenizer,
    response_logprobs,
    reward_text,
)
from rlhf_dist.roles.common import SystemStats, pick_device


def import_reward_function(spec: str) -> Callable[..., list[float]]:
    """Resolve ``module:function``; raise ValueError naming what failed."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"reward.function: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code
        raise ValueError(f"reward.function: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward.function: {module_name!r} has no callable {fn_name!r}")
    return fn


@dataclass(frozen=True)
class FieldUse:
    """Which fields of a sample's data row a reward function takes, from its signature.

    The first two positional parameters take the prompts and the responses, whatever their
    names; a further named parameter takes the data field of that name (one value per
    sample), required unless it has a default; ``**kwargs`` takes every field.
    """

    named: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    any_field: bool = False
    taken: tuple[str, ...] = ()  # the names of the (prompts, responses) parameters

    @staticmethod
    def of(fn: Callable) -> FieldUse:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # no signature to read (some builtins): two arguments
            return FieldUse()
        P = inspect.Parameter
        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        taken = tuple(p.name for p in positional[:2])
        named = [
            p
            for p in params
            if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name not in taken
        ]
        return FieldUse(
            named=tuple(p.name for p in named),
            required=tuple(p.name for p in named if p.default is P.empty),
            any_field=any(p.kind is P.VAR_KEYWORD for p in params),
            taken=taken,
        )

    def wanted(self, columns) -> list[str]:
        """The fields, of those ``columns`` a data file has, this function is given."""
        if self.any_field:
            return [c for c in columns if c not in self.taken]
        return [c for c in self.named if c in columns]


RESERVED_PART_NAMES = frozenset({"mean"})  # rollout/reward_mean is the combined reward's


@dataclass
class RewardFunction:
    """One ``module:function`` of ``reward.function`` (or ``eval.gold``) with its weight and
    the data fields it takes. Called as ``fn(prompts, responses, **fields)`` when it takes
    fields, else ``fn(prompts, responses)``."""

    spec: str
    fn: Callable[..., list[float]]
    weight: float = 1.0
    name: str = ""  # in metric keys: rollout/reward_<name>
    use: FieldUse = FieldUse()

    @staticmethod
    def load(spec: str, weight: float = 1.0, name: str = "") -> RewardFunction:
        fn = import_reward_function(spec)
        return RewardFunction(spec, fn, weight, name or spec.partition(":")[2], FieldUse.of(fn))

    def wanted(self, columns) -> list[str]:
        return self.use.wanted(columns)

    def __call__(self, prompts, responses, fields: dict[str, list] | None = None) -> list[float]:
        """The function's scores; ``fields``: data field -> one value per sample."""
        fields = fields or {}
        missing = [k for k in self.use.required if k not in fields]
        if missing:
            have = ", ".join(sorted(fields)) or "none"
            raise ValueError(
                f"reward function {self.spec!r} needs the data field {missing[0]!r}, "
                f"which was not given (fields given: {have})"
            )
        kwargs = {k: list(fields[k]) for k in self.wanted(fields)}
        return self.fn(list(prompts), list(responses), **kwargs)


def load_reward_functions(value: str, weights: list[float] | None = None) -> list[RewardFunction]:
    """The functions of ``reward.function`` (comma-separated ``module:function`` specs) with
    ``reward.weights`` (empty = 1.0 each). Each gets a distinct name for its metric: the
    function's name, or module and function when that is taken or reserved."""
    specs = reward_function_specs(value)
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(
            f"reward.weights: {len(weights)} weights for {len(specs)} functions in "
            f"reward.function ({', '.join(specs)})"
        )
    base = [spec.partition(":")[2] for spec in specs]
    names = [
        b if base.count(b) == 1 and b not in RESERVED_PART_NAMES else re.sub(r"\W+", "_", spec)
        for b, spec in zip(base, specs)
    ]
    return [RewardFunction.load(s, w, n) for s, w, n in zip(specs, weights, names)]


class RewardScorer(SystemStats):
    """One scalar score per response, from a sequence classifier or reward functions (the
    weighted sum of their scores; each function's scores are returned too)."""

    def __init__(
        self,
        model_path: str = "",
        function: str = "",
        dtype: str = "float32",
        num_gpus: float = 0.0,
        batch_size: int = 32,
        weights: list[float] | None = None,
        chat_template: str | bool = "auto",
        timeout_s: float = 0.0,
    ):
        """``timeout_s``: seconds a reward function may take on one call (0: no limit); past
        it the call's samples score 0, counted in the result's ``timeouts``."""
        self.device = pick_device(num_gpus)
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.chat_template = chat_template  # data.chat_template: how the model reads messages
        self.functions: list[RewardFunction] = []
        if model_path:
            self.tokenizer = load_tokenizer(model_path, padding_side="right")
            self.model = load_reward_model(model_path, dtype).to(self.device).eval()
        else:
            self.functions = load_reward_functions(function, weights)

    @torch.no_grad()
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        fields: dict[str, list] | None = None,
        messages: list[list[dict]] | None = None,
    ) -> dict:
        """``scores`` (and with several functions ``parts``: each function's own scores,
        unweighted). ``fields``: data field -> the value of each sample's data row, for the
        functions that take them. ``messages``: each sample's prompt as messages, for a reward
        model to render the conversation with its own chat template (chat data only)."""
        t0 = time.perf_counter()
        out: dict = {}
        if self.functions:
            self.timeouts = 0
            out["scores"], parts = self._score_fns(prompts, responses, fields or {})
            if len(parts) > 1:
                out["parts"] = parts
            out["timeouts"] = self.timeouts
        else:
            out["scores"] = self._score_model(prompts, responses, messages)
        out["compute_s"] = time.perf_counter() - t0
        return out

    def _score_fns(self, prompts, responses, fields) -> tuple[torch.Tensor, dict]:
        for name, values in fields.items():
            if len(values) != len(responses):
                raise RuntimeError(
                    f"field {name!r}: {len(values)} values for {len(responses)} responses"
                )
        for f in self.functions:
            missing = [k for k in f.use.required if k not in fields]
            if missing:
                raise RuntimeError(
                    f"reward function {f.spec!r} needs the data field {missing[0]!r}, which "
                    f"was not given (fields given: {', '.join(sorted(fields)) or 'none'})"
                )
        total = torch.zeros(len(responses), dtype=torch.float32)
        parts = {}
        for f in self.functions:
            scores = self._score_fn(f, prompts, responses, fields)
            parts[f.name] = scores
            if f.weight != 0:  # a weight of 0 logs the function without rewarding it
                total += f.weight * scores
        return total, parts

    def _score_fn(self, f: RewardFunction, prompts, responses, fields) -> torch.Tensor:
        """Scores from one of the user's functions. An exception names the function and the
        first sample it fails on; non-finite scores pass through (the learner skips such a
        step)."""
        called = guarded(f, prompts, responses, fields, timeout_s=self.timeout_s)
        if called.timed_out:  # scored 0 and counted: a slow function never hangs the run
            self.timeouts += 1
            return torch.zeros(len(responses), dtype=torch.float32)
        try:
            if called.error is not None:
                raise called.error
            out = [float(x) for x in called.value]
        except Exception as e:
            culprit = self._culprit(f, prompts, responses, fields)
            raise RuntimeError(f"reward function {f.spec!r} raised {e!r}{culprit}") from e
        if len(out) != len(responses):
            raise RuntimeError(
                f"reward function {f.spec!r} returned {len(out)} scores "
                f"for {len(responses)} responses"
            )
        return torch.tensor(out, dtype=torch.float32)

    @staticmethod
    def _culprit(f: RewardFunction, prompts, responses, fields) -> str:
        """Find the first sample the function fails on alone (only on the error path)."""
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                f([p], [r], {k: v[i : i + 1] for k, v in fields.items()})
            except Exception:
                row = {k: v[i] for k, v in fields.items() if k in f.wanted(fields)}
                return f" on sample {i}: prompt={p!r}, response={r!r}" + (
                    f", fields={row!r}" if row else ""
                )
        return " (no single sample fails alone)"

    def _score_model(self, prompts, responses, messages=None) -> torch.Tensor:
        if messages is None:
            inputs = [(reward_text(p, r), True) for p, r in zip(prompts, responses)]
        else:  # the conversation in the reward model's own template
            inputs = [
                reward_input(self.tokenizer, m, r, self.chat_template)
                for m, r in zip(messages, responses)
            ]
        out = []
        for i in range(0, len(inputs), self.batch_size):
            part = inputs[i : i + self.batch_size]
            enc = encode(
                self.tokenizer, [t for t, _ in part], [s for _, s in part], truncation=True
            ).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)


class ReferenceScorer(SystemStats):
    """A frozen copy of the initial policy: per-token reference log-probs of the responses."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        temperature: float = 1.0,
        num_gpus: float = 0.0,
        micro_batch_size: int = 16,
    ):
        self.device = pick_device(num_gpus)
        self.model = load_policy(model_path, dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def ref_logprobs(self, batch: RolloutBatch) -> dict:
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(batch), self.micro_batch_size):
            seq = batch.sequences[i : i + self.micro_batch_size].to(self.device)
            am = batch.attention_mask[i : i + self.micro_batch_size].to(self.device)
            logp, _ = response_logprobs(self.model, seq, am, batch.prompt_len, self.temperature)
            out.append(logp.float().cpu())
        logp = torch.cat(out) * batch.response_mask
        return {"ref_logprobs": logp, "compute_s": time.perf_counter() - t0}
