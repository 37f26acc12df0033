"""Token log-probabilities and entropies from language-model logits.

Both functions work on (B, T, V) logits of any floating dtype and compute in fp32 (fp64 stays
fp64). They walk the batch in row chunks so the fp32 temporaries stay bounded: upcasting a full
bf16 (B, T, V) tensor, or materialising a full log_softmax copy, can cost several GiB for large
vocabularies. Chunks are slices (views) of the input, so a sliced ``logits[:, :-1]`` is never
copied as a whole either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Upper bound on the number of elements in one upcast chunk (2**24 fp32 values = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _map_row_chunks(
    logits: torch.Tensor, fn: Callable[[torch.Tensor, slice, int], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn(chunk_fp32, t_slice, b)`` to (rows, V) slices of (B, T, V) logits; -> (B, T)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    batch, seq, vocab = logits.shape
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    dtype = _compute_dtype(logits.dtype)
    out_rows = []
    for b in range(batch):
        pieces = []
        for start in range(0, seq, rows):
            t_slice = slice(start, min(start + rows, seq))
            pieces.append(fn(logits[b, t_slice].to(dtype), t_slice, b))
        out_rows.append(torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=dtype))
    if not out_rows:
        return logits.new_zeros(0, seq, dtype=dtype)
    return torch.stack(out_rows)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under softmax(logits).

    Formula: log p(y_t) = z_t[y_t] - logsumexp_v z_t[v], identical to
    ``log_softmax(z, -1).gather(-1, y)`` but without materialising the (B, T, V) log-softmax.
    Shapes: logits (B, T, V) float (fp32/bf16/fp16/fp64), labels (B, T) long
    -> (B, T) fp32 (fp64 for fp64 logits).
    Source: OpenRLHF ``models.utils.log_probs_from_logits``; verl ``logprobs_from_logits``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}"
        )

    def chunk_logprobs(z: torch.Tensor, t_slice: slice, b: int) -> torch.Tensor:
        y = labels[b, t_slice].unsqueeze(-1)
        return z.gather(-1, y).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _map_row_chunks(logits, chunk_logprobs)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, computed in fp32.

    Formula: H_t = -sum_v p_v log p_v with p = softmax(z_t); terms with p_v = 0 (e.g. logits at
    -inf from vocabulary masking) contribute 0 instead of 0 * -inf = NaN.
    Shapes: logits (B, T, V) -> (B, T) fp32 (fp64 for fp64 logits).
    Source: verl ``entropy_from_logits``; OpenRLHF ``compute_entropy``.
    """

    def chunk_entropy(z: torch.Tensor, t_slice: slice, b: int) -> torch.Tensor:
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)

    return _map_row_chunks(logits, chunk_entropy)
