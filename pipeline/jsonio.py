"""Strict JSON for everything optsel writes: NaN and ±Inf become ``null`` (``json.dumps`` would write the
bare tokens ``NaN`` / ``Infinity``, which other JSON readers reject)."""

from __future__ import annotations

import json
import math
from pathlib import Path
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


def read_object(path: Path, error: type[Exception], missing: str, corrupt: str,
                missing_error: type[Exception] | None = None) -> dict[str, Any]:
    """The JSON object stored in ``path``. ``missing_error`` (default ``error``; message ``missing``) when
    the file is absent, ``error`` (message ``corrupt`` plus the reason) when it is not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise (missing_error or error)(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{corrupt}: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{corrupt}: it must hold a JSON object, not {type(data).__name__}")
    return data


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` (obj) with ``allow_nan=False``."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
