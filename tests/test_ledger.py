"""The sample ledger's pieces (rlhf_dist/ledger.py) against plain references."""

import json

import torch

from rlhf_dist import ledger, report
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.data import PromptCursor
from rlhf_dist.dispatch import chunk_plan


def test_data_epochs_match_a_cursor_walked_by_hand():
    cursor = PromptCursor(5, seed=3)
    seen = {}  # (epoch, row) counts, by walking the cursor and tracking epochs by hand
    for take in [3, 4, 5, 2, 7, 1]:
        before = cursor.state_dict()
        ids = cursor.take(take)
        epochs = ledger.data_epochs(cursor.state_dict(), 5, take)
        # plain reference: positions before.index, +1, ... wrapping at 5
        e, i, want = before["epoch"], before["index"], []
        for _ in ids:
            if i == 5:
                e, i = e + 1, 0
            want.append(e)
            i += 1
        assert epochs == want
        for row, epoch in zip(ids, epochs):
            seen[(epoch, row)] = seen.get((epoch, row), 0) + 1
    # 22 prompts = 4 whole epochs of 5 and 2 of the fifth: each (epoch, row) at most once
    assert max(seen.values()) == 1
    assert all(sum(1 for (e, _) in seen if e == k) == 5 for k in range(4))


def _chunk_result(ids, samples, worker):
    n = len(ids) * samples
    b = RolloutBatch(
        sequences=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.tensor([[1.0, 1.0]] * n),
        behaviour_logprobs=torch.full((n, 2), -1.0),
        prompt_len=1,
        prompts=["p"] * n,
        responses=["r"] * n,
        prompt_ids=[i for i in ids for _ in range(samples)],
        versions=torch.full((n,), 3, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
    )
    b.worker = worker
    return b


def test_chunk_origins_and_rows_follow_the_chunk_plan():
    ids = [7, 1, 4, 0, 2]
    chunks = chunk_plan(ids, 2, 0, "rollout", 5)
    results = [_chunk_result(c.prompt_ids, 2, f"w{k}") for k, c in enumerate(chunks)]
    owners = [1, 0, 1]
    batch = RolloutBatch.concat(results, 0)
    batch.origins = ledger.chunk_origins(chunks, owners, results)
    batch.scores = torch.arange(10, dtype=torch.float)
    batch.ref_logprobs = torch.full((10, 2), -1.5)
    rows = ledger.ledger_rows(6, batch, [0, 0, 0, 1, 1], learner=4)
    assert [(r["row"], r["sample"]) for r in rows] == [(i, s) for i in ids for s in (0, 1)]
    assert [r["chunk"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [r["slot"] for r in rows] == [1] * 4 + [0] * 4 + [1] * 2
    assert [r["seed"] for r in rows] == [chunks[r["chunk"]].seed for r in rows]
    assert [r["epoch"] for r in rows] == [0] * 6 + [1] * 4
    assert {r["staleness"] for r in rows} == {1} and rows[0]["kl"] == 1.0
    assert [r["reward"] for r in rows] == list(range(10)) and rows[9]["worker"] == "w2"
    assert "reward_parts" not in rows[0]  # one reward function: no parts
    batch.reward_parts = {"format": torch.ones(10), "answer": torch.arange(10.0) - 1}
    rows = ledger.ledger_rows(6, batch, [0, 0, 0, 1, 1], learner=4)
    assert rows[3]["reward_parts"] == {"format": 1.0, "answer": 2.0}
    # one chunk alone (a chunk dropped as too stale): positions still count from the step
    alone = ledger.chunk_origins(chunks, owners, [None, results[1], None])
    assert [o[4] for o in alone] == [2, 2, 3, 3]


def _rows(pairs, epoch=0, step=1):
    return [
        {
            "step": step,
            "epoch": epoch,
            "row": r,
            "sample": s,
            "slot": 0,
            "staleness": 0,
            "reward": 1.0,
            "length": 3,
        }
        for r, s in pairs
    ]


def test_epoch_coverage_finds_missing_and_repeated_prompts():
    exact = _rows([(r, s) for r in range(3) for s in range(2)])
    assert ledger.epoch_coverage(exact, 0, 3, 2)["exact"]
    missing = exact[:-1]
    assert ledger.epoch_coverage(missing, 0, 3, 2) == {
        "missing": [2],
        "repeated": [],
        "miscounted": [],
        "uniform": 0,
        "exact": False,
    }
    repeated = exact + _rows([(1, 0)], step=2)
    assert ledger.epoch_coverage(repeated, 0, 3, 2)["repeated"] == [1]
    dropped = exact[:-1] + [{**exact[-1], "dropped": "stale"}]
    assert ledger.epoch_coverage(dropped, 0, 3, 2)["missing"] == [2]


def test_epoch_coverage_counts_only_what_the_learner_says_it_trained():
    """A sample the driver sent but the learner trained another number of times than
    ppo.epochs (a learner that skipped it, or took it twice) is not trained exactly once."""
    exact = [{**r, "updates": 2} for r in _rows([(r, s) for r in range(3) for s in range(2)])]
    assert ledger.epoch_coverage(exact, 0, 3, 2, updates=2)["exact"]
    skipped = [{**r, "updates": 1} if r["row"] == 1 and r["sample"] == 0 else r for r in exact]
    cov = ledger.epoch_coverage(skipped, 0, 3, 2, updates=2)
    assert cov["miscounted"] == [1] and cov["missing"] == [1] and not cov["exact"]
    # lines written before the learner counted read as trained
    old = [{k: v for k, v in r.items() if k != "updates"} for r in exact]
    assert ledger.epoch_coverage(old, 0, 3, 2, updates=2)["exact"]


def test_epoch_coverage_counts_a_whole_uniform_group_once_instead_of_trained():
    exact = _rows([(r, s) for r in range(3) for s in range(2)])
    uniform = [{**r, "dropped": ledger.UNIFORM} for r in exact[4:]]  # prompt 2's group
    cov = ledger.epoch_coverage(exact[:4] + uniform, 0, 3, 2)
    assert cov == {"missing": [], "repeated": [], "miscounted": [], "uniform": 1, "exact": True}
    # half of a group dropped, the other half trained: the group was split
    half = exact[:5] + [{**exact[5], "dropped": ledger.UNIFORM}]
    assert ledger.epoch_coverage(half, 0, 3, 2)["repeated"] == [2]
    # dropped as uniform and trained again later: repeated
    again = exact + uniform
    assert not ledger.epoch_coverage(again, 0, 3, 2)["exact"]


def test_rollback_sets_later_steps_aside_and_report_checks_epochs(tmp_path, capsys):
    book = ledger.SampleLedger(tmp_path, num_prompts=2, samples=1)
    book.write(_rows([(0, 0), (1, 0)], step=1))
    book.write(_rows([(0, 0)], epoch=1, step=2))
    book.write(_rows([(1, 0)], epoch=1, step=3))
    assert report.samples_report(str(tmp_path), None) == 0
    assert (
        "epoch 1: every one of 2 prompts trained exactly 1 times: exact" in capsys.readouterr().out
    )
    assert book.rollback(2) == 1  # step 3's line
    assert [r["step"] for r in ledger.read_ledger(tmp_path)] == [1, 1, 2]
    aside = (tmp_path / ledger.ROLLED_BACK_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside] == [3]
    # the finished epoch 0 trained prompt 1 twice: the report says so and exits 1
    book.write(_rows([(1, 0)], epoch=0, step=3))
    assert report.samples_report(str(tmp_path), 0) == 1
    assert "NOT exact (missing 0 prompts, repeated 1, " in capsys.readouterr().out
