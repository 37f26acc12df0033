"""Scorers: the reward (a reward model or a ``module:function``) and the reference policy."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.models import (
    load_policy,
    load_reward_model,
    load_tokenizer,
    response_logprobs,
    reward_text,
)
from rlhf_dist.roles.common import SystemStats, pick_device


def import_reward_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
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


class RewardScorer(SystemStats):
    """One scalar score per response, from a sequence classifier or a Python function."""

    def __init__(
        self,
        model_path: str = "",
        function: str = "",
        dtype: str = "float32",
        num_gpus: float = 0.0,
        batch_size: int = 32,
    ):
        self.device = pick_device(num_gpus)
        self.batch_size = batch_size
        if model_path:
            self.fn = None
            self.tokenizer = load_tokenizer(model_path, padding_side="right")
            self.model = load_reward_model(model_path, dtype).to(self.device).eval()
        else:
            self.fn = import_reward_function(function)
            self.function = function

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> dict:
        t0 = time.perf_counter()
        scores = (
            self._score_fn(prompts, responses) if self.fn else self._score_model(prompts, responses)
        )
        return {"scores": scores, "compute_s": time.perf_counter() - t0}

    def _score_fn(self, prompts, responses) -> torch.Tensor:
        """Scores from the user's function. An exception names the function and the first
        sample it fails on; non-finite scores pass through (the learner skips such a step)."""
        try:
            out = [float(x) for x in self.fn(list(prompts), list(responses))]
        except Exception as e:
            raise RuntimeError(
                f"reward function {self.function!r} raised {e!r}{self._culprit(prompts, responses)}"
            ) from e
        if len(out) != len(responses):
            raise RuntimeError(
                f"reward function {self.function!r} returned {len(out)} scores "
                f"for {len(responses)} responses"
            )
        return torch.tensor(out, dtype=torch.float32)

    def _culprit(self, prompts, responses) -> str:
        """Find the first sample the function fails on alone (only on the error path)."""
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                self.fn([p], [r])
            except Exception:
                return f" on sample {i}: prompt={p!r}, response={r!r}"
        return " (no single sample fails alone)"

    def _score_model(self, prompts, responses) -> torch.Tensor:
        texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True
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
