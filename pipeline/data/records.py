"""Input records for ``optsel prepare``: the file readers (JSONL, Parquet, a ``datasets`` dataset),
each record carrying its origin (file:line) for error messages, and the template that renders a record
into prompt, response and kind.

Input is untrusted: the JSONL reader streams line by line and never reads more than ``max_bytes`` (+1) of
one line into memory (a longer line is skipped unread and flagged ``oversize``), and parses with
:func:`optsel.pipeline.files.jsonio.loads_strict` (no NaN / Infinity, no duplicate keys, no lone surrogates);
:func:`render` refuses non-finite numbers and text that is not valid Unicode, whatever the source.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optsel.pipeline.files.jsonio import StrictJSONError, loads_strict, short

KIND_PATTERN = re.compile(r"^(target|corrupted|distractor/[A-Za-z0-9_.\-]+)$")


@dataclass(kw_only=True)
class TemplateConfig:
    """How a record (a mapping of fields) is read: prompt and response text from ``str.format`` strings
    (format ``fields``), or a chat / prompt-completion record (docs/data.md)."""

    #: fields: prompt/response rendered by the two format strings below; messages: a {"messages": [...]}
    #: chat rendered with the tokenizer's chat template (loss on assistant turns); prompt_completion:
    #: {"prompt": ..., "completion": ...} as strings (plain text) or message lists (chat, loss on the completion)
    format: Literal["fields", "messages", "prompt_completion"] = "fields"
    prompt: str = "{prompt}"  #: str.format string over the record's fields: the prompt text
    response: str = "{response}"  #: str.format string over the record's fields: the response text (the loss is on it)
    kind_field: str | None = None  #: record field holding the kind; None: every record is `target`

    def __post_init__(self) -> None:
        if self.format != "fields" and (self.prompt, self.response) != ("{prompt}", "{response}"):
            raise ValueError(
                f"prompt: the format strings are only used with format 'fields' (format is "
                f"{self.format!r}: the record's own fields are used)"
            )
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

    path: str | None = None  #: a save_to_disk folder, a local data dir/file, or a hub name
    name: str | None = None  #: dataset config name (load_dataset only)
    split: str = "train"  #: the split read as train
    val_split: str | None = None  #: a split of the same dataset used as val (else val_fraction)
    local_files_only: bool = True  #: a path that does not exist is an error unless this is false


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
    import pyarrow as pa  # noqa: PLC0415 - heavy: imported when parquet is read
    import pyarrow.parquet as pq  # noqa: PLC0415 - heavy: imported when parquet is read

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
    import datasets  # noqa: PLC0415 - heavy: imported when a Hugging Face dataset is read

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
                raise BadRecord(
                    f"{record.origin}: missing field {name!r} (template needs it; record has "
                    f"{', '.join(sorted(map(str, values))) or 'no fields'})"
                )
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadRecord(
                    f"{record.origin}: field {name!r} has type {type(value).__name__}, expected a string or number"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRecord(f"{record.origin}: field {name!r} is {value}, expected a finite number")
    kind = _kind_of(record, template)
    try:
        prompt, response = template.prompt.format_map(values), template.response.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError) as err:  # e.g. a format spec that does not fit the value
        raise BadRecord(f"{record.origin}: the template cannot render this record: {err}") from err
    for name, text in (("prompt", prompt), ("response", response)):
        found = _SURROGATE.search(text)
        if found:  # not encodable as UTF-8: the tokenizer and the MDS writer would fail on it
            raise BadRecord(
                f"{record.origin}: invalid Unicode: the rendered {name} holds a lone surrogate "
                f"(\\u{ord(found.group()):04x})"
            )
    return prompt, response, kind


# -- chat records: {"messages": [...]} and {"prompt": ..., "completion": ...} ---------------------------
#: roles a chat message may have (the TRL / datasets-hub conversational format)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Chat:
    """A conversation to render with the tokenizer's chat template: ``messages`` (role/content dicts);
    the loss goes on the assistant turns at index >= ``first_loss_turn`` (0: all of them; for a
    prompt/completion record: the first completion message)."""

    messages: list[dict[str, str]]
    first_loss_turn: int = 0


@dataclass
class Rendered:
    """One record ready to tokenize: plain text (``prompt`` + ``response``) or a ``chat``; its kind."""

    prompt: str
    response: str
    kind: str
    chat: Chat | None = None


def _kind_of(record: Record, template: TemplateConfig) -> str:
    values = record.values or {}
    if template.kind_field is None:
        return "target"
    if template.kind_field not in values:
        raise BadRecord(f"{record.origin}: missing kind field {template.kind_field!r}")
    kind = values[template.kind_field]
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise BadRecord(
            f"{record.origin}: kind field {template.kind_field!r} is {short(kind)}; expected "
            f"'target', 'corrupted' or 'distractor/<name>'"
        )
    return kind


def _messages(origin: str, field_name: str, value: Any) -> list[dict[str, str]]:
    """``value`` checked as a non-empty list of {role, content[, name]} with string contents."""
    if not isinstance(value, list):
        raise BadRecord(
            f"{origin}: field {field_name!r} has type {type(value).__name__}, expected a list of "
            f"messages ({{'role': ..., 'content': ...}})"
        )
    if not value:
        raise BadRecord(f"{origin}: field {field_name!r} is an empty conversation")
    out = []
    for i, message in enumerate(value):
        where = f"{origin}: {field_name}[{i}]"
        if not isinstance(message, dict):
            raise BadRecord(f"{where} has type {type(message).__name__}, expected an object with role and content")
        extra = sorted(set(map(str, message)) - _MESSAGE_KEYS)
        if extra:
            raise BadRecord(
                f"{where} has unsupported key(s) {extra} (a message has role, content and optionally "
                f"name; tool calls and content parts are not supported)"
            )
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord(f"{where} has no {key!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise BadRecord(f"{where}: unknown role {short(role)}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(
                f"{where}: content has type {type(content).__name__}, expected a string (content "
                f"parts / multimodal content are not supported)"
            )
        message = {k: v for k, v in message.items() if not (k == "name" and v is None)}  # datasets fills gaps
        if "name" in message and not isinstance(message["name"], str):
            raise BadRecord(f"{where}: name has type {type(message['name']).__name__}, expected a string")
        for key, text in message.items():
            found = _SURROGATE.search(text)
            if found:
                raise BadRecord(f"{where}: invalid Unicode: {key} holds a lone surrogate (\\u{ord(found.group()):04x})")
        out.append(dict(message))
    return out


def render_record(record: Record, template: TemplateConfig) -> Rendered:
    """One record as text or a chat, per ``template.format``; raises BadRecord naming its origin.

    messages: field ``messages``, a conversation with at least one assistant turn (loss on every
    assistant turn). prompt_completion: fields ``prompt`` and ``completion``, both strings (plain text,
    rendered like format fields) or both message lists (a chat: the completion needs an assistant turn,
    and only the completion's assistant turns get loss)."""
    if template.format == "fields":
        prompt, response, kind = render(record, template)
        return Rendered(prompt, response, kind)
    if record.error is not None:
        raise BadRecord(f"{record.origin}: {record.error}")
    values = record.values
    assert values is not None
    names = ("messages",) if template.format == "messages" else ("prompt", "completion")
    for name in names:
        if name not in values:
            raise BadRecord(
                f"{record.origin}: missing field {name!r} (format {template.format!r} needs it; record "
                f"has {', '.join(sorted(map(str, values))) or 'no fields'})"
            )
    kind = _kind_of(record, template)
    if template.format == "messages":
        chat = Chat(_messages(record.origin, "messages", values["messages"]))
        if not any(m["role"] == "assistant" for m in chat.messages):
            raise BadRecord(f"{record.origin}: the conversation has no assistant turn (nothing to train on)")
        return Rendered("", "", kind, chat)
    prompt, completion = values["prompt"], values["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        for name, text in (("prompt", prompt), ("completion", completion)):
            found = _SURROGATE.search(text)
            if found:
                raise BadRecord(
                    f"{record.origin}: invalid Unicode: {name} holds a lone surrogate (\\u{ord(found.group()):04x})"
                )
        return Rendered(prompt, completion, kind)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise BadRecord(
            f"{record.origin}: prompt and completion must both be strings or both be message lists, "
            f"got {type(prompt).__name__} and {type(completion).__name__}"
        )
    head, tail = _messages(record.origin, "prompt", prompt), _messages(record.origin, "completion", completion)
    if not any(m["role"] == "assistant" for m in tail):
        raise BadRecord(f"{record.origin}: the completion has no assistant turn (nothing to train on)")
    return Rendered("", "", kind, Chat(head + tail, first_loss_turn=len(head)))


def chat_text_bytes(chat: Chat) -> int:
    """UTF-8 bytes of a chat's contents (for the ``max_record_bytes`` cap)."""
    return sum(len(m["content"].encode()) + len(m["role"]) for m in chat.messages)


def has_generation_marks(tok) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(tok.get_chat_template()))


def chat_tokens(tok, chat: Chat, origin: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a chat rendered with ``tok``'s chat template; both [n] ints, mask 1 on
    the tokens the loss goes on. The ids are exactly ``tok.apply_chat_template(chat.messages)``'s.

    The mask: with ``{% generation %}`` marks in the template, ``return_assistant_tokens_mask``; without,
    the prefix rule: assistant turn i covers the text that ``messages[:i+1]`` adds to ``messages[:i]``
    rendered with ``add_generation_prompt=True`` (the turn's content and its end-of-turn text, not the
    assistant header). Each rendering must be a prefix of the next (a BadRecord otherwise). A token
    overlapping a covered span is covered. Only turns at index >= ``first_loss_turn`` count."""
    from jinja2 import TemplateError  # noqa: PLC0415 - optional: chat templates only

    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer: chat records need a fast tokenizer (tokenizer.json; its offsets find the "
            f"assistant tokens), got {type(tok).__name__}"
        )
    msgs = chat.messages

    def text_of(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise BadRecord(f"{origin}: the chat template refuses this conversation: {err}") from err

    text = text_of(msgs, False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans: list[tuple[int, int]] = []
    if has_generation_marks(tok):
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        if list(out["input_ids"]) != ids:
            raise BadRecord(f"{origin}: the chat template renders this conversation differently on two calls")
        start = 0
        if chat.first_loss_turn:
            prompt_text = text_of(msgs[: chat.first_loss_turn], True)
            start = len(prompt_text)
            if not text.startswith(prompt_text):
                raise BadRecord(
                    f"{origin}: the chat template's rendering of the prompt (with the generation prompt) "
                    f"is not a prefix of the whole conversation's; cannot tell the completion apart"
                )
        mask = [int(m and off[0] >= start) for m, off in zip(out["assistant_masks"], offsets)]
        return ids, mask
    for i, message in enumerate(msgs):
        if message["role"] != "assistant" or i < chat.first_loss_turn:
            continue
        before = text_of(msgs[:i], True) if i else ""
        through = text_of(msgs[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRecord(
                f"{origin}: the chat template has no {{% generation %}} marks and its renderings are not "
                f"prefixes of each other at messages[{i}] (turn {i} renders differently once later turns "
                f"follow), so the assistant tokens cannot be found; use a template with "
                f"{{% generation %}} ... {{% endgeneration %}} around assistant content"
            )
        spans.append((len(before), len(through)))
    mask = [int(any(end > a and s < b for a, b in spans)) for s, end in offsets]
    return ids, mask
