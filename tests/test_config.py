"""Config tree: loading, overrides, strict type checks, size checks and round-trips."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from rlhf_dist import config as config_module
from rlhf_dist.config import (
    POOL_SECTIONS,
    Config,
    ConfigError,
    PoolConfig,
    RMConfig,
    SFTConfig,
    Sizes,
    SupervisedConfig,
    _attr,
    _yaml_key,
    dump_config,
    load_config,
    parse_overrides,
    validate,
    zero_stage,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))


def _write_yaml(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _leaves(obj, prefix=""):
    """{'section.key': value} for every leaf of a Config, keyed as in YAML (``async``, not
    ``async_``; nested sections flattened)."""
    out = {}
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), prefix + _yaml_key(f.name)
        out.update(_leaves(v, key + ".") if dataclasses.is_dataclass(v) else {key: v})
    return out


def _yaml_leaves(raw: dict, obj, prefix="") -> dict:
    """The same for a YAML mapping, flattened where the config has a section."""
    out = {}
    for key, value in raw.items():
        held = getattr(obj, _attr(key))
        if dataclasses.is_dataclass(held):
            out.update(_yaml_leaves(value or {}, held, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ----------------------------------------------------------------------------- defaults


def test_defaults_load_and_equal_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.run.name == "ppo"
    assert cfg.rollout.num_workers == 2
    assert cfg.learner.zero_stage == "auto"
    assert cfg.ppo.kl_estimator == "k1"
    assert cfg.sync.verify is True
    # None and [] overrides are the same as no overrides
    assert load_config(None, []) == cfg


def test_defaults_sizes():
    # defaults: 8 prompts x 1 sample, 2 generators, minibatch 8, 1 rank, micro 4
    assert validate(Config()) == Sizes(
        samples_per_step=8,
        chunk_prompts=4,  # one chunk per generator
        queue_samples=16,  # two steps' worth
        minibatches_per_epoch=1,
        minibatch_per_rank=8,
        grad_accum_steps=2,
    )


def test_pool_sections_share_pool_config_and_keep_their_defaults():
    cfg = Config()
    pools = {
        f.name for f in dataclasses.fields(Config) if isinstance(getattr(cfg, f.name), PoolConfig)
    }
    assert pools == set(POOL_SECTIONS)
    pool_keys = [f.name for f in dataclasses.fields(PoolConfig)]
    assert pool_keys == ["num_workers", "num_cpus", "num_gpus", "resources"]
    for name in POOL_SECTIONS:
        # the shared keys come first in every pool section, in the same order
        assert [f.name for f in dataclasses.fields(getattr(cfg, name))][:4] == pool_keys, name
    expected = {  # (num_workers, num_cpus, num_gpus, resources)
        "rollout": (2, 0.5, 0.0, {}),
        "reward": (1, 0.25, 0.0, {}),
        "reference": (1, 0.25, 0.0, {}),
        "learner": (1, 1.0, 0.0, {}),
    }
    for name, values in expected.items():
        section = getattr(cfg, name)
        assert tuple(getattr(section, k) for k in pool_keys) == values, name
    # each section's own resources dict (a default_factory, not one shared dict)
    assert cfg.rollout.resources is not cfg.learner.resources


def test_sft_and_rm_share_a_base_and_keep_their_defaults():
    assert issubclass(SFTConfig, SupervisedConfig) and issubclass(RMConfig, SupervisedConfig)
    keys = [f.name for f in dataclasses.fields(SupervisedConfig)]
    assert keys == [
        "data",
        "init",
        "epochs",
        "batch_size",
        "micro_batch_size",
        "lr",
        "eval_frac",
        "skip_bad_lines",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ]
    assert [f.name for f in dataclasses.fields(SFTConfig)] == keys
    assert [f.name for f in dataclasses.fields(RMConfig)] == keys
    sft, rm = Config().sft, Config().rm
    assert (sft.data, sft.init, sft.epochs, sft.batch_size, sft.micro_batch_size) == (
        "builtin:describe",
        "builtin:describe",
        3,
        64,
        32,
    )
    assert (sft.lr, sft.eval_frac, sft.skip_bad_lines) == (1e-3, 0.05, False)
    assert (rm.data, rm.init, rm.epochs, rm.batch_size, rm.micro_batch_size) == (
        "builtin:describe",
        "run:sft",
        2,
        64,
        32,
    )
    assert (rm.lr, rm.eval_frac, rm.skip_bad_lines) == (5e-4, 0.1, False)


def test_every_section_field_has_a_docstring():
    """The project documents each key with a string literal under its field; a subclass that
    redeclares a field (to change its default) writes its own."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    missing = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name in ("Config", "Sizes"):
            continue
        for i, stmt in enumerate(node.body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = node.body[i + 1] if i + 1 < len(node.body) else None
                documented = (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                )
                if not documented:
                    missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing


# ----------------------------------------------------------------------------- merge


def test_file_and_overrides_merge_nested(tmp_path):
    path = _write_yaml(
        tmp_path,
        {
            "run": {"name": "from-file", "steps": 7},
            "rollout": {"num_workers": 4, "prompts_per_step": 16, "max_new_tokens": 9},
            "ppo": {"epochs": 3, "minibatch_size": 16, "micro_batch_size": 4},
        },
    )
    cfg = load_config(path, ["run.name=from-cli", "rollout.max_new_tokens=5", "ppo.lam=0.9"])
    # override wins
    assert cfg.run.name == "from-cli"
    assert cfg.rollout.max_new_tokens == 5
    # sibling keys of the same section from the file survive the nested merge
    assert cfg.run.steps == 7
    assert cfg.rollout.num_workers == 4
    assert cfg.rollout.prompts_per_step == 16
    assert cfg.ppo.epochs == 3
    assert cfg.ppo.minibatch_size == 16
    # override of a key the file does not set
    assert cfg.ppo.lam == 0.9
    # untouched keys keep their defaults
    assert cfg.rollout.temperature == 1.0
    assert cfg.learner.zero_stage == "auto"


def test_last_override_wins():
    cfg = load_config(None, ["run.steps=3", "run.steps=5"])
    assert cfg.run.steps == 5


def test_override_values_typed_by_yaml():
    cfg = load_config(
        None,
        ["ppo.epochs=2", "run.name=abc", "sync.verify=false", "rollout.temperature=0.7"],
    )
    assert cfg.ppo.epochs == 2 and type(cfg.ppo.epochs) is int
    assert cfg.run.name == "abc" and type(cfg.run.name) is str
    assert cfg.sync.verify is False
    assert cfg.rollout.temperature == 0.7


def test_parse_overrides_tree():
    tree = parse_overrides(["ppo.epochs=2", "run.name=abc", "sync.verify=false", "run.dir="])
    assert tree == {
        "ppo": {"epochs": 2},
        "run": {"name": "abc", "dir": ""},
        "sync": {"verify": False},
    }
    # value may itself contain '='
    assert parse_overrides(["run.name=a=b"]) == {"run": {"name": "a=b"}}


@pytest.mark.parametrize("bad", ["foo", "ppo.epochs"])
def test_malformed_override_refused(bad):
    with pytest.raises(ConfigError, match="expected section.key=value") as e:
        load_config(None, [bad])
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", ["ppo..epochs=1", ".epochs=1", "ppo.=1"])
def test_override_with_empty_key_component_refused(bad):
    with pytest.raises(ConfigError, match="empty key component") as e:
        parse_overrides([bad])
    assert repr(bad) in str(e.value)


def test_override_value_and_section_conflict_refused():
    with pytest.raises(ConfigError, match="ppo.epochs"):
        parse_overrides(["ppo=1", "ppo.epochs=2"])


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_nested_key_suggests_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.temprature=0.5"])
    msg = str(e.value)
    assert msg.startswith("rollout.temprature:")
    assert "unknown key" in msg
    assert "did you mean 'rollout.temperature'" in msg


def test_unknown_top_level_key_suggests_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rolout.num_workers=2"])
    msg = str(e.value)
    assert msg.startswith("rolout:")
    assert "did you mean 'rollout'" in msg


def test_unknown_key_in_file_refused(tmp_path):
    path = _write_yaml(tmp_path, {"ppo": {"epochs": 1, "minibatch_sise": 8}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "ppo.minibatch_sise" in str(e.value)
    assert "did you mean 'ppo.minibatch_size'" in str(e.value)


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["zzzzzz.qqq=1"])
    assert str(e.value).startswith("zzzzzz:")
    assert "did you mean" not in str(e.value)


def test_section_given_as_scalar_refused():
    with pytest.raises(ConfigError, match="^ppo: expected a mapping"):
        load_config(None, ["ppo=3"])


@pytest.mark.parametrize("value", ["0", "false", "[]"])
def test_falsy_scalar_section_refused(value):
    with pytest.raises(ConfigError, match="^ppo: expected a mapping"):
        load_config(None, [f"ppo={value}"])


RENAMED_MSG = (
    "learner.world_size: renamed to learner.num_workers (the data-parallel DeepSpeed ranks)"
)


@pytest.mark.parametrize(
    "overrides", [["learner.world_size=2"], ["learner.num_workers=2", "learner.world_size=2"]]
)
def test_renamed_key_in_override_names_the_new_key(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == RENAMED_MSG


def test_renamed_key_in_file_names_the_new_key(tmp_path):
    path = _write_yaml(tmp_path, {"learner": {"world_size": 4, "zero_stage": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == RENAMED_MSG
    # the same file with the new key loads, and dumps the new key only
    path = _write_yaml(tmp_path, {"learner": {"num_workers": 4, "zero_stage": 3}})
    cfg = load_config(path, ["ppo.minibatch_size=8", "ppo.micro_batch_size=2"])
    assert cfg.learner.num_workers == 4
    dump_config(cfg, tmp_path / "dumped.yaml")
    dumped = yaml.safe_load((tmp_path / "dumped.yaml").read_text())
    assert dumped["learner"]["num_workers"] == 4 and "world_size" not in dumped["learner"]


def test_renamed_key_is_only_refused_where_it_was_a_key():
    # a section that never had world_size gets the ordinary unknown-key message
    with pytest.raises(ConfigError, match=r"^rollout.world_size: unknown key"):
        load_config(None, ["rollout.world_size=2"])


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "override, key",
    [
        ("ppo.epochs=two", "ppo.epochs"),  # string for int
        ("ppo.epochs=2.0", "ppo.epochs"),  # float for int
        ("rollout.num_workers=1.5", "rollout.num_workers"),  # float for int
        ("sync.verify=1", "sync.verify"),  # int for bool
        ("data.shuffle=yes please", "data.shuffle"),  # string for bool
        ("ppo.epochs=true", "ppo.epochs"),  # bool for int
        ("learner.lr=true", "learner.lr"),  # bool for float
        ("learner.lr=fast", "learner.lr"),  # string for float
        ("run.name=123", "run.name"),  # int for str
        ("run.name=[a, b]", "run.name"),  # list for str
    ],
)
def test_wrong_type_refused(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key}:")


def test_wrong_type_in_file_names_key(tmp_path):
    path = _write_yaml(tmp_path, {"rollout": {"max_new_tokens": "many"}})
    with pytest.raises(ConfigError, match="^rollout.max_new_tokens: expected an integer"):
        load_config(path)


def test_int_accepted_for_float_field_and_value_kept():
    cfg = load_config(None, ["rollout.temperature=2", "learner.max_grad_norm=0"])
    assert cfg.rollout.temperature == 2
    assert isinstance(cfg.rollout.temperature, float)
    assert cfg.learner.max_grad_norm == 0
    # neighbours not rewritten
    assert cfg.rollout.top_p == 1.0
    assert cfg.learner.lr == 1e-5


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("learner.zero_stage=true", "learner.zero_stage"),  # True == 1 but is not a stage
        ("learner.zero_stage='2'", "learner.zero_stage"),  # a string is not the int 2
        ("ppo.kl_estimator=k9", "ppo.kl_estimator"),
        ("model.dtype=float16", "model.dtype"),
        ("sync.backend=mpi", "sync.backend"),
        ("ppo.estimator=ppo", "ppo.estimator"),
        ("ppo.estimator=GRPO", "ppo.estimator"),
        ("ppo.loss_agg=token-mean", "ppo.loss_agg"),  # veRL's spelling is not ours
        ("ppo.ratio_level=seq", "ppo.ratio_level"),
    ],
)
def test_literal_refused(override, key):
    with pytest.raises(ConfigError, match="is not one of") as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key}:")


def test_zero_stage_auto_is_0_alone_and_2_with_more_ranks():
    assert zero_stage(load_config(None, [])) == 0
    assert zero_stage(load_config(None, ["learner.num_workers=2"])) == 2
    assert zero_stage(load_config(None, ["learner.num_workers=2", "learner.zero_stage=0"])) == 0
    assert zero_stage(load_config(None, ["learner.zero_stage=3"])) == 3


def test_literal_accepted():
    cfg = load_config(None, ["learner.zero_stage=3", "ppo.kl_estimator=k3", "sync.backend=gloo"])
    assert cfg.learner.zero_stage == 3
    assert cfg.ppo.kl_estimator == "k3"
    assert cfg.sync.backend == "gloo"


# ----------------------------------------------------------------------------- sizes


def test_prompts_need_not_divide_among_generators():
    """Prompts are dealt in chunks by load, so any pool size works with any step size."""
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_step=9",
            "rollout.num_workers=2",
            "ppo.minibatch_size=3",
            "ppo.micro_batch_size=3",
        ],
    )
    assert validate(cfg).chunk_prompts == 5  # ceil(9 / 2)
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_step=9",
            "rollout.chunk_prompts=4",
            "ppo.minibatch_size=9",
            "ppo.micro_batch_size=3",
        ],
    )
    assert validate(cfg).chunk_prompts == 4


