"""LESS-style selection (Xia et al., ICML 2024, "LESS: Selecting Influential Data for Targeted
Instruction Tuning"), online: score_i = b_i = ⟨P g_i, g_V⟩ with the optimizer's current Adam
preconditioner P = 1/(sqrt(v̂)+ε) — exactly FTW's alignment with ρ = 0 (no momentum correction),
no Gram, no curvature — then the top k with weight 1/k.

Reuses FTW's building blocks: capture → layer_geometry (optimizer-state seam) → TargetCache →
target_direction / alignment_partial (target-side trick), block partials all-reduced when the state
is sharded. Deviations from the paper: online (the current model and optimizer state, not an offline
warm-up checkpoint series), the exact gradient on the covered linear weights instead of LoRA
gradients with a random projection, the raw inner product instead of cosine similarity, and one
target set (no max over target subtasks). Before the optimizer's first step P = I. Under Muon + AdamW
(``optimizer.name: muon``) Adam's P on the AdamW layers and P = I on the Muon matrices, which keep no
second moment (selection/muon_geometry.py's hybrid reader).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optsel import distributed
from optsel.selection.alignment import alignment_partial, target_direction
from optsel.selection.base import Batch, Selection, register_selector
from optsel.selection.baselines.common import (
    CoveredLayerSelector,
    agree,
    check_budget,
    check_chunk_size,
    compute_dtype,
    gather_factors,
    timed,
    topk,
    uniform_selection,
)
from optsel.selection.capture import capture_factors
from optsel.selection.model_view import cleans_up, make_state_reader
from optsel.selection.muon_geometry import is_muon, optimizers_of
from optsel.selection.preconditioner import layer_geometry
from optsel.selection.target import TargetCache


@dataclass(kw_only=True)
class LessConfig:
    """budget: k. target_refresh: recompute g_V every this many steps. capture_chunk_size:
    samples per forward/backward (None: the whole pool)."""

    budget: int
    target_refresh: int = 1  #: recompute g_V every this many steps
    capture_chunk_size: int | None = None  #: samples per forward/backward (null: the whole pool)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.target_refresh < 1:
            raise ValueError(f"target_refresh: must be >= 1, got {self.target_refresh}")
        check_chunk_size("capture_chunk_size", self.capture_chunk_size)


class Less(CoveredLayerSelector[LessConfig]):
    name = "less"
    needs_target = True

    def __init__(self, model: nn.Module, optimizer: Any, config: LessConfig):
        super().__init__(model, optimizer, config)
        hybrid = any(is_muon(opt) for opt in optimizers_of(optimizer))  # Muon layers: P = I (module docstring)
        self.reader = make_state_reader(optimizer, "auto" if hybrid else "adam", self.view)
        self.target_cache = TargetCache(config.target_refresh)

    @cleans_up
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        cfg = self.config
        timings: dict[str, float] = {}
        layers = self.coverage.layers
        sizes, local = self.capture_pool(pool, timings)
        dtype = compute_dtype(local)
        geoms = [layer_geometry(self.reader, layer, dtype, use_momentum=False) for layer in layers]
        with timed(timings, "target"):
            if self.target_cache.due(self.step):
                if target is None:
                    raise ValueError("target: LESS needs a target batch (input_ids, attention_mask, labels)")
                tf = gather_factors(
                    capture_factors(self.model, target, layers, cfg.capture_chunk_size), dtype, self.comm
                )
                self.target_cache.update(tf, [g.blocks for g in geoms], self.step)
        target_blocks = self.target_cache.blocks
        assert target_blocks is not None  # due() holds while there are none: the block above set them
        with timed(timings, "gather"):
            pool_f = gather_factors(local, dtype, self.comm)
        with timed(timings, "alignment"):
            b = torch.zeros(sum(sizes), dtype=torch.float64, device=layers[0].param.device)
            for i, g in enumerate(geoms):
                for blk, gv in zip(g.blocks, target_blocks[i]):
                    M = target_direction(blk.precond, gv.to(layers[0].param.device, dtype), None, 0.0)
                    b += alignment_partial(pool_f.A[i], pool_f.D[i], M, blk.rows, blk.cols).double()
            if not self.reader.replicated:
                b = distributed.all_reduce_sum(b, self.comm)
        with timed(timings, "select"):
            chosen, _ = agree(topk(b, cfg.budget), min(cfg.budget, sum(sizes)), self.comm)
        self.step += 1
        sel = uniform_selection(chosen, sizes, timings, {"comm_bytes": self.comm.bytes}, utility=b)
        sel.alignment, sel.covered = b.cpu(), list(self.coverage.names)
        return sel

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "target": self.target_cache.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.target_cache.load_state_dict(dict(state.get("target", {})))


@register_selector("less")
def build_less(*, model: nn.Module, optimizer: Any, budget: int, config: LessConfig | None = None, **_: Any) -> Less:
    config = config if config is not None else LessConfig(budget=budget)
    if config.budget != budget:
        raise ValueError(f"budget: LessConfig.budget={config.budget} disagrees with the selection budget {budget}")
    return Less(model, optimizer, config)


build_less.config_class = LessConfig  # type: ignore[attr-defined]  # registry metadata on the function
