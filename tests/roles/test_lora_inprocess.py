"""LoRA roles in-process (no Ray): a learner that trains the adapters only, a generator that
receives them onto its frozen base, the reference from the base, and both exports."""

import pytest
import torch

from rlhf_dist import weight_sync
from rlhf_dist.config import load_config
from rlhf_dist.models import load_policy
from rlhf_dist.roles import Generator, Learner, ReferenceScorer, RewardScorer
from rlhf_dist.roles.deepspeed_rank import safe_load
from tests.helpers.sync_pairs import open_gloo, push

PROMPTS = ["describe : red cat", "describe : sun", "describe : blue owl tree", "describe : cup"]
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.critic_lora_rank=2"]


def _cfg(*extra):
    return load_config(
        None,
        [
            "learner.num_workers=1",
            "learner.lr=1e-2",
            "rollout.num_workers=1",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
            *LORA,
            *extra,
        ],
    )


def _generator(path, cfg, **kw):
    from rlhf_dist.lora import lora_settings

    return Generator(
        path, max_new_tokens=8, lora=lora_settings(cfg, "policy"), seed=cfg.run.seed, **kw
    )


@pytest.fixture(scope="module")
def learner(tiny_policy):
    learner = Learner(_cfg(), rank=0, world_size=1)
    learner.setup(tiny_policy, tiny_policy, "127.0.0.1", learner.host_rendezvous())
    return learner


@pytest.fixture(scope="module")
def trained(learner, tiny_policy):
    """The learner after one PPO update on a scored batch of its LoRA generator's samples."""
    gen = _generator(tiny_policy, learner.cfg)
    batch = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=3)
    batch.scores = RewardScorer(function="rlhf_dist.tasks.tiny:reward").score(
        batch.prompts, batch.responses
    )["scores"]
    batch.ref_logprobs = ReferenceScorer(tiny_policy).ref_logprobs(batch)["ref_logprobs"]
    before = learner.policy_state()
    metrics = learner.ppo_update(batch, kl_coef=0.05, seed=0).metrics
    assert metrics["train/optimizer_steps"] == 2
    return before, learner.policy_state()


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(learner, trained):
    before, after = trained
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    # lora_A moves too once lora_B is no longer zero; the base never moves
    assert any(".lora_B." in n for n in changed)
    base = dict(load_policy(learner.base_paths[id(learner.policy.module)]).named_parameters())
    frozen = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): t
        for n, t in after.items()
        if "lora_" not in n
    }
    assert frozen.keys() == base.keys()
    for name, p in base.items():
        assert torch.equal(frozen[name], p), name
    for engine in learner.engines().values():
        trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in engine.module.parameters() if not p.requires_grad)
        # the optimizer's (ZeRO's flat fp32) parameters: the trainable ones, a little padding
        held = sum(p.numel() for g in engine.optimizer.param_groups for p in g["params"])
        assert trainable <= held < trainable + 64 and frozen > 10 * trainable
    # the critic: its adapters and its fresh value head train, nothing else
    names = [n for n, p in learner.critic.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)


def test_the_sync_sends_the_adapters_only_and_generators_sample_as_the_merged_model(
    learner, trained, tiny_policy, tmp_path
):
    manifest = learner.setup_info()["sync_manifest"]
    adapters = {n: t for n, t in trained[1].items() if "lora_" in n}
    assert [s.name for s in manifest] == list(adapters)
    weigh = sum(t.numel() * t.element_size() for t in adapters.values())
    assert weight_sync.manifest_bytes(manifest) == weigh
    full = sum(p.numel() * 4 for p in load_policy(tiny_policy).parameters())
    assert weigh < 0.2 * full  # rank 4 on a 64-wide model; a few % on larger ones

    gen = _generator(tiny_policy, learner.cfg)
    open_gloo(learner, gen, prefix="lora")
    sent, got = push(learner, gen, version=1)
    assert sent.checksum == got.checksum == learner.policy_checksum()
    assert gen.status() == {"version": 1, "checksum": sent.checksum}
    # the object-store transport moves the same adapters
    other = _generator(tiny_policy, learner.cfg)
    learner.open_weight_sync("object_store", 4096)
    meta, buckets = learner.send_weights(4096, 1, True)
    assert sum(b.numel() for b in buckets) < weigh + 64 * len(manifest)
    other.open_weight_sync(weight_sync.Channel("object_store", 4096, manifest))
    loaded = other.receive_weights(1, True, buckets)
    assert loaded.checksum == meta.checksum == sent.checksum
    # hashed here from each generator's own adapters, not taken from their reports
    assert weight_sync.model_checksum(other.model) == weight_sync.model_checksum(gen.model)
    assert weight_sync.model_checksum(gen.model) == sent.checksum

    # The export, merged, is a plain transformers model; a plain generator on it samples
    # what the LoRA generator samples.
    out = tmp_path / "policy"
    learner.export_policy(str(out), tiny_policy)
    plain = Generator(str(out), max_new_tokens=8)
    assert not hasattr(plain.model, "peft_config")
    ours = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=11)
    theirs = plain.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=11)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.behaviour_logprobs, theirs.behaviour_logprobs)
    base = Generator(tiny_policy, max_new_tokens=8).generate(
        PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=11
    )
    assert not torch.allclose(ours.behaviour_logprobs, base.behaviour_logprobs)

    # The adapter alone: plain peft loads it onto the base and gives the merged model's logits.
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = out / "adapter"
    assert PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path == tiny_policy
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_policy), str(adapter)
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = ours.sequences
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.3 * full


