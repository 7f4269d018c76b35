"""Strict YAML → typed dataclass loading, llm-foundry style: unknown keys, missing required values
and wrong types are errors that name the key's full path and what was expected.

Config dataclasses live next to the component they configure; this module only knows how to fill
any (nested) dataclass from a mapping, apply ``key.sub=value`` overrides and dump the result.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config: the message starts with the key's full dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"config key '{path}': {message}" if path else f"config: {message}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {_describe(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        return from_mapping(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(path, f"expected a path, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; every problem raises :class:`ConfigError` with its path.

    A dataclass's ``__post_init__`` may raise ``ValueError("field: message")``: it is re-raised as a
    ConfigError on ``path.field``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(key, f"unknown key; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, f"required key is missing (expected {_describe(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        field_name, _, message = str(err).partition(": ")
        if field_name in fields:
            raise ConfigError(f"{path}.{field_name}" if path else field_name, message) from err
        raise ConfigError(path, str(err)) from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(key.strip(), f"override must look like key.sub=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    transform: Callable[[list[str], Any], Any] | None = None) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the raw mapping (creating sub-mappings) before validation.

    ``transform(keys, value)``, if given, maps each parsed value first (e.g. path resolution)."""
    for text in overrides:
        keys, value = parse_override(text)
        if transform is not None:
            value = transform(keys, value)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: i + 1]), "is not a mapping; cannot set a sub-key")
            node = child
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


# ---- paths ---------------------------------------------------------------------------------------
# A config names its path keys as {dotted key: kind}; "key[]" is a list of paths. Kinds:
#   "path"     a file or folder (relative: see resolve_path)
#   "located"  a local path or a hub/registry name: resolved only if that path exists
# URLs (scheme://...) and the empty string are never touched; ``keep`` values (e.g. "auto") neither.
PathKeys = Mapping[str, str]
_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def expand_vars(value: str, key: str) -> str:
    """``$NAME``/``${NAME}`` from the environment and a leading ``~``. ``$PWD`` is always the current
    directory (set or not by a shell). An unset variable is an error naming ``key``."""
    def sub(match: re.Match) -> str:
        name = match.group("braced") or match.group("plain")
        if name == "PWD":
            return os.getcwd()
        if name not in os.environ:
            raise ConfigError(key, f"{value!r} uses the environment variable ${name}, which is not set")
        return os.environ[name]

    return os.path.expanduser(_VAR.sub(sub, value))


def resolve_path(value: Any, key: str, base: Path, kind: str = "path", keep: tuple[str, ...] = ()) -> Any:
    """One path value: variables expanded, then a relative path joined to ``base`` (the config file's
    folder for values from a file, the current directory for command-line overrides)."""
    if not isinstance(value, str) or not value or value in keep:
        return value
    value = expand_vars(value, key)
    if "://" in value or os.path.isabs(value):
        return value
    resolved = os.path.normpath(os.path.join(base, value))
    if kind == "located" and not os.path.exists(resolved):
        return value  # e.g. a hub name, or a path the command will report as missing
    return resolved


def resolve_paths(data: dict[str, Any], keys: PathKeys, base: Path,
                  keep: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Resolve every path key present in the raw mapping ``data`` (in place) against ``base``."""
    for dotted, kind in keys.items():
        is_list = dotted.endswith("[]")
        parts = dotted.removesuffix("[]").split(".")
        node: Any = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        name, value, skip = dotted.removesuffix("[]"), node[parts[-1]], (keep or {}).get(dotted.removesuffix("[]"), ())
        if is_list and isinstance(value, list):
            node[parts[-1]] = [resolve_path(v, f"{name}[{i}]", base, kind, skip) for i, v in enumerate(value)]
        elif not is_list:
            node[parts[-1]] = resolve_path(value, name, base, kind, skip)
    return data


def load_config_data(path: str | Path, overrides: list[str], keys: PathKeys,
                     keep: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """A config file (a path, or the name of a built-in config such as ``demo``) plus overrides, as a
    raw mapping with its paths resolved: relative paths written in the file against the file's folder,
    relative paths given as ``key=value`` overrides against the current directory."""
    from optsel.resources import find_config

    try:
        file = find_config(path)
    except FileNotFoundError as err:
        raise ConfigError("", str(err)) from None
    data = resolve_paths(load_yaml(file), keys, file.resolve().parent, keep)
    cwd = Path.cwd()

    def transform(parts: list[str], value: Any) -> Any:
        wrapped: dict[str, Any] = {}
        node = wrapped
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        resolve_paths(wrapped, keys, cwd, keep)
        for part in parts[:-1]:
            wrapped = wrapped[part]
        return wrapped[parts[-1]]

    return apply_overrides(data, overrides, transform)


def to_plain(obj: Any) -> Any:
    """Dataclass → plain dict/list/scalars (for dumping the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


_SECRET_KEY = re.compile(r"(?i)(password|passwd|passphrase|pwd|secret|secret_?key|private_?key|api_?key|access_?key"
                         r"|authorization|auth_?header|credentials?|signature|_token|^token|^sig)$")
#: ``scheme://<userinfo>@``: everything up to the last ``@`` before whitespace (a password may hold ``/``)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^@\s]+@")
#: query-string credentials: presigned-URL signatures and tokens
_QUERY_SECRET = re.compile(r"(?i)(?P<name>[?&;](?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token"
                           r"|x-goog-signature|x-goog-credential|token|access_token|api_?key|key|password|pwd"
                           r"|secret)=)[^&#\s]*")


def mask_url(text: str) -> str:
    """``text`` with URL credentials masked: the ``user:password@`` part (a password may contain
    ``/``) and query-string signatures/tokens (``sig=``, ``X-Amz-Signature=``, ``token=`` ...)."""
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("name") + "***", text)


def redact(obj: Any, key: str = "") -> Any:
    """A plain config with secrets masked: values of keys named like passwords/tokens/keys, and the
    credentials in URLs (``user:password@``, query-string signatures; e.g. data.remote), become ``***``."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str):
        if key and _SECRET_KEY.search(key) and obj:
            return "***"
        return mask_url(obj)
    return obj


def dump_yaml(obj: Any, path: str | Path) -> None:
    """The resolved config as YAML, secrets redacted (see :func:`redact`)."""
    Path(path).write_text(yaml.safe_dump(redact(to_plain(obj)), sort_keys=False))
