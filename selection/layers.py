"""A covered layer: one linear weight whose per-sample gradients FTW handles in factorised form."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class CoveredLayer:
    """One covered weight, [d_out, d_in] in the layer convention (y = a Wᵀ). ``param``: the tensor the
    optimizer holds (a sharded engine's local part); ``transposed``: stored [d_in, d_out] (Conv1D)."""

    name: str
    module: nn.Module
    param: nn.Parameter
    d_in: int
    d_out: int
    transposed: bool = False
