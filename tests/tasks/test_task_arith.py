"""The ``arith`` task: a verifiable one-digit arithmetic task, its rule reward and its sloppy
demonstrator."""

import json
import random
from collections import Counter

import pytest
from transformers import AutoTokenizer

from rlhf_dist.tasks import arith


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return arith.build_assets(
        tmp_path_factory.mktemp("arith"),
        num_demonstrations=400,
        num_prompts=200,
        num_eval_prompts=100,
    )


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- language


def test_problems_prompts_and_answers_are_consistent():
    assert len(arith.PROBLEMS) == 100 + 55 == len(set(arith.PROBLEMS))
    for op, a, b in arith.PROBLEMS:
        prompt = arith.prompt_of(op, a, b)
        assert arith.parse_prompt(prompt) == (op, a, b)
        assert str(arith.answer_of(op, a, b)) in arith.NUMBERS  # never negative, at most 18
    assert arith.prompt_of("add", 3, 4) == "add : 3 + 4 ="
    assert arith.prompt_of("sub", 9, 4) == "sub : 9 - 4 ="
    for bad in ["add : 3 - 4 =", "add 3 + 4 =", "mul : 3 * 4 =", "add : x + 4 =", ""]:
        assert arith.parse_prompt(bad) is None, bad
    rows = arith.make_prompts(300, seed=5)
    assert rows == arith.make_prompts(300, seed=5) != arith.make_prompts(300, seed=6)
    for r in rows:
        assert r["answer"] == str(arith.answer_of(*arith.parse_prompt(r["prompt"])))
    assert len({r["prompt"] for r in rows}) > 100  # the draw covers most of the 155 problems


def test_tokenizer_round_trip(assets):
    tok = AutoTokenizer.from_pretrained(assets / "base")
    assert len(tok) == len(arith.VOCAB) + len(arith.SPECIAL_TOKENS)
    unk = tok.unk_token_id
    for op, a, b in arith.PROBLEMS:
        text = f"{arith.prompt_of(op, a, b)} {arith.answer_of(op, a, b)}"
        ids = tok(text)["input_ids"]
        assert unk not in ids and len(ids) == arith.PROMPT_WORDS_PER_PROMPT + 1
        assert tok.decode(ids) == text
    # a response the policy samples, with EOS and padding, decodes to the answer alone
    ids = tok("7")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "7"


# --------------------------------------------------------------------------- the rule


def test_reward_is_one_exactly_for_the_right_answer():
    prompts = ["add : 3 + 4 ="] * 9
    responses = ["7", " 7 ", "7 [EOS] 9", "8", "7 7", "= 7", "seven", "", "[UNK]"]
    assert arith.reward(prompts, responses, ["7"] * 9) == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    # the answer comes from the data row, not the prompt; ints are accepted
    assert arith.reward(["sub : 9 - 4 ="] * 3, ["5", "5", "5"], ["5", 5, "6"]) == [1, 1, 0]
    assert arith.reward(["p"], ["5"], [None]) == [0.0]
    with pytest.raises(ValueError, match="2 prompts, 2 responses, 1 answers"):
        arith.reward(["p", "q"], ["1", "2"], ["1"])


def test_format_reward_checks_the_form_alone():
    got = arith.format_reward([""] * 6, ["7", "18", "19", "7 7", "= 7", ""])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- demonstrator


def test_demonstrations_leave_the_policy_partly_right_with_the_right_answer_likeliest():
    demos = arith.make_demonstrations(6000, seed=0)
    assert demos == arith.make_demonstrations(6000, seed=0)
    right = [
        arith.is_right(d["response"], arith.answer_of(*arith.parse_prompt(d["prompt"])))
        for d in demos
    ]
    assert 0.45 < sum(right) / len(right) < 0.6  # about half right
    small = [
        ok for d, ok in zip(demos, right) if max(arith.parse_prompt(d["prompt"])[1:]) <= arith.SMALL
    ]
    assert sum(small) / len(small) > 0.65  # right more often for small operands
    malformed = sum(not arith.format_reward([""], [d["response"]])[0] for d in demos)
    assert 0.03 < malformed / len(demos) < 0.07
    # for every problem the right answer is the demonstrator's most frequent one
    rng = random.Random(1)
    for op, a, b in arith.PROBLEMS:
        answers = Counter(arith.demonstrate(op, a, b, rng) for _ in range(400))
        assert answers.most_common(1)[0][0] == str(arith.answer_of(op, a, b)), (op, a, b)


def test_assets_are_built_once_in_the_users_formats(assets):
    assert (assets / "base" / "config.json").is_file()
    demos = _rows(assets / "sft.jsonl")
    assert len(demos) == 400 and all(set(d) == {"prompt", "response"} for d in demos)
    prompts, held_out = _rows(assets / "prompts.jsonl"), _rows(assets / "eval_prompts.jsonl")
    assert len(prompts) == 200 and len(held_out) == 100
    assert all(set(r) == {"prompt", "answer"} for r in prompts + held_out)
    assert prompts[:100] != held_out  # another draw
    before = (assets / "sft.jsonl").stat().st_mtime_ns
    arith.build_assets(assets)
    assert (assets / "sft.jsonl").stat().st_mtime_ns == before
