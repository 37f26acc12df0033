"""Chat templates with real tokenizers built here: the policy reads its own template with the
generation prompt, the reward model renders the same conversation with its own, SFT trains on
assistant turns only, and the preflight refuses what cannot be rendered, naming the row."""

import sys
from pathlib import Path

import datasets
import pytest
import torch

from rlhf_dist import chat
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.models import load_reward_model, load_tokenizer
from rlhf_dist.preflight import resolve_inputs, supervised_inputs
from rlhf_dist.roles import RewardScorer

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from chat_models import (  # noqa: E402
    REWARD_TEMPLATE,
    build_chat_policy,
    build_chat_reward_model,
)

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "describe : red cat"},
]
ROWS = [
    {"prompt": CONV, "answer": "7", "id": "a"},
    {"prompt": [{"role": "user", "content": "describe : sun"}], "answer": "3", "id": "b"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_models")
    return {
        "policy": build_chat_policy(d / "policy"),
        "plain_policy": build_chat_policy(d / "plain_policy", template=None),
        "reward": build_chat_reward_model(d / "reward"),
        "plain_reward": build_chat_reward_model(d / "plain_reward", template=None),
    }


def _parquet(path: Path, rows) -> str:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _cfg(models, tmp_path, *overrides):
    return load_config(
        None,
        [
            f"model.assets_dir={tmp_path / 'assets'}",
            f"model.policy={models['policy']}",
            "reward.function=rlhf_dist.tasks.tiny:reward",
            *overrides,
        ],
    )


def test_prompts_rendered_with_the_policy_template_and_fields_travel(models, tmp_path):
    data = _parquet(tmp_path / "p.parquet", ROWS)
    inputs = resolve_inputs(_cfg(models, tmp_path, f"data.prompts={data}"))
    tok = load_tokenizer(models["policy"])
    assert inputs.prompts[0] == "<|system|> be brief <|user|> describe : red cat <|assistant|> "
    assert inputs.prompts[1] == tok.apply_chat_template(
        ROWS[1]["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert not inputs.add_special_tokens  # the template already holds what it needs
    assert inputs.prompt_messages[0] == CONV
    assert list(inputs.prompt_fields) == ["answer", "id"]
    assert [inputs.prompt_fields["id"][i] for i in range(2)] == ["a", "b"]


def test_auto_without_a_template_renders_messages_plainly(models, tmp_path):
    data = _parquet(tmp_path / "p.parquet", ROWS)
    cfg = _cfg(models, tmp_path, f"data.prompts={data}", f"model.policy={models['plain_policy']}")
    inputs = resolve_inputs(cfg)
    assert inputs.prompts[0] == "system: be brief\nuser: describe : red cat\nassistant:"
    assert inputs.add_special_tokens


def test_strings_with_chat_template_true_become_user_turns(models, tmp_path):
    data = _parquet(tmp_path / "p.parquet", [{"prompt": "describe : sun"}])
    inputs = resolve_inputs(
        _cfg(models, tmp_path, f"data.prompts={data}", "data.chat_template=true")
    )
    assert inputs.prompts[0] == "<|user|> describe : sun <|assistant|> "
    assert inputs.prompt_messages[0] == [{"role": "user", "content": "describe : sun"}]
    # and with auto a string stays the string it is
    inputs = resolve_inputs(_cfg(models, tmp_path, f"data.prompts={data}"))
    assert inputs.prompts[0] == "describe : sun" and inputs.prompt_messages is None


def test_chat_template_true_refuses_a_tokenizer_without_one(models, tmp_path):
    data = _parquet(tmp_path / "p.parquet", ROWS)
    cfg = _cfg(
        models,
        tmp_path,
        f"data.prompts={data}",
        f"model.policy={models['plain_policy']}",
        "data.chat_template=true",
    )
    with pytest.raises(ConfigError, match="has no chat template") as e:
        resolve_inputs(cfg)
    assert models["plain_policy"] in str(e.value)
    cfg = _cfg(
        models,
        tmp_path,
        f"data.prompts={data}",
        f"reward.model={models['plain_reward']}",
        "data.chat_template=true",
    )
    with pytest.raises(ConfigError, match="reward.model .* has no chat template"):
        resolve_inputs(cfg)


def test_bad_message_row_of_a_dataset_refused_naming_row_and_field(models, tmp_path):
    rows = [ROWS[1], ROWS[1], {**ROWS[1], "prompt": [{"role": "robot", "content": "x"}]}]
    data = _parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(ConfigError) as e:
        resolve_inputs(_cfg(models, tmp_path, f"data.prompts={data}"))
    assert str(e.value) == (
        f"{data} row 2: field 'prompt' message 0 has unknown role 'robot' "
        f"(known: system, user, assistant, tool)"
    )
    rows[2] = {**ROWS[1], "prompt": [{"role": "system", "content": "x"}]}
    data = _parquet(tmp_path / "q.parquet", rows)
    with pytest.raises(ConfigError, match=r"q\.parquet row 2: field 'prompt' .*no user turn"):
        resolve_inputs(_cfg(models, tmp_path, f"data.prompts={data}"))


def test_prompt_too_long_after_templating_named(models, tmp_path):
    words = " ".join(["red"] * 11)
    rows = [ROWS[1], {**ROWS[1], "prompt": [{"role": "user", "content": words}]}]
    data = _parquet(tmp_path / "p.parquet", rows)
    # 11 words fit 12 tokens as a plain string; with the template's two markers they do not
    cfg = _cfg(models, tmp_path, f"data.prompts={data}", "rollout.max_prompt_tokens=12")
    with pytest.raises(ConfigError) as e:
        resolve_inputs(cfg)
    assert str(e.value).startswith(f"{data} row 1: field 'prompt': prompt is 13 tokens after")
    assert "rollout.max_prompt_tokens=12" in str(e.value)


def test_reward_model_scores_the_conversation_in_its_own_template(models):
    """Policy and reward model disagree on the template: the scorer renders with the reward
    model's, exactly as scoring that text directly gives, and not the policy's text."""
    policy_tok = load_tokenizer(models["policy"])
    prompts = [chat.prompt_text(policy_tok, CONV, True, True)] * 2
    responses = ["red cat", "blue dog sees"]
    scorer = RewardScorer(model_path=models["reward"])
    got = scorer.score(prompts, responses, None, [CONV, CONV])["scores"]

    rm_tok = load_tokenizer(models["reward"], padding_side="right")
    rm = load_reward_model(models["reward"]).eval()
    texts = [
        "### SYSTEM : be brief ### USER : describe : red cat ### ASSISTANT : " + r + " "
        for r in responses
    ]
    assert texts[0] == rm_tok.apply_chat_template(
        CONV + [{"role": "assistant", "content": responses[0]}], tokenize=False
    )
    with torch.no_grad():
        want = torch.cat(
            [
                rm(**rm_tok(t, return_tensors="pt", add_special_tokens=False)).logits[:, 0]
                for t in texts
            ]
        )
        policy_text = rm(**rm_tok(f"{prompts[0]} {responses[0]}", return_tensors="pt")).logits
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got[0], policy_text[0, 0])
    # without messages (plain prompts) the scorer reads prompt and response as before
    plain = scorer.score(prompts, responses)["scores"]
    torch.testing.assert_close(plain[0], policy_text[0, 0])


def test_sft_trains_on_assistant_turns_only(models):
    tok = load_tokenizer(models["policy"])
    conv = CONV + [
        {"role": "assistant", "content": "red cat"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "blue dog"},
    ]
    ids, labels = chat.sft_tokens(tok, conv, None, template=True, chat=True)
    assert (
        ids
        == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    trained = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != -100]
    assert trained == ["red", "cat", "[EOS]", "blue", "dog", "[EOS]"]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    # plainly rendered: the same turns, each ended by EOS
    ids, labels = chat.sft_tokens(tok, conv, None, template=False, chat=True)
    trained = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != -100]
    assert trained == ["red", "cat", "[EOS]", "blue", "dog", "[EOS]"]
    # strings outside chat: exactly the tokenisation SFT always used
    ids, labels = chat.sft_tokens(tok, "describe : sun", "red", template=False, chat=False)
    p = tok("describe : sun")["input_ids"]
    assert ids == p + tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[: len(p)] == [-100] * len(p)


def test_rm_pairs_as_messages_read_with_the_reward_template(models):
    tok = load_tokenizer(models["reward"])
    text, special = chat.reward_input(tok, CONV, "red cat", "auto")
    assert text == "### SYSTEM : be brief ### USER : describe : red cat ### ASSISTANT : red cat "
    assert not special
    assert chat.reward_input(tok, "describe : sun", "red", "auto") == ("describe : sun red", True)
    assert REWARD_TEMPLATE == tok.chat_template


def test_supervised_inputs_read_chat_datasets_and_refuse_unrenderable_rows(models, tmp_path):
    conv = CONV + [{"role": "assistant", "content": "red cat"}]
    sft = tmp_path / "sft"
    datasets.Dataset.from_list([{"messages": conv}] * 8).save_to_disk(str(sft))
    pairs = _parquet(
        tmp_path / "pairs.parquet",
        [{"chosen": conv, "rejected": conv[:2] + [{"role": "assistant", "content": "dog"}]}] * 8,
    )
    cfg = _cfg(
        models,
        tmp_path,
        f"sft.init={models['policy']}",
        f"sft.data={sft}",
        f"rm.init={models['reward']}",
        f"rm.data={pairs}",
        "sft.batch_size=4",
        "rm.batch_size=4",
    )
    s = supervised_inputs(cfg, tmp_path, "sft")
    assert len(s.records) == 8 and s.records[0]["messages"] == conv
    r = supervised_inputs(cfg, tmp_path, "rm")
    assert r.records[0]["prompt"] == CONV
    assert r.records[0]["chosen"] == [{"role": "assistant", "content": "red cat"}]
    # a template that cannot render a row is named with the row
    bad = tmp_path / "bad"
    rows = [{"messages": conv}] * 7 + [{"messages": CONV + [{"role": "user", "content": "x"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(bad))
    with pytest.raises(ConfigError) as e:
        supervised_inputs(load_config(None, [*_args(cfg), f"sft.data={bad}"]), tmp_path, "sft")
    assert f"{bad} row 7" in str(e.value) and "no assistant turn" in str(e.value)


def _args(cfg) -> list[str]:
    return [
        f"model.assets_dir={cfg.model.assets_dir}",
        f"sft.init={cfg.sft.init}",
        "sft.batch_size=4",
    ]


def test_chat_template_setting_is_typed():
    assert load_config(None, ["data.chat_template=true"]).data.chat_template is True
    assert load_config(None, ["data.chat_template=false"]).data.chat_template is False
    assert load_config(None, []).data.chat_template == "auto"
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_config(None, ["data.chat_template=sometimes"])


def test_eval_prompts_read_like_the_training_prompts(models, tmp_path):
    data = _parquet(tmp_path / "p.parquet", ROWS)
    plain = _parquet(tmp_path / "e.parquet", [{"prompt": "describe : sun"}])
    cfg = _cfg(
        models,
        tmp_path,
        f"data.prompts={data}",
        f"eval.prompts={plain}",
        "eval.gold=rlhf_dist.tasks.tiny:reward",
    )
    with pytest.raises(ConfigError, match="eval.prompts: its prompts are not rendered with"):
        resolve_inputs(cfg)
    cfg = _cfg(
        models,
        tmp_path,
        f"data.prompts={data}",
        f"eval.prompts={data}",
        "eval.gold=rlhf_dist.tasks.tiny:reward",
        "eval.num_prompts=1",
    )
    inputs = resolve_inputs(cfg)
    assert list(inputs.eval_prompts) == [inputs.prompts[0]]
    assert list(inputs.eval_prompt_messages) == [CONV]
    assert list(inputs.eval_prompt_fields["id"]) == ["a"]
