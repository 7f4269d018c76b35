"""Two-stage FTW's plumbing (``prefilter: head``, docs/design.md, "Two stages"): stage 1's scores over the whole
pool, the survivors' pool that stage 2 runs on, and the map of stage 2's selection back to the pool.

Stage 1 (:class:`HeadPrefilter`) scores every candidate with the output layer's exact alignment from a
forward pass (selection/ftw/prefilter.py) and keeps the global top m by u. Each rank then builds a pool of
its own survivors, padded to the largest rank's count with rows that carry no label (zero loss, zero
gradient, never eligible), so every rank runs the same number of stage-2 passes — ZeRO-3's gathers and
FSDP2's collectives stay in step — and R ranks pick what one process picks. Stage 2 is the exact FTW
step on those rows; :class:`SurvivorPool` maps its indices back to the pool's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection.alignment import target_direction
from optsel.selection.base import Batch, Selection, split_local
from optsel.selection.capture import Chunk, Factors, gather_factors, scatter_rows
from optsel.selection.ftw.context import Coefficients, require_target
from optsel.selection.ftw.filter import filter_candidates, utility
from optsel.selection.ftw.gathering import full_matrix, gather_batch
from optsel.selection.ftw.prefilter import IGNORE, HeadScorer, output_layer
from optsel.selection.ftw_config import FTWConfig
from optsel.selection.layers import CoveredLayer
from optsel.selection.model_view import ModelView
from optsel.selection.preconditioner import LayerBlock, LayerGeometry, OptimizerStateReader, layer_geometry
from optsel.selection.timing import phase


@dataclass
class Stage1:
    """Stage 1's result, identical on every rank: survivors [m] (global indices, ascending), b, u and
    diag K [N] (the head's), whether the head target gradient was reused, (ρ, τ, optimizer step), and
    for ``prefilter_stage2: head`` this rank's head factors (H [n, W, d], D [n, W, V]) and the gathered P;
    ``kind``: the prefilter that produced it (``head`` or ``learned``)."""

    survivors: torch.Tensor
    alignment: torch.Tensor
    utility: torch.Tensor
    target_reused: bool
    diag: torch.Tensor | None = None
    coefficients: tuple[float, float, int] = (0.0, 1.0, 0)
    geometry: LayerGeometry | None = None
    factors: Factors | None = None
    precond: torch.Tensor | None = None
    kind: str = "head"


class HeadPrefilter:
    """Stage 1 over the whole pool: the output layer's exact b_i and K_ii, u_i = b_i − (τ/(2k)) K_ii,
    top m. ``covered``: the coverage's layers (to find the head's stage-2 target block for
    ``prefilter_target: reuse``); ``coefficients``: (ρ, τ, optimizer step) of a list of geometries (the
    selector's); ``generator``: draws the ``prefilter_target_rows`` (the selector's: the same on every rank)."""

    def __init__(
        self,
        model: nn.Module,
        view: ModelView,
        reader: OptimizerStateReader,
        config: FTWConfig,
        covered: list[CoveredLayer],
        coefficients: Callable[[list[LayerGeometry]], Coefficients],
        generator: torch.Generator | None = None,
    ):
        self.config, self.reader = config, reader
        self.coefficients, self.generator = coefficients, generator
        self.head = output_layer(model, view)
        try:
            reader.read(self.head.param)
        except KeyError as err:
            raise ValueError(f"optimizer: the output layer {self.head.name} is not in its param_groups") from err
        self.scorer = HeadScorer(
            model,
            self.head,
            config.prefilter_window,
            config.capture_chunk_size,
            config.capture_chunk_tokens,
            config.prefilter_depth,
        )
        self.covered_index = next((i for i, layer in enumerate(covered) if layer.param is self.head.param), None)

    def geometry(self, dtype: torch.dtype) -> LayerGeometry:
        return layer_geometry(self.reader, self.head, dtype, use_momentum=self.config.geometry == "adam")

    def run(
        self,
        pool: Batch,
        target: Batch | None,
        sizes: list[int],
        dtype: torch.dtype,
        stage2_target: list[torch.Tensor] | None,
        comm: distributed.CommCounter,
        timings: dict[str, float],
    ) -> Stage1:
        """Stage 1 (class docstring). ``stage2_target``: this rank's blocks of the head's last stage-2
        target gradient (``prefilter_target: reuse``), or None."""
        cfg = self.config
        head, device = self.head, self.head.param.device
        geom = self.geometry(dtype)
        rho, tau, opt_step = self.coefficients([geom])
        keep = cfg.prefilter_stage2 == "head"
        n_global, k = sum(sizes), min(cfg.budget, sum(sizes))
        with phase(timings, comm, "stage1_target"):
            reused = cfg.prefilter_target == "reuse" and stage2_target is not None
            if reused and stage2_target is not None:
                gv_blocks = [gv.to(device, dtype) for gv in stage2_target]
            else:
                whole_target = gather_batch(require_target(target), comm)  # every rank: the whole target
                rows = cfg.prefilter_target_rows
                if rows is not None and rows < int(whole_target["input_ids"].shape[0]):
                    pick = (
                        torch.randperm(int(whole_target["input_ids"].shape[0]), generator=self.generator)[:rows]
                        .sort()
                        .values
                    )
                    whole_target = {key: v[pick.to(v.device)] for key, v in whole_target.items()}
                gv = self.scorer.target_gradient(whole_target, dtype)
                gv_blocks = [gv[blk.rows, blk.cols] for blk in geom.blocks]
            values = [target_direction(blk.precond, g, blk.momentum, rho) for blk, g in zip(geom.blocks, gv_blocks)]
            M = full_matrix(self.reader, head, geom.blocks, values, dtype, dtype, comm)
            P = full_matrix(self.reader, head, geom.blocks, [blk.precond for blk in geom.blocks], dtype, dtype, comm)
        with phase(timings, comm, "stage1"):
            whole = LayerBlock(slice(0, head.d_out), slice(0, head.d_in), P, None)
            n_local = int(pool["input_ids"].shape[0])
            local = torch.zeros(n_local, 2, dtype=torch.float64, device=device)  # (b, diag K) per pool row
            kept = []
            for f in self.scorer.chunks(pool, dtype):
                b, diag = gram_ops.exact_alignment_and_diag_partial(f.H, f.D, M, whole, cfg.max_temp_elems)
                local[f.rows.to(device)] = torch.stack([b.double(), diag.double()], dim=1)
                if keep:
                    kept.append(f)
            both = distributed.all_gather_cat(local, comm) if distributed.is_distributed() else local
            b_all, diag_all = both[:, 0].cpu(), both[:, 1].cpu()
            u = utility(b_all, diag_all, tau / k if cfg.filter_curvature == "batch" else tau)
            m = cfg.num_filtered(n_global)
            survivors = filter_candidates(u, m, m).filtered.sort().values.to(torch.int64)
        factors = None
        if keep and kept:
            plan = [Chunk(f.rows, int(f.H.shape[1])) for f in kept]
            n_kept = sum(int(f.rows.numel()) for f in kept)
            factors = Factors(
                [scatter_rows([f.H for f in kept], plan, n_kept)],
                [scatter_rows([f.D for f in kept], plan, n_kept)],
                torch.zeros(n_kept, dtype=dtype),
                scatter_rows([f.tokens for f in kept], plan, n_kept),
            )
        return Stage1(survivors, b_all, u, reused, diag_all, (rho, tau, opt_step), geom, factors, P)

    def survivors_gram(
        self, stage1: Stage1, filtered: torch.Tensor, sizes: list[int], comm: distributed.CommCounter
    ) -> torch.Tensor:
        """``prefilter_stage2: head``: the head's exact K on ``filtered`` (global, in that order) from the
        survivors' head factors, all-gathered (m·W·(d + V) floats), and the gathered P: [m, m]."""
        factors, precond = stage1.factors, stage1.precond
        if factors is None or precond is None:
            raise ValueError(
                "prefilter_stage2: 'head' needs stage 1's head factors and P (run with prefilter_stage2: head; "
                "every rank needs pool rows)"
            )
        rank = distributed.info().rank if distributed.is_distributed() else 0
        offsets = torch.tensor([0] + list(sizes)).cumsum(0)
        filt = filtered.cpu().to(torch.int64)
        owner = torch.searchsorted(offsets[1:], filt, right=True)
        order = torch.argsort(owner, stable=True)  # gathered row j is filtered position order[j]
        mine = (filt[order][owner[order] == rank] - offsets[rank]).to(factors.loss.device)
        sub = gather_factors(factors.select(mine), precond.dtype, comm)
        inverse = torch.argsort(order).to(sub.A[0].device)
        H, D = sub.A[0][inverse], sub.D[0][inverse]
        whole = LayerBlock(slice(0, self.head.d_out), slice(0, self.head.d_in), precond, None)
        K = gram_ops.exact_gram_partial(H, D, whole, self.config.max_temp_elems).double()
        return 0.5 * (K + K.T)


