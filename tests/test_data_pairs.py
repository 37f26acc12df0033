"""Demonstrations and preference pairs: each bad line refused with file and line named, or
skipped and counted when the user asked to skip."""

import json

import pytest

from rlhf_dist.data import DataError, load_demonstrations, load_preference_pairs

GOOD = {"prompt": "describe : red fox", "chosen": "the red fox .", "rejected": "fox fox"}


def _write(tmp_path, lines: list, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_bytes(
        b"".join(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode() for x in lines)
    )
    return p


BAD_PAIRS = [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({**GOOD, "chosen": ""}, "field 'chosen' must be a non-empty string"),
    ({**GOOD, "chosen": "   "}, "field 'chosen' must be a non-empty string"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "'chosen' and 'rejected' are identical"),
    ({**GOOD, "prompt": 3}, "field 'prompt' must be a non-empty string"),
    (b"\xff\xfe not utf-8\n", "not valid UTF-8"),
    (b'{"prompt": "p", "chosen": \n', "not valid JSON"),
    (["a", "list"], "expected a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD_PAIRS)
def test_bad_pair_refused_with_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_preference_pairs(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_bad_pairs_skipped_and_counted_when_asked(tmp_path):
    lines = [GOOD] + [bad for bad, _ in BAD_PAIRS] + [GOOD]
    records, skipped = load_preference_pairs(_write(tmp_path, lines), skip_bad=True)
    assert records == [GOOD, GOOD]
    assert skipped == len(BAD_PAIRS)


def test_all_bad_is_still_an_error_when_skipping(tmp_path):
    path = _write(tmp_path, [{"prompt": "p"}])
    with pytest.raises(DataError, match="rm.data: .* holds no usable records"):
        load_preference_pairs(path, skip_bad=True)


def test_demonstrations(tmp_path):
    good = {"prompt": "describe : owl", "response": "the owl sits .", "extra": 1}
    records, skipped = load_demonstrations(_write(tmp_path, [good, b"\n", good]))
    assert records == [{"prompt": good["prompt"], "response": good["response"]}] * 2
    assert skipped == 0
    path = _write(tmp_path, [good, {"prompt": "p", "response": ""}], name="d.jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'response'"):
        load_demonstrations(path)
    with pytest.raises(DataError, match="sft.data: file .* does not exist"):
        load_demonstrations(tmp_path / "nope.jsonl")
