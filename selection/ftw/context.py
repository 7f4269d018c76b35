"""What one FTW step hands its exchange (``StepContext``) and what the exchange hands back (``StepScores``).

The exchange (selection/ftw/exchanges/) sees the step through the context only: the config, the covered
layers and their geometry, this rank's pool factors, the collectives' counter, and the three selector
services it needs (``SelectorServices``: the target's factors, a layer's Gram backend, this step's
sketch projections). It returns the global alignment b and diag K, the backends and the survivors' Gram
as a callable; the selector filters, solves and books the step (selection/ftw/selector.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from optsel import distributed
from optsel.selection import gram as gram_ops
from optsel.selection.base import Batch
from optsel.selection.capture import Factors
from optsel.selection.ftw_config import FTWConfig
from optsel.selection.layers import CoveredLayer
from optsel.selection.preconditioner import LayerGeometry, OptimizerStateReader
from optsel.selection.timing import phase

#: a sketch layer's (Π_o [k_o, d_out], Π_i [k_i, d_in]); None for other layers
Projection = tuple[torch.Tensor, torch.Tensor]
#: P ≈ r cᵀ of one layer: (r [d_out], c [d_in])
RankOne = tuple[torch.Tensor, torch.Tensor]


class Coefficients(NamedTuple):
    """The step's momentum coefficient ρ, curvature τ and the optimizer's step count."""

    rho: float
    tau: float
    opt_step: int


def require_target(target: Batch | None) -> Batch:
    """``target``, or the error FTW raises when a step needs the target and none was given."""
    if target is None:
        raise ValueError("target: FilterThenWeight needs a target batch (input_ids, attention_mask, labels)")
    return target


class SelectorServices(Protocol):
    """What an exchange asks of the selector (FilterThenWeight implements it)."""

    def target_factors(self, target: Batch, whole: bool = False) -> Factors:
        """The target's factors (from the joint capture when it ran; ``whole``: every rank's rows)."""
        ...

    def backend(self, layer: CoveredLayer, T: int, n: int, m: int) -> str:
        """The layer's Gram backend for T tokens, N = ``n`` candidates and ``m`` survivors."""
        ...

    def projections(self, backends: list[str], dtype: torch.dtype) -> list[Projection | None]:
        """This step's sketch projections per layer (None where the backend is not ``sketch``)."""
        ...


@dataclass
class StepContext:
    """One exact FTW step as its exchange sees it. ``local``: this rank's pool factors (A [n, T, d_in],
    Δ [n, T, d_out] per covered layer); ``geoms``: P and m̂ on this rank's blocks per layer; ``sizes``:
    pool rows per rank; ``timings``: seconds per phase (filled in place); ``dtype``/``device``: the
    step's compute dtype and the covered parameters' device."""

    config: FTWConfig
    layers: list[CoveredLayer]
    reader: OptimizerStateReader
    comm: distributed.CommCounter
    services: SelectorServices
    step: int
    target: Batch | None
    local: Factors
    geoms: list[LayerGeometry]
    coefficients: Coefficients
    sizes: list[int]
    timings: dict[str, float]
    dtype: torch.dtype
    device: torch.device

    @property
    def n_global(self) -> int:
        return sum(self.sizes)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """:func:`optsel.selection.timing.phase` on this step's timings and counter."""
        return phase(self.timings, self.comm, name)

    def sum_blocks(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of per-block partial results over ranks (only when the optimizer state is sharded)."""
        return partial if self.reader.replicated else distributed.all_reduce_sum(partial, self.comm)

    def rank_one(self, i: int) -> RankOne:
        """Layer ``i``'s rank-one fit P ≈ r cᵀ (one all-reduce when the state is sharded)."""
        return gram_ops.layer_rank_one_factors(
            self.geoms[i], self.layers[i], self.dtype, self.device, not self.reader.replicated, self.comm
        )

    def refresh_target(self, due: bool, refresh: Callable[[Batch], None]) -> bool:
        """The ``target`` phase: when ``due``, ``refresh(target)`` (the target must be given); whether it ran."""
        with self.phase("target"):
            if not due:
                return False
            refresh(require_target(self.target))
            return True


@dataclass
class StepScores:
    """An exchange's result, the same on every rank: b [N] and diag K [N] (float64), each layer's Gram
    backend, ``gram_of(filtered)`` → K [m, m] on the survivors (global indices, in that order), whether
    the target was refreshed, tokens [N] per candidate, T, and the exchange's own diagnostics."""

    alignment: torch.Tensor
    diag: torch.Tensor
    backends: list[str]
    gram_of: Callable[[torch.Tensor], torch.Tensor]
    refreshed: bool
    tokens: torch.Tensor
    seq_len: int
    diagnostics: dict[str, object] = field(default_factory=dict)


__all__ = [
    "Coefficients",
    "Projection",
    "RankOne",
    "SelectorServices",
    "StepContext",
    "StepScores",
    "require_target",
]
