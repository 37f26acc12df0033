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


def test_the_grader_reads_the_last_turn_as_the_environment_does():
    # the text an evaluation grades: the sampled turns and the observations, EOS skipped
    text = "call mul 7 8 tool: result 56 assistant: call add 56 9 tool: result 65 assistant: "
    responses = [
        text + "answer 65",
        text + "answer 64",
        text + "answer 65 12",  # not an answer to the environment (an invalid call): not here
        "call mul 7 8 tool: result 56 assistant: call answer 65",
        "call add 60 5 tool: result 65",  # ends with an observation: no answer
        "answer 65",
    ]
    assert calc.reward(["p"] * 6, responses, ["65"] * 6) == [1, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        calc.reward(["p", "q"], ["x"], ["1"])


def test_guessing_is_rarely_right_so_the_calculator_is_what_pays():
    rows = calc.make_demonstrations(2000, seed=3)
    guessed = [r for r in rows if len(r["messages"]) == 2]
    assert abs(1 - len(guessed) / len(rows) - calc.P_TOOLS) < 0.05
    for r in guessed:  # near the right answer, never it
        ints = [int(w) for w in r["messages"][0]["content"].split() if w.isdigit()]
        right = calc.answer_of(tuple(ints))
        guess = int(r["messages"][1]["content"].split()[1])
        assert guess != right and abs(guess - right) <= 10
    # no answer is common enough for a fixed guess to pay: the most frequent is under 4%
    answers = [row["answer"] for row in calc.make_prompts(2000, seed=4)]
    assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.04


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


def test_the_grader_agrees_with_the_environment_on_rendered_trajectories(assets):
    """Each demonstration's turns, replayed through ``CalcEnv`` token by token as a rollout
    builds them, get from ``reward`` (on the text an evaluation decodes) the env's reward."""
    tok = load_tokenizer(str(assets / "base"))
    delta = TokenDelta(tok, template=False, stop_ids=[tok.eos_token_id])
    rows = [json.loads(x) for x in (assets / "sft.jsonl").read_text().splitlines()]
    rng, rewards = random.Random(0), set()
    for row in rows:
        messages = row["messages"]
        answer = str(
            calc.answer_of(tuple(int(w) for w in messages[0]["content"].split() if w.isdigit()))
        )
        if rng.random() < 0.5:  # a wrong final answer
            answer = str(int(answer) + 1)
        env, tokens, total = calc.CalcEnv(), [], 0.0
        env.reset({"prompt": messages[0]["content"], "answer": answer})
        for m in messages[1:]:
            if m["role"] != "assistant":
                continue
            turn = tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            tokens += turn
            obs, r, done, _ = env.step(tok.decode(turn, skip_special_tokens=True))
            total += r
            if not done:
                tokens += delta.observation(obs, stopped=True)
        assert done
        text = tok.decode(tokens, skip_special_tokens=True)
        assert calc.reward([messages[0]["content"]], [text], [answer]) == [total]
        rewards.add(total)
    assert rewards == {0.0, 1.0}


def test_files_are_built_once_and_rows_carry_their_answers(assets):
    before = (assets / "prompts.jsonl").stat().st_mtime_ns
    calc.build_assets(assets, num_demonstrations=64, num_prompts=32, num_eval_prompts=16)
    assert (assets / "prompts.jsonl").stat().st_mtime_ns == before
    rows = [json.loads(x) for x in (assets / "eval_prompts.jsonl").read_text().splitlines()]
    for row in rows:
        words = row["prompt"].split()
        ints = [int(w) for w in words if w.isdigit()]
        assert str(calc.answer_of(tuple(ints))) == row["answer"]
