"""What a step produced, whichever loop ran it, and the metric rows made from it."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from rlhf_dist import metric_keys as K
from rlhf_dist.batch import RolloutBatch, UpdateResult
from rlhf_dist.dispatch import LOST
from rlhf_dist.driver.errors import LearnerLost
from rlhf_dist.driver.run_state import RunState


@dataclass
class StepOutcome:
    """One PPO step, as the sync and async loops hand it to ``Orchestrator.record``."""

    batch: RolloutBatch  # the scored samples the learner trained on
    train: UpdateResult  # the learner's metrics, or why it refused the update (``skipped``)
    times: dict[str, float]  # seconds per block (generate, score, train, weight_sync)
    step_time: float
    data_position: dict  # cursor and prompts consumed once this step's prompts were taken
    extra: dict = field(default_factory=dict)  # the loop's own metrics
    # samples taken from the data but not trained, and why: (batch, "stale" | "uniform_group")
    dropped: list[tuple[RolloutBatch, str]] = field(default_factory=list)
    taken: int = 0  # prompts the step took from the data (0: rollout.prompts_per_step)

    @property
    def skipped(self) -> bool:
        return bool(self.train.skipped)


class StepLoop:
    """What both loops (``SyncLoop``, ``AsyncLoop``) work with; ``steps()`` yields outcomes."""

    def __init__(self, cfg, sizes, state: RunState, inputs, generators, scorers, learners):
        self.cfg, self.sizes, self.state, self.inputs = cfg, sizes, state, inputs
        self.generators, self.scorers, self.learners = generators, scorers, learners

    def pending_state(self) -> dict | None:
        """Work taken from the data but not trained yet, for a checkpoint (None: there is
        none between two steps of this loop)."""
        return None

    def load_pending(self, pending: dict) -> None:
        raise ValueError("this loop keeps no pending work; the checkpoint holds some")


def publish(generators, state: RunState, version: int) -> float:
    """Push the learner's policy to every generator as ``version``; from then on it is the
    run's policy version. The one place the driver sets it (a checkpoint's is loaded with the
    rest of the run state). Returns the push's compute."""
    compute = generators.push(version)
    state.version = version
    return compute


class BlockTimer:
    """Seconds per named block of a step (a block entered again adds up)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def block(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def step_row(out: StepOutcome, state: RunState, kl_coef: float, elapsed: float, gens: int) -> dict:
    """The metrics of a step that updated the policy."""
    batch = out.batch
    lengths = batch.response_mask.sum(-1)
    staleness = (state.version - 1 - batch.versions).float()  # versions behind the learner
    return {
        "stage": "ppo",
        "step": state.step,
        K.REWARD_MEAN: batch.scores.mean().item(),
        K.SCORE_STD: batch.scores.std().item() if len(batch) > 1 else 0.0,
        **{
            K.reward_part_key(name): part.mean().item() for name, part in batch.reward_parts.items()
        },
        K.RESPONSE_LENGTH_MEAN: lengths.float().mean().item(),
        **episode_metrics(batch),
        K.TRUNCATED_FRAC: batch.truncated.float().mean().item(),
        **out.train.metrics,
        K.KL_COEF: kl_coef,
        **{K.time_key(k): v for k, v in out.times.items()},
        K.STEP_TIME: out.step_time,
        K.ELAPSED: elapsed,
        K.TOKENS_PER_S: batch.generated_tokens / out.step_time,
        K.SAMPLES_PER_S: len(batch) / out.step_time,
        **out.extra,
        K.VERSION: state.version,
        K.STALENESS_MEAN: staleness.mean().item(),
        K.STALENESS_MAX: staleness.max().item(),
        **counter_metrics(state),
        K.NUM_GENERATORS: gens,
        K.CHUNKS_PER_GENERATOR_MIN: min(batch.chunks_per_worker),
        K.CHUNKS_PER_GENERATOR_MAX: max(batch.chunks_per_worker),
        K.DATA_EPOCH: state.cursor.epoch,
    }


def episode_metrics(batch: RolloutBatch) -> dict:
    """What a step's multi-turn trajectories did (none for single-turn samples)."""
    out = {K.REWARD_TIMEOUTS: batch.reward_timeouts} if batch.reward_timeouts else {}
    eps = batch.episodes
    if not eps:
        return out
    n = len(eps)
    return {
        **out,
        K.TURNS_MEAN: sum(e["turns"] for e in eps) / n,
        K.TOOL_CALLS_MEAN: sum(e["tool_calls"] for e in eps) / n,
        K.TOOL_ERRORS: sum(e["tool_errors"] for e in eps),
        K.OBSERVATION_TRUNCATIONS: sum(e["truncations"] for e in eps),
        K.ENV_FAILURES: sum(e["ended"] != "done" for e in eps),
        K.ENV_TIMEOUTS: sum(e["ended"] == "timeout" for e in eps),
    }


