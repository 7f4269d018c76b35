"""FTW with ``exchange="factors"``: every candidate's factors all-gathered, partial results on this
rank's moment blocks all-reduced (docs/design.md, "Distributed rules").

The target's factors are all-gathered too, so every rank builds G_V on its own blocks (TargetCache).
b and diag K of exact layers come from each G_i formed once on this rank's blocks (summed over ranks);
ghost and sketch layers' diag K is already global on every rank (rank-one P, gathered sketches).
"""

from __future__ import annotations

import torch

from optsel.selection import gram as gram_ops
from optsel.selection import muon_geometry
from optsel.selection.alignment import alignment_partial, target_direction
from optsel.selection.capture import gather_factors
from optsel.selection.ftw.context import StepContext, StepScores
from optsel.selection.ftw.exchanges.gathered import filtered_gram, gathered_sketches, needed
from optsel.selection.muon_geometry import layer_muon, muon_alignment_and_diag
from optsel.selection.target import TargetCache


class FactorExchange:
    """``exchange="factors"`` (module docstring); ``target_cache``: the selector's G_V blocks."""

    name = "factors"

    def __init__(self, target_cache: TargetCache):
        self.target_cache = target_cache

    def select(self, ctx: StepContext) -> StepScores:
        cfg, layers, geoms, dtype, device = ctx.config, ctx.layers, ctx.geoms, ctx.dtype, ctx.device
        n_global = ctx.n_global
        rho = ctx.coefficients.rho
        refreshed = ctx.refresh_target(
            self.target_cache.due(ctx.step),
            lambda target: self.target_cache.update(
                gather_factors(ctx.services.target_factors(target), dtype, ctx.comm),
                [[blk for blk in g.blocks] for g in geoms],
                ctx.step,
            ),
        )

        with ctx.phase("gather"):
            pool_f = gather_factors(ctx.local, dtype, ctx.comm)
            T = int(pool_f.A[0].shape[1]) if pool_f.A else 1
            backends = [
                ctx.services.backend(layer, pool_f.A[i].shape[1], n_global, cfg.num_filtered(n_global))
                for i, layer in enumerate(layers)
            ]
            factors_rc = [ctx.rank_one(i) if backends[i] not in ("exact", "muon") else None for i in range(len(layers))]
            sketches = gathered_sketches(ctx, backends, factors_rc, ctx.services.projections(backends, dtype))

        target_blocks = needed(self.target_cache.blocks, "target gradient")  # due() while None: refreshed
        with ctx.phase("alignment"):  # exact layers: b and diag K from each G_i formed once
            partial_b = torch.zeros(n_global, dtype=torch.float64, device=device)
            partial_diag = torch.zeros_like(partial_b)
            for i, g in enumerate(geoms):
                for blk, gv in zip(g.blocks, target_blocks[i]):
                    if (
                        g.muon is not None
                    ):  # docs/design.md, "The Muon geometry": M = Jᵀ(g_V − ρ_μ u₀)/c', Ĵ g_i per sample
                        muon = layer_muon(g)
                        M = muon.direction(gv.to(device, dtype), muon_geometry.rho_scale(cfg))
                        part_b, part_diag = muon_alignment_and_diag(
                            pool_f.A[i], pool_f.D[i], M, muon, cfg.max_temp_elems
                        )
                        partial_b += part_b.double()
                        partial_diag += part_diag.double()
                        continue
                    M = target_direction(blk.precond, gv.to(device, dtype), blk.momentum, rho)
                    if backends[i] == "exact":
                        part_b, part_diag = gram_ops.exact_alignment_and_diag_partial(
                            pool_f.A[i], pool_f.D[i], M, blk, cfg.max_temp_elems
                        )
                        partial_b += part_b.double()
                        partial_diag += part_diag.double()
                    else:
                        partial_b += alignment_partial(pool_f.A[i], pool_f.D[i], M, blk.rows, blk.cols).double()

        with ctx.phase("gram"):
            shared_diag = torch.zeros_like(partial_diag)  # already global on every rank (ghost/sketch)
            for i in range(len(geoms)):  # exact layers' diag came with the alignment
                if backends[i] == "ghost":
                    r, c = needed(factors_rc[i], "rank-one fit")
                    shared_diag += gram_ops.ghost_diag(pool_f.A[i], pool_f.D[i], r, c, cfg.max_temp_elems).double()
                elif backends[i] == "sketch":
                    shared_diag += needed(sketches[i], "sketch").reshape(n_global, -1).square().sum(1).double()
            reduced = ctx.sum_blocks(torch.stack([partial_b, partial_diag]))
            alignment, diag = reduced[0], reduced[1] + shared_diag

        return StepScores(
            alignment=alignment,
            diag=diag,
            backends=backends,
            gram_of=lambda filtered: filtered_gram(ctx, pool_f, backends, factors_rc, sketches, filtered),
            refreshed=refreshed,
            tokens=pool_f.tokens,
            seq_len=T,
        )


__all__ = ["FactorExchange"]
