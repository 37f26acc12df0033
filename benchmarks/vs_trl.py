"""The same GRPO work through TRL's ``GRPOTrainer`` and through rlhf_dist (sync and async mode).

    .venv/bin/python benchmarks/vs_trl.py --shapes tiny --steps 50 --warmup 5 --repeats 5
    .venv/bin/python benchmarks/vs_trl.py --shapes 135m --steps 2 --warmup 1 --repeats 1

TRL is an optional benchmark dependency, not a dependency of the package. Install it with

    .venv/bin/pip install -c constraints.txt trl==1.16.0

trl 1.16.0 asks for no version the constraints pin otherwise (transformers >= 4.56.2,
accelerate >= 1.10.1, datasets >= 4.7.0); on the venv of the measurements below (transformers
5.24.0) ``pip install --dry-run`` listed trl alone, and the install left torch, transformers,
deepspeed, accelerate and datasets as they were. Without it this script stops with a message
naming that command.

Shapes (``--shapes``):

- ``tiny``: TRL's tiny GRPO shape of issue #29: a 0.42M-parameter GPT-2 policy on the tiny
  task's word vocabulary (``rlhf_dist.tasks.tiny``, 2 layers, width 128), a GPT-2 reward model
  (the policy's backbone with a fresh scalar head, as ``benchmarks/vs_pure.py`` builds it, read
  through TRL's own reward-model path: ``reward_funcs=[AutoModelForSequenceClassification]``),
  8 prompts x 2 samples, 16 new tokens, temperature 1, 1 epoch, 2 minibatches of 8, k3 KL loss
  0.05.
- ``135m``: SmolLM2-135M-Instruct (``rlhf_dist.tasks.smollm2.build_assets``) on
  ``builtin:wordmath``'s chat prompts, the rule reward ``rlhf_dist.tasks.wordmath:reward`` (the
  same Python function on both sides), 8 prompts x 4 samples, 32 new tokens, temperature 0.7,
  1 epoch, 2 minibatches of 16 in micro-batches of 8 (configs/smollm2-grpo.yaml's), KL loss
  0.02.

Every shape: learning rate 1e-5 (constant), AdamW (torch's fused kernel on both sides, betas
0.9/0.999, eps 1e-8, no weight decay), gradient clipping at norm 1, clip range 0.2, fp32 on CPU,
dropout off, seed 0.

The knobs, side by side (P prompts, G samples per prompt, M minibatches, u samples per
micro-batch):

    what                    rlhf_dist                               TRL 1.16 GRPOConfig
    model                   model.policy=<dir>, model.dtype=float32 model=<dir>, model_init_kwargs dtype float32,
                                                                    use_cpu, bf16=False, fp16=False
    prompts, their order    data.prompts=<file>, the run's seeded   the same rows in the order rlhf_dist's cursor
                            cursor (rlhf_dist.data.PromptCursor)    takes them, shuffle_dataset=False
    prompts per step        rollout.prompts_per_step=P              generation_batch_size = P*G (below)
    group size              rollout.samples_per_prompt=G            num_generations=G
    new tokens              rollout.max_new_tokens                  max_completion_length
    sampling                rollout.temperature, top_p=1, top_k=0   temperature, top_p=1.0, top_k=0
    epochs                  ppo.epochs=E                            num_iterations=E
    minibatches per step    ppo.minibatch_size=P*G/M                steps_per_generation=P*G/u,
                            ppo.micro_batch_size=u                  per_device_train_batch_size=u,
                                                                    gradient_accumulation_steps=(P*G/M)/u
                                                                    (M*E optimizer steps per generation)
    estimator               ppo.estimator=grpo,                     scale_rewards=group (std: Bessel, eps 1e-4),
                            ppo.grpo_std_eps=1e-4                   multi_objective_aggregation default
    loss aggregation        ppo.loss_agg=seq_mean_token_mean        loss_type=grpo (a micro-batch's sequence
                                                                    mean / accumulation steps = the minibatch's
                                                                    sequence mean: the exact match under
                                                                    accumulation; dapo/bnpo are not)
    clip                    ppo.clip_eps=0.2                        epsilon=0.2
    KL                      ppo.kl_coef=0 (none in the reward),     beta=kl (k3 in the loss, a reference model
                            ppo.kl_loss_coef=kl (k3 in the loss)    loaded from the same directory)
    learning rate           learner.lr, constant                    learning_rate, lr_scheduler_type=constant,
                                                                    warmup_steps=0
    optimizer               torch AdamW fused (learner)             optim=adamw_torch_fused
    weight decay, clipping  learner.weight_decay=0,                 weight_decay=0, max_grad_norm=1.0
                            learner.max_grad_norm=1.0
    dropout                 off (the learner runs the model in      disable_dropout=True
                            eval mode)
    generation engine       HF generate in the generator actors     use_vllm=False (HF generate in process),
                                                                    gradient_checkpointing=False
    reward                  reward.model=<rm dir> (tiny) /          reward_funcs=[the RM] (tiny) / [a wrapper
                            reward.function=wordmath:reward (135m)  calling wordmath.reward with each row's
                                                                    answer and the rendered prompt text] (135m)
    logging, checkpoints    checkpoint.every=0, wandb off, the      logging_strategy=no, save_strategy=no,
                            metrics file and sample ledger as by    report_to=none
                            default

The reward model's text is ``prompt + " " + response`` on both sides: rlhf_dist's
``models.reward_text``; TRL joins ``prompt + completion``, so its dataset gives each tiny prompt
with a trailing space (the word-level tokenizer splits on whitespace, so the policy sees the
same tokens). The script checks that both sides tokenize every prompt it uses to the same ids.

TRL 1.16 computes the old log-probs in a separate forward when a generation feeds more than
one optimizer step (steps_per_generation > gradient_accumulation_steps), as here, and so does
rlhf_dist's learner: both sides do the same forwards (generate, reference, old log-probs, M*E
minibatch updates).

Measurement. For each repeat (``--repeats``) the three sides run in turn, the first side of
the turn rotating from repeat to repeat: TRL (a fresh ``GRPOTrainer`` in this process, torch
threads = the machine's cores), rlhf_dist ``mode=sync`` and ``mode=async``
(``async.max_staleness=1``), each a fresh local run (a fresh ``Orchestrator`` on one local Ray
cluster that stays up; its actors are shut down before the next side starts) of ``--warmup`` +
``--steps`` steps from the same initial model and the same prompts. A side's samples/s is
``steps x P x G`` over the wall time of its last ``--steps`` steps (the driver's bookkeeping
between steps included); the ratio is rlhf_dist / TRL within the repeat, and the table gives the
median over the repeats. Layouts (``--sync-layout``, ``--async-layout``; config overrides):

- sync: ``rollout.num_workers=1 rollout.num_cpus=2``: one generator holding both cores (the
  layout docs/benchmarks.md measures fastest for sync mode on one machine); the learner rank
  trains on every core in sync mode (``pools.worker_threads``); one reward and one reference
  scorer with the defaults (0.25 CPU, one thread each).
- async: ``rollout.num_workers=1 rollout.num_cpus=1 learner.num_cpus=1``: a generator and the
  learner one core each (benchmarks/async_vs_sync.py's layout), the scorers as above.

Threads on a shared machine: ``OMP_WAIT_POLICY=PASSIVE`` is set for every side by default
(this process before torch loads, hence TRL; the Ray cluster it starts, hence every actor;
``--omp-wait-policy inherit`` leaves the shell's). libgomp's default lets a thread waiting at a
parallel region's barrier spin, and when the cores are oversubscribed (other jobs: 1-minute
load 10-30 on the 2-core machine) a two-thread torch process then crawls: HF ``generate`` of
the tiny policy, 16 prompts x 16 tokens, took 2.1-4.5 s on 2 threads against 0.05-0.12 s on
1 thread, and 0.04-0.14 s on 2 threads with ``PASSIVE`` (back-to-back runs). Without it every
two-thread side (TRL, the sync generator and learner) measures the machine's load, not the
code.

Also printed: each side's blocks (median seconds per step: generate, score, train, weight sync;
for TRL timed around ``_generate``, the reward calls and the reference forward, the rest of a
step being its training), and for rlhf_dist where its time beyond the actors' own compute goes,
block by block (the driver's block time minus the busiest actor's compute), plus the driver's
bookkeeping between steps (``Orchestrator.record``: the ledger, the pools' resource stats, the
metrics row) and ``perf/overhead_frac``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_dist import metric_keys as K  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TRL_VERSION = "1.16.0"
INSTALL = f".venv/bin/pip install -c constraints.txt trl=={TRL_VERSION}"
SIDES = ("trl", "sync", "async")
LAYOUTS = {
    "sync": "rollout.num_workers=1 rollout.num_cpus=2",
    "async": "rollout.num_workers=1 rollout.num_cpus=1 learner.num_cpus=1",
}
SHAPES = {
    "tiny": dict(
        prompts=8, group=2, new_tokens=16, temperature=1.0, epochs=1, minibatches=2,
        micro=8, kl=0.05, lr=1e-5, reward="model",
    ),
    "135m": dict(
        prompts=8, group=4, new_tokens=32, temperature=0.7, epochs=1, minibatches=2,
        micro=8, kl=0.02, lr=1e-5, reward="rlhf_dist.tasks.wordmath:reward",
    ),
}  # fmt: skip
TARGETS = {"135m": {"sync": 1.0, "async": 1.3}}  # issue #29: rlhf_dist / TRL samples/s
SEED = 0


def need_trl():
    try:
        import trl
    except ImportError:
        sys.exit(f"benchmarks/vs_trl.py needs TRL, an optional benchmark dependency: {INSTALL}")
    if trl.__version__ != TRL_VERSION:
        print(
            f"warning: trl {trl.__version__} installed; this benchmark maps the knobs of "
            f"trl {TRL_VERSION} ({INSTALL})",
            file=sys.stderr,
        )
    return trl


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {load()})", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- assets


def build_assets(name: str, workdir: Path) -> dict:
    """Policy directory, prompt file and reward (a model directory or a function spec)."""
    if name == "tiny":
        import torch

        from rlhf_dist.models import load_reward_model, load_tokenizer
        from rlhf_dist.tasks.tiny import build_assets as tiny_assets

        assets = tiny_assets(workdir / "tiny", n_layer=2, n_embd=128, n_head=2)
        rm = assets / "reward"
        if not rm.exists():
            torch.manual_seed(1)
            load_reward_model(str(assets / "policy"), new_head=True).save_pretrained(rm)
            load_tokenizer(str(assets / "policy")).save_pretrained(rm)
        return {
            "policy": str(assets / "policy"),
            "prompts": str(assets / "prompts.jsonl"),
            "reward_model": str(rm),
        }
    from rlhf_dist.tasks import smollm2, wordmath

    base = ROOT / "runs" / "_assets"  # where builtin:* puts them (model.assets_dir's default)
    policy = smollm2.build_assets(base / smollm2.NAME)
    data = wordmath.build_assets(base / "wordmath")
    return {"policy": str(policy), "prompts": str(data / wordmath.FILES["prompts"])}


def overrides(shape: dict, assets: dict, total_steps: int) -> list[str]:
    """The rlhf_dist config of the shape (both modes)."""
    samples = shape["prompts"] * shape["group"]
    reward = (
        [f"reward.model={assets['reward_model']}"]
        if shape["reward"] == "model"
        else [f"reward.function={shape['reward']}"]
    )
    return [
        f"model.policy={assets['policy']}",
        "model.dtype=float32",
        f"data.prompts={assets['prompts']}",
        *reward,
        f"run.seed={SEED}",
        f"run.steps={total_steps}",
        f"rollout.prompts_per_step={shape['prompts']}",
        f"rollout.samples_per_prompt={shape['group']}",
        f"rollout.max_new_tokens={shape['new_tokens']}",
        f"rollout.temperature={shape['temperature']}",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        "ppo.estimator=grpo",
        "ppo.grpo_std_eps=1e-4",
        "ppo.loss_agg=seq_mean_token_mean",
        "ppo.clip_eps=0.2",
        "ppo.kl_coef=0.0",
        f"ppo.kl_loss_coef={shape['kl']}",
        f"ppo.epochs={shape['epochs']}",
        f"ppo.minibatch_size={samples // shape['minibatches']}",
        f"ppo.micro_batch_size={shape['micro']}",
        "learner.num_workers=1",
        f"learner.lr={shape['lr']}",
        "learner.weight_decay=0.0",
        "learner.max_grad_norm=1.0",
        "checkpoint.every=0",
        "wandb.enabled=false",
        "ray.num_cpus=4",  # room for either layout on one local cluster (Ray's budget, not cores)
    ]


# ----------------------------------------------------------------------------- TRL


def trl_reward(spec: str):
    """A TRL reward function calling the rlhf_dist reward function ``spec`` as rlhf_dist calls it:
    the rendered prompt texts, the response texts, and the row fields it names."""
    import importlib

    module, name = spec.split(":")
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    wanted = [p for p in list(params)[2:] if params[p].kind is not inspect.Parameter.VAR_KEYWORD]

    def reward(prompts, completions, prompt_text, **fields):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return fn(list(prompt_text), texts, **{k: fields[k] for k in wanted})

    reward.__name__ = name
    return reward


class TRLSide:
    """A fresh ``GRPOTrainer`` per run, in this process, timed at each generation's last
    optimizer step."""

    def __init__(self, shape: dict, assets: dict, rows: list[dict], total_steps: int, out: Path):
        self.shape, self.assets, self.rows, self.total, self.out = (
            shape,
            assets,
            rows,
            total_steps,
            out,
        )
        s = shape
        samples = s["prompts"] * s["group"]
        self.minibatch = samples // s["minibatches"]
        self.opt_per_gen = s["minibatches"] * s["epochs"]

    def config(self):
        from trl import GRPOConfig

        s = self.shape
        samples = s["prompts"] * s["group"]
        return GRPOConfig(
            output_dir=str(self.out),
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=SEED,
            model_init_kwargs={"dtype": "float32"},
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused",
            per_device_train_batch_size=s["micro"],
            gradient_accumulation_steps=self.minibatch // s["micro"],
            steps_per_generation=samples // s["micro"],
            num_iterations=s["epochs"],
            num_generations=s["group"],
            max_completion_length=s["new_tokens"],
            temperature=s["temperature"],
            top_p=1.0,
            top_k=0,
            beta=s["kl"],
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            use_vllm=False,
            gradient_checkpointing=False,
            disable_dropout=True,
            shuffle_dataset=False,
            max_steps=self.total * self.opt_per_gen,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )

    def trainer(self):
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import GRPOTrainer

        s, a = self.shape, self.assets
        if s["reward"] == "model":
            rm = AutoModelForSequenceClassification.from_pretrained(a["reward_model"], num_labels=1)
            funcs, rm_toks = [rm.eval()], [AutoTokenizer.from_pretrained(a["reward_model"])]
        else:
            funcs, rm_toks = [trl_reward(s["reward"])], None
        stamps: list[float] = []
        opt_per_gen = self.opt_per_gen

        class Stamps(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                stamps.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % opt_per_gen == 0:
                    stamps.append(time.perf_counter())

        tr = GRPOTrainer(
            model=a["policy"],
            reward_funcs=funcs,
            args=self.config(),
            train_dataset=Dataset.from_list(self.rows),
            processing_class=AutoTokenizer.from_pretrained(a["policy"]),
            reward_processing_classes=rm_toks,
            callbacks=[Stamps()],
        )
        tr.remove_callback(PrinterCallback)  # the end-of-training summary on stdout
        return tr, stamps

    def run(self) -> dict:
        import torch
        from transformers import TrainerCallback

        torch.set_num_threads(os.cpu_count() or 1)
        tr, stamps = self.trainer()
        blocks = {"generate": 0.0, "score": 0.0, "old_logprobs": 0.0}
        per_step: list[dict] = []

        def timed(fn, pick):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    key = pick(*args, **kwargs)
                    if key:
                        blocks[key] += time.perf_counter() - t0

            return wrapper

        def logps_block(model, *args, **kwargs):
            if model is tr.ref_model:
                return "score"  # the reference forward: rlhf_dist's reference scorer
            return None if torch.is_grad_enabled() else "old_logprobs"

        tr._generate = timed(tr._generate, lambda *a, **k: "generate")
        tr._calculate_rewards = timed(tr._calculate_rewards, lambda *a, **k: "score")
        tr._get_per_token_logps_and_entropies = timed(
            tr._get_per_token_logps_and_entropies, logps_block
        )
        snap = [dict(blocks)]
        opt_per_gen = self.opt_per_gen

        class Blocks(TrainerCallback):
            """Each generation step's share of the timed blocks."""

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % opt_per_gen == 0:
                    now = dict(blocks)
                    per_step.append({k: now[k] - snap[-1][k] for k in now})
                    snap.append(now)

        tr.add_callback(Blocks())
        tr.train()
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        rows = []
        for t, b in zip(steps, per_step):
            rows.append(
                {
                    "generate": b["generate"],
                    "score": b["score"],
                    "train": t - b["generate"] - b["score"],
                    "step": t,
                }
            )
        return {"stamps": stamps, "rows": rows, "trainer": tr}


