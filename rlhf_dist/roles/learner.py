"""Learner: the policy (and, with ``ppo.estimator=gae``, the critic) as DeepSpeed engines, one
data-parallel rank per instance.

Each rank receives its shard of the step's scored samples and
1. recomputes the old log-probs (policy) and values (critic) with the current weights,
2. turns scores and reference log-probs into KL-penalised per-token rewards and advantages:
   GAE with the critic's values (whitened with statistics gathered across ranks), or a
   critic-free estimator (``rlhf_dist.algo.shaped_scores``: GRPO, Dr. GRPO, RLOO, REINFORCE++
   and its baseline variant). Group statistics are taken over the rank's whole shard, once,
   before minibatching: the shard holds whole groups (a prompt's samples are consecutive and
   ``validate`` refuses a split that would cut one), so minibatches may cut a group freely.
   REINFORCE++ whitens across ranks like GAE; grpo, dr_grpo and rloo never whiten;
3. runs ``ppo.epochs`` passes of minibatches, each made of micro-batches whose gradients
   DeepSpeed accumulates (and averages across ranks) before one optimizer step.
A critic-free learner builds no critic, computes no values, checkpoints no ``critic/`` and
reports none of the critic's metrics (value loss and clip fraction, critic grad norm and lr,
explained variance; ``train/returns_mean`` only for gae and reinforce_pp*, whose returns are
defined).
In async mode some samples come from an older policy than the learner's (their ``versions``
are lower). Decoupled PPO (AReaL, arXiv 2505.24298) then takes the recomputed log-probs of
step 1 as the *proximal* policy that the ratio is clipped against, and weights each stale
token by pi_proximal / pi_behaviour, truncated at ``async.is_cap``. Samples of the learner's
own version are on-policy: their weight is exactly 1, so a run without stale samples trains
exactly as synchronous PPO does.
With LoRA (``model.lora_rank``, ``model.critic_lora_rank``) the engines hold ``peft`` models
whose base is frozen: only the adapters (and a critic's value head) are optimised,
checkpointed and, for the policy, synced (docs/architecture.md, "LoRA").
Losses are aggregated per micro-batch (``ppo.loss_agg``, default the token mean; see
``rlhf_dist.algo.aggregate_loss`` for what each mode means across micro-batches); DeepSpeed
averages them over accumulation steps and ranks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rlhf_dist import algo, weight_sync
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import Config, validate, zero_stage
from rlhf_dist.models import load_critic, load_policy, response_logprobs, response_values
from rlhf_dist.roles.common import WeightSyncMember, host_store
from rlhf_dist.roles.deepspeed_rank import DeepSpeedRank

WHITENED_ESTIMATORS = ("gae", "reinforce_pp", "reinforce_pp_baseline")
"""Estimators whose advantages ``ppo.whiten_advantages`` whitens over the step's batch; the
group estimators (grpo, dr_grpo, rloo) are normalised within each prompt's group instead."""


