"""``builtin:calc``: multi-step arithmetic with a calculator tool, a multi-turn task built locally.

A small policy cannot multiply two digits and add the product to another in its head, but it
can call a calculator: the task RL with tools is about, in miniature. A problem is one to three
calls of work (``PROBLEM_KINDS``):

    calc : 7 * 8 =            call mul 7 8   -> result 56                       answer 56
    calc : 7 * 8 + 9 =        call mul 7 8, call add 56 9                       answer 65
    calc : 7 * 8 + 9 * 6 =    call mul 7 8, call mul 9 6, call add 56 54        answer 110

The conversation, rendered plainly (the tokenizer has no chat template; ``chat.render_plain``,
each assistant turn ending with EOS, as SFT trains it and ``envs.render`` appends it):

    user: calc : 7 * 8 + 9 =
    assistant: call mul 7 8 [EOS]
    tool: result 56
    assistant: call add 56 9 [EOS]
    tool: result 65
    assistant: answer 65 [EOS]

``CalcEnv`` (one per trajectory) runs the calls: ``call <add|mul> <a> <b>`` with number words
gives ``result <n>``; anything else that is not an answer is an invalid call (``error``,
counted; ``rollout.max_invalid_tool_calls`` in a row end the trajectory). ``answer <n>`` ends it
with reward 1 when ``n`` is the row's ``answer``, else 0. ``reward`` scores a whole trajectory's
text by the same rule (its last turn, when that is ``answer <n>``), for evaluation
(``eval.gold``).

The demonstrator is sloppy, so SFT leaves a policy that sometimes computes and sometimes
guesses: with probability ``P_TOOLS`` (0.4) it makes the right calls, else it answers at once
with a guess near the right answer (off by 1, 2, 3 or 10: never right). No answer is common
enough for a fixed guess to pay (the most frequent holds under 4% of problems), so the tool is
what pays. Measured with ``configs/calc.yaml`` (a 2-layer, 64-wide GPT-2; 4000 demonstrations,
6 SFT epochs): the SFT policy calls the calculator on 3 to 5 problems in 10 (by seed) and then
gets about 9 in 10 right, while its direct guesses are right 1-4% of the time; held-out success
0.30-0.43 (seeds 0-2). GRPO with the environment's reward then learns to call the calculator:
0.85-0.91 after 30 steps, with about 2 calls per trajectory, the calls the problems need
(README, "Multi-turn"; ``docs/multiturn.md``).
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_dist.envs.base import Env
from rlhf_dist.tasks.tiny import SPECIAL, build_word_task

OPS = {"add": "+", "mul": "*"}
LOW, HIGH = 2, 9  # operands of a product
MAX_NUMBER = 2 * HIGH * HIGH + HIGH  # the largest number any problem or result holds
NUMBERS = [str(i) for i in range(MAX_NUMBER + 1)]
WORDS = ["calc", ":", "*", "+", "=", "call", "add", "mul", "result", "error", "answer"]
ROLE_WORDS = ["user:", "assistant:", "tool:"]
VOCAB = WORDS + ROLE_WORDS + NUMBERS
PROBLEM_KINDS = (1, 2, 3)  # calls of work: a*b, a*b+c, a*b+c*d
P_TOOLS = 0.4  # the demonstrator computes with the calculator, else it guesses

FILES = {
    "model": "base",
    "demonstrations": "sft.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
}


def _rng(seed: int, salt: str) -> random.Random:
    return random.Random(f"calc:{salt}:{int(seed)}")


def sample_problem(rng: random.Random) -> tuple[int, ...]:
    """The operands: (a, b), (a, b, c) or (a, b, c, d) for a*b, a*b+c, a*b+c*d."""
    kind = rng.choice(PROBLEM_KINDS)
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    if kind == 1:
        return (a, b)
    if kind == 2:
        return (a, b, rng.randint(LOW, HIGH))
    return (a, b, rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))


def prompt_of(ops: tuple[int, ...]) -> str:
    if len(ops) == 2:
        return f"calc : {ops[0]} * {ops[1]} ="
    if len(ops) == 3:
        return f"calc : {ops[0]} * {ops[1]} + {ops[2]} ="
    return f"calc : {ops[0]} * {ops[1]} + {ops[2]} * {ops[3]} ="


def calls_of(ops: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """The calculator calls that compute the answer, in order."""
    first = ops[0] * ops[1]
    if len(ops) == 2:
        return [("mul", ops[0], ops[1])]
    if len(ops) == 3:
        return [("mul", ops[0], ops[1]), ("add", first, ops[2])]
    return [("mul", ops[0], ops[1]), ("mul", ops[2], ops[3]), ("add", first, ops[2] * ops[3])]


def answer_of(ops: tuple[int, ...]) -> int:
    return calc(*calls_of(ops)[-1])


def calc(op: str, a: int, b: int) -> int:
    return a * b if op == "mul" else a + b


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt", "answer"}``; another seed gives another draw."""
    rng = _rng(seed, "prompts")
    out = []
    for _ in range(n):
        ops = sample_problem(rng)
        out.append({"prompt": prompt_of(ops), "answer": str(answer_of(ops))})
    return out


