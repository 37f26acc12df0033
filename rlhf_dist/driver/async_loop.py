"""Asynchronous mode: generators sample continuously while the learner trains.

The prompts of step ``b`` (0-based) are taken from the cursor as in synchronous mode, cut into
the same chunks with the same seeds. Each generator has one chunk in flight and is handed the
next as soon as it returns one, while the learner trains on the last complete batch. After each
update the new weights are broadcast; a generator receives them between two chunks (its
receive call queues behind the chunk it is sampling).

Bounded staleness. Step ``b`` is trained by the policy of version ``v_b`` (``v_b = b`` when no
step was skipped). A chunk of step ``b`` goes to a generator only when the version that
generator will hold, ``g``, satisfies ``v_b - g <= async.max_staleness``, and only while the
samples generated or being generated and not yet trained stay within ``async.queue_samples``.
So generation runs at most ``max_staleness`` steps ahead of the learner, and with
``max_staleness=0`` every chunk is sampled by the very weights synchronous mode would use: the
two modes train on the same samples. Should a chunk still arrive too old (it cannot under this
rule; the check guards it), its samples are dropped, counted in ``async/dropped_stale``, and
its prompts sampled again.

Lost generators: a chunk whose generator died goes back to the front of the queue; the dead
generator is replaced just before the next weight sync (the learner is idle then), so the new
one joins the sync group and receives the current weights before it samples.

A weight sync (and a new sync group) is entered while generators may still be sampling a
chunk: each joins once its chunk is done, so a chunk must take well under ``sync.timeout_s``.
Autoscaling is a sync-mode rule (it reads the share of the step spent generating).

Checkpoints lose nothing: ``pending_state`` waits for the chunks in flight and hands the
checkpoint every opened step's chunks, the samples already generated for them (with the
versions that generated them) and the queue; the cursor is saved as it stands, past those
steps. A resumed loop (``load_pending``) trains those very samples, so every prompt is trained
exactly ``samples_per_prompt`` times across a kill, at any staleness.
The loop uses the groups' public methods only (docs/architecture.md, "The asynchronous step").
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from rlhf_dist import metric_keys as K
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.dispatch import LOST, Chunk, chunk_plan, derive_seed, raise_if_broken
from rlhf_dist.driver.outcome import StepLoop, StepOutcome, publish
from rlhf_dist.ledger import chunk_origins


def fresh_enough(train_version: int, sampled_by: int, max_staleness: int) -> bool:
    """The staleness rule: samples of policy version ``sampled_by`` may be trained by version
    ``train_version`` when they lag it by at most ``max_staleness`` versions. A chunk goes to a
    generator only when the version it will hold passes it, and a chunk that arrives too old
    anyway is dropped and sampled again."""
    return train_version - sampled_by <= max_staleness


@dataclass
class _Step:
    """The chunks of one step's prompts and what became of them."""

    chunks: list[Chunk]
    data_position: dict  # the cursor, and the prompts consumed, once this step's were taken
    results: list = field(default_factory=list)
    owner: list = field(default_factory=list)  # generator slot that sampled each chunk

    def __post_init__(self):
        self.results = [None] * len(self.chunks)
        self.owner = [-1] * len(self.chunks)

    def complete(self) -> bool:
        return all(r is not None for r in self.results)


