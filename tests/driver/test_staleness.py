"""The async loop's staleness rule without Ray: a chunk goes to a generator only while the
version it holds lags the version that will train the chunk's step by at most
``async.max_staleness``, and only while the samples queued stay within ``async.queue_samples``."""

import pytest

from rlhf_dist.config import load_config, validate
from rlhf_dist.driver.async_loop import AsyncLoop, fresh_enough
from rlhf_dist.driver.run_state import RunState
from rlhf_dist.inputs import Inputs


class FakeGenerators:
    """The generator group's face the loop uses; a submitted chunk is a token in ``calls``."""

    def __init__(self, n: int):
        self.ids = list(range(n))
        self.calls: list[tuple[int, tuple]] = []
        self.on_dispatch = None

    def __len__(self) -> int:
        return len(self.ids)

    def worker_id(self, slot: int) -> int:
        return self.ids[slot]

    def holds(self, slot: int, worker_id: int) -> bool:
        return slot < len(self.ids) and self.ids[slot] == worker_id

    def submit(self, slot, chunk, prompts, samples):
        self.calls.append((slot, tuple(chunk.prompt_ids)))
        return object()


def _loop(max_staleness: int, queue_samples: int = 0, generators: int = 2):
    cfg = load_config(
        None,
        [
            "mode=async",
            f"async.max_staleness={max_staleness}",
            f"async.queue_samples={queue_samples}",
            f"rollout.num_workers={generators}",
            "rollout.prompts_per_step=4",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
            "run.steps=10",
        ],
    )
    state = RunState.initial(cfg, 100)
    inputs = Inputs("p", "t", "c", [f"prompt {i}" for i in range(100)], 0)
    gens = FakeGenerators(generators)
    return AsyncLoop(cfg, validate(cfg), state, inputs, gens, None, None), gens


def _finish(loop, slot):
    """The chunk in flight on ``slot`` came back (what ``_collect`` does with a result)."""
    ref = next(r for r, (s, *_) in loop.inflight.items() if s == slot)
    _, _, b, c = loop.inflight.pop(ref)
    loop.steps_open[b].results[c] = ["sample"] * loop._chunk_samples(b, c)
    loop.steps_open[b].owner[c] = slot


@pytest.mark.parametrize(
    "lag, bound, ok", [(0, 0, True), (1, 0, False), (1, 1, True), (3, 2, False)]
)
def test_fresh_enough(lag, bound, ok):
    assert fresh_enough(5 + lag, 5, bound) is ok


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_generators_run_at_most_max_staleness_steps_ahead(max_staleness):
    loop, gens = _loop(max_staleness, queue_samples=1000)
    loop._dispatch()
    assert sorted(loop.steps_open) == [0] and len(gens.calls) == 2  # step 0's two chunks
    # the generators hold version 0; step b will be trained by version b
    sampled = set()
    for _ in range(6):
        sampled |= {b for _, _, b, _ in loop.inflight.values()}
        for slot in {s for s, *_ in loop.inflight.values()}:
            _finish(loop, slot)
        loop._dispatch()
    assert max(sampled) == max_staleness and not loop.inflight  # nothing more may go out
    assert all(fresh_enough(b, 0, max_staleness) for b in sampled)
    # the weights move on: a sync to version 1 lets them take the next step
    loop.holds = [1, 1]
    loop._dispatch()
    assert {b for _, _, b, _ in loop.inflight.values()} == {max_staleness + 1}


def test_the_queue_bound_holds_back_new_chunks_but_not_lost_ones():
    # 4 prompts x 1 sample a step, 2 chunks of 2: a queue of 4 samples holds one step
    loop, gens = _loop(max_staleness=5, queue_samples=4)
    loop._dispatch()
    _finish(loop, 0)
    _finish(loop, 1)
    loop._dispatch()
    assert not loop.inflight  # 4 samples queued and untrained: no room for step 1
    # a lost chunk is redone whatever the fill
    loop.todo.appendleft((0, 1))
    loop.redo.add((0, 1))
    loop.steps_open[0].results[1] = None
    loop._dispatch()
    assert [(s, b, c) for s, _, b, c in loop.inflight.values()] == [(0, 0, 1)]


def test_a_replaced_generator_is_not_waited_for_and_a_lost_one_gets_no_chunk():
    loop, gens = _loop(max_staleness=1)
    loop._dispatch()
    ref = next(r for r, (s, *_) in loop.inflight.items() if s == 1)
    slot, worker, b, c = loop.inflight.pop(ref)
    loop.lost[slot] = worker  # its worker died: no chunk for it until it is replaced
    loop.todo.appendleft((b, c))
    loop.redo.add((b, c))
    loop._dispatch()
    assert all(s != 1 for s, *_ in loop.inflight.values())
    gens.ids[1] = 99  # replaced (say, during an evaluation): the slot takes work again
    loop._dispatch()
    assert [(s, b2, c2) for s, _, b2, c2 in loop.inflight.values() if s == 1] == [(1, b, c)]
