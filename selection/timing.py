"""Phase timing with its bytes: ``phase`` is ``timed`` plus the collectives' traffic of the block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from optsel import distributed
from optsel.selection.base import timed


@contextlib.contextmanager
def phase(timings: dict[str, float], comm: distributed.CommCounter, name: str) -> Iterator[None]:
    """``timed`` (seconds into ``timings[name]``) plus the bytes the block hands to collectives, under
    ``comm.by_phase[name]``."""
    before = comm.phase
    comm.phase = name
    try:
        with timed(timings, name):
            yield
    finally:
        comm.phase = before


__all__ = ["phase"]