class AsyncLoop(StepLoop):
    def __init__(self, *parts):
        super().__init__(*parts)
        self.samples = self.cfg.rollout.samples_per_prompt
        self.max_staleness = self.cfg.async_.max_staleness
        self.steps_open: dict[int, _Step] = {}  # step index -> its chunks
        self.todo: deque[tuple[int, int]] = deque()  # (step, chunk) waiting for a generator
        # each chunk in flight: (generator slot, its worker id, step, chunk)
        self.inflight: dict[ray.ObjectRef, tuple[int, int, int, int]] = {}
        # generator slot -> the id of its lost worker, replaced before the next sync (unless a
        # replacement already took its place, e.g. during an evaluation)
        self.lost: dict[int, int] = {}
        self.redo: set[tuple[int, int]] = set()  # chunks to sample again (lost or too old)
        self.next_open = self.state.step  # next step whose prompts are taken
        self.next_prepare = self.state.step  # next step to assemble and score
        self.dropped_stale = 0
        self.dropped: list[tuple] = []  # (chunk, "stale"): dropped as too stale, for the ledger
        self.queue_max = 0
        self.score_s: dict[int, float] = {}  # step -> seconds its batch took to score
        # the version each generator slot will sample with
        self.holds = [self.state.version] * len(self.generators)

    # ----------------------------------------------------------------- bookkeeping

    def _open_step(self) -> None:
        b = self.next_open
        ids = self.state.take_prompts(self.cfg.rollout.prompts_per_step)
        chunks = chunk_plan(ids, self.sizes.chunk_prompts, self.cfg.run.seed, "rollout", b)
        self.steps_open[b] = _Step(chunks, self.state.data_position())
        self.todo.extend((b, c) for c in range(len(chunks)))
        self.next_open += 1

    def _train_version(self, b: int) -> int:
        """The policy version that will train step ``b``, if no step in between is skipped
        (a skipped step only lowers it, so the bound holds): one more per step before it."""
        return self.state.version + (b - self.state.step)

    def _outstanding(self) -> int:
        """Samples generated or being generated and not yet trained (the queue's fill)."""
        n = 0
        for st in self.steps_open.values():
            n += sum(len(r) for r in st.results if r is not None)
        for _, _, b, c in self.inflight.values():
            n += self._chunk_samples(b, c)
        return n

    def _chunk_samples(self, b: int, c: int) -> int:
        return len(self.steps_open[b].chunks[c].prompt_ids) * self.samples

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        gens = self.generators
        busy = {slot for slot, _, _, _ in self.inflight.values()}
        # generators added since the last sync were given the current weights
        self.holds += [self.state.version] * (len(gens) - len(self.holds))
        for slot in range(len(gens)):
            if slot in busy or (slot in self.lost and gens.holds(slot, self.lost[slot])):
                continue
            if not self.todo and self.next_open < self.cfg.run.steps:
                self._open_step()
            if not self.todo:
                return
            b, c = self.todo[0]
            if not fresh_enough(self._train_version(b), self.holds[slot], self.max_staleness):
                continue  # this generator's weights would be too old for step b
            # A lost chunk is redone whatever the fill: the queue may hold later steps' samples
            # that cannot be trained before it (waiting would never end).
            full = self._outstanding() + self._chunk_samples(b, c) > self.sizes.queue_samples
            if full and (b, c) not in self.redo:
                return
            self.redo.discard((b, c))
            self.todo.popleft()
            chunk = self.steps_open[b].chunks[c]
            ref = gens.submit(slot, chunk, self.inputs.prompts, self.samples)
            self.inflight[ref] = (slot, gens.worker_id(slot), b, c)
            if gens.on_dispatch is not None:
                gens.on_dispatch("rollout", slot, c)
        self.queue_max = max(self.queue_max, self._outstanding())

    def _collect(self, ref) -> None:
        slot, worker, b, c = self.inflight.pop(ref)
        gens = self.generators
        try:
            self.steps_open[b].results[c] = ray.get(ref)
            self.steps_open[b].owner[c] = slot
        except LOST as e:
            raise_if_broken(e, "rollout")
            self.todo.appendleft((b, c))
            self.redo.add((b, c))
            gens.budget.redone(1)
            if gens.holds(slot, worker):  # not replaced already
                self.lost[slot] = worker

    # ----------------------------------------------------------------- sync

    def _heal_and_sync(self, version: int) -> float:
        """Replace lost generators (now: the learner is idle), then broadcast ``version``."""
        gens = self.generators
        lost = sorted(s for s, w in self.lost.items() if gens.holds(s, w))
        self.lost.clear()
        if lost:
            gens.replace(lost)
            gens.regroup()
        t0 = time.perf_counter()
        publish(gens, self.state, version)
        if lost:  # the replacements hold the learner's weights before they sample
            gens.verify_held(version)
        self.holds = [version] * len(gens)
        return time.perf_counter() - t0

    # ----------------------------------------------------------------- checkpoints

    def pending_state(self) -> dict:
        """Every opened, untrained step's chunks and samples, and the queue, once nothing is in
        flight (plain tensors, lists and numbers: ``torch.load(weights_only=True)`` reads it)."""
        while self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            self._collect(ready[0])
        steps = {
            b: {
                "chunks": [tuple(c) for c in st.chunks],
                "data_position": st.data_position,
                "results": [None if r is None else dataclasses.asdict(r) for r in st.results],
                "owner": list(st.owner),
            }
            for b, st in self.steps_open.items()
        }
        return {
            "steps": steps,
            "todo": [list(t) for t in self.todo],
            "redo": [list(t) for t in self.redo],
            "next_open": self.next_open,
            "dropped_stale": self.dropped_stale,
            "queue_max": self.queue_max,
        }

    def load_pending(self, pending: dict) -> None:
        """Continue from ``pending_state``'s record (the run state was restored with it)."""
        for b, s in pending["steps"].items():
            st = _Step([Chunk(list(ids), seed) for ids, seed in s["chunks"]], s["data_position"])
            st.results = [None if r is None else RolloutBatch.from_dict(r) for r in s["results"]]
            st.owner = list(s["owner"])
            self.steps_open[int(b)] = st
        self.todo = deque(tuple(t) for t in pending["todo"])
        self.redo = {tuple(t) for t in pending["redo"]}
        self.next_open = pending["next_open"]
        self.dropped_stale, self.queue_max = pending["dropped_stale"], pending["queue_max"]

    # ----------------------------------------------------------------- the loop

    def _prepare(self) -> RolloutBatch | None:
        """Step ``next_prepare``'s batch, scored, once every chunk of it is in and fresh
        enough; ``None`` while chunks are missing."""
        b = self.next_prepare
        st = self.steps_open.get(b)
        if st is None or not st.complete():
            return None
        for c, r in enumerate(st.results):
            if not fresh_enough(self._train_version(b), int(r.versions.min()), self.max_staleness):
                self.dropped_stale += len(r)
                alone = [r if i == c else None for i in range(len(st.results))]
                r.origins = chunk_origins(st.chunks, st.owner, alone)
                self.dropped.append((r, "stale"))
                st.results[c] = None
                self.todo.appendleft((b, c))
                self.redo.add((b, c))
        if not st.complete():
            return None
        batch = RolloutBatch.concat(st.results, self.inputs.pad_token_id)
        batch.chunks_per_worker = tuple(st.owner.count(s) for s in range(len(self.generators)))
        batch.origins = chunk_origins(st.chunks, st.owner, st.results)
        t0 = time.perf_counter()
        self.scorers.score(batch)
        self.score_s[b] = time.perf_counter() - t0
        self.next_prepare += 1
        return batch

    def steps(self):
        """Run until ``run.steps``; yields each step's outcome with no update in flight."""
        state, cfg = self.state, self.cfg
        prepared: RolloutBatch | None = None
        training = None  # (step, batch, refs, start time)
        trained: set = set()  # refs of the ranks done with the update in flight
        t_last = time.perf_counter()
        while state.step < cfg.run.steps:
            self._dispatch()
            if prepared is None and self.next_prepare < cfg.run.steps:
                dropped = self.dropped_stale
                prepared = self._prepare()
                if prepared is not None or self.dropped_stale > dropped:
                    continue  # a batch to train, or chunks dropped as too old to hand out again
            if training is None and prepared is not None:
                b = self.next_prepare - 1
                seed = derive_seed(cfg.run.seed, b, "ppo")  # as synchronous mode seeds it
                refs = self.learners.start_update(
                    prepared, state.kl_ctl.value, seed, cfg.async_.is_cap
                )
                training, prepared = (b, prepared, refs, time.perf_counter()), None
                continue
            # ranks that finished are left out: waiting on them would return at once, again
            waits = list(self.inflight) + [
                r for r in (training[2] if training else []) if r not in trained
            ]
            if not waits:
                if self.lost:  # every generator is gone and the learner is idle
                    self._heal_and_sync(state.version)
                    continue
                raise RuntimeError("async loop: nothing in flight and nothing to train")
            ready, _ = ray.wait(waits, num_returns=1)
            if ready[0] in self.inflight:
                self._collect(ready[0])
                continue
            b, batch, refs, t_train = training
            trained.add(ready[0])
            if len(trained) < len(refs):
                continue  # another rank is still training
            train = self.learners.finish_update(refs)
            training, trained = None, set()
            times = {"score": self.score_s.pop(b), "train": time.perf_counter() - t_train}
            state.step = b + 1
            position = self.steps_open.pop(b).data_position
            extra = {}
            if not train.skipped:
                times["weight_sync"] = self._heal_and_sync(state.version + 1)
                extra = {
                    K.DROPPED_STALE: self.dropped_stale,
                    K.QUEUE_SAMPLES: self._outstanding(),
                    K.QUEUE_MAX: self.queue_max,
                    K.SYNC_BYTES: self.generators.pushed_bytes,
                }
            step_time = time.perf_counter() - t_last
            yield StepOutcome(batch, train, times, step_time, position, extra, self.dropped)
            self.dropped = []
            t_last = time.perf_counter()  # a checkpoint taken in between is not the step's time
