"""``builtin:calc``: the problems, the environment's rules, the grader, and demonstrations
that render to the very tokens a rollout builds (token in, token out)."""

import json
import random

import pytest

from rlhf_dist import chat
from rlhf_dist.envs.render import TokenDelta
from rlhf_dist.models import load_tokenizer
from rlhf_dist.tasks import calc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return calc.build_assets(
        tmp_path_factory.mktemp("calc"), num_demonstrations=64, num_prompts=32, num_eval_prompts=16
    )


def test_every_problem_s_calls_compute_its_answer():
    rng = random.Random(0)
    for _ in range(300):
        ops = calc.sample_problem(rng)
        calls = calc.calls_of(ops)
        assert len(calls) == len(ops) - 1  # one to three calls of work
        value = ops[0] * ops[1] + (ops[2] if len(ops) == 3 else 0)
        value += ops[2] * ops[3] if len(ops) == 4 else 0
        assert calc.answer_of(ops) == value <= calc.MAX_NUMBER


def test_the_environment_runs_calls_counts_errors_and_grades_the_answer():
    env = calc.CalcEnv()
    assert env.reset({"prompt": "calc : 7 * 8 + 9 =", "answer": "65"})[0]["role"] == "user"
    obs, r, done, info = env.step("call mul 7 8 [EOS]")
    assert obs == [{"role": "tool", "content": "result 56"}] and not done
    assert (r, info) == (0.0, {"tool_calls": 1})
    obs, r, done, info = env.step("call div 7 8")
    assert obs[0]["content"] == "error" and info["invalid"] and info["tool_errors"] == 1
    assert env.step("answer 64")[1:3] == (0.0, True)
    assert env.step("answer 65 [EOS] [PAD]")[1:3] == (1.0, True)
    assert env.step("answer 65 please")[3]["invalid"]  # not an answer: an invalid call


def test_the_grader_reads_the_last_answer_of_a_trajectory():
    text = "call mul 7 8 tool: result 56 answer 50 tool: error answer 56"
    assert calc.reward(["p"] * 3, [text, "answer 5", "56"], ["56", "56", "56"]) == [1, 0, 0]
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        calc.reward(["p", "q"], ["x"], ["1"])


def test_demonstrations_are_the_tokens_a_rollout_builds(assets):
    tok = load_tokenizer(str(assets / "base"))
    assert tok.unk_token_id not in tok(" ".join(calc.VOCAB))["input_ids"]
    delta = TokenDelta(tok, template=False, stop_ids=[tok.eos_token_id])
    rows = [json.loads(x) for x in (assets / "sft.jsonl").read_text().splitlines()]
    assert {len(r["messages"]) > 2 for r in rows} == {True, False}  # computed, and guessed
    for row in rows[:20]:
        messages = row["messages"]
        ids, labels = chat.sft_tokens(tok, messages, None, False, True)
        built, trained = delta.prompt(messages[:1]), []
        for m in messages[1:]:
            if m["role"] == "assistant":
                turn = tok(m["content"], add_special_tokens=False)["input_ids"]
                built, trained = (
                    built + turn + [tok.eos_token_id],
                    trained + turn + [tok.eos_token_id],
                )
            else:
                built += delta.observation([m], stopped=True)
        assert ids == built and [x for x in labels if x != -100] == trained


def test_files_are_built_once_and_rows_carry_their_answers(assets):
    before = (assets / "prompts.jsonl").stat().st_mtime_ns
    calc.build_assets(assets, num_demonstrations=64, num_prompts=32, num_eval_prompts=16)
    assert (assets / "prompts.jsonl").stat().st_mtime_ns == before
    rows = [json.loads(x) for x in (assets / "eval_prompts.jsonl").read_text().splitlines()]
    for row in rows:
        words = row["prompt"].split()
        ints = [int(w) for w in words if w.isdigit()]
        assert str(calc.answer_of(tuple(ints))) == row["answer"]
