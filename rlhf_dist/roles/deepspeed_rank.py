"""What every DeepSpeed learner rank shares (PPO, SFT and reward-model training alike):
joining the learner's process group, building engines, reductions, gathering under ZeRO-3,
and exporting a model with ``save_pretrained``."""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_dist.config import Config, zero_stage
from rlhf_dist.roles.common import SystemStats, pick_device
from rlhf_dist.weight_sync import host_store


def fused_adam_ok(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on ``device`` (CUDA; CPU since torch 2.4)."""
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([p], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def deepspeed_config(
    cfg: Config,
    lr: float,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    fused_adam: bool = False,
) -> dict:
    """The engine's DeepSpeed config. The optimizer is torch's AdamW (DeepSpeed's fused/CPU
    Adam would compile C++ on first use); ``fused_adam``: its fused kernel, one pass over each
    parameter's memory instead of one per operation (a 30m policy's step on 2 CPU threads:
    23 ms instead of 122 ms, ``benchmarks/learner_update.py``)."""
    adam = {"lr": lr, "weight_decay": cfg.learner.weight_decay, "torch_adam": True}
    if fused_adam:
        adam["fused"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": cfg.learner.max_grad_norm,
        "zero_optimization": {"stage": zero_stage(cfg)},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# The only non-tensor types DeepSpeed writes into its checkpoints (ZeRO 0-3, fp32/bf16).
# Loading with weights_only=True and this allowlist means no arbitrary object is unpickled.
SAFE_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    import importlib

    out = []
    for name in SAFE_CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def safe_load(path: str, map_location=None):
    """``torch.load`` restricted to tensors, plain containers and the allowlist above."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _safe_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeCheckpointEngine()


def _leave_out_tied_frozen(engine) -> None:
    """DeepSpeed's ``exclude_frozen_parameters`` drops the frozen parameters by the names
    ``named_parameters`` gives, which name a tied weight once: its other name (GPT-2's
    ``lm_head.weight``, the embedding) would still be saved. Drop every name of a frozen
    parameter, so a LoRA checkpoint holds the trainable parameters only."""
    frozen = {
        n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad
    }
    module_state_dict = engine.module_state_dict

    def state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        sd = module_state_dict(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name in frozen & sd.keys():
                del sd[name]
        return sd

    engine.module_state_dict = state_dict


def _keep_clip_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 clipping computes the global gradient norm and drops it
    (``get_global_grad_norm()`` stays None); keep it in ``engine.clip_norm`` for the metrics,
    rather than computing it a second time (11 ms per optimizer step of a 30m policy). The
    clipping itself is DeepSpeed's, unchanged."""
    from deepspeed.runtime.utils import clip_grad_norm_

    engine.clip_norm = None

    def clip_fp32_gradients():
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(),
            max_norm=engine.gradient_clipping(),
            mpu=engine.mpu,
        )
        engine.clip_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


