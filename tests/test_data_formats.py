"""Data sources read with ``datasets``: each format built locally, the rows and their other
fields coming out the same; bad sources refused naming the source, row and field; HH
transcripts split at their common prefix; a memory-mapped dataset resumed at the same row."""

import json
import os
import random
import subprocess
import sys
import time

import datasets
import pytest

from rlhf_dist.data import (
    Column,
    DataError,
    PromptCursor,
    load_demonstrations,
    load_preference_pairs,
    load_prompt_rows,
    split_transcripts,
)

ROWS = [
    {"prompt": "describe : red cat", "answer": "7", "id": 0},
    {"prompt": "describe : blue owl", "answer": "12", "id": 1},
    {"prompt": "describe : sun", "answer": "3", "id": 2},
]
CHAT = [
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    {"prompt": [{"role": "user", "content": "red cat"}]},
]


def _write(tmp_path, rows, fmt: str) -> str:
    """``rows`` in format ``fmt``, written the way a user's tools write it."""
    ds = None if fmt in ("jsonl", "json") else datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":  # one JSON array
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        ds.to_csv(str(p), index=False)
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        ds.to_parquet(str(p))
    elif fmt == "arrow":  # an arrow file as save_to_disk writes it
        ds.save_to_disk(str(tmp_path / "saved"))
        p = next((tmp_path / "saved").glob("*.arrow"))
    elif fmt == "disk":
        p = tmp_path / "disk"
        ds.save_to_disk(str(p))
    elif fmt == "dict":
        p = tmp_path / "dict"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(p))
    else:
        raise ValueError(fmt)
    return str(p)


FORMATS = ["jsonl", "json", "csv", "parquet", "arrow", "disk", "dict"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_rows_and_their_fields_in_every_format(tmp_path, fmt):
    rows = load_prompt_rows(_write(tmp_path, ROWS, fmt))
    assert list(rows.prompts) == [r["prompt"] for r in ROWS]
    assert set(rows.fields) == {"answer", "id"}
    # CSV types its columns itself (answers that look like numbers become numbers)
    answers = [str(rows.fields["answer"][i]) for i in range(len(ROWS))]
    assert answers == [r["answer"] for r in ROWS]
    assert [rows.fields["id"][i] for i in range(len(ROWS))] == [0, 1, 2]
    assert rows.jsonl == (fmt == "jsonl")
    assert not rows.any_messages
    assert rows.where(1) == (f"{rows.path}:2" if fmt == "jsonl" else f"{rows.path} row 1")


def test_dataset_prompts_are_memory_mapped_and_read_row_by_row(tmp_path):
    rows = load_prompt_rows(_write(tmp_path, ROWS * 100, "disk"))
    assert isinstance(rows.prompts, Column)
    assert rows.prompts._ds.cache_files  # backed by the arrow file on disk, not by memory
    assert len(rows.prompts) == 300 and rows.prompts[299] == ROWS[2]["prompt"]
    head = rows.head(2)
    assert list(head.prompts) == [ROWS[0]["prompt"], ROWS[1]["prompt"]]
    assert list(head.fields["id"]) == [0, 1]


def test_split_of_a_saved_dataset_dict(tmp_path):
    path = _write(tmp_path, ROWS, "dict")
    assert len(load_prompt_rows(path, split="test").prompts) == 1
    with pytest.raises(DataError, match="has no split 'validation'") as e:
        load_prompt_rows(path, split="validation")
    assert path in str(e.value) and "train, test" in str(e.value)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_message_list_prompts(tmp_path, fmt):
    rows = load_prompt_rows(_write(tmp_path, CHAT, fmt))
    assert rows.any_messages
    assert [[(m["role"], m["content"]) for m in p] for p in rows.prompts] == [
        [("system", "be brief"), ("user", "hi")],
        [("user", "red cat")],
    ]


def test_missing_column_names_the_source_and_column(tmp_path):
    path = _write(tmp_path, ROWS, "parquet")
    with pytest.raises(DataError) as e:
        load_prompt_rows(path, key="question")
    msg = str(e.value)
    assert msg.startswith("data.prompts: ") and path in msg
    assert "no column 'question'" in msg and "prompt, answer, id" in msg


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.parquet"
    features = datasets.Features({"prompt": datasets.Value("string")})
    datasets.Dataset.from_dict({"prompt": []}, features=features).to_parquet(str(path))
    with pytest.raises(DataError, match=r"holds no rows \(the dataset is empty\)") as e:
        load_prompt_rows(path)
    assert str(e.value).startswith(f"data.prompts: {path} ")
    folder = tmp_path / "empty"
    datasets.Dataset.from_dict({"prompt": []}, features=features).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"holds no rows \(the dataset is empty\)"):
        load_prompt_rows(folder)


