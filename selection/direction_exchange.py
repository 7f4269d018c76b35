"""FTW with ``exchange="direction"`` (the default): exact b while only scalars and survivors cross ranks (docs/design.md §4).

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

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection.alignment import alignment_partial, target_direction
from optsel.selection.base import Batch, Selection, timed
from optsel.selection.capture import Factors, gather_factors
from optsel.selection.layers import CoveredLayer
from optsel.selection.preconditioner import LayerBlock, LayerGeometry, OptimizerStateReader

#: pad values of a batch's [n, T] tensors when ranks' T differ
_PAD = {"labels": -100}


@contextlib.contextmanager
def phase(timings: dict[str, float], comm: distributed.CommCounter, name: str) -> Iterator[None]:
    """``timed`` plus the bytes the block hands to collectives, under ``comm.by_phase[name]``."""
    before = comm.phase
    comm.phase = name
    try:
        with timed(timings, name):
            yield
    finally:
        comm.phase = before


def gather_batch(batch: Batch, comm: distributed.CommCounter | None = None) -> Batch:
    """Every rank's batch, concatenated in rank order (T right-padded to the longest: attention mask
    0, labels -100; int64 tensors cross ranks as int32 when every rank's values fit); a no-op on one
    process."""
    if not distributed.is_distributed():
        return batch
    keys = sorted(batch)
    wide = [
        int(t.dtype == torch.int64 and t.numel() > 0 and not (-(2**31) <= int(t.min()) and int(t.max()) < 2**31))
        for t in (batch[k] for k in keys)
    ]
    agreed = distributed.all_reduce_max(torch.tensor([int(batch["input_ids"].shape[1]), *wide]), comm)
    width, wide = int(agreed[0]), {k: bool(w) for k, w in zip(keys, agreed[1:].tolist())}
    out = {}
    for key in keys:
        t = batch[key]
        if t.dim() >= 2 and t.shape[1] != width:
            t = F.pad(t, (0, width - t.shape[1]), value=_PAD.get(key, 0))
        narrow = t.dtype == torch.int64 and not wide[key]
        gathered = distributed.all_gather_cat(t.to(torch.int32) if narrow else t, comm)
        out[key] = gathered.to(t.dtype)
    return out


def _param_layout(layer: CoveredLayer, blk: LayerBlock, value: torch.Tensor) -> tuple[slice, slice, torch.Tensor]:
    if layer.transposed:
        return blk.cols, blk.rows, value.T
    return blk.rows, blk.cols, value


def full_matrix(
    reader: OptimizerStateReader,
    layer: CoveredLayer,
    blocks: list[LayerBlock],
    values: list[torch.Tensor],
    dtype: torch.dtype,
    wire: torch.dtype,
    comm: distributed.CommCounter | None = None,
) -> torch.Tensor:
    """The whole [d_out, d_in] matrix (layer convention) whose values on this rank's ``blocks`` are
    ``values``, gathered by the reader the way the engine shards the weight; ``wire``: the dtype that
    crosses ranks (a replicated reader assembles it locally)."""
    shape = (layer.d_in, layer.d_out) if layer.transposed else (layer.d_out, layer.d_in)  # parameter layout
    pieces = [_param_layout(layer, blk, value) for blk, value in zip(blocks, values)]
    full = reader.gather_full(layer.param, pieces, shape, dtype, wire, comm)
    return full.T.contiguous() if layer.transposed else full


class DirectionCache:
    """The last gathered (M, P) per layer and the (target step, optimizer step, ρ, dtypes) they hold for."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.M: dict[int, torch.Tensor] = {}
        self.P: dict[int, torch.Tensor] = {}

    def reset(self, key: tuple) -> None:
        if key != self.key:
            self.key, self.M, self.P = key, {}, {}


