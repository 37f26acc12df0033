"""Generators (rollout workers): a copy of the policy that samples responses.

``RolloutEngine`` is what every engine shares: the tokenizer and stop tokens, multi-turn
rollouts (``rollout``, through the engine's ``sample``), the RolloutBatch a chunk becomes, the
weight-sync receiver, ``status`` and ``reference.from_base``. ``Generator`` samples with HF
``generate``; ``roles.vllm_generator.VLLMGenerator`` with vLLM (``rollout.engine``).

With LoRA (``lora``) the HF generator holds the frozen base wrapped with the same adapters as
the learner (same settings, same seed); a weight sync replaces the adapters only, and sampling
runs the base with them applied. ``ref_from_base`` (``reference.from_base``): each batch also
carries the reference log-probs, taken from the base with the adapters disabled, so no
reference scorer needs a model of its own."""

from __future__ import annotations

import os
import socket
import time

import torch

from rlhf_dist import chat, weight_sync
from rlhf_dist.algo import logprobs_from_logits
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.envs.episodes import EpisodeSettings, run_episodes, to_batch
from rlhf_dist.envs.render import TokenDelta
from rlhf_dist.lora import LoraSettings, wrap
from rlhf_dist.models import load_policy, load_tokenizer, response_logprobs, stop_token_ids
from rlhf_dist.roles.common import SystemStats, pick_device


class SampledLogprobs:
    """The log-probs of the tokens ``generate`` samples, under the sampling temperature, taken
    step by step from the raw logits of each forward (a hook on the transformers model) and
    holding one (batch, vocab) row at a time. ``generate(output_logits=True)`` would keep every
    step's row instead: (tokens, batch, vocab) floats, 40 GB for a 152k vocabulary, 64 rows
    and 1024 tokens. The token sampled from step t's logits is the input of step t + 1's
    forward; the last one is read from the returned sequences (``finish``)."""

    def __init__(self, model, temperature: float):
        self.temperature = temperature
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.active, self.prev, self.steps = False, None, []
        target.register_forward_hook(self._hook, with_kwargs=True)

    def start(self) -> None:
        self.active, self.prev, self.steps = True, None, []

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.active:  # another forward (the reference from the base)
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.prev is not None:
            self.steps.append(logprobs_from_logits(self.prev[:, None, :], ids[:, -1:]))
        self.prev = output.logits[:, -1, :].float() / self.temperature

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """(batch, response length) log-probs of ``response`` (the sampled tokens)."""
        self.active = False
        last = logprobs_from_logits(self.prev[:, None, :], response[:, -1:])
        out = torch.cat([*self.steps, last], dim=1)
        self.prev, self.steps = None, []
        if out.shape != response.shape:
            raise RuntimeError(
                f"generate ran {out.shape[1]} forwards for {response.shape[1]} new tokens"
            )
        return out


