"""The batch that travels between the pools (pure torch: no ray, no transformers).

Layout, as in OpenRLHF's ``Experience``: every sequence is ``[prompt | response]`` with the
prompt left-padded to width ``P`` and the response right-padded to width ``R``, so response
token ``t`` of every row sits at column ``P + t`` and is predicted by the logits at ``P + t - 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    sequences: Tensor  # (B, P + R) long
    attention_mask: Tensor  # (B, P + R) long, 0 on padding
    response_mask: Tensor  # (B, R) float, 1 on response tokens (EOS included)
    behaviour_logprobs: Tensor  # (B, R) log-probs of the sampling policy (logits / temperature)
    prompt_len: int  # P
    prompts: list[str]
    responses: list[str]
    prompt_ids: list[int]  # index of each sample's prompt in the dataset
    versions: Tensor  # (B,) long, policy version that sampled each row
    truncated: Tensor  # (B,) bool, response hit the length limit without EOS
    scores: Tensor | None = None  # (B,) reward of each response
    ref_logprobs: Tensor | None = None  # (B, R) reference policy log-probs
    # what the generators report, added up over a step's chunks (dropped samples included)
    compute_s: float = 0.0  # the generators' compute (a step's: the busiest generator's)
    generated_tokens: int = 0  # response tokens sampled
    worker: str = ""  # the ``host:pid`` of the generator of a chunk ("" once chunks are merged)
    chunks_per_worker: tuple[int, ...] = ()  # a step's chunks taken by each generator slot
    # per sample, filled in by the driver
    origins: list[tuple] | None = None  # ledger origin of each sample (``ledger.chunk_origins``)
    reward_parts: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,) each function's
    # multi-turn rollouts (``rollout.env``): per sample, its turns, tool calls, how it ended
    # (``envs.episodes``); (B, R) turn rewards on each turn's last sampled token, if asked for
    episodes: list[dict] | None = None
    token_rewards: Tensor | None = None
    reward_timeouts: int = 0  # chunks whose reward function ran out of reward.timeout_s

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_len(self) -> int:
        return self.sequences.shape[1] - self.prompt_len

    def select(self, idx: list[int] | Tensor) -> RolloutBatch:
        """The samples ``idx``: every per-sample field (tensors, lists, reward parts) taken
        along; the chunk-level figures (``compute_s`` ...) kept as they are."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        idx_l = idx_t.tolist()
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx_t]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx_l]
            elif f.name == "reward_parts":
                out[f.name] = {name: part[idx_t] for name, part in v.items()}
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def split(self, n: int) -> list[RolloutBatch]:
        """``n`` contiguous shards of equal size (the caller guarantees divisibility)."""
        size = len(self) // n
        return [self.select(list(range(i * size, (i + 1) * size))) for i in range(n)]

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """Concatenate batches of different prompt/response widths (re-padding both sides)."""
        P = max(b.prompt_len for b in batches)
        R = max(b.response_len for b in batches)

        def widen(b: RolloutBatch) -> dict:
            lp, rp = P - b.prompt_len, R - b.response_len
            seq = torch.nn.functional.pad(b.sequences, (lp, rp), value=pad_token_id)
            am = torch.nn.functional.pad(b.attention_mask, (lp, rp), value=0)
            d = {
                "sequences": seq,
                "attention_mask": am,
                "response_mask": torch.nn.functional.pad(b.response_mask, (0, rp)),
                "behaviour_logprobs": torch.nn.functional.pad(b.behaviour_logprobs, (0, rp)),
            }
            for name in ("ref_logprobs", "token_rewards"):
                if getattr(b, name) is not None:
                    d[name] = torch.nn.functional.pad(getattr(b, name), (0, rp))
            return d

        widened = [widen(b) for b in batches]
        out: dict = {
            "prompt_len": P,
            "compute_s": sum(b.compute_s for b in batches),
            "generated_tokens": sum(b.generated_tokens for b in batches),
        }
        parts = [b.reward_parts for b in batches]
        if parts[0] and all(p.keys() == parts[0].keys() for p in parts):
            out["reward_parts"] = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        for f in dataclasses.fields(RolloutBatch):
            if f.name in (*out, *CHUNK_FIELDS):
                continue
            vals = [w.get(f.name, getattr(b, f.name)) for w, b in zip(widened, batches)]
            if any(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], Tensor):
                out[f.name] = torch.cat(vals)
            else:
                out[f.name] = [x for v in vals for x in v]
        return RolloutBatch(**out)

    @classmethod
    def from_dict(cls, d: dict) -> RolloutBatch:
        """``dataclasses.asdict`` read back (async pending samples); a record written before
        the typed fields (with ``extra``) is read too."""
        d = dict(d)
        extra = d.pop("extra", None) or {}
        d.setdefault("compute_s", extra.get("compute_s", 0.0))
        d.setdefault("generated_tokens", extra.get("num_tokens", 0))
        d.setdefault("worker", extra.get("worker", ""))
        return cls(**d)


CHUNK_FIELDS = (
    "worker",
    "chunks_per_worker",
    "reward_parts",
    "compute_s",
    "generated_tokens",
    "reward_timeouts",
)
"""The fields of ``RolloutBatch`` that describe a chunk or a step rather than each sample:
``concat`` adds up the figures and leaves the rest to the caller."""


@dataclass
class UpdateResult:
    """What a learner rank's update returns; rank 0's metrics are averaged over the ranks."""

    metrics: dict[str, float] = field(default_factory=dict)  # ``metric_keys`` keys
    compute_s: float = 0.0
    skipped: tuple[str, ...] = ()
    """Not empty: the update was refused (every rank skipped it) because these quantities
    were not finite (``scores``, ``logprobs``, ...); nothing was trained."""
    trained: list[int] = field(default_factory=list)
    """Per sample of the batch (in its order): how many passes of the minibatch loop trained
    it, counted by the loop itself (``ppo.epochs`` each when all went well; 0 when skipped).
    The ledger books it."""


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, the same ones HF ``generate`` used while sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
