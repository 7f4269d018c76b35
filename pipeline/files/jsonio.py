"""Strict JSON for everything optsel writes: NaN and ±Inf become ``null`` (``json.dumps`` would write the
bare tokens ``NaN`` / ``Infinity``, which other JSON readers reject), and :func:`loads_strict` for untrusted
input: it refuses what ``json.loads`` lets through (``NaN`` / ``Infinity``, numbers that overflow a float,
duplicate keys, lone surrogates) with a :class:`StrictJSONError` that names the problem."""

from __future__ import annotations

import json
import math
import re
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


class StrictJSONError(ValueError):
    """Text that is JSON to Python's lenient parser but not strict JSON (the message says what)."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (for messages about untrusted values)."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit]) + "..."
    return text if len(text) <= limit + 10 else text[: limit + 10] + "..."


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not valid JSON (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:32]}{'...' if len(text) > 32 else ''} overflows a float")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJSONError(f"duplicate key {short(key)}")
        obj[key] = value
    return obj


def lone_surrogate(value: Any) -> str | None:
    """Where ``value`` (decoded JSON) holds a lone surrogate (a ``\\udXXX`` escape that is not half of a
    pair, not encodable as UTF-8): e.g. ``"field 'prompt' (\\ud800)"``; None when every string is valid."""
    stack: list[tuple[str, Any]] = [("the value", value)]
    while stack:  # iterative: decoded JSON may nest deeply
        where, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return f"{where} (\\u{ord(found.group()):04x})"
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str) and (found_in_key := _SURROGATE.search(key)):
                    return f"a key (\\u{ord(found_in_key.group()):04x})"
                stack.append((f"field {short(key)}" if item is value else where, sub))
        elif isinstance(item, list):
            stack.extend((where, sub) for sub in item)
    return None


def loads_strict(text: str) -> Any:
    """``json.loads`` that raises :class:`StrictJSONError` on ``NaN`` / ``Infinity`` / ``-Infinity``, a number
    that overflows a float (``1e400``), a duplicate key in any object, a lone surrogate in any string or key,
    an integer over Python's digit limit and nesting too deep to parse; ``json.JSONDecodeError`` (also a
    ValueError) on text that is not JSON at all."""
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_pairs
        )
    except (json.JSONDecodeError, StrictJSONError):
        raise
    except RecursionError as err:
        raise StrictJSONError("nested too deeply") from err
    except ValueError as err:  # int(...) over sys.get_int_max_str_digits()
        raise StrictJSONError(f"bad number: {err}") from err
    if "\\u" in text or _SURROGATE.search(text):  # from a \uXXXX escape, or already in the text
        where = lone_surrogate(value)
        if where is not None:
            raise StrictJSONError(f"invalid Unicode: lone surrogate in {where}")
    return value


def read_object(
    path: Path, error: type[Exception], missing: str, corrupt: str, missing_error: type[Exception] | None = None
) -> dict[str, Any]:
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