class DeepSpeedRank(SystemStats):
    """One data-parallel rank. ``init_distributed`` is collective: call it on every rank."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = pick_device(cfg.learner.num_gpus)
        self.rendezvous = None  # rank 0: the store the ranks meet through, once hosted
        self.base_paths: dict[int, str] = {}  # id(LoRA module) -> its base model (exports)

    def host_rendezvous(self) -> int:
        """Rank 0: host the store the ranks meet through (bound at port 0, so no other process
        can take its port first) and return its port for every rank's ``setup``."""
        assert self.rank == 0, "only rank 0 hosts the rendezvous"
        self.rendezvous = host_store(self.cfg.sync.timeout_s)
        return self.rendezvous.port

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        """Join the ranks' process group through the store rank 0 hosts at ``master_port``
        (``host_rendezvous``; without it rank 0 opens one there), then hand the group to
        DeepSpeed. A process whose group exists already keeps it, as DeepSpeed would."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        if self.device.type == "cpu":
            # Skips compiling DeepSpeed's shared-memory allreduce (about 30 s); gloo is used.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.cfg.sync.timeout_s)
        if not dist.is_initialized():
            if self.rendezvous is not None and self.rendezvous.port != master_port:
                raise ValueError(
                    f"rank 0 hosts its rendezvous on port {self.rendezvous.port}, not {master_port}"
                )
            store = self.rendezvous
            if store is None:  # not hosted ahead: rank 0 opens it at master_port now
                store = dist.TCPStore(
                    master_addr,
                    master_port,
                    self.world_size,
                    is_master=self.rank == 0,
                    timeout=timeout,
                    wait_for_workers=False,
                )
            # What DeepSpeed passes for NCCL with peers: the group is bound to this device.
            bind = {"device_id": self.device} if backend == "nccl" and self.world_size > 1 else {}
            dist.init_process_group(
                backend,
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
                **bind,
            )
        # DeepSpeed takes the group that exists (it initialises none of its own).
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False
        )
        # Same seed on every rank: fresh heads (critic, reward) start identical everywhere.
        torch.manual_seed(self.cfg.run.seed)

    def with_lora(self, model, which: str, kind: str, base_path: str):
        """``model`` wrapped with the LoRA adapters ``which`` (policy, critic, sft, rm) asks
        for (``rlhf_dist.lora``), seeded by ``run.seed`` so every holder starts with the same
        adapters; ``model`` itself when LoRA is off for it."""
        from rlhf_dist import lora

        settings = lora.lora_settings(self.cfg, which)
        if settings is None:
            return model
        model = lora.wrap(model, settings, kind, seed=self.cfg.run.seed)
        self.base_paths[id(model)] = base_path
        return model

    def make_engine(self, model, lr: float, micro_batch_size: int, grad_accum_steps: int):
        """A DeepSpeed engine whose optimizer holds the trainable parameters only (with LoRA:
        the adapters, and a classifier head)."""
        import deepspeed

        config = deepspeed_config(
            self.cfg,
            lr,
            micro_batch_size,
            grad_accum_steps,
            self.world_size,
            fused_adam=fused_adam_ok(self.device),
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) == len(list(model.parameters())):
            trainable = None  # nothing frozen: DeepSpeed's default, as before LoRA
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        engine.checkpoint_engine = _safe_checkpoint_engine()
        if trainable is not None:
            _leave_out_tied_frozen(engine)
        if self.world_size == 1 and zero_stage(self.cfg) == 0:
            # Alone, the ZeRO-0 engine's all-reduce at each accumulation boundary flattens
            # every gradient into a buffer, "reduces" it over one rank and copies it back: an
            # exact no-op that cost 11% of a 10m update. DeepSpeed's own switch for it (set
            # when it has no process group, or by its pipeline engine).
            engine.enable_backward_allreduce = False
        if zero_stage(self.cfg) == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
            _keep_clip_norm(engine)
        return engine

    @staticmethod
    def _has_frozen(engine) -> bool:
        return any(not p.requires_grad for p in engine.module.parameters())

    def save_engines(self, ckpt_dir: str, engines: dict) -> None:
        """Every rank writes its part of each engine's state (collective). Frozen parameters
        (a LoRA base) are left out: they are the base model's files."""
        for name, engine in engines.items():
            engine.save_checkpoint(
                str(Path(ckpt_dir) / name),
                tag="state",
                save_latest=False,
                exclude_frozen_parameters=self._has_frozen(engine),
            )

    def load_engines(self, ckpt_dir: str, engines: dict) -> None:
        """Restore weights, optimizer and scheduler states; raise ``RuntimeError`` naming the
        checkpoint part that cannot be loaded (missing, truncated, or not weights-only)."""
        for name, engine in engines.items():
            path = Path(ckpt_dir) / name
            try:
                loaded, _ = engine.load_checkpoint(
                    str(path),
                    tag="state",
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    # a LoRA engine's checkpoint holds no frozen base: those keys stay as built
                    load_module_strict=not self._has_frozen(engine),
                )
            except Exception as e:  # truncated zip, unpickling refused, shape mismatch...
                raise RuntimeError(f"cannot load {path}: {type(e).__name__}: {e}") from None
            if loaded is None:
                raise RuntimeError(f"cannot load {path}: no engine state found")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def all_reduce_max(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def zero3(self) -> bool:
        return zero_stage(self.cfg) == 3

    def gathered(self, params):
        """Full parameters inside the context (collective under ZeRO-3, a no-op otherwise)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(params) if self.zero3() else nullcontext()

    def full_state(self, module) -> dict | None:
        """The module's full weights on rank 0 as CPU tensors (collective under ZeRO-3)."""
        out = {}
        for name, p in module.named_parameters():
            with self.gathered([p]):
                if self.rank == 0:
                    out[name] = p.detach().cpu().clone()
        return out if self.rank == 0 else None

    def export(self, module, out_dir: str, tokenizer_path: str) -> str | None:
        """``save_pretrained`` (safetensors) plus the tokenizer, written by rank 0 into a
        temporary directory then renamed, so a crash never leaves a half-written model. A LoRA
        model is written merged (plain ``transformers`` loads it), its adapter alone in
        ``adapter/`` (plain ``peft`` loads it onto the base)."""
        from rlhf_dist import lora
        from rlhf_dist.models import load_tokenizer

        state = self.full_state(module)
        if self.rank != 0:
            return None
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        if lora.is_peft(module):  # the merged model, and the adapter alone in adapter/
            lora.export_both(module, state, tmp, self.base_paths.get(id(module), ""))
        else:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        load_tokenizer(tokenizer_path).save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        return str(out)
