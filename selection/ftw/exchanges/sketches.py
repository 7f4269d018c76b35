"""FTW with ``exchange="sketches"``: alignment, diag K and Gram from k_o × k_i sketches only
(docs/design.md, "Per-sample gradients in factored form" and "Distributed rules").

The sketch operator (selection/gram.py, P ≈ r cᵀ from the moments, R = diag r, C = diag c, Gaussian
Π_o [k_o, d_out], Π_i [k_i, d_in] with E[ΠᵀΠ] = I):

    S(X) = Π_o R^½ X C^½ Π_iᵀ                       candidates: S_i = S(g_i), from (A_i, Δ_i), linear in T

Alignment b_i = ⟨g_i, P ⊙ G_V⟩ − ρ ⟨g_i, P ⊙ m̂⟩ (selection/alignment.py) becomes

    b_i ≈ ⟨S_i, mean_t S_t⟩ − ρ ⟨S_i, Π_o R^-½ (P ⊙ m̂) C^-½ Π_iᵀ⟩

first term: P ⊙ G_V ≈ R G_V C, whose pairing with g_i is ⟨R^½ g_i C^½, R^½ G_V C^½⟩, sketched on both
sides (the target samples are sketched like candidates, on the rank that holds them); second term:
the exact P ⊙ m̂ of this rank's moment blocks, sketched with R^-½, C^-½ so that its expected pairing
with S_i is ⟨g_i, P ⊙ m̂⟩. Only sketches cross ranks: the candidates' are all-gathered
(N · k_o · k_i floats per layer), the target's and the momentum's partial sums all-reduced
(2 · k_o · k_i per layer), r and c all-reduced (d_out + d_in + 1 per layer).
"""

from __future__ import annotations

from typing import Any

import torch

from optsel import distributed
from optsel.selection.base import Batch
from optsel.selection.capture import Factors
from optsel.selection.ftw.context import RankOne, StepContext, StepScores
from optsel.selection.ftw.exchanges.gathered import filtered_gram, gathered_sketches, needed
from optsel.selection.gram import sketch
from optsel.selection.preconditioner import LayerBlock


def momentum_sketch_partial(
    blocks: list[LayerBlock], r: torch.Tensor, c: torch.Tensor, proj_out: torch.Tensor, proj_in: torch.Tensor
) -> torch.Tensor:
    """Σ over this rank's blocks of Π_o[:, rows] R^-½ (P ⊙ m̂)[rows, cols] C^-½ Π_i[:, cols]ᵀ, [k_o, k_i]
    (zeros where there is no momentum yet)."""
    out = torch.zeros(proj_out.shape[0], proj_in.shape[0], dtype=proj_out.dtype, device=proj_out.device)
    tiny = torch.finfo(r.dtype).tiny
    for blk in blocks:
        if blk.momentum is None or blk.precond.numel() == 0:
            continue
        x = (blk.precond * blk.momentum).to(out.dtype)
        x = r[blk.rows].clamp(min=tiny).rsqrt()[:, None] * x * c[blk.cols].clamp(min=tiny).rsqrt()[None, :]
        out += proj_out[:, blk.rows] @ x @ proj_in[:, blk.cols].T
    return out


def sketched_alignment(sketches: list[torch.Tensor], directions: torch.Tensor) -> torch.Tensor:
    """b [N] = Σ_layers ⟨S_i, direction_l⟩ for sketches[l] [N, k_o, k_i], directions [L, k_o, k_i]."""
    out = torch.zeros(sketches[0].shape[0], dtype=torch.float64, device=sketches[0].device)
    for S, direction in zip(sketches, directions):
        out += (S * direction).sum(dim=(1, 2)).double()
    return out