def test_unknown_format_and_foreign_folder(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match="unknown format '.txt'"):
        load_prompt_rows(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load_prompt_rows(tmp_path / "folder")
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_rows(tmp_path / "missing.parquet")


def test_unreadable_file_is_named_not_a_library_traceback(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as e:
        load_prompt_rows(p)
    assert str(e.value).startswith(f"data.prompts: cannot read {str(p)!r}")


def test_unreachable_hub_id_fails_fast_naming_it():
    """No hub here: offline mode makes datasets fail at once instead of retrying."""
    code = (
        "from rlhf_dist.data import load_prompt_rows, DataError\n"
        "try:\n    load_prompt_rows('someorg/no-such-dataset', split='test')\n"
        "except DataError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - t0 < 60
    assert out.stdout.startswith(
        "data.prompts: cannot load the hub dataset 'someorg/no-such-dataset' (split 'test')"
    ), out.stdout + out.stderr


# ----------------------------------------------------------------------------- SFT and RM


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_demonstrations_in_each_format_with_messages(tmp_path, fmt):
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "blue"},
    ]
    rows = [{"messages": conv}, {"messages": conv[:2]}]
    records, skipped = load_demonstrations(_write(tmp_path, rows, fmt))
    assert skipped == 0
    assert [len(r["messages"]) for r in records] == [4, 2]
    assert records[0]["messages"][3] == {"role": "assistant", "content": "blue"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_pairs_with_a_prompt_in_each_format(tmp_path, fmt):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "red cat",
            "rejected": "dog",
        }
    ] * 2
    records, _ = load_preference_pairs(_write(tmp_path, rows, fmt))
    assert records[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert (records[0]["chosen"], records[0]["rejected"]) == ("red cat", "dog")


BAD_MESSAGES = [
    ([{"role": "bot", "content": "hi"}], "message 0 has unknown role 'bot'"),
    ([{"role": "system", "content": "be brief"}], "no user turn"),
    ([{"role": "user"}], "is not a {role, content} mapping"),
    ([{"role": "user", "content": 3}], "content must be a string"),
]


@pytest.mark.parametrize("bad, reason", BAD_MESSAGES)
def test_bad_message_list_named_by_row_and_field(tmp_path, bad, reason):
    good = {"prompt": [{"role": "user", "content": "hi"}], "response": "red"}
    path = _write(tmp_path, [good, good, {"prompt": bad, "response": "red"}], "jsonl")
    with pytest.raises(DataError) as e:
        load_demonstrations(path)
    assert str(e.value).startswith(f"{path}:3: field 'prompt' ")
    assert reason in str(e.value)


def test_bad_row_of_a_dataset_is_named(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
    ]
    path = _write(tmp_path, rows, "parquet")
    with pytest.raises(DataError) as e:
        load_preference_pairs(path)
    assert str(e.value) == f"{path} row 1: field 'chosen' must be a non-empty string"


# ----------------------------------------------------------------------------- HH splitting

HH_CHOSEN = "\n\nHuman: what is red?\n\nAssistant: red is a warm color"
HH_REJECTED = "\n\nHuman: what is red?\n\nAssistant: red is a dog"


def test_hh_strings_split_at_the_last_word_boundary_of_the_common_prefix():
    prompt, c, r = split_transcripts(HH_CHOSEN, HH_REJECTED)
    assert prompt == "\n\nHuman: what is red?\n\nAssistant: red is a"
    assert (c, r) == ("warm color", "dog")
    # a shared first letter does not cut a word
    prompt, c, r = split_transcripts("Q: A: dogs bark", "Q: A: dig holes")
    assert (prompt, c, r) == ("Q: A:", "dogs bark", "dig holes")


def test_hh_messages_split_between_messages():
    user = {"role": "user", "content": "what is red?"}
    chosen = [user, {"role": "assistant", "content": "a color"}]
    rejected = [user, {"role": "assistant", "content": "a dog"}]
    prompt, c, r = split_transcripts(chosen, rejected)
    assert prompt == [user] and c == chosen[1:] and r == rejected[1:]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hh_file_without_prompt_split_and_shared_nothing_refused(tmp_path, fmt):
    good = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    (tmp_path / "a").mkdir()
    records, _ = load_preference_pairs(_write(tmp_path / "a", [good], fmt))
    assert records == [
        {
            "prompt": "\n\nHuman: what is red?\n\nAssistant: red is a",
            "chosen": "warm color",
            "rejected": "dog",
        }
    ]
    (tmp_path / "b").mkdir()
    path = _write(tmp_path / "b", [good, {"chosen": "red cat", "rejected": "blue dog"}], fmt)
    with pytest.raises(DataError) as e:
        load_preference_pairs(path)
    where = f"{path}:2" if fmt == "jsonl" else f"{path} row 1"
    assert str(e.value).startswith(f"{where}: 'chosen' and 'rejected' share no prefix")
    (tmp_path / "c").mkdir()
    path = _write(tmp_path / "c", [{"chosen": "Q: red", "rejected": "Q: red "}], fmt)
    with pytest.raises(DataError, match="'chosen' and 'rejected' are identical"):
        load_preference_pairs(path)


def test_hh_transcript_that_is_the_others_prefix_is_refused():
    user = {"role": "user", "content": "hi"}
    reason = split_transcripts([user], [user, {"role": "assistant", "content": "red"}])
    assert "the other's prefix" in reason
    assert "share no prefix" in split_transcripts("red cat", "blue dog")


# ----------------------------------------------------------------------------- the cursor


def test_cursor_order_is_the_one_a_list_shuffle_gives():
    """The compact order keeps the permutation earlier runs (and pinned results) used."""
    for size, seed in [(10, 7), (1000, 3)]:
        cur = PromptCursor(size, seed)
        for epoch in range(2):
            order = list(range(size))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            assert cur.take(size) == order


def test_resume_over_a_memory_mapped_dataset_continues_at_the_same_row(tmp_path):
    rows = [{"prompt": f"describe : row {i}", "id": i} for i in range(257)]
    path = _write(tmp_path, rows, "disk")

    def run(resume_after: int | None, total: int) -> list:
        table = load_prompt_rows(path)
        cursor = PromptCursor(len(table.prompts), seed=5)
        seen = []
        while len(seen) < total:
            ids = cursor.take(40)
            seen += [(table.fields["id"][i], table.prompts[i]) for i in ids]
            if resume_after is not None and len(seen) == resume_after:
                state = json.loads(json.dumps(cursor.state_dict()))  # as a checkpoint holds it
                table = load_prompt_rows(path)  # a new process opens the dataset again
                cursor = PromptCursor(len(table.prompts), seed=5)
                cursor.load_state_dict(state)
        return seen

    straight = run(None, 600)
    assert run(280, 600) == straight  # resumed past an epoch's end (257 rows)
    assert straight[280][1] == f"describe : row {straight[280][0]}"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_sample_records_carry_their_rows_fields(tmp_path, fmt):
    from rlhf_dist import ledger

    rows = load_prompt_rows(_write(tmp_path, ROWS, fmt))
    (tmp_path / "run").mkdir()
    book = ledger.SampleLedger(tmp_path / "run", 3, 1, fields=rows.fields)
    book.write([{"step": 1, "row": 2, "sample": 0}, {"step": 1, "row": 0, "sample": 0}], "stale")
    got = ledger.read_ledger(tmp_path / "run")
    assert [r["fields"] for r in got] == [{"answer": "3", "id": 2}, {"answer": "7", "id": 0}]
    assert [r["dropped"] for r in got] == ["stale", "stale"]
