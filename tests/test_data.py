"""Prompt loading (errors name file and line) and the seeded, resumable PromptCursor."""

import json

import pytest

from rlhf_dist.data import DataError, PromptCursor, load_prompts


def _jsonl(tmp_path, lines, name="prompts.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- load_prompts


def test_load_prompts_skips_blank_lines_and_reports_line_numbers(tmp_path):
    p = _jsonl(
        tmp_path,
        [
            json.dumps({"prompt": "first"}),
            "",
            "   ",
            json.dumps({"prompt": "second", "other": 1}),
            json.dumps({"prompt": "thïrd ✓"}),
            "",
        ],
    )
    prompts, lines = load_prompts(p)
    assert prompts == ["first", "second", "thïrd ✓"]
    assert lines == [1, 4, 5]


def test_load_prompts_custom_key_and_no_trailing_newline(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"text": "a"}\r\n\r\n{"text": "b"}', encoding="utf-8")
    prompts, lines = load_prompts(str(p), key="text")
    assert prompts == ["a", "b"]
    assert lines == [1, 3]


def test_load_prompts_keeps_prompt_text_verbatim(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "  padded \n text  "})])
    prompts, _ = load_prompts(p)
    assert prompts == ["  padded \n text  "]


def test_missing_file_names_file(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="does not exist") as e:
        load_prompts(missing)
    assert str(missing) in str(e.value)


def test_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_prompts(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_refused(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match="holds no prompts") as e:
        load_prompts(p)
    assert str(p) in str(e.value)


def test_invalid_json_names_line(tmp_path):
    p = _jsonl(
        tmp_path,
        [json.dumps({"prompt": "ok"}), json.dumps({"prompt": "ok too"}), '{"prompt": "oops",'],
    )
    with pytest.raises(DataError, match="not valid JSON") as e:
        load_prompts(p)
    assert f"{p}:3:" in str(e.value)


def test_invalid_json_line_number_counts_blank_lines(tmp_path):
    p = _jsonl(tmp_path, ["", json.dumps({"prompt": "ok"}), "", "not json"])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert f"{p}:4:" in str(e.value)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        b'{"prompt": "fine"}\n'
        + b'{"prompt": "caf\xe9"}\n'  # latin-1 e-acute: not UTF-8
        + b'{"prompt": "fine"}\n'
    )
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        load_prompts(p)
    assert f"{p}:2:" in str(e.value)


def test_missing_key_names_line_and_key(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "ok"}), json.dumps({"text": "wrong key"})])
    with pytest.raises(DataError, match="missing field 'prompt'") as e:
        load_prompts(p)
    assert f"{p}:2:" in str(e.value)
    assert "data.prompt_key" in str(e.value)


def test_custom_key_missing(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "ok"})])
    with pytest.raises(DataError, match="missing field 'question'") as e:
        load_prompts(p, key="question")
    assert f"{p}:1:" in str(e.value)


@pytest.mark.parametrize("line", ['["prompt"]', '"prompt"', "42", "null"])
def test_non_object_line_refused(tmp_path, line):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert f"{p}:2:" in str(e.value)


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_string_prompt_refused(tmp_path, value):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "ok"}), json.dumps({"prompt": value})])
    with pytest.raises(DataError, match="non-empty string") as e:
        load_prompts(p)
    assert f"{p}:2:" in str(e.value)


@pytest.mark.parametrize("value", [1, 1.5, None, True, ["a"], {"a": "b"}])
def test_non_string_prompt_refused(tmp_path, value):
    p = _jsonl(tmp_path, [json.dumps({"prompt": "ok"}), "", json.dumps({"prompt": value})])
    with pytest.raises(DataError, match="non-empty string") as e:
        load_prompts(p)
    assert f"{p}:3:" in str(e.value)
    assert "'prompt'" in str(e.value)


# ----------------------------------------------------------------------------- PromptCursor


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_visits_every_index_once(shuffle):
    size = 13
    c = PromptCursor(size, seed=3, shuffle=shuffle)
    for epoch in range(4):
        got = c.take(size)
        assert sorted(got) == list(range(size)), epoch
        assert c.epoch == epoch


def test_take_in_uneven_chunks_covers_each_epoch_exactly_once():
    size = 10
    c = PromptCursor(size, seed=1)
    seen = []
    for n in [3, 3, 3, 3, 3, 3, 2]:  # 20 = two epochs
        seen.extend(c.take(n))
    assert sorted(seen[:size]) == list(range(size))
    assert sorted(seen[size:]) == list(range(size))


