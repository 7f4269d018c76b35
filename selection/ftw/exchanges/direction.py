"""FTW with ``exchange="direction"`` (the default): exact b while only scalars and survivors cross ranks
(docs/design.md, "Distributed rules").

b_i = ⟨g_i, M⟩ with M = P ⊙ (G_V − ρ m̂) per covered layer (selection/alignment.py). M is parameter-shaped
and, like P and m̂, sharded like the weight, so it is gathered the way the engine gathers the weight,
layer by layer, by the engine's optimizer-state reader (``OptimizerStateReader.gather_full``, written
beside each engine in pipeline/engines/: FSDP2 — a DTensor redistribute Shard(0) → Replicate on the
parameter's mesh; ZeRO-3 — an all-gather of each rank's flat partition, padding dropped). Each rank then computes the exact b_i of its own candidates from its local
factors; only the N scalars b_i (with diag K_ii and token counts) cross ranks.

The target: each rank's target token ids are all-gathered (|V|·T integers) and every rank captures
the whole target, so G_V on this rank's blocks needs no factor exchange (|V|·T·Σd floats per layer
under ``exchange: factors``); the blocks are kept for ``target_refresh`` steps (TargetCache).

diag K for every candidate and K on the m survivors, per layer backend (``gram: auto`` weighs bytes
and FLOPs, selection/cost_model.py):
- ``exact``: P is gathered like M (diag K exact on the candidate's own rank); the survivors' factors
  (m·T·Σd) are all-gathered and K summed over this rank's P blocks, all-reduced — exact.
- ``ghost``: rank-one P ≈ r cᵀ (one all-reduce of d_in + d_out + 1); the survivors' factors are shipped.
- ``sketch``: local sketches give diag K; only the survivors' m·k_o·k_i sketches are all-gathered.

``direction_dtype="bfloat16"`` ships M (and P) in bfloat16: half the bytes, b no longer exact.
``direction_cache=True`` keeps the gathered M, P (one copy of the covered weights per rank) while neither
the target nor the optimizer step nor ρ changes; P and m̂ change at every optimizer step, so M does too.
"""

from __future__ import annotations

import torch

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection.alignment import alignment_partial, target_direction
from optsel.selection.base import Batch
from optsel.selection.capture import Factors, gather_factors
from optsel.selection.ftw.context import RankOne, StepContext, StepScores
from optsel.selection.ftw.exchanges.gathered import needed
from optsel.selection.ftw.gathering import full_matrix
from optsel.selection.muon_geometry import layer_muon, muon_alignment_and_diag, muon_gram, rho_scale
from optsel.selection.preconditioner import LayerBlock
from optsel.selection.target import TargetCache


