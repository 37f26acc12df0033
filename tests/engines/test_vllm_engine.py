"""The vLLM engine (``rollout.engine=vllm``) in-process, on vLLM's CPU build: one engine per
architecture, shared by the tests of this module (an engine's memory is not given back).

GPT-2 (fused c_attn, Conv1D weights stored transposed) and Llama (q/k/v and gate/up fused into
one parameter each): weights pushed into the engine sample exactly as the HF generator does at
the same weights (greedy), the checksum read back from the engine catches a bucket that never
arrived and a load that did not land, samples are reproducible from the chunk's seed, the
engine's log-probs are the trainer's, multi-turn rollouts keep its tokens, LoRA adapters reach
it merged."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_dist.models import load_policy, response_logprobs
from rlhf_dist.roles import Generator
from rlhf_dist.tasks.tiny import build_assets, make_prompts
from rlhf_dist.weight_sync.layout import (
    manifest_of,
    model_checksum,
    pack,
    plan_buckets,
    sync_params,
)

if os.environ.get("RLHF_DIST_REQUIRE_VLLM"):  # `make test` installs vLLM: its tests must run
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vllm is not installed (`make vllm`)")

from rlhf_dist.roles.vllm_generator import VLLMGenerator, request_seed  # noqa: E402

PROMPTS = make_prompts(6, seed=3)
BUCKET = 1 << 14  # several buckets even for the tiny models
KV = 1 / 16  # GiB


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def policy(arch, tmp_path_factory):
    return str(build_assets(tmp_path_factory.mktemp(arch), arch=arch) / "policy")


@pytest.fixture(scope="module")
def engines(policy):
    """(the vLLM generator, the HF generator), both greedy (top-k 1)."""
    v = VLLMGenerator(policy, max_new_tokens=8, top_k=1, max_model_len=64, kv_cache_gb=KV)
    h = Generator(policy, max_new_tokens=8, top_k=1)
    return v, h


def _perturbed(policy: str, seed: int):
    """A learner's policy some updates later."""
    model = load_policy(policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * p.std().clamp_min(0.02))
    return model


def _push(target, model, lose_bucket: bool = False):
    """What a transport does: pack the learner's tensors into the target's buffers, then
    ``loaded``; ``lose_bucket``: the last bucket never arrives (its buffer left zero)."""
    manifest = manifest_of(model)
    buffers = target.buffers(manifest, BUCKET)
    params = [p for _, p in sync_params(model)]
    plan = plan_buckets(manifest, BUCKET)
    for bucket, flat in zip(plan, buffers):
        pack(bucket, params[bucket.start : bucket.stop], flat)
    if lose_bucket:
        buffers[-1].zero_()
    target.loaded(manifest, BUCKET)
    return manifest


def _responses(gen, seed=1):
    b = gen.generate(PROMPTS, list(range(len(PROMPTS))), 2, seed=seed)
    return [b.sequences[i, b.prompt_len :][b.response_mask[i] == 1].tolist() for i in range(len(b))]


def test_a_push_changes_the_engines_samples_as_it_changes_hf_generates(engines, policy):
    v, h = engines
    assert len(plan_buckets(manifest_of(h.model), BUCKET)) > 2
    before = _responses(v)
    assert before == _responses(h)
    for seed in (1, 2):
        learner = _perturbed(policy, seed)
        manifest = _push(v.weights, learner)
        _push(h.weights, learner)
        # read back from the engine's own (fused, padded, transposed) parameters
        assert v.weights.checksum(manifest) == model_checksum(learner)
        after = _responses(v)
        assert after == _responses(h)
        assert after != before
        before = after


def test_a_bucket_that_never_arrived_is_caught_by_the_engine_side_checksum(engines, policy):
    v, _ = engines
    learner = _perturbed(policy, 3)
    manifest = _push(v.weights, learner, lose_bucket=True)
    assert v.weights.checksum(manifest) != model_checksum(learner)
    # a load that did not land: the engine dropped one tensor of the version
    load = v.weights.engine.load_weights
    v.weights.engine.load_weights = lambda named: load(list(named)[:-1])
    try:
        manifest = _push(v.weights, _perturbed(policy, 4))
    finally:
        v.weights.engine.load_weights = load
    assert v.weights.checksum(manifest) != model_checksum(_perturbed(policy, 4))
    _push(v.weights, learner)
    assert v.weights.checksum(manifest) == model_checksum(learner)


def test_samples_come_from_the_chunks_seed_alone(policy, engines):
    v, _ = engines
    v.sampling.update(top_k=0)  # sample from the whole distribution
    try:
        a = v.generate(PROMPTS, list(range(6)), 3, seed=11)
        b = v.generate(PROMPTS, list(range(6)), 3, seed=11)
        c = v.generate(PROMPTS, list(range(6)), 3, seed=12)
    finally:
        v.sampling.update(top_k=1)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    # a prompt's samples are one request: they differ from one another
    group = [a.responses[i] for i in range(3)]
    assert len(set(group)) > 1
    # request seeds are spread: child i of one request never takes another request's seed
    seeds = [request_seed(11, 0, i) for i in range(1000)]
    assert min(abs(x - y) for x in seeds for y in seeds if x != y) > 3