@pytest.mark.parametrize(
    "override, match",
    [
        ("rollout.autoscale.max_workers=1", r"rollout.autoscale.max_workers=1 is below"),
        ("rollout.autoscale={max_workers: 4, generate_frac: 1.5}", "generate_frac"),
        ("rollout.autoscale={max_workers: 4, cooldown_steps: -1}", "cooldown_steps"),
        ("reward.resources={CPU: 1}", "reward.resources.CPU: must be a custom resource"),
        ("rollout.resources={rollout_node: 0}", r"rollout.resources.rollout_node: .*> 0"),
        ("learner.resources=[a]", "learner.resources: expected a mapping"),
        ("reference.resources={node: fast}", "reference.resources.node: expected a number"),
        ("rollout.chunk_prompts=-1", "rollout.chunk_prompts"),
        ("async.max_staleness=-1", "async.max_staleness"),
        ("async.is_cap=0.5", "async.is_cap"),
        ("async.queue_samples=4", r"async.queue_samples=4 cannot hold one step's samples .* = 8"),
        ("sync.backend=nccl", "sync.backend=nccl needs GPUs on both sides"),
        (["sync.backend=shm", "rollout.num_gpus=1"], "sync.backend=shm shares CPU memory"),
        (["mode=async", "rollout.autoscale.max_workers=4"], "with mode=async set it to 0"),
    ],
)
def test_pool_placement_and_autoscale_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override if isinstance(override, list) else [override])


