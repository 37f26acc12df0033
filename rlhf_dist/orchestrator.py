"""The driver: the synchronous PPO loop of DESIGN.md, one step at a time.

prompts ─▶ generators ─▶ rollouts ─┬▶ reward scorers ────┐
                                   └▶ reference scorers ─┴▶ scored batch ─▶ learner ranks
        ▲                                                                        │
        └───────────── weight sync: learner rank 0 ─▶ every generator ◀──────────┘
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlhf_dist import checkpoint
from rlhf_dist.algo import AdaptiveKLController, FixedKLController
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import Config, compute_sizes, dump_config
from rlhf_dist.data import PromptCursor
from rlhf_dist.dispatch import LOST, Job, deal, failed_to_start
from rlhf_dist.pools import Pool, PoolError, bundle_of, check_cluster_resources
from rlhf_dist.preflight import Inputs
from rlhf_dist.roles import Generator, Learner, ReferenceScorer, RewardScorer
from rlhf_dist.roles.scorers import import_reward_function
from rlhf_dist.tracking import Tracker


class WeightSyncError(RuntimeError):
    """A generator does not hold what the learner sent."""


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and names the last checkpoint."""


def derive_seed(*parts) -> int:
    """A seed that depends only on ``parts`` (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def _chunks(n: int, size: int) -> list[range]:
    """Contiguous ranges of ``size`` (the last may be shorter) covering ``range(n)``."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def _noop(_self) -> None:
    return None