def test_the_engines_log_probs_are_the_trainers(policy, engines):
    """Behaviour log-probs from the engine against the trainer's forward at the same weights
    (the quantity ``rollout/logprob_diff_*`` reports; fp32 both sides)."""
    v, h = engines
    learner = _perturbed(policy, 6)
    _push(v.weights, learner)
    _push(h.weights, learner)
    v.sampling.update(top_k=0)
    try:
        batch = v.generate(PROMPTS, list(range(6)), 2, seed=5)
    finally:
        v.sampling.update(top_k=1)
    model = h.model  # the HF generator holds the weights the engine holds
    with torch.no_grad():
        lp, _ = response_logprobs(
            model, batch.sequences, batch.attention_mask, batch.prompt_len, 1.0
        )
    diff = (lp - batch.behaviour_logprobs).abs() * batch.response_mask
    assert batch.response_mask.sum() > 20
    assert diff.max() < 1e-4, diff.max()


def test_stops_at_every_eos_and_flags_what_ran_out(policy, engines):
    v, _ = engines
    v.sampling.update(top_k=0)
    try:
        batch = v.generate(PROMPTS * 3, list(range(18)), 2, seed=9)
    finally:
        v.sampling.update(top_k=1)
    stops = torch.tensor(v.stop_ids)
    n = batch.response_mask.sum(-1).long()
    for i in range(len(batch)):
        resp = batch.sequences[i, batch.prompt_len :][: n[i]]
        ended = bool(torch.isin(resp[-1:], stops).all())
        assert ended == (not batch.truncated[i])  # stopped, or ran to max_new_tokens
        assert not torch.isin(resp[:-1], stops).any()  # nothing after the first stop
        if batch.truncated[i]:
            assert n[i] == v.max_new_tokens
    assert batch.truncated.any() and (~batch.truncated).any()


def test_a_multi_turn_rollout_trains_the_engines_tokens(tmp_path_factory):
    from rlhf_dist.envs.episodes import EpisodeSettings, Limits

    policy = str(build_assets(tmp_path_factory.mktemp("mt")) / "policy")
    settings = EpisodeSettings(
        "tests.envs.helpers_envs:Echo", Limits(max_turns=5, turn_tokens=6, total_tokens=60)
    )
    v = VLLMGenerator(policy, max_new_tokens=6, max_model_len=96, kv_cache_gb=KV, episodes=settings)
    calls = []
    inner = v.sample

    def sample(token_lists, max_new):
        out = inner(token_lists, max_new)
        calls.append(out)
        return out

    v.sample = sample
    rows = [{"prompt": "describe : red cat"}, {"prompt": "describe : sun"}]
    batch = v.rollout(rows, [0, 1], samples_per_prompt=2, seed=3)
    assert len(calls) == 3
    for b in range(4):
        trained = batch.sequences[b, batch.prompt_len :][batch.response_mask[b] == 1]
        assert trained.tolist() == [t for out in calls for t in out[b][0]]
        lps = batch.behaviour_logprobs[b][batch.response_mask[b] == 1]
        assert torch.allclose(lps, torch.tensor([x for out in calls for x in out[b][1]]))
    again = v.rollout(rows, [0, 1], samples_per_prompt=2, seed=3)
    assert torch.equal(again.sequences, batch.sequences)


def test_lora_adapters_reach_the_engine_merged(tmp_path_factory):
    """The learner sends the adapters; the engine holds base + B·A exactly (read back), and
    samples as the HF generator with the same adapters; ``reference.from_base`` still reads
    the base."""
    from rlhf_dist.lora import LoraSettings, wrap

    policy = str(build_assets(tmp_path_factory.mktemp("lora"), arch="llama") / "policy")
    lora = LoraSettings(rank=4, alpha=8)
    kw = dict(max_new_tokens=8, top_k=1, lora=lora, ref_from_base=True, seed=0)
    v = VLLMGenerator(policy, max_model_len=64, kv_cache_gb=KV, **kw)
    h = Generator(policy, **kw)
    before = _rows(v.generate(PROMPTS, list(range(6)), 1, seed=2))
    learner = wrap(load_policy(policy), lora, "causal", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in learner.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    manifest = _push(v.weights, learner)
    _push(h.weights, learner)
    assert manifest and all(".lora_" in s.name for s in manifest)  # adapters only on the wire
    assert v.weights.checksum(manifest) == model_checksum(learner)
    a = v.generate(PROMPTS, list(range(6)), 1, seed=2)
    b = h.generate(PROMPTS, list(range(6)), 1, seed=2)
    assert _rows(a) == _rows(b) != before
    assert torch.allclose(a.ref_logprobs, b.ref_logprobs, atol=1e-6)


def _rows(batch):
    return [
        batch.sequences[i, batch.prompt_len :][batch.response_mask[i] == 1].tolist()
        for i in range(len(batch))
    ]
