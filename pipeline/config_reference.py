"""The config reference: every key of the run config and the prepare config, read from their typed
dataclasses (``optsel configs keys [run|prepare] [--markdown]``; docs/configuration.md is its output).

Where a key's meaning comes from — the one convention for config fields: a ``#:`` doc comment (the
form Sphinx autodoc reads), either at the end of the field's line or on the comment line(s) directly
above it::
    num_steps: int  #: optimizer steps to run
    #: a meaning too long for the field's line
    collective_timeout_s: float = 600.0

A plain ``#`` comment is a note, not the meaning. A subclass that redeclares a field without a ``#:``
keeps its parent's. Types and allowed values come from the annotations (``Literal`` lists them, read
as the loader reads them: ``config_loader.literal_values``) and from ``_choices`` (value lists a config
checks in ``__post_init__``); defaults from the dataclass.
tests/unit/test_config_reference.py checks that every field has a meaning and the file is current.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from optsel import resources
from optsel.config_loader import literal_values, to_plain
from optsel.pipeline.data import config as data_config
from optsel.pipeline.data.prepare import PrepareConfig
from optsel.pipeline.train.run_config import PREPARE_PATH_KEYS, RUN_PATH_KEYS, RunConfig, SelectionConfig
from optsel.selection.base import get_selector_factory, selector_names

REGENERATE = ".venv/bin/optsel configs keys --markdown > docs/configuration.md"


@dataclass(frozen=True)
class KeyDoc:
    """One key: its full dotted path, type, default (shown and raw), allowed values and meaning."""

    key: str
    type: str
    default: str  # as shown ("required" for a key without a default)
    allowed: str
    meaning: str
    value: Any = dataclasses.MISSING  # the dataclass's default, plain (dataclasses.MISSING: required)


# ---- meanings from the source --------------------------------------------------------------------


@functools.cache
def _own_meanings(cls: type) -> dict[str, str]:
    """The ``#:`` meaning of each field declared in ``cls``'s own body (not its bases')."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    comments: dict[int, tuple[str, bool]] = {}  # line → (text after "#:", whether the line holds only it)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if tok.string.startswith("#:"):
                comments[tok.start[0]] = (tok.string[2:].strip(), tok.line[: tok.start[1]].strip() == "")
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    out = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts: list[str] = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:  # "#:" lines directly above
            parts.insert(0, comments[line][0])
            line -= 1
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):  # "#:" at the end of the field's line(s)
            if line in comments and not comments[line][1]:
                parts.append(comments[line][0])
        if parts:
            out[node.target.id] = " ".join(p for p in parts if p)
    return out