class SketchTarget:
    """This rank's target factors (A, Δ per covered layer), captured every ``refresh`` selection steps
    and sketched again each step (the projections change every step); ``count``: |V| over all ranks."""

    def __init__(self, refresh: int):
        self.refresh = refresh
        self.A: list[torch.Tensor] | None = None
        self.D: list[torch.Tensor] | None = None
        self.count = 0
        self.computed_at: int | None = None

    def due(self, step: int) -> bool:
        return self.A is None or self.computed_at is None or step - self.computed_at >= self.refresh

    def update(self, factors: Factors, dtype: torch.dtype, count: int, step: int) -> None:
        self.A = [a.to(dtype) for a in factors.A]
        self.D = [d.to(dtype) for d in factors.D]
        self.count = int(count)
        self.computed_at = step

    def sketch_sum(
        self, layer: int, r: torch.Tensor, c: torch.Tensor, proj_out: torch.Tensor, proj_in: torch.Tensor
    ) -> torch.Tensor:
        """Σ over this rank's target samples of S_t for one layer, [k_o, k_i]."""
        assert self.A is not None and self.D is not None
        A, D = self.A[layer].to(r.device), self.D[layer].to(r.device)
        if A.shape[0] == 0:
            return torch.zeros(proj_out.shape[0], proj_in.shape[0], dtype=r.dtype, device=r.device)
        return sketch(A, D, r, c, proj_out, proj_in).sum(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A, "D": self.D, "count": self.count, "computed_at": self.computed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.A, self.D = state.get("A"), state.get("D")
        self.count = int(state.get("count", 0))
        self.computed_at = state.get("computed_at")


class SketchExchange:
    """``exchange="sketches"`` (module docstring): no factor crosses ranks; ``sketch_target``: the
    selector's local target factors."""

    name = "sketches"

    def __init__(self, sketch_target: SketchTarget):
        self.sketch_target = sketch_target

    def select(self, ctx: StepContext) -> StepScores:
        layers, geoms, comm, dtype, local = ctx.layers, ctx.geoms, ctx.comm, ctx.dtype, ctx.local
        rho = ctx.coefficients.rho
        target_state = self.sketch_target

        def refresh(target: Batch) -> None:
            tf = ctx.services.target_factors(target)  # joint with the pool's capture when it ran
            count = distributed.all_reduce_sum(torch.tensor([float(tf.num_samples)], dtype=torch.float64), comm)
            target_state.update(tf, dtype, int(count[0]), ctx.step)

        refreshed = ctx.refresh_target(target_state.due(ctx.step), refresh)

        with ctx.phase("gather"):
            backends = ["sketch"] * len(layers)
            rank_ones = [ctx.rank_one(i) for i in range(len(layers))]
            factors_rc: list[RankOne | None] = list(rank_ones)
            projections = ctx.services.projections(backends, dtype)
            sketches = gathered_sketches(ctx, backends, factors_rc, projections)
            dense = [needed(S, "sketch") for S in sketches]  # every layer is a sketch layer here
            tokens = distributed.all_gather_cat(local.tokens, comm) if distributed.is_distributed() else local.tokens

        with ctx.phase("alignment"):
            owns_moments = not ctx.reader.replicated or distributed.info().rank == 0  # replicated: count once
            parts = []
            for i, g in enumerate(geoms):
                r, c = rank_ones[i]
                po, pi = needed(projections[i], "sketch projection")
                target_sum = target_state.sketch_sum(i, r, c, po, pi)
                momentum = (
                    momentum_sketch_partial(g.blocks, r, c, po, pi)
                    if rho and owns_moments
                    else torch.zeros_like(target_sum)
                )
                parts.append(torch.stack([target_sum, momentum]))
            packed = torch.stack(parts)  # [L, 2, k_o, k_i]
            if distributed.is_distributed():
                packed = distributed.all_reduce_sum(packed, comm)
            directions = packed[:, 0] / max(target_state.count, 1) - rho * packed[:, 1]
            alignment = sketched_alignment(dense, directions)

        with ctx.phase("gram"):
            per_layer = [S.reshape(S.shape[0], -1).square().sum(1).double() for S in dense]
            diag = sum(per_layer[1:], per_layer[0])

        return StepScores(
            alignment=alignment,
            diag=diag,
            backends=backends,
            gram_of=lambda filtered: filtered_gram(ctx, None, backends, factors_rc, sketches, filtered),
            refreshed=refreshed,
            tokens=tokens,
            seq_len=int(local.A[0].shape[1]) if local.A else 1,
        )


__all__ = ["SketchExchange", "SketchTarget", "momentum_sketch_partial", "sketched_alignment"]