class Orchestrator:
    def __init__(
        self, cfg: Config, inputs: Inputs, run_dir: str | Path, tracker: Tracker | None = None
    ):
        self.cfg, self.inputs = cfg, inputs
        self.sizes = compute_sizes(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.own_tracker = tracker is None
        self.metrics = tracker or Tracker(cfg, self.run_dir)
        self.cursor = PromptCursor(len(inputs.prompts), cfg.run.seed, cfg.data.shuffle)
        self.kl_ctl = (
            AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
            if cfg.ppo.adaptive_kl
            else FixedKLController(cfg.ppo.kl_coef)
        )
        self.step_idx = 0
        self.version = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self.restarts = 0  # lost generators/scorers replaced
        self.redone_chunks = 0  # chunks of work resubmitted after a loss
        self.prompts_consumed = 0  # taken from the cursor by PPO steps
        self.prompts_trained = 0  # in batches the learner trained on
        self.last_scale_step = 0
        self.t_started = time.perf_counter()
        self.trained_view: dict | None = None  # async mode: cursor as of the last trained step
        # on_dispatch(pool name, slot, task index): called after each submission (fault tests)
        self.on_dispatch = None
        self.last_checkpoint: Path | None = None
        self.gold = import_reward_function(cfg.eval.gold) if cfg.eval.gold else None
        self.pools: list[Pool] = []
        try:
            self._start_pools()
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- set-up

    def _start_pools(self) -> None:
        cfg, inp = self.cfg, self.inputs
        check_cluster_resources(cfg)
        timeout = cfg.ray.placement_timeout_s
        r = cfg.rollout
        self.learners = self._pool(
            "learner",
            Learner,
            cfg.learner,
            lambda i: ((cfg, i, cfg.learner.world_size), {}),
            timeout,
        )
        self.generators = self._pool(
            "rollout",
            Generator,
            r,
            lambda i: (
                (inp.policy, inp.tokenizer, cfg.model.dtype),
                dict(
                    max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    num_gpus=r.num_gpus,
                ),
            ),
            timeout,
        )
        self.rewards = self._pool(
            "reward",
            RewardScorer,
            cfg.reward,
            lambda i: (
                (),
                dict(
                    model_path=inp.reward_model,
                    function="" if inp.reward_model else cfg.reward.function,
                    dtype=cfg.model.dtype,
                    num_gpus=cfg.reward.num_gpus,
                ),
            ),
            timeout,
        )
        self.references = self._pool(
            "reference",
            ReferenceScorer,
            cfg.reference,
            lambda i: (
                (inp.policy, cfg.model.dtype),
                dict(temperature=r.temperature, num_gpus=cfg.reference.num_gpus),
            ),
            timeout,
        )
        master_addr = self.learners.node_ip(0)
        master_port = ray.get(self.learners.actors[0].free_port.remote())
        ray.get(
            [
                a.setup.remote(inp.policy, inp.critic, master_addr, master_port)
                for a in self.learners.actors
            ]
        )
        self.manifest = ray.put(ray.get(self.learners.actors[0].sync_manifest.remote()))
        if self.sync_backend() != "object_store":
            self._form_sync_group()
        # Version 0: generators loaded the same files, but the sync proves they hold them.
        self.sync_weights(version=0)

    def _pool(self, name, cls, section, make_args, timeout) -> Pool:
        pool = Pool(
            name,
            cls,
            section.world_size if name == "learner" else section.num_workers,
            bundle_of(section),
            make_args,
            timeout,
        )
        self.pools.append(pool)
        return pool

    def sync_backend(self) -> str:
        if self.cfg.sync.backend != "auto":
            return self.cfg.sync.backend
        on_gpu = self.cfg.learner.num_gpus > 0 and self.cfg.rollout.num_gpus > 0
        return "nccl" if on_gpu else "gloo"

    def _form_sync_group(self) -> None:
        """Learner rank 0 (rank 0, store host) plus every generator, under a fresh prefix. A
        generator found dead (before, or while joining) is replaced and the group formed again."""
        while True:
            self._replace(self.generators, self._dead(self.generators))
            host = self.learners.node_ip(0)
            port = ray.get(self.learners.actors[0].free_port.remote())
            members = [self.learners.actors[0], *self.generators.actors]
            prefix = f"wsync-{time.time_ns()}"
            args = (len(members), prefix, self.sync_backend(), self.cfg.sync.timeout_s)
            joins = [m.join_weight_sync.remote(host, port, r, *args) for r, m in enumerate(members)]
            try:
                ray.get(joins[1:])
            except LOST:  # the learner's join fails at sync.timeout_s without it: try again
                try:
                    ray.get(joins[0])
                except ray.exceptions.RayTaskError:
                    pass
                continue
            ray.get(joins[0])
            return

    @staticmethod
    def _dead(pool: Pool, timeout_s: float = 30.0) -> list[int]:
        """Slots of ``pool`` whose actor is gone (a no-op call on each; idle actors answer at
        once, busy ones when their current call ends)."""
        refs = [a.__ray_call__.remote(_noop) for a in pool.actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0)
            except LOST as e:
                if failed_to_start(e):
                    raise
                dead.append(i)
            except ray.exceptions.GetTimeoutError:
                pass
        return dead

    def add_generators(self, n: int = 1) -> None:
        """Grow the rollout pool between two steps: the new membership forms a new sync group
        and every generator, new ones included, receives the current weights."""
        self.generators.add(n)
        self._regroup_generators()

    def remove_generators(self, n: int = 1) -> None:
        """Shrink the rollout pool between two steps (at least one generator stays)."""
        if not 0 < n < len(self.generators):
            raise ValueError(f"cannot remove {n} of {len(self.generators)} generators")
        for _ in range(n):
            self.generators.remove(len(self.generators) - 1)
        self._regroup_generators()

    def _regroup_generators(self) -> None:
        if self.sync_backend() != "object_store":
            self._form_sync_group()
        self.sync_weights(self.version)

    # ----------------------------------------------------------------- lost workers

    def _replace(self, pool: Pool, slots: list[int]) -> list[int]:
        """Start new actors in place of lost ones (counted in ``fault/restarts``)."""
        for slot in slots:
            self.restarts += 1
            if self.restarts > self.cfg.run.max_restarts:
                raise TrainingError(
                    f"{pool.name} worker {slot} was lost and run.max_restarts="
                    f"{self.cfg.run.max_restarts} replacements are used up; "
                    f"{self._checkpoint_hint()}"
                )
            try:
                pool.replace(slot)
            except PoolError as e:
                raise TrainingError(
                    f"{pool.name} worker {slot} was lost and cannot be replaced: {e}; "
                    f"{self._checkpoint_hint()}"
                ) from e
        return list(slots)

    def _heal_scorers(self, pool: Pool):
        return lambda lost, busy: self._replace(pool, lost)

    def _heal_generators(self, lost: list[int], busy: bool) -> list[int]:
        """Lost generators are replaced once no generator call is in flight: the new members
        form a new sync group with every generator, and all receive the current weights."""
        if busy:
            return []
        self._replace(self.generators, lost)
        self._regroup_generators()
        return list(lost)

    # ----------------------------------------------------------------- the step blocks

    def generate(
        self, prompt_ids: list[int], prompts: list[str] | None = None, tag: str = "rollout"
    ) -> RolloutBatch:
        """Sample responses for ``prompt_ids`` (indices into ``prompts``, by default the
        training prompts). The prompts are cut into chunks, each with a seed of its own, and
        dealt to the generators by load; a lost generator's chunk is redone elsewhere."""
        cfg = self.cfg
        prompts = self.inputs.prompts if prompts is None else prompts
        samples = cfg.rollout.samples_per_prompt if tag == "rollout" else 1
        # Evaluation uses the same seeds every time, so evaluations differ by the policy only.
        step = self.step_idx if tag == "rollout" else 0
        size = (
            self.sizes.chunk_prompts
            if tag == "rollout"
            else math.ceil(len(prompt_ids) / (2 * cfg.rollout.num_workers))
        )
        chunks = [
            ([prompt_ids[i] for i in part], derive_seed(cfg.run.seed, tag, step, c))
            for c, part in enumerate(_chunks(len(prompt_ids), size))
        ]

        def submit(gen, chunk):
            ids, seed = chunk
            return gen.generate.remote([prompts[i] for i in ids], ids, samples, seed)

        job = Job(self.generators, chunks, submit, self._heal_generators)
        deal(job, on_dispatch=self.on_dispatch)
        self.redone_chunks += job.redone
        batch = RolloutBatch.concat(job.results, self.inputs.pad_token_id)
        expected = sorted(i for ids, _ in chunks for i in ids for _ in range(samples))
        if sorted(batch.prompt_ids) != expected:  # the dealing must neither lose nor repeat
            raise RuntimeError("generate: the batch's prompts differ from the prompts dealt")
        batch.extra["compute_s"] = self._critical_path(job)
        batch.extra["num_tokens"] = sum(b.extra["num_tokens"] for b in job.results)
        batch.extra["chunks_per_worker"] = [job.owner.count(s) for s in range(len(self.generators))]
        return batch

    @staticmethod
    def _critical_path(job: Job) -> float:
        """The busiest worker's compute: the sum over the tasks it returned."""
        per_slot: dict[int, float] = {}
        for slot, r in zip(job.owner, job.results):
            c = r.extra["compute_s"] if isinstance(r, RolloutBatch) else r["compute_s"]
            per_slot[slot] = per_slot.get(slot, 0.0) + c
        return max(per_slot.values(), default=0.0)

    def _score_jobs(self, batch: RolloutBatch, references: bool = True) -> list[Job]:
        """Reward (and reference) scoring of ``batch`` in chunks, dealt by load."""

        def parts(pool: Pool) -> list[range]:
            return _chunks(len(batch), math.ceil(len(batch) / (2 * len(pool))))

        jobs = [
            Job(
                self.rewards,
                parts(self.rewards),
                lambda a, p: a.score.remote(
                    batch.prompts[p.start : p.stop], batch.responses[p.start : p.stop]
                ),
                self._heal_scorers(self.rewards),
            )
        ]
        if references:
            jobs.append(
                Job(
                    self.references,
                    parts(self.references),
                    lambda a, p: a.ref_logprobs.remote(batch.select(list(p))),
                    self._heal_scorers(self.references),
                )
            )
        deal(*jobs, on_dispatch=self.on_dispatch)
        self.redone_chunks += sum(j.redone for j in jobs)
        return jobs

    def evaluate(self) -> dict:
        """Gold score (mean and standard error) of the current policy on held-out prompts,
        beside the proxy reward of the same samples. The gold scorer never trains anything."""
        prompts = self.inputs.eval_prompts
        batch = self.generate(list(range(len(prompts))), prompts, tag="eval")
        gold = torch.tensor(self.gold(batch.prompts, batch.responses), dtype=torch.float64)
        (rewards,) = self._score_jobs(batch, references=False)
        proxy = torch.cat([r["scores"] for r in rewards.results])
        n = len(gold)
        return {
            "eval/gold_score": gold.mean().item(),
            "eval/gold_score_stderr": (gold.std().item() / n**0.5) if n > 1 else 0.0,
            "eval/proxy_reward": proxy.mean().item(),
            "eval/response_length_mean": batch.response_mask.sum(-1).float().mean().item(),
            "eval/num_prompts": n,
        }

    def score(self, batch: RolloutBatch) -> float:
        """Reward and reference scores, computed concurrently; returns the slowest compute."""
        rewards, refs = self._score_jobs(batch)
        batch.scores = torch.cat([r["scores"] for r in rewards.results])
        batch.ref_logprobs = torch.cat([r["ref_logprobs"] for r in refs.results])
        return max(self._critical_path(rewards), self._critical_path(refs))

    def train(self, batch: RolloutBatch) -> dict:
        seed = derive_seed(self.cfg.run.seed, self.step_idx, "ppo")
        shards = batch.split(self.cfg.learner.world_size)
        results = ray.get(
            [
                a.ppo_update.remote(s, self.kl_ctl.value, seed)
                for a, s in zip(self.learners.actors, shards)
            ]
        )
        metrics = dict(results[0])
        metrics["compute_s"] = max(r["compute_s"] for r in results)
        return metrics

    def sync_weights(self, version: int) -> float:
        """Broadcast the learner's policy to every generator as ``version``; verify. A
        generator lost during the sync, or left waiting on the broken group, is replaced; the
        group is re-formed and the sync redone."""
        while True:
            lost = self._sync_once(version)
            if isinstance(lost, float):
                self.version = version
                return lost
            self._replace(self.generators, lost)
            if self.sync_backend() != "object_store":
                self._form_sync_group()

    def _sync_once(self, version: int) -> float | list[int]:
        """One sync attempt: its slowest compute, or the generator slots to replace."""
        bucket = int(self.cfg.sync.bucket_mb * (1 << 20))
        verify = self.cfg.sync.verify
        if self.sync_backend() == "object_store":
            out = [
                a.weight_buckets.options(num_returns=2).remote(bucket, version, verify)
                for a in self.learners.actors
            ]
            send = [meta for meta, _ in out]
            # Rank 0's buckets go to the generators by reference: each pulls them from the
            # object store; the driver only reads the metadata.
            recv = self.generators.call(
                "load_weight_buckets", self.manifest, bucket, out[0][1], version, verify
            )
        else:
            send = self.learners.call("broadcast_weights", bucket, version, verify)
            recv = self.generators.call("receive_weights", self.manifest, bucket, version, verify)
        if self.on_dispatch is not None:
            for slot in range(len(recv)):
                self.on_dispatch("weight_sync", slot, 0)
        got, lost, hung = self._wait_receivers(recv, send)
        if lost:
            # The learner's send fails or ends with the group; a dead learner ends the run.
            try:
                ray.get(send, timeout=self.cfg.sync.timeout_s + 60)
            except ray.exceptions.RayTaskError:
                pass
            except ray.exceptions.GetTimeoutError:
                raise TrainingError(
                    f"weight sync: a generator was lost and the learner's send did not end "
                    f"within sync.timeout_s={self.cfg.sync.timeout_s:g}; "
                    f"{self._checkpoint_hint()}"
                ) from None
            return sorted(lost | hung)
        sent = ray.get(send)[0]
        if verify:
            for i, g in enumerate(got):
                if g["checksum"] != sent["checksum"] or g["version"] != version:
                    raise WeightSyncError(
                        f"generator {i} holds version {g['version']} checksum {g['checksum']}, "
                        f"learner sent version {version} checksum {sent['checksum']}"
                    )
        return max([sent["compute_s"]] + [g["compute_s"] for g in got])

    def _wait_receivers(self, recv: list, send: list) -> tuple[list, set[int], set[int]]:
        """Results of the generators' receive calls, the slots lost, and (once one is lost)
        the slots left waiting on the broken group: those still receiving a moment after the
        learner's send has ended (it fails, or gloo times out after ``sync.timeout_s``)."""
        slot = {ref: i for i, ref in enumerate(recv)}
        got: list = [None] * len(recv)
        lost: set[int] = set()
        errors: list = []
        pending = list(recv)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                got[slot[ready[0]]] = ray.get(ready[0])
            except LOST:
                lost.add(slot[ready[0]])
                break
            except ray.exceptions.RayTaskError:
                errors.append(ready[0])  # the group broke under it: a loss shows next
        if lost:
            ray.wait(send, num_returns=len(send), timeout=self.cfg.sync.timeout_s + 10)
            # Over the object store a receiver does not depend on the others: wait for all.
            grace = None if self.sync_backend() == "object_store" else 1.0
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=grace)
            for ref in done:
                try:
                    ray.get(ref)
                except LOST:
                    lost.add(slot[ref])
                except ray.exceptions.RayTaskError:
                    pass
        elif errors:
            ray.get(errors[0])  # a failure with no member lost: a real error, raise it
        return got, lost, {slot[r] for r in pending}

    # ----------------------------------------------------------------- the loop

    def step(self) -> dict:
        times: dict[str, float] = {}

        @contextmanager
        def timed(key):
            t0 = time.perf_counter()
            yield
            times[key] = time.perf_counter() - t0

        t_step = time.perf_counter()
        prompt_ids = self.cursor.take(self.cfg.rollout.prompts_per_step)
        self.prompts_consumed += len(prompt_ids)
        with timed("generate"):
            batch = self.generate(prompt_ids)
        with timed("score"):
            score_compute = self.score(batch)
        with timed("train"):
            train = self.train(batch)
        self.step_idx += 1
        if train.get("skipped"):
            return self._skipped_step(batch, train, times, time.perf_counter() - t_step)
        self.bad_streak = 0
        self.prompts_trained += len(batch) // self.cfg.rollout.samples_per_prompt
        with timed("weight_sync"):
            sync_compute = self.sync_weights(self.version + 1)
        step_time = time.perf_counter() - t_step
        compute = batch.extra["compute_s"] + score_compute + train.pop("compute_s") + sync_compute
        extra = {
            "perf/generate_tokens_per_s": batch.extra["num_tokens"] / max(times["generate"], 1e-9),
            "perf/overhead_frac": max(step_time - compute, 0.0) / step_time,
        }
        return self._finish_step(batch, train, times, step_time, extra)

    def _finish_step(
        self, batch: RolloutBatch, train: dict, times: dict, step_time: float, extra: dict
    ) -> dict:
        """The metrics of a step that updated the policy (sync or async mode): logged, with the
        samples table and the gold evaluation when they are due."""
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(train["train/kl_per_sequence"], len(batch))
        train.pop("compute_s", None)
        lengths = batch.response_mask.sum(-1)
        staleness = (self.version - 1 - batch.versions).float()  # versions behind the learner
        metrics = {
            "stage": "ppo",
            "step": self.step_idx,
            "rollout/reward_mean": batch.scores.mean().item(),
            "rollout/score_std": batch.scores.std().item() if len(batch) > 1 else 0.0,
            "rollout/response_length_mean": lengths.float().mean().item(),
            "rollout/truncated_frac": batch.truncated.float().mean().item(),
            **train,
            "train/kl_coef": kl_coef,
            **{f"time/{k}": v for k, v in times.items()},
            "time/step": step_time,
            "time/elapsed": self.elapsed(),
            "perf/tokens_per_s": batch.extra["num_tokens"] / step_time,
            "perf/samples_per_s": len(batch) / step_time,
            **extra,
            "sync/version": self.version,
            "sync/staleness_mean": staleness.mean().item(),
            "sync/staleness_max": staleness.max().item(),
            "fault/skipped_steps": self.skipped_steps,
            **self._fault_metrics(),
            "pool/num_generators": len(self.generators),
            "pool/chunks_per_generator_min": min(batch.extra["chunks_per_worker"]),
            "pool/chunks_per_generator_max": max(batch.extra["chunks_per_worker"]),
            "data/epoch": self.cursor.epoch,
        }
        metrics.update(self.system_metrics())
        every = self.cfg.wandb.table_every
        if every and self.step_idx % every == 0:
            n = self.cfg.wandb.table_rows
            self.metrics.samples(
                self.step_idx, batch.prompts[:n], batch.responses[:n], batch.scores[:n].tolist()
            )
        if self.gold and (
            self.step_idx % self.cfg.eval.every == 0 or self.step_idx == self.cfg.run.steps
        ):
            t0 = time.perf_counter()
            metrics.update(self.evaluate())
            metrics["time/eval"] = time.perf_counter() - t0
        self.metrics.log(metrics)
        return metrics

    def elapsed(self) -> float:
        """Seconds since this process started PPO (gold score against wall-clock time)."""
        return time.perf_counter() - self.t_started

    def _fault_metrics(self) -> dict:
        return {
            "fault/restarts": self.restarts,
            "fault/redone_chunks": self.redone_chunks,
            "data/prompts_consumed": self.prompts_consumed,
            "data/prompts_trained": self.prompts_trained,
        }

    def autoscale(self, metrics: dict) -> bool:
        """Add one generator when generation took more than ``rollout.autoscale.generate_frac``
        of the step, below ``max_workers``, out of cooldown, and the cluster has room."""
        auto = self.cfg.rollout.autoscale
        if (
            not auto.max_workers
            or "time/generate" not in metrics
            or len(self.generators) >= auto.max_workers
            or self.step_idx - self.last_scale_step < auto.cooldown_steps
            or metrics["time/generate"] <= auto.generate_frac * metrics["time/step"]
            or not self.generators.has_room()
        ):
            return False
        self.last_scale_step = self.step_idx  # a failed attempt waits out the cooldown too
        try:
            self.add_generators(1)
        except PoolError:  # the room was spread over nodes that cannot hold one more
            return False
        return True

    def _skipped_step(self, batch: RolloutBatch, train: dict, times: dict, step_time: float):
        """A step whose numbers were not finite: no update, no sync; counted, and the run stops
        after ``run.max_bad_steps`` in a row."""
        self.skipped_steps += 1
        self.bad_streak += 1
        metrics = {
            "stage": "ppo",
            "step": self.step_idx,
            "rollout/reward_mean": batch.scores.float().nanmean().item(),
            **{f"time/{k}": v for k, v in times.items()},
            "time/step": step_time,
            "time/elapsed": self.elapsed(),
            "sync/version": self.version,
            "fault/skipped_steps": self.skipped_steps,
            "fault/skip_reason": ",".join(train["reason"]),
            **self._fault_metrics(),
        }
        self.metrics.log(metrics)
        if self.bad_streak >= self.cfg.run.max_bad_steps:
            raise TrainingError(
                f"stopping: {self.bad_streak} consecutive PPO steps had non-finite "
                f"{', '.join(train['reason'])} (run.max_bad_steps={self.cfg.run.max_bad_steps}); "
                f"{self._checkpoint_hint()}"
            )
        return metrics

    def _checkpoint_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return (
            f"the last checkpoint is {self.last_checkpoint} "
            f"(continue with: launch.py --resume {self.run_dir})"
        )

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Learner engines (every rank) plus the driver's state, committed atomically."""
        tmp = checkpoint.begin(self.run_dir, self.step_idx)
        ray.get(self.learners.call("save_checkpoint", str(tmp)))
        if self.cfg.checkpoint.save_hf:
            ray.get(
                self.learners.call("export_policy", str(tmp / "policy_hf"), self.inputs.tokenizer)
            )
        state = {
            "step": self.step_idx,
            "version": self.version,
            "cursor": self.cursor.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "restarts": self.restarts,
            "redone_chunks": self.redone_chunks,
            "prompts_consumed": self.prompts_consumed,
            "prompts_trained": self.prompts_trained,
        }
        # Async mode has taken the prompts of steps not trained yet: it saves the cursor as it
        # was after the last trained step's prompts (a resumed run samples the rest again).
        state.update(self.trained_view or {})
        self.last_checkpoint = checkpoint.commit(tmp, state, self.cfg.checkpoint.keep)
        return self.last_checkpoint

    def restore(self, log=print) -> Path | None:
        """Continue from the newest usable checkpoint (older ones are tried when it is not);
        the generators receive the restored weights before they sample."""
        for ckpt in reversed(checkpoint.checkpoint_dirs(self.run_dir)):
            try:
                state = checkpoint.read_state(ckpt)
                ray.get(self.learners.call("load_checkpoint", str(ckpt), state["version"]))
            except (checkpoint.CheckpointError, ray.exceptions.RayTaskError) as e:
                cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                log(f"checkpoint {ckpt.name} is unusable ({cause}); trying the one before")
                continue
            self.step_idx, self.version = state["step"], state["version"]
            self.cursor.load_state_dict(state["cursor"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.skipped_steps = state.get("skipped_steps", 0)
            self.bad_streak = state.get("bad_streak", 0)
            for key in ("restarts", "redone_chunks", "prompts_consumed", "prompts_trained"):
                setattr(self, key, state.get(key, 0))
            self.sync_weights(self.version)
            dropped = self.metrics.rollback(self.step_idx)
            self.last_checkpoint = ckpt
            log(
                f"resumed from {ckpt} (step {self.step_idx}, policy version {self.version}); "
                f"{dropped} metric rows written after it moved to metrics.rolled_back.jsonl"
            )
            return ckpt
        dropped = self.metrics.rollback(-1)  # every PPO row, step 0's evaluation included
        log(f"no usable checkpoint: PPO starts from step 0 ({dropped} earlier PPO rows set aside)")
        return None

    def export_policy(self, out_dir: Path) -> str:
        ray.get(self.learners.call("export_policy", str(out_dir), self.inputs.tokenizer))
        return str(out_dir)

    def system_metrics(self) -> dict:
        """Memory and CPU (and GPU) use of each pool's actors: the largest RSS, mean CPU. A
        worker lost since its last call is left out (it is replaced when next given work)."""
        refs = {name: p.call("system_stats") for name, p in self._named_pools().items()}
        out = {}
        for name, pending in refs.items():
            stats = []
            for ref in pending:
                try:
                    stats.append(ray.get(ref))
                except LOST:
                    if name == "learner":
                        raise
            if not stats:
                continue
            out[f"pool/{name}_rss_mb"] = max(s["rss_mb"] for s in stats)
            out[f"pool/{name}_cpu_percent"] = sum(s["cpu_percent"] for s in stats) / len(stats)
            if all("gpu_mem_mb" in s for s in stats):
                out[f"pool/{name}_gpu_mem_mb"] = max(s["gpu_mem_mb"] for s in stats)
                out[f"pool/{name}_gpu_util_percent"] = sum(
                    s["gpu_util_percent"] for s in stats
                ) / len(stats)
        return out

    def _named_pools(self) -> dict[str, Pool]:
        return {
            "learner": self.learners,
            "rollout": self.generators,
            "reward": self.rewards,
            "reference": self.references,
        }

    def _steps(self):
        """Each step's metrics, after the step is logged and before the next one starts (so a
        checkpoint taken in between holds exactly the steps before it)."""
        if self.cfg.mode == "async":
            from rlhf_dist.async_loop import AsyncLoop

            yield from AsyncLoop(self).steps()
            return
        for _ in range(self.step_idx, self.cfg.run.steps):
            yield self.step()

    def run(self, log=print) -> list[dict]:
        history = []
        self.t_started = time.perf_counter()
        bar = tqdm(
            total=self.cfg.run.steps,
            initial=self.step_idx,
            desc="PPO",
            unit="step",
            disable=not sys.stderr.isatty(),  # a log file gets the plain lines only
            dynamic_ncols=True,
        )
        if not bar.disable:
            log = bar.write
        every = self.cfg.checkpoint.every
        if self.gold and self.step_idx == 0:
            before = {"stage": "ppo", "step": 0, **self.evaluate(), "time/elapsed": self.elapsed()}
            self.metrics.log(before)
            history.append(before)
            log(
                f"step 0  gold {before['eval/gold_score']:.3f} +- "
                f"{before['eval/gold_score_stderr']:.3f}  proxy {before['eval/proxy_reward']:.3f}"
            )
        steps = self._steps()
        while True:
            try:
                m = next(steps, None)
                scaled = m is not None and self.autoscale(m)
            except LOST as e:
                # Generators and scorers are replaced as they go; a learner rank cannot be.
                if failed_to_start(e):
                    raise TrainingError(
                        f"a worker failed to start at step {self.step_idx + 1}: {e}; "
                        f"{self._checkpoint_hint()}"
                    ) from e
                dead = self._dead(self.learners)
                who = f"learner rank {dead[0]}" if dead else "a worker that could not be replaced"
                raise TrainingError(
                    f"{who} died at step {self.step_idx + 1} ({e.__class__.__name__}); "
                    f"{self._checkpoint_hint()}"
                ) from e
            if m is None:
                break
            if scaled:
                log(
                    f"autoscale: generation took {m['time/generate'] / m['time/step']:.0%} of "
                    f"the step; now {len(self.generators)} generators"
                )
            history.append(m)
            skipped = "fault/skip_reason" in m
            # a skipped step changed no weights: the previous checkpoint stays the newest
            if (
                every
                and not skipped
                and (self.step_idx % every == 0 or self.step_idx == self.cfg.run.steps)
            ):
                self.save_checkpoint()
            if skipped:
                log(
                    f"step {m['step']}/{self.cfg.run.steps}  skipped: non-finite {m['fault/skip_reason']}"
                )
                bar.update(1)
                continue
            line = (
                f"step {m['step']}/{self.cfg.run.steps}  reward {m['rollout/reward_mean']:.3f}  "
                f"kl {m['train/kl']:.4f}  tok/s {m['perf/tokens_per_s']:.0f}  "
                f"step {m['time/step']:.2f}s"
            )
            if "eval/gold_score" in m:
                line += f"  gold {m['eval/gold_score']:.3f} +- {m['eval/gold_score_stderr']:.3f}"
            log(line)
            bar.update(1)
        bar.close()
        return history

    def shutdown(self) -> None:
        if getattr(self, "own_tracker", False):
            self.metrics.close()
            self.own_tracker = False
        for pool in reversed(self.pools):
            try:
                pool.shutdown()
            except Exception:  # best effort: the cluster may already be gone
                pass
        self.pools = []