# --------------------------------------------------------------------------- the environment


def _words(text: str) -> list[str]:
    words = text.split()
    if "[EOS]" in words:
        words = words[: words.index("[EOS]")]
    return [w for w in words if w not in SPECIAL]


def run_call(words: list[str]) -> int | None:
    """The result of ``call <op> <a> <b>`` (number words in range), else None."""
    if len(words) != 4 or words[0] != "call" or words[1] not in OPS:
        return None
    if not (words[2].isdigit() and words[3].isdigit()):
        return None
    result = calc(words[1], int(words[2]), int(words[3]))
    return result if result <= MAX_NUMBER else None


class CalcEnv(Env):
    """One trajectory of ``builtin:calc`` (see the module docstring)."""

    def reset(self, row: dict) -> list[dict]:
        self.answer = str(row["answer"])
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text: str):
        words = _words(text)
        if len(words) == 2 and words[0] == "answer":
            return None, float(words[1] == self.answer), True, {}
        result = run_call(words)
        if result is None:
            obs = [{"role": "tool", "content": "error"}]
            return obs, 0.0, False, {"tool_calls": 1, "tool_errors": 1, "invalid": True}
        return [{"role": "tool", "content": f"result {result}"}], 0.0, False, {"tool_calls": 1}


def final_answer(text: str) -> str | None:
    """The number a trajectory's text answers: its last turn (the words after the last role
    word), when that turn is exactly ``answer <n>`` as ``CalcEnv`` reads one; else None. A
    turn like ``answer 40 12`` is an invalid call to the environment, so not an answer here
    either, and an ``answer`` word inside a call or an observation never counts."""
    words = text.split()
    starts = [i + 1 for i, w in enumerate(words) if w in ROLE_WORDS]
    last = words[starts[-1] :] if starts else words
    if starts and words[starts[-1] - 1] != "assistant:":
        return None  # the text ends with an observation (or a user turn), not an answer
    last = _words(" ".join(last))
    return last[1] if len(last) == 2 and last[0] == "answer" else None


def reward(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when a trajectory's last turn answers the row's answer, else 0.0 (``eval.gold``):
    the environment's own rule, read from the text the evaluation decodes (its sampled turns
    and observations, special tokens skipped)."""
    if not len(prompts) == len(responses) == len(answer):
        raise ValueError(
            f"calc.reward: {len(prompts)} prompts, {len(responses)} responses, "
            f"{len(answer)} answers"
        )
    return [float(final_answer(r) == str(a).strip()) for r, a in zip(responses, answer)]


# --------------------------------------------------------------------------- demonstrator


def demonstrate(ops: tuple[int, ...], rng: random.Random) -> list[dict]:
    """The assistant and tool turns a sloppy demonstrator adds to the user's question."""
    right = answer_of(ops)
    if rng.random() >= P_TOOLS:  # a guess, near the answer
        guess = max(0, min(MAX_NUMBER, right + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])))
        return [{"role": "assistant", "content": f"answer {guess}"}]
    turns = []
    for op, a, b in calls_of(ops):
        turns.append({"role": "assistant", "content": f"call {op} {a} {b}"})
        turns.append({"role": "tool", "content": f"result {calc(op, a, b)}"})
    turns.append({"role": "assistant", "content": f"answer {right}"})
    return turns


def make_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT conversations ``{"messages": [user, assistant, tool, ...]}``."""
    rng = _rng(seed, "demonstrations")
    out = []
    for _ in range(n):
        ops = sample_problem(rng)
        user = {"role": "user", "content": prompt_of(ops)}
        out.append({"messages": [user, *demonstrate(ops, rng)]})
    return out


def corpus_text() -> list[str]:
    """Lines for training the word-level tokenizer: every word of the language."""
    return [" ".join(VOCAB)]


def build_assets(
    out_dir: str | Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    num_demonstrations: int = 4000,
    num_prompts: int = 1024,
    num_eval_prompts: int = 512,
    seed: int = 0,
) -> Path:
    """Build (once) the base model and tokenizer and the data files under ``out_dir``."""
    return build_word_task(
        out_dir,
        FILES,
        corpus_text,
        make_demonstrations,
        make_prompts,
        seed,
        num_demonstrations,
        num_prompts,
        num_eval_prompts,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=128,
    )
