"""The target gradient g_V = mean over target samples of their per-sample gradients (docs/design.md#utility-filter-qp).

Held per layer on this rank's blocks as [r, c] slices of the layer's [d_out, d_in] gradient:
G_V[rows, cols] = (1/|V|) Σ_i Δ_i[:, rows]ᵀ A_i[:, cols]. Under data parallelism the target factors
are all-gathered first (|V| is small), so every rank builds exactly its own blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from optsel.selection.capture import Factors
from optsel.selection.preconditioner import LayerBlock


def target_block(A: torch.Tensor, D: torch.Tensor, rows: slice, cols: slice, num_targets: int) -> torch.Tensor:
    """G_V block [r, c] from target factors A [n, T, d_in], D [n, T, d_out] (sum over samples / |V|)."""
    a = A[..., cols].reshape(-1, cols.stop - cols.start)
    d = D[..., rows].reshape(-1, rows.stop - rows.start)
    return d.T @ a / max(num_targets, 1)


class TargetCache:
    """G_V blocks per covered layer, refreshed every ``refresh`` selection steps."""

    def __init__(self, refresh: int):
        self.refresh = refresh
        self.blocks: list[list[torch.Tensor]] | None = None
        self.computed_at: int | None = None
        self.num_targets = 0

    def due(self, step: int) -> bool:
        return self.blocks is None or self.computed_at is None or step - self.computed_at >= self.refresh

    def update(self, factors: Factors, geometry_blocks: list[list[LayerBlock]], step: int) -> None:
        """Rebuild from (already gathered) target factors; one [r, c] tensor per layer block."""
        n = factors.num_samples
        self.blocks = [
            [target_block(A, D, blk.rows, blk.cols, n) for blk in blocks]
            for A, D, blocks in zip(factors.A, factors.D, geometry_blocks)
        ]
        self.computed_at = step
        self.num_targets = n

    def state_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "computed_at": self.computed_at, "num_targets": self.num_targets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocks = state.get("blocks")
        self.computed_at = state.get("computed_at")
        self.num_targets = int(state.get("num_targets", 0))
