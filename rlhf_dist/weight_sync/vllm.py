"""The vLLM engine's ``WeightTarget``: received tensors are loaded into the engine's model with
its own ``load_weights`` (no restart), and the checksum is read back from the engine's
parameters, so a bucket that never arrived, or a load that did not land, is caught.

vLLM holds a model under its own layout: q/k/v and gate/up projections fused into one
parameter each (``packed_modules_mapping``, split by each fused layer's ``output_sizes``), the
vocabulary padded to a multiple of 64, GPT-2's ``Conv1D`` weights transposed to ``[out, in]``.
``EngineLayout`` maps each HF-named tensor the learner sends to where it sits in the engine, so
the engine's weights read back under the learner's names and layouts, hashed in manifest order
(``layout.checksum``): the same digest the learner computes.

With LoRA the learner sends the adapters only. The generator keeps the HF base wrapped with
the same adapters (a ``ModuleWeights`` target receives them, and ``reference.from_base`` reads
it); each push merges them (peft's ``get_delta_weight``, the merge ``merge_and_unload`` does)
into the adapted layers' weights and loads those into the engine, which runs without LoRA
kernels. The checksum is the adapters' as received; the merged weights the engine then holds
are compared with the merge, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_dist.weight_sync.base import WeightTarget
from rlhf_dist.weight_sync.layout import ParamSpec, checksum, plan_buckets
from rlhf_dist.weight_sync.module import ModuleWeights


def conv1d_modules(hf_config) -> set[str]:
    """The names of the HF model's ``Conv1D`` modules (weights stored ``[in, out]``), found on
    an empty (meta-device) model built from its config."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {n for n, m in model.named_modules() if isinstance(m, Conv1D)}


class EngineLayout:
    """Where each HF-named tensor sits in a vLLM model: (parameter, rows start, rows stop,
    transposed)."""

    def __init__(self, engine_model: nn.Module, hf_config):
        packed = getattr(engine_model, "packed_modules_mapping", None) or {}
        modules = dict(engine_model.named_modules())
        conv1d = conv1d_modules(hf_config)
        self.where: dict[str, tuple[Tensor, int, int | None, bool]] = {}
        for name, p in engine_model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            parent, _, short = module_name.rpartition(".")
            module = modules.get(module_name)
            sizes = getattr(module, "output_sizes", None)
            if short in packed and sizes and len(sizes) == len(packed[short]):
                start = 0
                for sub, size in zip(packed[short], sizes):
                    hf = f"{parent}.{sub}.{leaf}" if parent else f"{sub}.{leaf}"
                    self.where[hf] = (p, start, start + size, False)
                    start += size
                continue
            vocab = getattr(module, "org_vocab_size", None)
            stop = vocab if vocab and p.shape[0] != vocab else None
            self.where[name] = (p, 0, stop, module_name in conv1d and leaf == "weight")

    def read(self, name: str) -> Tensor:
        """The engine's tensor for HF parameter ``name``, in HF's layout."""
        p, start, stop, transposed = self.where[name]
        t = p.data[start:stop]
        return t.t() if transposed else t

    def check(self, manifest: list[ParamSpec]) -> None:
        """Every manifest entry has a place in the engine, with its shape and dtype."""
        for spec in manifest:
            if spec.name not in self.where:
                raise ValueError(
                    f"rollout.engine=vllm: the engine's model has no parameter for the "
                    f"learner's {spec.name!r} (known: {sorted(self.where)[:6]}...)"
                )
            t = self.read(spec.name)
            if tuple(t.shape) != spec.shape or str(t.dtype) != spec.dtype:
                raise ValueError(
                    f"weight sync: the vLLM engine holds {spec.name!r} as "
                    f"{(tuple(t.shape), str(t.dtype))}, the learner sends "
                    f"{(spec.shape, spec.dtype)} (rollout.engine=vllm needs model.dtype for both)"
                )


class VLLMWeights(WeightTarget):
    """``engine_model``: the vLLM model object (an in-process engine's); ``hf_config``: the
    policy's transformers config; ``lora_model``: the peft-wrapped HF policy the adapters land
    in (LoRA), or None."""

    def __init__(self, engine_model: nn.Module, hf_config, lora_model: nn.Module | None = None):
        self.engine = engine_model
        self.layout = EngineLayout(engine_model, hf_config)
        self.device = next(engine_model.parameters()).device
        self.lora = ModuleWeights(lora_model) if lora_model is not None else None
        self.lora_model = lora_model
        self.held: tuple | None = None  # (layout key, buffers) of full-weight pushes
        self.manifest: list[ParamSpec] | None = None  # the last push's
        self.loads = 0  # pushes loaded into the engine

    def buffers(self, manifest: list[ParamSpec], bucket_bytes: int) -> list[Tensor]:
        if self.lora is not None:
            return self.lora.buffers(manifest, bucket_bytes)
        key = (tuple(manifest), bucket_bytes)
        if self.held is None or self.held[0] != key:
            self.layout.check(manifest)
            plan = plan_buckets(manifest, bucket_bytes)
            bufs = [torch.zeros(b.nbytes, dtype=torch.uint8, device=self.device) for b in plan]
            self.held = (key, bufs)
        return self.held[1]

    def loaded(self, manifest: list[ParamSpec], bucket_bytes: int) -> None:
        flats = None if self.lora is not None else self.held[1]
        self._load(manifest, flats, bucket_bytes)

    def adopt(self, manifest: list[ParamSpec], regions: list[Tensor], bucket_bytes: int) -> bool:
        """Shared memory: the engine cannot hold views of it, so every push is loaded (a
        copy); True, so every push is hashed when asked."""
        if self.lora is not None:
            self.lora.adopt(manifest, regions, bucket_bytes)
            regions = None
        else:
            self.layout.check(manifest)
        self._load(manifest, regions, bucket_bytes)
        return True

    @torch.no_grad()
    def _load(self, manifest: list[ParamSpec], flats, bucket_bytes: int) -> None:
        if self.lora is not None:
            named = merged_lora_weights(self.lora_model)
        else:
            plan = plan_buckets(manifest, bucket_bytes)
            named = [
                (spec.name, view)
                for bucket, flat in zip(plan, flats)
                for spec, view in zip(bucket.specs, bucket.views(flat))
            ]
        # one call for the whole version: vLLM loads a fused layer's parts as they come
        self.engine.load_weights(iter(named))
        if self.lora is not None:
            for name, want in named:  # the engine holds exactly the merge
                if not torch.equal(self.layout.read(name), want.to(self.device)):
                    raise RuntimeError(
                        f"weight sync: the vLLM engine's {name!r} differs from the merged "
                        f"LoRA weight it was given"
                    )
        self.manifest = manifest
        self.loads += 1

    def checksum(self, manifest: list[ParamSpec]) -> str:
        if self.lora is not None:
            return self.lora.checksum(manifest)
        return checksum(self.layout.read(spec.name) for spec in manifest)


@torch.no_grad()
def merged_lora_weights(peft_model: nn.Module) -> list[tuple[str, Tensor]]:
    """Each LoRA-adapted layer's weight with its adapters merged in, under the base model's
    HF name (``W + get_delta_weight``: what peft's ``merge`` adds)."""
    from peft.tuners.lora import LoraLayer

    out = []
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        base = module.get_base_layer()
        w = base.weight.data
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                w = w + module.get_delta_weight(adapter).to(w.dtype)
        out.append((name.removeprefix(prefix) + ".weight", w))
    return out