def test_async_section_is_spelled_async_in_yaml(tmp_path):
    cfg = load_config(None, ["mode=async", "async.max_staleness=2"])
    assert cfg.mode == "async" and cfg.async_.max_staleness == 2
    dump_config(cfg, tmp_path / "c.yaml")
    assert "async:" in (tmp_path / "c.yaml").read_text()
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="did you mean 'async.is_cap'"):
        load_config(None, ["async.is_cp=2"])


def test_custom_resources_load():
    cfg = load_config(
        None, ["rollout.resources={rollout_node: 1}", "learner.resources={gpu_a: 0.5}"]
    )
    assert cfg.rollout.resources == {"rollout_node": 1.0}
    assert cfg.learner.resources == {"gpu_a": 0.5}


@pytest.mark.parametrize(
    "overrides, names",
    [
        (
            ["rollout.prompts_per_step=6", "rollout.num_workers=2", "ppo.minibatch_size=4"],
            ["rollout.prompts_per_step", "rollout.samples_per_prompt", "ppo.minibatch_size=4"],
        ),
        (
            ["learner.num_workers=3", "ppo.minibatch_size=8"],
            ["ppo.minibatch_size=8", "learner.num_workers=3"],
        ),
        (
            ["learner.num_workers=2", "ppo.minibatch_size=8", "ppo.micro_batch_size=3"],
            ["ppo.minibatch_size / learner.num_workers=4", "ppo.micro_batch_size=3"],
        ),
        (
            # minibatch larger than the step's samples
            ["rollout.prompts_per_step=8", "ppo.minibatch_size=16"],
            ["rollout.prompts_per_step", "ppo.minibatch_size=16"],
        ),
    ],
)
def test_non_dividing_sizes_refused(overrides, names):
    with pytest.raises(ConfigError, match="must be divisible by") as e:
        load_config(None, overrides)
    for name in names:
        assert name in str(e.value)


