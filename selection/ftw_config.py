"""Typed options of Filter-then-Weight (``selection.options.ftw`` in a run config; docs/design.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

from optsel.config_loader import check_literal_fields

#: the keys of ``prefilter: learned`` (selection/ftw/learned.py)
LEARNED_KEYS = (
    "prefilter_features",
    "prefilter_explore",
    "prefilter_learn_steps",
    "prefilter_decay",
    "prefilter_ridge",
    "prefilter_overlap",
)
#: keys added after benchmark runs were stored: a run's stored key (benchmarks/quality_runs.py ``resolved_options``)
#: leaves them out while they hold their default, where they change nothing, so the stored runs stay valid
LATE_KEYS = (*LEARNED_KEYS, "prefilter_label_every")

#: the allowed values of the options that name an implementation, written once (the registries read them)
GramBackend = Literal["exact", "ghost", "sketch", "auto"]
Solver = Literal["active_set", "torch", "cvxpy"]
ExchangeName = Literal["direction", "factors", "sketches"]


@dataclass(kw_only=True)
class FTWConfig:
    """Options of Filter-then-Weight: a top-m filter by utility, then the QP's weights on the survivors
    (docs/design.md). Each field's meaning is its ``#:`` comment (docs/configuration.md lists them);
    the allowed values of a ``Literal`` field are its type's and are checked from it."""

    budget: int  #: k, the most samples with non-zero weight
    #: m, the survivors of the filter (takes precedence over filter_ratio); m is clipped to [budget, N]
    filter_size: int | None = None
    filter_ratio: float = 0.5  #: m as a fraction of the global pool N (when filter_size is null)
    #: how the Gram matrix K is computed: exact, ghost, sketch, or auto (chosen per layer by cost)
    gram: GramBackend = "auto"
    #: the optimizer's geometry: adam (P and m̂ from the optimizer) | sgd (P = I, no momentum) | muon
    #: (torch.optim.Muon's Newton–Schulz Jacobian on its layers, P = I elsewhere) | auto (Muon layers
    #: muon, Adam layers adam); docs/design.md, The Muon geometry
    geometry: Literal["adam", "sgd", "muon", "auto"] = "adam"
    #: geometry muon / auto: how the Muon layers' update map is modelled (selection/muon_geometry.py) —
    #: jacobian (the exact NS Jacobian) | lowrank (OPUS-style S = aI + bA + cA² of the momentum) | adam
    #: (Adam's P from a second-moment EMA the selector keeps: the wrong geometry) | identity (P = I);
    #: the last three are the quality grid's controls
    muon_model: Literal["jacobian", "lowrank", "adam", "identity"] = "jacobian"
    #: ρ, the momentum correction (null: the default from the optimizer's β1 and step, docs/design.md,
    #: The optimiser-aware utility)
    momentum_coef: float | None = None
    #: τ, the curvature (null: the default from the optimizer's β1 and step, docs/design.md, The
    #: optimiser-aware utility), scaled by curvature_scale
    curvature: float | None = None
    curvature_scale: float = 1.0  #: γ, the factor on the curvature τ
    solver: Solver = "active_set"  #: the QP solver
    support: Literal["topk", "greedy"] = "topk"  #: how the QP's support of at most budget samples is chosen
    w_max: float | None = None  #: cap on each weight (>= 1/budget; null: none)
    target_refresh: int = 1  #: recompute the target gradient g_V every this many selection steps
    sketch_dim_out: int = 32  #: k_o, the output-side dimension of the sketch backend
    sketch_dim_in: int = 32  #: k_i, the input-side dimension of the sketch backend
    #: samples per capture forward/backward (null: the whole pool in one pass)
    capture_chunk_size: int | None = None
    #: instead of capture_chunk_size: at most this many token positions (samples × the pass's longest row)
    #: per forward/backward; rows are sorted by length and each pass is cut to its own longest row, so
    #: memory stays bounded whatever T is and a pool of mixed lengths pays for its tokens, not its padding
    capture_chunk_tokens: int | None = None
    #: bound (elements) on the temporaries of the Gram kernels, and on T² for auto's ghost choice
    max_temp_elems: int = 1 << 24
    #: dtype of the selection's arithmetic; auto: float64 for float64 models, else float32
    compute_dtype: Literal["auto", "float32", "float64"] = "auto"
    #: what crosses ranks — direction: the parameter-shaped M = P ⊙ (G_V − ρ m̂), gathered layer by layer
    #: like the weight, b exact and only N scalars; the target's token ids and the survivors' sketches or
    #: factors cross ranks (selection/ftw/exchanges/direction.py) | factors: every candidate's and the target's
    #: (A, Δ), T·(d_in + d_out) floats per sample and layer, b exact | sketches: needs gram sketch, only
    #: k_o·k_i floats per sample and layer, b sketched too with P ≈ r cᵀ on the target gradient
    #: (selection/ftw/exchanges/sketches.py)
    exchange: ExchangeName = "direction"
    #: exchange direction: the dtype M crosses ranks in — compute (compute_dtype: exact) | bfloat16 (half
    #: the bytes, b rounded)
    direction_dtype: Literal["compute", "bfloat16"] = "compute"
    #: keep the gathered M (a full copy of the covered weights per rank) while the target, the optimizer
    #: step and ρ are unchanged
    direction_cache: bool = False
    #: dot: b and K as defined | cosine: every candidate's gradient scaled to unit P-norm, b_i/‖g_i‖_P and
    #: K_ij/(‖g_i‖_P ‖g_j‖_P), as LESS does (docs/design.md, Options studied on the quality grid)
    alignment: Literal["dot", "cosine"] = "dot"
    #: the filter's utility — batch (the default since the quality grid): u = b − (τ/(2k)) K_ii, the
    #: sample's share of a k-sample step | sample: u = b − (τ/2) K_ii, the sample alone (a quality-grid
    #: option)
    filter_curvature: Literal["sample", "batch"] = "batch"
    #: minimum effective sample size 1/Σw² as a fraction of budget k, enforced exactly by the weight cap
    #: w ≤ 1/(ess_fraction·k), combined with w_max (null: none; a quality-grid option)
    ess_fraction: float | None = None
    #: qp: train on the QP's ≤ budget weights | proportional: draw budget samples with replacement from the
    #: survivors ∝ the QP weights, uniform loss weights, duplicates merged (the hardware batch stays k);
    #: a quality-grid option
    weighting: Literal["qp", "proportional"] = "qp"
    #: the first this many steps select budget samples at random (uniform weights) before FTW takes over
    #: (a quality-grid option)
    warmup_steps: int = 0
    #: keep every trainable leaf's (input, output gradient) from the capture so that the training
    #: gradient needs no second forward/backward (selection/single_pass.py; the Selection carries it as
    #: pool_pass); ignored, with the reason in the diagnostics, for a model with a trainable module that
    #: is not Linear/Conv1D/Embedding/LayerNorm/*RMSNorm
    single_pass: bool = True
    #: when the target gradient is due — joint: the target samples in the same forward/backward as the
    #: pool (rows appended after the pool's, never selectable) | separate: their own pass
    target_pass: Literal["joint", "separate"] = "joint"
    #: two stages (docs/design.md, Two stages) — none: every candidate gets the exact b and
    #: diag K from a forward/backward over the whole pool | head: stage 1, a forward-only pass over the
    #: pool, scores every candidate by the output layer's exact per-sample alignment
    #: (selection/ftw/prefilter.py); the top m (filter_size, or filter_ratio·N) go to stage 2, which runs the
    #: exact machinery, the QP and the single pass on those m rows only | learned: stage 1 runs no model; a
    #: ridge regression from hashed token counts to stage 2's exact utility, fitted online on earlier
    #: survivors, picks the m (selection/ftw/learned.py)
    prefilter: Literal["none", "head", "learned"] = "none"
    #: prefilter head: W, the tokens per sample scored in stage 1 (null: all)
    prefilter_window: int | None = None
    #: prefilter head: where stage 1's head target gradient comes from — forward (a forward over the
    #: target rows, windowed like the pool) | reuse (the head block of the last stage-2 target gradient,
    #: one step old; a forward when there is none yet or the head is tied and so not covered)
    prefilter_target: Literal["forward", "reuse"] = "forward"
    #: prefilter head: exact (stage 2 as under prefilter) | head (no stage-2 pass: the QP runs on the
    #: head's own b and exact K over the m survivors, from stage 1's factors, and the trainer trains the
    #: chosen rows with its usual forward/backward; the cheapest FTW, scored by the output layer alone)
    #: | score (prefilter learned: no stage 2 on most steps — the k best by the learned score with uniform weights and
    #: the trainer's own step; every prefilter_label_every-th step is an exact one-stage step that labels the pool)
    prefilter_stage2: Literal["exact", "head", "score"] = "exact"
    #: prefilter head: s, the target rows stage 1's target forward uses per step, drawn without
    #: replacement by the selector's seeded generator (the same rows on every rank): an unbiased,
    #: noisier G_V at s/|V| of the cost (null: every row)
    prefilter_target_rows: int | None = None
    #: prefilter head: L, the decoder blocks stage 1's forward runs before the final norm and the output
    #: layer, an early-exit proxy that costs about L/n_layers of the blocks' forward (0: the embeddings
    #: straight into the head; null: every block, the exact output-layer score); docs/design.md, Two stages
    prefilter_depth: int | None = None
    #: prefilter learned: hash buckets per part (prompt, response) of the token unigram+bigram features
    prefilter_features: int = 256
    #: prefilter learned: the share of the m survivors drawn uniformly from the candidates the score does not
    #: keep (exploration: the regression also sees what it would not pick; 1.0: every survivor at random)
    prefilter_explore: float = 0.25
    #: prefilter learned: the first steps that label the whole pool (exact one-stage steps) before the score is used
    prefilter_learn_steps: int = 2
    #: prefilter learned: per-step decay of the regression's sufficient statistics (older survivors count less)
    prefilter_decay: float = 0.9
    #: prefilter learned: the ridge penalty λ on the regression's weights (features are unit-norm per part)
    prefilter_ridge: float = 1.0
    #: prefilter learned: add 3 prompt-response overlap features (the share of the response's tokens, bigrams and
    #: reversed bigrams that occur in the prompt), which can tell a mismatched or reordered answer from its prompt
    prefilter_overlap: bool = False
    #: prefilter learned, stage 2 score: every R-th step after the learning steps labels the whole pool (an exact
    #: one-stage step) and refits; null: only the learning steps label
    prefilter_label_every: int | None = None

    def __post_init__(self) -> None:
        def bad(field_name: str, message: str) -> ValueError:
            return ValueError(f"{field_name}: {message}")

        if self.budget < 1:
            raise bad("budget", f"must be >= 1, got {self.budget}")
        if self.filter_size is not None and self.filter_size < self.budget:
            raise bad("filter_size", f"must be >= budget={self.budget}, got {self.filter_size}")
        if not 0.0 < self.filter_ratio <= 1.0:
            raise bad("filter_ratio", f"must be in (0, 1], got {self.filter_ratio}")
        check_literal_fields(self, FTWConfig)  # the base's values: a subclass checks what it fixes itself
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
        head_only = {
            "prefilter_window": self.prefilter_window is not None,
            "prefilter_stage2": self.prefilter_stage2 == "head",
            "prefilter_target": self.prefilter_target != "forward",
            "prefilter_target_rows": self.prefilter_target_rows is not None,
            "prefilter_depth": self.prefilter_depth is not None,
        }
        for name, is_set in head_only.items():
            if is_set and self.prefilter != "head":
                raise bad(name, f"applies to prefilter='head' only (got prefilter={self.prefilter!r})")
        self._check_learned(bad)
        if self.prefilter_target == "reuse" and self.prefilter_stage2 == "head":
            raise bad(
                "prefilter_target",
                "'reuse' takes the head block of stage 2's target gradient, which "
                "prefilter_stage2='head' never computes: use 'forward'",
            )
        if self.prefilter_target_rows is not None and self.prefilter_target_rows < 1:
            raise bad(
                "prefilter_target_rows",
                f"must be >= 1 with prefilter='head' (got {self.prefilter_target_rows} "
                f"with prefilter={self.prefilter!r})",
            )
        if self.prefilter_depth is not None and self.prefilter_depth < 0:
            raise bad(
                "prefilter_depth",
                f"must be >= 0 with prefilter='head' (got {self.prefilter_depth} with prefilter={self.prefilter!r})",
            )
        if self.prefilter_depth is not None and self.prefilter_target == "reuse":
            raise bad(
                "prefilter_target",
                "'reuse' takes the full model's head target gradient, which an early exit (prefilter_depth) "
                "does not score against: use 'forward'",
            )
        if self.prefilter != "none" and self.exchange == "sketches":
            raise bad(
                "prefilter", f"{self.prefilter!r} runs stage 2 with the exact b: use exchange 'direction' or 'factors'"
            )
        for name in ("capture_chunk_size", "capture_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, f"must be >= 1 or null, got {getattr(self, name)}")
        if self.capture_chunk_size is not None and self.capture_chunk_tokens is not None:
            raise bad("capture_chunk_tokens", "set capture_chunk_size or capture_chunk_tokens, not both")

    def _check_learned(self, bad: Callable[[str, str], ValueError]) -> None:
        """The ``prefilter: learned`` keys: in range, and only with that prefilter when not at their defaults."""
        defaults = {f.name: f.default for f in fields(FTWConfig) if f.name.startswith("prefilter_")}
        for name in LEARNED_KEYS:
            if getattr(self, name) != defaults[name] and self.prefilter != "learned":
                raise bad(name, f"applies to prefilter='learned' only (got prefilter={self.prefilter!r})")
        if self.prefilter_stage2 == "score" and self.prefilter != "learned":
            raise bad(
                "prefilter_stage2", f"'score' applies to prefilter='learned' only (got prefilter={self.prefilter!r})"
            )
        if self.prefilter_label_every is not None and self.prefilter_stage2 != "score":
            raise bad(
                "prefilter_label_every",
                f"applies to prefilter_stage2='score' only (got prefilter_stage2={self.prefilter_stage2!r})",
            )
        if self.prefilter_label_every is not None and self.prefilter_label_every < 1:
            raise bad("prefilter_label_every", f"must be >= 1 or null, got {self.prefilter_label_every}")
        if self.prefilter_features < 1:
            raise bad("prefilter_features", f"must be >= 1, got {self.prefilter_features}")
        if not isinstance(self.prefilter_overlap, bool):
            raise bad("prefilter_overlap", f"must be true or false, got {self.prefilter_overlap!r}")
        if not 0.0 <= self.prefilter_explore <= 1.0:
            raise bad("prefilter_explore", f"must be in [0, 1], got {self.prefilter_explore}")
        if self.prefilter_learn_steps < 1:
            raise bad(
                "prefilter_learn_steps",
                f"must be >= 1 (the score needs labelled steps), got {self.prefilter_learn_steps}",
            )
        if not 0.0 < self.prefilter_decay <= 1.0:
            raise bad("prefilter_decay", f"must be in (0, 1], got {self.prefilter_decay}")
        if not (self.prefilter_ridge > 0 and math.isfinite(self.prefilter_ridge)):
            raise bad("prefilter_ridge", f"must be a finite number > 0, got {self.prefilter_ridge}")

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
