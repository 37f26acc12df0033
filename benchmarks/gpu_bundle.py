"""Build ``gpu_bundle/``: what the GPU machine needs beyond its own torch and transformers.

The GPU machine (Python 3.12, x86_64) has torch, transformers, numpy, psutil, py-cpuinfo,
msgpack, ninja, einops, xxhash, pyyaml, tqdm and safetensors, but not deepspeed, peft,
accelerate, ray or wandb,
reaches no package index, and receives at most 64 MiB of files with the working tree. This
script, run here, fills one folder (git-ignored) with wheels:

- deepspeed, built here as a pure-Python wheel (``DS_BUILD_OPS=0``, ``pip wheel --no-deps
  --no-build-isolation`` against this venv's torch; ops it needs are JIT-built there, and the
  roles need none: torch's AdamW, no fused kernels);
- the dependencies of deepspeed the machine lacks: hjson, pydantic, pydantic-core (the cp312
  manylinux x86_64 wheel), annotated-types, typing-inspection, typing-extensions (a newer one
  than the image may have, for pydantic);
- peft and accelerate (pure-Python wheels) for the LoRA checks: what peft requires besides
  accelerate (huggingface_hub, packaging, numpy, psutil, pyyaml, safetensors, tqdm) comes with
  transformers or is in the image;
- with ``--with-ray``: Ray's cp312 manylinux wheel stripped of what a job on one machine does
  not use (the Java jars, the dashboard's web client, RLlib, Data, Serve, Tune, Train, the LLM
  libraries, AIR, debug symbols of its binaries) and recompressed (deflate level 9), plus the
  dependency the machine lacks (jsonschema and its three dependencies).

The versions are this venv's (``constraints.txt`` for deepspeed and ray), so the code that
ran here runs there. Binary wheels are downloaded for cp312 / manylinux x86_64 whatever this
machine's Python is.

    .venv/bin/python benchmarks/gpu_bundle.py              # deepspeed and its dependencies
    .venv/bin/python benchmarks/gpu_bundle.py --with-ray   # and a stripped Ray

On the GPU machine, from the repository root with ``gpu_bundle`` carried beside the tree:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu_bundle/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py

Measured here (2026-12-02, deepspeed 0.19.8, peft 0.21.2, accelerate 1.15.0, ray 2.60.0), in
MiB (2^20 bytes): deepspeed and its dependencies 4.8, peft and accelerate 1.2 (0.80 + 0.38),
6.0 in all; with Ray 37.7 (Ray's wheel 75.6 as published, 31.2 stripped; jsonschema and its
dependencies 0.5). With the working tree (1.1) that is 7.1 without Ray and 38.8 with it: both
fit the 64 MiB that travels with a command, with Ray 25.2 MiB to spare. The stripped
Ray was run with Python 3.12 here (``pip install --target``, then ``ray.init``, an actor in a
placement group, an object through the object store, ``ray.shutdown``); it has not yet run on
the GPU machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# What deepspeed requires and the GPU image lacks (its other requirements are there).
DEEPSPEED_DEPS = [
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
]
# LoRA (rlhf_dist/lora.py): peft and what it requires that the GPU image lacks (its other
# requirements, huggingface_hub among them, come with transformers or are there). Pure Python.
PEFT_DEPS = ["peft", "accelerate"]
# What ray (core) requires and the GPU image lacks.
RAY_DEPS = ["jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
# Parts of Ray a job on one machine does not use.
RAY_STRIP = [
    "ray/jars",  # Java workers
    "ray/dashboard/client",  # the dashboard's web UI (the dashboard agent's Python stays)
    "ray/rllib",
    "ray/data",
    "ray/serve",
    "ray/tune",
    "ray/train",
    "ray/llm",
    "ray/air",
    "ray/workflow",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def pinned(name: str) -> str:
    """``name==version`` from constraints.txt, else the version installed in this venv."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    return f"{name}=={importlib.metadata.version(name)}"


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def download(specs: list[str], dest: Path, python_version: str) -> None:
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    pip(
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *plats,
        "-d",
        str(dest),
        *specs,
    )


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def strip_ray(wheel: Path, out: Path) -> None:
    """Ray's wheel without ``RAY_STRIP``, its ELF files stripped of symbols, RECORD rewritten,
    recompressed at deflate level 9."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tree)  # (extractall drops the modes: kept from the infos below)
            modes = {i.filename: i.external_attr for i in z.infolist()}
        for part in RAY_STRIP:
            shutil.rmtree(tree / part, ignore_errors=True)
        for f in tree.rglob("*.map"):
            f.unlink()
        strip = shutil.which("strip")
        for f in tree.rglob("*"):
            if strip and f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    elf = fh.read(4) == b"\x7fELF"
                if elf:
                    subprocess.run([strip, "--strip-unneeded", str(f)], check=True)
        (record,) = tree.glob("*.dist-info/RECORD")
        files = sorted(p for p in tree.rglob("*") if p.is_file() and p != record)
        lines = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for f in files:
                rel = f.relative_to(tree).as_posix()
                data = f.read_bytes()
                info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = modes[rel]  # gcs_server and raylet are executables
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, data, compresslevel=9)
                lines.append(_record_line(rel, data))
            rel = record.relative_to(tree).as_posix()
            z.writestr(rel, "\n".join([*lines, f"{rel},,"]) + "\n", compresslevel=9)


def tree_size() -> int:
    """Bytes of the working tree that travels with a command (tracked and untracked files that
    git does not ignore)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if (ROOT / p).is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "gpu_bundle"), help="the folder to fill")
    ap.add_argument("--with-ray", action="store_true", help="add a stripped Ray")
    ap.add_argument("--python-version", default="3.12", help="of the GPU machine")
    ap.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "rlhf_dist_gpu_bundle_cache"),
        help="where Ray's published wheel is kept between builds (about 80 MB)",
    )
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # deepspeed: a pure-Python wheel against this venv's torch, no compiled ops.
    env = dict(os.environ, DS_BUILD_OPS="0")
    pip(
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-cache-dir",
        "-w",
        str(out),
        pinned("deepspeed"),
        env=env,
    )
    download([pinned(n) for n in DEEPSPEED_DEPS], out, args.python_version)
    base = sum(f.stat().st_size for f in out.iterdir())
    download([pinned(n) for n in PEFT_DEPS], out, args.python_version)
    peft_size = sum(f.stat().st_size for f in out.iterdir()) - base

    ray_sizes = None
    if args.with_ray:
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        spec = pinned("ray")
        tag = f"cp{args.python_version.replace('.', '')}"
        wheels = [w for w in cache.glob(f"ray-{spec.split('==')[1]}-{tag}-*.whl")]
        if not wheels:
            download([spec], cache, args.python_version)
            wheels = list(cache.glob(f"ray-{spec.split('==')[1]}-{tag}-*.whl"))
        published = wheels[0]
        stripped = out / published.name
        print(f"stripping {published.name} ...", flush=True)
        strip_ray(published, stripped)
        before_deps = sum(f.stat().st_size for f in out.iterdir())
        download([pinned(n) for n in RAY_DEPS], out, args.python_version)
        deps = sum(f.stat().st_size for f in out.iterdir()) - before_deps
        ray_sizes = (published.stat().st_size, stripped.stat().st_size, deps)

    total = sum(f.stat().st_size for f in out.iterdir())
    tree = tree_size()
    print()
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size / MIB:8.2f} MiB  {f.name}")
    print(f"\ndeepspeed and its dependencies: {base / MIB:.1f} MiB")
    print(f"peft and accelerate: {peft_size / MIB:.1f} MiB")
    if ray_sizes:
        pub, strp, deps = ray_sizes
        print(
            f"ray: {pub / MIB:.1f} MiB published, {strp / MIB:.1f} MiB stripped; "
            f"its missing dependencies {deps / MIB:.1f} MiB"
        )
    print(f"{out}: {total / MIB:.1f} MiB; working tree {tree / MIB:.1f} MiB; together ", end="")
    left = 64 * MIB - total - tree
    print(
        f"{(total + tree) / MIB:.1f} of 64 MiB ({'fits' if left >= 0 else 'over'}: "
        f"{abs(left) / MIB:.1f} MiB {'to spare' if left >= 0 else 'too many'})"
    )
    print(
        "\nOn the GPU machine:\n  python3 -m pip install -q --no-index --no-deps --no-compile "
        f"--target /tmp/site {out.name}/*.whl && PYTHONPATH=/tmp/site python3 "
        "benchmarks/gpu_check.py"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
