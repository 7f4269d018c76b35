"""Sketches and the survivors' Gram from all-gathered candidates (the ``factors`` and ``sketches`` exchanges)."""

from __future__ import annotations

from typing import TypeVar

import torch

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection.capture import Factors
from optsel.selection.ftw.context import Projection, RankOne, StepContext
from optsel.selection.muon_geometry import layer_muon, muon_gram

T = TypeVar("T")


def needed(value: T | None, what: str) -> T:
    """``value``, which the layer's Gram backend needs: the per-layer lists hold None where a backend does not."""
    if value is None:
        raise ValueError(f"ftw: no {what} for a layer whose Gram backend needs one")
    return value


def gathered_sketches(
    ctx: StepContext,
    backends: list[str],
    factors_rc: list[RankOne | None],
    projections: list[Projection | None],
) -> list[torch.Tensor | None]:
    """Per sketch layer: the local candidates' sketches [n, k_o, k_i] (``ctx.local``), all-gathered [N, k_o, k_i]."""
    out: list[torch.Tensor | None] = []
    for i in range(len(ctx.layers)):
        if backends[i] != "sketch":
            out.append(None)
            continue
        r, c = needed(factors_rc[i], "rank-one fit")
        po, pi = needed(projections[i], "sketch projection")
        S = gram_ops.sketch(ctx.local.A[i].to(ctx.dtype), ctx.local.D[i].to(ctx.dtype), r, c, po, pi)
        out.append(distributed.all_gather_cat(S, ctx.comm) if distributed.is_distributed() else S)
    return out


def filtered_gram(
    ctx: StepContext,
    pool_f: Factors | None,
    backends: list[str],
    factors_rc: list[RankOne | None],
    sketches: list[torch.Tensor | None],
    filtered: torch.Tensor,
) -> torch.Tensor:
    """K [m, m] on ``filtered`` (global indices) from every candidate's gathered factors ``pool_f`` (None
    when every layer is a sketch layer) and sketches; exact layers' partial sums summed over ranks."""
    max_elems = ctx.config.max_temp_elems
    m = filtered.numel()
    partial = torch.zeros(m, m, dtype=torch.float64, device=ctx.device)
    shared = torch.zeros_like(partial)
    for i, g in enumerate(ctx.geoms):
        if backends[i] == "sketch":
            shared += gram_ops.sketch_gram(needed(sketches[i], "sketch")[filtered]).double()
            continue
        gathered = needed(pool_f, "gathered factors")
        A, D = gathered.A[i][filtered], gathered.D[i][filtered]
        if backends[i] == "muon":
            partial += muon_gram(A, D, layer_muon(g), A.dtype, max_elems).double()
        elif backends[i] == "exact":
            for blk in g.blocks:
                partial += gram_ops.exact_gram_partial(A, D, blk, max_elems).double()
        else:
            r, c = needed(factors_rc[i], "rank-one fit")
            shared += gram_ops.ghost_gram(A, D, r, c, max_elems).double()
    K = (ctx.sum_blocks(partial) if any(b != "sketch" for b in backends) else partial) + shared
    return 0.5 * (K + K.T)


__all__ = ["filtered_gram", "gathered_sketches", "needed"]
