"""The generator group: the rollout workers, their chunked work, and the weights they hold.

Work comes as a chunk plan (``rlhf_dist.dispatch.chunk_plan``): prompts cut into chunks, each
with its own seed, dealt to the generators by load. A lost generator's chunk is redone
elsewhere; the generator itself is replaced once none of the group's calls is in flight,
because a new member means a new weight-sync group, and every generator receives the current
weights before it samples again. The group grows and shrinks between steps the same way.
"""

from __future__ import annotations

import ray

from rlhf_dist import metric_keys as K
from rlhf_dist.batch import RolloutBatch
from rlhf_dist.config import Config
from rlhf_dist.dispatch import Chunk, Job, deal
from rlhf_dist.driver.healing import PoolGroup, replace_lost
from rlhf_dist.driver.run_state import RestartBudget
from rlhf_dist.driver.sync_group import WeightSyncGroup
from rlhf_dist.envs.episodes import episode_settings
from rlhf_dist.inputs import Inputs
from rlhf_dist.ledger import chunk_origins
from rlhf_dist.lora import lora_settings
from rlhf_dist.pools import Pool, bundle_of, worker_threads
from rlhf_dist.preflight import context_length
from rlhf_dist.roles import Generator


def _sample(actor, chunk: Chunk, prompts, samples: int) -> ray.ObjectRef:
    """Start one chunk: ``prompts`` are the texts the policy continues (single turn), or
    ``Rows`` (multi-turn: each prompt's data row for its environment)."""
    ids = chunk.prompt_ids
    if isinstance(prompts, Rows):
        return actor.rollout.remote([prompts[i] for i in ids], ids, samples, chunk.seed)
    return actor.generate.remote([prompts[i] for i in ids], ids, samples, chunk.seed)


def engine_of(cfg: Config) -> str:
    """``rollout.engine`` resolved: ``auto`` is vLLM where it is installed and the generators
    have GPUs, HF otherwise."""
    engine = cfg.rollout.engine
    if engine == "auto":
        from rlhf_dist.roles.vllm_generator import vllm_available

        engine = "vllm" if cfg.rollout.num_gpus > 0 and vllm_available() else "hf"
    return engine


def engine_class(cfg: Config, inputs: Inputs) -> tuple[type, dict]:
    """The generators' role class and the keyword arguments only its engine takes."""
    if engine_of(cfg) == "hf":
        return Generator, {}
    from rlhf_dist.roles.vllm_generator import VLLMGenerator

    r = cfg.rollout
    # the longest sequence: the prompt and what follows it (a multi-turn trajectory's tokens,
    # and one more turn's, which may start just under the cap)
    after = r.max_total_tokens + r.max_new_tokens if r.multi_turn else r.max_new_tokens
    longest = r.max_prompt_tokens + after
    ctx = context_length(inputs.policy)
    return VLLMGenerator, dict(
        max_model_len=min(longest, ctx) if ctx else longest, kv_cache_gb=r.vllm_kv_cache_gb
    )


class Rows:
    """The data rows of a prompt source, as an environment's ``reset`` takes them: the
    prompt (its messages, or its text) and every other field of the row."""

    def __init__(self, prompts, messages, fields: dict):
        self.prompts, self.messages, self.fields = prompts, messages, fields

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        prompt = self.messages[i] if self.messages is not None else self.prompts[i]
        return {"prompt": prompt, **{k: v[i] for k, v in self.fields.items()}}


