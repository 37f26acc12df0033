"""The supervised stages of the recipe (SFT, reward model), on the same DeepSpeed learner code
inside Ray as PPO. Each stage writes its metrics to the run's ``metrics.jsonl`` (rows carry
``"stage": "sft"`` or ``"rm"``) and exports its model with ``save_pretrained`` into the run
directory (``sft/policy``, ``rm/model``), where later stages find it as ``run:sft`` / ``run:rm``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import ray

from rlhf_dist import metric_keys as K
from rlhf_dist.config import Config
from rlhf_dist.driver.learner_group import LearnerGroup
from rlhf_dist.pools import check_cluster_resources
from rlhf_dist.preflight import SupervisedInputs
from rlhf_dist.roles.supervised import RewardLearner, SFTLearner
from rlhf_dist.tracking import Tracker

OUTPUT = {"sft": ("sft", "policy"), "rm": ("rm", "model")}


def _summarise(stage: str, totals: dict) -> dict:
    if stage == "sft":
        return {"loss": totals["nll_sum"] / max(totals["tokens"], 1)}
    n = max(totals["pairs"], 1)
    return {
        "loss": totals["loss_sum"] / n,
        "accuracy": totals["correct"] / n,
        "margin": totals["margin_sum"] / n,
    }


def _shards(records: list[dict], n: int) -> list[list[dict]]:
    size = math.ceil(len(records) / n)
    return [records[i * size : (i + 1) * size] for i in range(n)]


def run_supervised_stage(
    cfg: Config, stage: str, inputs: SupervisedInputs, run_dir: Path, metrics: Tracker, log
) -> dict:
    """Train, evaluate on the held-out split, export; returns the final metrics."""
    sec = getattr(cfg, stage)
    world = cfg.learner.num_workers
    records = list(inputs.records)
    random.Random(cfg.run.seed).shuffle(records)
    n_eval = int(len(records) * sec.eval_frac)
    held_out, train = records[:n_eval], records[n_eval:]
    steps_per_epoch = len(train) // sec.batch_size  # the incomplete last batch is dropped

    check_cluster_resources(cfg, only=("learner",))
    role = SFTLearner if stage == "sft" else RewardLearner
    learners = LearnerGroup(f"{stage} learner", role, cfg)
    try:
        learners.handshake(inputs.init, inputs.tokenizer)
        per_rank = sec.batch_size // world
        final: dict = {}

        def evaluate(step: int) -> dict:
            if not held_out:
                return {}
            totals = ray.get(learners.each("evaluate", _shards(held_out, world)))[0]
            return {
                K.stage_key(stage, f"eval_{k}"): v for k, v in _summarise(stage, totals).items()
            }

        step = 0
        for epoch in range(sec.epochs):
            order = list(train)
            random.Random(cfg.run.seed * 1000 + epoch).shuffle(order)
            for b in range(steps_per_epoch):
                batch = order[b * sec.batch_size : (b + 1) * sec.batch_size]
                shards = [batch[r * per_rank : (r + 1) * per_rank] for r in range(world)]
                results = ray.get(learners.each("train_step", shards))
                step += 1
                row = {"stage": stage, "step": step, K.stage_key(stage, "epoch"): epoch}
                row.update(
                    {K.stage_key(stage, k): v for k, v in _summarise(stage, results[0]).items()}
                )
                row[K.stage_key(stage, "step_time")] = max(r["compute_s"] for r in results)
                if b == steps_per_epoch - 1:
                    row.update(evaluate(step))
                metrics.log(row)
                final = row
            shown = ("loss", "accuracy", "eval_loss", "eval_accuracy")
            log(
                f"{stage} epoch {epoch + 1}/{sec.epochs}: "
                + "  ".join(
                    f"{k} {final[K.stage_key(stage, k)]:.4f}"
                    for k in shown
                    if K.stage_key(stage, k) in final
                )
            )
        stage_dir, name = OUTPUT[stage]
        out = run_dir / stage_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        learners.run("export_model", str(out), inputs.tokenizer)
        final[K.stage_key(stage, "skipped_records")] = inputs.skipped
        return final
    finally:
        learners.shutdown()