class RolloutEngine(SystemStats):
    """What every generator engine shares. A subclass sets ``self.model`` (the HF policy it
    holds, or None), ``self.weights`` (its weight-sync target) and implements ``generate``,
    ``sample`` and ``held_checksum``; it calls ``_setup`` first."""

    model = None

    def _setup(
        self,
        model_path: str,
        tokenizer_path: str,
        max_new_tokens: int,
        temperature: float,
        add_special_tokens: bool,
        ref_from_base: bool,
        lora: LoraSettings | None,
    ) -> None:
        # False when prompts come rendered by a chat template (it holds the special tokens)
        self.add_special_tokens = add_special_tokens
        self.tokenizer = load_tokenizer(tokenizer_path or model_path, padding_side="left")
        if ref_from_base and lora is None:
            raise ValueError("reference.from_base needs LoRA (model.lora_rank > 0)")
        self.ref_from_base = ref_from_base
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.version = 0  # the policy version the weights are
        self.receiver: weight_sync.Receiver | None = None

    def _setup_episodes(self, episodes: EpisodeSettings | None) -> None:
        """After ``stop_ids`` are known: the environment and the token delta of its turns."""
        self.episodes = episodes
        if episodes is not None:
            self.env_cls = episodes.env_class()
            template = episodes.chat_template is not False and chat.has_template(self.tokenizer)
            tools = list(getattr(self.env_cls, "tools", []) or [])
            self.delta = TokenDelta(self.tokenizer, template, self.stop_ids, tools)

    def _encode(self, prompts: list[str], samples_per_prompt: int):
        """The prompts, each repeated ``samples_per_prompt`` times, left-padded."""
        prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens
        )
        return prompts, enc

    def _batch(self, prompts, prompt_ids, enc, response, response_mask, behaviour, truncated):
        """A chunk's RolloutBatch from its left-padded prompts and right-padded responses."""
        P = enc.input_ids.shape[1]
        attention_mask = torch.cat([enc.attention_mask, response_mask.long()], dim=1)
        texts = self.tokenizer.batch_decode(response, skip_special_tokens=True)
        batch = RolloutBatch(
            sequences=torch.cat([enc.input_ids, response], dim=1).cpu(),
            attention_mask=attention_mask.cpu(),
            response_mask=response_mask.cpu(),
            behaviour_logprobs=behaviour.cpu(),
            prompt_len=P,
            prompts=prompts,
            responses=texts,
            prompt_ids=prompt_ids,
            versions=torch.full((len(prompts),), self.version, dtype=torch.long),
            truncated=truncated.cpu(),
            generated_tokens=int(response_mask.sum().item()),
            worker=f"{socket.gethostname()}:{os.getpid()}",  # the sample ledger's
        )
        self._reference_from_base(batch)
        return batch

    def _reference_from_base(self, batch: RolloutBatch) -> None:
        """``reference.from_base``: the batch's reference log-probs from the base model with
        the LoRA adapters disabled (the HF copy of the policy the engine keeps for it)."""
        if not self.ref_from_base:
            return
        device = next(self.model.parameters()).device
        with torch.no_grad(), self.model.disable_adapter():
            am = batch.attention_mask.to(device)
            seq = batch.sequences.to(device)
            ref, _ = response_logprobs(self.model, seq, am, batch.prompt_len, self.temperature)
        batch.ref_logprobs = (ref.float().cpu() * batch.response_mask).cpu()

    def _start_rollout(self, seed: int) -> None:
        """Seed what a chunk's sampling draws from."""
        torch.manual_seed(seed)

    def sample(
        self, token_lists: list[list[int]], max_new_tokens: int
    ) -> list[tuple[list[int], list[float], bool]]:
        """The engine's turn of a multi-turn rollout: each token list continued by up to
        ``max_new_tokens`` sampled tokens; per list (the new tokens up to and including its
        stop token, their behaviour log-probs, whether it stopped)."""
        raise NotImplementedError

    @torch.no_grad()
    def rollout(
        self, rows: list[dict], prompt_ids: list[int], samples_per_prompt: int = 1, seed: int = 0
    ) -> RolloutBatch:
        """Multi-turn: ``samples_per_prompt`` trajectories per data row, each with an
        environment of its own, advanced together turn by turn (``envs.episodes``)."""
        t0 = time.perf_counter()
        self._start_rollout(seed)
        rows = [r for r in rows for _ in range(samples_per_prompt)]
        prompt_ids = [i for i in prompt_ids for _ in range(samples_per_prompt)]
        envs = [self.env_cls() for _ in rows]
        limits = self.episodes.limits
        trajs = run_episodes(self.sample, self.tokenizer, self.delta, envs, rows, limits)
        batch = to_batch(trajs, self.tokenizer, self.version, prompt_ids, limits)
        batch.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._reference_from_base(batch)
        batch.compute_s = time.perf_counter() - t0
        return batch

    # ----------------------------------------------------------------- weight sync

    def open_weight_sync(
        self, channel: weight_sync.Channel, membership: weight_sync.Membership | None = None
    ) -> None:
        """Open the receiver of ``channel``'s transport (a new one when the transport
        changed), joining ``membership`` (a collective's group)."""
        if self.receiver is None or self.receiver.backend != channel.backend:
            self.receiver = weight_sync.receiver(channel.backend)
        self.receiver.open(channel, membership)

    def receive_weights(self, version: int, verify: bool, handoff=None) -> weight_sync.Receipt:
        """Take ``version`` from learner rank 0 into the engine (``handoff``: what the
        transport's send returned, where it needs it). Called between two ``generate`` calls:
        a Ray actor runs one method at a time, so a batch never sees half-swapped weights."""
        if self.receiver is None:
            raise RuntimeError("weight sync: receive_weights before open_weight_sync")
        receipt = self.receiver.receive(self.weights, version, verify, handoff)
        self.version = version
        return receipt

    def held_checksum(self) -> str:
        """The checksum of the synced weights the engine holds, read from the engine."""
        raise NotImplementedError

    def status(self) -> dict:
        """The version held and the checksum of the weights the engine holds."""
        return {"version": self.version, "checksum": self.held_checksum()}


