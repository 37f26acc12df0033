"""Checks that run in the driver before any actor starts, so bad input fails fast and clearly.

Sources in the config are resolved here:
- ``builtin:tiny`` / ``builtin:describe`` / ``builtin:arith`` / ``builtin:wordmath``: a
  built-in task's files, built locally on first use into ``model.assets_dir``;
  ``builtin:smollm2-135m-instruct``: a real model converted once from a package into it;
- ``run:sft`` / ``run:rm``: the model an earlier stage exported into the run directory;
- anything else: a path or hub id, used as given.
Then every model path must load its config, the reward functions must import, data files must
parse (errors name file and line), the data fields a reward function takes by name must be
fields of the prompt files it scores, and prompts must fit ``rollout.max_prompt_tokens`` and the
policy's context window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_dist import chat
from rlhf_dist.algo.estimators import estimator
from rlhf_dist.config import ENV_REWARD, Config, ConfigError
from rlhf_dist.data import (
    DataError,
    Mapped,
    PromptRows,
    load_demonstrations,
    load_preference_pairs,
    load_prompt_rows,
)
from rlhf_dist.envs.base import EnvError
from rlhf_dist.envs.episodes import env_class
from rlhf_dist.inputs import Inputs
from rlhf_dist.roles.vllm_generator import vllm_available

STAGE_OUTPUTS = {"run:sft": ("sft", "policy"), "run:rm": ("rm", "model")}
STAGE_ORDER = ["sft", "rm", "ppo"]


def stages_of(cfg: Config) -> list[str]:
    """``run.stage``, or for ``all`` the stages PPO's sources need: SFT, the reward model only
    when PPO uses it (a recipe with a rule reward, ``reward.function``, has no RM stage),
    then PPO."""
    if cfg.run.stage != "all":
        return [cfg.run.stage]
    sources = (cfg.reward.model, cfg.model.policy, cfg.model.critic)
    return [s for s in STAGE_ORDER if s != "rm" or "run:rm" in sources]


def stage_output(run_dir: Path, value: str) -> Path:
    stage, name = STAGE_OUTPUTS[value]
    return run_dir / stage / name


def resolve(cfg: Config, run_dir: Path, key: str, value: str, kind: str) -> str:
    """The path a config value names. ``kind``: model, prompts, eval_prompts, demonstrations
    or pairs (which file of a built-in task)."""
    if value == "builtin:tiny":
        from rlhf_dist.tasks import tiny

        files = {"model": "policy", "prompts": "prompts.jsonl", "eval_prompts": "prompts.jsonl"}
        if kind not in files:
            raise ConfigError(f"{key}: builtin:tiny has no {kind}; try builtin:describe")
        return str(tiny.build_assets(Path(cfg.model.assets_dir) / "tiny") / files[kind])
    if value == "builtin:describe":
        from rlhf_dist.tasks import describe

        return str(
            describe.build_assets(Path(cfg.model.assets_dir) / "describe") / describe.FILES[kind]
        )
    if value == "builtin:arith":
        from rlhf_dist.tasks import arith

        if kind not in arith.FILES:
            raise ConfigError(
                f"{key}: builtin:arith has no {kind} (it is a verifiable task: its reward is "
                f"the rule rlhf_dist.tasks.arith:reward, not a reward model)"
            )
        return str(arith.build_assets(Path(cfg.model.assets_dir) / "arith") / arith.FILES[kind])
    if value == "builtin:calc":
        from rlhf_dist.tasks import calc

        if kind not in calc.FILES:
            raise ConfigError(
                f"{key}: builtin:calc has no {kind} (a multi-turn task: its environment is "
                f"rollout.env=builtin:calc, its reward reward.function=env)"
            )
        return str(calc.build_assets(Path(cfg.model.assets_dir) / "calc") / calc.FILES[kind])
    if value == "builtin:wordmath":
        from rlhf_dist.tasks import wordmath

        if kind not in wordmath.FILES:
            raise ConfigError(
                f"{key}: builtin:wordmath has no {kind} (its model is "
                f"builtin:smollm2-135m-instruct, its reward rlhf_dist.tasks.wordmath:reward)"
            )
        out = wordmath.build_assets(Path(cfg.model.assets_dir) / "wordmath")
        return str(out / wordmath.FILES[kind])
    if value == "builtin:smollm2-135m-instruct":
        from rlhf_dist.tasks import smollm2

        if kind != "model":
            raise ConfigError(f"{key}: {value} is a model, not {kind}")
        return str(smollm2.build_assets(Path(cfg.model.assets_dir) / smollm2.NAME, key))
    if value.startswith("builtin:"):
        raise ConfigError(
            f"{key}: unknown built-in {value!r} (builtin:tiny, builtin:describe, builtin:arith, "
            "builtin:calc, builtin:wordmath, builtin:smollm2-135m-instruct)"
        )
    if value in STAGE_OUTPUTS:
        return str(stage_output(run_dir, value))
    if value.startswith("run:"):
        raise ConfigError(f"{key}: unknown stage output {value!r} (run:sft, run:rm)")
    return value


def check_model(key: str, path: str) -> None:
    from transformers import AutoConfig

    # A hub id is "name" or "org/name"; anything else that is not on disk is a missing path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"{key}: model path {path!r} does not exist")
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/HF hub errors
        raise ConfigError(f"{key}: cannot load a model config from {path!r}: {e}") from None


def _model(cfg: Config, run_dir: Path, key: str, value: str, pending: set[str]) -> str:
    """Resolve and check a model source; an output a stage of this same run will produce
    (``pending``) is checked when that stage has run."""
    path = resolve(cfg, run_dir, key, value, "model")
    if value in STAGE_OUTPUTS and value not in pending and not Path(path).exists():
        stage = STAGE_OUTPUTS[value][0]
        raise ConfigError(
            f"{key}: {value} means the {stage} stage's output in the run directory, but "
            f"{path} does not exist: run run.stage={stage} (or all) with run.dir={run_dir} first"
        )
    if value not in pending:
        check_model(key, path)
    return path


def check_lora(cfg: Config, which: str, path: str) -> None:
    """The LoRA settings of ``which`` (policy, critic, sft, rm) fit the model at ``path``:
    every target module matches a layer, and peft can wrap the model class (checked on an
    empty model built from the config alone)."""
    from rlhf_dist import lora

    settings = lora.lora_settings(cfg, which)
    if settings is None:
        return
    kind = {"policy": "causal", "sft": "causal", "critic": "token_cls", "rm": "seq_cls"}[which]
    try:
        lora.check_wrappable(path, settings, kind)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def context_length(path: str) -> int | None:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _tokenizer(key: str, path: str):
    from rlhf_dist.models import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r}: {e}") from None


def _import_functions(key: str, value: str, weights: list[float] | None = None) -> list:
    """The reward functions ``value`` names (``reward.function`` may name several)."""
    from rlhf_dist.roles.scorers import load_reward_functions

    try:
        return load_reward_functions(value, weights)
    except ValueError as e:
        raise ConfigError(str(e).replace("reward.function", key, 1)) from None


def check_fields(key: str, functions: list, rows: PromptRows, file_key: str) -> None:
    """Every data field a function of ``key`` requires by name is a field of every row of
    ``rows`` (the file ``file_key`` names); the error names the key, the field and the file."""
    for f in functions:
        for name in f.use.required:
            if name not in rows.fields:
                have = ", ".join(rows.fields) or "none besides the prompt"
                raise ConfigError(
                    f"{key}: {f.spec} takes the data field {name!r}, but the rows of "
                    f"{file_key} ({rows.path}) have no field {name!r} (their other fields: "
                    f"{have})"
                )
            if name in rows.missing:
                raise ConfigError(
                    f"{key}: {f.spec} takes the data field {name!r}, but {file_key} "
                    f"{rows.path}:{rows.missing[name]} has no field {name!r}"
                )


# ----------------------------------------------------------------------------- per stage


@dataclass
class SupervisedInputs:
    init: str
    tokenizer: str
    records: list[dict]
    skipped: int


def supervised_inputs(
    cfg: Config, run_dir: Path, stage: str, pending: set[str] = frozenset()
) -> SupervisedInputs:
    """SFT (demonstrations) or reward-model (comparisons) inputs."""
    sec = getattr(cfg, stage)
    init = _model(cfg, run_dir, f"{stage}.init", sec.init, pending)
    if sec.init in pending:
        # the model a pending stage will export carries the tokenizer it started from
        tokenizer = resolve(cfg, run_dir, "sft.init", cfg.sft.init, "model")
    else:
        tokenizer = init
    tok_path = cfg.model.tokenizer or tokenizer
    tok = _tokenizer(f"{stage}.init", tok_path)
    check_lora(cfg, stage, tokenizer)  # a pending init has sft.init's architecture
    kind = "demonstrations" if stage == "sft" else "pairs"
    path = resolve(cfg, run_dir, f"{stage}.data", sec.data, kind)
    loader = load_demonstrations if stage == "sft" else load_preference_pairs
    wheres: list[str] = []
    try:
        records, skipped = loader(path, sec.skip_bad_lines, cfg.data.split, wheres)
    except DataError as e:
        raise ConfigError(str(e)) from None
    _check_chat_records(cfg, stage, tok, tok_path, records, wheres)
    if len(records) * (1 - sec.eval_frac) < sec.batch_size:
        raise ConfigError(
            f"{stage}.data: {len(records)} usable records in {path}, fewer than one "
            f"{stage}.batch_size={sec.batch_size} after holding out {stage}.eval_frac"
        )
    return SupervisedInputs(init, cfg.model.tokenizer or tokenizer, records, skipped)


def _check_chat_records(cfg: Config, stage: str, tok, tok_path: str, records, wheres) -> None:
    """SFT and RM records in chat form render with the stage's tokenizer: its template (when
    ``data.chat_template`` asks for it) exists and renders every record; the error names the
    row and the tokenizer."""
    mode = cfg.data.chat_template
    if reason := chat.template_missing(mode, tok, f"{stage}.init ({tok_path})"):
        raise ConfigError(reason)
    for r, where in zip(records, wheres):
        try:
            if stage == "sft":
                prompt, response = (
                    (r["messages"], None) if "messages" in r else (r["prompt"], r["response"])
                )
                is_chat, template = chat.record_template(mode, tok, prompt, response)
                chat.sft_tokens(tok, prompt, response, template, is_chat)
            else:
                for response in (r["chosen"], r["rejected"]):
                    chat.reward_input(tok, r["prompt"], response, mode)
        except Exception as e:  # the template's own error (jinja), or sft_segments'
            raise ConfigError(
                f"{where}: {stage}.data: cannot render this row with the tokenizer of "
                f"{stage}.init ({tok_path}): {e}"
            ) from None


@dataclass
class Prompts:
    """A prompt source checked and rendered for the policy."""

    rows: PromptRows
    texts: Sequence[str]
    messages: Sequence[list[dict]] | None
    template: bool

    def head(self, n: int) -> Prompts:
        """The first ``n`` rows."""

        def cut(seq):
            return None if seq is None else seq.head(n) if isinstance(seq, Mapped) else seq[:n]

        return Prompts(self.rows.head(n), cut(self.texts), cut(self.messages), self.template)


def _prompts(
    cfg: Config, key: str, path: str, tokenizer, tok_path: str, limit: int, split: str
) -> Prompts:
    """Load a prompt source and check every row before any actor starts: the field is a
    string or a valid message list, it renders with the policy's template, and it fits
    ``rollout.max_prompt_tokens`` after rendering. Errors name the source, row and field."""
    try:
        rows = load_prompt_rows(path, cfg.data.prompt_key, split, key)
    except DataError as e:
        raise ConfigError(str(e).replace("data.prompts", key, 1)) from None
    mode = cfg.data.chat_template
    if reason := chat.template_missing(mode, tokenizer, f"the policy ({tok_path})"):
        raise ConfigError(reason)
    is_chat = chat.chat_mode(mode, rows.any_messages)
    template = chat.uses_template(mode, tokenizer, rows.any_messages)

    def text(value) -> str:
        return chat.prompt_text(tokenizer, value, template, is_chat)

    field_name = rows.key
    i = 0
    for batch in rows.batches():
        texts = []
        for value in batch:
            if reason := chat.value_problem(value):
                raise ConfigError(f"{rows.where(i + len(texts))}: field {field_name!r} {reason}")
            try:
                texts.append(text(value))
            except Exception as e:  # the template's own error (jinja)
                raise ConfigError(
                    f"{rows.where(i + len(texts))}: field {field_name!r}: the chat template of "
                    f"{tok_path} cannot render it: {e}"
                ) from None
        encoded = tokenizer(texts, add_special_tokens=not template)["input_ids"]
        for j, ids in enumerate(encoded):
            if len(ids) > limit:
                after = " after the chat template" if template else ""
                raise ConfigError(
                    f"{rows.where(i + j)}: field {field_name!r}: prompt is {len(ids)} "
                    f"tokens{after}, longer than rollout.max_prompt_tokens={limit}"
                )
        i += len(batch)
    if rows.jsonl:  # held in memory already: render once
        texts = [text(p) for p in rows.prompts]
    else:  # read and rendered row by row as steps take them
        texts = Mapped(rows.prompts, text)
    messages = Mapped(rows.prompts, chat.as_messages) if is_chat else None
    return Prompts(rows, texts, messages, template)


def _check_reward_template(cfg: Config, reward_model: str, pending: set[str]) -> None:
    """With ``chat_template=true`` the reward model's tokenizer needs a template too."""
    if cfg.data.chat_template is not True or cfg.reward.model in pending:
        return
    tok = _tokenizer("reward.model", reward_model)
    if reason := chat.template_missing(True, tok, f"reward.model ({reward_model})"):
        raise ConfigError(reason)


