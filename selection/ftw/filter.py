"""Filter: u_i = b_i − (τ/2) K_ii, keep the top m with u > 0
(docs/design.md, "The optimiser-aware utility, the filter and the weight QP")."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FilterResult:
    """filtered: [m'] indices into the pool, by decreasing utility; fallback: fewer than ``budget``
    candidates had u > 0, so the top ``budget`` by u were kept regardless of sign."""

    filtered: torch.Tensor
    num_positive: int
    fallback: bool


def utility(alignment: torch.Tensor, gram_diag: torch.Tensor, curvature: float) -> torch.Tensor:
    """u = b − (τ/2) diag K, [N]."""
    return alignment - 0.5 * curvature * gram_diag


def filter_candidates(u: torch.Tensor, size: int, budget: int) -> FilterResult:
    """Top ``size`` by u among u > 0; if fewer than ``budget`` are positive, the top ``budget`` by u.
    Non-finite utilities rank last. Ties break by index (stable, identical on every rank)."""
    n = u.shape[0]
    safe = torch.where(torch.isfinite(u), u, torch.full_like(u, -torch.inf))
    order = torch.sort(safe, descending=True, stable=True).indices
    positive = int((safe > 0).sum())
    if positive >= min(budget, n):
        keep = min(size, positive)
        return FilterResult(order[:keep], positive, False)
    return FilterResult(order[: min(budget, n)], positive, True)
