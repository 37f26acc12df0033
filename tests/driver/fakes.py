"""Stand-ins for the worker groups' Ray side, so the driver's rules run in a plain process: a
pool whose workers are numbers, and step outcomes built by hand."""

from __future__ import annotations

import torch

from rlhf_dist import metric_keys as K
from rlhf_dist.batch import RolloutBatch, UpdateResult
from rlhf_dist.dispatch import Chunk
from rlhf_dist.driver.outcome import StepOutcome
from rlhf_dist.ledger import chunk_origins


class FakePool:
    """A pool of ``n`` workers without Ray: replacing a slot starts a new worker id."""

    name = "rollout"

    def __init__(self, n: int):
        self.actors = [f"worker-{i}" for i in range(n)]
        self.worker_ids = list(range(n))
        self.started = n
        self.replaced: list[int] = []
        self.dead: set[int] = set()  # slots a probe finds gone

    def __len__(self) -> int:
        return len(self.actors)

    def replace(self, i: int):
        self.started += 1
        self.actors[i], self.worker_ids[i] = f"worker-{self.started}", self.started
        self.replaced.append(i)
        self.dead.discard(i)
        return self.actors[i]

    def probe(self, timeout_s: float):
        return sorted(self.dead), []

    def has_room(self) -> bool:
        return True


def scored_batch(prompt_ids: list[int], samples: int, version: int = 0, score=1.0) -> RolloutBatch:
    """A scored batch: each prompt's ``samples`` consecutive samples, two response tokens."""
    ids = [i for i in prompt_ids for _ in range(samples)]
    n = len(ids)
    b = RolloutBatch(
        sequences=torch.ones(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        behaviour_logprobs=torch.full((n, 2), -1.0),
        prompt_len=1,
        prompts=[f"p{i}" for i in ids],
        responses=[f"r{i}" for i in ids],
        prompt_ids=ids,
        versions=torch.full((n,), version, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        scores=torch.full((n,), float(score)),
        ref_logprobs=torch.full((n, 2), -1.5),
        worker="host:1",
        generated_tokens=2 * n,
        chunks_per_worker=(1,),
    )
    chunk = Chunk(list(prompt_ids), 1234)
    b.origins = chunk_origins([chunk], [0], [b])
    return b


def outcome(
    batch: RolloutBatch, position: dict, kl_per_sequence=0.5, skipped=(), epochs=1, trained=None
) -> StepOutcome:
    """A step's outcome as a loop yields it; ``trained``: the learner's count per sample
    (default: ``epochs`` each, none when skipped)."""
    metrics = {} if skipped else {K.KL_PER_SEQUENCE: kl_per_sequence, K.KL: 0.1}
    if trained is None:
        trained = [0 if skipped else epochs] * len(batch)
    train = UpdateResult(metrics, 0.01, tuple(skipped), trained)
    return StepOutcome(batch, train, {"generate": 0.1, "train": 0.2}, 0.5, position)
