"""LoRA with ``peft``: which layers get adapters, wrapping a model, and exporting it both ways
(the merged model, which plain ``transformers`` loads, and the adapter alone, which plain
``peft`` loads onto the base).

Every side that holds a LoRA policy (learner ranks, generators) wraps it here with the same
settings and the same seed, so their parameter names agree (the weight-sync manifest is the
adapters' names) and their initial adapters are equal bit for bit.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

HEADS = ("lm_head", "classifier", "score")
"""Output heads: never given adapters. A classifier head (the critic's, the reward model's) is
fresh, so it trains in full (peft's ``modules_to_save``)."""

KINDS = {"causal": "CAUSAL_LM", "token_cls": "TOKEN_CLS", "seq_cls": "SEQ_CLS"}
"""The model kinds this project wraps: policy, critic (value head), reward model."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    key: str = "model.lora"  # the config keys' prefix, for error messages

    @property
    def scale_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The suffix names of every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) but the
    output heads."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, _linear_types()) and leaf not in HEADS:
            names.add(leaf)
    return sorted(names)


def target_modules(model: nn.Module, lora: LoraSettings) -> list[str]:
    """The layers to wrap: ``lora.target_modules`` (each must match some module, by full name
    or name suffix), or every linear layer but the heads. Raises ``ValueError`` naming the
    config key."""
    key = f"{lora.key}_target_modules"
    if not lora.target_modules:
        names = linear_layer_names(model)
        if not names:
            raise ValueError(
                f"{key}: {type(model).__name__} has no linear layer to put adapters on; name "
                f"the layers in {key}"
            )
        return names
    module_names = [n for n, _ in model.named_modules() if n]
    for t in lora.target_modules:
        if not any(n == t or n.endswith("." + t) for n in module_names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
            raise ValueError(
                f"{key}: {t!r} matches no module of {type(model).__name__} "
                f"(its module names end in: {', '.join(leaves)})"
            )
    return list(lora.target_modules)


def peft_config(model: nn.Module, lora: LoraSettings, kind: str):
    from peft import LoraConfig

    heads = [h for h in HEADS[1:] if hasattr(model, h)] if kind != "causal" else None
    targets = target_modules(model, lora)
    conv1d = _linear_types()[1]
    wrapped = [
        m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
    ]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight transposed
        fan_in_fan_out=bool(wrapped) and all(isinstance(m, conv1d) for m in wrapped),
        modules_to_save=heads or None,
        task_type=KINDS[kind],
    )


def wrap(model: nn.Module, lora: LoraSettings, kind: str, seed: int = 0):
    """``model`` as a ``peft`` LoRA model: the base frozen, the adapters (and a classifier
    head) trainable, the adapters initialised from ``seed``. Raises ``ValueError`` naming
    the config key when peft cannot wrap it."""
    from peft import get_peft_model

    config = peft_config(model, lora, kind)
    torch.manual_seed(seed)
    try:
        # adapters in the base's dtype (model.dtype), as DeepSpeed's bf16 engine holds them:
        # the generators' copy must have the learner's dtypes for the sync's manifest
        return get_peft_model(model, config, autocast_adapter_dtype=False)
    except (ValueError, TypeError, NotImplementedError) as e:
        key = f"{lora.key}_target_modules" if lora.target_modules else f"{lora.key}_rank"
        raise ValueError(
            f"{key}: peft cannot put LoRA adapters on {', '.join(config.target_modules)} of "
            f"{type(model).__name__} ({type(e).__name__}: {e})"
        ) from None


def check_wrappable(model_path: str, lora: LoraSettings, kind: str) -> None:
    """What ``wrap`` would refuse, found on an empty (meta-device) model built from the
    config alone: raises ``ValueError`` naming the key."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    auto = {
        "causal": AutoModelForCausalLM,
        "token_cls": AutoModelForTokenClassification,
        "seq_cls": AutoModelForSequenceClassification,
    }[kind]
    config = AutoConfig.from_pretrained(model_path)
    if kind != "causal":
        config.num_labels = 1
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except ValueError as e:
        raise ValueError(f"{lora.key}_rank: cannot build {model_path!r} as {kind}: {e}") from None
    wrap(model, lora, kind)


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model. Without peft imported no model can be one, so a
    plain model's export needs no peft (the GPU image has none unless the bundle brings it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def export_both(module: nn.Module, state: dict, out: Path, base_path: str = "") -> None:
    """Write a LoRA model, whose full state (``named_parameters`` names, CPU tensors) is
    ``state``, as the merged model into ``out`` (``save_pretrained``, safetensors) and the
    adapter alone into ``out/adapter`` (``PeftModel.save_pretrained``: its config names
    ``base_path`` as the base). Built on a CPU copy: ``module`` (perhaps partitioned by
    ZeRO-3) is left as it is."""
    from peft import get_peft_model

    inner = module.get_base_model()
    config = copy.deepcopy(module.peft_config["default"])
    if base_path:
        config.base_model_name_or_path = base_path
    base = type(inner)(copy.deepcopy(inner.config))
    peft_model = get_peft_model(base, config)
    missing, unexpected = peft_model.load_state_dict(state, strict=False)
    held = {n for n, _ in peft_model.named_parameters()}
    if unexpected or any(n in held for n in missing):
        raise RuntimeError(f"export: state does not fit the model ({missing}, {unexpected})")
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


LORA_KEYS = {
    "policy": ("model", "lora_"),
    "critic": ("model", "critic_lora_"),
    "sft": ("sft", "lora_"),
    "rm": ("rm", "lora_"),
}
"""Where each model's LoRA settings live: (config section, field prefix)."""


def lora_settings(cfg, which: str) -> LoraSettings | None:
    """The LoRA settings of ``which`` (policy, critic, sft, rm); None when LoRA is off."""
    section, prefix = LORA_KEYS[which]
    sec = getattr(cfg, section)
    rank = getattr(sec, f"{prefix}rank")
    if rank <= 0:
        return None
    return LoraSettings(
        rank=rank,
        alpha=getattr(sec, f"{prefix}alpha"),
        dropout=getattr(sec, f"{prefix}dropout"),
        target_modules=tuple(getattr(sec, f"{prefix}target_modules")),
        key=f"{section}.{prefix}".rstrip("_"),
    )