def skipped_row(out: StepOutcome, state: RunState, elapsed: float) -> dict:
    """The metrics of a step whose numbers were not finite (no update, no sync)."""
    return {
        "stage": "ppo",
        "step": state.step,
        K.REWARD_MEAN: out.batch.scores.float().nanmean().item(),
        **{K.time_key(k): v for k, v in out.times.items()},
        K.STEP_TIME: out.step_time,
        K.ELAPSED: elapsed,
        K.VERSION: state.version,
        K.SKIP_REASON: ",".join(out.train.skipped),
        **counter_metrics(state),
    }


def counter_metrics(state: RunState) -> dict:
    c = state.counters
    return {
        K.SKIPPED_STEPS: c.skipped_steps,
        K.RESTARTS: c.restarts,
        K.LEARNER_RESTARTS: c.learner_restarts,
        K.REDONE_CHUNKS: c.redone_chunks,
        K.PROMPTS_CONSUMED: c.prompts_consumed,
        K.PROMPTS_TRAINED: c.prompts_trained,
    }


def system_metrics(pools: dict) -> dict:
    """Memory and CPU (and GPU) use of each pool's actors: the largest RSS, mean CPU. A
    worker lost since its last call is left out (it is replaced when next given work); a lost
    learner rank raises."""
    refs = {name: p.call("system_stats") for name, p in pools.items()}
    out = {}
    for name, pending in refs.items():
        stats = []
        for ref in pending:
            try:
                stats.append(ray.get(ref))
            except LOST as e:
                if name == "learner":
                    raise LearnerLost(None, type(e).__name__, "a statistics call") from e
        if not stats:
            continue
        out[K.pool_key(name, "rss_mb")] = max(s["rss_mb"] for s in stats)
        out[K.pool_key(name, "cpu_percent")] = sum(s["cpu_percent"] for s in stats) / len(stats)
        if all("gpu_mem_mb" in s for s in stats):
            out[K.pool_key(name, "gpu_mem_mb")] = max(s["gpu_mem_mb"] for s in stats)
            out[K.pool_key(name, "gpu_util_percent")] = sum(
                s["gpu_util_percent"] for s in stats
            ) / len(stats)
    return out


def step_line(row: dict, steps: int) -> str:
    """The one line a step prints."""
    if row["step"] == 0:
        return (
            f"step 0  gold {row[K.GOLD]:.3f} +- {row[K.GOLD_STDERR]:.3f}  "
            f"proxy {row[K.EVAL_PROXY_REWARD]:.3f}"
        )
    if K.SKIP_REASON in row:
        return f"step {row['step']}/{steps}  skipped: non-finite {row[K.SKIP_REASON]}"
    line = (
        f"step {row['step']}/{steps}  reward {row[K.REWARD_MEAN]:.3f}  "
        f"kl {row[K.KL]:.4f}  tok/s {row[K.TOKENS_PER_S]:.0f}  "
        f"step {row[K.STEP_TIME]:.2f}s"
    )
    if K.GOLD in row:
        line += f"  gold {row[K.GOLD]:.3f} +- {row[K.GOLD_STDERR]:.3f}"
    return line
