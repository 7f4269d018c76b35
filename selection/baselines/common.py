"""Plumbing shared by the baseline selectors: gather factors over ranks, agree on one selection,
turn scores into a top-k Selection with uniform weights. No selection math lives here."""

from __future__ import annotations

from typing import Any

import torch

from optsel import distributed
from optsel.selection.base import Selection, split_local, timed  # noqa: F401  (re-exported)
from optsel.selection.capture import Factors, gather_factors  # noqa: F401  (re-exported for the baselines)
from optsel.selection.solvers import uniform_topk


def compute_dtype(factors_or_tensor: Factors | torch.Tensor, choice: str = "auto") -> torch.dtype:
    """float64 for float64 models, else float32 (``choice`` overrides), as FTW does."""
    if choice != "auto":
        return getattr(torch, choice)
    ref = factors_or_tensor.A[0] if isinstance(factors_or_tensor, Factors) else factors_or_tensor
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def agree(indices: torch.Tensor, k: int, comm: distributed.CommCounter | None = None) -> torch.Tensor:
    """Rank 0's indices [s <= k] on every rank (last-bit differences of reductions across ranks
    must not split the selection); a no-op on one process."""
    if not distributed.is_distributed():
        return indices
    packed = torch.full((k,), -1, dtype=torch.int64)
    packed[: indices.numel()] = indices
    packed = distributed.broadcast(packed, 0, comm)
    return packed[packed >= 0]


def uniform_selection(indices: torch.Tensor, pool_sizes: list[int], timings: dict[str, float],
                      diagnostics: dict[str, Any] | None = None, utility: torch.Tensor | None = None) -> Selection:
    """Selection of ``indices`` (global, any order) with weight 1/s each; indices sorted."""
    indices = indices.to(torch.int64).cpu().sort().values
    weights = torch.full((indices.numel(),), 1.0 / max(indices.numel(), 1), dtype=torch.float64)
    local_idx, local_w = split_local(indices, weights, pool_sizes, distributed.info().rank)
    return Selection(indices=indices, weights=weights, local_indices=local_idx, local_weights=local_w,
                     pool_size=sum(pool_sizes), utility=None if utility is None else utility.detach().cpu(),
                     timings=timings, diagnostics=diagnostics or {})


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest global scores [N] (ties by lower index, non-finite last)."""
    return uniform_topk(scores.double().cpu(), min(k, scores.numel())).support


def check_budget(budget: int) -> int:
    if budget < 1:
        raise ValueError(f"budget: must be >= 1, got {budget}")
    return int(budget)


def check_chunk_size(name: str, value: int | None) -> None:
    """A samples-per-pass option: None (whole pool) or >= 1; the error names ``name``."""
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be >= 1 or null, got {value}")