def field_meanings(cls: type) -> dict[str, str]:
    """Each field's meaning (its ``#:`` comment; a redeclared field without one keeps the base's)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_meanings(klass))
    return out


# ---- types, allowed values, defaults ---------------------------------------------------------------


def _choices() -> dict[tuple[type, str], tuple[Any, ...]]:
    """Allowed values the loader checks in ``__post_init__`` rather than with a ``Literal``."""

    return {
        (data_config.DataConfig, "shuffle_algo"): data_config.SHUFFLE_ALGOS,
        (data_config.DataConfig, "validate_hash"): (*data_config.HASHES, None),
        (SelectionConfig, "method"): tuple(selector_names()),
    }


def _block(tp: Any) -> type | None:
    """The dataclass of a nested block (``X`` or ``X | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        blocks = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return blocks[0] if len(blocks) == 1 else None
    return None


def type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``list of str``, ``mapping``, ``str`` (a Literal: see allowed)."""
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(dict.fromkeys("null" if a is None else type(a).__name__ for a in get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and len(set(args)) == 1 and Ellipsis not in get_args(tp):
            return f"list of {len(args)} {type_name(args[0])}"
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def allowed_values(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` (or ``Literal | None``) annotation admits; () if it is not one (the
    loader's own reading of the type, the one place allowed values come from)."""

    return literal_values(tp)


def plain_default(f: dataclasses.Field) -> Any:
    """The field's default as plain YAML data (tuples as lists); MISSING for a required field."""

    if f.default is not dataclasses.MISSING:
        return to_plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_plain(f.default_factory())
    return dataclasses.MISSING


def show_value(value: Any) -> str:
    """A default as one line of YAML (``null``, ``''``, ``[q_proj, k_proj]``); a bundled file's path
    as ``<bundled>/NAME`` (the path differs between installs)."""
    if value is dataclasses.MISSING:
        return "required"
    bundled = bundled_name(value)
    if bundled is not None:
        return f"<bundled>/{bundled}"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def bundled_name(value: Any) -> str | None:
    """The name of a bundled file (``optsel configs list``) whose path ``value`` is, else None."""
    if not isinstance(value, str) or not value.startswith("/"):
        return None

    root = resources.configs_dir().resolve()
    try:
        return Path(value).resolve().relative_to(root).as_posix()
    except ValueError:
        return None


# ---- the key tree -----------------------------------------------------------------------------------


def keys(cls: type, prefix: str = "", path_keys: typing.Mapping[str, str] | None = None) -> list[KeyDoc]:
    """Every key of dataclass ``cls`` (nested blocks expanded) under ``prefix``, in declaration order."""
    hints = get_type_hints(cls)
    meanings = field_meanings(cls)
    choices = _choices()
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        block = _block(tp)
        value = plain_default(f)
        if block is not None and dataclasses.is_dataclass(tp) and value is not dataclasses.MISSING:
            value = {}  # the block with every key at its default (listed below)
        tname = "path" if (path_keys or {}).get(key) or (path_keys or {}).get(f"{key}[]") else type_name(tp)
        if tname == "path" and get_origin(tp) in (list, tuple):
            tname = "list of path"
        if tname == "path" and (tp is not str and type(None) in get_args(tp)):
            tname = "path or null"
        allowed = choices.get((cls, f.name)) or allowed_values(tp)
        out.append(
            KeyDoc(
                key=key,
                type=tname,
                default=show_value(value),
                allowed=", ".join(show_value(a) for a in allowed),
                meaning=meanings.get(f.name, ""),
                value=value,
            )
        )
        if block is not None:
            out.extend(keys(block, f"{key}.", path_keys))
    return out


def _selector_options(prefix: str) -> list[KeyDoc]:
    """``selection.options.<method>.*`` for every registered selector that takes options (budget is
    set once, as selection.budget). A config that subclasses another method's lists only the keys it
    redeclares."""

    out: list[KeyDoc] = []
    listed: dict[type, str] = {}
    for method in selector_names():
        config_class = getattr(get_selector_factory(method), "config_class", None)
        if config_class is None:
            continue
        parent = next((listed[b] for b in config_class.__mro__[1:] if b in listed), None)
        block = f"{prefix}{method}"
        meaning = f"options of the {method!r} selector"
        if parent is not None:
            meaning += f"; every other key as {prefix}{parent}"
        out.append(KeyDoc(key=block, type="mapping", default="{}", allowed="", meaning=meaning, value={}))
        own = set(config_class.__dict__.get("__annotations__", {})) if parent is not None else None
        out.extend(
            d
            for d in keys(config_class, f"{block}.")
            if d.key != f"{block}.budget" and (own is None or d.key.rsplit(".", 1)[1] in own)
        )
        listed.setdefault(config_class, method)
    return out


def run_keys() -> list[KeyDoc]:
    """Every key of the run config (``optsel train CONFIG``), selector options included."""

    out = []
    for doc in keys(RunConfig, "", RUN_PATH_KEYS):
        out.append(doc)
        if doc.key == "selection.options":
            out.extend(_selector_options("selection.options."))
    return out


def prepare_keys() -> list[KeyDoc]:
    """Every key of the prepare config (``optsel prepare CONFIG``)."""

    return keys(PrepareConfig, "", PREPARE_PATH_KEYS)


# ---- output -----------------------------------------------------------------------------------------


def render_text(docs: list[KeyDoc]) -> str:
    """One key a line: ``key  type  default  [allowed]  meaning``."""
    width = max(len(d.key) for d in docs)
    lines = []
    for d in docs:
        allowed = f"  [{d.allowed}]" if d.allowed else ""
        lines.append(f"{d.key:<{width}}  {d.type}  = {d.default}{allowed}  # {d.meaning}")
    return "\n".join(lines) + "\n"


def _cell(text: str, code: bool = False) -> str:
    """Table-cell text: ``|`` escaped; outside code spans also ``<``, ``>`` and ``*`` (HTML, emphasis)."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if code else text.replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def render_table(docs: list[KeyDoc]) -> str:
    """Markdown tables of ``docs``: the top-level keys first, then one section per top-level block."""
    heads = {d.key.split(".", 1)[0] for d in docs if "." in d.key}
    groups: dict[str, list[KeyDoc]] = {"": []}
    for d in docs:
        groups.setdefault(d.key.split(".", 1)[0] if d.key.split(".", 1)[0] in heads else "", []).append(d)
    rows = []
    for name, group in groups.items():
        if not group:
            continue
        if name:
            rows += ["", f"### `{name}`", ""]
        rows += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for d in group:
            allowed = ", ".join(f"`{_cell(a, True)}`" for a in d.allowed.split(", ")) if d.allowed else ""
            rows.append(
                f"| `{d.key}` | {_cell(d.type)} | `{_cell(d.default, True)}` | {allowed} | {_cell(d.meaning)} |"
            )
    return "\n".join(rows).strip("\n") + "\n"


INTRO = """\
# Configuration reference

Generated from the typed config dataclasses by `optsel configs keys --markdown` (the generator:
pipeline/config_reference.py); do not edit by hand — regenerate with

    {regenerate}

`optsel configs keys run` / `optsel configs keys prepare` print the same as plain text. Every key is
written in YAML (nested blocks) or as a `key.sub=value` override on the command line. Unknown keys,
missing required keys and wrong types are errors that name the key. Paths (type `path`) written in a
config file resolve against that file's folder, paths given as overrides against the current
directory; `$VAR` / `${{VAR}}` expand (`$PWD`: the current directory). A default `<bundled>/NAME` is a
file shipped with optsel (`optsel configs path NAME`). A key under a block that defaults to `null`
(`model.lora`) shows the default it takes once the block is given.

## What users asked for, in one place

- **A local model:** `model.source: local` and `model.path: /path/to/folder`, a Hugging Face model folder
  (`config.json` + weights, as written by `save_pretrained`). It is loaded with `local_files_only` and
  without running code from the folder (a config with `auto_map` is refused); the size keys
  (`model.hidden_size`, ...) are then ignored. `model.source: config` (the default) builds a fresh
  `model.arch` model from the size keys, seeded by `model.init_seed`.
- **LoRA:** give a `model.lora` block (`model.lora: {{}}` for the defaults, or set `model.lora.r`,
  `model.lora.alpha`, `model.lora.dropout`, `model.lora.target_modules`); only the adapters train.
  Without the block (`null`, the default) the whole model trains.
- **Your own tokenizer:** prepare with `tokenizer.kind: pretrained` and `tokenizer.path:` a local
  tokenizer folder (as written by `PreTrainedTokenizerFast.save_pretrained`); it is saved into the
  prepared data, and training reads it from there (the run config has no tokenizer key). A hub name is
  refused unless `tokenizer.local_files_only: false`.
- **Data:** what record kinds are, how the val split feeds the target (`selection.num_target_samples`)
  and evaluation (`training.num_eval_samples`), and how `selections.jsonl`'s `sample_id` maps back to an
  input line: see [docs/data.md](data.md).

## Run config (`optsel train CONFIG`, `optsel launch ... CONFIG`)

`selection.options.<method>` holds the options of each selector; only the block of `selection.method`
is used, every block is validated (`budget` is set once, as `selection.budget`).

{run}
## Prepare config (`optsel prepare CONFIG`)

{prepare}"""


def reference_markdown() -> str:
    """docs/configuration.md."""
    return INTRO.format(regenerate=REGENERATE, run=render_table(run_keys()), prepare=render_table(prepare_keys()))
