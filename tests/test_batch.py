"""RolloutBatch: concat re-pads both sides and keeps the layout; select/split keep rows aligned."""

import pytest
import torch

from rlhf_dist.batch import RolloutBatch, position_ids

PAD = 0


def make_batch(prompts, responses, *, tag, scores=True, ref=True, version=0):
    """A batch from token lists: prompts left-padded, responses right-padded, with PAD.

    Token values are unique per row (``tag * 100 + row * 10 + i``, all > 0) so every field can
    be traced back to its row; log-probs are ``-(token / 1000)`` on the response tokens.
    """
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    seq = torch.full((B, P + R), PAD, dtype=torch.long)
    am = torch.zeros(B, P + R, dtype=torch.long)
    rmask = torch.zeros(B, R)
    blp = torch.zeros(B, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p) : P] = torch.tensor(p)
        am[i, P - len(p) : P] = 1
        seq[i, P : P + len(r)] = torch.tensor(r)
        am[i, P : P + len(r)] = 1
        rmask[i, : len(r)] = 1
        blp[i, : len(r)] = -torch.tensor(r, dtype=torch.float) / 1000
    return RolloutBatch(
        sequences=seq,
        attention_mask=am,
        response_mask=rmask,
        behaviour_logprobs=blp,
        prompt_len=P,
        prompts=[f"p{tag}.{i}" for i in range(B)],
        responses=[f"r{tag}.{i}" for i in range(B)],
        prompt_ids=[tag * 10 + i for i in range(B)],
        versions=torch.full((B,), version, dtype=torch.long),
        truncated=torch.tensor([len(r) == R for r in responses]),
        scores=torch.arange(B, dtype=torch.float) + tag if scores else None,
        ref_logprobs=blp * 2 if ref else None,
        compute_s=1.0,
    )


def _rows(tag, n, plens, rlens):
    prompts = [[tag * 100 + i * 10 + j + 1 for j in range(plens[i])] for i in range(n)]
    responses = [[tag * 100 + i * 10 + 5 + j for j in range(rlens[i])] for i in range(n)]
    return prompts, responses


@pytest.fixture
def parts():
    # a: P=2, R=3; b: P=4, R=1; c: P=3, R=4 (one row)
    pa, ra = _rows(1, 2, [2, 1], [3, 2])
    pb, rb = _rows(2, 3, [4, 2, 3], [1, 1, 0])
    pc, rc = _rows(3, 1, [3], [4])
    raw = [(pa, ra), (pb, rb), (pc, rc)]
    batches = [
        make_batch(pa, ra, tag=1, version=1),
        make_batch(pb, rb, tag=2, version=2),
        make_batch(pc, rc, tag=3, version=3),
    ]
    return batches, raw


def test_make_batch_layout(parts):
    batches, _ = parts
    a = batches[0]
    assert a.prompt_len == 2 and a.response_len == 3 and len(a) == 2
    # row 1 has a one-token prompt: left-padded
    assert a.sequences[1].tolist() == [PAD, 111, 115, 116, PAD]
    assert a.attention_mask[1].tolist() == [0, 1, 1, 1, 0]


def test_concat_widths_and_lengths(parts):
    batches, _ = parts
    out = RolloutBatch.concat(batches, pad_token_id=PAD)
    assert len(out) == 6
    assert out.prompt_len == 4
    assert out.response_len == 4
    assert out.sequences.shape == (6, 8)
    assert out.attention_mask.shape == (6, 8)
    assert out.response_mask.shape == (6, 4)
    assert out.behaviour_logprobs.shape == (6, 4)
    assert out.ref_logprobs.shape == (6, 4)
    assert out.sequences.dtype == torch.long
    assert out.response_mask.dtype == batches[0].response_mask.dtype


