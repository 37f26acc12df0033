"""``RunState``: a checkpoint's state goes back in whole (``load_state_dict``), and an in-job
rewind (a rebuilt learner group) goes back to it but keeps counting the faults."""

from rlhf_dist.config import load_config
from rlhf_dist.driver.run_state import FAULT_COUNTERS, RunState


def _state():
    cfg = load_config(None, ["ppo.adaptive_kl=true", "ppo.kl_target=0.1", "ppo.kl_horizon=10"])
    return RunState.initial(cfg, 7)


def _advance(state, steps):
    for _ in range(steps):
        state.take_prompts(3)
        state.step += 1
        state.version += 1
        state.kl_ctl.update(2.0, 8)
        state.counters.prompts_trained += 3


def test_rewind_restores_everything_but_the_fault_counters():
    state = _state()
    _advance(state, 2)
    saved = state.state_dict()
    taken_next = _state()
    taken_next.load_state_dict(saved)
    expected_prompts = taken_next.take_prompts(3)
    _advance(state, 3)
    state.counters.restarts, state.counters.learner_restarts = 4, 1
    state.counters.redone_chunks = 2
    state.rewind(saved)
    assert (state.step, state.version) == (2, 2)
    assert state.kl_ctl.state_dict() == saved["kl_controller"]
    assert state.counters.prompts_trained == 6 and state.counters.prompts_consumed == 6
    assert state.take_prompts(3) == expected_prompts  # the data cursor went back too
    # what happened is still counted
    assert {k: getattr(state.counters, k) for k in FAULT_COUNTERS} == {
        "restarts": 4,
        "learner_restarts": 1,
        "redone_chunks": 2,
    }


def test_load_state_dict_restores_the_fault_counters_too():
    state = _state()
    _advance(state, 1)
    state.counters.restarts = 3
    saved = state.state_dict()
    fresh = _state()
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    # an older state without a counter reads it as 0
    old = {k: v for k, v in saved.items() if k != "learner_restarts"}
    fresh.load_state_dict(old)
    assert fresh.counters.learner_restarts == 0 and fresh.counters.restarts == 3