# ----------------------------------------------------------------------------- rlhf_dist


class SystemSide:
    """A fresh run of rlhf_dist on the local Ray cluster, stepped to the end."""

    def __init__(self, mode: str, base: list[str], layout: str, extra: list[str], workdir: Path):
        self.mode, self.base, self.layout, self.extra, self.workdir = (
            mode,
            base,
            layout,
            extra,
            workdir,
        )
        self.runs = 0

    def config(self, run_dir: Path):
        from rlhf_dist.config import load_config

        mode = [f"mode={self.mode}"]
        if self.mode == "async":
            mode.append("async.max_staleness=1")
        return load_config(
            None, [*self.base, *mode, *self.layout.split(), *self.extra, f"run.dir={run_dir}"]
        )

    def run(self) -> dict:
        from rlhf_dist.launch import init_ray
        from rlhf_dist.orchestrator import Orchestrator
        from rlhf_dist.preflight import resolve_inputs

        self.runs += 1
        run_dir = self.workdir / f"{self.mode}-{self.runs}"
        cfg = self.config(run_dir)
        init_ray(cfg, "")  # the first side starts the local cluster; later ones find it
        orch = Orchestrator(cfg, resolve_inputs(cfg), run_dir)
        # each step scores its batch once and pushes its weights once, in step order (also in
        # async mode, where step b+1 is scored while step b trains): the k-th call is step k's
        calls: dict[str, list[float]] = {"score": [], "weight_sync": []}
        score, push = orch.scorers.score, orch.generators.push

        def timed_score(batch):
            calls["score"].append(score(batch))
            return calls["score"][-1]

        def timed_push(version):
            calls["weight_sync"].append(push(version))
            return calls["weight_sync"][-1]

        orch.scorers.score, orch.generators.push = timed_score, timed_push
        rows, stamps, extra = [], [], []
        try:
            stamps.append(time.perf_counter())
            for out in orch.loop.steps():
                t0 = time.perf_counter()
                row = orch.record(out)
                stamps.append(time.perf_counter())
                rows.append(row)
                extra.append(
                    {
                        "record": stamps[-1] - t0,
                        "gen_compute": out.batch.compute_s,
                        "train_compute": out.train.compute_s,
                    }
                )
        finally:
            orch.shutdown()
        for k, ex in enumerate(extra):
            ex["score_compute"] = calls["score"][k]
            ex["sync_compute"] = calls["weight_sync"][k]
        return {"stamps": stamps, "rows": rows, "extra": extra}


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------- one shape


