"""``builtin:wordmath``: small arithmetic and word problems for a real instruct model.

A verifiable task sized for ``builtin:smollm2-135m-instruct`` (SmolLM2-135M-Instruct): the
problems are easy enough that the model starts partly right and hard enough that it is far
from the ceiling, so RL on the rule reward (GRPO, as DeepSeekMath trains on GSM8K) has room
to move. Everything is built locally from templates and seeds; nothing is downloaded.

Problems
--------
Each problem is one template (``TEMPLATES``: its kind, text, formula and number ranges) filled
with a name, objects or units and small numbers, then the instruction ``INSTRUCTION``::

    kind (weight)     template (abridged)                                 answer     numbers
    arithmetic (0.5)  What is 4 + 5?                                      a + b      1-5
                      What is 6 - 2?                                      a - b      b < a <= 6
                      What is 3 times 4?                                  a * b      2-4
    one step (0.35)   Mia has 5 stickers. She buys 3 more. How many ...   a + b      2-5, 1-5
                      Tom has 8 marbles and gives 2 of them to a friend.  a - b      b < a <= 8
                      There are 2 jars with 4 shells in each. How ...     a * b      2-4
                      Anna walks 4 miles in the morning and 4 miles ...   a + b      2-6
    two steps (0.15)  Ben has 6 cookies. He buys 4 more and then gives .. a + b - c  2-6, 1-4,
                                                                                     c < a + b
                      Lily collects 4 cards on Monday, 1 on Tuesday ...   a + b + c  2-4, 1-4

(every number at least 1; ``TEMPLATES`` holds the exact texts).
A problem is drawn as a kind by ``KIND_WEIGHTS``, then a template of that kind, then its
numbers and words uniformly. Every answer is an integer from 1 to 16.

Starting point, measured by ``benchmarks/wordmath_baseline.py`` (256 held-out prompts, one
sample each, 48 or 64 new tokens): SmolLM2-135M-Instruct is right 0.37-0.38 (± 0.03) of the
time at temperature 0.7 and 0.21-0.22 (± 0.03) at 1.0; the bare problems 0.2-0.5, the one-step
ones 0.1-0.5, the two-step ones 0-0.2. The ranges and weights were tuned to that: with
operands up to 9 and weights 0.4 / 0.4 / 0.2 it started at 0.26 (temperature 0.7) and 0.11
(1.0). A third to a half of its responses run past 48 tokens without ending their turn.

Rows are chat messages, so the policy's chat template renders them::

    {"prompt": [{"role": "user", "content": "What is 4 + 5? Give only the final number."}],
     "answer": "9"}

and a reward function that takes the field by name (``reward(prompts, responses, answer)``)
receives each sample's row's answer.

Train and held-out prompts are independent draws (seeds ``seed + TRAIN_SEED`` and
``seed + EVAL_SEED``) from the same templates, not made disjoint, so held-out prompts repeat
train prompts: there are only 49 bare arithmetic problems, every one of them in the train
file, and a word problem repeats one when its name, objects and numbers all coincide. Of the
512 held-out rows 62% appear verbatim among the 2,048 train rows (all the bare arithmetic and
about a fifth of the word problems). The held-out accuracy is thus how often the policy
samples the right answer on a fresh draw of the same problem distribution, not generalisation
to unseen problems; most held-out word problems are texts training never showed.

Grading (``reward``)
--------------------
1.0 when the *final number* of the response equals the row's ``answer``, else 0.0:

1. text from the first end-of-turn marker on (``<|im_end|>``, ``<|endoftext|>``) is dropped;
2. if the response holds ``####`` (GSM8K's answer marker), the number read is the first one
   after the last ``####``; otherwise it is the last number of the response;
3. numbers are the matches of ``NUMBER``: an optional ``-`` sign, digits with optional
   thousands commas (``1,234``: groups of exactly three digits), an optional decimal part;
   none starts right after a letter, digit or ``.`` (``x2`` and ``.5`` hold none, a ``-``
   after a digit is an operator: ``9-4`` holds 9 and 4, ``9 -4`` holds 9 and -4);
4. that number, commas removed, must equal the answer exactly, as a number (``7``, ``7.0``
   and ``7.00`` are 7; ``7.5`` is not). No number: 0.0.

So ``The answer is 7.``, ``#### 7``, ``#### 7 apples, 3 more than 4``, ``7``, ``**7**``,
``$7``, ``-3``, ``5 - 8 = -3``, ``1,200 meters`` are read as 7, 7, 7, 7, 7, 7, -3, -3, 1200;
words (``seven``) are not numbers, and a response that states the answer and then rambles on
to another number is wrong (its final number is the answer it gives, as the instruction
asks).

Shaping rewards, to combine with weights (``reward.function: ...:reward,...:format_reward``
with ``reward.weights``); neither looks at the answer:

- ``format_reward``: 1.0 when the response (end-of-turn text dropped) ends with a number, with
  nothing after it but whitespace and the closing marks ``. ! * ) ] } ` ' "`` (``7.``,
  ``**7**``), and has at most ``FORMAT_MAX_WORDS`` words; else 0.0 (``7 apples`` does not end
  with its number).
- ``brevity_reward``: 1.0 up to ``BRIEF_WORDS`` words, falling linearly to 0.0 at
  ``LONG_WORDS`` words (whitespace-separated).

``build_assets(dir)`` writes, once: ``prompts.jsonl`` (train) and ``eval_prompts.jsonl``
(held-out), rows as above. The model is ``builtin:smollm2-135m-instruct``
(``rlhf_dist/tasks/smollm2.py``); rendered with its chat template (and its default system
message) every prompt fits ``MAX_PROMPT_TOKENS`` tokens. The model's starting accuracy is
measured by ``benchmarks/wordmath_baseline.py``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from rlhf_dist.tasks.tiny import build_data_files

FILES = {"prompts": "prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}
TRAIN_SEED, EVAL_SEED = 2, 1000  # added to build_assets' seed: independent draws
INSTRUCTION = "Give only the final number."
# the longest prompt rendered by SmolLM2's chat template (its default system message
# included) is 64 tokens: the default rollout.max_prompt_tokens
MAX_PROMPT_TOKENS = 64

NAMES = {  # name -> subject pronoun
    "Tom": "He",
    "Ben": "He",
    "Sam": "He",
    "Jack": "He",
    "Leo": "He",
    "Omar": "He",
    "Anna": "She",
    "Mia": "She",
    "Lily": "She",
    "Emma": "She",
    "Sara": "She",
    "Nina": "She",
}
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells"]
CONTAINERS = ["boxes", "bags", "baskets", "jars"]
DISTANCES = ["kilometers", "miles"]


@dataclass(frozen=True)
class Template:
    """A problem's text, with ``{a}``, ``{b}``, ``{c}`` for its numbers and ``{name}``,
    ``{pronoun}``, ``{items}``, ``{container}``, ``{unit}`` for its words."""

    name: str
    kind: str  # "arithmetic", "one_step" or "two_step"
    text: str
    formula: str  # in a, b, c; documentation, and what the tests recompute
    draw: Callable[[random.Random], dict[str, int]]  # the numbers a, b (, c)


def _uniform(**ranges: tuple[int, int]):
    """Each number uniform in its inclusive range."""
    return lambda rng: {k: rng.randint(lo, hi) for k, (lo, hi) in ranges.items()}


def _difference(lo: int, hi: int):
    """``lo <= b < a <= hi``: a positive difference."""

    def draw(rng):
        a = rng.randint(lo + 1, hi)
        return {"a": a, "b": rng.randint(lo, a - 1)}

    return draw


def _more_then_give(rng):
    """``a + b - c`` with ``1 <= c < a + b``."""
    a, b = rng.randint(2, 6), rng.randint(1, 4)
    return {"a": a, "b": b, "c": rng.randint(1, a + b - 1)}


# A number right before a plural noun is at least 2 ("has 1 apples" would read wrongly).
TEMPLATES = [
    Template("add", "arithmetic", "What is {a} + {b}?", "a + b", _uniform(a=(1, 5), b=(1, 5))),
    Template("sub", "arithmetic", "What is {a} - {b}?", "a - b", _difference(1, 6)),
    Template("mul", "arithmetic", "What is {a} times {b}?", "a * b", _uniform(a=(2, 4), b=(2, 4))),
    Template(
        "buy",
        "one_step",
        "{name} has {a} {items}. {pronoun} buys {b} more. How many {items} does {name} have now?",
        "a + b",
        _uniform(a=(2, 5), b=(1, 5)),
    ),
    Template(
        "give",
        "one_step",
        "{name} has {a} {items} and gives {b} of them to a friend. "
        "How many {items} does {name} have left?",
        "a - b",
        _difference(1, 8),
    ),
    Template(
        "groups",
        "one_step",
        "There are {a} {container} with {b} {items} in each. How many {items} are there in total?",
        "a * b",
        _uniform(a=(2, 4), b=(2, 4)),
    ),
    Template(
        "walk",
        "one_step",
        "{name} walks {a} {unit} in the morning and {b} {unit} in the evening. "
        "How many {unit} does {name} walk in total?",
        "a + b",
        _uniform(a=(2, 6), b=(2, 6)),
    ),
    Template(
        "buy_give",
        "two_step",
        "{name} has {a} {items}. {pronoun} buys {b} more and then gives {c} away. "
        "How many {items} does {name} have now?",
        "a + b - c",
        _more_then_give,
    ),
    Template(
        "collect",
        "two_step",
        "{name} collects {a} {items} on Monday, {b} on Tuesday and {c} on Wednesday. "
        "How many {items} does {name} collect in total?",
        "a + b + c",
        _uniform(a=(2, 4), b=(1, 4), c=(1, 4)),
    ),
]
KIND_WEIGHTS = {"arithmetic": 0.5, "one_step": 0.35, "two_step": 0.15}

_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def evaluate(formula: str, values: dict[str, int]) -> int:
    """``formula`` (names and ``+ - *`` separated by spaces, ``*`` before ``+ -``) at
    ``values``."""
    terms, signs = [], []
    words = formula.split()
    product = values[words[0]]
    for op, name in zip(words[1::2], words[2::2]):
        if op == "*":
            product *= values[name]
        else:
            terms.append(product)
            signs.append(op)
            product = values[name]
    terms.append(product)
    total = terms[0]
    for op, term in zip(signs, terms[1:]):
        total = _OPS[op](total, term)
    return total


@dataclass(frozen=True)
class Problem:
    template: str  # Template.name
    values: tuple[tuple[str, int], ...]  # ("a", 5), ("b", 3), ...: the text shows them in order
    question: str  # the text without the instruction
    answer: int

    @property
    def content(self) -> str:
        """The user turn: the question, then the instruction."""
        return f"{self.question} {INSTRUCTION}"

    def row(self) -> dict:
        return {"prompt": [{"role": "user", "content": self.content}], "answer": str(self.answer)}


def _rng(seed: int, salt: str) -> random.Random:
    return random.Random(f"wordmath:{salt}:{int(seed)}")


def problem_of(template: Template, values: dict[str, int], words: dict[str, str]) -> Problem:
    """``template`` filled with its numbers ``values`` and ``words`` (name, pronoun, ...)."""
    question = template.text.format(**values, **words)
    answer = evaluate(template.formula, values)
    return Problem(template.name, tuple(sorted(values.items())), question, answer)


def sample_problem(rng: random.Random) -> Problem:
    """A kind by ``KIND_WEIGHTS``, a template of that kind, then its numbers and words."""
    kinds = list(KIND_WEIGHTS)
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    template = rng.choice([t for t in TEMPLATES if t.kind == kind])
    values = template.draw(rng)
    name = rng.choice(sorted(NAMES))
    words = {
        "name": name,
        "pronoun": NAMES[name],
        "items": rng.choice(ITEMS),
        "container": rng.choice(CONTAINERS),
        "unit": rng.choice(DISTANCES),
    }
    return problem_of(template, values, words)


def make_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems; another seed gives another draw."""
    rng = _rng(seed, "problems")
    return [sample_problem(rng) for _ in range(n)]


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt": [user message], "answer"}``."""
    return [p.row() for p in make_problems(n, seed)]


