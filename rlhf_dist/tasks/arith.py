"""``builtin:arith``: a verifiable task, one-digit sums and differences, built locally.

RL on verifiable rewards in miniature (the setting of DeepSeekMath's GRPO and of RLOO): the
policy writes an answer, a rule checks it against the ``answer`` field of the prompt's data
row, and the held-out accuracy is the gold score.

Language
--------
Word level (every token a whitespace-separated word), 25 words::

    add : 3 + 4 =        ->   7
    sub : 9 - 4 =        ->   5

Operands are 0-9; a difference is never negative, so every answer is a word ``0`` to ``18``.
There are 100 sums and 55 differences (``PROBLEMS``); prompts are drawn from them uniformly
(an operation, then its operands), so held-out prompts (another seed) ask the same problems:
the held-out accuracy is how often the policy *samples* the right answer, not whether it
generalises to unseen ones.

Rows are ``{"prompt": "add : 3 + 4 =", "answer": "7"}``; a reward function that takes the
field by name (``reward(prompts, responses, answer)``) receives each sample's row's answer.

Reward (``reward``)
-------------------
1.0 when the response is exactly the answer (one word; text after the first ``[EOS]`` is
dropped, ``[PAD]`` and ``[BOS]`` ignored), else 0.0: ``7 7``, ``= 7``, ``seven`` and an empty
response are wrong. ``format_reward`` checks the form alone (one number word), for combining
with weights (``reward.function: ...:reward,...:format_reward``).

Demonstrator (``demonstrate``)
------------------------------
A sloppy one, so that SFT leaves the policy partly right: right with probability 0.75 when
both operands are at most 4 and 0.45 otherwise; a wrong answer is off by one or two (80%) or
any other number; 5% of demonstrations are also malformed (the answer twice, or after an
``=``). About half of its answers are right (``tests/tasks/test_task_arith.py``); the right
answer stays the likeliest one for every problem, which an RL policy can sharpen towards.

``build_assets(dir)`` writes, once: ``base/`` (a word-level tokenizer trained with
``tokenizers`` and a randomly initialised 2-layer GPT-2, both saved with ``save_pretrained``),
``sft.jsonl`` (demonstrations), ``prompts.jsonl`` and ``eval_prompts.jsonl`` (rows with their
``answer``).
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_dist.tasks.tiny import SPECIAL, build_word_task

OPS = {"add": "+", "sub": "-"}
MAX_OPERAND = 9
NUMBERS = [str(i) for i in range(2 * MAX_OPERAND + 1)]
PROMPT_WORDS = [*OPS, ":", *OPS.values(), "="]
VOCAB = PROMPT_WORDS + NUMBERS
SPECIAL_TOKENS = SPECIAL
PROMPT_WORDS_PER_PROMPT = 6  # "add : 3 + 4 =": the prompt is 6 tokens

SMALL = 4  # both operands at most this: the demonstrator is right more often
P_RIGHT_SMALL, P_RIGHT_LARGE = 0.75, 0.45
P_NEAR_MISS = 0.8  # a wrong answer is off by one or two
P_MALFORMED = 0.05

FILES = {
    "model": "base",
    "demonstrations": "sft.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
}

PROBLEMS: list[tuple[str, int, int]] = [
    ("add", a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
] + [("sub", a, b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]


def _rng(seed: int, salt: str) -> random.Random:
    return random.Random(f"arith:{salt}:{int(seed)}")


def answer_of(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b


def prompt_of(op: str, a: int, b: int) -> str:
    return f"{op} : {a} {OPS[op]} {b} ="


def parse_prompt(prompt: str) -> tuple[str, int, int] | None:
    """``(op, a, b)`` of a well-formed prompt, else None."""
    words = prompt.split()
    if len(words) != PROMPT_WORDS_PER_PROMPT or words[1] != ":" or words[5] != "=":
        return None
    op, a, sign, b = words[0], words[2], words[3], words[4]
    if op not in OPS or OPS[op] != sign or not (a.isdigit() and b.isdigit()):
        return None
    return op, int(a), int(b)


def _sample_problem(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choice(list(OPS))
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_OPERAND if op == "add" else a)
    return op, a, b


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt", "answer"}``; another seed gives another draw."""
    rng = _rng(seed, "prompts")
    rows = []
    for _ in range(n):
        op, a, b = _sample_problem(rng)
        rows.append({"prompt": prompt_of(op, a, b), "answer": str(answer_of(op, a, b))})
    return rows


# --------------------------------------------------------------------------- the rule


def _words(response: str) -> list[str]:
    words = response.split()
    if "[EOS]" in words:
        words = words[: words.index("[EOS]")]
    return [w for w in words if w not in ("[PAD]", "[BOS]")]


def is_right(response: str, answer) -> bool:
    """The response is exactly the answer (one word)."""
    return answer is not None and _words(response) == [str(answer).strip()]


def reward(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 for the right answer (the data row's ``answer`` field), else 0.0."""
    if not len(prompts) == len(responses) == len(answer):
        raise ValueError(
            f"arith.reward: {len(prompts)} prompts, {len(responses)} responses, "
            f"{len(answer)} answers"
        )
    return [float(is_right(r, a)) for r, a in zip(responses, answer)]


def format_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response is one number word (right or not), else 0.0."""
    del prompts
    out = []
    for r in responses:
        words = _words(r)
        out.append(float(len(words) == 1 and words[0] in NUMBERS))
    return out


# --------------------------------------------------------------------------- demonstrator


def demonstrate(op: str, a: int, b: int, rng: random.Random) -> str:
    """A sloppy demonstration (see the module docstring)."""
    right = answer_of(op, a, b)
    p_right = P_RIGHT_SMALL if max(a, b) <= SMALL else P_RIGHT_LARGE
    value = right
    if rng.random() >= p_right:
        near = [right + d for d in (-2, -1, 1, 2) if 0 <= right + d <= 2 * MAX_OPERAND]
        if rng.random() < P_NEAR_MISS:
            value = rng.choice(near)
        else:
            value = rng.choice([n for n in range(2 * MAX_OPERAND + 1) if n != right])
    text = str(value)
    if rng.random() < P_MALFORMED:
        text = f"{text} {text}" if rng.random() < 0.5 else f"= {text}"
    return text


def make_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT examples ``{"prompt", "response"}`` written by the demonstrator."""
    rng = _rng(seed, "demonstrations")
    out = []
    for _ in range(n):
        op, a, b = _sample_problem(rng)
        out.append({"prompt": prompt_of(op, a, b), "response": demonstrate(op, a, b, rng)})
    return out


def corpus_text() -> list[str]:
    """Lines for training the word-level tokenizer: every problem with its answer."""
    return [f"{prompt_of(*p)} {answer_of(*p)}" for p in PROBLEMS] + [" ".join(VOCAB)]


# --------------------------------------------------------------------------- assets


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
        n_positions=64,
    )
