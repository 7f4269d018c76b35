"""Selection algorithms (engine-agnostic): the Selector interface, FTW and baselines.

``FilterThenWeight``, ``FTWConfig`` and ``Selection`` are importable from here; FTW is loaded lazily
(PEP 562) so that ``import optsel.selection.base`` stays light.
"""

from typing import Any

__all__ = ["FilterThenWeight", "FTWConfig", "Selection"]


def __getattr__(name: str) -> Any:
    if name in ("FilterThenWeight", "FTWConfig"):
        from optsel.selection import ftw

        return getattr(ftw, name)
    if name == "Selection":
        from optsel.selection.base import Selection

        return Selection
    raise AttributeError(f"module 'optsel.selection' has no attribute {name!r}")