class DirectionCache:
    """The last gathered (M, P) per layer and the (target step, optimizer step, ρ, dtypes) they hold for."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.M: dict[int, torch.Tensor] = {}
        self.P: dict[int, torch.Tensor] = {}

    def reset(self, key: tuple) -> None:
        if key != self.key:
            self.key, self.M, self.P = key, {}, {}


class DirectionExchange:
    """``exchange="direction"`` (module docstring); ``target_cache``: the selector's G_V blocks,
    ``cache``: its gathered M, P (``direction_cache``)."""

    name = "direction"

    def __init__(self, target_cache: TargetCache, cache: DirectionCache):
        self.target_cache = target_cache
        self.cache = cache

    def select(self, ctx: StepContext) -> StepScores:
        cfg, layers, comm, reader = ctx.config, ctx.layers, ctx.comm, ctx.reader
        local, geoms, dtype, device = ctx.local, ctx.geoms, ctx.dtype, ctx.device
        rho, _, opt_step = ctx.coefficients
        wire = torch.bfloat16 if cfg.direction_dtype == "bfloat16" else dtype
        n_global, n_local = ctx.n_global, local.num_samples

        def refresh(target: Batch) -> None:
            tf = ctx.services.target_factors(target, whole=True)  # joint with the pool's capture when it ran
            tf = Factors([a.to(dtype) for a in tf.A], [d.to(dtype) for d in tf.D], tf.loss, tf.tokens)
            self.target_cache.update(tf, [g.blocks for g in geoms], ctx.step)

        refreshed = ctx.refresh_target(self.target_cache.due(ctx.step), refresh)
        target_blocks = needed(self.target_cache.blocks, "target gradient")  # due() while None: refreshed

        with ctx.phase("gather"):
            widths = torch.tensor([int(a.shape[1]) for a in local.A])  # T per layer (a module called twice: 2T)
            widths = distributed.all_reduce_max(widths, comm) if distributed.is_distributed() else widths
            m = cfg.num_filtered(n_global)
            backends = [ctx.services.backend(layer, int(widths[i]), n_global, m) for i, layer in enumerate(layers)]
            T = int(widths[0]) if len(widths) else 1
            factors_rc = [ctx.rank_one(i) if backends[i] not in ("exact", "muon") else None for i in range(len(layers))]
            projections = ctx.services.projections(backends, dtype)
        cache = self.cache
        cache.reset((self.target_cache.computed_at, opt_step, rho, str(dtype), str(wire)))

        b = torch.zeros(n_local, dtype=torch.float64, device=device)
        diag = torch.zeros_like(b)
        sketches: list[torch.Tensor | None] = []
        for i, (layer, g) in enumerate(zip(layers, geoms)):  # one layer's M (and P) at a time
            A, D = local.A[i].to(dtype), local.D[i].to(dtype)
            with ctx.phase("gather"):
                M = cache.M.get(i)
                if M is None and g.muon is not None:  # docs/design.md, "The Muon geometry": one vjp through NS
                    M = layer_muon(g).direction(target_blocks[i][0].to(device, dtype), rho_scale(cfg))
                if M is None:
                    values = [
                        target_direction(blk.precond, gv.to(device, dtype), blk.momentum, rho)
                        for blk, gv in zip(g.blocks, target_blocks[i])
                    ]
                    M = full_matrix(reader, layer, g.blocks, values, dtype, wire, comm)
                P = cache.P.get(i) if backends[i] == "exact" else None
                if backends[i] == "exact" and P is None:
                    P = full_matrix(reader, layer, g.blocks, [blk.precond for blk in g.blocks], dtype, wire, comm)
                if cfg.direction_cache:
                    cache.M[i] = M
                    if P is not None:
                        cache.P[i] = P
            sketches.append(None)
            if backends[i] == "muon":  # b_i = ⟨G_i, M⟩ and K_ii = ‖Ĵ G_i‖², each G_i formed once
                with ctx.phase("alignment"):
                    part_b, part_diag = muon_alignment_and_diag(A, D, M, layer_muon(g), cfg.max_temp_elems)
                    b += part_b.double()
                    diag += part_diag.double()
            elif backends[i] == "exact":  # each G_i formed once for b_i and K_ii
                with ctx.phase("alignment"):
                    whole = LayerBlock(slice(0, layer.d_out), slice(0, layer.d_in), needed(P, "whole P"), None)
                    part_b, part_diag = gram_ops.exact_alignment_and_diag_partial(A, D, M, whole, cfg.max_temp_elems)
                    b += part_b.double()
                    diag += part_diag.double()
            else:
                with ctx.phase("alignment"):
                    b += alignment_partial(A, D, M, slice(0, layer.d_out), slice(0, layer.d_in)).double()
                with ctx.phase("gram"):
                    r, c = needed(factors_rc[i], "rank-one fit")
                    if backends[i] == "ghost":
                        diag += gram_ops.ghost_diag(A, D, r, c, cfg.max_temp_elems).double()
                    else:
                        po, pi = needed(projections[i], "sketch projection")
                        S = gram_ops.sketch(A, D, r, c, po, pi)
                        sketches[i] = S
                        diag += S.reshape(n_local, -1).square().sum(1).double()
            del M, P

        with ctx.phase("gather"):  # the only per-candidate traffic: N × (b, diag K, tokens)
            packed = torch.stack([b, diag, local.tokens.to(device).double()], dim=1)
            packed = distributed.all_gather_cat(packed, comm) if distributed.is_distributed() else packed
        alignment, diag_all, tokens = packed[:, 0], packed[:, 1], packed[:, 2].round().to(torch.int64)

        def survivors_gram(filtered: torch.Tensor) -> torch.Tensor:
            with ctx.phase("survivors"):
                return _survivors_gram(ctx, backends, factors_rc, sketches, filtered)

        return StepScores(
            alignment=alignment,
            diag=diag_all,
            backends=backends,
            gram_of=survivors_gram,
            refreshed=refreshed,
            tokens=tokens,
            seq_len=T,
            diagnostics={"direction_dtype": cfg.direction_dtype},
        )


def _survivors_gram(
    ctx: StepContext,
    backends: list[str],
    factors_rc: list[RankOne | None],
    sketches: list[torch.Tensor | None],
    filtered: torch.Tensor,
) -> torch.Tensor:
    """K on the survivors, in ``filtered``'s order: each rank ships its own survivors' sketches (sketch
    layers) and factors (exact / ghost layers) only."""
    cfg, local, geoms, sizes, dtype = ctx.config, ctx.local, ctx.geoms, ctx.sizes, ctx.dtype
    rank = distributed.info().rank if distributed.is_distributed() else 0
    offsets = torch.tensor([0] + sizes).cumsum(0)
    filt = filtered.cpu().to(torch.int64)
    owner = torch.searchsorted(offsets[1:], filt, right=True)
    order = torch.argsort(owner, stable=True)  # gathered row j is filtered position order[j]
    inverse = torch.argsort(order)
    mine = filt[owner == rank] - offsets[rank]
    m = filt.numel()
    partial = torch.zeros(m, m, dtype=torch.float64, device=ctx.device)
    shared = torch.zeros_like(partial)
    sketch_layers = [i for i, be in enumerate(backends) if be == "sketch"]
    factor_layers = [i for i, be in enumerate(backends) if be != "sketch"]
    if sketch_layers:
        own = [needed(sketches[i], "sketch") for i in sketch_layers]
        S = torch.stack([sk[mine.to(sk.device)] for sk in own], dim=1)
        S = (distributed.all_gather_cat(S, ctx.comm) if distributed.is_distributed() else S)[inverse.to(S.device)]
        for j in range(len(sketch_layers)):
            shared += gram_ops.sketch_gram(S[:, j]).double()
    if factor_layers:
        rows = mine.to(local.loss.device)
        sub = Factors(
            [local.A[i][rows] for i in factor_layers],
            [local.D[i][rows] for i in factor_layers],
            local.loss[rows],
            local.tokens[rows],
        )
        sub = gather_factors(sub, dtype, ctx.comm)
        for j, i in enumerate(factor_layers):
            A, D = sub.A[j][inverse.to(sub.A[j].device)], sub.D[j][inverse.to(sub.D[j].device)]
            if backends[i] == "muon":  # replicated: the whole layer on every rank
                shared += muon_gram(A, D, layer_muon(geoms[i]), A.dtype, cfg.max_temp_elems).double()
            elif backends[i] == "exact":
                for blk in geoms[i].blocks:
                    partial += gram_ops.exact_gram_partial(A, D, blk, cfg.max_temp_elems).double()
            else:
                r, c = needed(factors_rc[i], "rank-one fit")
                shared += gram_ops.ghost_gram(A, D, r, c, cfg.max_temp_elems).double()
    if "exact" in backends:
        partial = ctx.sum_blocks(partial)
    K = partial + shared
    return 0.5 * (K + K.T)


__all__ = ["DirectionCache", "DirectionExchange"]
