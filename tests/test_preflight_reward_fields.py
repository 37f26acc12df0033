"""Preflight of reward functions that take data fields: the fields travel from the prompt files
into Inputs, and a function whose fields the data lacks is refused before anything starts,
naming the key, the field and the file. Also builtin:arith and which stages ``all`` runs."""

import json
from pathlib import Path

import pytest

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.preflight import check_all, resolve_inputs, stages_of

ARITH = "rlhf_dist.tasks.arith:reward"


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    """builtin:arith assets (small data files), built once for this module."""
    from rlhf_dist.tasks import arith

    out = tmp_path_factory.mktemp("preflight_arith")
    arith.build_assets(out / "arith", num_demonstrations=200, num_prompts=64, num_eval_prompts=32)
    return out


@pytest.fixture
def make_cfg(assets_dir):
    def make(*overrides):
        base = [
            f"model.assets_dir={assets_dir}",
            "model.policy=builtin:arith",
            "data.prompts=builtin:arith",
            f"reward.function={ARITH}",
            "rollout.max_prompt_tokens=8",
            "rollout.max_new_tokens=4",
        ]
        return load_config(None, [*base, *overrides])

    return make


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"prompt": "add : 3 + 4 =", "answer": "7", "level": 1},
    {"prompt": "sub : 9 - 4 =", "answer": "5", "level": 2},
    {"prompt": "add : 1 + 1 =", "answer": "2", "level": 1},
]


def test_fields_travel_with_the_prompts(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    held_out = _jsonl(tmp_path / "held_out.jsonl", [*ROWS[::-1], {"prompt": "add : 0 + 0 ="}])
    inputs = resolve_inputs(
        make_cfg(
            f"data.prompts={data}",
            f"eval.gold={ARITH}",
            f"eval.prompts={held_out}",
            "eval.num_prompts=2",
        )
    )
    assert inputs.prompts == [r["prompt"] for r in ROWS]
    assert inputs.prompt_fields == {"answer": ["7", "5", "2"], "level": [1, 2, 1]}
    # the held-out rows are cut to eval.num_prompts, their fields with them (the fourth row,
    # which lacks 'answer', is not among them)
    assert inputs.eval_prompts == ["add : 1 + 1 =", "sub : 9 - 4 ="]
    assert inputs.eval_prompt_fields == {"answer": ["2", "5"], "level": [1, 2]}


def test_builtin_arith_resolves_every_file(make_cfg, assets_dir):
    inputs = resolve_inputs(make_cfg(f"eval.gold={ARITH}", "eval.prompts=builtin:arith"))
    assert Path(inputs.policy) == assets_dir / "arith" / "base"
    assert len(inputs.prompts) == 64 and len(inputs.prompt_fields["answer"]) == 64
    assert len(inputs.eval_prompts) == 32 and set(inputs.eval_prompt_fields) == {"answer"}


def test_reward_function_field_missing_from_the_data_names_key_field_and_file(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "no_answers.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"data.prompts={data}"))
    msg = str(e.value)
    assert msg.startswith("reward.function:")
    assert "'answer'" in msg and str(data) in msg and "data.prompts" in msg


def test_a_row_without_the_field_is_named_by_file_and_line(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "gap.jsonl", [ROWS[0], {"prompt": "add : 2 + 2 ="}, ROWS[1]])
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"data.prompts={data}"))
    assert str(e.value).startswith("reward.function:")
    assert f"{data}:2" in str(e.value) and "'answer'" in str(e.value)


