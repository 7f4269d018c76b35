"""The no-model selectors: ``random`` (k of N, uniform weights), ``full`` (all N) and the
``oracle`` reference (reads the ground-truth kind column; benchmarks only).

Random and full need no communication beyond the pool sizes: every rank draws from an identically
seeded generator, so the selection is the same everywhere. The oracle also all-gathers the pool's
kind ids (N int64).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from optsel import distributed
from optsel.selection.base import Batch, Selection, Selector, register_selector, uniform_selection


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
        return uniform_selection(chosen, sizes, {"select": time.perf_counter() - start})

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
        return uniform_selection(torch.arange(sum(sizes)), sizes, {"select": time.perf_counter() - start})


@register_selector("oracle")
class OracleSelector(Selector):
    """A reference that cannot lose: k clean target samples of the pool (uniformly at random among
    them, weight 1/k each), topped up with random other samples only when the pool holds fewer than k.

    It reads the ground-truth ``kind_id`` column, which real data does not have: it exists to tell
    whether a benchmark can separate selectors at all, and is never a default. A pool without the
    column, or a run whose kind names lack ``target_kind``, is refused.
    """

    name = "oracle"

    def __init__(
        self,
        *,
        budget: int,
        seed: int = 0,
        kind_names: Mapping[int, str] | None = None,
        target_kind: str = "target",
        **_: Any,
    ) -> None:
        if budget < 1:
            raise ValueError(f"budget: must be >= 1, got {budget}")
        names = dict(kind_names or {})
        codes = [code for code, name in names.items() if name == target_kind]
        if not codes:
            raise ValueError(
                f"oracle: the data's kinds {sorted(names.values())} have no {target_kind!r}; the oracle "
                f"needs ground-truth kinds (a stream prepared with a kind column)"
            )
        self.budget = budget
        self.target_code = int(codes[0])
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        start = time.perf_counter()
        if "kind_id" not in pool:
            raise ValueError(
                "oracle: the pool has no kind_id column; the oracle is a reference for streams with "
                "ground-truth kinds only"
            )
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        kinds = (
            distributed.all_gather_cat(pool["kind_id"].to(torch.int64))
            if distributed.is_distributed()
            else pool["kind_id"].to(torch.int64)
        )
        k = min(self.budget, sum(sizes))
        clean = (kinds == self.target_code).nonzero().flatten()
        others = (kinds != self.target_code).nonzero().flatten()
        clean = clean[torch.randperm(clean.numel(), generator=self.generator)]
        others = others[torch.randperm(others.numel(), generator=self.generator)]
        chosen = torch.cat([clean[:k], others[: max(0, k - clean.numel())]])
        return uniform_selection(chosen, sizes, {"select": time.perf_counter() - start})

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
