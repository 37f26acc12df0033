"""Entry point: ``python launch.py [--config X.yaml] [--address ADDR | --submit URL [--no-wait]]
[--resume RUN_DIR] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from rlhf_dist import metric_keys as K
from rlhf_dist import ray_env
from rlhf_dist.config import Config, ConfigError, load_config
from rlhf_dist.submit import add_arguments as add_submit_arguments
from rlhf_dist.submit import check_args as check_submit_args
from rlhf_dist.submit import submit

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def run_dir_for(cfg: Config) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def init_ray(cfg: Config, address: str) -> bool:
    """Join ``address`` (``auto``: the cluster of this machine, or of the Ray job) or start a
    local cluster of our own; returns whether we started it."""
    import ray

    from rlhf_dist.pools import total_cpus

    if ray.is_initialized():
        return False
    env = ray_env.worker_runtime_env(cfg.mode)
    if address:
        ray.init(address=address, runtime_env=env)
        return False
    # A laptop cluster gets at least the CPUs the pools ask for: Ray's CPU count is a
    # scheduling budget, and the roles of a small job happily share cores.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(total_cpus(cfg)))
    # "local": a new instance of our own, whatever else runs here. Without it ray.init joins
    # the cluster Ray's "current cluster" file names (one started with `ray start` on this
    # machine, or a stale file a killed one left) and refuses num_cpus. Joining is --address.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=cfg.ray.object_store_mb << 20,
        include_dashboard=False,
        runtime_env=env,
    )
    return True


def stages_to_run(cfg: Config, run_dir: Path) -> list[str]:
    """The stages ``run.stage`` names; when resuming, those whose output already exists are
    done (their models were exported atomically at their very end)."""
    from rlhf_dist.preflight import stage_output, stages_of

    stages = stages_of(cfg)
    if cfg.run.resume == "auto" and len(stages) > 1:
        stages = [s for s in stages if s == "ppo" or not stage_output(run_dir, f"run:{s}").exists()]
    return stages


def train(cfg: Config, address: str = "", log=print) -> Path:
    """Run the stages ``run.stage`` names (sft, rm, ppo or all); returns the run directory."""
    import ray

    from rlhf_dist.checkpoint import resume_layout
    from rlhf_dist.config import dump_config
    from rlhf_dist.orchestrator import Orchestrator
    from rlhf_dist.preflight import check_all, resolve_inputs, supervised_inputs
    from rlhf_dist.stages import run_supervised_stage
    from rlhf_dist.tracking import Tracker

    run_dir = run_dir_for(cfg)
    stages = stages_to_run(cfg, run_dir)
    if cfg.run.resume == "auto" and "ppo" in stages:
        cfg = resume_layout(cfg, run_dir)  # the checkpoints' ZeRO stage, or a clear refusal
    check_all(cfg, run_dir, stages)  # bad input fails here, before any actor starts
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    log(f"run directory: {run_dir}")
    started = init_ray(cfg, address or cfg.ray.address)
    tracker = Tracker(cfg, run_dir)
    results: dict = {}
    try:
        for stage in stages:
            if stage == "ppo":
                orch = Orchestrator(cfg, resolve_inputs(cfg, run_dir), run_dir, tracker)
                try:
                    if cfg.run.resume == "auto":
                        orch.restore(log=log)
                    results["ppo"] = orch.run(log=log)
                    log(f"final policy: {orch.export_policy(run_dir / 'ppo' / 'policy')}")
                finally:
                    orch.shutdown()
            else:
                inputs = supervised_inputs(cfg, run_dir, stage)
                results[stage] = run_supervised_stage(cfg, stage, inputs, run_dir, tracker, log)
    finally:
        tracker.close()
        if started:
            ray.shutdown()
    for line in summarise(results, cfg):
        log(line)
    _write_report(run_dir, log)
    return run_dir


def summarise(results: dict, cfg: Config) -> list[str]:
    """The few numbers that say whether the recipe worked; the RL stage is named by the
    algorithm ``ppo.estimator`` makes of it (GRPO, not "PPO", for ``grpo``)."""
    from rlhf_dist.algo import estimator

    algo = estimator(cfg.ppo.estimator).title
    lines = []
    if "sft" in results:
        loss = results["sft"].get(K.SFT_EVAL_LOSS, float("nan"))
        lines.append(f"SFT: held-out loss {loss:.3f}")
    if "rm" in results:
        acc = results["rm"].get(K.RM_EVAL_ACCURACY, float("nan"))
        lines.append(f"reward model: held-out pairwise accuracy {acc:.3f}")
    evals = [r for r in results.get("ppo", []) if K.GOLD in r]
    if len(evals) >= 2:
        a, b = evals[0], evals[-1]
        lines.append(
            f"gold score on held-out prompts: {a[K.GOLD]:.3f} +- {a[K.GOLD_STDERR]:.3f} "
            f"(before {algo}) -> {b[K.GOLD]:.3f} +- {b[K.GOLD_STDERR]:.3f} (after {b['step']} steps)"
        )
    steps = [r for r in results.get("ppo", []) if K.KL in r]
    if steps:
        last = steps[-1]
        lines.append(
            f"{algo}: proxy reward {steps[0][K.REWARD_MEAN]:.3f} -> "
            f"{last[K.REWARD_MEAN]:.3f}, final KL {last[K.KL]:.4f} per token"
        )
    return lines


def _write_report(run_dir: Path, log) -> None:
    from rlhf_dist.report import write_report

    try:
        files = write_report(run_dir)["files"]
    except Exception as e:  # a report must never cost the run its exit status
        log(f"report: not written ({e})")
        return
    log("report: " + ", ".join(files))


def main(argv: list[str] | None = None) -> int:
    from rlhf_dist.checkpoint import CheckpointError
    from rlhf_dist.orchestrator import TrainingError

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config", default=None, help="YAML config file (default: configs/default.yaml)"
    )
    parser.add_argument("--address", default="", help="Ray cluster to join (auto or host:port)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default="",
        help="continue the run in RUN_DIR from its latest good checkpoint (its config.yaml, "
        "plus any overrides)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    add_submit_arguments(parser)  # --submit URL, --no-wait, --no-pip, --job-id, --env
    args = parser.parse_args(argv)
    check_submit_args(parser, args)
    if args.submit:
        return submit(args, args.config or str(DEFAULT_CONFIG), args.overrides)
    ray_env.set_driver_env()
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").is_file():
                raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory)")
            config = args.config or str(run_dir / "config.yaml")
            overrides = [*args.overrides, f"run.dir={run_dir}", "run.resume=auto"]
        else:
            config, overrides = args.config or str(DEFAULT_CONFIG), args.overrides
        cfg = load_config(config, overrides)
        train(cfg, args.address)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
