"""The generator group's push when generators are lost during it, without Ray: the lost ones
are replaced (each paid from the restart budget), a collective group forms again, the push
is tried again until it goes through, and what it moved is counted once per try."""

import pytest

from rlhf_dist.config import load_config
from rlhf_dist.driver.errors import RestartsExhausted, WeightSyncError
from rlhf_dist.driver.generator_group import GeneratorGroup
from rlhf_dist.driver.run_state import Counters, RestartBudget
from rlhf_dist.driver.sync_group import PushOutcome
from rlhf_dist.inputs import Inputs
from tests.driver.fakes import FakePool


class FakeSync:
    """A weight-sync group whose pushes come out as scripted."""

    def __init__(self, outcomes, collective=True, bytes_per_push=100):
        self.outcomes = list(outcomes)
        self.collective, self.bytes_per_push = collective, bytes_per_push
        self.pushes, self.forms = [], 0
        self.version = None
        self.on_dispatch = None

    def form(self, generators) -> bool:
        self.forms += 1
        return True

    def push(self, generators, version) -> PushOutcome:
        self.pushes.append((tuple(generators), version))
        out = self.outcomes.pop(0)
        if not out.lost and not out.regroup:
            self.version = version
        return out


def _group(n=3, max_restarts=5):
    cfg = load_config(None, [f"rollout.num_workers={n}", f"run.max_restarts={max_restarts}"])
    counters = Counters()
    budget = RestartBudget(counters, cfg.run.max_restarts)
    inputs = Inputs("p", "t", "c", ["x"], 0)
    return GeneratorGroup(cfg, inputs, budget, pool=FakePool(n)), counters


def test_generators_lost_during_a_push_are_replaced_and_the_push_redone():
    gens, counters = _group()
    sync = FakeSync([PushOutcome(lost=[1]), PushOutcome(lost=[0, 2]), PushOutcome(compute_s=0.5)])
    gens.connect(sync)
    forms = sync.forms
    assert gens.push(7) == 0.5
    assert gens.pool.replaced == [1, 0, 2] and counters.restarts == 3
    assert sync.forms == forms + 2  # a collective group formed again after each loss
    # every try went to the generators of that moment, the replacements included
    assert [v for _, v in sync.pushes] == [7, 7, 7]
    assert sync.pushes[0][0] == ("worker-0", "worker-1", "worker-2")
    assert sync.pushes[-1][0] == ("worker-5", "worker-4", "worker-6")
    assert gens.pushed_bytes == 300 and sync.version == 7


def test_over_shared_memory_a_replacement_opens_its_receiver_before_the_push_again():
    """No group breaks over shared memory, but the replacement must open its receiver (the
    channel) before the next push reaches it: the group is formed again (opened) after every
    replacement and after a change of transport."""
    gens, counters = _group()
    sync = FakeSync([PushOutcome(lost=[2]), PushOutcome(regroup=True), PushOutcome()], False, 0)
    gens.connect(sync)
    forms = sync.forms
    gens.push(1)
    assert gens.pool.replaced == [2] and counters.restarts == 1
    assert sync.forms == forms + 2


def test_a_push_that_keeps_losing_generators_ends_at_the_restart_budget():
    gens, counters = _group(max_restarts=2)
    gens.connect(FakeSync([PushOutcome(lost=[0])] * 5))
    with pytest.raises(RestartsExhausted, match="run.max_restarts=2"):
        gens.push(1)
    assert counters.restarts == 3


class TrackingSync(FakeSync):
    """A weight-sync group that knows which version each worker received: a worker started
    since the last push holds version 0."""

    def __init__(self, pool):
        super().__init__([], collective=True)
        self.pool, self.held = pool, {}

    def push(self, generators, version) -> PushOutcome:
        self.pushes.append((tuple(generators), version))
        self.held.update({w: version for w in self.pool.worker_ids})
        self.version = version
        return PushOutcome()

    def verify_held(self, generators, version) -> None:
        for slot, worker in enumerate(self.pool.worker_ids):
            if self.held.get(worker, 0) != version:
                raise WeightSyncError(f"generator {slot} holds version {self.held.get(worker, 0)}")


def test_a_healed_generator_is_checked_to_hold_the_learners_weights_before_it_samples():
    """``_heal`` (a generator lost while sampling): replaced, joined, pushed, and then every
    generator is checked to hold the current version. Planted: a heal that forgets the push
    (the mutation check's "replacement samples with stale weights", which a kill test misses
    when a surviving generator drains the queue) is caught at once."""
    gens, _ = _group()
    sync = TrackingSync(gens.pool)
    gens.connect(sync)
    gens.push(4)
    assert gens._heal([1], busy=False) == [1] and sync.held[gens.pool.worker_ids[1]] == 4
    gens.push = lambda version: 0.0  # planted: the heal's push does nothing
    with pytest.raises(WeightSyncError, match="generator 2 holds version 0"):
        gens._heal([2], busy=False)
