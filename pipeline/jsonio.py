"""Strict JSON for everything optsel writes: NaN and ±Inf become ``null`` (``json.dumps`` would write the
bare tokens ``NaN`` / ``Infinity``, which other JSON readers reject)."""

from __future__ import annotations

import json
import math
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (also numpy / 0-d tensor numbers) replaced by None."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy scalars, 0-d tensors
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        try:
            return strict(item())
        except (TypeError, ValueError):
            return obj
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` (obj) with ``allow_nan=False``."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