def select_direction(
    ftw: Any,
    target: Batch | None,
    local: Factors,
    geoms: list[LayerGeometry],
    rho: float,
    tau: float,
    opt_step: int,
    sizes: list[int],
    timings: dict[str, float],
) -> Selection:
    """One FTW step with ``exchange="direction"`` (module docstring); ``ftw``: the FilterThenWeight."""
    cfg, layers, comm, reader = ftw.config, ftw.coverage.layers, ftw.comm, ftw.reader
    dtype, device = ftw._dtype(local), ftw._device()
    wire = torch.bfloat16 if cfg.direction_dtype == "bfloat16" else dtype
    n_global, n_local = sum(sizes), local.num_samples
    refreshed = False
    with phase(timings, comm, "target"):
        if ftw.target_cache.due(ftw.step):
            if target is None:
                raise ValueError("target: FilterThenWeight needs a target batch (input_ids, attention_mask, labels)")
            tf = ftw._target_factors(target, whole=True)  # joint with the pool's capture when it ran
            tf = Factors([a.to(dtype) for a in tf.A], [d.to(dtype) for d in tf.D], tf.loss, tf.tokens)
            ftw.target_cache.update(tf, [g.blocks for g in geoms], ftw.step)
            refreshed = True

    with phase(timings, comm, "gather"):
        widths = torch.tensor([int(a.shape[1]) for a in local.A])  # T per layer (a module called twice: 2T)
        widths = distributed.all_reduce_max(widths, comm) if distributed.is_distributed() else widths
        m = cfg.num_filtered(n_global)
        backends = [ftw._backend(layer, int(widths[i]), n_global, m) for i, layer in enumerate(layers)]
        T = int(widths[0]) if len(widths) else 1
        factors_rc = [
            gram_ops.rank_one_factors(
                g.blocks or [_empty(dtype, device)], layer.d_out, layer.d_in, not reader.replicated, comm
            )
            if backends[i] not in ("exact", "muon")
            else None
            for i, (layer, g) in enumerate(zip(layers, geoms))
        ]
        projections = ftw._projections(backends, dtype)
    cache: DirectionCache = ftw.direction_cache
    cache.reset((ftw.target_cache.computed_at, opt_step, rho, str(dtype), str(wire)))

    b = torch.zeros(n_local, dtype=torch.float64, device=device)
    diag = torch.zeros_like(b)
    sketches: list[torch.Tensor | None] = []
    for i, (layer, g) in enumerate(zip(layers, geoms)):  # one layer's M (and P) at a time
        A, D = local.A[i].to(dtype), local.D[i].to(dtype)
        with phase(timings, comm, "gather"):
            M = cache.M.get(i)
            if M is None and g.muon is not None:  # docs/design.md §11: one vjp through Newton–Schulz
                from optsel.selection.muon_geometry import rho_scale

                M = g.muon.direction(ftw.target_cache.blocks[i][0].to(device, dtype), rho_scale(cfg))
            if M is None:
                values = [
                    target_direction(blk.precond, gv.to(device, dtype), blk.momentum, rho)
                    for blk, gv in zip(g.blocks, ftw.target_cache.blocks[i])
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
            from optsel.selection.muon_geometry import muon_alignment_and_diag

            with phase(timings, comm, "alignment"):
                part_b, part_diag = muon_alignment_and_diag(A, D, M, g.muon, cfg.max_temp_elems)
                b += part_b.double()
                diag += part_diag.double()
        elif backends[i] == "exact":  # each G_i formed once for b_i and K_ii
            with phase(timings, comm, "alignment"):
                whole = LayerBlock(slice(0, layer.d_out), slice(0, layer.d_in), P, None)
                part_b, part_diag = gram_ops.exact_alignment_and_diag_partial(A, D, M, whole, cfg.max_temp_elems)
                b += part_b.double()
                diag += part_diag.double()
        else:
            with phase(timings, comm, "alignment"):
                b += alignment_partial(A, D, M, slice(0, layer.d_out), slice(0, layer.d_in)).double()
            with phase(timings, comm, "gram"):
                if backends[i] == "ghost":
                    diag += gram_ops.ghost_diag(A, D, *factors_rc[i], cfg.max_temp_elems).double()
                else:
                    sketches[i] = gram_ops.sketch(A, D, *factors_rc[i], *projections[i])
                    diag += sketches[i].reshape(n_local, -1).square().sum(1).double()
        del M, P

    with phase(timings, comm, "gather"):  # the only per-candidate traffic: N × (b, diag K, tokens)
        packed = torch.stack([b, diag, local.tokens.to(device).double()], dim=1)
        packed = distributed.all_gather_cat(packed, comm) if distributed.is_distributed() else packed
    alignment, diag_all, tokens = packed[:, 0], packed[:, 1], packed[:, 2].round().to(torch.int64)

    def survivors_gram(filtered: torch.Tensor) -> torch.Tensor:
        with phase(timings, comm, "survivors"):
            return _survivors_gram(ftw, local, geoms, backends, factors_rc, sketches, filtered, sizes, dtype)

    sel = ftw._finish(
        alignment,
        diag_all,
        tau,
        rho,
        opt_step,
        sizes,
        geoms,
        backends,
        timings,
        {},
        survivors_gram,
        refreshed,
        tokens=tokens,
        seq_len=T,
    )
    sel.diagnostics["direction_dtype"] = cfg.direction_dtype
    return sel


def _survivors_gram(
    ftw: Any,
    local: Factors,
    geoms: list[LayerGeometry],
    backends: list[str],
    factors_rc: list,
    sketches: list,
    filtered: torch.Tensor,
    sizes: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """K on the survivors, in ``filtered``'s order: each rank ships its own survivors' sketches (sketch
    layers) and factors (exact / ghost layers) only."""
    cfg, device = ftw.config, ftw._device()
    rank = distributed.info().rank if distributed.is_distributed() else 0
    offsets = torch.tensor([0] + sizes).cumsum(0)
    filt = filtered.cpu().to(torch.int64)
    owner = torch.searchsorted(offsets[1:], filt, right=True)
    order = torch.argsort(owner, stable=True)  # gathered row j is filtered position order[j]
    inverse = torch.argsort(order)
    mine = filt[owner == rank] - offsets[rank]
    m = filt.numel()
    partial = torch.zeros(m, m, dtype=torch.float64, device=device)
    shared = torch.zeros_like(partial)
    sketch_layers = [i for i, be in enumerate(backends) if be == "sketch"]
    factor_layers = [i for i, be in enumerate(backends) if be != "sketch"]
    if sketch_layers:
        S = torch.stack([sketches[i][mine.to(sketches[i].device)] for i in sketch_layers], dim=1)
        S = (distributed.all_gather_cat(S, ftw.comm) if distributed.is_distributed() else S)[inverse.to(S.device)]
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
        sub = gather_factors(sub, dtype, ftw.comm)
        for j, i in enumerate(factor_layers):
            A, D = sub.A[j][inverse.to(sub.A[j].device)], sub.D[j][inverse.to(sub.D[j].device)]
            if backends[i] == "muon":  # replicated: the whole layer on every rank
                from optsel.selection.muon_geometry import muon_gram

                shared += muon_gram(A, D, geoms[i].muon, A.dtype, cfg.max_temp_elems).double()
            elif backends[i] == "exact":
                for blk in geoms[i].blocks:
                    partial += gram_ops.exact_gram_partial(A, D, blk, cfg.max_temp_elems).double()
            else:
                shared += gram_ops.ghost_gram(A, D, *factors_rc[i], cfg.max_temp_elems).double()
    if "exact" in backends:
        partial = ftw._sum_blocks(partial)
    K = partial + shared
    return 0.5 * (K + K.T)


def _empty(dtype: torch.dtype, device: torch.device) -> LayerBlock:
    return LayerBlock(slice(0, 0), slice(0, 0), torch.zeros(0, 0, dtype=dtype, device=device), None)


__all__ = ["DirectionCache", "full_matrix", "gather_batch", "phase", "select_direction"]
