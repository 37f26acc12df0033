"""Masked reductions over padded (B, T) token tensors.

Masks are 0/1 tensors (bool or float) with the same shape as the data. Masked-out entries are
selected away with ``torch.where`` rather than multiplied by 0, so garbage in padding (inf/NaN)
never leaks into a result or its gradient.
"""

from __future__ import annotations

import torch

Dim = int | tuple[int, ...] | None


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is 1.

    Formula: sum_i mask_i * x_i, over all entries (``dim=None`` -> 0-dim tensor) or along ``dim``.
    Shapes: x, mask (...) same shape -> () or x reduced along ``dim``.
    Source: standard masked reduction (TRL ``core.masked_mean``, OpenRLHF ``masked_mean``).
    """
    kept = torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1; 0 (never NaN) where the mask is empty.

    Formula: sum_i mask_i * x_i / max(sum_i mask_i, 1). An empty selection has a zero numerator,
    so clamping the count to 1 yields exactly 0, also per-row when ``dim`` is given.
    Shapes: x, mask (...) same shape -> () or x reduced along ``dim``.
    Source: TRL ``core.masked_mean`` / OpenRLHF ``models.utils.masked_mean``.
    """
    count = masked_sum(torch.ones_like(x), mask, dim=dim)
    return masked_sum(x, mask, dim=dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the entries of ``x`` where ``mask`` is 1, as a 0-dim tensor.

    Formula: sum_i mask_i * (x_i - mean)^2 / (n - 1) if ``unbiased`` and n > 1, else divided by n;
    0 when n <= 1 (n = number of selected entries).
    Shapes: x, mask (...) same shape -> ().
    Source: TRL ``core.masked_var`` (Bessel-corrected by default).
    """
    n = masked_sum(torch.ones_like(x), mask)
    centered = x - masked_mean(x, mask)
    sq_sum = masked_sum(centered * centered, mask)
    # For n <= 1 the squared sum is exactly 0, so clamping the denominator yields 0, not NaN.
    denom = (n - 1) if unbiased else n
    return sq_sum / denom.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: torch.Tensor | float | None = None,
    var: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance over the masked entries.

    Formula: y = (x - mean) / sqrt(var + eps); if not ``shift_mean``, y += mean (keeps the original
    mean, only rescales). ``mean``/``var`` default to ``masked_mean(x, mask)`` and
    ``masked_var(x, mask)`` (unbiased); pass them to use statistics gathered elsewhere, e.g. global
    statistics all-reduced across data-parallel ranks. Masked entries of the output are 0.
    Shapes: x, mask (...) same shape -> same shape as x.
    Source: TRL ``core.masked_whiten``; OpenRLHF ``masked_normalize`` / experience whitening.
    """
    if mean is None:
        mean = masked_mean(x, mask)
    if var is None:
        var = masked_var(x, mask)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_as_bool(mask), whitened, torch.zeros((), dtype=x.dtype, device=x.device))
