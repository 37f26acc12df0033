"""benchmarks/gpu_check.py --device cpu: the GPU readiness check's code runs on every test run,
so it has not rotted when a GPU slot comes (the same checks, a tiny model, gloo)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Checks that need CUDA and say SKIP on a CPU.
CUDA_ONLY = {"nccl_send_zero2", "nccl_send_zero3"}
EXPECTED = {
    "model",
    "config_gpu-1node-8gpu",
    "config_gpu-2node",
    "config_gpu-1gpu-smollm2-grpo",
    "generate",
    "reward",
    "reference",
    "learner_zero2",
    "sync_zero2",
    "checkpoint_zero2",
    "export_zero2",
    "learner_zero3",
    "sync_zero3",
    "checkpoint_zero3",
    "export_zero3",
    "system_stats",
    "sync_two_processes",
}
# LoRA (rank 8, real peft): adapter-only training at ZeRO-2 and ZeRO-3, the adapters' sync, the
# LoRA generator, reference.from_base, both exports.
LORA = {
    "lora_generate",
    "lora_learner_zero2",
    "lora_sync_zero2",
    "lora_export_zero2",
    "lora_learner_zero3",
    "lora_sync_zero3",
    "lora_export_zero3",
    "lora_reference",
}

# vLLM (rollout.engine=vllm): in-process engines on the GPU; on a CPU they SKIP, saying why (vllm
# not installed, or no CUDA).
VLLM = {"vllm_generate", "vllm_sync", "vllm_lora", "vllm_logprobs_bf16"}


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--budget-s", "150"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    lines = re.findall(r"^(PASS|FAIL|SKIP) (\S+?):?(?: |$)", out, re.MULTILINE)
    status = dict((name, s) for s, name in lines)
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not failed, "\n".join(failed) + "\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {n for n, s in status.items() if s == "PASS"} == EXPECTED | LORA
    assert {n for n, s in status.items() if s == "SKIP"} == CUDA_ONLY | VLLM
    for name in VLLM:
        reason = re.search(rf"^SKIP {name}: (.*)$", out, re.MULTILINE).group(1)
        assert reason == "vllm is not installed" or reason.startswith("needs CUDA"), reason
    # the table: one row per timed role, each with seconds and a rate
    assert "| role | what was timed | seconds | rate | peak memory GiB |" in out
    for role in (
        "generator",
        "reward scorer",
        "reference scorer",
        "learner ZeRO-2",
        "weight sync ZeRO-2",
        "learner ZeRO-3",
        "weight sync ZeRO-3",
        "weight sync, 2 processes",
        "LoRA generator",
        "LoRA learner ZeRO-2",
        "LoRA weight sync ZeRO-2",
        "LoRA learner ZeRO-3",
        "LoRA weight sync ZeRO-3",
    ):
        assert re.search(rf"^\| {re.escape(role)} \|", out, re.MULTILINE), role
    assert re.search(r"tokens/s \|", out) and re.search(r"B/s \|", out)
    # the LoRA sync moves the adapters only: a fraction of the full model's bytes (15% at rank 8
    # on the tiny shape, 64 wide; under 1% on the 0.5B one)
    sync = re.findall(
        r"^\| LoRA weight sync ZeRO-\d \|.* of adapters vs .* full \(([\d.]+)%\)", out, re.M
    )
    assert len(sync) == 2 and all(0 < float(pct) < 20 for pct in sync), sync


def test_lora_checks_skip_with_the_reason_when_peft_is_missing(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_check.peft_unavailable() == ""  # this venv has peft
    monkeypatch.setitem(sys.modules, "peft", None)  # as on a machine without it
    reason = gpu_check.peft_unavailable()
    assert reason.startswith("peft not importable (ModuleNotFoundError") and "gpu_bundle" in reason


def test_vllm_checks_skip_with_the_reason_when_vllm_is_missing(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on the GPU image, which lacks it
    assert gpu_check.vllm_unavailable(cuda=True) == "vllm is not installed"