def test_take_spans_epoch_boundary():
    size = 7
    ref = PromptCursor(size, seed=5)
    epoch0 = ref.take(size)
    epoch1 = ref.take(size)
    assert epoch0 != epoch1  # reshuffled every epoch

    c = PromptCursor(size, seed=5)
    assert c.take(5) == epoch0[:5]
    crossing = c.take(4)
    assert crossing == epoch0[5:] + epoch1[:2]
    assert c.state_dict() == {"epoch": 1, "index": 2}
    # one take longer than two epochs
    big = PromptCursor(3, seed=0, shuffle=False).take(8)
    assert big == [0, 1, 2, 0, 1, 2, 0, 1]


def test_take_zero_returns_nothing_and_keeps_state():
    c = PromptCursor(4, seed=0)
    c.take(2)
    before = c.state_dict()
    assert c.take(0) == []
    assert c.state_dict() == before


def test_same_seed_same_order_different_seed_different_order():
    size = 32
    a = PromptCursor(size, seed=11).take(3 * size)
    b = PromptCursor(size, seed=11).take(3 * size)
    c = PromptCursor(size, seed=12).take(3 * size)
    assert a == b
    assert a[:size] != c[:size]
    assert a != c


def test_shuffle_false_keeps_file_order():
    c = PromptCursor(5, seed=99, shuffle=False)
    assert c.take(12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_shuffle_true_actually_shuffles():
    assert PromptCursor(32, seed=0).take(32) != list(range(32))


@pytest.mark.parametrize("consumed", [0, 3, 9, 10, 11, 25, 30])
def test_exact_resume_from_state_dict(consumed):
    size = 10
    orig = PromptCursor(size, seed=7)
    if consumed:
        orig.take(consumed)
    state = orig.state_dict()
    assert set(state) == {"epoch", "index"}

    fresh = PromptCursor(size, seed=7)
    fresh.take(4)  # state of the fresh cursor must be fully replaced
    fresh.load_state_dict(dict(state))
    for n in [1, 4, 10, 7, 13]:
        assert fresh.take(n) == orig.take(n)
    assert fresh.state_dict() == orig.state_dict()


def test_resume_from_json_round_tripped_state():
    orig = PromptCursor(6, seed=2)
    orig.take(8)
    state = json.loads(json.dumps(orig.state_dict()))
    fresh = PromptCursor(6, seed=2)
    fresh.load_state_dict(state)
    assert fresh.take(20) == orig.take(20)


def test_utf8_bom_at_file_start_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi"}).encode() + b"\n")
    assert load_prompts(p) == (["hi"], [1])


def test_cursor_over_nothing_is_refused():
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptCursor(0, seed=0)


# ----------------------------------------------------------------------------- load_prompt_rows


def test_prompt_rows_keep_every_other_field_as_columns(tmp_path):
    from rlhf_dist.data import load_prompt_rows

    p = _jsonl(
        tmp_path,
        [
            json.dumps({"prompt": "a", "answer": "1", "meta": {"k": [1]}}),
            "",
            json.dumps({"answer": 2, "prompt": "b"}),
            json.dumps({"prompt": "c", "answer": None, "extra": True}),
            json.dumps({"prompt": "d"}),
        ],
    )
    rows = load_prompt_rows(p)
    assert rows.prompts == ["a", "b", "c", "d"] and rows.lines == [1, 3, 4, 5]
    assert rows.fields == {
        "answer": ["1", 2, None, None],
        "meta": [{"k": [1]}, None, None, None],
        "extra": [None, None, True, None],
    }
    # a JSON null is a value; a row without the field is "missing" (first such line)
    assert rows.missing == {"answer": 5, "meta": 3, "extra": 1}
    head = rows.head(3)
    assert head.prompts == ["a", "b", "c"] and head.fields["answer"] == ["1", 2, None]
    assert head.missing == {"meta": 3, "extra": 1}
    assert rows.head(1).missing == {"extra": 1}
    assert load_prompts(p) == (rows.prompts, rows.lines)


def test_prompt_rows_with_another_prompt_key_keep_the_rest(tmp_path):
    from rlhf_dist.data import load_prompt_rows

    p = _jsonl(tmp_path, [json.dumps({"question": "q", "prompt": "not the prompt"})])
    rows = load_prompt_rows(p, key="question")
    assert rows.prompts == ["q"] and rows.fields == {"prompt": ["not the prompt"]}
