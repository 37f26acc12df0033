"""``rollout.tools``: plain Python functions as tools. The call format read, each way a call
goes wrong, errors for a function the model cannot be shown, and a rollout through a real
tokenizer and chat template that renders the tools (the policy's turns scripted: a tiny random
model never writes a tool call)."""

from __future__ import annotations

import json
import time

import pytest

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.envs.base import EnvError
from rlhf_dist.envs.episodes import EpisodeSettings, Limits, episode_settings
from rlhf_dist.envs.tools import parse_calls, tool_env
from rlhf_dist.roles import Generator

T = "tests.envs.helpers_tools"


def _call(name, **args) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_calls_are_read_in_the_hermes_format():
    text = "let me see " + _call("multiply", a=7, b=8) + " and " + _call("add", a=1, b=2)
    assert parse_calls(text) == [("multiply", {"a": 7, "b": 8}), ("add", {"a": 1, "b": 2})]
    assert parse_calls("the answer is 56") == []
    bad = parse_calls(
        "<tool_call>{not json</tool_call><tool_call>[1]</tool_call>"
        '<tool_call>{"name": "add", "arguments": 3}</tool_call>'
    )
    assert bad[0].startswith("not JSON") and bad[1] == 'no "name"' and "arguments" in bad[2]


def test_a_call_runs_its_tool_and_each_failure_is_an_error_message():
    env = tool_env(f"{T}:multiply,{T}:broken,{T}:slow", timeout_s=0.3)()
    assert env.reset({"prompt": "hi"}) == "hi"
    obs, reward, done, info = env.step(_call("multiply", a=7, b=8))
    assert obs == [{"role": "tool", "content": "56"}] and not done
    assert info == {"tool_calls": 1, "tool_errors": 0, "invalid": False}
    t0 = time.monotonic()
    obs, _, done, info = env.step(
        _call("broken", a=1)
        + _call("slow", a=1)
        + _call("nope")
        + _call("multiply", a=1)
        + "<tool_call>oops</tool_call>"
    )
    assert time.monotonic() - t0 < 5  # the hanging tool cost its time-out, not 30 s
    texts = [m["content"] for m in obs]
    assert "RuntimeError: the tool broke" in texts[0]
    assert "longer than 0.3 s" in texts[1]
    assert "unknown tool 'nope'" in texts[2]
    assert "TypeError" in texts[3]  # a missing argument: the tool's own error, reported
    assert "malformed" in texts[4]
    assert info == {"tool_calls": 5, "tool_errors": 5, "invalid": True} and not done
    # one good call among bad ones: errors counted, the turn not invalid
    _, _, _, info = env.step(_call("multiply", a=2, b=3) + _call("nope"))
    assert info["tool_errors"] == 1 and not info["invalid"]
    # no call: the final answer
    assert env.step("the answer is 56") == (None, 0.0, True, {})


@pytest.mark.parametrize(
    "spec, says",
    [
        (f"{T}:undocumented", "docstring"),
        ("no_such_module:f", "rollout.tools: cannot import module 'no_such_module'"),
        (f"{T}:nothing", "has no callable 'nothing'"),
        (f"{T}:add,{T}:add", "two tools share a name"),
        (" , ", "no function"),
    ],
)
def test_a_tool_the_model_cannot_be_shown_is_refused_by_name(spec, says):
    with pytest.raises(EnvError) as e:
        tool_env(spec)
    assert says in str(e.value)


def test_the_config_makes_the_generators_tool_environment():
    cfg = load_config(None, [f"rollout.tools={T}:multiply,{T}:add"])
    settings = episode_settings(cfg)
    assert settings.tools == f"{T}:multiply,{T}:add" and cfg.rollout.multi_turn
    env = settings.env_class()
    assert [f.__name__ for f in env.tools] == ["multiply", "add"]
    assert env.timeout_s == cfg.rollout.env_timeout_s
    assert episode_settings(load_config(None, [])) is None  # single-turn: nothing of this


def test_tools_and_an_environment_together_are_refused():
    with pytest.raises(ConfigError, match="rollout.tools: not with rollout.env"):
        load_config(
            None, ["rollout.env=builtin:calc", f"rollout.tools={T}:add", "reward.function=env"]
        )


TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_policy(tmp_path_factory):
    """A tiny GPT-2 with a byte-level BPE tokenizer (any text encodes) and a chat template
    that renders tools, as Qwen's and Hermes' do."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from rlhf_dist.tasks.tiny import build_policy

    out = tmp_path_factory.mktemp("tools_policy")
    special = ["<|end|>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
    bpe = ByteLevelBPETokenizer()
    corpus = [_call("multiply", a=7, b=8), "what is 7 times 8? the answer is 56", TOOLS_TEMPLATE]
    bpe.train_from_iterator(corpus * 20, vocab_size=400, special_tokens=special)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|end|>", bos_token="<|end|>", pad_token="<pad>"
    )
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(out)
    build_policy(out, tok, n_layer=1, n_embd=32, n_head=2, n_positions=1024)
    return str(out)


def _scripted(gen, turns: list[str]):
    """The policy's turns, as text: each call of the engine returns the next one."""
    eos = gen.tokenizer.eos_token_id
    said = []

    def sample(token_lists, max_new):
        text = turns[len(said)]
        said.append(text)
        ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        return [(list(ids), [-0.5] * len(ids), True) for _ in token_lists]

    gen.sample = sample
    return said


def test_a_rollout_with_tools_renders_them_runs_the_calls_and_trains_only_the_policy(
    tools_policy,
):
    limits = Limits(max_turns=4, turn_tokens=64, total_tokens=400)
    settings = EpisodeSettings("", limits, tools=f"{T}:multiply,{T}:add")
    gen = Generator(tools_policy, max_new_tokens=64, episodes=settings)
    assert gen.delta.template
    turns = [_call("multiply", a=7, b=8), "the answer is 56"]
    _scripted(gen, turns)
    rows = [{"prompt": [{"role": "user", "content": "what is 7 times 8?"}]}]
    prompt = gen.delta.prompt(rows[0]["prompt"])
    batch = gen.rollout(rows, [0], samples_per_prompt=2, seed=0)
    tok = gen.tokenizer
    shown = tok.decode(prompt)
    assert '"name": "multiply"' in shown and '"name": "add"' in shown  # the template's tools
    for b in range(2):
        full = tok.decode(batch.sequences[b][batch.attention_mask[b] == 1])
        assert full.startswith(shown)
        # the tool's answer is in the context as the template renders a tool message
        assert "<|tool|>\n56<|end|>\n<|assistant|>\n" in full
        trained = batch.sequences[b, batch.prompt_len :][batch.response_mask[b] == 1]
        assert tok.decode(trained) == turns[0] + "<|end|>" + turns[1] + "<|end|>"
        ep = batch.episodes[b]
        assert (ep["turns"], ep["tool_calls"], ep["tool_errors"], ep["ended"]) == (2, 1, 0, "done")


def test_without_a_template_the_tools_are_shown_as_their_json_schemas(tools_policy):
    settings = EpisodeSettings("", Limits(), chat_template=False, tools=f"{T}:multiply")
    gen = Generator(tools_policy, max_new_tokens=4, episodes=settings)
    assert not gen.delta.template
    plain = gen.tokenizer.decode(gen.delta.prompt([{"role": "user", "content": "hi there"}]))
    schema = plain[plain.index("{") : plain.index("\n", plain.index("{"))]
    assert json.loads(schema)["function"]["name"] == "multiply"
    assert plain.index("multiply") < plain.index("hi there")  # a system turn, first