class GeneratorGroup(PoolGroup):
    def __init__(
        self, cfg: Config, inputs: Inputs, budget: RestartBudget, pool: Pool | None = None
    ):
        """``pool``: the generators' pool (tests hand in one without Ray); by default one of
        ``rollout.num_workers`` generators is started."""
        r = cfg.rollout
        self.inputs, self.budget = inputs, budget
        role, engine_kwargs = engine_class(cfg, inputs) if pool is None else (Generator, {})
        self.pool = pool or Pool(
            "rollout",
            role,
            r.num_workers,
            bundle_of(r),
            lambda i: (
                (inputs.policy, inputs.tokenizer, cfg.model.dtype),
                dict(
                    max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    num_gpus=r.num_gpus,
                    add_special_tokens=inputs.add_special_tokens,
                    lora=lora_settings(cfg, "policy"),
                    seed=cfg.run.seed,
                    ref_from_base=cfg.reference.from_base,
                    episodes=episode_settings(cfg),
                    **engine_kwargs,
                ),
            ),
            cfg.ray.placement_timeout_s,
            threads=worker_threads(cfg, "rollout"),
        )
        # multi-turn: what each prompt's environment starts from (train and held-out rows)
        self.rows = self.eval_rows = None
        if r.multi_turn:
            self.rows = Rows(inputs.prompts, inputs.prompt_messages, inputs.prompt_fields)
            self.eval_rows = Rows(
                inputs.eval_prompts, inputs.eval_prompt_messages, inputs.eval_prompt_fields
            )
        self.sync: WeightSyncGroup | None = None
        self.pushed_bytes = 0  # what the last push moved (``sync/bytes``)
        self.on_dispatch = None  # (pool name, slot, task index) after each submission

    def connect(self, sync: WeightSyncGroup) -> None:
        """Join a (new) learner group's weight-sync group; the caller pushes the weights (at
        start too: the generators loaded the same files, but the sync proves they hold them)."""
        if self.sync is not None:  # a rebuilt learner group's: the same hook
            sync.on_dispatch = self.sync.on_dispatch
        self.sync = sync
        self.regroup()

    # ----------------------------------------------------------------- sampling

    def submit(self, slot: int, chunk: Chunk, prompts: list[str], samples: int) -> ray.ObjectRef:
        """Start one chunk of ``data.prompts`` on generator ``slot``."""
        return _sample(self.actors[slot], chunk, self.rows or prompts, samples)

    def generate(
        self, chunks: list[Chunk], prompts: list[str], samples: int, held_out: bool = False
    ) -> RolloutBatch:
        """Sample every chunk (dealt by load, lost chunks redone) into one batch, in chunk
        order whoever sampled them. ``held_out``: the chunks index the held-out prompts
        (evaluation; with an environment its trajectories start from their rows)."""
        source = prompts
        if self.rows is not None:
            source = self.eval_rows if held_out else self.rows
        job = Job(self.pool, chunks, lambda a, c: _sample(a, c, source, samples), self._heal)
        deal(job, on_dispatch=self.on_dispatch)
        self.budget.redone(job.redone)
        batch = RolloutBatch.concat(job.results, self.inputs.pad_token_id)
        expected = sorted(i for c in chunks for i in c.prompt_ids for _ in range(samples))
        if sorted(batch.prompt_ids) != expected:  # the dealing must neither lose nor repeat
            raise RuntimeError("generate: the batch's prompts differ from the prompts dealt")
        batch.compute_s = job.critical_path()
        batch.chunks_per_worker = tuple(job.owner.count(s) for s in range(len(self)))
        batch.origins = chunk_origins(chunks, job.owner, job.results)
        return batch

    def _heal(self, lost: list[int], busy: bool) -> list[int]:
        """Lost generators are replaced once no call of the job is in flight."""
        if busy:
            return []
        version = self.sync.version
        self.replace(lost)
        self.regroup()
        self.push(version)
        self.verify_held(version)  # before the replacements sample
        return list(lost)

    # ----------------------------------------------------------------- membership

    def replace(self, slots: list[int]) -> None:
        replace_lost(self.pool, slots, self.budget)

    def regroup(self) -> None:
        """Form a new weight-sync group with every generator; one found dead (before, or
        while joining) is replaced and the group formed again."""
        while True:
            self.replace(self.dead())
            if self.sync.form(self.actors):
                return

    def push(self, version: int) -> float:
        """Broadcast the learner's policy to every generator as ``version``; verify. A
        generator lost during the sync, or left waiting on the broken group, is replaced, the
        group formed again and the sync redone. Returns the slowest member's compute;
        ``pushed_bytes`` is what it moved (a redone sync counted again)."""
        self.pushed_bytes = 0
        while True:
            moves = self.sync.bytes_per_push  # before: a push may change the transport
            out = self.sync.push(self.actors, version)
            self.pushed_bytes += moves
            if out.regroup:  # the transport changed: form its group and push again
                self.regroup()
                continue
            if not out.lost:
                return out.compute_s
            self.replace(out.lost)
            self.regroup()  # the replacements open their receivers (a collective: a new group)

    def verify_held(self, version: int) -> None:
        """Every generator holds ``version`` and the learner's weights (read from both sides'
        parameters): asserted after a replacement or a new member, before they sample."""
        self.sync.verify_held(self.actors, version)

    def add(self, n: int = 1) -> None:
        """Grow the group: the new membership forms a new sync group and every generator,
        new ones included, receives the current weights."""
        version = self.sync.version
        self.pool.add(n)
        self.regroup()
        self.push(version)
        self.verify_held(version)  # before the new ones sample

    def remove(self, n: int = 1) -> None:
        """Shrink the group (at least one generator stays)."""
        if not 0 < n < len(self):
            raise ValueError(f"cannot remove {n} of {len(self)} generators")
        version = self.sync.version
        for _ in range(n):
            self.pool.remove(len(self) - 1)
        self.regroup()
        self.push(version)

    def wants_one_more(self, auto, row: dict, steps_since_change: int) -> bool:
        """The autoscale rule (``rollout.autoscale``): generation took more than
        ``generate_frac`` of the step, below ``max_workers``, out of cooldown, and the cluster
        has room for one more generator."""
        return bool(
            auto.max_workers
            and K.TIME_GENERATE in row
            and len(self) < auto.max_workers
            and steps_since_change >= auto.cooldown_steps
            and row[K.TIME_GENERATE] > auto.generate_frac * row[K.STEP_TIME]
            and self.pool.has_room()
        )
