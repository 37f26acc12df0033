"""Every config shipped in ``configs/`` is run by a test (shortened), or, when it needs GPUs,
validated by one (issue #21). A new config fails here until a test runs or validates it.

Where they are run (read from the tests themselves, so a test that stops running a config
makes it fail here too):

- ``tests/helpers/pinned_runs.py`` (``RUNS``, run by ``tests/integration/test_pinned_behaviour.py``
  through ``launch.train``, every metric of every row compared with the recorded values, the
  exported policy checked);
- the tests in ``RUNNERS`` name the config they run (``"configs/<name>"``): the recipe test runs
  ``default.yaml`` SFT -> RM -> PPO in a short form, the CLI test runs ``smoke.yaml``
  through ``launch.py``, the arith test runs ``arith.yaml`` SFT -> PPO, the multi-turn test
  ``calc.yaml``'s GRPO on its environment, the real-model test ``smollm2-grpo.yaml``.

GPU configs cannot run here: ``tests/test_cluster_files.py`` checks every ``gpu-*.yaml`` asks for
GPUs, bf16 and ZeRO and fits the clusters, and ``benchmarks/gpu_check.py`` (run on CPU by
``tests/test_gpu_check.py``) loads and validates the ones it names. Every config, whichever
kind, loads and validates in ``tests/test_config.py``.
"""

import fnmatch
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from pinned_runs import RUNS  # noqa: E402

CONFIGS = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml"))
RUNNERS = [
    "tests/integration/test_recipe_stages.py",
    "tests/integration/test_launch_cli.py",
    "tests/integration/test_arith_recipe.py",
    "tests/integration/test_multiturn.py",
    "tests/integration/test_real_model.py",
]
GPU_GLOB = "gpu-*.yaml"  # what tests/test_cluster_files.py checks as GPU configs
GPU_CHECK = "benchmarks/gpu_check.py"


def named_configs(path: str) -> set[str]:
    return set(re.findall(r"""["']configs/([\w.-]+\.ya?ml)["']""", (ROOT / path).read_text()))


def run_by_tests() -> dict[str, list[str]]:
    """config name -> the tests that run it."""
    out: dict[str, list[str]] = {}
    for config, _ in RUNS.values():
        out.setdefault(Path(config).name, []).append("test_pinned_behaviour.py")
    for test in RUNNERS:
        for name in named_configs(test):
            out.setdefault(name, []).append(Path(test).name)
    return out


def validated_for_gpus() -> set[str]:
    """GPU configs checked by test_cluster_files.py and by the GPU check."""
    return {n for n in named_configs(GPU_CHECK) if fnmatch.fnmatch(n, GPU_GLOB)}


def test_test_cluster_files_checks_the_gpu_glob():
    text = (ROOT / "tests" / "test_cluster_files.py").read_text()
    assert f'glob("{GPU_GLOB}")' in text


def test_every_shipped_config_is_run_or_validated_by_a_test():
    run, gpu = run_by_tests(), validated_for_gpus()
    neither = [n for n in CONFIGS if n not in run and n not in gpu]
    assert not neither, (
        f"configs {neither} are neither run by a test nor validated as GPU configs: run a "
        f"short form in a test (pinned_runs.RUNS, or a test in RUNNERS), or, for a GPU config, "
        f"name it {GPU_GLOB} and add it to {GPU_CHECK}"
    )
    # every GPU config is validated both ways, and no config named anywhere is missing
    gpu_named = {n for n in CONFIGS if fnmatch.fnmatch(n, GPU_GLOB)}
    assert gpu_named == gpu, f"GPU configs the GPU check does not load: {gpu_named ^ gpu}"
    assert set(run) | gpu <= set(CONFIGS), "a test names a config that is not in configs/"
