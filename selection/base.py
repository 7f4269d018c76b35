"""The Selector seam: one small interface that the trainer calls once per step.

A pool is a dict of tensors for this rank's candidates (``input_ids`` [n, T] int64,
``attention_mask`` [n, T], ``labels`` [n, T] with -100 on ignored positions; optional
``sample_id`` [n] int64 and ``kind`` [n] int64). Under data parallelism the *global* pool is the
rank-major concatenation of the local pools: global index = (sum of earlier ranks' pool sizes) +
local index. A selector returns a :class:`Selection` that is identical on every rank.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from optsel import distributed
from optsel.registry import Registry

#: the one batch type of optsel (selectors, engines, the collate step): see the module docstring
Batch = Mapping[str, torch.Tensor]


@dataclass
class Selection:
    """Result of one selection step (identical on every rank).

    indices: [s] int64 global indices of the chosen samples (s <= budget).
    weights: [s] float64, >= 0, summing to 1; the step's gradient is sum_i weights[i] * g_i.
    local_indices / local_weights: the part of (indices, weights) that lives on this rank,
        indices local to this rank's pool, weights still the global ones.
    alignment [N], utility [N], filtered [m], gram [m, m]: FTW's intermediate quantities
        (None for selectors that do not compute them).
    timings: seconds per phase. diagnostics: counters, solver status, fallbacks (JSON-able).
    pool_pass: FTW's single pass (selection/single_pass.py): what this rank's capture kept, from
        which the engine forms the training gradient without a second pass (None: train as usual).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    local_indices: torch.Tensor
    local_weights: torch.Tensor
    pool_size: int
    alignment: torch.Tensor | None = None
    utility: torch.Tensor | None = None
    filtered: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    covered: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    pool_pass: Any = None


class Selector(abc.ABC):
    """Chooses which candidates (and with which weights) form the step.

    Selectors are ``Stateful``: ``state_dict`` / ``load_state_dict`` restore RNGs, caches and
    counters so that a resumed run selects exactly what an uninterrupted one would.
    """

    #: registry name, e.g. "ftw", "random"
    name: str = "selector"
    #: whether :meth:`select` needs a target (validation) batch
    needs_target: bool = False

    @abc.abstractmethod
    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        """Choose from this rank's local ``pool``; see the module docstring for the layout."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def split_local(
    indices: torch.Tensor, weights: torch.Tensor, pool_sizes: list[int], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of a global selection owned by ``rank`` (rank-major pool layout).

    indices [s] global, weights [s]; returns (local indices [s_r], their global weights [s_r]).
    """
    start = sum(pool_sizes[:rank])
    stop = start + pool_sizes[rank]
    mine = (indices >= start) & (indices < stop)
    return indices[mine] - start, weights[mine]


def uniform_selection(
    indices: torch.Tensor,
    pool_sizes: list[int],
    timings: dict[str, float],
    diagnostics: dict[str, Any] | None = None,
    utility: torch.Tensor | None = None,
) -> Selection:
    """The Selection of ``indices`` (global, any order) with weight 1/s each; indices sorted."""
    indices = indices.to(torch.int64).cpu().sort().values
    weights = torch.full((indices.numel(),), 1.0 / max(indices.numel(), 1), dtype=torch.float64)
    local_idx, local_w = split_local(indices, weights, pool_sizes, distributed.info().rank)
    return Selection(
        indices=indices,
        weights=weights,
        local_indices=local_idx,
        local_weights=local_w,
        pool_size=sum(pool_sizes),
        utility=None if utility is None else utility.detach().cpu(),
        timings=timings,
        diagnostics=diagnostics or {},
    )


def agree(
    indices: torch.Tensor, k: int, comm: distributed.CommCounter | None = None, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank 0's (indices [s <= k], weights [s] or None) on every rank: selections are deterministic, but
    reductions may differ in the last bit across ranks and devices, so rank 0 is authoritative and one
    broadcast (padded to k) makes every rank's selection the same. A no-op on one process."""
    if not distributed.is_distributed():
        return indices, weights
    rows = [indices] if weights is None else [indices, weights]
    packed = torch.zeros(len(rows), k, dtype=torch.float64)
    packed[0] = -1.0  # index padding; weight padding stays 0
    for row, values in zip(packed, rows):
        row[: values.numel()] = values.double()
    packed = distributed.broadcast(packed, 0, comm)
    keep = packed[0] >= 0
    return packed[0, keep].to(torch.int64), (None if weights is None else packed[1, keep])


SelectorFactory = Callable[..., Selector]
#: selectors by name: optsel's own (the modules below) and the ``optsel.selectors`` entry points
SELECTORS: Registry[SelectorFactory] = Registry(
    "selector",
    builtin_modules=("optsel.selection.simple", "optsel.selection.ftw", "optsel.selection.baselines"),
    group="optsel.selectors",
)


def register_selector(name: str) -> Callable[[SelectorFactory], SelectorFactory]:
    """Class decorator: make a selector buildable by name from a run config (a taken name is refused)."""
    return SELECTORS.register(name)


def selector_names() -> list[str]:
    """Every selector's name, built-in and plug-in, sorted."""
    return SELECTORS.names()


def get_selector_factory(name: str) -> SelectorFactory:
    """The factory registered as ``name`` (KeyError listing the known names)."""
    return SELECTORS.get(name)


def _wait_for_device() -> None:
    """Wait for queued CUDA kernels (once CUDA is in use), so that a phase's time is its own work and not
    the kernels an earlier phase queued; nothing on CPU-only runs."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall seconds to ``timings[phase]`` (``Selection.timings``: selectors report phases
    alike). On CUDA the device is synchronised at both ends: kernels run asynchronously, and without it
    a phase's time lands in whichever later phase first waits for a result."""
    _wait_for_device()
    start = time.perf_counter()
    try:
        yield
    finally:
        _wait_for_device()
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
