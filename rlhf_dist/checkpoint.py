"""Checkpoints of a PPO run: layout, atomic commit, retention, and the driver's state.

    <run_dir>/checkpoints/step-00000010/
        policy/, critic/    DeepSpeed engine states (weights, optimizer, scheduler), every rank;
                            no critic/ when the run has none (a critic-free ``ppo.estimator``)
        state.json          the orchestrator: step, policy version, data cursor, KL controller,
                            ``engines``: the engine directories the checkpoint holds, and
                            ``learner``: the learner ranks and ZeRO stage that wrote them

A checkpoint is written into ``.tmp-step-...`` and renamed into place only when complete, so
a process killed during a save leaves the previous checkpoint intact; leftovers of an
interrupted save are ignored and cleaned up. Nothing is unpickled: ``state.json`` is JSON and
the learner loads engine states with ``torch.load(weights_only=True)`` (see
``rlhf_dist.roles.deepspeed_rank``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlhf_dist.config import Config, ConfigError, zero_stage

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
FORMAT = 1
REQUIRED = ("format", "step", "version", "cursor", "kl_controller")
ENGINES = ("policy", "critic")
"""Engine directories a checkpoint may hold; ``policy`` always."""
LEGACY_ENGINES = ENGINES
"""What a checkpoint whose state.json lists no ``engines`` holds (written before it was
recorded, when every run had a critic)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def name_for(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first (interrupted ``.tmp-*`` saves are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = Path(run_dir) / CHECKPOINTS / f".tmp-{name_for(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep: int) -> Path:
    """Write the driver's state, rename the checkpoint into place, keep the last ``keep``.

    The state records which engine directories were saved (``engines``), so that
    :func:`read_state` requires exactly those: a critic-free run saves no ``critic/``."""
    saved = [part for part in ENGINES if (tmp / part).is_dir()]
    if "policy" not in saved:
        raise CheckpointError(f"checkpoint {tmp}: nothing saved into policy/; not committed")
    state = {"format": FORMAT, **state, "engines": saved}
    with (tmp / STATE_FILE).open("w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in checkpoint_dirs(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    """The driver's state of a checkpoint; :class:`CheckpointError` when it is unusable."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no {STATE_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} is corrupted ({e})") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else REQUIRED
    if missing:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} lacks {', '.join(missing)}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: unknown format {state['format']}")
    engines = state.get("engines", list(LEGACY_ENGINES))
    if not isinstance(engines, list) or "policy" not in engines or set(engines) - set(ENGINES):
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} lists engines {engines!r}")
    for part in engines:
        if not (Path(ckpt) / part).is_dir():
            raise CheckpointError(f"checkpoint {ckpt}: missing {part}/")
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def learner_layout(cfg: Config) -> dict:
    """What shapes the engine states a checkpoint holds: the learner ranks and the ZeRO stage
    (recorded in ``state.json`` as ``learner``)."""
    return {"num_workers": cfg.learner.num_workers, "zero_stage": zero_stage(cfg)}


def layout_from_files(ckpt: str | Path) -> dict | None:
    """The learner layout of a checkpoint written before ``state.json`` recorded it, read from
    DeepSpeed's file names in ``policy/state/``: ZeRO-3 writes a ``zero_pp_rank_<r>_..._model
    _states.pt`` per rank, ZeRO-1/2 one ``mp_rank_00_model_states.pt`` plus a ``zero_pp_rank_
    <r>_..._optim_states.pt`` per rank (the two stages load each other's states; 2 was the
    default), ZeRO-0 the model states alone (rank count unknown: any loads them). None when
    there is no engine state."""
    state = Path(ckpt) / "policy" / "state"
    names = [p.name for p in state.glob("*.pt")] if state.is_dir() else []
    if not names:
        return None
    model = [n for n in names if "zero_pp_rank_" in n and n.endswith("_model_states.pt")]
    optim = [n for n in names if "zero_pp_rank_" in n and n.endswith("_optim_states.pt")]
    if model:
        return {"num_workers": len(model), "zero_stage": 3}
    if optim:
        return {"num_workers": len(optim), "zero_stage": 2}
    return {"num_workers": None, "zero_stage": 0}


def resume_layout(cfg: Config, run_dir: str | Path) -> Config:
    """``cfg`` for resuming ``run_dir``: ``learner.zero_stage=auto`` takes the stage the newest
    checkpoint was written with (a run started at ZeRO-2 under an older default continues at
    ZeRO-2). A set stage that differs, or other learner ranks than ZeRO-1-3 states were
    partitioned over, is a ``ConfigError`` naming the key, raised before any actor starts
    (DeepSpeed cannot load such states). The layout is the one ``state.json`` records, or, for
    a checkpoint written before it did, the one its file names show (``layout_from_files``)."""
    recorded = None
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            recorded = json.loads((ckpt / STATE_FILE).read_text()).get("learner")
        except (OSError, ValueError, AttributeError):
            continue  # unusable: resuming tries the one before, and so does this
        recorded = recorded or layout_from_files(ckpt)
        if recorded is not None:
            break
    if not isinstance(recorded, dict):
        return cfg
    if cfg.learner.zero_stage == "auto":
        cfg.learner.zero_stage = recorded.get("zero_stage")
    check_layout(recorded, cfg, f"the checkpoints in {run_dir}")
    return cfg


def check_layout(recorded: dict, cfg: Config, where: str) -> None:
    """Raise ``ConfigError`` naming the key when engine states written with the ``recorded``
    layout cannot load into learners configured by ``cfg``: another ZeRO stage, or, at ZeRO
    1-3, another number of ranks (ZeRO-0 states are whole on every rank)."""
    saved_stage, saved_ranks = recorded.get("zero_stage"), recorded.get("num_workers")
    stage = zero_stage(cfg)
    if stage != saved_stage:
        raise ConfigError(
            f"learner.zero_stage={cfg.learner.zero_stage}: {where} hold ZeRO-{saved_stage} "
            f"engine states; resume with learner.zero_stage={saved_stage} (or auto)"
        )
    if saved_stage and cfg.learner.num_workers != saved_ranks:
        raise ConfigError(
            f"learner.num_workers={cfg.learner.num_workers}: {where} hold ZeRO-{saved_stage} "
            f"states partitioned over {saved_ranks} learner ranks; resume with "
            f"learner.num_workers={saved_ranks}"
        )
