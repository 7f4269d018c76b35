"""Input records for ``optsel prepare``: the file readers (JSONL, Parquet, a ``datasets`` dataset),
each record carrying its origin (file:line) for error messages, and the template that renders a record
into prompt, response and kind.

Input is untrusted: the JSONL reader streams line by line and never reads more than ``max_bytes`` (+1) of
one line into memory (a longer line is skipped unread and flagged ``oversize``), and parses with
:func:`optsel.pipeline.jsonio.loads_strict` (no NaN / Infinity, no duplicate keys, no lone surrogates);
:func:`render` refuses non-finite numbers and text that is not valid Unicode, whatever the source.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from optsel.pipeline.jsonio import StrictJSONError, loads_strict, short

KIND_PATTERN = re.compile(r"^(target|corrupted|distractor/[A-Za-z0-9_.\-]+)$")


@dataclass(kw_only=True)
class TemplateConfig:
    """How a record (a mapping of fields) becomes prompt and response text: ``str.format`` strings."""

    prompt: str = "{prompt}"
    response: str = "{response}"
    kind_field: str | None = None  # record field holding the kind; None: every record is `target`

    def __post_init__(self) -> None:
        for name in ("prompt", "response"):
            try:
                fields = template_fields(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{name}: not a valid format string: {err}") from err
            bad = [f for f in fields if not f.isidentifier()]
            if bad:
                raise ValueError(f"{name}: placeholders must be plain field names, got {{{bad[0]}}}")


@dataclass(kw_only=True)
class HFSourceConfig:
    """A ``datasets`` dataset: a ``save_to_disk`` directory, a local data dir/file, or a hub name."""

    path: str | None = None
    name: str | None = None  # dataset config name (load_dataset only)
    split: str = "train"
    val_split: str | None = None  # a split of the same dataset used as val (else val_fraction)
    local_files_only: bool = True  # a path that does not exist is an error unless this is false


def template_fields(fmt: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]


class BadRecord(ValueError):
    """A record that cannot become a sample; the message starts with its origin (file:line)."""


# -- record readers: every record carries its origin (file:line) for error messages --------------------
@dataclass
class Record:
    """One input record: its fields, or why it could not be read; ``origin`` names file and line/row."""

    origin: str
    values: dict[str, Any] | None = None
    error: str | None = None
    blank: bool = False
    oversize: int | None = None  # bytes of a line longer than the reader's max_bytes (skipped unread)


_SKIP_CHUNK = 1 << 16
_SURROGATE = re.compile("[\ud800-\udfff]")


def jsonl_records(path: str, max_bytes: int | None = None) -> Iterator[Record]:
    """Records of a JSONL file, one per line (blank lines flagged, bad lines carry an error).

    Streams: at most ``max_bytes + 1`` bytes of a line are held in memory. A line longer than
    ``max_bytes`` (not counting its newline) is skipped in chunks, unparsed, and yielded as a Record
    with ``oversize`` = its length in bytes."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline() if max_bytes is None else f.readline(max_bytes + 1)
            if not raw:
                break
            lineno += 1
            origin = f"{path}:{lineno}"
            if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while True:  # skip the rest of the line without keeping it
                    chunk = f.readline(_SKIP_CHUNK)
                    if chunk.endswith(b"\n"):
                        size += len(chunk) - 1
                        break
                    size += len(chunk)
                    if not chunk:
                        break
                yield Record(origin, oversize=size)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Record(origin, error=f"not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
                continue
            if not line.strip():
                yield Record(origin, blank=True)
                continue
            try:
                value = loads_strict(line)
            except json.JSONDecodeError as err:
                yield Record(origin, error=f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            except StrictJSONError as err:
                yield Record(origin, error=f"refused JSON: {err}")
                continue
            if not isinstance(value, dict):
                yield Record(origin, error=f"expected a JSON object, got {type(value).__name__}")
                continue
            yield Record(origin, values=value)


def parquet_records(path: str, batch_size: int = 4096) -> Iterator[Record]:
    """Records of a Parquet file (``origin`` = path and row number, 1-based)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file: {err}") from err
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for values in batch.to_pylist():
            row += 1
            yield Record(f"{path} row {row}", values=values)


def hf_records(path: str, name: str | None, split: str, local_files_only: bool) -> Iterator[Record]:
    """Records of a ``datasets`` dataset: ``load_from_disk`` for a saved dataset directory, else
    ``load_dataset(path, name, split=split)`` (local files; a hub name only with network)."""
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"hf dataset {path} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:
        if local_files_only and not p.exists():
            raise FileNotFoundError(f"hf dataset path not found: {path}")
        ds = datasets.load_dataset(path, name, split=split)
    for row, values in enumerate(ds, 1):
        yield Record(f"hf:{path}[{split}] row {row}", values=dict(values))


def render(record: Record, template: TemplateConfig) -> tuple[str, str, str]:
    """(prompt, response, kind) of one record; raises BadRecord naming the record's origin."""
    if record.error is not None:
        raise BadRecord(f"{record.origin}: {record.error}")
    values = record.values
    assert values is not None
    for fmt in (template.prompt, template.response):
        for name in template_fields(fmt):
            if name not in values:
                raise BadRecord(f"{record.origin}: missing field {name!r} (template needs it; record has "
                                f"{', '.join(sorted(map(str, values))) or 'no fields'})")
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadRecord(f"{record.origin}: field {name!r} has type {type(value).__name__}, "
                                f"expected a string or number")
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRecord(f"{record.origin}: field {name!r} is {value}, expected a finite number")
    kind = "target"
    if template.kind_field is not None:
        if template.kind_field not in values:
            raise BadRecord(f"{record.origin}: missing kind field {template.kind_field!r}")
        kind = values[template.kind_field]
        if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
            raise BadRecord(f"{record.origin}: kind field {template.kind_field!r} is {short(kind)}; expected "
                            f"'target', 'corrupted' or 'distractor/<name>'")
    try:
        prompt, response = template.prompt.format_map(values), template.response.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError) as err:  # e.g. a format spec that does not fit the value
        raise BadRecord(f"{record.origin}: the template cannot render this record: {err}") from err
    for name, text in (("prompt", prompt), ("response", response)):
        found = _SURROGATE.search(text)
        if found:  # not encodable as UTF-8: the tokenizer and the MDS writer would fail on it
            raise BadRecord(f"{record.origin}: invalid Unicode: the rendered {name} holds a lone surrogate "
                            f"(\\u{ord(found.group()):04x})")
    return prompt, response, kind
