"""The no-model selectors: ``random`` (k of N, uniform weights) and ``full`` (all N).

Both need no communication beyond the pool sizes: every rank draws from an identically seeded
generator, so the selection is the same everywhere.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from optsel import distributed
from optsel.selection.base import Batch, Selection, Selector, register_selector, split_local


def _uniform_selection(indices: torch.Tensor, pool_sizes: list[int], seconds: float) -> Selection:
    indices = indices.sort().values.to(torch.int64)
    weights = torch.full((indices.numel(),), 1.0 / max(indices.numel(), 1), dtype=torch.float64)
    local_idx, local_w = split_local(indices, weights, pool_sizes, distributed.info().rank)
    return Selection(indices=indices, weights=weights, local_indices=local_idx, local_weights=local_w,
                     pool_size=sum(pool_sizes), timings={"select": seconds})


@register_selector("random")
class RandomSelector(Selector):
    """Uniformly random k of the N global candidates, each with weight 1/k (the standard baseline)."""

    name = "random"

    def __init__(self, *, budget: int, seed: int = 0, **_: Any) -> None:
        if budget < 1:
            raise ValueError(f"budget: must be >= 1, got {budget}")
        self.budget = budget
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        start = time.perf_counter()
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        total = sum(sizes)
        chosen = torch.randperm(total, generator=self.generator)[: min(self.budget, total)]
        return _uniform_selection(chosen, sizes, time.perf_counter() - start)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@register_selector("full")
class FullSelector(Selector):
    """Every candidate with weight 1/N: no selection, N samples of data per step (the reference)."""

    name = "full"

    def __init__(self, **_: Any) -> None:
        pass

    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        start = time.perf_counter()
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        return _uniform_selection(torch.arange(sum(sizes)), sizes, time.perf_counter() - start)
