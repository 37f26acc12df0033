"""DAPO's dynamic sampling helpers (rlhf_dist/driver/dynamic_sampling.py): uniform groups are
split off whole, with their ledger origins and reward parts, and later rounds' samples join the
batch numbered after the earlier ones."""

import torch

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.driver.dynamic_sampling import (
    fill_size,
    merge_rounds,
    shift_origins,
    split_uniform,
    take_first_groups,
)
from tests.test_batch import PAD, _rows, make_batch

G = 2


def _round(tag: int, scores: list[float], chunk_prompts: int = 2) -> RolloutBatch:
    """A scored round of len(scores) / G prompts, G consecutive samples each, as a generator
    group returns it (origins: chunk, seed, slot, worker, prompt position, sample index)."""
    n = len(scores)
    prompts, responses = _rows(tag, n, [1 + i % 3 for i in range(n)], [1 + i % 2 for i in range(n)])
    b = make_batch(prompts, responses, tag=tag)
    b.scores = torch.tensor(scores)
    b.generated_tokens = 10 * tag
    b.chunks_per_worker = (1, tag)
    b.origins = [
        ((i // G) // chunk_prompts, 1000 + (i // G) // chunk_prompts, 0, "w", i // G, i % G)
        for i in range(n)
    ]
    b.reward_parts = {"acc": torch.tensor(scores) * 2}
    return b


def test_split_uniform_keeps_groups_whole_with_their_origins_and_parts():
    b = _round(1, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0])  # groups: same, differ, same, differ
    good, uniform, n = split_uniform(b, G)
    assert n == 2
    assert good.prompt_ids == [b.prompt_ids[i] for i in (2, 3, 6, 7)]
    assert uniform.prompt_ids == [b.prompt_ids[i] for i in (0, 1, 4, 5)]
    assert good.scores.tolist() == [0.0, 1.0, 0.5, 0.0]
    assert [o[4:] for o in good.origins] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert [o[4:] for o in uniform.origins] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert good.reward_parts["acc"].tolist() == [0.0, 2.0, 1.0, 0.0]
    assert torch.equal(good.sequences, b.sequences[[2, 3, 6, 7]])
    # the original batch's extras are untouched
    assert len(b.origins) == 8 and len(b.reward_parts["acc"]) == 8


def test_merge_rounds_numbers_later_rounds_after_earlier_ones():
    first = _round(1, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0])  # 4 prompts, 2 chunks
    second = _round(2, [0.0, 0.0, 1.0, 0.0])  # the 2 prompts the first round lacked, 1 chunk
    shift_origins(second, prompts_before=4, chunks_before=2)
    kept = []
    for r in (first, second):
        good, _, _ = split_uniform(r, G)
        kept.append(good)
    out = merge_rounds(kept, [first, second], PAD)
    assert len(out) == 6 and out.prompt_ids == kept[0].prompt_ids + kept[1].prompt_ids
    assert [o[0] for o in out.origins] == [0, 0, 1, 1, 2, 2]  # chunk ids over rounds
    assert [o[4] for o in out.origins] == [1, 1, 3, 3, 5, 5]  # prompt positions
    assert out.reward_parts["acc"].tolist() == [0.0, 2.0, 1.0, 0.0, 2.0, 0.0]
    # what was generated counts, dropped samples included
    assert out.generated_tokens == 30 and out.compute_s == 2.0
    assert out.chunks_per_worker == (2, 3)
    assert out.scores.tolist() == [0.0, 1.0, 0.5, 0.0, 1.0, 0.0]


def test_merge_rounds_returns_a_full_single_round_as_it_is():
    b = _round(1, [1.0, 0.0, 0.0, 1.0])
    assert merge_rounds([b], [b], PAD) is b


def test_fill_size_scales_the_missing_prompts_by_the_share_kept():
    assert fill_size(16, 0, 0) == 16  # round 0: the step's prompts
    assert fill_size(16, 12, 16) == 7  # kept 12 of 16: 4 missing / 0.75, a quarter more: 6.67
    assert fill_size(16, 15, 16) == 2  # one missing: more than one, a lone prompt is often uniform
    assert fill_size(16, 0, 16) == 64  # nothing kept yet: at most four steps' worth
    assert fill_size(16, 8, 40) == 50  # the share over every round so far (8 of 40)


def test_take_first_groups_keeps_sampling_order():
    b = _round(1, [0.0, 1.0, 1.0, 0.0, 0.5, 0.0])
    first, rest = take_first_groups(b, 2, G)
    assert first.prompt_ids == b.prompt_ids[:4] and rest.prompt_ids == b.prompt_ids[4:]
    assert [o[4] for o in rest.origins] == [2, 2]
