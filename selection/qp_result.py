"""The result type every QP solver of the weight step returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QPResult:
    """w [m] (>= 0, sums to 1); status: "optimal" (KKT verified), "inaccurate", or the cvxpy status."""

    w: torch.Tensor
    status: str
    iterations: int = 0


__all__ = ["QPResult"]
