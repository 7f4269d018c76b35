"""Selection algorithms (engine-agnostic): the Selector interface, FTW and baselines.

``FilterThenWeight``, ``FTWConfig`` and ``Selection`` are importable from here; FTW (selection/ftw/) is
loaded lazily (PEP 562) so that ``import optsel.selection.base`` stays light. The lazy import goes by
name, as the selector registry's does (base.py): the shared room does not depend on the FTW room, it
only re-exports it.
"""

import importlib
from typing import Any

from optsel.selection.base import Selection

__all__ = ["FilterThenWeight", "FTWConfig", "Selection"]


def __getattr__(name: str) -> Any:
    if name in ("FilterThenWeight", "FTWConfig"):
        return getattr(importlib.import_module("optsel.selection.ftw"), name)
    if name == "Selection":
        return Selection
    raise AttributeError(f"module 'optsel.selection' has no attribute {name!r}")
