"""The exchange interface: how one FTW step's alignment, diag K and survivors' Gram cross ranks."""

from __future__ import annotations

from typing import Protocol

from optsel.selection.ftw.context import StepContext, StepScores


class Exchange(Protocol):
    """One ``exchange`` choice (FTWConfig.exchange): ``select`` runs the step's target refresh, alignment
    and diag K over ``ctx`` and returns them with the survivors' Gram (the same on every rank)."""

    name: str

    def select(self, ctx: StepContext) -> StepScores: ...


__all__ = ["Exchange"]
