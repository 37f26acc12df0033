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

import dataclasses
import time
from pathlib import Path

import torch

from rlhf_dist import algo, weight_sync
from rlhf_dist import metric_keys as K
from rlhf_dist.batch import RolloutBatch, UpdateResult
from rlhf_dist.config import Config, validate, zero_stage
from rlhf_dist.models import load_critic, load_policy, response_logprobs, response_values
from rlhf_dist.roles.deepspeed_rank import DeepSpeedRank
from rlhf_dist.roles.experience import Experience, learner_metrics


class Learner(DeepSpeedRank):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size)
        self.sizes = validate(cfg)
        self.policy = self.critic = None
        self.has_critic = self.estimator.needs_critic
        # seq_mean_token_sum's constant normaliser: the generation budget (Dr. GRPO)
        self.loss_norm = float(cfg.rollout.max_new_tokens)
        self.policy_grad_norm = self.critic_grad_norm = 0.0  # of the last optimizer step
        self.denominators = (1.0, 1.0)  # the minibatch's loss_agg count and tokens, all ranks
        self.version = 0
        self.sender: weight_sync.Sender | None = None  # rank 0's side of the weight sync

    @property
    def estimator(self) -> algo.Estimator:
        """The table's entry for ``ppo.estimator`` (read at each update, as every option)."""
        return algo.estimator(self.cfg.ppo.estimator)

    def setup(self, policy_path: str, critic_path: str, master_addr: str, master_port: int) -> dict:
        """Join the learner group and build the policy's engine, and the critic's when the
        estimator needs one (``critic_path`` is unused otherwise). Collective: call on every
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
                f"critic-free ppo.estimator) and ppo.estimator={self.estimator.name} needs one"
            )
        self.load_engines(ckpt_dir, self.engines())
        self.version = version

    def setup_info(self) -> dict:
        """The policy's size and what a weight sync moves (its manifest)."""
        params = self.policy.module.parameters()
        return {
            "policy_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "sync_manifest": weight_sync.manifest_of(self.policy.module),
        }

    # ----------------------------------------------------------------- PPO

    def ppo_update(
        self, batch: RolloutBatch, kl_coef: float, seed: int, is_cap: float | None = None
    ) -> UpdateResult:
        """One PPO update on this rank's shard; its metrics are averaged over all ranks.
        ``is_cap`` (async mode) turns on the decoupled-PPO weights of stale samples."""
        t0 = time.perf_counter()
        exp, bad = self.prepare(batch, kl_coef, is_cap)
        if bad:
            none = [0] * len(batch)
            return UpdateResult(compute_s=time.perf_counter() - t0, skipped=bad, trained=none)
        totals, ratio_max = self.minibatch_loop(exp, seed)
        metrics = self.update_metrics(exp, totals, ratio_max, kl_coef, is_cap is not None)
        return UpdateResult(metrics, time.perf_counter() - t0, trained=exp.trained.tolist())

    @torch.no_grad()
    def prepare(
        self, batch: RolloutBatch, kl_coef: float, is_cap: float | None
    ) -> tuple[Experience | None, tuple[str, ...]]:
        """This rank's shard turned into an ``Experience``: old log-probs (and values)
        recomputed, advantages from the estimator's table entry, whitened where it says, and
        the decoupled-PPO weights of stale tokens. A non-finite reward, log-prob, value or
        advantage on any rank makes every rank skip the update (deciding together keeps the
        collectives in step); returns ``(None, the names of what was not finite)`` then."""
        cfg, dev = self.cfg.ppo, self.device
        P = batch.prompt_len
        seq, am = batch.sequences.to(dev), batch.attention_mask.to(dev)
        mask = batch.response_mask.to(dev).float()
        scores = batch.scores.to(dev).float()
        ref_logp = batch.ref_logprobs.to(dev).float()
        old_logp, old_values = self._old_logprobs_and_values(seq, am, P)
        if old_values is not None:
            old_values = old_values * mask
        # Whole groups on this rank (validate), so the groups are its shard's rows cut every
        # rollout.samples_per_prompt.
        adv, returns, kl = algo.estimator_advantages(
            self.estimator,
            scores,
            old_logp,
            ref_logp,
            mask,
            kl_coef,
            cfg.kl_estimator,
            cfg.gamma,
            cfg.lam,
            values=old_values,
            group_size=self.cfg.rollout.samples_per_prompt,
            std_eps=cfg.grpo_std_eps,
            token_rewards=None if batch.token_rewards is None else batch.token_rewards.to(dev),
        )
        bad = self._nonfinite(scores, ref_logp, old_logp, old_values, adv, mask)
        if bad:
            return None, bad
        whitened = adv
        if cfg.whiten_advantages and self.estimator.whitened:
            whitened = self._whiten(adv, mask)
        exp = Experience(
            seq,
            am,
            mask,
            P,
            old_logp,
            ref_logp,
            whitened,
            adv,
            returns,
            kl,
            scores,
            old_values,
            stale=(batch.versions.to(dev) < self.version)[:, None] & (mask > 0),
        )
        self._weigh(exp, batch.behaviour_logprobs.to(dev).float(), is_cap)
        return exp, ()

    def _weigh(self, exp: Experience, behaviour: torch.Tensor, is_cap: float | None) -> None:
        """The per-token weights of the policy loss: decoupled PPO's for the stale tokens
        (async mode, ``is_cap``), and ``ppo.rollout_correction``'s for the others, whose
        behaviour log-probs came from the sampling engine at the learner's own weights (the
        mismatch statistics are taken over them, whatever the mode)."""
        cfg = self.cfg.ppo
        if is_cap is not None:
            exp.is_weights, exp.is_truncated = algo.decoupled_importance_weights(
                exp.old_logp, behaviour, exp.stale, is_cap
            )
        fresh = (exp.mask > 0) & ~exp.stale
        corrected, exp.correction = algo.rollout_correction(
            cfg.rollout_correction,
            exp.old_logp,
            behaviour,
            fresh,
            tis_cap=cfg.tis_cap,
            mis_low=cfg.mis_low,
            mis_high=cfg.mis_high,
            mis_level=cfg.mis_level,
            icepop_low=cfg.icepop_low,
            icepop_high=cfg.icepop_high,
        )
        exp.fresh_tokens = float(fresh.sum())
        weights = exp.is_weights
        if cfg.rollout_correction != "none":
            weights = corrected if weights is None else weights * corrected
        exp.loss_weights = weights

    def _nonfinite(self, scores, ref_logp, old_logp, old_values, adv, mask) -> tuple[str, ...]:
        """The quantities not finite on any rank (gathered, so every rank decides alike and
        the driver records rank 0's answer whichever rank saw them)."""
        valid = mask > 0
        checks = {"scores": scores, "ref_logprobs": ref_logp[valid], "logprobs": old_logp[valid]}
        if old_values is not None:
            checks["values"] = old_values[valid]
        checks["advantages"] = adv[valid]
        local = [0.0 if torch.isfinite(t).all() else 1.0 for t in checks.values()]
        seen = self.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        return tuple(name for name, n_ranks in zip(checks, seen) if n_ranks > 0)

    def minibatch_loop(self, exp: Experience, seed: int) -> tuple[dict[str, float], float]:
        """``ppo.epochs`` passes over the shard in minibatches (a fresh order each epoch,
        seeded by ``seed``), each of micro-batches whose gradients DeepSpeed accumulates (and
        averages across ranks) before one optimizer step. Each loss is defined over the whole
        minibatch (``algo.aggregate_loss``): its token or sequence count, summed over the
        micro-batches and all-reduced over the ranks once per minibatch, divides every
        micro-batch's sum. Returns this rank's sums of the statistics and the largest ratio;
        ``trained`` counts, per sample, the passes that trained it."""
        sums: dict[str, float] = {}
        ratio_max = 0.0
        gen = torch.Generator().manual_seed(seed)
        n, mb, micro = len(exp), self.sizes.minibatch_per_rank, self.cfg.ppo.micro_batch_size
        for _ in range(self.cfg.ppo.epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, mb):
                self.denominators = self._minibatch_counts(exp.mask[perm[start : start + mb]])
                for m0 in range(start, start + mb, micro):
                    idx = perm[m0 : m0 + micro]
                    stats = self._micro_step(exp, idx)
                    ratio_max = max(ratio_max, stats.pop("ratio_max"))
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
        return sums, ratio_max

    def _minibatch_counts(self, mask: torch.Tensor) -> tuple[float, float]:
        """(the minibatch's count for ``ppo.loss_agg``, its valid tokens), summed over every
        rank's part of it: what its losses are divided by (the policy's, the critic's)."""
        local = torch.stack(
            [algo.loss_denominator(mask, self.cfg.ppo.loss_agg), algo.loss_denominator(mask)]
        )
        agg, tokens = self.all_reduce_sum(local.cpu()).tolist()
        return agg, tokens

    def _micro_step(self, exp: Experience, i: torch.Tensor) -> dict[str, float]:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one
        micro-batch, for the policy and the critic; its statistics."""
        cfg, P = self.cfg.ppo, exp.prompt_len
        s, a, m = exp.sequences[i], exp.attention_mask[i], exp.mask[i]
        exp.trained[i.cpu()] += 1  # counted where the rows are taken: what trains is counted
        logp, ent = response_logprobs(
            self.policy, s, a, P, self.cfg.rollout.temperature, with_entropy=True
        )
        logp = logp.float()
        pg_loss, st = algo.ppo_policy_loss(
            logp,
            exp.old_logp[i],
            exp.advantages[i],
            m,
            cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high,
            importance_weights=None if exp.loss_weights is None else exp.loss_weights[i],
            ratio_level=cfg.ratio_level,
            loss_agg=cfg.loss_agg,
            loss_norm=self.loss_norm,
            loss_denominator=self.denominators[0],
        )
        entropy = algo.masked_mean(ent, m)  # reported: this micro-batch's token mean
        tokens = float(m.sum())  # the statistics' weight: token means over the whole update
        # the bonus is aggregated like the loss, over the minibatch
        agg = (cfg.loss_agg, self.loss_norm, self.denominators[0])
        bonus = algo.aggregate_loss(ent, m, *agg)
        boundary = self.policy.is_gradient_accumulation_boundary()
        loss = pg_loss - cfg.entropy_coef * bonus
        out = {"stat_tokens": tokens}
        if cfg.kl_loss_coef > 0:
            kl_loss = algo.reference_kl_loss(logp, exp.ref_logp[i], m, *agg)
            loss = loss + cfg.kl_loss_coef * kl_loss
            out["kl_loss"] = kl_loss.item()
        out["nonfinite_losses"] = self._backward_and_step(self.policy, loss, logp)
        if boundary:
            out.update(grad_norm=self.policy_grad_norm, optimizer_steps=1.0)
        if self.critic is not None:
            out.update(self._critic_step(exp, i, boundary, tokens))
        out.update(
            policy_loss=pg_loss.item(),
            entropy=entropy.item() * tokens,
            clipfrac=float(st["clipfrac"]) * tokens,
            approx_kl=float(st["approx_kl"]) * tokens,
            ratio_mean=float(st["ratio_mean"]) * tokens,
            ratio_max=float(st["ratio_max"]),
        )
        return out

    def _backward_and_step(self, engine, loss: torch.Tensor, graph: torch.Tensor) -> float:
        """Backward and step of one engine; a non-finite loss contributes nothing (every
        rank still steps) and counts 1. The engine's gradient norm is kept for the metrics."""
        bad = 0.0
        if not torch.isfinite(loss):
            bad, loss = 1.0, graph.sum() * 0.0
        boundary = engine.is_gradient_accumulation_boundary()
        # The loss is the micro-batch's share of the minibatch's: no division by the
        # accumulation steps, and DeepSpeed's mean over the ranks undone (their shares add up).
        engine.backward(loss * self.world_size, scale_wrt_gas=False)
        norm = self._step(engine, boundary)
        if engine is self.policy:
            self.policy_grad_norm = norm
        else:
            self.critic_grad_norm = norm
        return bad

    def _critic_step(
        self, exp: Experience, i: torch.Tensor, boundary: bool, tokens: float
    ) -> dict[str, float]:
        cfg = self.cfg.ppo
        s, a, m = exp.sequences[i], exp.attention_mask[i], exp.mask[i]
        values = response_values(self.critic, s, a, exp.prompt_len)
        value_clip = cfg.value_clip_eps if cfg.value_clip_eps > 0 else None
        v_loss, vst = algo.value_loss(
            values, exp.old_values[i], exp.returns[i], m, value_clip, self.denominators[1]
        )
        v_loss = v_loss * cfg.vf_coef
        out = {"nonfinite_losses": self._backward_and_step(self.critic, v_loss, values)}
        # weighed by the micro-batch's tokens, as the policy's statistics (TOKEN_MEANS)
        out.update(value_loss=v_loss.item(), value_clipfrac=float(vst["value_clipfrac"]) * tokens)
        if boundary:
            out["critic_grad_norm"] = self.critic_grad_norm
        return out

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
        """``algo.masked_whiten`` with the statistics of every rank's valid tokens; the
        variance divided by N - ``whiten_ddof``, as the estimator's source does."""
        stats = torch.stack([(adv * mask).sum(), (adv * adv * mask).sum(), mask.sum()]).double()
        s, s2, n = self.all_reduce_sum(stats.cpu()).tolist()
        ddof = self.estimator.whiten_ddof
        if n <= ddof or n < 2:
            return adv * mask
        mean = s / n
        var = (s2 - n * mean * mean) / (n - ddof)
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

    def update_metrics(
        self, exp: Experience, sums: dict, ratio_max: float, kl_coef: float, async_is: bool
    ) -> dict[str, float]:
        """The update's metrics (``metric_keys``), summed over the ranks then averaged."""
        mask = exp.mask
        adv = exp.raw_advantages
        sums = {"nonfinite_losses": 0.0, **sums}
        sums.update(
            stale_tokens=float(exp.stale.sum()),
            kl_sum=float((exp.kl * mask).sum()),
            tokens=float(mask.sum()),
            sequences=float(len(exp)),
            adv_sum=float((adv * mask).sum()),
            adv_sq_sum=float((adv * adv * mask).sum()),
            returns_sum=float((exp.returns * mask).sum()),
        )
        if async_is:
            sums["is_weight_sum"] = float((exp.is_weights * exp.stale).sum())
            sums["is_truncated"] = float(exp.is_truncated.sum())
        c, n = exp.correction, exp.fresh_tokens
        sums.update(
            fresh_tokens=n,
            diff_sum=float(c["logprob_diff_mean"]) * n,
            rho_sum=float(c["ratio_mean"]) * n,
            corrected=float(c["corrected_frac"]) * n,
        )
        if exp.old_values is not None:
            sums["ev_res_sq"] = float((((exp.returns - exp.old_values) * mask) ** 2).sum())
            sums["ret_sq"] = float(((exp.returns * mask) ** 2).sum())
        keys = sorted(sums)
        total = self.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        t = dict(zip(keys, total.tolist()))
        metrics = learner_metrics(t, self.world_size, kl_coef, self.estimator.has_returns)
        metrics[K.RATIO_MAX] = self.all_reduce_max(ratio_max)
        c = exp.correction
        metrics[K.LOGPROB_DIFF_MAX] = self.all_reduce_max(float(c["logprob_diff_max"]))
        metrics[K.ENGINE_RATIO_MAX] = self.all_reduce_max(float(c["ratio_max"]))
        metrics[K.ENGINE_RATIO_MIN] = -self.all_reduce_max(-float(c["ratio_min"]))
        metrics[K.LR] = self.policy.get_lr()[0]
        if self.critic is not None:
            metrics[K.CRITIC_LR] = self.critic.get_lr()[0]
        return metrics

    # ----------------------------------------------------------------- weight sync

    def _buckets(self, bucket_bytes: int):
        """Yield (layout, full parameters) for each bucket on rank 0 (parameters None
        elsewhere), gathered only while the consumer handles that bucket. Under ZeRO-3 every
        rank takes part in gathering, so every rank must iterate this."""
        manifest = weight_sync.manifest_of(self.policy.module)
        params = [p for _, p in weight_sync.sync_params(self.policy.module)]
        for bucket in weight_sync.plan_buckets(manifest, bucket_bytes):
            ps = params[bucket.start : bucket.stop]
            with self.gathered(ps):
                yield bucket, ps if self.rank == 0 else None

    def open_weight_sync(
        self,
        backend: str,
        bucket_bytes: int,
        membership: weight_sync.Membership | None = None,
        zero_copy: bool = False,
    ) -> dict:
        """Rank 0: set up the sender of transport ``backend`` (a new one when the transport
        changed), or join ``membership`` (a collective's group); returns what the generators'
        receivers need (``Channel.info``). ``zero_copy`` asks for the generators to read the
        policy's parameters where they are; ``info["zero_copy"]`` says whether they do (a
        transport that can, shared memory, on an engine that allows it: ``can_share_weights``)."""
        assert self.rank == 0, "only learner rank 0 sends the weights"
        if self.sender is None or self.sender.backend != backend:
            if self.sender is not None:
                self.sender.close()
            self.sender = weight_sync.sender(backend, self.cfg.sync.timeout_s)
        manifest = weight_sync.manifest_of(self.policy.module)
        share = zero_copy and self.can_share_weights(manifest)
        params = [p for _, p in weight_sync.sync_params(self.policy.module)]
        info = self.sender.open(params, manifest, bucket_bytes, membership, share)
        return {"zero_copy": False, **info}  # a transport that shares says so itself

    def send_weights(
        self, bucket_bytes: int, version: int, verify: bool, full: bool = False
    ) -> tuple[weight_sync.Receipt, object]:
        """Send the policy as ``version`` (call on every rank: under ZeRO-3 every rank takes
        part in gathering; rank 0 sends). Returns the receipt and what the receivers need of
        this send (the transport's handoff; None on the other ranks)."""
        t0 = time.perf_counter()
        buckets = self._buckets(bucket_bytes)
        if self.rank == 0:
            receipt, handoff = self.sender.send(buckets, version, verify, full)
        else:
            for _ in buckets:
                pass
            receipt, handoff = weight_sync.Receipt(version, 0, None, 0.0), None
        self.version = version
        return dataclasses.replace(receipt, seconds=time.perf_counter() - t0), handoff

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
