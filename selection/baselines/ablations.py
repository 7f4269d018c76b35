"""FTW ablations, registered by name; each is FilterThenWeight under a fixed configuration.

- ``ftw_sgd``: geometry "sgd" — P = I and no momentum correction (what the optimizer awareness adds).
- ``ftw_filter_only``: the filter alone — the top k by utility u = b − (τ/2) diag K, weight 1/k
  (what the weighting QP adds). Run as FTW with filter_size = k; its Selection's ``filtered`` (the
  top k by u) then gets uniform weights. The QP that FTW still solves on those k is discarded
  (wasted work, small; its timing is kept under "solve").
- ``ftw_weight_only``: the QP over the whole pool, no top-m filter (what the filter adds): FTW with
  filter_ratio = 1. Deviation: FTW's filter still drops candidates with u ≤ 0 (they only enter when
  fewer than k are positive); a true "no filter" needs an FTWConfig switch (see benchmarks/README.md).

- ``ftw_sketch_exchange``: gram "sketch" with exchange "sketches" — only sketches cross ranks, b is
  sketched too (what the communication-light mode costs in selection quality; it runs the same way
  on one process).

Each takes FTWConfig's options (``selection.options.<name>``), except the field its ablation fixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from optsel import distributed
from optsel.selection.base import Batch, Selection, register_selector, split_local
from optsel.selection.ftw import FilterThenWeight, FTWConfig


@dataclass(kw_only=True)
class FTWSGDConfig(FTWConfig):
    geometry: Literal["adam", "sgd"] = "sgd"  #: fixed to sgd

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.geometry != "sgd":
            raise ValueError(f"geometry: ftw_sgd fixes geometry='sgd', got {self.geometry!r}")


@dataclass(kw_only=True)
class FTWFilterOnlyConfig(FTWConfig):
    def __post_init__(self) -> None:
        if self.filter_size is not None and self.filter_size != self.budget:
            raise ValueError(
                f"filter_size: ftw_filter_only fixes filter_size = budget={self.budget}, got {self.filter_size}"
            )
        self.filter_size = self.budget
        super().__post_init__()


@dataclass(kw_only=True)
class FTWWeightOnlyConfig(FTWConfig):
    filter_ratio: float = 1.0  #: fixed to 1 (no filter)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.filter_size is not None or self.filter_ratio != 1.0:
            raise ValueError(
                f"filter_ratio: ftw_weight_only fixes filter_ratio=1 and no filter_size, got "
                f"filter_ratio={self.filter_ratio}, filter_size={self.filter_size}"
            )


@dataclass(kw_only=True)
class FTWSketchExchangeConfig(FTWConfig):
    gram: Literal["exact", "ghost", "sketch", "auto"] = "sketch"  #: fixed to sketch
    exchange: Literal["factors", "sketches"] = "sketches"  #: fixed to sketches

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gram != "sketch" or self.exchange != "sketches":
            raise ValueError(
                f"exchange: ftw_sketch_exchange fixes gram='sketch', exchange='sketches', got "
                f"gram={self.gram!r}, exchange={self.exchange!r}"
            )


class FTWFilterOnly(FilterThenWeight):
    """FTW's filter with uniform weights on its k survivors (module docstring)."""

    name = "ftw_filter_only"

    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        sel = super().select(pool, target)
        k = min(self.config.budget, sel.pool_size)
        chosen = sel.filtered[:k].to(torch.int64)
        if distributed.is_distributed():
            chosen = distributed.broadcast(chosen, 0, self.comm)
        indices = chosen.sort().values
        weights = torch.full((indices.numel(),), 1.0 / max(indices.numel(), 1), dtype=torch.float64)
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        sel.local_indices, sel.local_weights = split_local(indices, weights, sizes, distributed.info().rank)
        sel.indices, sel.weights = indices, weights
        sel.diagnostics["solver_status"] = "uniform (filter only)"
        return sel


def _build(config_class: type[FTWConfig], selector_class: type[FilterThenWeight], name: str):
    def factory(
        *, model: nn.Module, optimizer: Any, budget: int, seed: int = 0, config: FTWConfig | None = None, **_: Any
    ) -> FilterThenWeight:
        config = config if config is not None else config_class(budget=budget)
        if not isinstance(config, config_class):  # a plain FTWConfig: re-validate under the ablation's rules
            config = config_class(**{**config.__dict__})
        if config.budget != budget:
            raise ValueError(
                f"budget: {name} config.budget={config.budget} disagrees with the selection budget {budget}"
            )
        selector = selector_class(model, optimizer, config, seed=seed)
        selector.name = name
        return selector

    factory.config_class = config_class  # type: ignore[attr-defined]  # registry metadata on the function
    factory.__name__ = f"build_{name}"
    return register_selector(name)(factory)


build_ftw_sgd = _build(FTWSGDConfig, FilterThenWeight, "ftw_sgd")
build_ftw_filter_only = _build(FTWFilterOnlyConfig, FTWFilterOnly, "ftw_filter_only")
build_ftw_weight_only = _build(FTWWeightOnlyConfig, FilterThenWeight, "ftw_weight_only")
build_ftw_sketch_exchange = _build(FTWSketchExchangeConfig, FilterThenWeight, "ftw_sketch_exchange")