def test_checkpoints_hold_the_adapters_only_and_restore_them(learner, trained, tmp_path):
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    for part in ("policy", "critic"):
        (states,) = (tmp_path / "ckpt" / part / "state").glob("*model_states.pt")
        module = safe_load(str(states))["module"]
        assert module and all("lora_" in k or "classifier" in k for k in module), (
            part,
            [k for k in module if "lora_" not in k],
        )
    before = learner.policy_checksum()
    with torch.no_grad():
        for _, p in weight_sync.sync_params(learner.policy.module):
            p.add_(1.0)
    assert learner.policy_checksum() != before
    learner.load_checkpoint(str(tmp_path / "ckpt"), version=5)
    assert learner.policy_checksum() == before and learner.version == 5


def test_reference_from_base_equals_a_reference_scorer_on_the_base(learner, trained, tiny_policy):
    """reference.from_base: the generator's base with the adapters disabled gives the
    reference scorer's log-probs, whatever adapters it holds."""
    gen = _generator(tiny_policy, learner.cfg, ref_from_base=True)
    with torch.no_grad():  # adapters far from the start: the policy differs from the base
        for _, p in weight_sync.sync_params(gen.model):
            p.add_(0.5)
    batch = gen.generate(PROMPTS, [0, 1, 2, 3], samples_per_prompt=2, seed=5)
    ref = ReferenceScorer(tiny_policy).ref_logprobs(batch)["ref_logprobs"]
    torch.testing.assert_close(batch.ref_logprobs, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch.behaviour_logprobs, ref, atol=1e-3)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_adapters_only_train_and_restore_at_zero_0_and_1(zero_stage, tiny_policy, tmp_path):
    """ZeRO-2 is the fixture above, ZeRO-3 the resume test on Ray."""
    cfg = _cfg(f"learner.zero_stage={zero_stage}", "ppo.estimator=grpo", "model.critic_lora_rank=0")
    learner = Learner(cfg, rank=0, world_size=1)
    learner.setup(tiny_policy, "", "127.0.0.1", learner.host_rendezvous())
    batch = _generator(tiny_policy, cfg).generate(PROMPTS, [0, 1, 2, 3], 2, seed=3)
    batch.scores = torch.tensor([0.0, 1.0] * 4)
    batch.ref_logprobs = batch.behaviour_logprobs
    before = learner.policy_state()
    learner.ppo_update(batch, kl_coef=0.0, seed=0)
    after = learner.policy_state()
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    saved = learner.policy_checksum()
    learner.ppo_update(batch, kl_coef=0.0, seed=1)
    assert learner.policy_checksum() != saved
    learner.load_checkpoint(str(tmp_path / "ckpt"), version=1)
    assert learner.policy_checksum() == saved


def test_sft_and_reward_model_train_adapters_and_export_merged(tiny_policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_dist.roles.supervised import RewardLearner, SFTLearner

    cfg = load_config(
        None,
        [
            "learner.num_workers=1",
            "sft.lora_rank=4",
            "sft.batch_size=4",
            "sft.micro_batch_size=2",
            "sft.lr=1e-2",
            "rm.lora_rank=4",
            "rm.batch_size=4",
            "rm.micro_batch_size=2",
        ],
    )
    sft = SFTLearner(cfg, rank=0, world_size=1)
    sft.setup(tiny_policy, tiny_policy, "127.0.0.1", sft.host_rendezvous())
    records = [{"prompt": p, "response": "red cat sun"} for p in PROMPTS]
    first = sft.train_step(records)
    for _ in range(3):
        last = sft.train_step(records)
    assert last["nll_sum"] < first["nll_sum"]
    names = [n for n, p in sft.engine.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    sft.export_model(str(tmp_path / "sft"), tiny_policy)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_policy), str(tmp_path / "sft" / "adapter")
    )
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits)

    rm = RewardLearner(cfg, rank=0, world_size=1)
    rm.setup(tiny_policy, tiny_policy, "127.0.0.1", rm.host_rendezvous())
    trainable = [n for n, p in rm.engine.module.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    pairs = [{"prompt": p, "chosen": "red sun", "rejected": "cat cup"} for p in PROMPTS]
    rm.train_step(pairs)
    rm.export_model(str(tmp_path / "rm"), tiny_policy)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert plain.config.num_labels == 1 and not hasattr(plain, "peft_config")
