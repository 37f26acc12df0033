"""Reward functions in-process: fields of the data row by name or ``**kwargs``, the two-argument
form, and several functions combined with weights."""

import sys
import textwrap

import pytest
import torch

from rlhf_dist.roles.scorers import FieldUse, RewardScorer, load_reward_functions
from rlhf_dist.tasks import arith, tiny

PROMPTS = ["add : 3 + 4 =", "sub : 9 - 4 =", "add : 1 + 1 =", "add : 9 + 9 ="]
RESPONSES = ["7", "6", "2 2", "18"]
ANSWERS = ["7", "5", "2", "18"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Reward functions of several signatures, importable as ``user_rewards:<name>``."""
    (tmp_path / "user_rewards.py").write_text(
        textwrap.dedent(
            """
            seen = {}

            def everything(prompts, completions, **fields):
                seen["everything"] = fields
                return [float(len(fields))] * len(completions)

            def optional(prompts, responses, answer, bonus=None):
                seen["optional"] = (answer, bonus)
                return [1.0 if b is None else float(b) for b in (bonus or [None] * len(answer))]

            def keyword_only(prompts, responses, *, answer):
                return [float(r == a) for r, a in zip(responses, answer)]

            def picky(prompts, responses, answer):
                return [1.0 / (a != "5") for a in answer]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_rewards

    yield user_rewards
    sys.modules.pop("user_rewards", None)


def test_field_use_read_from_the_signature(user_module):
    assert FieldUse.of(tiny.reward) == FieldUse(taken=("prompts", "responses"))
    use = FieldUse.of(arith.reward)
    assert use.named == use.required == ("answer",) and not use.any_field
    assert FieldUse.of(user_module.optional).required == ("answer",)
    assert FieldUse.of(user_module.optional).named == ("answer", "bonus")
    assert FieldUse.of(user_module.keyword_only).required == ("answer",)
    assert FieldUse.of(user_module.everything).any_field
    columns = ["answer", "bonus", "completions", "source"]
    # **fields takes every column but the names its first two parameters already have
    assert FieldUse.of(user_module.everything).wanted(columns) == ["answer", "bonus", "source"]
    assert FieldUse.of(user_module.optional).wanted(columns) == ["answer", "bonus"]
    assert FieldUse.of(user_module.optional).wanted(["answer"]) == ["answer"]
    assert FieldUse.of(tiny.reward).wanted(columns) == []


def test_a_function_taking_answer_receives_each_samples_answer():
    scorer = RewardScorer(function="rlhf_dist.tasks.arith:reward")
    out = scorer.score(PROMPTS, RESPONSES, {"answer": ANSWERS})
    assert out["scores"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert "parts" not in out  # one function: its scores are the reward
    # fields the function does not take are not passed to it
    out = scorer.score(PROMPTS, RESPONSES, {"answer": ANSWERS, "source": ["x"] * 4})
    assert out["scores"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_kwargs_optional_and_keyword_only_fields(user_module):
    fields = {"answer": ANSWERS, "source": ["a", "b", "c", "d"]}
    RewardScorer(function="user_rewards:everything").score(PROMPTS, RESPONSES, fields)
    assert user_module.seen["everything"] == fields
    scores = RewardScorer(function="user_rewards:optional").score(PROMPTS, RESPONSES, fields)
    assert user_module.seen["optional"] == (ANSWERS, None)  # bonus not in the data: default
    assert scores["scores"].tolist() == [1.0] * 4
    fields["bonus"] = [0.5, 0.25, 0.0, 2.0]
    scores = RewardScorer(function="user_rewards:optional").score(PROMPTS, RESPONSES, fields)
    assert scores["scores"].tolist() == [0.5, 0.25, 0.0, 2.0]
    kw = RewardScorer(function="user_rewards:keyword_only").score(PROMPTS, RESPONSES, fields)
    assert kw["scores"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_the_two_argument_form_keeps_working():
    scorer = RewardScorer(function="rlhf_dist.tasks.tiny:reward")
    responses = ["red cat", "sun moon star", ""]
    expected = torch.tensor(tiny.reward(["p"] * 3, responses))
    assert torch.equal(scorer.score(["p"] * 3, responses)["scores"], expected)
    # data fields given alongside are not passed to a function that does not take them
    with_fields = scorer.score(["p"] * 3, responses, {"answer": ["a", "b", "c"]})
    assert torch.equal(with_fields["scores"], expected)


def test_combined_functions_weighted_sum_and_parts():
    spec = "rlhf_dist.tasks.arith:reward, rlhf_dist.tasks.arith:format_reward"
    scorer = RewardScorer(function=spec, weights=[1.0, 0.5])
    out = scorer.score(PROMPTS, RESPONSES, {"answer": ANSWERS})
    right, form = [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]
    assert out["parts"]["reward"].tolist() == right  # each function's own (unweighted) scores
    assert out["parts"]["format_reward"].tolist() == form
    assert out["scores"].tolist() == [r + 0.5 * f for r, f in zip(right, form)]
    # unweighted: 1.0 each; a weight of 0 logs a function without rewarding it
    plain = RewardScorer(function=spec).score(PROMPTS, RESPONSES, {"answer": ANSWERS})
    assert plain["scores"].tolist() == [2.0, 1.0, 0.0, 2.0]
    nan_free = RewardScorer(function=spec, weights=[0.0, 1.0])
    assert nan_free.score(PROMPTS, RESPONSES, {"answer": ANSWERS})["scores"].tolist() == form


def test_part_names_are_distinct_and_never_the_combined_rewards(tmp_path, monkeypatch):
    for name in ("a_mod", "b_mod"):
        (tmp_path / f"{name}.py").write_text(
            "def score(prompts, responses):\n    return [0.0] * len(responses)\n"
            "def mean(prompts, responses):\n    return [1.0] * len(responses)\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = load_reward_functions("a_mod:score,b_mod:score,a_mod:mean")
    assert [f.name for f in fns] == ["a_mod_score", "b_mod_score", "a_mod_mean"]
    assert [f.name for f in load_reward_functions("a_mod:score")] == ["score"]
    with pytest.raises(ValueError, match="^reward.weights: 1 weights for 2 functions"):
        load_reward_functions("a_mod:score,b_mod:score", [1.0])


def test_missing_field_and_failing_sample_are_named(user_module):
    scorer = RewardScorer(function="rlhf_dist.tasks.arith:reward")
    with pytest.raises(RuntimeError, match="arith:reward' needs the data field 'answer'"):
        scorer.score(PROMPTS, RESPONSES)
    with pytest.raises(RuntimeError, match="field 'answer': 3 values for 4 responses"):
        scorer.score(PROMPTS, RESPONSES, {"answer": ANSWERS[:3]})
    picky = RewardScorer(function="user_rewards:picky")
    with pytest.raises(RuntimeError) as e:
        picky.score(PROMPTS, RESPONSES, {"answer": ANSWERS, "other": [0] * 4})
    assert "user_rewards:picky' raised ZeroDivisionError" in str(e.value)
    assert "on sample 1: prompt='sub : 9 - 4 =', response='6', fields={'answer': '5'}" in str(
        e.value
    )
