"""Role classes run in-process (no Ray) with the tiny locally built models."""

import errno
import math
import socket

import pytest
import torch

from rlhf_dist import weight_sync
from rlhf_dist.config import load_config
from rlhf_dist.models import load_policy
from rlhf_dist.roles import Generator, Learner, ReferenceScorer, RewardScorer
from rlhf_dist.roles.common import in_threads
from rlhf_dist.tasks.tiny import WARM, build_policy, build_tokenizer
from rlhf_dist.weight_sync import host_store
from tests.helpers.sync_pairs import buckets_of, open_gloo, push, push_object_store, stand_in_sender

PROMPTS = ["describe : red cat", "describe : sun", "describe : blue owl tree", "describe : cup"]
# what only a learner with a critic (ppo.estimator=gae) reports
VALUE_METRICS = (
    "train/value_loss",
    "train/value_clipfrac",
    "train/critic_grad_norm",
    "train/critic_lr",
    "train/explained_variance",
    "train/returns_mean",
)


@pytest.fixture(scope="module")
def generator(tiny_policy):
    return Generator(tiny_policy, max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def batch(generator):
    return generator.generate(PROMPTS, [10, 11, 12, 13], samples_per_prompt=2, seed=3)


def test_generator_batch_layout(generator, batch):
    tok = generator.tokenizer
    B, P = len(batch), batch.prompt_len
    assert B == 8 and batch.prompt_ids == [10, 10, 11, 11, 12, 12, 13, 13]
    assert batch.sequences.shape == batch.attention_mask.shape
    assert batch.response_mask.shape == batch.behaviour_logprobs.shape == (B, batch.response_len)
    assert batch.versions.tolist() == [0] * B
    for i in range(B):
        resp = batch.sequences[i, P:]
        n = int(batch.response_mask[i].sum())
        eos = (resp == tok.eos_token_id).nonzero()
        if batch.truncated[i]:
            assert n == batch.response_len and len(eos) == 0
        else:  # the mask runs up to and including the first EOS; pad after it
            assert n == int(eos[0]) + 1
            assert (resp[n:] == tok.pad_token_id).all()
        assert batch.attention_mask[i, P:].sum() == n
        assert (batch.behaviour_logprobs[i, n:] == 0).all()
        assert (batch.behaviour_logprobs[i, :n] < 0).all()
        # decoded text is exactly the kept response tokens
        assert batch.responses[i] == tok.decode(resp[:n], skip_special_tokens=True)
    # left padding of prompts: the shortest prompt starts with pads
    assert (batch.attention_mask[:, :P].sum(-1) < P).any()


def test_generator_same_seed_same_samples(generator):
    a = generator.generate(PROMPTS, [0, 1, 2, 3], seed=7)
    b = generator.generate(PROMPTS, [0, 1, 2, 3], seed=7)
    c = generator.generate(PROMPTS, [0, 1, 2, 3], seed=8)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_behaviour_logprobs_match_a_fresh_forward(tiny_policy, batch):
    """The generator's log-probs (from generate's logits) equal a reference forward pass with
    the same weights: left padding and position ids are handled identically."""
    ref = ReferenceScorer(tiny_policy)
    out = ref.ref_logprobs(batch)["ref_logprobs"]
    torch.testing.assert_close(out, batch.behaviour_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_behaviour_logprobs_equal_those_of_generates_own_logits(tiny_policy, temperature, top_k):
    """Taken step by step from each forward's logits (one vocabulary row held at a time), the
    behaviour log-probs are bit for bit those of generate's ``output_logits`` (every step's row
    kept), sequences that stop early included; and nothing is collected outside generate."""
    from rlhf_dist.algo import logprobs_from_logits

    gen = Generator(tiny_policy, max_new_tokens=12, temperature=temperature, top_k=top_k)
    prompts = PROMPTS * 3
    # one more stop token: the 4th one row 0 samples, so that rows stop early (as a chat
    # model's end-of-turn token would stop them)
    first = gen.generate(prompts, list(range(len(prompts))), seed=11)
    gen.stop_ids = [*gen.stop_ids, int(first.sequences[0, first.prompt_len + 3])]
    gen.gen_kwargs["eos_token_id"] = gen.stop_ids
    b = gen.generate(prompts, list(range(len(prompts))), seed=11)
    assert b.truncated.any() and not b.truncated.all()  # some stopped early, some ran out
    torch.manual_seed(11)  # generate() seeds so; the same samples again, with every row kept
    enc = gen.tokenizer(prompts, return_tensors="pt", padding=True)
    out = gen.model.generate(**enc, **gen.gen_kwargs, output_logits=True)
    kept = b.response_mask.long()
    response = out.sequences[:, b.prompt_len :]
    assert torch.equal(response * kept, b.sequences[:, b.prompt_len :] * kept)
    logits = torch.stack(out.logits, dim=1).float() / temperature
    want = logprobs_from_logits(logits, response) * b.response_mask
    assert torch.equal(b.behaviour_logprobs, want)
    # a forward outside generate (the reference from the base, a check) collects nothing
    gen.model(input_ids=b.sequences)
    assert gen.sampled.prev is None and gen.sampled.steps == []


def test_temperature_applies_to_behaviour_logprobs(tiny_policy):
    hot = Generator(tiny_policy, max_new_tokens=6, temperature=2.0)
    b = hot.generate(PROMPTS, [0, 1, 2, 3], seed=1)
    ref2 = ReferenceScorer(tiny_policy, temperature=2.0).ref_logprobs(b)["ref_logprobs"]
    ref1 = ReferenceScorer(tiny_policy, temperature=1.0).ref_logprobs(b)["ref_logprobs"]
    torch.testing.assert_close(ref2, b.behaviour_logprobs, atol=1e-5, rtol=0)
    assert not torch.allclose(ref1, b.behaviour_logprobs, atol=1e-3)


def test_reward_function_scorer(batch):
    scorer = RewardScorer(function="rlhf_dist.tasks.tiny:reward")
    scores = scorer.score(batch.prompts, batch.responses)["scores"]
    for s, r in zip(scores.tolist(), batch.responses):
        words = r.split()
        assert s == pytest.approx(sum(w in WARM for w in words) / len(words) if words else 0.0)


def test_reward_model_scorer(tmp_path, tiny_assets):
    """An AutoModelForSequenceClassification with one label, saved and loaded from disk."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_assets / "policy")
    cfg = GPT2Config.from_pretrained(tiny_assets / "policy", num_labels=1)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(model_path=str(tmp_path / "rm"), batch_size=2)
    prompts, responses = ["describe : red", "describe : sun cat"], ["cat dog", "blue"]
    scores = scorer.score(prompts, responses)["scores"]
    assert scores.shape == (2,)
    # same as scoring each text alone (padding must not change a score)
    for i in range(2):
        enc = tok(prompts[i] + " " + responses[i], return_tensors="pt")
        with torch.no_grad():
            expected = model(**enc).logits[0, 0]
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_reward_function_that_raises_names_function_and_shape(tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "def boom(prompts, responses):\n    raise KeyError('oops')\n"
        "def picky(prompts, responses):\n"
        "    return [1.0 / (r != 'bad') for r in responses]\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="bad_reward:boom.*oops.* on sample 0: prompt='p'"):
        RewardScorer(function="bad_reward:boom").score(["p"], ["r"])
    with pytest.raises(RuntimeError, match="returned 1 scores for 2 responses"):
        RewardScorer(function="bad_reward:short").score(["p", "q"], ["r", "s"])
    with pytest.raises(RuntimeError, match="on sample 1: prompt='q', response='bad'"):
        RewardScorer(function="bad_reward:picky").score(["p", "q"], ["ok", "bad"])
    # non-finite scores pass through: the learner skips such a step and the driver counts it
    assert RewardScorer(function="bad_reward:nan").score(["p"], ["r"])["scores"].isnan().all()


def _learner_cfg():
    return load_config(
        None,
        [
            "learner.num_workers=1",
            "learner.lr=1e-3",
            "rollout.num_workers=1",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
        ],
    )


@pytest.fixture(scope="module")
def learner(tiny_policy):
    learner = Learner(_learner_cfg(), rank=0, world_size=1)
    info = learner.setup(tiny_policy, tiny_policy, "127.0.0.1", learner.host_rendezvous())
    assert info["policy_params"] > 0
    return learner


def _taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            return True
        return False


def test_ports_are_bound_before_they_are_handed_over(learner):
    """The port a store's host hands to the other members is bound already (the OS picked it
    at port 0), so no other process can take it between choosing and binding it; the
    learner hosts one weight-sync store for all its groups."""
    port = learner.open_weight_sync("gloo", 4096)["port"]
    assert _taken(port) and learner.open_weight_sync("gloo", 4096)["port"] == port
    assert _taken(Learner(_learner_cfg(), rank=0, world_size=1).host_rendezvous())
    store = host_store(10)
    assert _taken(store.port) and store.port != port


def test_learner_update_and_weight_sync(learner, generator, batch, tiny_policy):
    batch.scores = RewardScorer(function="rlhf_dist.tasks.tiny:reward").score(
        batch.prompts, batch.responses
    )["scores"]
    batch.ref_logprobs = ReferenceScorer(tiny_policy).ref_logprobs(batch)["ref_logprobs"]
    before = learner.policy_checksum()
    assert before == weight_sync.model_checksum(load_policy(tiny_policy))

    metrics = learner.ppo_update(batch, kl_coef=0.05, seed=0).metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["train/optimizer_steps"] == 2  # 8 samples / minibatch 4
    assert set(VALUE_METRICS) <= metrics.keys() and "train/kl_loss" not in metrics
    # first epoch, first minibatch: the policy still equals the one that sampled
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-5)
    after = learner.policy_checksum()
    assert after != before

    # tied weights travel once: lm_head.weight is the embedding
    names = [s.name for s in learner.setup_info()["sync_manifest"]]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names

    open_gloo(learner, generator)
    sent, got = push(learner, generator, version=1)
    assert sent.checksum == got.checksum == after and sent.version == got.version == 1
    # the generator's own parameters, hashed here: its report is not what is trusted
    assert weight_sync.model_checksum(generator.model) == after
    assert generator.status() == {"version": 1, "checksum": after}

    # The generator now samples exactly what a plain model holding the learner's weights does.
    plain = Generator(tiny_policy, max_new_tokens=8)
    plain.model.load_state_dict(learner.policy_state(), strict=False)
    plain.model.tie_weights()
    ours = generator.generate(PROMPTS, [0, 1, 2, 3], seed=11)
    theirs = plain.generate(PROMPTS, [0, 1, 2, 3], seed=11)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.versions.tolist() == [1] * 4


def test_decoupled_ppo_weights_stale_samples_only(learner, batch, tiny_policy):
    """Async mode: tokens of samples older than the learner are weighted by
    pi_proximal / pi_behaviour truncated at is_cap; samples of its own version weigh exactly 1."""
    scored = batch.select(list(range(len(batch))))
    scored.scores = torch.linspace(0, 1, len(scored))
    scored.ref_logprobs = ReferenceScorer(tiny_policy).ref_logprobs(scored)["ref_logprobs"]
    learner.version = 3

    fresh = scored.select(list(range(len(scored))))
    fresh.versions = torch.full((len(fresh),), 3)
    m = learner.ppo_update(fresh, kl_coef=0.05, seed=0, is_cap=2.0).metrics
    assert m["train/stale_token_frac"] == 0.0 and m["train/is_weight_mean"] == 1.0

    stale = scored.select(list(range(len(scored))))
    stale.versions = torch.full((len(stale),), 2)
    # the behaviour policy found these tokens 5 nats less likely: weights e^5 > cap
    stale.behaviour_logprobs = (stale.behaviour_logprobs - 5.0) * stale.response_mask
    m = learner.ppo_update(stale, kl_coef=0.05, seed=0, is_cap=2.0).metrics
    assert m["train/stale_token_frac"] == 1.0
    assert m["train/is_truncated_frac"] > 0.9 and m["train/is_weight_mean"] <= 2.0
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())


def _send(sender, model, bucket_bytes, version=1):
    receipt, _ = sender.send(buckets_of(model, bucket_bytes), version, True, False)
    return receipt.checksum


def _perturb(model, delta):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(delta)


def test_generator_receives_in_place_into_persistent_buffers(tiny_policy):
    """After a receive every parameter lives in a bucket buffer; the next sync reuses them
    (no allocation) and the tied embedding stays one tensor that holds the new weights."""
    sender = load_policy(tiny_policy).eval()
    gen = Generator(tiny_policy, max_new_tokens=4)
    manifest, bucket_bytes = weight_sync.manifest_of(sender), 4096
    group = stand_in_sender(gen, manifest, bucket_bytes)
    first = None
    for version, delta in [(1, 0.5), (2, -0.25)]:
        _perturb(sender, delta)
        sent, got = in_threads(
            lambda v=version: _send(group, sender, bucket_bytes, v),
            lambda v=version: gen.receive_weights(v, verify=True),
        )
        assert sent == got.checksum == weight_sync.model_checksum(sender)

        spans = [
            (b.data_ptr(), b.data_ptr() + b.numel())
            for b in gen.weights.buffers(manifest, bucket_bytes)
        ]
        ptrs = [p.data_ptr() for p in gen.model.parameters()]
        assert all(any(lo <= x < hi for lo, hi in spans) for x in ptrs)
        if first is None:
            first = spans, ptrs
        assert (spans, ptrs) == first

        model = gen.model
        assert model.lm_head.weight is model.transformer.wte.weight
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, sender(ids).logits)


@pytest.mark.parametrize("dtypes", ["bfloat16", "mixed"])
def test_weight_sync_round_trips_bf16_and_mixed_dtypes_exactly(tmp_path, dtypes):
    """With n_embd=33 a block's MLP output projection holds 132 * 33 + 33 numbers: in bf16 or
    fp16 it ends 2 bytes off a 4-byte boundary, so the fp32 tensor after it would be
    misaligned if packed back to back. Every parameter must still arrive bit for bit."""
    build_policy(tmp_path, build_tokenizer(tmp_path), n_embd=33, n_head=3)

    def load():
        model = load_policy(str(tmp_path), "bfloat16" if dtypes == "bfloat16" else "float32")
        if dtypes == "mixed":
            model.transformer.h[0].mlp.c_proj.to(torch.bfloat16)
            model.transformer.h[1].mlp.c_proj.to(torch.float16)
        return model

    sender, receiver = load(), load()
    _perturb(sender, 0.5)
    manifest = weight_sync.manifest_of(sender)
    assert len({s.dtype for s in manifest}) == (3 if dtypes == "mixed" else 1)
    out = weight_sync.CollectiveSender("gloo", 60)
    port = out.open([], manifest, 4096)["port"]
    inbox = weight_sync.CollectiveReceiver("gloo")
    channel = weight_sync.Channel("gloo", 4096, manifest, {"port": port})
    member = [weight_sync.Membership("127.0.0.1", port, r, 2, "t", 60) for r in (0, 1)]
    in_threads(
        lambda: out.open([], manifest, 4096, member[0]),
        lambda: inbox.open(channel, member[1]),
    )
    target = weight_sync.ModuleWeights(receiver)
    sent, got = in_threads(
        lambda: _send(out, sender, 4096),
        lambda: inbox.receive(target, 1, True),
    )
    assert sent == got.checksum == weight_sync.model_checksum(receiver)
    assert sent == weight_sync.model_checksum(sender)
    for (name, a), b in zip(sender.named_parameters(), receiver.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_object_store_sync_checksums_agree(learner, tiny_policy):
    """The object-store path packs the same aligned layout: the learner's checksum of its
    buckets equals the generator's checksum of its model after loading them."""
    gen = Generator(tiny_policy, max_new_tokens=4)
    _perturb(gen.model, 1.0)
    sent, got = push_object_store(learner, gen, version=3)
    assert sent.checksum == got.checksum == learner.policy_checksum() and got.version == 3
    # what the generator reports is what its own parameters hold, hashed here, not trusted
    assert weight_sync.model_checksum(gen.model) == got.checksum
    assert gen.model.lm_head.weight is gen.model.transformer.wte.weight


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_load_weights_only_and_refuse_arbitrary_objects(learner, tmp_path):
    from rlhf_dist.roles.deepspeed_rank import safe_load

    learner.save_checkpoint(str(tmp_path / "ckpt"))
    files = sorted((tmp_path / "ckpt").rglob("*.pt"))
    assert {f.parent.parent.name for f in files} == {"policy", "critic"}
    for f in files:
        state = safe_load(str(f))  # torch.load(weights_only=True) + DeepSpeed's plain types
        assert isinstance(state, dict)
    before = learner.policy_checksum()
    learner.load_checkpoint(str(tmp_path / "ckpt"), version=7)
    assert learner.policy_checksum() == before and learner.version == 7

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(Exception, match="Weights only load failed"):
        safe_load(str(evil))


# ----------------------------------------------------------------------------- critic-free


@pytest.fixture(scope="module")
def grpo_learner(tiny_policy):
    cfg = load_config(
        None,
        [
            "learner.num_workers=1",
            "learner.lr=1e-3",
            "rollout.num_workers=1",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
            "ppo.estimator=grpo",
            "ppo.kl_coef=0",
            "ppo.kl_loss_coef=0.01",
        ],
    )
    learner = Learner(cfg, rank=0, world_size=1)
    learner.setup(tiny_policy, "/no/critic/is/loaded", "127.0.0.1", learner.host_rendezvous())
    return learner


def _scored(batch, tiny_policy, scores):
    out = batch.select(list(range(len(batch))))
    out.scores = torch.tensor(scores)
    out.ref_logprobs = ReferenceScorer(tiny_policy).ref_logprobs(out)["ref_logprobs"]
    return out


def test_critic_free_learner_builds_no_critic(grpo_learner, learner):
    assert grpo_learner.critic is None and list(grpo_learner.engines()) == ["policy"]
    assert list(learner.engines()) == ["policy", "critic"]
    n_policy = sum(p.numel() for p in grpo_learner.policy.module.parameters())
    assert grpo_learner.setup_info()["policy_params"] == n_policy


def test_grpo_update_uses_group_advantages_and_reports_no_value_metrics(
    grpo_learner, batch, tiny_policy
):
    # groups (samples 2k, 2k + 1): scores (0, 1), (1, 0), (0.5, 0.5), (0, 3)
    scored = _scored(batch, tiny_policy, [0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 3.0])
    before = grpo_learner.policy_checksum()
    m = grpo_learner.ppo_update(scored, kl_coef=0.0, seed=0).metrics
    assert grpo_learner.policy_checksum() != before
    assert not set(VALUE_METRICS) & m.keys()
    assert all(math.isfinite(v) for v in m.values())
    assert m["train/optimizer_steps"] == 2 and m["train/kl_loss"] >= 0
    # GRPO by hand: a group (a, b) has mean (a + b) / 2 and Bessel std |a - b| / sqrt(2); each
    # sample's advantage (r - mean) / (std + 1e-6) is broadcast over its response's tokens
    # (kl_coef = 0, no whitening); the metrics are their token mean and std (with responses of
    # equal length: 0 and 0.61; Dr. GRPO's, without the division, would have a std of 0.83).
    per_sample = []
    for a, b in [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.0, 3.0)]:
        std = abs(a - b) / math.sqrt(2)
        mean = (a + b) / 2
        per_sample += [(a - mean) / (std + 1e-6), (b - mean) / (std + 1e-6)]
    lengths = scored.response_mask.sum(-1).tolist()
    n = sum(lengths)
    mean = sum(x * k for x, k in zip(per_sample, lengths)) / n
    std = math.sqrt(sum(x * x * k for x, k in zip(per_sample, lengths)) / n - mean**2)
    assert m["train/advantages_mean"] == pytest.approx(mean, abs=1e-6)
    assert m["train/advantages_std"] == pytest.approx(std, rel=1e-5)