def test_concat_repads_prompts_left_and_responses_right(parts):
    batches, raw = parts
    pad = 7  # not 0, to tell new padding from zeros
    out = RolloutBatch.concat(batches, pad_token_id=pad)
    # the original padding inside each part was PAD; new padding is `pad`
    P, R = out.prompt_len, out.response_len
    row = 0
    for b, (prompts, responses) in zip(batches, raw):
        lp, rp = P - b.prompt_len, R - b.response_len
        for i in range(len(b)):
            seq = out.sequences[row].tolist()
            am = out.attention_mask[row].tolist()
            # left: new padding, then the part's own row unchanged, then new right padding
            assert seq[:lp] == [pad] * lp
            assert seq[lp : lp + b.sequences.shape[1]] == b.sequences[i].tolist()
            assert seq[P + b.response_len :] == [pad] * rp
            assert am[:lp] == [0] * lp
            assert am[lp : lp + b.sequences.shape[1]] == b.attention_mask[i].tolist()
            assert am[P + b.response_len :] == [0] * rp
            # the real tokens, found through the attention mask
            p, r = prompts[i], responses[i]
            assert [t for t, m in zip(seq[:P], am[:P]) if m] == p
            assert seq[P - len(p) : P] == p
            assert am[: P - len(p)] == [0] * (P - len(p))
            assert [t for t, m in zip(seq[P:], am[P:]) if m] == r
            row += 1


def test_concat_response_token_t_at_column_P_plus_t(parts):
    batches, raw = parts
    out = RolloutBatch.concat(batches, pad_token_id=PAD)
    P = out.prompt_len
    responses = [r for _, rs in raw for r in rs]
    for row, r in enumerate(responses):
        for t, tok in enumerate(r):
            assert out.sequences[row, P + t].item() == tok
            assert out.attention_mask[row, P + t].item() == 1
            assert out.response_mask[row, t].item() == 1
            assert out.behaviour_logprobs[row, t].item() == pytest.approx(-tok / 1000)
            assert out.ref_logprobs[row, t].item() == pytest.approx(-2 * tok / 1000)
        # everything after the response is padding with zero masks and zero log-probs
        n = len(r)
        assert out.response_mask[row, n:].tolist() == [0.0] * (out.response_len - n)
        assert out.behaviour_logprobs[row, n:].tolist() == [0.0] * (out.response_len - n)
        assert out.ref_logprobs[row, n:].tolist() == [0.0] * (out.response_len - n)
        assert out.attention_mask[row, P + n :].sum().item() == 0
        # response mask agrees with the attention mask on the response side
        assert out.response_mask[row].tolist() == out.attention_mask[row, P:].float().tolist()


def test_concat_position_ids_skip_left_padding(parts):
    batches, raw = parts
    out = RolloutBatch.concat(batches, pad_token_id=PAD)
    pos = position_ids(out.attention_mask)
    P = out.prompt_len
    for row, (p, r) in enumerate(pp for part in raw for pp in zip(*part)):
        # the first real prompt token is position 0, response token t is at len(p) + t
        assert pos[row, P - len(p)].item() == 0
        assert pos[row, P : P + len(r)].tolist() == [len(p) + t for t in range(len(r))]


def test_concat_lists_and_per_row_tensors(parts):
    batches, _ = parts
    out = RolloutBatch.concat(batches, pad_token_id=PAD)
    assert out.prompts == ["p1.0", "p1.1", "p2.0", "p2.1", "p2.2", "p3.0"]
    assert out.responses == ["r1.0", "r1.1", "r2.0", "r2.1", "r2.2", "r3.0"]
    assert out.prompt_ids == [10, 11, 20, 21, 22, 30]
    assert out.versions.tolist() == [1, 1, 2, 2, 2, 3]
    assert out.truncated.tolist() == [True, False, True, True, False, True]
    assert out.scores.tolist() == [1.0, 2.0, 2.0, 3.0, 4.0, 3.0]
    # the inputs are not modified
    assert batches[0].sequences.shape == (2, 5)
    assert batches[0].prompts == ["p1.0", "p1.1"]


