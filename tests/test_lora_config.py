"""LoRA settings: refused before any actor starts, naming the key (config.validate for the
numbers, preflight for what needs the model), on the real builtin:tiny assets."""

import pytest
import torch
from torch import nn

from rlhf_dist import lora
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.preflight import check_all, resolve_inputs


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    from rlhf_dist.tasks.tiny import build_assets

    out = tmp_path_factory.mktemp("lora_assets")
    build_assets(out / "tiny")
    return out


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.lora_rank=-1", "model.lora_alpha=16"], "model.lora_rank"),
        (["model.lora_alpha=16"], "model.lora_rank"),  # LoRA asked for, rank left at 0
        (["model.lora_target_modules=[c_attn]"], "model.lora_rank"),
        (["sft.lora_dropout=0.1"], "sft.lora_rank"),
        (["rm.lora_rank=-4"], "rm.lora_rank"),
        (["model.critic_lora_alpha=4"], "model.critic_lora_rank"),
        (["model.lora_rank=8", "model.lora_alpha=-1"], "model.lora_alpha"),
        (["model.lora_rank=8", "model.lora_dropout=1.0"], "model.lora_dropout"),
        (["model.lora_rank=8", "model.lora_target_modules=['']"], "model.lora_target_modules"),
        (
            ["ppo.estimator=grpo", "rollout.samples_per_prompt=2", "model.critic_lora_rank=4"],
            "model.critic_lora_rank",
        ),
        (["reference.from_base=true"], "reference.from_base"),
    ],
)
def test_bad_numbers_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        load_config(None, overrides)


def test_defaults_are_lora_off():
    cfg = load_config(None, [])
    assert all(lora.lora_settings(cfg, w) is None for w in lora.LORA_KEYS)
    assert not cfg.reference.from_base
    on = load_config(None, ["model.lora_rank=8", "reference.from_base=true"])
    s = lora.lora_settings(on, "policy")
    assert (s.rank, s.scale_alpha, s.target_modules, s.key) == (8, 16.0, (), "model.lora")


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (
            ["model.lora_rank=8", "model.lora_target_modules=[nope]"],
            "model.lora_target_modules",
            "nope",
        ),
        (
            ["model.lora_rank=8", "model.lora_target_modules=[c_attn, q_proj]"],
            "model.lora_target_modules",
            "q_proj",
        ),
        # a LayerNorm is a module peft cannot put LoRA on
        (
            ["model.lora_rank=8", "model.lora_target_modules=[ln_f]"],
            "model.lora_target_modules",
            "ln_f",
        ),
        (
            ["model.critic_lora_rank=8", "model.critic_lora_target_modules=[nope]"],
            "model.critic_lora_target_modules",
            "nope",
        ),
    ],
)
def test_targets_the_model_lacks_are_refused_by_preflight(assets_dir, overrides, key, says):
    cfg = load_config(None, [f"model.assets_dir={assets_dir}", *overrides])  # validate passes
    with pytest.raises(ConfigError, match=rf"^{key}:.*{says}"):
        resolve_inputs(cfg)


def test_supervised_stages_check_their_targets(assets_dir):
    cfg = load_config(
        None,
        [
            f"model.assets_dir={assets_dir}",
            "run.stage=all",
            "reward.model=run:rm",
            "rm.lora_rank=4",
            "rm.lora_target_modules=[wte_nope]",
        ],
    )
    with pytest.raises(ConfigError, match=r"^rm.lora_target_modules:.*wte_nope"):
        check_all(cfg, assets_dir / "run", ["sft", "rm", "ppo"])


def test_good_lora_settings_pass_preflight(assets_dir):
    cfg = load_config(
        None,
        [
            f"model.assets_dir={assets_dir}",
            "model.lora_rank=8",
            "model.lora_target_modules=[c_attn, mlp.c_proj]",
            "model.critic_lora_rank=4",
            "reference.from_base=true",
        ],
    )
    resolve_inputs(cfg)


def test_a_model_peft_cannot_wrap_is_refused_naming_the_key():
    class Norms(nn.Module):  # no linear layer: nothing an adapter can sit on
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

    settings = lora.LoraSettings(rank=4, alpha=8, key="model.lora")
    with pytest.raises(ValueError, match=r"^model.lora_target_modules: Norms has no linear"):
        lora.wrap(Norms(), settings, "causal")


def test_wrapping_is_seeded_so_every_holder_starts_with_the_same_adapters(tiny_policy):
    from rlhf_dist.models import load_policy

    settings = lora.LoraSettings(rank=4, alpha=8)
    a = lora.wrap(load_policy(tiny_policy), settings, "causal", seed=3)
    b = lora.wrap(load_policy(tiny_policy), settings, "causal", seed=3)
    c = lora.wrap(load_policy(tiny_policy), settings, "causal", seed=4)
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))
    names = lora.trainable_names(a)
    assert names and all("lora_" in n for n in names)
    assert all(torch.equal(sa[n], sb[n]) for n in names)
    assert not all(torch.equal(sa[n], sc[n]) for n in names)


def test_adapters_take_the_base_dtype(tiny_policy):
    """A bf16 policy gets bf16 adapters on every holder (peft would make them fp32), so the
    generators' adapters have the dtypes the learner's bf16 engine sends."""
    from rlhf_dist.models import load_policy

    model = lora.wrap(load_policy(tiny_policy, "bfloat16"), lora.LoraSettings(4, 8), "causal")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_is_peft_needs_no_peft_for_a_plain_model():
    """A plain model's export asks is_peft; on a machine without peft (the GPU image) that
    must not import it."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft raises
        "import torch; from rlhf_dist.lora import is_peft\n"
        "assert not is_peft(torch.nn.Linear(2, 2)); print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
