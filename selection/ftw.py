"""Filter-then-Weight (docs/design.md §2–§4, §7): the optimizer-aware selector.

    ftw = FilterThenWeight(model, optimizer, FTWConfig(budget=k, filter_size=m, gram="exact"))
    sel = ftw.select(pool, target)

One step: capture (A, Δ) of the pool → target gradient (every ``target_refresh`` steps) → P, m̂ from
the optimizer → alignment b (exact, target-side trick) and diag K → filter on u = b − (τ/2) diag K →
Gram K on the m survivors → weight QP → ≤ k weights. What crosses ranks is ``exchange``'s choice:
"direction" (default; selection/direction_exchange.py: M gathered like the weight, N scalars, the
survivors' sketches or factors), "factors" (below: every candidate's factors all-gathered, partial
results on this rank's moment blocks all-reduced) or "sketches" (selection/sketch_exchange.py). The
collectives are no-ops on one process, and every rank returns the same Selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection import muon_geometry
from optsel.selection.alignment import alignment_partial, target_direction
from optsel.selection.base import Batch, Selection, Selector, agree, register_selector, split_local, timed
from optsel.selection.capture import (
    Coverage,
    Factors,
    capture_factors,
    compute_dtype,
    find_covered_layers,
    gather_factors,
    stack_batches,
)
from optsel.selection.cost_model import REFERENCE_WORLD
from optsel.selection.direction_exchange import DirectionCache, gather_batch, phase, select_direction
from optsel.selection.direction_exchange import _empty as _empty_block
from optsel.selection.filter import filter_candidates, utility
from optsel.selection.ftw_config import FTWConfig
from optsel.selection.model_view import ModelView, cleans_up, make_state_reader, model_view_for
from optsel.selection.muon_geometry import muon_alignment_and_diag, muon_gram
from optsel.selection.preconditioner import LayerGeometry, OptimizerStateReader, default_coefficients, layer_geometry
from optsel.selection.single_pass import PoolPass, single_pass_leaves
from optsel.selection.sketch_exchange import SketchTarget, select_sketches
from optsel.selection.solvers import select_weights
from optsel.selection.target import TargetCache
from optsel.selection.two_stage import HeadPrefilter, SurvivorPool


class FilterThenWeight(Selector):
    """The FTW selector (see module docstring); ``Stateful``."""

    name = "ftw"
    needs_target = True

    def __init__(self, model: nn.Module, optimizer: Any, config: FTWConfig, seed: int = 0):
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.view: ModelView = model_view_for(model, optimizer)
        self.coverage: Coverage = find_covered_layers(model, self.view)
        self.reader: OptimizerStateReader = make_state_reader(optimizer, config.geometry, self.view)
        self.target_cache = TargetCache(config.target_refresh)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step = 0
        self.counters: dict[str, int] = {}
        self.comm = distributed.CommCounter()
        self.sketch_target = SketchTarget(config.target_refresh)  # exchange="sketches": local target factors
        self.leaves, self.single_pass_problem = (
            single_pass_leaves(model, self.view) if config.single_pass else ([], "single_pass: false")
        )
        self._pool_pass: PoolPass | None = None
        self._joint_target: Factors | None = None
        self.direction_cache = DirectionCache()  # exchange="direction": gathered M, P (direction_cache=True)
        self.engine_bytes = self.view.engine_bytes_per_step()  # the engine's own, per step
        self.prefilter = (
            HeadPrefilter(model, self.view, self.reader, config, self.coverage.layers)
            if config.prefilter == "head"
            else None
        )
        self._eligible: torch.Tensor | None = None  # stage 2: which of the survivors' pool rows may be chosen
        for layer in self.coverage.layers:  # fail at construction, naming the parameter
            try:
                self.reader.read(layer.param)
            except KeyError as err:
                raise ValueError(f"optimizer: covered parameter {layer.name} is not in its param_groups") from err
        self.muon_layers = muon_geometry.check_config(self.reader, self.coverage.layers, config)

    # ------------------------------------------------------------------ public
    @property
    def covered(self) -> list[str]:
        return self.coverage.names

    @cleans_up
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        self.comm.reset()
        timings: dict[str, float] = {}
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]), self.comm)
        if self.step < self.config.warmup_steps:
            return self._warmup_selection(sizes, timings)
        if self.prefilter is None:
            return self._select_exact(pool, target, sizes, timings)
        return self._select_two_stage(pool, target, sizes, timings)

    def _select_two_stage(
        self, pool: Batch, target: Batch | None, sizes: list[int], timings: dict[str, float]
    ) -> Selection:
        """``prefilter: head`` (docs/design.md §10): stage 1 over the pool, the exact step on its m survivors."""
        dtype = torch.float64 if self._dtype_name() == "float64" else torch.float32
        index = self.prefilter.covered_index
        reuse = (
            self.target_cache.blocks[index]
            if index is not None and self.target_cache.blocks is not None and self.config.exchange != "sketches"
            else None
        )
        stage1 = self.prefilter.run(
            pool, target, sizes, dtype, self._coefficients, reuse, self.comm, timings, self.generator
        )
        if self.config.prefilter_stage2 == "head":
            return self._select_on_head(stage1, sizes, timings)
        rank = distributed.info().rank if distributed.is_distributed() else 0
        survivors = SurvivorPool.build(pool, stage1.survivors, sizes, rank)
        self._eligible = survivors.eligible
        try:
            sel = self._select_exact(survivors.batch, target, survivors.sizes, timings)
        finally:
            self._eligible = None
        return survivors.remap(sel, sizes, stage1)

    def _select_on_head(self, stage1, sizes: list[int], timings: dict[str, float]) -> Selection:
        """``prefilter_stage2: head``: filter and QP on the head's b, diag K and survivors' K (no pool pass)."""
        rho, tau, opt_step = stage1.coefficients
        head = self.prefilter.head
        sel = self._finish(
            stage1.alignment,
            stage1.diag,
            tau,
            rho,
            opt_step,
            sizes,
            [stage1.geometry],
            ["exact"],
            timings,
            {},
            lambda filtered: self.prefilter.survivors_gram(stage1, filtered, sizes, self.comm),
            not stage1.target_reused,
            tokens=torch.zeros(sum(sizes), dtype=torch.int64),
            seq_len=int(stage1.factors.A[0].shape[1]) if stage1.factors is not None else 0,
        )
        sel.diagnostics.update(
            {
                "prefilter": "head",
                "prefilter_stage2": "head",
                "gram_backends": {head.name: "exact"},
                "stage1_target_reused": stage1.target_reused,
            }
        )
        sel.diagnostics.pop("empty_samples", None)
        sel.covered = [head.name]
        return sel

    def _select_exact(
        self, pool: Batch, target: Batch | None, sizes: list[int], timings: dict[str, float]
    ) -> Selection:
        """One exact FTW step over ``pool`` (every row gets the exact b and diag K)."""
        cfg = self.config
        layers = self.coverage.layers
        n_global = sum(sizes)
        fallbacks: dict[str, int] = {}
        due = (self.sketch_target if cfg.exchange == "sketches" else self.target_cache).due(self.step)
        joint = target if due and cfg.target_pass == "joint" else None
        if joint is not None and cfg.exchange == "direction":  # every rank captures the whole target
            with phase(timings, self.comm, "target"):
                joint = gather_batch(joint, self.comm)
        with phase(timings, self.comm, "capture"):
            self._pool_pass = PoolPass() if self.leaves else None
            local, self._joint_target = self._capture(pool, joint)
        dtype = self._dtype(local)
        geoms = [
            layer_geometry(self.reader, layer, dtype, use_momentum=cfg.geometry in ("adam", "auto")) for layer in layers
        ]
        rho, tau, opt_step = self._coefficients(geoms)
        muon_geometry.attach(self.reader, geoms, layers, self.muon_layers, dtype, tau, cfg)

        if cfg.exchange == "sketches":
            return select_sketches(self, target, local, geoms, rho, tau, opt_step, sizes, timings)
        if cfg.exchange == "direction":
            return select_direction(self, target, local, geoms, rho, tau, opt_step, sizes, timings)

        refreshed = False
        with phase(timings, self.comm, "target"):
            if self.target_cache.due(self.step):
                if target is None:
                    raise ValueError(
                        "target: FilterThenWeight needs a target batch (input_ids, attention_mask, labels)"
                    )
                tf = gather_factors(self._target_factors(target), dtype, self.comm)
                self.target_cache.update(tf, [[blk for blk in g.blocks] for g in geoms], self.step)
                refreshed = True

        with phase(timings, self.comm, "gather"):
            pool_f = gather_factors(local, dtype, self.comm)
            T = int(pool_f.A[0].shape[1]) if pool_f.A else 1
            backends = [
                self._backend(layer, pool_f.A[i].shape[1], n_global, cfg.num_filtered(n_global))
                for i, layer in enumerate(layers)
            ]
            factors_rc = [
                gram_ops.rank_one_factors(
                    g.blocks or [_empty_block(dtype, self._device())],
                    layer.d_out,
                    layer.d_in,
                    not self.reader.replicated,
                    self.comm,
                )
                if backends[i] not in ("exact", "muon")
                else None
                for i, (layer, g) in enumerate(zip(layers, geoms))
            ]
            sketches = self._sketches(local, dtype, backends, factors_rc, self._projections(backends, dtype))

        with phase(timings, self.comm, "alignment"):  # exact layers: b and diag K from each G_i formed once
            partial_b = torch.zeros(n_global, dtype=torch.float64, device=self._device())
            partial_diag = torch.zeros_like(partial_b)
            for i, g in enumerate(geoms):
                for blk, gv in zip(g.blocks, self.target_cache.blocks[i]):
                    if g.muon is not None:  # docs/design.md §11: M = Jᵀ(g_V − ρ_μ u₀)/c', Ĵ g_i per sample
                        M = g.muon.direction(gv.to(self._device(), dtype), muon_geometry.rho_scale(cfg))
                        part_b, part_diag = muon_alignment_and_diag(
                            pool_f.A[i], pool_f.D[i], M, g.muon, cfg.max_temp_elems
                        )
                        partial_b += part_b.double()
                        partial_diag += part_diag.double()
                        continue
                    M = target_direction(blk.precond, gv.to(self._device(), dtype), blk.momentum, rho)
                    if backends[i] == "exact":
                        part_b, part_diag = gram_ops.exact_alignment_and_diag_partial(
                            pool_f.A[i], pool_f.D[i], M, blk, cfg.max_temp_elems
                        )
                        partial_b += part_b.double()
                        partial_diag += part_diag.double()
                    else:
                        partial_b += alignment_partial(pool_f.A[i], pool_f.D[i], M, blk.rows, blk.cols).double()

        with phase(timings, self.comm, "gram"):
            shared_diag = torch.zeros_like(partial_diag)  # already global on every rank (ghost/sketch)
            for i in range(len(geoms)):  # exact layers' diag came with the alignment
                if backends[i] == "ghost":
                    r, c = factors_rc[i]
                    shared_diag += gram_ops.ghost_diag(pool_f.A[i], pool_f.D[i], r, c, cfg.max_temp_elems).double()
                elif backends[i] == "sketch":
                    shared_diag += sketches[i].reshape(n_global, -1).square().sum(1).double()
            reduced = self._sum_blocks(torch.stack([partial_b, partial_diag]))
            alignment, diag = reduced[0], reduced[1] + shared_diag

        return self._finish(
            alignment,
            diag,
            tau,
            rho,
            opt_step,
            sizes,
            geoms,
            backends,
            timings,
            fallbacks,
            lambda filtered: self._filtered_gram(pool_f, geoms, backends, factors_rc, sketches, filtered),
            refreshed,
            tokens=pool_f.tokens,
            seq_len=T,
        )

    def _finish(
        self,
        alignment,
        diag,
        tau,
        rho,
        opt_step,
        sizes,
        geoms,
        backends,
        timings,
        fallbacks,
        gram_of,
        refreshed,
        tokens,
        seq_len,
    ) -> Selection:
        """Filter on u, Gram of the survivors (``gram_of(filtered)``), QP, agreement, bookkeeping."""
        cfg, layers = self.config, self.coverage.layers
        n_global = sum(sizes)
        eligible = self._eligible
        n_real = n_global if eligible is None else int(eligible.sum())
        k = min(cfg.budget, n_real)
        for g in geoms:  # docs/design.md §11: a Muon layer with no momentum direction yet runs as P = I
            if getattr(g.muon, "degenerate", False):
                fallbacks["muon_degenerate"] = fallbacks.get("muon_degenerate", 0) + 1
        with timed(timings, "filter"):
            norms = diag.clamp(min=1e-300).sqrt() if cfg.alignment == "cosine" else None
            if norms is not None:  # unit P-norm gradients: b_i/‖g_i‖, K_ii = 1
                alignment, diag = alignment / norms, torch.ones_like(diag)
            u = utility(alignment, diag, tau / k if cfg.filter_curvature == "batch" else tau)
            if eligible is not None:  # stage 2: every survivor may stay (u > 0), padding rows never
                u = torch.where(eligible.to(u.device), u, torch.full_like(u, -torch.inf))
            m = n_real if eligible is not None else cfg.num_filtered(n_global)
            filt = filter_candidates(u, m, k)
            if filt.fallback:
                fallbacks["filter_underflow"] = 1
            filtered = filt.filtered
            if eligible is not None:  # a non-finite survivor ranks with the padding: never hand padding on
                filtered = filtered[eligible.to(filtered.device)[filtered]]

        with phase(timings, self.comm, "gram"):
            K = gram_of(filtered)
            if norms is not None:
                K = K / torch.outer(norms[filtered], norms[filtered]).to(K.dtype)

        with phase(timings, self.comm, "solve"):
            proportional = cfg.weighting == "proportional"
            result = select_weights(
                alignment[filtered],
                K,
                u[filtered],
                tau,
                filtered.numel() if proportional else k,
                cfg.weight_cap(k),
                cfg.solver,
                cfg.support,
            )
            if result.fallback:
                fallbacks[result.fallback] = fallbacks.get(result.fallback, 0) + 1
            support, chosen_w = result.support, result.weights.double()
            if proportional:
                support, chosen_w = self._draw_proportional(support, chosen_w, k)
            indices, weights = agree(filtered[support].to(torch.int64).cpu(), k, self.comm, chosen_w.cpu())

        for key, count in fallbacks.items():
            self.counters[key] = self.counters.get(key, 0) + count
        self.step += 1
        local_idx, local_w = split_local(indices, weights, sizes, distributed.info().rank)
        diagnostics = {
            "fallbacks": fallbacks,
            "fallbacks_total": dict(self.counters),
            "solver_status": result.status if not result.fallback else "fallback",
            "solver_detail": result.status,
            "preconditioner": self._precond_note(geoms),
            "gram_condition": gram_ops.condition_number(K),
            "num_filtered": int(filtered.numel()),
            "num_positive_utility": filt.num_positive,
            "momentum_coef": rho,
            "curvature": tau,
            "optimizer_step": opt_step,
            "gram_backends": {layer.name: be for layer, be in zip(layers, backends)},
            "excluded": dict(self.coverage.excluded),
            "target_refreshed": refreshed,
            "empty_samples": int((tokens == 0).sum()),
            "comm_bytes": self.comm.bytes,
            "comm_by_phase": dict(self.comm.by_phase),
            "engine_bytes_estimate": self.engine_bytes,
            "seq_len": seq_len,
            "exchange": cfg.exchange,
            "warmup": False,
            "single_pass": self._pool_pass is not None,
            "single_pass_problem": self.single_pass_problem,
        }
        pool_pass, self._pool_pass = self._pool_pass, None
        return Selection(
            indices=indices,
            weights=weights,
            local_indices=local_idx,
            local_weights=local_w,
            pool_size=n_global,
            alignment=alignment.cpu(),
            utility=u.cpu(),
            filtered=filtered.cpu(),
            gram=K.cpu(),
            covered=list(self.covered),
            timings=timings,
            diagnostics=diagnostics,
            pool_pass=pool_pass,
        )

    def _warmup_selection(self, sizes: list[int], timings: dict[str, float]) -> Selection:
        """``warmup_steps``: k of the N global candidates at random, uniform weights (the selector's
        generator: the same on every rank)."""
        with timed(timings, "select"):
            n, k = sum(sizes), min(self.config.budget, sum(sizes))
            indices = torch.randperm(n, generator=self.generator)[:k].sort().values.to(torch.int64)
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.step += 1
        local_idx, local_w = split_local(indices, weights, sizes, distributed.info().rank)
        return Selection(
            indices=indices,
            weights=weights,
            local_indices=local_idx,
            local_weights=local_w,
            pool_size=n,
            covered=list(self.covered),
            timings=timings,
            diagnostics={
                "warmup": True,
                "fallbacks": {},
                "fallbacks_total": dict(self.counters),
                "comm_bytes": self.comm.bytes,
            },
        )

    def _draw_proportional(
        self, support: torch.Tensor, weights: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weighting="proportional"``: k draws with replacement ∝ ``weights`` (the selector's
        generator), duplicates merged: returns (positions, count/k) ordered by position."""
        draws = torch.multinomial(weights.cpu().double(), k, replacement=True, generator=self.generator)
        picked, counts = torch.unique(support.cpu()[draws], return_counts=True)
        return picked.to(support.device), (counts.double() / k).to(weights.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "counters": dict(self.counters),
            "generator": self.generator.get_state(),
            "target": self.target_cache.state_dict(),
            "sketch_target": self.sketch_target.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.counters = dict(state.get("counters", {}))
        self.generator.set_state(state["generator"])
        self.target_cache.load_state_dict(dict(state.get("target", {})))
        self.sketch_target.load_state_dict(dict(state.get("sketch_target", {})))

    # ------------------------------------------------------------------ helpers
    def _capture(self, pool: Batch, target: Batch | None) -> tuple[Factors, Factors | None]:
        """The pool's factors (and the single pass), with ``target``'s rows riding in the same
        forward/backward when given: (pool factors, target factors or None)."""
        cfg, layers = self.config, self.coverage.layers
        if target is None:
            return capture_factors(
                self.model, pool, layers, cfg.capture_chunk(pool["input_ids"].shape[1]), self._pool_pass, self.leaves
            ), None
        n = int(pool["input_ids"].shape[0])
        joint = stack_batches(pool, target)
        both = capture_factors(
            self.model, joint, layers, cfg.capture_chunk(joint["input_ids"].shape[1]), self._pool_pass, self.leaves
        )
        return both.rows(0, n), both.rows(n, both.num_samples)

    def _target_factors(self, target: Batch | None, whole: bool = False) -> Factors:
        """The target factors: from the joint capture when it ran, else their own pass over this rank's
        target rows (``whole``: over every rank's, gathered: the direction exchange)."""
        if target is None:
            raise ValueError("target: FilterThenWeight needs a target batch (input_ids, attention_mask, labels)")
        joint, self._joint_target = self._joint_target, None
        if joint is not None:
            return joint
        batch = gather_batch(target, self.comm) if whole else target
        return capture_factors(
            self.model, batch, self.coverage.layers, self.config.capture_chunk(batch["input_ids"].shape[1])
        )

    def _device(self) -> torch.device:
        return self.coverage.layers[0].param.device

    def _dtype(self, factors: Factors) -> torch.dtype:
        return compute_dtype(factors, self.config.compute_dtype)

    def _coefficients(self, geoms: list[LayerGeometry]) -> tuple[float, float, int]:
        cfg = self.config
        if cfg.geometry == "sgd":
            return 0.0, cfg.curvature if cfg.curvature is not None else cfg.curvature_scale, 0
        hyper = max(
            (g.hyper for g in geoms if g.muon is None), key=lambda h: h.step, default=geoms[0].hyper if geoms else None
        )
        rho, tau = default_coefficients(hyper.step, hyper.beta1, cfg.curvature_scale)
        rho = cfg.momentum_coef if cfg.momentum_coef is not None else rho
        tau = cfg.curvature if cfg.curvature is not None else tau
        return rho, tau, hyper.step

    def _precond_note(self, geoms: list[LayerGeometry]) -> str:
        if self.config.geometry == "sgd":
            return "identity (geometry=sgd)"
        if self.muon_layers:
            return muon_geometry.note(geoms, self.config.geometry)
        if all(g.identity for g in geoms):
            return "identity (before the optimizer's first step: no Adam state yet; momentum 0)"
        if any(g.identity for g in geoms):
            return "adam (some covered parameters have no state yet: identity there)"
        return "adam"

    def _backend(self, layer, T: int, n: int, m: int) -> str:
        """The layer's Gram backend; ``auto``: selection/cost_model.py for this step's T, N, m and the exchange
        (at cost_model.REFERENCE_WORLD ranks whatever R ≥ 2 is: the same choice, so the same selection, on any
        R ≥ 2; at R = 1 on one process, where no byte crosses ranks)."""
        cfg = self.config
        if layer.name in self.muon_layers:  # the exact Muon Gram (docs/design.md §11)
            return "muon"
        if cfg.gram != "auto":
            return cfg.gram
        esz = 8 if self._dtype_name() == "float64" else 4
        wire = 2 if cfg.direction_dtype == "bfloat16" else esz
        return gram_ops.auto_backend(
            int(T),
            layer.d_in,
            layer.d_out,
            cfg.max_temp_elems,
            n=n,
            m=m,
            world=REFERENCE_WORLD if distributed.is_distributed() else 1,
            exchange=cfg.exchange,
            k_out=cfg.sketch_dim_out,
            k_in=cfg.sketch_dim_in,
            esz=esz,
            wire_esz=wire,
        )

    def _dtype_name(self) -> str:
        if self.config.compute_dtype != "auto":
            return self.config.compute_dtype
        return str(self.coverage.layers[0].param.dtype).removeprefix("torch.")

    def _sum_blocks(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of per-block partial results over ranks (only when the state is sharded)."""
        return partial if self.reader.replicated else distributed.all_reduce_sum(partial, self.comm)

    def _projections(self, backends: list[str], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """This step's (Π_o, Π_i) per sketch layer (one seed per step from the selector's RNG: the
        same on every rank)."""
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return [
            gram_ops.sketch_projections(
                layer.d_out,
                layer.d_in,
                self.config.sketch_dim_out,
                self.config.sketch_dim_in,
                step_seed + i,
                dtype,
                self._device(),
            )
            if backends[i] == "sketch"
            else None
            for i, layer in enumerate(self.coverage.layers)
        ]

    def _sketches(
        self, local: Factors, dtype: torch.dtype, backends: list[str], factors_rc: list, projections: list
    ) -> list[torch.Tensor | None]:
        """Per sketch layer: the local candidates' sketches [n, k_o, k_i], all-gathered."""
        out: list[torch.Tensor | None] = []
        for i in range(len(self.coverage.layers)):
            if backends[i] != "sketch":
                out.append(None)
                continue
            r, c = factors_rc[i]
            po, pi = projections[i]
            S = gram_ops.sketch(local.A[i].to(dtype), local.D[i].to(dtype), r, c, po, pi)
            out.append(distributed.all_gather_cat(S, self.comm) if distributed.is_distributed() else S)
        return out

    def _filtered_gram(
        self, pool_f: Factors, geoms, backends, factors_rc, sketches, filtered: torch.Tensor
    ) -> torch.Tensor:
        m = filtered.numel()
        partial = torch.zeros(m, m, dtype=torch.float64, device=self._device())
        shared = torch.zeros_like(partial)
        for i, g in enumerate(geoms):
            if backends[i] == "sketch":
                shared += gram_ops.sketch_gram(sketches[i][filtered]).double()
                continue
            A, D = pool_f.A[i][filtered], pool_f.D[i][filtered]
            if backends[i] == "muon":
                partial += muon_gram(A, D, g.muon, A.dtype, self.config.max_temp_elems).double()
            elif backends[i] == "exact":
                for blk in g.blocks:
                    partial += gram_ops.exact_gram_partial(A, D, blk, self.config.max_temp_elems).double()
            else:
                r, c = factors_rc[i]
                shared += gram_ops.ghost_gram(A, D, r, c, self.config.max_temp_elems).double()
        K = (self._sum_blocks(partial) if any(b != "sketch" for b in backends) else partial) + shared
        return 0.5 * (K + K.T)


@register_selector("ftw")
def build_ftw(
    *, model: nn.Module, optimizer: Any, config: FTWConfig | None = None, budget: int, seed: int = 0, **_: Any
) -> FilterThenWeight:
    """Registry factory: the trainer passes the unwrapped module, the torch optimizer, the typed
    ``selection.options.ftw`` block (whose budget is ``selection.budget``) and the run seed."""
    config = config if config is not None else FTWConfig(budget=budget)
    if config.budget != budget:
        raise ValueError(f"budget: FTWConfig.budget={config.budget} disagrees with the selection budget {budget}")
    return FilterThenWeight(model, optimizer, config, seed=seed)


build_ftw.config_class = FTWConfig  # type: ignore[attr-defined]