def test_concat_of_one_batch_is_identity(parts):
    b = parts[0][0]
    out = RolloutBatch.concat([b], pad_token_id=PAD)
    assert out.prompt_len == b.prompt_len
    for name in ["sequences", "attention_mask", "response_mask", "behaviour_logprobs"]:
        assert torch.equal(getattr(out, name), getattr(b, name)), name
    assert torch.equal(out.ref_logprobs, b.ref_logprobs)
    assert torch.equal(out.scores, b.scores)
    assert out.prompts == b.prompts


@pytest.mark.parametrize("missing", ["scores", "ref_logprobs"])
def test_concat_optional_none_when_any_part_lacks_it(missing):
    pa, ra = _rows(1, 2, [2, 2], [2, 1])
    pb, rb = _rows(2, 1, [3], [3])
    full = make_batch(pa, ra, tag=1)
    lacking = make_batch(pb, rb, tag=2, scores=missing != "scores", ref=missing != "ref_logprobs")
    present = "ref_logprobs" if missing == "scores" else "scores"
    for order in ([full, lacking], [lacking, full]):
        out = RolloutBatch.concat(order, pad_token_id=PAD)
        assert getattr(out, missing) is None
        assert getattr(out, present) is not None
        assert getattr(out, present).shape[0] == 3
        assert len(out) == 3


def test_concat_all_without_optionals():
    pa, ra = _rows(1, 2, [2, 2], [2, 1])
    a = make_batch(pa, ra, tag=1, scores=False, ref=False)
    out = RolloutBatch.concat([a, a], pad_token_id=PAD)
    assert out.scores is None and out.ref_logprobs is None
    assert len(out) == 4


# ----------------------------------------------------------------------------- select / split


def _assert_row_equal(sub, j, full, i):
    for name in ["sequences", "attention_mask", "response_mask", "behaviour_logprobs"]:
        assert torch.equal(getattr(sub, name)[j], getattr(full, name)[i]), name
    assert torch.equal(sub.ref_logprobs[j], full.ref_logprobs[i])
    assert sub.scores[j] == full.scores[i]
    assert sub.versions[j] == full.versions[i]
    assert sub.truncated[j] == full.truncated[i]
    assert sub.prompts[j] == full.prompts[i]
    assert sub.responses[j] == full.responses[i]
    assert sub.prompt_ids[j] == full.prompt_ids[i]


@pytest.mark.parametrize("idx", [[4, 0, 2], [5], [1, 1, 3], []])
def test_select_keeps_rows_aligned(parts, idx):
    full = RolloutBatch.concat(parts[0], pad_token_id=PAD)
    for index in (idx, torch.tensor(idx, dtype=torch.long)):
        sub = full.select(index)
        assert len(sub) == len(idx)
        assert sub.prompt_len == full.prompt_len
        assert sub.response_len == full.response_len
        assert len(sub.prompts) == len(sub.responses) == len(sub.prompt_ids) == len(idx)
        assert sub.scores.shape[0] == sub.ref_logprobs.shape[0] == sub.versions.shape[0]
        for j, i in enumerate(idx):
            _assert_row_equal(sub, j, full, i)


def test_select_keeps_none_optionals():
    pa, ra = _rows(1, 3, [1, 2, 3], [1, 2, 3])
    b = make_batch(pa, ra, tag=1, scores=False, ref=False)
    sub = b.select([2, 0])
    assert sub.scores is None and sub.ref_logprobs is None
    assert sub.prompt_ids == [12, 10]


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_split_contiguous_aligned_shards(parts, n):
    full = RolloutBatch.concat(parts[0], pad_token_id=PAD)
    shards = full.split(n)
    assert len(shards) == n
    size = len(full) // n
    for k, shard in enumerate(shards):
        assert len(shard) == size
        assert shard.prompt_len == full.prompt_len
        for j in range(size):
            _assert_row_equal(shard, j, full, k * size + j)
    # the shards put back together are the whole batch, in order
    back = RolloutBatch.concat(shards, pad_token_id=PAD)
    assert torch.equal(back.sequences, full.sequences)
    assert back.prompt_ids == full.prompt_ids
