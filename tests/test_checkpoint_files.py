"""The checkpoint directory protocol and the metrics rollback, without Ray."""

import json

import pytest

from rlhf_dist import checkpoint
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.tracking import Tracker

STATE = {"step": 0, "version": 0, "cursor": {"epoch": 0, "index": 0}, "kl_controller": {}}


def _save(run_dir, step, keep=2, parts=("policy", "critic")):
    tmp = checkpoint.begin(run_dir, step)
    for part in parts:
        (tmp / part).mkdir()
    return checkpoint.commit(tmp, {**STATE, "step": step}, keep)


def test_commit_is_a_rename_and_keeps_the_last_k(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == [
        "step-00000004",
        "step-00000006",
    ]
    assert checkpoint.read_state(checkpoint.checkpoint_dirs(tmp_path)[-1])["step"] == 6


def test_an_interrupted_save_is_invisible_and_cleaned_up(tmp_path):
    _save(tmp_path, 2)
    tmp = checkpoint.begin(tmp_path, 4)  # killed before commit
    (tmp / "policy").mkdir()
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000002"]
    _save(tmp_path, 6)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "has no state.json"),
        ('{"step": 2', "state.json is corrupted"),
        (json.dumps({"format": 1, "step": 2}), "lacks version, cursor, kl_controller"),
        (json.dumps({**STATE, "format": 99}), "unknown format 99"),
    ],
)
def test_damaged_state_is_refused_naming_the_checkpoint(tmp_path, content, message):
    ckpt = _save(tmp_path, 2)
    if content is None:
        (ckpt / "state.json").unlink()
    else:
        (ckpt / "state.json").write_text(content)
    with pytest.raises(checkpoint.CheckpointError, match=f"{ckpt}.*{message}"):
        checkpoint.read_state(ckpt)


def test_missing_engine_state_is_refused(tmp_path):
    ckpt = _save(tmp_path, 2)
    (ckpt / "critic").rmdir()
    with pytest.raises(checkpoint.CheckpointError, match="missing critic/"):
        checkpoint.read_state(ckpt)


def test_state_records_the_engines_saved_and_requires_those(tmp_path):
    both = _save(tmp_path / "gae", 2)
    assert checkpoint.read_state(both)["engines"] == ["policy", "critic"]
    # a critic-free run saves no critic/: its checkpoint is complete without one
    alone = _save(tmp_path / "grpo", 2, parts=("policy",))
    state = checkpoint.read_state(alone)
    assert state["engines"] == ["policy"] and state["step"] == 2
    # ... but still needs what it saved
    (alone / "policy").rmdir()
    with pytest.raises(checkpoint.CheckpointError, match="missing policy/"):
        checkpoint.read_state(alone)


def test_checkpoint_without_engines_list_needs_policy_and_critic(tmp_path):
    """state.json written before ``engines`` was recorded: every run then had a critic."""
    ckpt = _save(tmp_path, 2)
    legacy = json.loads((ckpt / "state.json").read_text())
    del legacy["engines"]
    (ckpt / "state.json").write_text(json.dumps(legacy))
    assert checkpoint.read_state(ckpt)["step"] == 2
    (ckpt / "critic").rmdir()
    with pytest.raises(checkpoint.CheckpointError, match="missing critic/"):
        checkpoint.read_state(ckpt)


@pytest.mark.parametrize("engines", [[], ["critic"], ["policy", "value_head"], "policy"])
def test_bad_engines_list_refused(tmp_path, engines):
    ckpt = _save(tmp_path, 2)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "engines": engines}))
    with pytest.raises(checkpoint.CheckpointError, match="lists engines"):
        checkpoint.read_state(ckpt)


def test_commit_without_policy_refused(tmp_path):
    tmp = checkpoint.begin(tmp_path, 2)
    (tmp / "critic").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="nothing saved into policy/"):
        checkpoint.commit(tmp, STATE, 2)
    assert checkpoint.checkpoint_dirs(tmp_path) == []