def test_validate_sizes_hand_computed():
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_step=12",
            "rollout.samples_per_prompt=4",
            "rollout.num_workers=3",
            "ppo.minibatch_size=16",
            "learner.num_workers=2",
            "ppo.micro_batch_size=4",
        ],
    )
    # 12 * 4 = 48 samples; 48 / 16 = 3 minibatches;
    # 16 / 2 = 8 per rank; 8 / 4 = 2 accumulation steps
    assert validate(cfg) == Sizes(
        samples_per_step=48,
        chunk_prompts=4,  # ceil(12 / 3)
        queue_samples=96,
        minibatches_per_epoch=3,
        minibatch_per_rank=8,
        grad_accum_steps=2,
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.steps=0", "run.steps"),
        ("rollout.num_workers=0", "rollout.num_workers"),
        ("rollout.num_workers=-2", "rollout.num_workers"),
        ("rollout.prompts_per_step=0", "rollout.prompts_per_step"),
        ("rollout.samples_per_prompt=-1", "rollout.samples_per_prompt"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("learner.num_workers=0", "learner.num_workers"),
        ("learner.lr=-0.1", "learner.lr"),
        ("learner.weight_decay=-0.1", "learner.weight_decay"),
        ("ppo.epochs=0", "ppo.epochs"),
        ("ppo.minibatch_size=0", "ppo.minibatch_size"),
        ("ppo.micro_batch_size=-4", "ppo.micro_batch_size"),
        ("ppo.clip_eps=-0.2", "ppo.clip_eps"),
        ("ppo.kl_coef=-1", "ppo.kl_coef"),
        ("ppo.kl_loss_coef=-0.01", "ppo.kl_loss_coef"),
        ("ppo.kl_loss_coef=.nan", "ppo.kl_loss_coef"),
        ("run.seed=-1", "run.seed"),
        ("rollout.top_k=-1", "rollout.top_k"),
        ("reward.num_gpus=-1", "reward.num_gpus"),
        ("sync.timeout_s=0", "sync.timeout_s"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("ppo.gamma=1.1", "ppo.gamma"),
        ("ppo.lam=-0.1", "ppo.lam"),
    ],
)
def test_out_of_range_refused_naming_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key}:")


