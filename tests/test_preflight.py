"""Preflight: resolve_inputs on the real builtin:tiny assets, and its errors naming the culprit."""

import json
from pathlib import Path

import pytest

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.preflight import context_length, resolve_inputs

TINY_CONTEXT = 128  # n_positions of the tiny GPT-2 built by rlhf_dist.tasks.tiny


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    """builtin:tiny assets, built once for this module."""
    from rlhf_dist.tasks.tiny import build_assets

    out = tmp_path_factory.mktemp("preflight_assets")
    build_assets(out / "tiny")  # where builtin:tiny lives under model.assets_dir
    return out


@pytest.fixture
def make_cfg(assets_dir):
    def make(*overrides):
        return load_config(None, [f"model.assets_dir={assets_dir}", *overrides])

    return make


def _jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_defaults_resolve_to_built_assets(make_cfg, assets_dir):
    inputs = resolve_inputs(make_cfg())
    policy = Path(inputs.policy)
    assert policy == assets_dir / "tiny" / "policy"
    assert (policy / "config.json").is_file()
    assert Path(inputs.tokenizer).is_dir()
    assert inputs.tokenizer == inputs.policy  # empty model.tokenizer means the policy's
    assert inputs.critic == inputs.policy  # empty model.critic means the policy
    assert len(inputs.prompts) > 0
    assert all(isinstance(p, str) and p.strip() for p in inputs.prompts)
    assert isinstance(inputs.pad_token_id, int) and not isinstance(inputs.pad_token_id, bool)
    assert context_length(inputs.policy) == TINY_CONTEXT


def test_explicit_paths_are_used(make_cfg, assets_dir, tmp_path):
    policy = str(assets_dir / "tiny" / "policy")
    prompts = _jsonl(tmp_path / "mine.jsonl", ["red cat", "blue dog sees"])
    inputs = resolve_inputs(
        make_cfg(
            f"model.policy={policy}",
            f"model.critic={policy}",
            f"model.tokenizer={policy}",
            f"data.prompts={prompts}",
        )
    )
    assert inputs.policy == policy
    assert inputs.critic == policy
    assert inputs.tokenizer == policy
    assert inputs.prompts == ["red cat", "blue dog sees"]


def test_missing_policy_names_key(make_cfg, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"model.policy={missing}"))
    assert str(e.value).startswith("model.policy:")
    assert str(missing) in str(e.value)


def test_policy_dir_without_model_names_key(make_cfg, tmp_path):
    empty = tmp_path / "empty_model_dir"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"model.policy={empty}"))
    assert str(e.value).startswith("model.policy:")
    assert str(empty) in str(e.value)


def test_missing_critic_names_key(make_cfg, tmp_path):
    missing = tmp_path / "no_such_critic"
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"model.critic={missing}"))
    assert str(e.value).startswith("model.critic:")
    assert str(missing) in str(e.value)


def test_missing_tokenizer_names_key(make_cfg, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"model.tokenizer={missing}"))
    assert str(e.value).startswith("model.tokenizer:")
    assert str(missing) in str(e.value)


def test_missing_prompt_file_names_file(make_cfg, tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(ConfigError, match="does not exist") as e:
        resolve_inputs(make_cfg(f"data.prompts={missing}"))
    assert str(missing) in str(e.value)


def test_empty_prompt_file_names_file(make_cfg, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no prompts") as e:
        resolve_inputs(make_cfg(f"data.prompts={empty}"))
    assert str(empty) in str(e.value)


def test_bad_prompt_line_names_file_and_line(make_cfg, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "red cat"}\n{"text": "wrong key"}\n')
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"data.prompts={path}"))
    assert f"{path}:2:" in str(e.value)


def test_prompt_key_is_used(make_cfg, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "red cat"}\n')
    inputs = resolve_inputs(make_cfg(f"data.prompts={path}", "data.prompt_key=question"))
    assert inputs.prompts == ["red cat"]


def test_too_long_prompt_names_file_and_line(make_cfg, tmp_path):
    limit = 10
    path = tmp_path / "long.jsonl"
    # word-level tokenizer without special tokens: one word, one token
    ok = " ".join(["red"] * limit)  # exactly at the limit: accepted
    too_long = " ".join(["blue"] * (limit + 1))
    path.write_text(
        json.dumps({"prompt": "red cat"})
        + "\n\n"
        + json.dumps({"prompt": ok})
        + "\n"
        + json.dumps({"prompt": too_long})  # line 4 (line 2 is blank)
        + "\n"
        + json.dumps({"prompt": "dog"})
        + "\n"
    )
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"data.prompts={path}", f"rollout.max_prompt_tokens={limit}"))
    msg = str(e.value)
    assert f"{path}:4:" in msg
    assert f"rollout.max_prompt_tokens={limit}" in msg
    assert f"{limit + 1} tokens" in msg


def test_prompt_at_limit_accepted(make_cfg, tmp_path):
    limit = 10
    path = _jsonl(tmp_path / "edge.jsonl", [" ".join(["red"] * limit), "cat"])
    inputs = resolve_inputs(make_cfg(f"data.prompts={path}", f"rollout.max_prompt_tokens={limit}"))
    assert len(inputs.prompts) == 2


def test_prompt_plus_response_over_context_names_keys(make_cfg):
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg("rollout.max_prompt_tokens=100", "rollout.max_new_tokens=29"))
    msg = str(e.value)
    assert "rollout.max_prompt_tokens" in msg
    assert "rollout.max_new_tokens" in msg
    assert str(TINY_CONTEXT) in msg
    assert "129" in msg


def test_prompt_plus_response_at_context_accepted(make_cfg):
    inputs = resolve_inputs(make_cfg("rollout.max_prompt_tokens=100", "rollout.max_new_tokens=28"))
    assert inputs.prompts


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:fn", "no_such_module_xyz"),
        ("rlhf_dist.tasks.tiny:no_such_fn", "no_such_fn"),
        ("rlhf_dist.tasks.tiny:WORDS", "WORDS"),  # exists but is not callable
    ],
)
def test_bad_reward_function_names_key(make_cfg, spec, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"reward.function={spec}"))
    assert str(e.value).startswith("reward.function:")
    assert fragment in str(e.value)


def test_missing_reward_model_names_key(make_cfg, tmp_path):
    missing = tmp_path / "no_such_rm"
    with pytest.raises(ConfigError) as e:
        resolve_inputs(make_cfg(f"reward.model={missing}"))
    assert str(e.value).startswith("reward.model:")
    assert str(missing) in str(e.value)
