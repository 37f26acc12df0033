"""Multi-turn rollouts (``rlhf_dist.envs``) without Ray: token in, token out across turns with
a plain (GPT-2-style) and a chat-template tokenizer, the masks, and every guard."""

from __future__ import annotations

import pytest
import torch

from rlhf_dist.envs.episodes import EpisodeSettings, Limits
from rlhf_dist.roles import Generator
from tests.helpers.chat_models import POLICY_TEMPLATE, build_chat_policy

ROWS = [{"prompt": "describe : red cat"}, {"prompt": "describe : sun"}]


def _generator(policy, env, **limits):
    settings = EpisodeSettings(f"tests.envs.helpers_envs:{env}", Limits(**limits))
    return Generator(policy, max_new_tokens=6, episodes=settings)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    return build_chat_policy(tmp_path_factory.mktemp("chat_policy"), POLICY_TEMPLATE)


def _recording(gen):
    """Wrap the engine's turn: every sampled token list and its log-probs, as sampled."""
    calls = []
    inner = gen.sample

    def sample(token_lists, max_new):
        out = inner(token_lists, max_new)
        calls.append((token_lists, out))
        return out

    gen.sample = sample
    return calls


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_the_tokens_trained_are_the_tokens_sampled_across_turns(tiny_policy, chat_policy, which):
    policy = tiny_policy if which == "plain" else chat_policy
    gen = _generator(policy, "Echo", max_turns=5, turn_tokens=6, total_tokens=200)
    assert gen.delta.template == (which == "chat")
    calls = _recording(gen)
    batch = gen.rollout(ROWS, [0, 1], samples_per_prompt=2, seed=3)
    assert len(batch) == 4 and len(calls) == 3  # three turns, every trajectory each turn
    P = batch.prompt_len
    for b in range(4):
        sampled = [ids for _, outs in calls for ids, _, _ in [outs[b]]]
        logps = [lp for _, outs in calls for _, lp, _ in [outs[b]]]
        tokens = batch.sequences[b, P:][batch.attention_mask[b, P:] == 1]
        trained = batch.sequences[b, P:][batch.response_mask[b] == 1]
        # byte for byte: what trains is what was sampled, in order, and nothing else
        assert trained.tolist() == [t for ids in sampled for t in ids]
        got_lp = batch.behaviour_logprobs[b][batch.response_mask[b] == 1]
        assert torch.allclose(got_lp, torch.tensor([x for lp in logps for x in lp]))
        # each turn continued exactly the buffer before it: no re-rendered history
        for turn in range(1, len(calls)):
            before = calls[turn - 1][0][b] + calls[turn - 1][1][b][0]
            assert calls[turn][0][b][: len(before)] == before
        assert (
            calls[-1][0][b]
            == batch.sequences[b][batch.attention_mask[b] == 1].tolist()[: len(calls[-1][0][b])]
        )
        # the observation's tokens are there, in the context, not trained
        obs = tokens.numel() - trained.numel()
        assert obs > 0 and batch.episodes[b]["turns"] == 3 and batch.episodes[b]["ended"] == "done"
    assert batch.scores.tolist() == [3.0] * 4  # 1 a turn


def test_observations_render_as_the_template_renders_them(chat_policy):
    gen = _generator(chat_policy, "Echo")
    tok = gen.tokenizer
    ids = gen.delta.observation([{"role": "tool", "content": "red cat sun"}], stopped=True)
    assert tok.decode(ids).split() == ["<|tool|>", "red", "cat", "sun", "<|assistant|>"]
    # a turn cut at its cap is closed by the template's end of a turn (not sampled)
    cut = gen.delta.observation([{"role": "tool", "content": "sun"}], stopped=False)
    assert tok.decode(cut).split()[:2] == ["[EOS]", "<|tool|>"]


def test_a_step_that_hangs_ends_its_trajectory_not_the_rollout(tiny_policy):
    gen = _generator(tiny_policy, "Hangs", timeout_s=0.5)
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [e["ended"] for e in batch.episodes] == ["timeout", "timeout"]
    assert batch.scores.tolist() == [0.0, 0.0]  # failed: rewarded 0


def test_a_step_that_raises_ends_its_trajectory_masked_when_asked(tiny_policy):
    gen = _generator(tiny_policy, "Raises", on_failure="mask")
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [e["ended"] for e in batch.episodes] == ["error", "error"]
    assert batch.response_mask.sum() == 0  # left out of the loss
    assert batch.generated_tokens > 0  # but it was sampled, and counted


def test_a_policy_that_never_stops_calling_tools_is_stopped(tiny_policy):
    gen = _generator(tiny_policy, "CallsForever", max_turns=20, max_invalid=2)
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [(e["ended"], e["turns"]) for e in batch.episodes] == [("invalid_calls", 3)] * 2
    gen = _generator(tiny_policy, "CallsForever", max_turns=4, max_invalid=100)
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [(e["ended"], e["turns"]) for e in batch.episodes] == [("max_turns", 4)] * 2


def test_an_observation_longer_than_the_cap_is_cut_and_counted(tiny_policy):
    gen = _generator(tiny_policy, "Talkative", observation_tokens=5, total_tokens=400)
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [e["truncations"] for e in batch.episodes] == [1, 1]
    assert all(e["tokens"] < 100 for e in batch.episodes)  # not 500 words of it
    gen = _generator(tiny_policy, "Talkative", observation_tokens=1000, total_tokens=60)
    batch = gen.rollout(ROWS, [0, 1], seed=0)
    assert [e["ended"] for e in batch.episodes] == ["token_cap"] * 2  # the total cap holds


def test_the_same_seed_rolls_out_the_same_trajectories(tiny_policy):
    gen = _generator(tiny_policy, "Echo")
    a = gen.rollout(ROWS, [0, 1], samples_per_prompt=2, seed=7)
    b = gen.rollout(ROWS, [0, 1], samples_per_prompt=2, seed=7)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