@pytest.mark.parametrize(
    ("estimator", "learns"),
    [("grpo", False), ("rloo", False), ("reinforce_pp_baseline", False), ("reinforce_pp", True)],
)
def test_groups_that_all_scored_alike_teach_nothing(
    grpo_learner, batch, tiny_policy, estimator, learns
):
    """Every prompt's samples scored the same (but prompts differ): a group baseline leaves no
    advantage at all, so the policy gradient is exactly 0 (Adam's momentum from earlier updates
    may still move the weights): the differences between prompts are no signal. REINFORCE++
    without a group baseline does learn from them."""
    scored = _scored(batch, tiny_policy, [1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 5.0, 5.0])
    ppo = grpo_learner.cfg.ppo
    saved = ppo.estimator, ppo.kl_loss_coef
    ppo.estimator, ppo.kl_loss_coef = estimator, 0.0  # the KL loss would pull towards the ref
    try:
        m = grpo_learner.ppo_update(scored, kl_coef=0.0, seed=0).metrics
    finally:
        ppo.estimator, ppo.kl_loss_coef = saved
    assert (m["train/grad_norm"] > 0) == learns
    assert (m["train/advantages_std"] > 0) == learns
    if not learns:
        assert m["train/policy_loss"] == 0.0


def test_every_critic_free_estimator_and_loss_option_trains(grpo_learner, batch, tiny_policy):
    """The options are read at each update, so one critic-free learner runs them all."""
    scored = _scored(batch, tiny_policy, [0.0, 1.0, 1.0, 0.0, 0.2, 0.7, 0.0, 2.0])
    ppo = grpo_learner.cfg.ppo
    saved = (ppo.estimator, ppo.loss_agg, ppo.ratio_level)
    try:
        for estimator, loss_agg, ratio_level in [
            ("dr_grpo", "seq_mean_token_sum", "token"),
            ("rloo", "seq_mean_token_mean", "token"),
            ("grpo", "seq_mean_token_mean", "sequence"),
            ("reinforce_pp_baseline", "token_mean", "token"),
            ("reinforce_pp", "token_mean", "token"),
        ]:
            ppo.estimator, ppo.loss_agg, ppo.ratio_level = estimator, loss_agg, ratio_level
            before = grpo_learner.policy_checksum()
            m = grpo_learner.ppo_update(scored, kl_coef=0.0, seed=1).metrics
            assert grpo_learner.policy_checksum() != before, estimator
            assert all(math.isfinite(v) for v in m.values()), estimator
            whitened = estimator.startswith("reinforce_pp")
            assert ("train/returns_mean" in m) == whitened, estimator
            assert not set(VALUE_METRICS) - {"train/returns_mean"} & m.keys()
        # reinforce_pp with kl_coef = 0: the return is the score on every token, and the
        # metrics report it before whitening
        lengths = scored.response_mask.sum(-1)
        expected = float((scored.scores * lengths).sum() / lengths.sum())
        assert m["train/returns_mean"] == pytest.approx(expected, rel=1e-6)
        assert m["train/advantages_mean"] == pytest.approx(expected, rel=1e-6)
    finally:
        ppo.estimator, ppo.loss_agg, ppo.ratio_level = saved


