"""Plumbing shared by the baseline selectors: top-k of scores and option checks; the one ``agree``,
``uniform_selection`` (selection/base.py) and ``compute_dtype`` (selection/capture.py) re-exported.
No selection math lives here."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from optsel import distributed
from optsel.selection.base import Batch, Selector, agree, timed, uniform_selection  # noqa: F401  (re-exported)
from optsel.selection.capture import Factors, capture_factors, compute_dtype, find_covered_layers, gather_factors  # noqa: F401
from optsel.selection.model_view import model_view_for
from optsel.selection.solvers import uniform_topk


class CaptureOptions(Protocol):
    """What :class:`CoveredLayerSelector` reads from a baseline's options."""

    @property
    def capture_chunk_size(self) -> int | None: ...


#: a baseline's own options dataclass (GreatsConfig, LessConfig, ...)
ConfigT = TypeVar("ConfigT", bound=CaptureOptions)


class CoveredLayerSelector(Selector, Generic[ConfigT]):
    """A baseline that captures per-sample gradients of the covered layers: it keeps the model, the
    optimizer, its typed config, the engine's model view, the coverage, a CommCounter and a step count."""

    def __init__(self, model: nn.Module, optimizer: Any, config: ConfigT):
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.view = model_view_for(model, optimizer)
        self.coverage = find_covered_layers(model, self.view)
        self.comm = distributed.CommCounter()
        self.step = 0

    def capture_pool(self, pool: Batch, timings: dict[str, float]) -> tuple[list[int], Factors]:
        """Start a step: reset the byte counter, gather the ranks' pool sizes, capture this rank's
        pool's factors (timed as 'capture'). Returns (pool sizes, local factors)."""
        self.comm.reset()
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        with timed(timings, "capture"):
            local = capture_factors(self.model, pool, self.coverage.layers, self.config.capture_chunk_size)
        return sizes, local


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest global scores [N] (ties by lower index, non-finite last)."""
    return uniform_topk(scores.double().cpu(), min(k, scores.numel())).support


def check_budget(budget: int) -> int:
    if budget < 1:
        raise ValueError(f"budget: must be >= 1, got {budget}")
    return int(budget)


def check_chunk_size(name: str, value: int | None) -> None:
    """A samples-per-pass option: None (whole pool) or >= 1; the error names ``name``."""
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be >= 1 or null, got {value}")
