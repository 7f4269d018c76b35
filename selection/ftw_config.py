"""Typed options of Filter-then-Weight (``selection.options.ftw`` in a run config; docs/design.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from optsel.selection import gram as gram_ops


@dataclass(kw_only=True)
class FTWConfig:
    """Options of Filter-then-Weight.

    budget: k, the most samples with non-zero weight. filter_size: m survivors of the filter (takes
    precedence over filter_ratio, a fraction of the global pool N); m is clipped to [k, N].
    gram: "exact" | "ghost" | "sketch" | "auto" (per layer by cost). geometry: "adam" (P, m̂ from the
    optimizer) | "sgd" (P = I, no momentum) | "muon" / "auto" (torch.optim.Muon's layers: docs/design.md
    §11). muon_model: under muon / auto, the Muon layers' model — "jacobian" (exact) or the quality grid's
    controls "lowrank" / "adam" / "identity" (selection/muon_geometry.py). momentum_coef ρ / curvature τ: None = docs/design.md §2's defaults from the optimizer's β1 and
    step, scaled by curvature_scale γ. w_max: optional cap on each weight (>= 1/budget). target_refresh:
    recompute g_V every this many selection steps.
    sketch_dim_out/in: k_o, k_i of the sketch backend. exchange: what crosses ranks — "direction" (the
    default: the parameter-shaped M = P ⊙ (G_V − ρ m̂) is gathered layer by layer like the weight, b is
    exact and only N scalars, the target's token ids and the survivors' sketches or factors cross ranks;
    selection/direction_exchange.py), "factors" (every candidate's and target's (A, Δ),
    T·(d_in + d_out) floats per sample and layer: exact b) or "sketches" (needs gram="sketch": only
    k_o·k_i floats per sample and layer; b is sketched too, with P ≈ r cᵀ on the target gradient;
    selection/sketch_exchange.py). direction_dtype: "compute" (M crosses ranks in compute_dtype: exact)
    | "bfloat16" (half the bytes, b rounded). direction_cache: keep the gathered M (a full copy of the
    covered weights per rank) while target, optimizer step and ρ are unchanged. capture_chunk_size: samples per
    forward/backward (None: whole pool). capture_chunk_tokens: instead, at most this many token positions
    (samples × padded T) per forward/backward, so memory stays bounded whatever T is and short
    sequences are not split into needlessly small passes. max_temp_elems: bound on temporaries of the Gram kernels
    and on T² for auto's ghost choice. compute_dtype: "auto" = float64 for float64 models else float32.

    Options studied by the quality benchmark (docs/design.md §5):
    alignment: "dot" (b, K as defined) | "cosine" (every candidate's gradient scaled to unit P-norm:
    b_i/‖g_i‖_P, K_ij/(‖g_i‖_P ‖g_j‖_P), as LESS does). filter_curvature: "batch" (default since the
    grid: u = b − (τ/(2k)) K_ii, the sample's share of a k-sample step) | "sample" (u = b − (τ/2) K_ii,
    the sample alone). ess_fraction:
    minimum effective sample size 1/Σw² as a fraction of k, enforced exactly by the weight cap
    w ≤ 1/(ess_fraction·k) (combined with w_max). weighting: "qp" (train on the QP's ≤ k weights) |
    "proportional" (draw k samples with replacement from the survivors ∝ the QP weights, uniform loss
    weights, duplicates merged: the hardware batch stays k). warmup_steps: the first this many steps
    select k at random (uniform weights) before FTW takes over.

    single_pass: keep every trainable leaf's (input, output gradient) from the capture so that the
    training gradient needs no second forward/backward (selection/single_pass.py; the Selection
    carries it as ``pool_pass``). Ignored, with the reason in the diagnostics, for a model with a
    trainable module that is not Linear/Conv1D/Embedding/LayerNorm/*RMSNorm. target_pass: when the
    target gradient is due, "joint" captures the target samples in the same forward/backward as the
    pool (rows appended after the pool's, never selectable); "separate" runs its own pass.

    Two stages (docs/design.md §10). prefilter: "none" (every candidate gets the exact b and diag K from
    a forward/backward over the whole pool) | "head" (stage 1: a forward-only pass over the pool scores
    every candidate by the output layer's exact per-sample alignment, selection/prefilter.py; the top m
    = filter_size / filter_ratio·N go to stage 2, which runs the exact machinery, the QP and the single
    pass on those m rows only). prefilter_window: W tokens per sample scored in stage 1 (None: all).
    prefilter_target: where stage 1's head target gradient comes from — "forward" (a forward over the
    target rows, windowed like the pool) | "reuse" (the head block of the last stage-2 target gradient,
    one step old; a forward when there is none yet or the head is tied and so not covered).
    prefilter_stage2: "exact" (above) | "head" (no stage-2 pass: the QP runs on the head's own b and
    exact K over the m survivors, from stage 1's factors, and the trainer trains the chosen rows with its
    usual forward/backward; the cheapest FTW, scored by the output layer alone). prefilter_target_rows:
    stage 1's target forward uses this many target rows per step, drawn without replacement by the
    selector's seeded generator (the same rows on every rank): an unbiased, noisier G_V at s/|V| of the cost
    (None: every row).
    """

    budget: int
    filter_size: int | None = None  #: m, survivors of the filter (overrides filter_ratio); clipped to [budget, N]
    filter_ratio: float = 0.5  #: m as a fraction of the global pool N
    #: how the Gram matrix is computed (auto: per layer by cost)
    gram: Literal["exact", "ghost", "sketch", "auto"] = "auto"
    #: adam: P and m̂ from the optimizer; sgd: P = I, no momentum; muon: torch.optim.Muon's Newton–Schulz
    #: Jacobian on its layers, P = I elsewhere; auto: Muon layers muon, Adam layers adam (docs/design.md §11)
    geometry: Literal["adam", "sgd", "muon", "auto"] = "adam"
    #: geometry muon / auto: how the Muon layers' update map is modelled — jacobian (the exact NS Jacobian) |
    #: lowrank (OPUS-style S = aI + bA + cA² of the momentum) | adam (Adam's P from a second-moment EMA the
    #: selector keeps: the wrong geometry) | identity (P = I); the last three are the quality grid's controls
    muon_model: Literal["jacobian", "lowrank", "adam", "identity"] = "jacobian"
    momentum_coef: float | None = None  #: ρ (null: docs/design.md §2's default from the optimizer's β1 and step)
    curvature: float | None = None  #: τ (null: docs/design.md §2's default), scaled by curvature_scale
    curvature_scale: float = 1.0  #: γ, the factor on the curvature τ
    solver: Literal["active_set", "torch", "cvxpy"] = "active_set"  #: the QP solver
    support: Literal["topk", "greedy"] = "topk"  #: how the QP's support of at most budget samples is chosen
    w_max: float | None = None  #: cap on each weight (>= 1/budget; null: none)
    target_refresh: int = 1  #: recompute the target gradient g_V every this many selection steps
    sketch_dim_out: int = 32  #: k_o of the sketch backend
    sketch_dim_in: int = 32  #: k_i of the sketch backend
    capture_chunk_size: int | None = None  #: samples per capture forward/backward (null: the whole pool)
    #: instead, at most this many token positions (samples × padded T) per forward/backward
    capture_chunk_tokens: int | None = None
    max_temp_elems: int = 1 << 24  #: bound on the Gram kernels' temporaries and on T² for auto's ghost choice
    compute_dtype: Literal["auto", "float32", "float64"] = "auto"  #: auto: float64 for float64 models, else float32
    #: what crosses ranks: the direction M, the factors (A, Δ) or sketches (needs gram sketch)
    exchange: Literal["direction", "factors", "sketches"] = "direction"
    #: dtype M crosses ranks in: compute (exact) or bfloat16 (half the bytes)
    direction_dtype: Literal["compute", "bfloat16"] = "compute"
    direction_cache: bool = False  #: keep the gathered M while target, optimizer step and ρ are unchanged
    alignment: Literal["dot", "cosine"] = "dot"  #: dot: b, K as defined; cosine: every gradient scaled to unit P-norm
    filter_curvature: Literal["sample", "batch"] = "batch"  #: batch: u = b − (τ/(2k)) K_ii; sample: u = b − (τ/2) K_ii
    ess_fraction: float | None = None  #: minimum effective sample size 1/Σw² as a fraction of budget (null: none)
    #: qp: train on the QP's weights; proportional: draw budget samples ∝ the weights
    weighting: Literal["qp", "proportional"] = "qp"
    warmup_steps: int = 0  #: the first this many steps select at random before FTW takes over
    single_pass: bool = True  #: reuse the capture's (input, output gradient) for the training gradient: no second pass
    #: joint: target rows in the pool's capture pass; separate: their own pass
    target_pass: Literal["joint", "separate"] = "joint"
    #: none: exact scores for the whole pool; head: stage 1 scores by the output layer first
    prefilter: Literal["none", "head"] = "none"
    prefilter_window: int | None = None  #: tokens per sample scored in stage 1 (null: all)
    #: stage 1's head target gradient: forward over the target rows, or reuse the last one
    prefilter_target: Literal["forward", "reuse"] = "forward"
    #: exact: stage 2 on the survivors; head: the QP on the head's own scores
    prefilter_stage2: Literal["exact", "head"] = "exact"
    prefilter_target_rows: int | None = None  #: target rows stage 1's target forward uses per step (null: every row)

    def __post_init__(self) -> None:
        def bad(field_name: str, message: str) -> ValueError:
            return ValueError(f"{field_name}: {message}")

        if self.budget < 1:
            raise bad("budget", f"must be >= 1, got {self.budget}")
        if self.filter_size is not None and self.filter_size < self.budget:
            raise bad("filter_size", f"must be >= budget={self.budget}, got {self.filter_size}")
        if not 0.0 < self.filter_ratio <= 1.0:
            raise bad("filter_ratio", f"must be in (0, 1], got {self.filter_ratio}")
        choices = {
            "gram": gram_ops.BACKENDS,
            "geometry": ("adam", "sgd", "muon", "auto"),
            "muon_model": ("jacobian", "lowrank", "adam", "identity"),
            "solver": ("active_set", "torch", "cvxpy"),
            "support": ("topk", "greedy"),
            "compute_dtype": ("auto", "float32", "float64"),
            "exchange": ("direction", "factors", "sketches"),
            "direction_dtype": ("compute", "bfloat16"),
            "alignment": ("dot", "cosine"),
            "filter_curvature": ("sample", "batch"),
            "weighting": ("qp", "proportional"),
            "target_pass": ("joint", "separate"),
            "prefilter": ("none", "head"),
            "prefilter_target": ("forward", "reuse"),
            "prefilter_stage2": ("exact", "head"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        if self.muon_model != "jacobian" and self.geometry not in ("muon", "auto"):
            raise bad(
                "muon_model",
                f"{self.muon_model!r} applies to geometry 'muon' or 'auto' only (got geometry={self.geometry!r})",
            )
        if self.momentum_coef is not None and not (0.0 <= self.momentum_coef and math.isfinite(self.momentum_coef)):
            raise bad("momentum_coef", f"must be a finite number >= 0, got {self.momentum_coef}")
        if self.curvature is not None and not (self.curvature > 0 and math.isfinite(self.curvature)):
            raise bad("curvature", f"must be a finite number > 0, got {self.curvature}")
        if not (self.curvature_scale > 0 and math.isfinite(self.curvature_scale)):
            raise bad("curvature_scale", f"must be a finite number > 0, got {self.curvature_scale}")
        if self.w_max is not None and not (1.0 / self.budget - 1e-12 <= self.w_max <= 1.0):
            raise bad("w_max", f"must be in [1/budget, 1] = [{1.0 / self.budget:.4g}, 1], got {self.w_max}")
        if self.exchange == "sketches" and self.gram != "sketch":
            raise bad(
                "exchange",
                f"'sketches' needs gram='sketch' (got gram={self.gram!r}): exact and ghost Grams "
                f"need the candidates' factors on every rank",
            )
        if self.direction_dtype != "compute" and self.exchange != "direction":
            raise bad(
                "direction_dtype",
                f"{self.direction_dtype!r} applies to exchange='direction' only (got exchange={self.exchange!r})",
            )
        if not isinstance(self.direction_cache, bool):
            raise bad("direction_cache", f"must be true or false, got {self.direction_cache!r}")
        if self.ess_fraction is not None and not 0.0 < self.ess_fraction <= 1.0:
            raise bad("ess_fraction", f"must be in (0, 1] or null, got {self.ess_fraction}")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.target_refresh < 1:
            raise bad("target_refresh", f"must be >= 1, got {self.target_refresh}")
        for name in ("sketch_dim_out", "sketch_dim_in", "max_temp_elems"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.prefilter_window is not None and self.prefilter_window < 2:
            raise bad("prefilter_window", f"must be >= 2 tokens or null, got {self.prefilter_window}")
        if self.prefilter_window is not None and self.prefilter == "none":
            raise bad("prefilter_window", "applies to prefilter='head' only (got prefilter='none')")
        if self.prefilter_stage2 != "exact" and self.prefilter == "none":
            raise bad("prefilter_stage2", "applies to prefilter='head' only (got prefilter='none')")
        if self.prefilter_target != "forward" and self.prefilter == "none":
            raise bad("prefilter_target", "applies to prefilter='head' only (got prefilter='none')")
        if self.prefilter_target == "reuse" and self.prefilter_stage2 == "head":
            raise bad(
                "prefilter_target",
                "'reuse' takes the head block of stage 2's target gradient, which "
                "prefilter_stage2='head' never computes: use 'forward'",
            )
        if self.prefilter_target_rows is not None and (self.prefilter == "none" or self.prefilter_target_rows < 1):
            raise bad(
                "prefilter_target_rows",
                f"must be >= 1 with prefilter='head' (got {self.prefilter_target_rows} "
                f"with prefilter={self.prefilter!r})",
            )
        if self.prefilter != "none" and self.exchange == "sketches":
            raise bad("prefilter", "'head' runs stage 2 with the exact b: use exchange 'direction' or 'factors'")
        for name in ("capture_chunk_size", "capture_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, f"must be >= 1 or null, got {getattr(self, name)}")
        if self.capture_chunk_size is not None and self.capture_chunk_tokens is not None:
            raise bad("capture_chunk_tokens", "set capture_chunk_size or capture_chunk_tokens, not both")

    def capture_chunk(self, width: int) -> int | None:
        """Samples per capture forward/backward for a batch padded to ``width`` tokens (None: all)."""
        if self.capture_chunk_tokens is not None:
            return max(1, self.capture_chunk_tokens // max(int(width), 1))
        return self.capture_chunk_size

    def weight_cap(self, k: int) -> float | None:
        """The cap on each weight: w_max and 1/(ess_fraction·k), whichever is tighter (None: no cap)."""
        caps = [
            c
            for c in (self.w_max, None if self.ess_fraction is None else 1.0 / (self.ess_fraction * k))
            if c is not None
        ]
        return min(caps) if caps else None

    def num_filtered(self, pool_size: int) -> int:
        m = self.filter_size if self.filter_size is not None else math.ceil(self.filter_ratio * pool_size)
        return max(min(self.budget, pool_size), min(m, pool_size))