def resolve_inputs(
    cfg: Config, run_dir: str | Path | None = None, pending: set[str] = frozenset()
) -> Inputs:
    """PPO inputs. ``pending``: stage outputs (``run:sft``...) this run produces before PPO."""
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.dir or ".")
    policy = _model(cfg, run_dir, "model.policy", cfg.model.policy, pending)
    critic = policy
    if cfg.model.critic:
        critic = _model(cfg, run_dir, "model.critic", cfg.model.critic, pending)
    reward_model, functions, gold = "", [], []
    if cfg.reward.model:
        reward_model = _model(cfg, run_dir, "reward.model", cfg.reward.model, pending)
    elif cfg.reward.function != ENV_REWARD:
        functions = _import_functions("reward.function", cfg.reward.function, cfg.reward.weights)
    if cfg.rollout.engine == "vllm" and not vllm_available():
        raise ConfigError(
            "rollout.engine=vllm: vllm is not installed in this environment (`make vllm` "
            "installs it; rollout.engine=auto or hf samples with transformers instead)"
        )
    if cfg.rollout.multi_turn:
        try:
            env_class(cfg.rollout.env, cfg.rollout.tools, cfg.rollout.env_timeout_s)
        except EnvError as e:
            raise ConfigError(str(e)) from None
    if cfg.eval.gold:
        gold = _import_functions("eval.gold", cfg.eval.gold)
        if len(gold) > 1:
            raise ConfigError(f"eval.gold: one 'module:function', got {cfg.eval.gold!r}")

    # A pending policy is the SFT export: same tokenizer and architecture as sft.init.
    known = (
        resolve(cfg, run_dir, "sft.init", cfg.sft.init, "model")
        if cfg.model.policy in pending
        else policy
    )
    tokenizer_path = cfg.model.tokenizer or policy
    check_lora(cfg, "policy", known)
    if estimator(cfg.ppo.estimator).needs_critic:
        check_lora(cfg, "critic", critic if cfg.model.critic not in pending else known)
    tokenizer = _tokenizer("model.tokenizer", cfg.model.tokenizer or known)
    limit = cfg.rollout.max_prompt_tokens
    ctx = context_length(known)
    after, key = cfg.rollout.max_new_tokens, "rollout.max_new_tokens"
    if cfg.rollout.multi_turn:  # a trajectory's turns and observations after its prompt
        after, key = cfg.rollout.max_total_tokens, "rollout.max_total_tokens"
    if ctx is not None and limit + after > ctx:
        raise ConfigError(
            f"rollout.max_prompt_tokens + {key} = {limit + after} exceeds the policy's context "
            f"of {ctx} tokens"
        )
    tok_shown = cfg.model.tokenizer or known
    if reward_model:
        _check_reward_template(cfg, reward_model, pending)
    prompt_file = resolve(cfg, run_dir, "data.prompts", cfg.data.prompts, "prompts")
    prompts = _prompts(
        cfg, "data.prompts", prompt_file, tokenizer, tok_shown, limit, cfg.data.split
    )
    rows = prompts.rows
    check_fields("reward.function", functions, rows, "data.prompts")
    eval_prompts = None
    if cfg.eval.gold:
        eval_prompts = _eval_prompts(cfg, run_dir, prompts, tokenizer, tok_shown, gold, functions)
    return Inputs(
        policy,
        tokenizer_path,
        critic,
        prompts.texts,
        tokenizer.pad_token_id,
        reward_model,
        eval_prompts.texts if eval_prompts else [],
        rows.fields,
        eval_prompts.rows.fields if eval_prompts else {},
        prompts.messages,
        eval_prompts.messages if eval_prompts else None,
        add_special_tokens=not prompts.template,
    )


