"""The ``wordmath`` task: its problems and answers, its grader on hand-written responses, its
files, and its prompts rendered by SmolLM2-135M-Instruct's chat template."""

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf_dist import chat
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.models import load_tokenizer
from rlhf_dist.preflight import resolve, resolve_inputs
from rlhf_dist.tasks import smollm2, wordmath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "helpers"))
from smollm2_assets import assets_dir, converted  # noqa: E402

# each template's answer, written out again by hand
FORMULAS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "buy": lambda a, b: a + b,
    "give": lambda a, b: a - b,
    "groups": lambda a, b: a * b,
    "walk": lambda a, b: a + b,
    "buy_give": lambda a, b, c: a + b - c,
    "collect": lambda a, b, c: a + b + c,
}
WORDS = {"name": "Mia", "pronoun": "She", "items": "stickers", "container": "jars", "unit": "miles"}
# each template filled by hand: the question a reader checks by eye, and its answer
EXAMPLES = {
    "add": ({"a": 7, "b": 4}, "What is 7 + 4?", 11),
    "sub": ({"a": 9, "b": 4}, "What is 9 - 4?", 5),
    "mul": ({"a": 3, "b": 5}, "What is 3 times 5?", 15),
    "buy": (
        {"a": 5, "b": 3},
        "Mia has 5 stickers. She buys 3 more. How many stickers does Mia have now?",
        8,
    ),
    "give": (
        {"a": 9, "b": 4},
        "Mia has 9 stickers and gives 4 of them to a friend. How many stickers does Mia have left?",
        5,
    ),
    "groups": (
        {"a": 3, "b": 4},
        "There are 3 jars with 4 stickers in each. How many stickers are there in total?",
        12,
    ),
    "walk": (
        {"a": 4, "b": 3},
        "Mia walks 4 miles in the morning and 3 miles in the evening. "
        "How many miles does Mia walk in total?",
        7,
    ),
    "buy_give": (
        {"a": 6, "b": 4, "c": 3},
        "Mia has 6 stickers. She buys 4 more and then gives 3 away. "
        "How many stickers does Mia have now?",
        7,
    ),
    "collect": (
        {"a": 4, "b": 1, "c": 2},
        "Mia collects 4 stickers on Monday, 1 on Tuesday and 2 on Wednesday. "
        "How many stickers does Mia collect in total?",
        7,
    ),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return wordmath.build_assets(tmp_path_factory.mktemp("wordmath"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    return converted(tmp_path_factory)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- problems


def test_each_template_reads_as_written_by_hand():
    assert {t.name for t in wordmath.TEMPLATES} == set(FORMULAS) == set(EXAMPLES)
    for t in wordmath.TEMPLATES:
        values, question, answer = EXAMPLES[t.name]
        p = wordmath.problem_of(t, values, WORDS)
        assert (p.question, p.answer) == (question, answer), t.name
        assert p.row() == {
            "prompt": [{"role": "user", "content": f"{question} {wordmath.INSTRUCTION}"}],
            "answer": str(answer),
        }


def test_every_generated_answer_is_recomputed_from_its_parts():
    problems = wordmath.make_problems(6000, seed=3)
    for p in problems:
        values = dict(p.values)
        assert p.answer == FORMULAS[p.template](**values), p
        # the numbers the question shows are the problem's numbers, in order
        assert [int(x) for x in re.findall(r"\d+", p.question)] == list(values.values()), p
        assert 1 <= p.answer <= 16 and all(v >= 1 for v in values.values()), p
        assert p.row()["answer"] == str(p.answer)
        assert p.row()["prompt"][0]["content"] == f"{p.question} {wordmath.INSTRUCTION}"
    counts = Counter(p.template for p in problems)
    assert set(counts) == set(FORMULAS)
    kinds = Counter(t.kind for t in wordmath.TEMPLATES for _ in range(counts[t.name]))
    for kind, weight in wordmath.KIND_WEIGHTS.items():
        assert kinds[kind] / len(problems) == pytest.approx(weight, abs=0.03), kind
    assert len({p.question for p in problems}) > 2000  # names, objects and numbers vary


def test_evaluate_follows_precedence():
    values = {"a": 2, "b": 3, "c": 4}
    for formula in ["a + b", "a - b", "a * b", "a + b - c", "a * b + c", "a - b * c", "c - a - b"]:
        assert wordmath.evaluate(formula, values) == eval(formula, {}, values), formula


# --------------------------------------------------------------------------- the grader

RIGHT_7 = [
    "7",
    " 7 ",
    "7.",
    "7.0",
    "7.00",
    "**7**",
    "The answer is 7.",
    "The answer is: **7**!",
    "Answer: 7\n",
    "$7",
    "\\boxed{7}",
    "Tom has 3 + 4 = 7 apples.",
    "She has 7 apples",
    "There are 10 apples. 3 are eaten, so 10 - 3 = 7",
    "#### 7",
    "3 + 4 = 7\n#### 7",
    "#### 7\nThe answer is 7, since 3 + 4 is 7 and not 8.",  # the number after ####
    "7<|im_end|>\n<|im_start|>user\n8",  # nothing after the end of the turn counts
    "Counting: 5,6,7",
]
WRONG_7 = [
    "",
    "seven",
    "The answer is seven.",
    "8",
    "7.5",
    "77",
    "17",
    "-7",
    "x7",  # glued to a letter: not a number
    "The answer is 7. That is 2 more than 5.",  # rambles on to another number
    "7 + 1 = 8",
    "#### 8\nso 7",  # the number after #### is the answer given
    "<|im_end|>7",
]


def test_reward_reads_the_final_number():
    n = len(RIGHT_7) + len(WRONG_7)
    got = wordmath.reward([""] * n, RIGHT_7 + WRONG_7, ["7"] * n)
    assert got[: len(RIGHT_7)] == [1.0] * len(RIGHT_7), list(zip(RIGHT_7, got))
    assert got[len(RIGHT_7) :] == [0.0] * len(WRONG_7), list(zip(WRONG_7, got[len(RIGHT_7) :]))


@pytest.mark.parametrize(
    "response, answer, right",
    [
        ("-3", "-3", True),
        ("The result is -3.", "-3", True),
        ("5 - 8 = -3", "-3", True),
        ("5-8=-3", "-3", True),
        ("3", "-3", False),
        ("9-4", "4", True),  # the minus after a digit is an operator
        ("9-4", "-4", False),
        ("1,200", "1200", True),
        ("It is 1,200 meters.", "1200", True),
        ("1,200.0", "1200", True),
        ("1200", "1,200", True),
        ("4,5", "5", True),  # not a thousands group: two numbers
        ("1,20", "20", True),
        ("3.50", "3.5", True),
        ("0.5", "0.5", True),
        (".5", "0.5", False),
        ("12 cm", "12", True),
        ("7", 7, True),  # the row's answer may be a number
        ("7", None, False),
        ("7", "seven", False),
    ],
)
def test_reward_edge_cases(response, answer, right):
    assert wordmath.reward(["p"], [response], [answer]) == [float(right)]


def test_reward_checks_its_lengths():
    with pytest.raises(ValueError, match="2 prompts, 2 responses, 1 answers"):
        wordmath.reward(["p", "q"], ["1", "2"], ["1"])


def test_format_reward_wants_a_short_response_ending_with_a_number():
    cases = {
        "7": 1.0,
        "The answer is 7.": 1.0,
        "**7**": 1.0,
        "#### 7": 1.0,
        "(7)": 1.0,
        "8": 1.0,  # the form alone, right or not
        "7<|im_end|>more words": 1.0,
        "7 apples": 0.0,
        "7 is the answer": 0.0,
        "seven": 0.0,
        "": 0.0,
        " ".join(["word"] * wordmath.FORMAT_MAX_WORDS) + " 7": 0.0,  # too long
        " ".join(["word"] * (wordmath.FORMAT_MAX_WORDS - 1)) + " 7": 1.0,
    }
    assert wordmath.format_reward([""] * len(cases), list(cases)) == list(cases.values())


def test_brevity_reward_falls_linearly_with_the_words():
    brief, long = wordmath.BRIEF_WORDS, wordmath.LONG_WORDS
    words = [0, 1, brief, (brief + long) // 2, long, long + 50]
    responses = [" ".join(["w"] * n) for n in words]
    got = wordmath.brevity_reward([""] * len(words), responses)
    mid = (long - (brief + long) // 2) / (long - brief)
    assert got == pytest.approx([1.0, 1.0, 1.0, mid, 0.0, 0.0])


# --------------------------------------------------------------------------- files


def test_files_are_built_once_and_deterministic(assets, tmp_path):
    prompts, held_out = _rows(assets / "prompts.jsonl"), _rows(assets / "eval_prompts.jsonl")
    assert len(prompts) == 2048 and len(held_out) == 512
    assert all(set(r) == {"prompt", "answer"} for r in prompts + held_out)
    assert prompts == wordmath.make_prompts(2048, seed=wordmath.TRAIN_SEED)
    assert held_out == wordmath.make_prompts(512, seed=wordmath.EVAL_SEED)
    # what the module docstring says of the overlap: 62% of the held-out rows are train
    # rows, every bare arithmetic problem among them and about a fifth of the word problems
    train = {r["prompt"][0]["content"] for r in prompts}
    bare = [r["prompt"][0]["content"].startswith("What is") for r in held_out]
    repeated = [r["prompt"][0]["content"] in train for r in held_out]
    assert sum(repeated) / len(held_out) == pytest.approx(0.62, abs=0.01)
    assert all(rep for rep, b in zip(repeated, bare) if b)
    words = [rep for rep, b in zip(repeated, bare) if not b]
    assert 0.1 < sum(words) / len(words) < 0.3
    # the 25 sums, 15 differences and 9 products are all in the train file
    assert len({q for q in train if q.startswith("What is")}) == 25 + 15 + 9
    # built once: a second call rewrites nothing; another directory gets the same bytes
    before = {f: (assets / f).stat().st_mtime_ns for f in wordmath.FILES.values()}
    assert wordmath.build_assets(assets) == assets
    assert {f: (assets / f).stat().st_mtime_ns for f in wordmath.FILES.values()} == before
    again = wordmath.build_assets(tmp_path / "again")
    for f in wordmath.FILES.values():
        assert (again / f).read_bytes() == (assets / f).read_bytes()


def test_resolve_builds_the_files_and_refuses_other_kinds(tmp_path):
    cfg = load_config(None, [f"model.assets_dir={tmp_path}"])
    for kind, name in wordmath.FILES.items():
        assert resolve(cfg, tmp_path, "data.prompts", "builtin:wordmath", kind) == str(
            tmp_path / "wordmath" / name
        )
    with pytest.raises(ConfigError, match=r"^model\.policy: builtin:wordmath has no model"):
        resolve(cfg, tmp_path, "model.policy", "builtin:wordmath", "model")


# --------------------------------------------------------------------------- with SmolLM2


def test_prompts_render_with_smollm2s_chat_template_within_the_budget(smollm2_dir, assets):
    tok = load_tokenizer(str(smollm2_dir))
    lengths = []
    for name in wordmath.FILES.values():
        for row in _rows(assets / name):
            text = chat.prompt_text(tok, row["prompt"], template=True, chat=True)
            assert text.endswith(f"{wordmath.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
            lengths.append(len(tok(text, add_special_tokens=False).input_ids))
    assert max(lengths) <= wordmath.MAX_PROMPT_TOKENS
    assert max(lengths) > wordmath.MAX_PROMPT_TOKENS - 8  # and it is not loose


def test_the_whole_task_passes_the_preflight(smollm2_dir, tmp_path_factory):
    """policy, prompts, held-out prompts, reward and gold as a GRPO config names them."""
    rule = "rlhf_dist.tasks.wordmath:reward"
    cfg = load_config(
        None,
        [
            f"model.assets_dir={assets_dir(tmp_path_factory)}",
            f"model.policy={smollm2.SOURCE}",
            "data.prompts=builtin:wordmath",
            "eval.prompts=builtin:wordmath",
            f"reward.function={rule},rlhf_dist.tasks.wordmath:format_reward",
            "reward.weights=[1.0,0.2]",
            f"eval.gold={rule}",
            f"rollout.max_prompt_tokens={wordmath.MAX_PROMPT_TOKENS}",
        ],
    )
    inputs = resolve_inputs(cfg, tmp_path_factory.mktemp("run"))
    assert inputs.policy == str(smollm2_dir)
    assert len(inputs.prompts) == 2048
    assert inputs.prompts[0].startswith("<|im_start|>system\n")
    # a budget the prompts do not fit is refused, naming the key
    cfg.rollout.max_prompt_tokens = 40
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        resolve_inputs(cfg, tmp_path_factory.mktemp("run"))
