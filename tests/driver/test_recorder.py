"""``Recorder.book`` on hand-built step outcomes, without Ray: what a step's outcome does to the
counters, the KL controller, the metric rows and the sample ledger, for a trained step and for
skipped ones."""

import json

import pytest

from rlhf_dist import metric_keys as K
from rlhf_dist.config import load_config
from rlhf_dist.driver.errors import NonFiniteSteps
from rlhf_dist.driver.recorder import Recorder
from rlhf_dist.driver.run_state import RunState
from rlhf_dist.ledger import SampleLedger, read_ledger
from rlhf_dist.tracking import Tracker
from tests.driver.fakes import outcome, scored_batch

N_PROMPTS = 10


def _recorder(tmp_path, *overrides, evaluate=lambda step: None):
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
            "ppo.adaptive_kl=true",
            "ppo.kl_target=0.1",
            "ppo.kl_horizon=100",
            "wandb.enabled=false",
            "run.max_bad_steps=2",
            *overrides,
        ],
    )
    state = RunState.initial(cfg, N_PROMPTS)
    tracker = Tracker(cfg, tmp_path)
    ledger = SampleLedger(tmp_path, N_PROMPTS, 2)
    rec = Recorder(cfg, state, tracker, ledger, clock=lambda: 7.0, evaluate=evaluate)
    return cfg, state, rec


def _step(state, kl=0.5, skipped=()):
    """What a loop does before yielding: take the step's prompts, train, count the step."""
    ids = state.take_prompts(2)
    position = state.data_position()
    state.step += 1
    if not skipped:
        state.version += 1
    return outcome(scored_batch(ids, 2, version=state.version - 1), position, kl, skipped)


def _rows(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_trained_step_moves_the_counters_the_kl_controller_and_the_ledger(tmp_path):
    cfg, state, rec = _recorder(tmp_path)
    kl_before = state.kl_ctl.value
    row = rec.book(_step(state, kl=0.5))
    rec.tracker.close()
    assert state.counters.prompts_trained == 2 and state.counters.prompts_consumed == 2
    # the adaptive controller saw the step's KL per sequence (0.5 > target 0.1: it grows)
    assert state.kl_ctl.value > kl_before
    assert row[K.KL_COEF] == kl_before  # the row holds the coefficient the step trained with
    assert row[K.VERSION] == 1 and row[K.TIME_GENERATE] == 0.1 and row[K.ELAPSED] == 7.0
    assert _rows(tmp_path) == [json.loads(json.dumps(row))]
    ledger = read_ledger(tmp_path)
    assert len(ledger) == 4 and not any(r.get("dropped") for r in ledger)
    assert [(r["row"], r["sample"]) for r in ledger] == [
        (i, s)
        for i in sorted({r["row"] for r in ledger}, key=[r["row"] for r in ledger].index)
        for s in (0, 1)
    ]
    assert {r["step"] for r in ledger} == {1} and {r["staleness"] for r in ledger} == {0}


def test_skipped_steps_are_booked_as_such_and_too_many_in_a_row_stop_the_run(tmp_path):
    cfg, state, rec = _recorder(tmp_path)
    kl_before = state.kl_ctl.value
    row = rec.book(_step(state, skipped=("advantages",)))
    assert row[K.SKIP_REASON] == "advantages" and K.KL not in row
    c = state.counters
    assert (c.skipped_steps, c.bad_streak, c.prompts_trained) == (1, 1, 0)
    assert state.kl_ctl.value == kl_before  # nothing trained, nothing learned of the KL
    # the ledger says the step's samples were not trained
    assert {r.get("dropped") for r in read_ledger(tmp_path)} == {"nonfinite_step"}
    rec.book(_step(state))  # a good step ends the streak
    assert (c.skipped_steps, c.bad_streak, c.prompts_trained) == (1, 0, 2)
    rec.book(_step(state, skipped=("scores",)))
    with pytest.raises(NonFiniteSteps, match="2 consecutive PPO steps had non-finite logprobs"):
        rec.book(_step(state, skipped=("logprobs",)))
    rec.tracker.close()
    assert [r.get(K.SKIP_REASON) for r in _rows(tmp_path)] == [
        "advantages",
        None,
        "scores",
        "logprobs",
    ]


def test_the_evaluation_lands_in_the_row_of_the_steps_it_is_due(tmp_path):
    due = {2}
    cfg, state, rec = _recorder(
        tmp_path, evaluate=lambda step: {K.GOLD: 0.5, K.GOLD_STDERR: 0.1} if step in due else None
    )
    rows = [rec.book(_step(state)) for _ in range(3)]
    rec.tracker.close()
    assert [K.GOLD in r for r in rows] == [False, True, False]
    assert rows[1][K.GOLD] == 0.5 and K.TIME_EVAL in rows[1] and K.TIME_EVAL not in rows[0]


def test_a_step_the_learner_did_not_train_whole_is_booked_then_refused(tmp_path):
    """The learner's count of what it trained is checked against the batch: a sample it
    skipped (0 passes) is booked in the ledger as such, then the run stops, naming it."""
    cfg, state, rec = _recorder(tmp_path)
    out = _step(state)
    out.train.trained = [1, 0, 1, 1]
    with pytest.raises(RuntimeError, match=r"samples \[1\] not 1 times"):
        rec.book(out)
    assert [r["updates"] for r in read_ledger(tmp_path)] == [1, 0, 1, 1]
    # a skipped step trained nothing, as the learner says: booked as not trained
    cfg, state, rec = _recorder(tmp_path / "skip")
    rec.book(_step(state, skipped=("scores",)))
    assert {r["updates"] for r in read_ledger(tmp_path / "skip")} == {0}