def test_two_argument_reward_needs_no_fields(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    inputs = resolve_inputs(
        make_cfg(f"data.prompts={data}", "reward.function=rlhf_dist.tasks.arith:format_reward")
    )
    assert inputs.prompt_fields == {}


def test_gold_field_missing_from_held_out_prompts_names_eval_gold(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    held_out = _jsonl(tmp_path / "held_out.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    cfg = make_cfg(
        f"data.prompts={data}",
        "reward.function=rlhf_dist.tasks.arith:format_reward",
        f"eval.gold={ARITH}",
        f"eval.prompts={held_out}",
    )
    with pytest.raises(ConfigError) as e:
        resolve_inputs(cfg)
    msg = str(e.value)
    assert msg.startswith("eval.gold:") and "'answer'" in msg
    assert "eval.prompts" in msg and str(held_out) in msg


def test_reward_field_missing_from_held_out_prompts_refused_too(make_cfg, tmp_path):
    """Evaluation scores the held-out samples with the reward functions (the proxy reward)."""
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    held_out = _jsonl(tmp_path / "held_out.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    cfg = make_cfg(
        f"data.prompts={data}",
        "eval.gold=rlhf_dist.tasks.arith:format_reward",
        f"eval.prompts={held_out}",
    )
    with pytest.raises(ConfigError) as e:
        resolve_inputs(cfg)
    assert str(e.value).startswith("reward.function:")
    assert "eval.prompts" in str(e.value) and str(held_out) in str(e.value)


def test_combined_functions_checked_each(make_cfg, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    spec = f"rlhf_dist.tasks.arith:format_reward,{ARITH}"
    with pytest.raises(ConfigError, match=rf"^reward.function: {ARITH} takes .*'answer'"):
        resolve_inputs(make_cfg(f"data.prompts={data}", f"reward.function={spec}"))
    with pytest.raises(ConfigError, match="^reward.function: .*no_such_fn"):
        resolve_inputs(make_cfg(f"reward.function={ARITH},rlhf_dist.tasks.arith:no_such_fn"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            [f"reward.function={ARITH},rlhf_dist.tasks.arith:format_reward", "reward.weights=[1]"],
            r"^reward.weights: 1 weights for 2 functions",
        ),
        (["reward.weights=[1.0, 2.0]"], r"^reward.weights: 2 weights for 1 functions"),
        (["reward.weights=0.5"], r"^reward.weights: expected a list"),
        (["reward.weights=[1, x]"], r"^reward.weights\[1\]: expected a number"),
        (["reward.weights=[.nan]"], r"^reward.weights\[0\]: must be a finite number"),
        (["reward.model=/m", "reward.weights=[1.0]"], r"^reward.weights: .*reward.model is set"),
        ([f"reward.function={ARITH},"], r"^reward.function: expected 'module:function'"),
        ([f"reward.function={ARITH}, {ARITH}"], r"^reward.function: .* is listed twice"),
    ],
)
def test_bad_weights_and_specs_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_weights_load_as_floats():
    cfg = load_config(None, [f"reward.function={ARITH},a.b:c", "reward.weights=[1, 0.5]"])
    assert cfg.reward.weights == [1.0, 0.5] and all(type(w) is float for w in cfg.reward.weights)


def test_builtin_arith_has_no_comparisons(make_cfg, tmp_path):
    cfg = make_cfg("run.stage=rm", "rm.data=builtin:arith", "rm.init=builtin:arith")
    with pytest.raises(ConfigError, match="^rm.data: builtin:arith has no pairs"):
        check_all(cfg, tmp_path)


def test_stage_all_runs_the_reward_model_only_when_ppo_uses_it():
    arith_cfg = load_config("configs/arith.yaml")
    assert stages_of(arith_cfg) == ["sft", "ppo"]
    assert stages_of(load_config("configs/default.yaml")) == ["sft", "rm", "ppo"]
    critic = load_config("configs/arith.yaml", ["model.critic=run:rm"])
    assert stages_of(critic) == ["sft", "rm", "ppo"]
    assert stages_of(load_config("configs/arith.yaml", ["run.stage=rm"])) == ["rm"]


def test_arith_recipe_passes_preflight(assets_dir, tmp_path):
    cfg = load_config("configs/arith.yaml", [f"model.assets_dir={assets_dir}"])
    check_all(cfg, tmp_path / "run")  # SFT on builtin:arith, then PPO on its pending export