def test_critic_free_checkpoint_holds_no_critic_and_round_trips(
    grpo_learner, learner, batch, tiny_policy, tmp_path
):
    from rlhf_dist import checkpoint

    tmp = checkpoint.begin(tmp_path, 3)
    grpo_learner.save_checkpoint(str(tmp))
    assert sorted(p.name for p in tmp.iterdir()) == ["policy"]
    ckpt = checkpoint.commit(tmp, {"step": 3, "version": 3, "cursor": {}, "kl_controller": {}}, 2)
    assert checkpoint.read_state(ckpt)["engines"] == ["policy"]
    saved = grpo_learner.policy_checksum()

    scored = _scored(batch, tiny_policy, [0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 2.0])
    grpo_learner.ppo_update(scored, kl_coef=0.0, seed=2)
    assert grpo_learner.policy_checksum() != saved
    grpo_learner.load_checkpoint(str(ckpt), version=3)
    assert grpo_learner.policy_checksum() == saved and grpo_learner.version == 3
    # a learner with a critic cannot be restored from it, and says why
    with pytest.raises(RuntimeError, match="holds no critic/"):
        learner.load_checkpoint(str(ckpt), version=3)


def test_generator_stops_at_every_eos_of_the_generation_config(tmp_path, tiny_policy, batch):
    """A chat model ends its turn with a template token its generation config lists as an EOS
    (Qwen's <|im_end|>) besides the tokenizer's EOS: responses stop at either."""
    from transformers import AutoModelForCausalLM

    tok = Generator(tiny_policy).tokenizer
    # a frequent response token of the plain generator becomes the model's end-of-turn token
    P = batch.prompt_len
    kept = batch.sequences[:, P:][batch.response_mask.bool()]
    turn_end = int(
        max(set(kept.tolist()) - {tok.eos_token_id}, key=lambda t: (kept == t).sum().item())
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    chat = Generator(str(tmp_path / "chat"), max_new_tokens=8)
    assert chat.stop_ids == sorted({tok.eos_token_id, turn_end})
    out = chat.generate(PROMPTS, [10, 11, 12, 13], samples_per_prompt=2, seed=3)
    ended_at_turn_end = 0
    for i in range(len(out)):
        resp = out.sequences[i, P:].tolist()
        n = int(out.response_mask[i].sum())
        stops = [j for j, t in enumerate(resp) if t in chat.stop_ids]
        if out.truncated[i]:
            assert n == out.response_len and not stops[:n]
        else:  # the response runs up to and including the first stop token of either kind
            assert n == stops[0] + 1
            ended_at_turn_end += resp[stops[0]] == turn_end
    assert ended_at_turn_end > 0


def test_fp32_zero0_grad_norm_is_the_norm_deepspeed_clipped_with(batch, tiny_policy):
    """At fp32 ZeRO-0 the reported gradient norm is the one DeepSpeed's clipping computed (kept
    by ``make_engine``, not computed twice), and equals the norm taken from the gradients
    themselves when no clipping runs (``learner.max_grad_norm=0``). One optimizer step from
    the same weights and batch, so the two see the same gradients."""
    scored = _scored(batch, tiny_policy, [0.0, 1.0, 1.0, 0.0, 0.5, 0.2, 0.0, 3.0])
    norms = {}
    for max_norm in (0.5, 0.0):
        cfg = load_config(
            None,
            [
                "learner.num_workers=1",
                "rollout.num_workers=1",
                "rollout.prompts_per_step=4",
                "rollout.samples_per_prompt=2",
                "ppo.minibatch_size=8",
                "ppo.micro_batch_size=2",
                "ppo.estimator=grpo",
                "ppo.kl_coef=0",
                f"learner.max_grad_norm={max_norm}",
            ],
        )
        learner = Learner(cfg, rank=0, world_size=1)
        learner.setup(tiny_policy, "/no/critic", "127.0.0.1", learner.host_rendezvous())
        m = learner.ppo_update(scored, kl_coef=0.0, seed=0).metrics
        assert m["train/optimizer_steps"] == 1
        if max_norm:
            assert learner.policy.clip_norm == m["train/grad_norm"]  # what DeepSpeed clipped with
        norms[max_norm] = m["train/grad_norm"]
    assert norms[0.5] > 0.5  # so the clipping did act
    assert norms[0.5] == pytest.approx(norms[0.0], rel=1e-5)


def test_the_learner_steps_with_torch_fused_adamw(learner):
    """Where torch has the fused AdamW kernel for the device (CPU since torch 2.4), the
    engines use it: one pass over each parameter's memory per step instead of one per
    operation. The update it computes equals the unfused one's (pinned runs, stage tests)."""
    from rlhf_dist.roles.deepspeed_rank import deepspeed_config, fused_adam_ok

    assert fused_adam_ok(torch.device("cpu"))  # torch >= 2.4 is what pyproject installs
    for engine in learner.engines().values():
        assert isinstance(engine.optimizer, torch.optim.AdamW)
        assert engine.optimizer.defaults["fused"] is True
    cfg = learner.cfg
    assert "fused" not in deepspeed_config(cfg, 1e-3, 2, 1, 1)["optimizer"]["params"]


SKEWED = [1.0, 0.0, 0.2, 0.3, 5.0, -1.0, 0.0, 0.4]


@pytest.mark.parametrize(
    "estimator, ddof", [("gae", 1), ("reinforce_pp", 0), ("reinforce_pp_baseline", 0)]
)
def test_whitening_divides_the_variance_as_the_estimators_source(
    learner, grpo_learner, batch, tiny_policy, estimator, ddof
):
    """GAE's advantages are whitened with the unbiased variance (TRL's ``masked_whiten``),
    REINFORCE++'s with the population one (OpenRLHF divides by N): the estimator table's
    ``whiten_ddof``."""
    from rlhf_dist.algo import estimator as entry

    assert entry(estimator).whiten_ddof == ddof
    owner = learner if estimator == "gae" else grpo_learner
    saved = owner.cfg.ppo.estimator
    owner.cfg.ppo.estimator = estimator
    try:
        exp, bad = owner.prepare(_scored(batch, tiny_policy, SKEWED), kl_coef=0.0, is_cap=None)
    finally:
        owner.cfg.ppo.estimator = saved
    assert not bad
    adv = exp.advantages[exp.mask > 0].double()
    n = adv.numel()
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(((adv - adv.mean()) ** 2).sum() / (n - ddof)) == pytest.approx(1.0, rel=1e-5)


def test_grpo_std_eps_is_the_configured_one(grpo_learner, batch, tiny_policy):
    from rlhf_dist.algo import group_relative_scores

    scored = _scored(batch, tiny_policy, SKEWED)
    ppo = grpo_learner.cfg.ppo
    assert ppo.grpo_std_eps == 1e-6  # veRL's, the default
    ppo.grpo_std_eps = 10.0
    try:
        exp, _ = grpo_learner.prepare(scored, kl_coef=0.0, is_cap=None)
    finally:
        ppo.grpo_std_eps = 1e-6
    want = group_relative_scores(torch.tensor(SKEWED), 2, eps=10.0)
    got = exp.raw_advantages[:, 0]  # every token carries the sequence's advantage
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_learner_reports_what_it_trained_and_a_skipped_sample_shows(
    grpo_learner, batch, tiny_policy
):
    """``UpdateResult.trained`` is counted where the minibatch loop takes its rows. Planted:
    a loop that drops the first sample of every micro-batch (what the mutation check of #27
    planted, which no ledger test caught): the count shows it, and the driver's recorder
    refuses the step (``tests/driver/test_recorder.py``)."""
    scored = _scored(batch, tiny_policy, SKEWED)
    epochs = grpo_learner.cfg.ppo.epochs
    assert grpo_learner.ppo_update(scored, kl_coef=0.0, seed=0).trained == [epochs] * len(scored)
    original = grpo_learner._micro_step
    grpo_learner._micro_step = lambda exp, i: original(exp, i[1:])
    try:
        trained = grpo_learner.ppo_update(scored, kl_coef=0.0, seed=0).trained
    finally:
        del grpo_learner._micro_step
    assert sorted(trained) == [0] * 4 + [epochs] * 4  # micro-batches of 2: one of each skipped


def test_the_hf_engine_matches_the_trainer_and_rollout_correction_weighs_a_mismatch(
    grpo_learner, tiny_policy, tmp_path
):
    """The HF generator's behaviour log-probs are the trainer's own forward at the same
    weights: the mismatch metrics read ~0 and no correction clips or masks anything. A planted
    mismatch (the behaviour log-probs of half the samples lowered by 2 nats: rho = e^2 = 7.4)
    is clipped by TIS (cap 2) and masked by IcePop ([0.5, 5]), and changes the update."""
    from rlhf_dist import metric_keys as K

    gen = Generator(tiny_policy, max_new_tokens=8)  # holding the learner's weights now
    gen.model.load_state_dict(grpo_learner.policy_state(), strict=False)
    gen.model.tie_weights()
    fresh = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=5)
    scored = _scored(fresh, tiny_policy, SKEWED)
    grpo_learner.save_checkpoint(str(tmp_path / "start"))
    ppo = grpo_learner.cfg.ppo
    got = {}
    for mode, planted in (("tis", False), ("none", True), ("tis", True), ("icepop", True)):
        batch = scored.select(list(range(len(scored))))
        if planted:
            half = torch.arange(len(batch)) % 2 == 0
            lowered = 2.0 * half[:, None] * batch.response_mask
            batch.behaviour_logprobs = batch.behaviour_logprobs - lowered
        grpo_learner.load_checkpoint(str(tmp_path / "start"), version=0)  # the same weights
        ppo.rollout_correction = mode
        try:
            got[mode, planted] = grpo_learner.ppo_update(batch, kl_coef=0.0, seed=0).metrics
        finally:
            ppo.rollout_correction = "none"
    same = got["tis", False]
    assert same[K.LOGPROB_DIFF_MEAN] < 1e-4 and same[K.LOGPROB_DIFF_MAX] < 1e-3
    assert same[K.CORRECTED_FRAC] == 0.0
    assert abs(same[K.ENGINE_RATIO_MIN] - 1) < 1e-3 and abs(same[K.ENGINE_RATIO_MAX] - 1) < 1e-3
    share = float(
        (scored.response_mask * (torch.arange(len(scored)) % 2 == 0)[:, None]).sum()
        / scored.response_mask.sum()
    )
    assert got["none", True][K.LOGPROB_DIFF_MAX] == pytest.approx(2.0, abs=1e-3)
    assert got["none", True][K.CORRECTED_FRAC] == 0.0
    assert got["tis", True][K.CORRECTED_FRAC] == pytest.approx(share)  # e^2 > cap 2
    assert got["icepop", True][K.CORRECTED_FRAC] == pytest.approx(share)  # e^2 > 5
    assert got["tis", True][K.POLICY_LOSS] != got["none", True][K.POLICY_LOSS]