@dataclass
class SurvivorPool:
    """This rank's stage-2 pool: ``batch`` [c_max, T] (its survivors, then label-free padding rows),
    ``local_rows`` [c_r] (their rows in this rank's pool), ``global_of`` [R·c_max] (stage-2 global
    index → pool global index, −1 for padding), ``sizes`` (c_max per rank) and ``eligible`` [R·c_max]."""

    batch: dict[str, torch.Tensor]
    local_rows: torch.Tensor
    global_of: torch.Tensor
    sizes: list[int]
    eligible: torch.Tensor

    @classmethod
    def build(cls, pool: Batch, survivors: torch.Tensor, sizes: list[int], rank: int) -> SurvivorPool:
        offsets = torch.tensor([0] + list(sizes)).cumsum(0)
        per_rank = [
            survivors[(survivors >= offsets[r]) & (survivors < offsets[r + 1])] - offsets[r] for r in range(len(sizes))
        ]
        width = max(1, max(int(rows.numel()) for rows in per_rank))
        global_of = torch.full((len(sizes) * width,), -1, dtype=torch.int64)
        for r, rows in enumerate(per_rank):
            global_of[r * width : r * width + rows.numel()] = rows + offsets[r]
        mine = per_rank[rank]
        pad = width - int(mine.numel())
        if int(pool["input_ids"].shape[0]) > 0:
            filler = torch.zeros(pad, dtype=torch.int64)  # copies of row 0, labels dropped: finite, no gradient
            rows = torch.cat([mine, filler])
            batch = {key: pool[key][rows.to(pool[key].device)] for key in ("input_ids", "attention_mask", "labels")}
            if pad:
                batch["labels"] = batch["labels"].clone()
                batch["labels"][mine.numel() :] = IGNORE
        else:  # an empty local pool: padding rows of one attended token
            T = int(pool["input_ids"].shape[1])
            batch = {
                "input_ids": torch.zeros(width, T, dtype=torch.int64),
                "attention_mask": torch.zeros(width, T, dtype=torch.int64).index_fill_(1, torch.tensor([0]), 1),
                "labels": torch.full((width, T), IGNORE, dtype=torch.int64),
            }
        return cls(batch, mine, global_of, [width] * len(sizes), global_of >= 0)

    def row_map(self, n_local: int) -> torch.Tensor:
        """[n_local]: this rank's pool row → its row in the stage-2 pass (−1: not a survivor)."""
        out = torch.full((n_local,), -1, dtype=torch.int64)
        out[self.local_rows] = torch.arange(self.local_rows.numel())
        return out

    def remap(self, sel: Selection, sizes: list[int], stage1: Stage1) -> Selection:
        """Stage 2's Selection in the pool's numbering (indices, filtered, local part, pool pass)."""
        indices = self.global_of[sel.indices]
        if bool((indices < 0).any()):
            raise RuntimeError("two-stage FTW: a padding row was selected (a bug: padding is never eligible)")
        rank = distributed.info().rank if distributed.is_distributed() else 0
        local_idx, local_w = split_local(indices, sel.weights, sizes, rank)
        if sel.pool_pass is not None:
            sel.pool_pass.row_map = self.row_map(sizes[rank])
        sel.diagnostics.update(
            {
                "prefilter": stage1.kind,
                "stage1_survivors": int(stage1.survivors.numel()),
                "stage1_target_reused": stage1.target_reused,
            }
        )
        filtered = self.global_of[sel.filtered] if sel.filtered is not None else None
        return Selection(
            indices=indices,
            weights=sel.weights,
            local_indices=local_idx,
            local_weights=local_w,
            pool_size=sum(sizes),
            alignment=stage1.alignment,
            utility=stage1.utility,
            filtered=filtered,
            gram=sel.gram,
            covered=sel.covered,
            timings=sel.timings,
            diagnostics=sel.diagnostics,
            pool_pass=sel.pool_pass,
        )


__all__ = ["HeadPrefilter", "Stage1", "SurvivorPool"]
