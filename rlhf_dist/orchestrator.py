"""The driver: the synchronous PPO loop of DESIGN.md, one step at a time.

prompts ─▶ generators ─▶ rollouts ─┬▶ reward scorers ────┐
                                   └▶ reference scorers ─┴▶ scored batch ─▶ learner ranks
        ▲                                                                        │
        └───────────── weight sync: learner rank 0 ─▶ every generator ◀──────────┘
"""

from __future__ import annotations

import hashlib
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
from rlhf_dist.pools import Pool, check_cluster_resources
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


def _chunks(n: int, k: int) -> list[range]:
    """``k`` contiguous, nearly equal ranges covering ``range(n)`` (empty ones dropped)."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


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
            section.num_cpus,
            section.num_gpus,
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
        """Learner rank 0 (rank 0, store host) plus every generator, under a fresh prefix."""
        host = self.learners.node_ip(0)
        port = ray.get(self.learners.actors[0].free_port.remote())
        members = [self.learners.actors[0], *self.generators.actors]
        prefix = f"wsync-{time.time_ns()}"
        args = (len(members), prefix, self.sync_backend(), self.cfg.sync.timeout_s)
        ray.get(
            [m.join_weight_sync.remote(host, port, rank, *args) for rank, m in enumerate(members)]
        )

    def add_generators(self, n: int = 1) -> None:
        """Grow the rollout pool between two steps: the new membership forms a new sync group
        and every generator, new ones included, receives the current weights."""
        self.generators.add(n)
        if self.sync_backend() != "object_store":
            self._form_sync_group()
        self.sync_weights(self.version)

    # ----------------------------------------------------------------- the step blocks

    def generate(
        self, prompt_ids: list[int], prompts: list[str] | None = None, tag: str = "rollout"
    ) -> RolloutBatch:
        """Sample responses for ``prompt_ids`` (indices into ``prompts``, by default the
        training prompts), dealt to the generators in equal chunks."""
        cfg = self.cfg
        prompts = self.inputs.prompts if prompts is None else prompts
        samples = cfg.rollout.samples_per_prompt if tag == "rollout" else 1
        # Evaluation uses the same seeds every time, so evaluations differ by the policy only.
        step = self.step_idx if tag == "rollout" else 0
        refs = []
        for g, (gen, part) in enumerate(
            zip(self.generators.actors, _chunks(len(prompt_ids), len(self.generators)))
        ):
            ids = [prompt_ids[i] for i in part]
            seed = derive_seed(cfg.run.seed, tag, step, g)
            refs.append(gen.generate.remote([prompts[i] for i in ids], ids, samples, seed))
        batches = ray.get(refs)
        batch = RolloutBatch.concat(batches, self.inputs.pad_token_id)
        batch.extra["compute_s"] = max(b.extra["compute_s"] for b in batches)
        batch.extra["num_tokens"] = sum(b.extra["num_tokens"] for b in batches)
        return batch

    def _rewards(self, batch: RolloutBatch) -> list[ray.ObjectRef]:
        return [
            a.score.remote(batch.prompts[p.start : p.stop], batch.responses[p.start : p.stop])
            for a, p in zip(self.rewards.actors, _chunks(len(batch), len(self.rewards)))
        ]

    def evaluate(self) -> dict:
        """Gold score (mean and standard error) of the current policy on held-out prompts,
        beside the proxy reward of the same samples. The gold scorer never trains anything."""
        prompts = self.inputs.eval_prompts
        batch = self.generate(list(range(len(prompts))), prompts, tag="eval")
        gold = torch.tensor(self.gold(batch.prompts, batch.responses), dtype=torch.float64)
        proxy = torch.cat([r["scores"] for r in ray.get(self._rewards(batch))])
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
        reward_refs = self._rewards(batch)
        ref_refs = [
            a.ref_logprobs.remote(batch.select(list(p)))
            for a, p in zip(self.references.actors, _chunks(len(batch), len(self.references)))
        ]
        rewards, refs = ray.get(reward_refs), ray.get(ref_refs)
        batch.scores = torch.cat([r["scores"] for r in rewards])
        batch.ref_logprobs = torch.cat([r["ref_logprobs"] for r in refs])
        return max(r["compute_s"] for r in rewards + refs)

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
        """Broadcast the learner's policy to every generator as ``version``; verify."""
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
        sent, got = ray.get(send)[0], ray.get(recv)
        if verify:
            for i, g in enumerate(got):
                if g["checksum"] != sent["checksum"] or g["version"] != version:
                    raise WeightSyncError(
                        f"generator {i} holds version {g['version']} checksum {g['checksum']}, "
                        f"learner sent version {version} checksum {sent['checksum']}"
                    )
        self.version = version
        return max([sent["compute_s"]] + [g["compute_s"] for g in got])

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
        with timed("weight_sync"):
            sync_compute = self.sync_weights(self.version + 1)
        step_time = time.perf_counter() - t_step

        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(train["train/kl_per_sequence"], len(batch))
        compute = batch.extra["compute_s"] + score_compute + train.pop("compute_s") + sync_compute
        lengths = batch.response_mask.sum(-1)
        tokens = batch.extra["num_tokens"]
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
            "perf/tokens_per_s": tokens / step_time,
            "perf/generate_tokens_per_s": tokens / max(times["generate"], 1e-9),
            "perf/overhead_frac": max(step_time - compute, 0.0) / step_time,
            "sync/version": self.version,
            "fault/skipped_steps": self.skipped_steps,
            "pool/num_generators": len(self.generators),
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
            with timed("eval"):
                metrics.update(self.evaluate())
            metrics["time/eval"] = times["eval"]
        self.metrics.log(metrics)
        return metrics

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
            "sync/version": self.version,
            "fault/skipped_steps": self.skipped_steps,
            "fault/skip_reason": ",".join(train["reason"]),
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
        }
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
        """Memory and CPU (and GPU) use of each pool's actors: the largest RSS, mean CPU."""
        refs = {name: p.call("system_stats") for name, p in self._named_pools().items()}
        out = {}
        for name, stats in ((n, ray.get(r)) for n, r in refs.items()):
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

    def run(self, log=print) -> list[dict]:
        history = []
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
            before = {"stage": "ppo", "step": 0, **self.evaluate()}
            self.metrics.log(before)
            history.append(before)
            log(
                f"step 0  gold {before['eval/gold_score']:.3f} +- "
                f"{before['eval/gold_score_stderr']:.3f}  proxy {before['eval/proxy_reward']:.3f}"
            )
        for _ in range(self.step_idx, self.cfg.run.steps):
            try:
                m = self.step()
            except ray.exceptions.RayActorError as e:
                raise TrainingError(
                    f"a worker died at step {self.step_idx + 1} ({e.__class__.__name__}); "
                    f"{self._checkpoint_hint()}"
                ) from e
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