def test_rollback_sets_later_ppo_rows_aside_and_keeps_other_stages(tmp_path):
    cfg = load_config(None, ["wandb.enabled=false"])
    t = Tracker(cfg, tmp_path)
    t.log({"stage": "sft", "step": 9, "sft/loss": 1.0})
    for step in range(0, 5):
        t.log({"stage": "ppo", "step": step, "x": step})
    t.file.write('{"stage": "ppo", "step": 5, "x"')  # a line cut short by a kill
    t.file.flush()
    assert t.rollback(2) == 3
    t.log({"stage": "ppo", "step": 3, "x": 30})
    t.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 9)] + [
        ("ppo", s) for s in (0, 1, 2, 3)
    ]
    aside = (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert len(aside) == 3 and aside[-1].startswith('{"stage": "ppo", "step": 5')


def _save_layout(run_dir, step, layout):
    tmp = checkpoint.begin(run_dir, step)
    (tmp / "policy").mkdir()
    state = {**STATE, "step": step} | ({"learner": layout} if layout else {})
    return checkpoint.commit(tmp, state, 3)


def test_resume_takes_the_checkpoints_zero_stage_when_auto(tmp_path):
    _save_layout(tmp_path, 2, {"num_workers": 1, "zero_stage": 2})  # an older default's run
    cfg = checkpoint.resume_layout(load_config(None, []), tmp_path)
    assert cfg.learner.zero_stage == 2
    # a fresh run directory: auto stays auto (0 for one rank)
    fresh = checkpoint.resume_layout(load_config(None, []), tmp_path / "new")
    assert fresh.learner.zero_stage == "auto"
    # the newest checkpoint decides; one with an unreadable state.json is passed over
    _save_layout(tmp_path, 4, {"num_workers": 1, "zero_stage": 0})
    _save_layout(tmp_path, 6, {"num_workers": 1, "zero_stage": 3})
    (tmp_path / "checkpoints" / "step-00000006" / "state.json").write_text("{trunc")
    assert checkpoint.resume_layout(load_config(None, []), tmp_path).learner.zero_stage == 0


def test_resume_refuses_a_layout_the_engine_states_cannot_load(tmp_path):
    _save_layout(tmp_path, 2, {"num_workers": 1, "zero_stage": 0})
    with pytest.raises(ConfigError, match=r"learner.zero_stage=2: .* ZeRO-0 .*zero_stage=0"):
        checkpoint.resume_layout(load_config(None, ["learner.zero_stage=2"]), tmp_path)
    # ZeRO-0 states are whole on every rank: another rank count loads them
    cfg = checkpoint.resume_layout(load_config(None, ["learner.num_workers=2"]), tmp_path)
    assert cfg.learner.zero_stage == 0
    other = tmp_path / "z2"
    _save_layout(other, 2, {"num_workers": 2, "zero_stage": 2})
    with pytest.raises(ConfigError, match=r"learner.num_workers=1: .* over 2 learner ranks"):
        checkpoint.resume_layout(load_config(None, []), other)


@pytest.mark.parametrize(
    "files, stage, ranks",
    [
        # DeepSpeed's names, as its save_checkpoint writes them at each stage
        (["mp_rank_00_model_states.pt"], 0, None),
        (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 2, 1),
        (
            [
                f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt"
                for r in (0, 1)
                for k in ("model", "optim")
            ],
            3,
            2,
        ),
    ],
)
def test_a_checkpoint_without_a_recorded_layout_is_read_from_its_files(
    tmp_path, files, stage, ranks
):
    ckpt = _save_layout(tmp_path, 2, None)  # written before the layout was recorded
    assert checkpoint.layout_from_files(ckpt) is None  # no engine state: nothing to go by
    (ckpt / "policy" / "state").mkdir()
    for name in files:
        (ckpt / "policy" / "state" / name).write_bytes(b"")
    assert checkpoint.layout_from_files(ckpt) == {"num_workers": ranks, "zero_stage": stage}
    cfg = load_config(None, [f"learner.num_workers={ranks or 1}"])
    assert checkpoint.resume_layout(cfg, tmp_path).learner.zero_stage == stage