class Generator(RolloutEngine):
    """The HF engine: ``generate`` with the policy's own transformers model."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str = "",
        dtype: str = "float32",
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_gpus: float = 0.0,
        add_special_tokens: bool = True,
        lora: LoraSettings | None = None,
        seed: int = 0,
        ref_from_base: bool = False,
        episodes: EpisodeSettings | None = None,
    ):
        """``episodes``: multi-turn rollouts with an environment (``rollout.env``); None:
        single-turn ``generate`` only."""
        self.device = pick_device(num_gpus)
        self._setup(
            model_path,
            tokenizer_path,
            max_new_tokens,
            temperature,
            add_special_tokens,
            ref_from_base,
            lora,
        )
        model = load_policy(model_path, dtype)
        if lora is not None:
            model = wrap(model, lora, "causal", seed=seed)
        self.model = model.to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.gen_kwargs = dict(
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
            return_dict_in_generate=True,
        )
        self.sampled = SampledLogprobs(self.model, temperature)
        self.weights = weight_sync.ModuleWeights(self.model)  # where weight syncs land
        self._setup_episodes(episodes)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        prompt_ids: list[int],
        samples_per_prompt: int = 1,
        seed: int = 0,
    ) -> RolloutBatch:
        """Sample ``samples_per_prompt`` responses per prompt with the weights held now."""
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        prompts, enc = self._encode(prompts, samples_per_prompt)
        prompt_ids = [i for i in prompt_ids for _ in range(samples_per_prompt)]
        enc = enc.to(self.device)
        response, response_mask, behaviour, truncated = self._sample(
            enc.input_ids, enc.attention_mask
        )
        batch = self._batch(prompts, prompt_ids, enc, response, response_mask, behaviour, truncated)
        batch.compute_s = time.perf_counter() - t0
        return batch

    def _sample(self, input_ids, attention_mask, max_new_tokens: int | None = None):
        """One ``generate`` over a left-padded batch: (the new tokens, padded after each
        row's first stop token; their mask; their behaviour log-probs, 0 on padding; whether
        a row ran out of tokens without stopping)."""
        kwargs = dict(self.gen_kwargs)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        self.sampled.start()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.sampled.active = False
        response = out.sequences[:, input_ids.shape[1] :]
        # Behaviour log-probs from the raw logits generate saw, under the sampling temperature
        # (top-k/top-p truncation is not applied: the learner recomputes the same quantity).
        behaviour = self.sampled.finish(response)
        # Response tokens run up to and including the first stop token (an EOS of the
        # tokenizer or of the model's generation config); pad may equal EOS, so the mask is
        # derived from the stop position, not from pad ids.
        is_eos = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        response_mask = (~after_eos).float()
        truncated = ~is_eos.any(-1)
        response = response.masked_fill(after_eos, self.tokenizer.pad_token_id)
        return response, response_mask, behaviour * response_mask, truncated

    @torch.no_grad()
    def sample(
        self, token_lists: list[list[int]], max_new_tokens: int
    ) -> list[tuple[list[int], list[float], bool]]:
        """The engine's turn of a multi-turn rollout: each token list continued by up to
        ``max_new_tokens`` sampled tokens; per list (the new tokens up to and including its
        stop token, their behaviour log-probs, whether it stopped)."""
        width = max(len(t) for t in token_lists)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(t)) + t for t in token_lists], device=self.device)
        am = torch.tensor(
            [[0] * (width - len(t)) + [1] * len(t) for t in token_lists], device=self.device
        )
        response, mask, behaviour, truncated = self._sample(ids, am, max_new_tokens)
        out = []
        for row, m, lp, cut in zip(response, mask, behaviour, truncated):
            n = int(m.sum())
            out.append((row[:n].tolist(), lp[:n].tolist(), not bool(cut)))
        return out

    def held_checksum(self) -> str:
        return weight_sync.model_checksum(self.model)
