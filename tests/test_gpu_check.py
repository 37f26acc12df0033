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
    assert {n for n, s in status.items() if s == "PASS"} == EXPECTED
    assert {n for n, s in status.items() if s == "SKIP"} == CUDA_ONLY
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
    ):
        assert re.search(rf"^\| {re.escape(role)} \|", out, re.MULTILINE), role
    assert re.search(r"tokens/s \|", out) and re.search(r"B/s \|", out)