def _eval_prompts(cfg: Config, run_dir: Path, prompts, tokenizer, tok_shown, gold, functions):
    """The held-out prompts (``eval.prompts``, or ``data.prompts``), checked as the training
    prompts are, with the fields the gold function and the reward functions take."""
    source, key = (
        (cfg.eval.prompts, "eval.prompts")
        if cfg.eval.prompts
        else (cfg.data.prompts, "data.prompts")
    )
    eval_file = resolve(cfg, run_dir, key, source, "eval_prompts")
    split = cfg.data.eval_split or cfg.data.split
    limit = cfg.rollout.max_prompt_tokens
    eval_prompts = _prompts(cfg, key, eval_file, tokenizer, tok_shown, limit, split)
    eval_prompts = eval_prompts.head(cfg.eval.num_prompts)
    check_fields("eval.gold", gold, eval_prompts.rows, key)
    # evaluation scores the held-out samples with the reward functions too (the proxy)
    check_fields("reward.function", functions, eval_prompts.rows, key)
    if eval_prompts.template != prompts.template:
        which = {True: "rendered with", False: "not rendered with"}
        raise ConfigError(
            f"{key}: its prompts are {which[eval_prompts.template]} the policy's chat "
            f"template, data.prompts' are {which[prompts.template]} it: the generators "
            f"read both the same way (give both message lists, or set data.chat_template)"
        )
    return eval_prompts


def check_all(cfg: Config, run_dir: Path, stages: list[str] | None = None) -> None:
    """Every check of every stage this run will go through, before anything starts."""
    pending: set[str] = set()
    for stage in stages if stages is not None else stages_of(cfg):
        if stage == "ppo":
            resolve_inputs(cfg, run_dir, pending)
        else:
            supervised_inputs(cfg, run_dir, stage, pending)
            pending.add(f"run:{stage}")