@pytest.mark.parametrize("section", POOL_SECTIONS)
@pytest.mark.parametrize(
    "override, key, match",
    [
        ("num_workers=0", "num_workers", "must be > 0"),
        ("num_workers=-1", "num_workers", "must be > 0"),
        ("num_cpus=-0.5", "num_cpus", "must be >= 0"),
        ("num_cpus=.nan", "num_cpus", "must be >= 0"),
        ("num_gpus=-1", "num_gpus", "must be >= 0"),
        ("resources={GPU: 1}", "resources.GPU", "must be a custom resource"),
        ("resources={node: .inf}", "resources.node", "amount > 0"),
        ("num_cpus=0", "num_cpus", "some CPU, GPU or custom resource"),  # Ray cannot place it
    ],
)
def test_every_pool_section_checked_alike_naming_key(section, override, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"{section}.{override}"])
    assert str(e.value).startswith(f"{section}.{key}:")


@pytest.mark.parametrize("section", POOL_SECTIONS)
def test_pool_worker_may_ask_for_gpus_or_custom_resources_only(section):
    cfg = load_config(None, [f"{section}.num_cpus=0", f"{section}.num_gpus=1"])
    assert getattr(cfg, section).num_cpus == 0
    cfg = load_config(None, [f"{section}.num_cpus=0", f"{section}.resources={{node: 1}}"])
    assert getattr(cfg, section).resources == {"node": 1.0}