def prompt_rows(shape: dict, assets: dict, base: list[str], total: int):
    """The rows TRL trains on, in the order rlhf_dist's cursor takes them; and the inputs."""
    from rlhf_dist.config import load_config
    from rlhf_dist.data import PromptCursor
    from rlhf_dist.preflight import resolve_inputs

    cfg = load_config(None, [*base, "run.dir=" + tempfile.gettempdir()])
    inputs = resolve_inputs(cfg)
    cursor = PromptCursor(len(inputs.prompts), cfg.run.seed, cfg.data.shuffle)
    ids = [i for _ in range(total) for i in cursor.take(shape["prompts"])]
    rows = []
    for i in ids:
        text = inputs.prompts[i]
        if inputs.prompt_messages is not None:
            row = {"prompt": inputs.prompt_messages[i], "prompt_text": text}
        else:  # TRL's reward-model text is prompt + completion; rlhf_dist's prompt + " " + response
            row = {"prompt": text + " ", "prompt_text": text}
        for k, v in inputs.prompt_fields.items():
            row[k] = v[i]
        rows.append(row)
    return rows, inputs


def check_prompts(trainer, rows: list[dict], inputs) -> int:
    """Prompts whose token ids differ between the two sides (0 expected)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inputs.tokenizer)
    ours = [
        tok(r["prompt_text"], add_special_tokens=inputs.add_special_tokens)["input_ids"]
        for r in rows
    ]
    theirs = trainer._tokenize_prompts([r["prompt"] for r in rows])[0]
    return sum(list(a) != list(b) for a, b in zip(ours, theirs))


def run_shape(name: str, args, extra: list[str], workdir: Path) -> dict:
    shape = SHAPES[name]
    total = args.warmup + args.steps
    assets = build_assets(name, workdir)
    base = overrides(shape, assets, total)
    rows, inputs = prompt_rows(shape, assets, base, total)
    sides = {
        "trl": TRLSide(shape, assets, rows, total, workdir / f"trl-{name}"),
        "sync": SystemSide("sync", base, args.sync_layout, extra, workdir / name),
        "async": SystemSide("async", base, args.async_layout, extra, workdir / name),
    }
    results: dict[str, list] = {s: [] for s in SIDES}
    loads = []
    mismatched = None
    for k in range(args.repeats):
        order = SIDES[k % 3 :] + SIDES[: k % 3]  # the first side rotates
        for side in order:
            log(f"{name}: repeat {k + 1}/{args.repeats}, {side}")
            loads.append(os.getloadavg()[0])
            out = sides[side].run()
            if side == "trl":
                if mismatched is None:
                    mismatched = check_prompts(out["trainer"], rows, inputs)
                del out["trainer"]
            results[side].append(out)
            gc.collect()
            loads.append(os.getloadavg()[0])
    samples = shape["prompts"] * shape["group"]
    return {
        "shape": shape,
        "results": results,
        "samples": samples,
        "loads": loads,
        "mismatched": mismatched,
        "params": params_of(assets["policy"]),
    }


def params_of(path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- tables


def rate(out: dict, warmup: int, steps: int, samples: int) -> float:
    t = out["stamps"]
    return steps * samples / (t[warmup + steps] - t[warmup])


def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, nd: int = 3) -> str:
    return "-" if x != x else f"{x:.{nd}f}"


def overhead_cells(name: str, side: str, pairs: list[tuple[dict, dict]]) -> list[str]:
    """One row of the overhead table: block time minus compute, in ms (medians)."""

    def ms(values) -> str:
        return fmt(1000 * med(values), 1)

    def gap(key: str, compute: str) -> str:
        return ms(row[key] - ex[compute] for row, ex in pairs if key in row)

    # sync: the blocks run one after the other; async: scoring and generation run beside
    # training, so a step is not the sum of its computes
    rest = [
        row[K.STEP_TIME]
        - ex["gen_compute"]
        - ex["score_compute"]
        - ex["train_compute"]
        - ex["sync_compute"]
        for row, ex in pairs
        if side == "sync"
    ]
    return [
        name,
        side,
        gap(K.TIME_GENERATE, "gen_compute"),
        gap(K.TIME_SCORE, "score_compute"),
        gap(K.TIME_TRAIN, "train_compute"),
        gap(K.TIME_WEIGHT_SYNC, "sync_compute"),
        ms(ex["record"] for _, ex in pairs),
        ms(rest),
        fmt(med(row.get(K.OVERHEAD_FRAC) for row, _ in pairs), 3),
    ]


def tables(all_results: dict, args) -> str:
    W, N = args.warmup, args.steps
    out = []
    head = ["shape", "params", "side", "layout", "samples/s", "per repeat", "vs TRL", "s/step"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for name, r in all_results.items():
        rates = {s: [rate(o, W, N, r["samples"]) for o in r["results"][s]] for s in SIDES}
        for side in SIDES:
            ratios = [a / b for a, b in zip(rates[side], rates["trl"])]
            layout = {
                "trl": f"1 process, {os.cpu_count()} threads",
                "sync": args.sync_layout,
                "async": args.async_layout + " async.max_staleness=1",
            }[side]
            vs = "1.00x" if side == "trl" else f"{med(ratios):.2f}x"
            cells = [
                name,
                f"{r['params'] / 1e6:.2f}M",
                side if side == "trl" else f"rlhf_dist {side}",
                layout,
                f"{med(rates[side]):.1f}",
                ", ".join(f"{x:.1f}" for x in rates[side]),
                vs,
                f"{r['samples'] / med(rates[side]):.3f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
            if side != "trl" and name in TARGETS:
                goal = TARGETS[name][side]
                ok = "met" if med(ratios) >= goal else "missed"
                verdicts.append(f"{name} {side} {med(ratios):.2f}x (target >= {goal}x: {ok})")
    out.append("")
    for name, r in all_results.items():
        s = r["shape"]
        loads = r["loads"]
        out.append(
            f"{name}: {s['prompts']} prompts x {s['group']} samples, {s['new_tokens']} new "
            f"tokens, {s['epochs']} epoch(s), {s['minibatches']} minibatches, KL loss {s['kl']}; "
            f"median of {args.repeats} repeat(s) of {N} steps after {W} warm-up; 1-min load "
            f"during the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; "
            f"prompts tokenized differently by the two sides: {r['mismatched']}"
        )
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins)")
    out.append(f"OMP_WAIT_POLICY on every side: {policy}")
    if verdicts:
        out.append("ratios (rlhf_dist / TRL): " + "; ".join(verdicts))

    # blocks per side
    out += ["", "Blocks, median seconds per step (the measured steps of every repeat):", ""]
    head = ["shape", "side", "generate", "score", "train", "weight_sync", "step", "wall/step"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in all_results.items():
        for side in SIDES:
            runs = r["results"][side]
            if side == "trl":
                rows = [x for o in runs for x in o["rows"][W : W + N]]
                g, sc, tr, st = (
                    med(x[k] for x in rows) for k in ("generate", "score", "train", "step")
                )
                ws = float("nan")
            else:
                rows = [x for o in runs for x in o["rows"][W : W + N]]
                g, sc, tr, ws, st = (
                    med(x.get(k) for x in rows)
                    for k in (
                        K.TIME_GENERATE,
                        K.TIME_SCORE,
                        K.TIME_TRAIN,
                        K.TIME_WEIGHT_SYNC,
                        K.STEP_TIME,
                    )
                )
            walls = [(o["stamps"][i + 1] - o["stamps"][i]) for o in runs for i in range(W, W + N)]
            label = side if side == "trl" else f"rlhf_dist {side}"
            cells = [name, label] + [fmt(x) for x in (g, sc, tr, ws, st, med(walls))]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "TRL's blocks: generate = `_generate` (tokenize, HF generate, decode); score = the reward"
        " calls and the reference forward; train = the rest of the step (old log-probs,"
        " minibatch forward/backward, optimizer). rlhf_dist async: generation overlaps training"
        " (no generate block); its train block is the learner's update as the driver waits for it.",
    ]

    # where rlhf_dist's time beyond the actors' compute goes
    out += [
        "",
        "rlhf_dist: driver block time minus the busiest actor's compute, median ms per step:",
        "",
    ]
    head = [
        "shape", "mode", "generate", "score", "train", "weight_sync", "between steps (record)",
        "step - compute", "overhead_frac",
    ]  # fmt: skip
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in all_results.items():
        for side in ("sync", "async"):
            pairs = [
                (row, ex)
                for o in r["results"][side]
                for row, ex in list(zip(o["rows"], o["extra"]))[W : W + N]
            ]
            out.append("| " + " | ".join(overhead_cells(name, side, pairs)) + " |")
    out += [
        "",
        "compute: the generators' (busiest generator), the scorers' (busiest of each block), the"
        " learner's (`UpdateResult.compute_s`) and the weight push's own seconds; the rest of a"
        " block is Ray calls, (de)serialisation and the driver. `between steps`: the driver's"
        " `Orchestrator.record` (ledger, pools' resource stats, metrics row), outside the step"
        " time but inside the wall time. async: the next batch is generated and scored while the"
        " learner trains, so a step is not the sum of its blocks (no step - compute).",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--shapes",
        default="tiny",
        help=f"comma list of {list(SHAPES)} (135m: about a minute per step per side)",
    )
    ap.add_argument("--steps", type=int, default=50, help="measured steps per side and repeat")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps before them (dropped)")
    ap.add_argument("--repeats", type=int, default=5, help="turns of TRL / sync / async")
    ap.add_argument("--sync-layout", default=LAYOUTS["sync"], help="overrides of the sync side")
    ap.add_argument("--async-layout", default=LAYOUTS["async"], help="overrides of the async side")
    ap.add_argument(
        "--omp-wait-policy",
        choices=["passive", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY for every side (this process, the Ray cluster it starts and its\n"
        "actors): passive (default) or inherit this shell's",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides for both rlhf_dist sides")
    args = ap.parse_args()
    if args.omp_wait_policy == "passive":  # before torch loads libgomp, and before Ray starts
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    need_trl()
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1, --warmup >= 0")
    names = args.shapes.split(",")
    for n in names:
        if n not in SHAPES:
            ap.error(f"unknown shape {n!r}: expected {list(SHAPES)}")
    log(f"start: {' '.join(sys.argv)}")
    results = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            for name in names:
                results[name] = run_shape(name, args, args.overrides, Path(d))
                log(f"done {name}")
    finally:
        shutdown_ray()
    print("`.venv/bin/python " + " ".join(["benchmarks/vs_trl.py", *sys.argv[1:]]) + "`\n")
    print(tables(results, args))


if __name__ == "__main__":
    main()