class Learner(DeepSpeedRank, WeightSyncMember):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size)
        self.sizes = validate(cfg)
        self.policy = self.critic = None
        self.has_critic = cfg.ppo.estimator == "gae"
        self.version = 0
        self.sync_store = None  # the weight-sync store, once hosted
        self.shm_slots = None  # sync.backend=shm: rank 0's two shared-memory slots
        self.shm_live = None  # sync.zero_copy: the slot rank 0's policy parameters live in

    def setup(self, policy_path: str, critic_path: str, master_addr: str, master_port: int) -> dict:
        """Join the learner group and build the policy's engine, and the critic's when
        ``ppo.estimator=gae`` (``critic_path`` is unused otherwise). Collective: call on every
        rank."""
        self.init_distributed(master_addr, master_port)
        dtype, micro, accum = (
            self.cfg.model.dtype,
            self.cfg.ppo.micro_batch_size,
            self.sizes.grad_accum_steps,
        )
        # With LoRA (model.lora_rank, model.critic_lora_rank) only the adapters train.
        policy = self.with_lora(load_policy(policy_path, dtype), "policy", "causal", policy_path)
        self.policy = self.make_engine(policy, self.cfg.learner.lr, micro, accum)
        if self.has_critic:
            critic = load_critic(critic_path, dtype)
            critic = self.with_lora(critic, "critic", "token_cls", critic_path)
            self.critic = self.make_engine(critic, self.cfg.learner.critic_lr, micro, accum)
        # Dropout off: the PPO ratio must compare the same function before and after.
        for engine in self.engines().values():
            engine.eval()
        return self.setup_info()

    def engines(self) -> dict:
        """The engines this learner trains, by checkpoint directory name."""
        out = {"policy": self.policy}
        if self.critic is not None:
            out["critic"] = self.critic
        return out

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self.save_engines(ckpt_dir, self.engines())

    def load_checkpoint(self, ckpt_dir: str, version: int) -> None:
        """Restore the engines this learner has (a checkpoint's critic/ is ignored by a
        critic-free learner; one without critic/ cannot restore a learner that has one)."""
        if self.critic is not None and not (Path(ckpt_dir) / "critic").is_dir():
            raise RuntimeError(
                f"cannot load {ckpt_dir}: it holds no critic/ (saved by a run with a "
                f"critic-free ppo.estimator) and ppo.estimator=gae needs one"
            )
        self.load_engines(ckpt_dir, self.engines())
        self.version = version

    def setup_info(self) -> dict:
        params = self.policy.module.parameters()
        return {"policy_params": sum(getattr(p, "ds_numel", p.numel()) for p in params)}

    # ----------------------------------------------------------------- PPO

    @torch.no_grad()
    def _old_logprobs_and_values(self, seq, am, P):
        """Log-probs of the current policy, and the critic's values (None without a critic)."""
        mb = self.cfg.ppo.micro_batch_size
        logps, values = [], []
        for i in range(0, seq.shape[0], mb):
            s, a = seq[i : i + mb], am[i : i + mb]
            logp, _ = response_logprobs(self.policy, s, a, P, self.cfg.rollout.temperature)
            logps.append(logp.float())
            if self.critic is not None:
                values.append(response_values(self.critic, s, a, P))
        return torch.cat(logps), torch.cat(values) if values else None

    def _whiten(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        stats = torch.stack([(adv * mask).sum(), (adv * adv * mask).sum(), mask.sum()]).double()
        s, s2, n = self.all_reduce_sum(stats.cpu()).tolist()
        if n < 2:
            return adv * mask
        mean = s / n
        var = (s2 - n * mean * mean) / (n - 1)
        return algo.masked_whiten(
            adv, mask, mean=torch.tensor(mean), var=torch.tensor(max(var, 0.0))
        )

    def _step(self, engine, boundary: bool) -> float:
        """``engine.step()``; at an accumulation boundary, the global norm of the gradients the
        optimizer step applied (before clipping). DeepSpeed reports that norm at ZeRO 1-3 and in
        bf16; its fp32 ZeRO-0 clipping drops it, and ``make_engine`` keeps it in
        ``engine.clip_norm``. Without clipping (``learner.max_grad_norm=0``) nothing computes
        it: at ZeRO 0 every rank holds the full gradients, already averaged over ranks at the
        boundary, so it is taken from them before the step clears them."""
        own = None
        kept = hasattr(engine, "clip_norm") and engine.gradient_clipping() > 0
        if boundary and zero_stage(self.cfg) == 0 and not kept:
            grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
            own = float(torch.stack([g.norm() for g in grads]).norm()) if grads else None
        if kept:
            engine.clip_norm = None
        engine.step()
        reported = engine.get_global_grad_norm() if boundary else None
        if reported is None and kept and boundary:
            reported = engine.clip_norm
        return float(reported) if reported is not None else (own or 0.0)

    def ppo_update(
        self, batch: RolloutBatch, kl_coef: float, seed: int, is_cap: float | None = None
    ) -> dict:
        """One PPO update on this rank's shard; returns metrics averaged over all ranks.
        ``is_cap`` (async mode) turns on the decoupled-PPO weights of stale samples."""
        t0 = time.perf_counter()
        cfg, dev = self.cfg.ppo, self.device
        P = batch.prompt_len
        seq = batch.sequences.to(dev)
        am = batch.attention_mask.to(dev)
        mask = batch.response_mask.to(dev).float()
        scores = batch.scores.to(dev).float()
        ref_logp = batch.ref_logprobs.to(dev).float()

        old_logp, old_values = self._old_logprobs_and_values(seq, am, P)
        critic = self.critic is not None
        if critic:
            old_values = old_values * mask
        with torch.no_grad():
            if critic:
                rewards, kl = algo.kl_penalized_rewards(
                    scores, old_logp, ref_logp, mask, kl_coef, cfg.kl_estimator
                )
                adv, returns = algo.gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
            else:
                # Whole groups on this rank (validate), so the groups are its shard's rows
                # cut every rollout.samples_per_prompt.
                shaped = algo.shaped_scores(
                    cfg.estimator, scores, self.cfg.rollout.samples_per_prompt
                )
                rewards, kl = algo.kl_penalized_rewards(
                    shaped, old_logp, ref_logp, mask, kl_coef, cfg.kl_estimator
                )
                returns = adv = algo.discounted_returns(rewards, mask, cfg.gamma)
        # A non-finite reward, log-prob, value or advantage on any rank: every rank skips the
        # update (deciding together keeps the collectives in step) and the driver counts it.
        # The reasons are gathered too: the driver records rank 0's, whichever rank saw them.
        checks = {
            "scores": scores,
            "ref_logprobs": ref_logp[mask > 0],
            "logprobs": old_logp[mask > 0],
        }
        if critic:
            checks["values"] = old_values[mask > 0]
        checks["advantages"] = adv[mask > 0]
        local = [0.0 if torch.isfinite(t).all() else 1.0 for t in checks.values()]
        seen = self.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        bad = [name for name, n_ranks in zip(checks, seen) if n_ranks > 0]
        if bad:
            return {"skipped": True, "reason": bad, "compute_s": time.perf_counter() - t0}
        raw_adv = adv
        if cfg.whiten_advantages and cfg.estimator in WHITENED_ESTIMATORS:
            adv = self._whiten(adv, mask)
        is_weights = None
        stale = (batch.versions.to(dev) < self.version)[:, None] & (mask > 0)
        if is_cap is not None:
            behaviour = batch.behaviour_logprobs.to(dev).float()
            is_weights, truncated = algo.decoupled_importance_weights(
                old_logp, behaviour, stale, is_cap
            )

        sums: dict[str, float] = {}

        def add(key: str, value) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)

        ratio_max = 0.0
        gen = torch.Generator().manual_seed(seed)
        n, mb, micro = len(batch), self.sizes.minibatch_per_rank, cfg.micro_batch_size
        value_clip = cfg.value_clip_eps if cfg.value_clip_eps > 0 else None
        # seq_mean_token_sum's constant normaliser: the generation budget (Dr. GRPO)
        loss_norm = float(self.cfg.rollout.max_new_tokens)
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, mb):
                for m0 in range(start, start + mb, micro):
                    i = perm[m0 : m0 + micro]
                    s, a, m = seq[i], am[i], mask[i]
                    logp, ent = response_logprobs(
                        self.policy, s, a, P, self.cfg.rollout.temperature, with_entropy=True
                    )
                    pg_loss, st = algo.ppo_policy_loss(
                        logp.float(),
                        old_logp[i],
                        adv[i],
                        m,
                        cfg.clip_eps,
                        importance_weights=None if is_weights is None else is_weights[i],
                        ratio_level=cfg.ratio_level,
                        loss_agg=cfg.loss_agg,
                        loss_norm=loss_norm,
                    )
                    entropy = algo.masked_mean(ent, m)
                    if cfg.loss_agg != "token_mean":  # the bonus is aggregated like the loss
                        bonus = algo.aggregate_loss(ent, m, cfg.loss_agg, loss_norm)
                    else:
                        bonus = entropy
                    boundary = self.policy.is_gradient_accumulation_boundary()
                    loss = pg_loss - cfg.entropy_coef * bonus
                    if cfg.kl_loss_coef > 0:
                        kl_loss = algo.reference_kl_loss(
                            logp.float(), ref_logp[i], m, cfg.loss_agg, loss_norm
                        )
                        loss = loss + cfg.kl_loss_coef * kl_loss
                        add("kl_loss", kl_loss.item())
                    if not torch.isfinite(loss):
                        # this micro-batch contributes nothing (every rank still steps)
                        add("nonfinite_losses", 1)
                        loss = logp.sum() * 0.0
                    self.policy.backward(loss)
                    grad_norm = self._step(self.policy, boundary)
                    if critic:
                        values = response_values(self.critic, s, a, P)
                        v_loss, vst = algo.value_loss(
                            values, old_values[i], returns[i], m, value_clip
                        )
                        v_loss = v_loss * cfg.vf_coef
                        if not torch.isfinite(v_loss):
                            add("nonfinite_losses", 1)
                            v_loss = values.sum() * 0.0
                        self.critic.backward(v_loss)
                        critic_grad_norm = self._step(self.critic, boundary)
                        add("value_loss", v_loss.item())
                        add("value_clipfrac", vst["value_clipfrac"])
                    add("policy_loss", pg_loss.item())
                    add("entropy", entropy.item())
                    add("clipfrac", st["clipfrac"])
                    add("approx_kl", st["approx_kl"])
                    add("ratio_mean", st["ratio_mean"])
                    ratio_max = max(ratio_max, float(st["ratio_max"]))
                    add("micro_steps", 1)
                    if boundary:
                        add("grad_norm", grad_norm)
                        if critic:
                            add("critic_grad_norm", critic_grad_norm)
                        add("optimizer_steps", 1)

        add("nonfinite_losses", 0)
        add("stale_tokens", stale.sum())
        if is_weights is not None:
            add("is_weight_sum", (is_weights * stale).sum())
            add("is_truncated", truncated.sum())
        num_tokens = mask.sum()
        add("kl_sum", (kl * mask).sum())
        add("tokens", num_tokens)
        add("sequences", n)
        add("score_sum", scores.sum())
        add("adv_sum", (raw_adv * mask).sum())
        add("adv_sq_sum", (raw_adv * raw_adv * mask).sum())
        has_returns = critic or cfg.estimator in WHITENED_ESTIMATORS
        if has_returns:
            add("returns_sum", (returns * mask).sum())
        if critic:
            add("ev_res_sq", (((returns - old_values) * mask) ** 2).sum())
            add("ret_sq", ((returns * mask) ** 2).sum())
        keys = sorted(sums)
        total = self.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        t = dict(zip(keys, total.tolist()))

        micro_n, opt_n, tok = t["micro_steps"], max(t["optimizer_steps"], 1.0), max(t["tokens"], 1)
        adv_mean = t["adv_sum"] / tok
        means = ["policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean"]
        means += ["value_clipfrac", "kl_loss"]
        metrics = {f"train/{k}": t[k] / micro_n for k in means if k in t}
        metrics.update(
            {
                "train/grad_norm": t["grad_norm"] / opt_n,
                "train/kl": t["kl_sum"] / tok,
                "train/kl_per_sequence": t["kl_sum"] / t["sequences"],
                "train/kl_coef": kl_coef,
                "train/advantages_mean": adv_mean,
                "train/advantages_std": math.sqrt(max(t["adv_sq_sum"] / tok - adv_mean**2, 0.0)),
                "train/optimizer_steps": t["optimizer_steps"] / self.world_size,
                "fault/nonfinite_losses": t["nonfinite_losses"],
                "train/ratio_max": self.all_reduce_max(ratio_max),
                "train/stale_token_frac": t["stale_tokens"] / tok,
                "train/lr": self.policy.get_lr()[0],
            }
        )
        if has_returns:
            metrics["train/returns_mean"] = t["returns_sum"] / tok
        if critic:
            ret_mean = t["returns_sum"] / tok
            ret_var = t["ret_sq"] / tok - ret_mean**2
            metrics["train/critic_grad_norm"] = t["critic_grad_norm"] / opt_n
            metrics["train/explained_variance"] = (
                1.0 - (t["ev_res_sq"] / tok) / ret_var if ret_var > 0 else 0.0
            )
            metrics["train/critic_lr"] = self.critic.get_lr()[0]
        if is_cap is not None:
            n_stale = max(t["stale_tokens"], 1.0)
            metrics["train/is_weight_mean"] = (
                t["is_weight_sum"] / n_stale if t["stale_tokens"] else 1.0
            )
            metrics["train/is_truncated_frac"] = t["is_truncated"] / n_stale
        metrics["compute_s"] = time.perf_counter() - t0
        return metrics

    # ----------------------------------------------------------------- weight sync

    def sync_manifest(self) -> list[weight_sync.ParamSpec]:
        return weight_sync.manifest_of(self.policy.module)

    def _buckets(self, bucket_bytes: int):
        """Yield (layout, full parameters) for each bucket on rank 0 (parameters None
        elsewhere), gathered only while the consumer handles that bucket. Under ZeRO-3 every
        rank takes part in gathering, so every rank must iterate this."""
        manifest = self.sync_manifest()
        params = [p for _, p in weight_sync.sync_params(self.policy.module)]
        for bucket in weight_sync.plan_buckets(manifest, bucket_bytes):
            ps = params[bucket.start : bucket.stop]
            with self.gathered(ps):
                yield bucket, ps if self.rank == 0 else None

    def host_weight_sync(self) -> int:
        """Host the store every weight-sync group of this run meets through (once, bound at
        port 0; each group uses a prefix of its own) and return its port for the members'
        ``join_weight_sync``."""
        assert self.rank == 0, "only learner rank 0 hosts the weight-sync store"
        if self.sync_store is None:
            self.sync_store = host_store(self.cfg.sync.timeout_s)
        return self.sync_store.port

    def join_weight_sync(self, host, port, rank, world_size, prefix, backend, timeout_s) -> None:
        """Join as rank 0, through the store ``host_weight_sync`` hosts (or, without one, a
        store opened at ``port``)."""
        assert self.rank == 0, "only learner rank 0 joins the weight-sync group"
        self.sync_group = weight_sync.SyncGroup(
            host, port, rank, world_size, prefix, backend, timeout_s, store=self.sync_store
        )

    def broadcast_weights(self, bucket_bytes: int, version: int, verify: bool) -> dict:
        """Send the policy to the generators (call on every rank; rank 0 sends)."""
        t0 = time.perf_counter()
        buckets = self._buckets(bucket_bytes)
        if self.rank == 0:
            try:
                digest = weight_sync.send(self.sync_group, buckets, verify)
            except Exception:
                # The group broke (a generator was lost): still take part in gathering the
                # remaining buckets, or the other ranks would wait in the all-gather for ever.
                for _ in buckets:
                    pass
                raise
        else:
            for _ in buckets:
                pass
            digest = None
        self.version = version
        return {"version": version, "checksum": digest, "compute_s": time.perf_counter() - t0}

    def host_shm_sync(self, bucket_bytes: int, zero_copy: bool = False) -> dict:
        """``sync.backend=shm``: make rank 0's shared memory (once per layout) and return
        ``{"handles": [...], "zero_copy": bool}`` for the generators to attach through. With
        ``zero_copy`` asked for and an engine that allows it (``can_share_weights``), the
        policy's parameters move into one slot that the generators read as they are
        (``weight_sync.ShmLive``); otherwise two slots each sync writes into in turn
        (``weight_sync.ShmSlots``)."""
        assert self.rank == 0, "only learner rank 0 holds the shared-memory slots"
        manifest = self.sync_manifest()
        key = (tuple(manifest), bucket_bytes)
        if zero_copy and self.can_share_weights(manifest):
            if self.shm_live is None or self.shm_live.key != key:
                if self.shm_live is not None:
                    self.shm_live.close()
                params = [p for _, p in weight_sync.sync_params(self.policy.module)]
                self.shm_live = weight_sync.ShmLive(params, manifest, bucket_bytes)
            return {"handles": self.shm_live.handles, "zero_copy": True}
        if self.shm_slots is None or self.shm_slots.key != key:
            if self.shm_slots is not None:
                self.shm_slots.close()
            self.shm_slots = weight_sync.ShmSlots(manifest, bucket_bytes)
        return {"handles": self.shm_slots.handles, "zero_copy": False}

    def can_share_weights(self, manifest: list[weight_sync.ParamSpec]) -> bool:
        """Whether the optimizer steps the policy module's own parameters, so that the
        generators can read them where they are: one rank, on CPU, ZeRO-0, no bf16/fp16
        engine (whose optimizer keeps its own flat copies), one dtype throughout (a
        checkpoint's ``torch.save`` refuses one storage viewed as two types)."""
        engine = self.policy
        return (
            self.world_size == 1
            and self.device.type == "cpu"
            and zero_stage(self.cfg) == 0
            and not engine.bfloat16_enabled()
            and not engine.fp16_enabled()
            and len({s.dtype for s in manifest}) == 1
        )

    def share_weights(self, version: int) -> dict:
        """``sync.zero_copy``: the generators read the policy's parameters where they are;
        only check that every one is still in the shared slot (one found moved is copied
        back and pointed at it again, counted in ``moved``) and take ``version``."""
        t0 = time.perf_counter()
        moved = self.shm_live.home()
        self.version = version
        return {
            "version": version,
            "checksum": None,
            "moved": moved,
            "compute_s": time.perf_counter() - t0,
        }

    def shared_checksum(self) -> str:
        """The checksum of the parameters in the shared slot (``sync.zero_copy``), for a
        generator that attached afresh."""
        return self.shm_live.checksum()

    def write_weights(self, bucket_bytes: int, version: int, verify: bool) -> dict:
        """``sync.backend=shm``: pack the policy into rank 0's next slot; the generators then
        attach to ``slot``. Call on every rank (under ZeRO-3 every rank gathers)."""
        t0 = time.perf_counter()
        buckets = self._buckets(bucket_bytes)
        if self.rank == 0:
            slot, digest = self.shm_slots.write(buckets, verify)
        else:
            for _ in buckets:
                pass
            slot = digest = None
        self.version = version
        return {
            "version": version,
            "checksum": digest,
            "slot": slot,
            "compute_s": time.perf_counter() - t0,
        }

    def weight_buckets(self, bucket_bytes: int, version: int, verify: bool) -> tuple[dict, list]:
        """Fallback transport: (metadata, the policy's buckets as CPU tensors) for Ray's object
        store; called with ``num_returns=2`` so the driver never fetches the weights. Call on
        every rank; rank 0 returns the buckets."""
        t0 = time.perf_counter()
        plan, buckets = [], []
        for bucket, ps in self._buckets(bucket_bytes):
            if ps is not None:
                plan.append(bucket)
                buckets.append(weight_sync.flat_bucket(bucket, ps))
        self.version = version
        digest = weight_sync.buckets_checksum(plan, buckets) if verify and self.rank == 0 else None
        meta = {"version": version, "checksum": digest, "compute_s": time.perf_counter() - t0}
        return meta, buckets

    def policy_checksum(self) -> str | None:
        """Checksum of what a sync sends: the full policy, or its LoRA adapters (collective
        under ZeRO-3; the value is on rank 0)."""
        tensors = (t for _, ps in self._buckets(64 << 20) if ps is not None for t in ps)
        digest = weight_sync.checksum(tensors)  # hashed while each bucket is gathered
        return digest if self.rank == 0 else None

    def policy_state(self) -> dict | None:
        """The full policy weights on rank 0 as CPU tensors (tests, export)."""
        return self.full_state(self.policy.module)

    def export_policy(self, out_dir: str, tokenizer_path: str) -> str | None:
        return self.export(self.policy.module, out_dir, tokenizer_path)
