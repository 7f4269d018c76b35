"""Alignment b_i = ⟨P g_i, g_V − ρ m̂⟩ by the target-side trick (docs/design.md#factored-gradients).

M = P ⊙ (G_V − ρ m̂) moves the preconditioner to the target side, so for a linear layer
b_i = Σ_t δ_tᵀ M a_t = Σ (Δ_i M) ⊙ A_i: one GEMM per layer, no per-sample gradient materialized.
Every function works on a block [rows, cols] of the layer's [d_out, d_in] matrix and returns the
partial sum over that block; summing the partials of all blocks (over ranks: all_reduce_sum) gives b.
"""

from __future__ import annotations

import torch


def target_direction(
    precond: torch.Tensor, target: torch.Tensor, momentum: torch.Tensor | None, rho: float
) -> torch.Tensor:
    """M = P ⊙ (G_V − ρ m̂) on one block, [r, c]."""
    direction = target if momentum is None or rho == 0.0 else target - rho * momentum
    return precond * direction


def alignment_partial(
    A: torch.Tensor, D: torch.Tensor, M: torch.Tensor, rows: slice, cols: slice, chunk: int = 64
) -> torch.Tensor:
    """Partial b [n] over block [rows, cols]: Σ_t (Δ_i[t, rows] M) · A_i[t, cols].

    A [n, T, d_in], D [n, T, d_out], M [r, c]; ``chunk`` samples per GEMM bound the [chunk, T, c] temp."""
    out = torch.empty(A.shape[0], dtype=M.dtype, device=M.device)
    for s in range(0, A.shape[0], chunk):
        d = D[s : s + chunk, :, rows]
        a = A[s : s + chunk, :, cols]
        out[s : s + chunk] = ((d @ M) * a).sum(dim=(1, 2))
    return out