def test_zero_allowed_where_documented():
    cfg = load_config(
        None,
        ["rollout.top_k=0", "run.seed=0", "ppo.entropy_coef=0", "learner.max_grad_norm=0"],
    )
    assert cfg.rollout.top_k == 0 and cfg.run.seed == 0


def test_adaptive_kl_needs_positive_target():
    load_config(None, ["ppo.kl_target=0"])  # not checked while adaptive_kl is off
    with pytest.raises(ConfigError, match="^ppo.kl_target:"):
        load_config(None, ["ppo.adaptive_kl=true", "ppo.kl_target=0"])


def test_reward_function_format_refused():
    with pytest.raises(ConfigError, match="^reward.function:"):
        load_config(None, ["reward.function=no_colon_here"])


@pytest.mark.parametrize("key", ["learner.lr", "rollout.temperature", "ppo.kl_coef"])
def test_nan_refused(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=.nan"])
    assert str(e.value).startswith(f"{key}:")


@pytest.mark.parametrize("raw, value", [("1e-5", 1e-5), ("3E-4", 3e-4), ("2e+1", 20.0)])
def test_exponent_float_without_dot_accepted_for_float_fields(raw, value):
    # PyYAML (YAML 1.1) reads `1e-5` as a string; float fields still take it as the number
    cfg = load_config(None, [f"learner.lr={raw}"])
    assert cfg.learner.lr == value and type(cfg.learner.lr) is float


def test_negative_exponent_float_still_range_checked():
    with pytest.raises(ConfigError, match="^ppo.kl_coef: must be >= 0"):
        load_config(None, ["ppo.kl_coef=-2e-1"])


def test_exponent_string_still_refused_for_int_and_str_fields():
    with pytest.raises(ConfigError, match="^ppo.epochs: expected an integer"):
        load_config(None, ["ppo.epochs=1e3"])
    assert load_config(None, ["run.name=1e3"]).run.name == "1e3"


# ----------------------------------------------------------------------------- no rewriting


def test_validation_never_rewrites_user_values(tmp_path):
    user = {
        "run": {"name": "keep-me", "dir": "somewhere/else", "seed": 17, "steps": 4},
        "model": {"policy": "/models/p", "tokenizer": "/models/t", "dtype": "bfloat16"},
        "data": {"prompts": "/data/p.jsonl", "prompt_key": "text", "shuffle": False},
        "rollout": {
            "num_workers": 3,
            "num_cpus": 2,
            "prompts_per_step": 6,
            "samples_per_prompt": 4,
            "max_prompt_tokens": 33,
            "max_new_tokens": 7,
            "temperature": 0.75,
            "top_p": 0.9,
            "top_k": 5,
        },
        "reward": {"function": "my.mod:fn", "num_workers": 2},
        "learner": {"num_workers": 2, "zero_stage": 3, "lr": 3.0e-4, "max_grad_norm": 0},
        "ppo": {
            "epochs": 4,
            "minibatch_size": 12,
            "micro_batch_size": 3,
            "kl_estimator": "k2",
            "adaptive_kl": True,
            "kl_target": 3,
            "gamma": 0.99,
        },
        "sync": {"backend": "gloo", "verify": False, "bucket_mb": 1},
        "ray": {"address": "auto", "num_cpus": 12},
    }
    cfg = load_config(_write_yaml(tmp_path, user))
    leaves = _leaves(cfg)
    for section, values in user.items():
        for key, value in values.items():
            got = leaves[f"{section}.{key}"]
            assert got == value, f"{section}.{key}: {got!r} != {value!r}"
            assert type(got) is type(value) or (type(value) is int and type(got) is float)


# ----------------------------------------------------------------------------- round-trip


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(
        None,
        [
            "run.name=round",
            "run.dir=",
            "model.tokenizer=123abc",
            "learner.lr=0.0003",
            "learner.zero_stage=0",
            "sync.verify=false",
            "ppo.kl_estimator=k3",
            "ray.address=127.0.0.1:6379",
            "rollout.temperature=0.5",
        ],
    )
    path = tmp_path / "dumped.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert _leaves(again) == _leaves(cfg)


def test_round_trip_of_every_shipped_config(tmp_path):
    for i, src in enumerate(CONFIG_FILES):
        cfg = load_config(src)
        out = tmp_path / f"{i}.yaml"
        dump_config(cfg, out)
        assert load_config(out) == cfg, src.name


# ----------------------------------------------------------------------------- files


def test_missing_config_file_names_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_config_path_that_is_a_directory_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: [unclosed\n  steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_top_level_list_names_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert load_config(empty) == Config()
    nulls = tmp_path / "nulls.yaml"
    nulls.write_text("rollout:\nppo:\n")
    assert load_config(nulls) == Config()
    # an override into a section the file left empty
    assert load_config(nulls, ["ppo.epochs=3"]).ppo.epochs == 3


def test_shipped_configs_exist():
    assert CONFIG_FILES, f"no YAML config in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    sizes = validate(cfg)
    assert sizes.samples_per_step > 0 and sizes.grad_accum_steps > 0
    # every value the file sets is what the loaded config holds
    raw = yaml.safe_load(path.read_text()) or {}
    leaves = _leaves(cfg)
    for key, value in _yaml_leaves(raw, cfg).items():
        assert leaves[key] == value
        assert not (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------- estimators

GROUP_OK = ["rollout.samples_per_prompt=4", "rollout.prompts_per_step=4", "ppo.minibatch_size=8"]


def test_estimators_come_from_the_algo_table():
    """ppo.estimator takes exactly the names of algo.ESTIMATORS (one table, no copy here)."""
    import typing

    from rlhf_dist import algo

    for name in algo.ESTIMATORS:
        assert load_config(None, [f"ppo.estimator={name}", *GROUP_OK]).ppo.estimator == name
    with pytest.raises(ConfigError, match=r"ppo.estimator: 'grpoo' is not one of \['gae'"):
        load_config(None, ["ppo.estimator=grpoo"])
    assert not hasattr(config_module, "GROUP_ESTIMATORS")
    hints = typing.get_type_hints(config_module.PPOConfig)
    assert typing.get_args(hints["loss_agg"]) == algo.LOSS_AGG_MODES
    assert typing.get_args(hints["ratio_level"]) == algo.RATIO_LEVELS
    assert typing.get_args(hints["rollout_correction"]) == algo.ROLLOUT_CORRECTIONS
    assert typing.get_args(hints["mis_level"]) == algo.MIS_LEVELS


def test_estimator_defaults_are_todays_ppo():
    ppo = Config().ppo
    assert (ppo.estimator, ppo.loss_agg, ppo.ratio_level, ppo.kl_loss_coef) == (
        "gae",
        "token_mean",
        "token",
        0.0,
    )


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimator_needs_two_samples_per_prompt(estimator):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"ppo.estimator={estimator}"])  # samples_per_prompt defaults to 1
    assert str(e.value).startswith(
        f"rollout.samples_per_prompt=1 must be >= 2 for ppo.estimator={estimator}"
    )
    cfg = load_config(None, [f"ppo.estimator={estimator}", *GROUP_OK])
    assert cfg.ppo.estimator == estimator and validate(cfg).samples_per_step == 16


def test_reinforce_pp_needs_no_groups():
    cfg = load_config(None, ["ppo.estimator=reinforce_pp", "ppo.gamma=0.99"])
    assert cfg.rollout.samples_per_prompt == 1 and cfg.ppo.gamma == 0.99


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_split_across_learner_ranks_refused(estimator):
    # 6 prompts x 2 samples over 2 ranks: 6 samples each, three whole groups; 3 prompts x 4
    # samples over 2 ranks: 6 samples each as well, but the second group is cut in two.
    ok = ["rollout.prompts_per_step=6", "rollout.samples_per_prompt=2", "learner.num_workers=2"]
    sizes = ["ppo.minibatch_size=4", "ppo.micro_batch_size=2"]
    assert load_config(None, [f"ppo.estimator={estimator}", *ok, *sizes])
    cut = [
        "rollout.prompts_per_step=3",
        "rollout.samples_per_prompt=4",
        "learner.num_workers=2",
        "ppo.minibatch_size=4",
        "ppo.micro_batch_size=2",
    ]
    assert validate(load_config(None, cut)).samples_per_step == 12  # fine for gae
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"ppo.estimator={estimator}", *cut])
    msg = str(e.value)
    assert msg.startswith("rollout.prompts_per_step=3 must be divisible by learner.num_workers=2")
    assert f"ppo.estimator={estimator}" in msg and "rollout.samples_per_prompt=4" in msg