# --------------------------------------------------------------------------- grading

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# after the final number, what still counts as "ends with it"
_CLOSING = re.compile(r"[\s.!*)\]}`'\"]*")
FORMAT_MAX_WORDS = 30
BRIEF_WORDS, LONG_WORDS = 10, 40


def _visible(response: str) -> str:
    for marker in END_OF_TURN:
        response = response.split(marker, 1)[0]
    return response


def final_number(response: str) -> Fraction | None:
    """The response's final number (see the module docstring), exactly; None without one."""
    text = _visible(response)
    if "####" in text:
        found = NUMBER.findall(text.rsplit("####", 1)[1])[:1]
    else:
        found = NUMBER.findall(text)[-1:]
    return Fraction(found[0].replace(",", "")) if found else None


def is_right(response: str, answer) -> bool:
    """The response's final number equals ``answer`` (a number or its text)."""
    if answer is None:
        return False
    got = final_number(response)
    try:
        want = Fraction(str(answer).strip().replace(",", ""))
    except ValueError:
        return False
    return got is not None and got == want


def reward(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when the response's final number is the row's ``answer``, else 0.0."""
    if not len(prompts) == len(responses) == len(answer):
        raise ValueError(
            f"wordmath.reward: {len(prompts)} prompts, {len(responses)} responses, "
            f"{len(answer)} answers"
        )
    return [float(is_right(r, a)) for r, a in zip(responses, answer)]


def ends_with_number(response: str) -> bool:
    """The response's last non-closing characters are a number (``... is 7.``, ``**7**``)."""
    text = _visible(response)
    ends = [m.end() for m in NUMBER.finditer(text)]
    return bool(ends) and _CLOSING.fullmatch(text, ends[-1]) is not None


def format_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response ends with a number and has at most ``FORMAT_MAX_WORDS`` words
    (right or not), else 0.0."""
    del prompts
    return [
        float(ends_with_number(r) and len(_visible(r).split()) <= FORMAT_MAX_WORDS)
        for r in responses
    ]


def brevity_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 up to ``BRIEF_WORDS`` words, linearly down to 0.0 at ``LONG_WORDS`` words."""
    del prompts
    out = []
    for r in responses:
        words = len(_visible(r).split())
        out.append(min(1.0, max(0.0, (LONG_WORDS - words) / (LONG_WORDS - BRIEF_WORDS))))
    return out


# --------------------------------------------------------------------------- assets


def build_assets(
    out_dir: str | Path, num_prompts: int = 2048, num_eval_prompts: int = 512, seed: int = 0
) -> Path:
    """Build (once) the train and held-out prompt files under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "prompts": lambda: make_prompts(num_prompts, seed=seed + TRAIN_SEED),
        "eval_prompts": lambda: make_prompts(num_eval_prompts, seed=seed + EVAL_SEED),
    }
    build_data_files(out, FILES, makers)
    return out
