"""Strict YAML → typed dataclass loading, llm-foundry style: unknown keys, missing required values
and wrong types are errors that name the key's full path and what was expected.

Config dataclasses live next to the component they configure; this module only knows how to fill
any (nested) dataclass from a mapping, apply ``key.sub=value`` overrides and dump the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

import yaml

from optsel.resources import find_config

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config: the message starts with the key's full dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        message = mask_secrets(message)  # values quoted in a message may hold credentials (e.g. data.remote)
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _accepts_null(tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any or tp is type(None):
        return True
    if origin is Literal:
        return None in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_null(a) for a in get_args(tp))
    return False


#: why a value is null when the user did not write ``null`` (``output_dir: ~``, ``output_dir=~``, ``output_dir=``)
NULL_HINT = (
    "the value is null: in YAML (in the config file and in key.sub=value overrides alike) ~, null and "
    "an empty value mean null, not the home folder or an empty string; give an explicit value, or quote "
    "it for a string (e.g. output_dir='~/runs' or an absolute path; a path starting with ~/ is expanded "
    "to the home folder)"
)


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if value is None and not _accepts_null(tp):
        raise ConfigError(path, f"expected {_describe(tp)}, got null; {NULL_HINT}")
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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


def literal_values(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` (or ``Literal | None``) annotation admits, None included where it is
    admitted; () if ``tp`` is no Literal."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType) and any(get_origin(a) is Literal for a in get_args(tp)):
        return tuple(v for a in get_args(tp) for v in (literal_values(a) or ((None,) if a is type(None) else ())))
    return ()


def check_literal_fields(obj: Any, cls: type | None = None) -> None:
    """Raise ``ValueError("field: must be one of (...), got v")`` for the first field of dataclass
    ``obj`` whose value is not among its ``Literal`` annotation's values (the annotations of ``cls``,
    default ``type(obj)``): the check for a config built in Python rather than by :func:`from_mapping`."""
    cls = cls or type(obj)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        allowed = literal_values(hints[f.name])
        if allowed and getattr(obj, f.name) not in allowed:
            raise ValueError(f"{f.name}: must be one of {allowed}, got {getattr(obj, f.name)!r}")


def from_mapping(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; every problem raises :class:`ConfigError` with its path.

    A dataclass's ``__post_init__`` may raise ``ValueError("field: message")``: it is re-raised as a
    ConfigError on ``path.field``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
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


class YAMLAliasError(yaml.MarkedYAMLError):
    """An anchor (``&name``) or alias (``*name``) in a config: refused (see :class:`StrictLoader`)."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (``&a``, ``*a``, ``<<: *a``).

    A config never needs them, and aliases are how a 1 KB file expands into gigabytes ("billion
    laughs": 5 levels of 10 aliases each took 48 s and wrote a 2 MB config.yaml). The check runs on
    the parser's events, before any node is built, so such a file is refused at its first anchor, at
    once, naming the line."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            what = f"alias *{anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{anchor}"
            raise YAMLAliasError(
                problem=f"YAML {what}: anchors and aliases are not allowed in optsel configs "
                f"(write the value out in full)",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)


def strict_yaml_load(text: str) -> Any:
    """``text`` parsed like ``yaml.safe_load`` but without anchors/aliases (:class:`StrictLoader`)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(key.strip(), f"override must look like key.sub=value, got {text!r}")
    try:
        value = strict_yaml_load(raw) if raw.strip() else None
    except YAMLAliasError as err:
        raise ConfigError(key.strip(), f"{err.problem} (in the override {key.strip()}=...)") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            key.strip(),
            f"the override's value is not valid YAML ({str(err).splitlines()[0]}); quote it, e.g. {key.strip()}='...'",
        ) from None
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], transform: Callable[[list[str], Any], Any] | None = None
) -> dict[str, Any]:
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
        data = strict_yaml_load(path.read_text()) or {}
    except YAMLAliasError as err:
        mark = err.problem_mark
        raise ConfigError("", f"{path}, line {mark.line + 1}, column {mark.column + 1}: {err.problem}") from None
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


def resolve_paths(
    data: dict[str, Any], keys: PathKeys, base: Path, keep: Mapping[str, tuple[str, ...]] | None = None
) -> dict[str, Any]:
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


def load_config_data(
    path: str | Path, overrides: list[str], keys: PathKeys, keep: Mapping[str, tuple[str, ...]] | None = None
) -> dict[str, Any]:
    """A config file (a path, or the name of a built-in config such as ``demo``) plus overrides, as a
    raw mapping with its paths resolved: relative paths written in the file against the file's folder,
    relative paths given as ``key=value`` overrides against the current directory."""

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


# ---- secrets ------------------------------------------------------------------------------------
# ONE rule decides what is a secret, for mapping keys (config.yaml, checkpoint meta.json) and for URL
# query/fragment parameter names alike (data.remote in config.yaml, log lines, error messages, metric
# labels). A name is normalised first: camelCase split (apiKey → api_key), lower case, "-", ".", spaces
# → "_". It is a secret when
#   - it equals one of SECRET_NAMES or ends with "_" + one of them (hf_token, wandb_api_key,
#     aws_secret_access_key, x_amz_signature, basic_auth, x_api_key), or
#   - it equals one of SECRET_NAMES_EXACT (words that are ordinary as the end of a longer name:
#     single_pass, target_pass, sort_key, exit_code),
# unless it is one of NOT_SECRET (names that end like a secret but hold none: tokenizer special tokens).
# Whole "_"-separated words only: author, tokenizer, max_tokens, num_target_tokens, passes, keys,
# capture_chunk_tokens are not secrets.
SECRET_NAMES: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "passcode",
    "pin_code",
    "secret",
    "client_secret",
    "secret_key",
    "secretkey",
    "private_key",
    "privatekey",
    "api_key",
    "apikey",
    "access_key",
    "accesskey",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth_token",
    "session_token",
    "security_token",
    "bearer",
    "auth",
    "authorization",
    "auth_header",
    "authheader",
    "authorization_header",
    "jwt",
    "credential",
    "credentials",
    "sig",
    "signature",
    "cookie",
    "session_id",
    "otp",
)
SECRET_NAMES_EXACT: tuple[str, ...] = ("key", "code", "pass", "session")
NOT_SECRET: tuple[str, ...] = (
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "max_token",
    "min_token",
    "num_token",
)
MASK = "***"

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[-.\s]+")


def normalise_name(name: str) -> str:
    """``X-Amz-Signature`` → ``x_amz_signature``, ``clientSecret`` → ``client_secret``, ``api-key`` →
    ``api_key``."""
    return _SEPARATORS.sub("_", _CAMEL.sub("_", str(name))).lower().strip("_")


def is_secret_name(name: str) -> bool:
    """Whether a mapping key or URL parameter named ``name`` holds a secret (the rule above)."""
    norm = normalise_name(name)
    if not norm or norm in NOT_SECRET:
        return False
    if norm in SECRET_NAMES_EXACT or norm in SECRET_NAMES:
        return True
    return any(norm.endswith("_" + word) for word in SECRET_NAMES)


#: ``scheme://<userinfo>@``: everything up to the last ``@`` before whitespace (a password may hold ``/``)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^@\s]+@")
#: a URL query or fragment parameter ``?name=value`` / ``&name=`` / ``;name=`` / ``#name=``
_URL_PARAM = re.compile(r"(?P<lead>[?&;#])(?P<name>[^=&;#?\s/]+)=(?P<value>[^&;#\s'\"]*)")
#: ``name=value`` in free text (an override echoed in a message: ``engine.extra.api-key=...``)
_TEXT_PARAM = re.compile(r"(?P<lead>^|[\s'\"(\[{,])(?P<name>[A-Za-z_][\w.\-]*)=(?P<value>[^\s&;#'\",)\]}]*)")


def _mask_param(match: re.Match) -> str:
    name = match.group("name").rsplit(".", 1)[-1]
    if match.group("value") and is_secret_name(name):
        return f"{match.group('lead')}{match.group('name')}={MASK}"
    return match.group(0)


def mask_secrets(text: str) -> str:
    """``text`` (a URL, a log line, an error message, a label value) with its credentials masked:
    a URL's ``user:password@`` part (a password may contain ``/``), and the value of every URL
    query/fragment parameter and every ``name=value`` whose name is a secret by :func:`is_secret_name`
    (``?sig=``, ``X-Amz-Signature=``, ``?client_secret=``, ``#access_token=``, ``api-key=``...)."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    text = _URL_PARAM.sub(_mask_param, text)
    return _TEXT_PARAM.sub(_mask_param, text)


mask_url = mask_secrets  # the earlier name (callers that mask one URL)


def _mask_all(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _mask_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mask_all(v) for v in obj]
    if obj is None or isinstance(obj, bool) or obj == "":
        return obj  # nothing to hide (use_auth_token: true)
    return MASK


def redact(obj: Any, key: str = "") -> Any:
    """A plain config with secrets masked: the value of every key that is a secret by
    :func:`is_secret_name` (all of it: a nested mapping or list too; booleans and nulls stay), and
    credentials inside any other string (:func:`mask_secrets`; e.g. data.remote), become ``***``."""
    if key and is_secret_name(key):
        return _mask_all(obj)
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_secrets(obj)
    return obj


class MaskingFormatter(logging.Formatter):
    """Wraps a log formatter: every line it makes (message, arguments, traceback) goes through
    :func:`mask_secrets`."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(self.inner.format(record))


def mask_log_handlers(logger: logging.Logger | None = None) -> None:
    """Make every handler of ``logger`` (default: the root logger) mask secrets, keeping its format."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, MaskingFormatter):
            handler.setFormatter(MaskingFormatter(handler.formatter))


def dump_yaml(obj: Any, path: str | Path) -> None:
    """The resolved config as YAML, secrets redacted (see :func:`redact`)."""
    Path(path).write_text(yaml.safe_dump(redact(to_plain(obj)), sort_keys=False))
