"""The sample ledger: one line per sample a PPO step took, in ``<run_dir>/samples.jsonl``.

Each line says where the sample came from and what became of it:

| field | meaning |
|---|---|
| ``step`` | the PPO step (1-based) that trained it, or would have (``dropped``) |
| ``epoch``, ``row`` | the data position: epoch over the prompts and the prompt's row |
| ``sample`` | its index among the ``rollout.samples_per_prompt`` samples of that prompt |
| ``chunk``, ``seed`` | the chunk of the step's chunk plan that sampled it, and that chunk's seed |
| ``slot``, ``worker`` | the generator slot that sampled it and that worker's ``host:pid`` |
| ``version``, ``staleness`` | the policy version that sampled it; versions it lagged the learner |
| ``reward`` | the reward it was trained with (``reward_parts``: each reward function's own
score, when ``reward.function`` combines several) |
| ``kl`` | k1 KL of the sampling policy to the reference, summed over its response tokens |
| ``length``, ``truncated`` | response tokens (EOS included); cut at ``rollout.max_new_tokens`` |
| ``updates`` | the passes of the learner's minibatch loop that trained it, as the learner
counted them (``ppo.epochs`` when trained; 0 when dropped or its step was skipped) |
| ``turns``, ``tool_calls``, ``tool_errors``, ``ended`` | a multi-turn trajectory's
(``rollout.env``): its turns, tool calls and errors, and how it ended (``done``, or a
failure: ``max_turns``, ``token_cap``, ``timeout``, ``error``, ``invalid_calls``) |
| ``dropped`` | absent when trained; else why not (``nonfinite_step``: the step was skipped;
``stale``: async, too old to train; with ``rollout.drop_uniform_groups``, ``uniform_group``:
its prompt's samples all got the same reward, ``surplus``: its round found more than needed) |
| ``fields`` | the other fields of the prompt's data row (e.g. ``id``, ``answer``), whatever the
data's format; absent when the rows have none |

``run.ledger=false`` turns it off. A resumed run moves the lines of the steps it redoes to
``samples.rolled_back.jsonl``, as it does with ``metrics.jsonl``. ``python -m rlhf_dist.report
RUN_DIR --samples`` summarises it and checks that every prompt of each epoch was trained exactly
``samples_per_prompt`` times.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from rlhf_dist.batch import RolloutBatch
from rlhf_dist.tracking import set_aside_rows

LEDGER_FILE = "samples.jsonl"
ROLLED_BACK_FILE = "samples.rolled_back.jsonl"
UNIFORM = "uniform_group"  # ``dropped``: its prompt's samples all got the same reward
SURPLUS = "surplus"  # ``dropped``: dynamic sampling found more groups than the step lacked
SET_ASIDE = (UNIFORM, SURPLUS)  # dropped whole by design: its prompt is accounted for
META_FILE = "samples.meta.json"  # {"num_prompts", "samples_per_prompt", "updates_per_sample"}


def data_epochs(position: dict, num_prompts: int, taken: int) -> list[int]:
    """The epoch of each of the ``taken`` prompts a step took, from the cursor just after it
    took them (``PromptCursor.state_dict()``): the k-th taken sits at position
    ``epoch * num_prompts + index - taken + k`` of the whole prompt stream."""
    end = position["epoch"] * num_prompts + position["index"]
    return [(end - taken + k) // num_prompts for k in range(taken)]


def chunk_origins(chunks: list, owners: list[int], results: list) -> list[tuple]:
    """Per sample of the chunks' results (in chunk order; a ``None`` result is left out): its
    chunk, the chunk's seed, the generator slot and worker that sampled it, its prompt's
    position among the step's prompts, and its index among that prompt's samples."""
    out, start = [], 0
    for c, (chunk, slot, r) in enumerate(zip(chunks, owners, results)):
        if r is not None:
            per_prompt = len(r) // len(chunk.prompt_ids)  # samples of a prompt are consecutive
            worker = r.worker
            for j in range(len(r)):
                out.append((c, chunk.seed, slot, worker, start + j // per_prompt, j % per_prompt))
        start += len(chunk.prompt_ids)
    return out


def ledger_rows(
    step: int,
    batch: RolloutBatch,
    epochs: list[int],
    learner: int,
    updates: list[int] | None = None,
) -> list[dict]:
    """One row per sample of ``batch``, whose ``origins`` come from ``chunk_origins``;
    ``epochs`` is ``data_epochs`` of the step and ``learner`` the version the step trained;
    ``updates``: how many times the learner says it trained each sample (None: none)."""
    mask = batch.response_mask
    scored = batch.scores is not None and batch.ref_logprobs is not None
    kl = (
        ((batch.behaviour_logprobs - batch.ref_logprobs) * mask).sum(-1).tolist()
        if scored
        else None
    )
    lengths = mask.sum(-1).long().tolist()
    parts = batch.reward_parts if scored else {}
    rows = []
    for j, (chunk, seed, slot, worker, pos, sample) in enumerate(batch.origins):
        version = int(batch.versions[j])
        rows.append(
            {
                "step": step,
                "epoch": epochs[pos],
                "row": batch.prompt_ids[j],
                "sample": sample,
                "chunk": chunk,
                "seed": seed,
                "slot": slot,
                "worker": worker,
                "version": version,
                "staleness": learner - version,
                "reward": float(batch.scores[j]) if scored else None,
                "kl": kl[j] if scored else None,
                "length": lengths[j],
                "truncated": bool(batch.truncated[j]),
                "updates": updates[j] if updates is not None else 0,
            }
        )
        if parts:
            rows[-1]["reward_parts"] = {name: float(part[j]) for name, part in parts.items()}
        if batch.episodes is not None:  # a multi-turn trajectory: its turns and tool calls
            e = batch.episodes[j]
            rows[-1].update(
                turns=e["turns"], tool_calls=e["tool_calls"], tool_errors=e["tool_errors"]
            )
            rows[-1]["ended"] = e["ended"]
    return rows


class SampleLedger:
    def __init__(
        self,
        run_dir: str | Path,
        num_prompts: int,
        samples: int,
        enabled: bool = True,
        fields: dict | None = None,
        updates: int = 1,
    ):
        """``updates``: the passes a trained sample gets (``ppo.epochs``)."""
        self.path = Path(run_dir) / LEDGER_FILE
        self.enabled = enabled
        self.fields = fields or {}  # field -> one value per prompt row (lists or columns)
        if enabled:
            meta = {
                "num_prompts": num_prompts,
                "samples_per_prompt": samples,
                "updates_per_sample": updates,
            }
            self.path.with_name(META_FILE).write_text(json.dumps(meta) + "\n")

    def write(self, rows: list[dict], dropped: str = "") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            for row in rows:
                if self.fields:
                    row = {**row, "fields": {k: v[row["row"]] for k, v in self.fields.items()}}
                if dropped:
                    row = {**row, "dropped": dropped}
                f.write(json.dumps(row, default=str) + "\n")

    def write_step(self, out, state, taken: int) -> None:
        """A recorded step's samples (a ``StepOutcome``; ``state``: the ``RunState`` after
        it), and any it dropped (too stale, or a uniform group). ``taken``: prompts per step,
        unless the outcome says it took more."""
        if not self.enabled:
            return
        taken = out.taken or taken
        epochs = data_epochs(out.data_position["cursor"], state.cursor.size, taken)
        trained_by = state.version - (0 if out.skipped else 1)  # the update's own version
        why = "nonfinite_step" if out.skipped else ""
        updates = out.train.trained or None
        self.write(ledger_rows(state.step, out.batch, epochs, trained_by, updates), why)
        for samples, reason in out.dropped:
            self.write(ledger_rows(state.step, samples, epochs, trained_by), reason)

    def rollback(self, step: int) -> int:
        """Set aside the lines of the steps after ``step`` (a resumed run redoes them)."""
        aside = self.path.with_name(ROLLED_BACK_FILE)
        return set_aside_rows(self.path, aside, lambda row: row["step"] > step)


# ----------------------------------------------------------------------------- queries


def read_ledger(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (was the run made with run.ledger=false?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_meta(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / META_FILE).read_text())


def epoch_coverage(
    rows: list[dict], epoch: int, num_prompts: int, samples: int, updates: int | None = None
) -> dict:
    """Was every prompt of ``epoch`` trained exactly ``samples`` times, each sample index once?
    A sample counts as trained when it was not dropped and, given ``updates`` (the passes a
    trained sample gets, ``ppo.epochs``), when the learner reported training it exactly that
    many times (its ``updates``; a line from before that field counts). A prompt whose whole
    group dynamic sampling set aside (``rollout.drop_uniform_groups``: a uniform group, or a
    surplus one) counts as accounted for, once, instead of trained. Returns the rows missing
    (fewer), repeated (more), the rows whose samples the learner trained another number of
    times (``miscounted``), the number of prompts set aside, and whether it holds."""
    mine = [r for r in rows if r["epoch"] == epoch]
    kept = [r for r in mine if not r.get("dropped")]
    miscounted = sorted(
        {r["row"] for r in kept if updates is not None and r.get("updates", updates) != updates}
    )
    trained = Counter((r["row"], r["sample"]) for r in kept if r["row"] not in miscounted)
    uniform = Counter((r["row"], r["sample"]) for r in mine if r.get("dropped") in SET_ASIDE)
    done = trained + uniform
    missing = sorted(
        i for i in range(num_prompts) if any(done[(i, s)] == 0 for s in range(samples))
    )
    repeated = sorted({i for (i, s), n in done.items() if n > 1 or s >= samples})
    split = sorted({i for (i, _) in uniform if any(trained[(i, s)] for s in range(samples))})
    return {
        "missing": missing,
        "repeated": sorted(set(repeated) | set(split)),  # a group half trained, half dropped
        "miscounted": miscounted,
        "uniform": len({i for (i, _) in uniform}),
        "exact": not missing and not repeated and not split and not miscounted,
    }


def summary_lines(rows: list[dict]) -> list[str]:
    """Per generator slot, per staleness, and reward by response length."""
    trained = [r for r in rows if not r.get("dropped")]
    lines = [
        f"{len(trained)} samples trained in {len({r['step'] for r in trained})} steps; "
        f"{len(rows) - len(trained)} dropped "
        + str(dict(Counter(r["dropped"] for r in rows if r.get("dropped"))) or "")
    ]

    def table(title: str, key, label) -> None:
        groups: dict = defaultdict(list)
        for r in trained:
            groups[key(r)].append(r["reward"])
        lines.append(f"{title:>12} | samples | reward mean")
        for k in sorted(groups):
            v = groups[k]
            lines.append(f"{label(k):>12} | {len(v):7d} | {sum(v) / len(v):11.4f}")

    table("generator", lambda r: r["slot"], str)
    table("staleness", lambda r: r["staleness"], str)
    width = max(1, -(-max((r["length"] for r in trained), default=0) // 4))  # four bins
    table(
        "length",
        lambda r: (r["length"] - 1) // width * width + 1,
        lambda lo: f"{lo}-{lo + width - 1}",
    )
    return lines