def test_group_statistics_do_not_constrain_minibatches():
    """Groups are normalised over the rank's whole shard before minibatching, so a minibatch
    may cut a group (here minibatch 2 per rank, groups of 4)."""
    cfg = load_config(
        None,
        [
            "ppo.estimator=grpo",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "learner.num_workers=2",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
        ],
    )
    assert validate(cfg).minibatch_per_rank == 2


def test_group_estimator_needs_gamma_one():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.estimator=dr_grpo", *GROUP_OK, "ppo.gamma=0.99"])
    assert str(e.value).startswith("ppo.gamma: must be 1 for ppo.estimator=dr_grpo")


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_critic_model_refused_without_a_critic(estimator):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"ppo.estimator={estimator}", *GROUP_OK, "model.critic=/m/critic"])
    assert str(e.value).startswith(f"model.critic: ppo.estimator={estimator} builds no critic")
    assert load_config(None, ["model.critic=/m/critic"]).model.critic == "/m/critic"


def test_loss_options_load_as_set():
    cfg = load_config(
        None,
        [
            "ppo.estimator=grpo",
            *GROUP_OK,
            "ppo.kl_coef=0",
            "ppo.kl_loss_coef=0.001",
            "ppo.loss_agg=seq_mean_token_sum",
            "ppo.ratio_level=sequence",
            "ppo.clip_eps=0.0003",
        ],
    )
    ppo = cfg.ppo
    assert (ppo.kl_coef, ppo.kl_loss_coef, ppo.loss_agg, ppo.ratio_level, ppo.clip_eps) == (
        0.0,
        0.001,
        "seq_mean_token_sum",
        "sequence",
        0.0003,
    )


# ----------------------------------------------------------------------------- dynamic sampling


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"rollout.drop_uniform_groups: needs rollout.samples_per_prompt >= 2 \(got 1\)"),
        ([*GROUP_OK, "mode=async"], r"rollout.drop_uniform_groups: not supported with mode=async"),
        ([*GROUP_OK, "rollout.max_fill_rounds=0"], r"rollout.max_fill_rounds: must be >= 1"),
    ],
)
def test_drop_uniform_groups_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.drop_uniform_groups=true", *overrides])


def test_drop_uniform_groups_is_off_by_default_and_accepted_with_groups():
    assert not Config().rollout.drop_uniform_groups
    cfg = load_config(None, ["rollout.drop_uniform_groups=true", "ppo.estimator=grpo", *GROUP_OK])
    assert cfg.rollout.drop_uniform_groups and cfg.rollout.max_fill_rounds == 8


def test_a_key_given_twice_in_a_file_is_refused_not_silently_dropped(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("reward:\n  function: a:b\nrollout:\n  num_workers: 1\nreward:\n  num_cpus: 0.5\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .*the key 'reward' is given twice"):
        load_config(p)
    p.write_text("rollout:\n  num_workers: 1\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match="'num_workers' is given twice"):
        load_config(p)
