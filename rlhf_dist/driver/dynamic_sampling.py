"""DAPO's dynamic sampling for the synchronous step (``rollout.drop_uniform_groups``).

A step samples and scores its ``prompts_per_step`` prompts as usual; the prompts whose
``samples_per_prompt`` samples all scored the same (``algo.uniform_groups``: no signal under a
group baseline) are set aside, and the step takes as many new prompts as it lacks, samples and
scores them, and so on, for at most ``rollout.max_fill_rounds`` extra rounds. A fill round
samples more prompts than it lacks (scaled by the share kept so far, ``fill_size``); what it
finds beyond the step's need is set aside in sampling order (ledger: ``dropped: surplus``). Round ``k > 0``
seeds its chunks with ``("fill", k)`` added to the step's seed parts, so the samples stay a
function of the seed and the data order alone (exact resume holds), and round 0 is the step
a run without dynamic sampling takes.

The kept groups are concatenated in the order they were sampled; each sample's ledger origin
keeps its chunk (numbered across the step's rounds) and its position among the step's prompts.
The dropped groups go to the ledger as ``dropped: uniform_group``.
"""

from __future__ import annotations

import math
from itertools import zip_longest

from rlhf_dist.algo import uniform_groups
from rlhf_dist.batch import RolloutBatch

FILL_MARGIN = 1.25  # a fill round samples a quarter more prompts than the keep rate says


def fill_size(want: int, have: int, taken: int) -> int:
    """Prompts a round takes: all ``want`` in round 0; after that the ``want - have`` missing
    ones scaled by the share of prompts kept so far (at least one kept counted, so a step
    whose prompts were all uniform takes at most ``want * taken`` more), with a margin;
    at most four steps' worth. Taking just the missing few would waste rounds, since a
    round of one or two prompts is often all uniform."""
    if not taken:
        return want
    missing = want - have
    return min(math.ceil(FILL_MARGIN * missing * taken / max(have, 1)), 4 * want)


def take_first_groups(batch: RolloutBatch, n: int, group: int) -> tuple[RolloutBatch, RolloutBatch]:
    """(the first ``n`` groups, the rest): a round that found more than the step lacked
    keeps what it needs in sampling order; the rest go to the ledger as ``surplus``."""
    cut = n * group
    return take_samples(batch, list(range(cut))), take_samples(batch, list(range(cut, len(batch))))


def shift_origins(batch: RolloutBatch, prompts_before: int, chunks_before: int) -> None:
    """Number a later round's ledger origins after the step's earlier rounds: chunk ids after
    the ``chunks_before`` earlier chunks, prompt positions after the ``prompts_before``
    earlier prompts."""
    batch.origins = [
        (c + chunks_before, seed, slot, worker, pos + prompts_before, sample)
        for c, seed, slot, worker, pos, sample in batch.origins
    ]


def take_samples(batch: RolloutBatch, idx: list[int]) -> RolloutBatch:
    """``batch.select(idx)``: the per-sample fields (ledger origins, reward parts) taken
    along."""
    return batch.select(idx)


def split_uniform(batch: RolloutBatch, group: int) -> tuple[RolloutBatch, RolloutBatch, int]:
    """(groups whose rewards differ, uniform groups, number of uniform groups) of a scored
    batch whose prompts' ``group`` samples are consecutive."""
    uniform = uniform_groups(batch.scores, group).repeat_interleave(group)
    keep = [i for i, u in enumerate(uniform.tolist()) if not u]
    drop = [i for i, u in enumerate(uniform.tolist()) if u]
    return take_samples(batch, keep), take_samples(batch, drop), len(drop) // group


def merge_rounds(kept: list[RolloutBatch], rounds: list[RolloutBatch], pad: int) -> RolloutBatch:
    """One batch of the ``kept`` samples of every round. The batch-level figures add up over
    every sampled batch in ``rounds``, dropped samples included (they were generated)."""
    if len(rounds) == 1 and len(kept[0]) == len(rounds[0]):
        return rounds[0]  # nothing dropped: the round's batch as it is
    parts = [b for b in kept if len(b)]
    out = RolloutBatch.concat(parts, pad)
    out.compute_s = sum(b.compute_s for b in rounds)
    out.generated_tokens = sum(b.generated_tokens for b in rounds)
    out.chunks_per_worker = tuple(
        sum(x) for x in zip_longest(*(b.chunks_per_worker for b in rounds), fillvalue=0)
    )
    return out
