"""``optsel prepare``: turn the synthetic stream or local files into MDS shards for training.

Output layout under ``out_dir`` (see docs/architecture.md): ``train/`` and ``val/`` MDS datasets with
the columns of :data:`COLUMNS` (chat data: :data:`CHAT_COLUMNS`, with a per-token ``loss_mask``),
``tokenizer/``, ``kinds.json``, ``sample_origins.jsonl`` (sample_id → split and file:line) and
``prepare_report.json`` (written last: its presence marks a complete prepare; it records the
tokenizer's identity, which training checks). Record formats and loss masks: docs/data.md.

Everything is written into a fresh sibling folder ``<out_dir>.partial-<pid>[-N]`` and moved into
``out_dir`` only once complete, so a failed or interrupted prepare leaves ``out_dir`` as it was (no
partial shards; a fresh run's ``out_dir`` is never created) and the partial folder is removed. With
``overwrite: true`` the previous outputs are moved aside to ``<out_dir>.replaced-<time>`` (never
deleted: a run does not delete what an earlier run saved) just before the new ones move in; the report
names that folder (``replaced``), and other files in ``out_dir`` stay where they are.

Sources: ``synthetic`` (:mod:`optsel.pipeline.data.synthetic`), ``jsonl`` and ``parquet`` files, ``hf`` (a
``datasets`` dataset saved with ``save_to_disk`` or loadable with ``load_dataset(path)``; a hub name only
with ``hf.local_files_only: false`` on a machine with network), ``pysource`` (functions and docstrings of
Python source trees, :mod:`optsel.pipeline.data.pysource`). For file sources ``template`` renders
prompt and response from record fields, the kind comes from ``template.kind_field`` (default: every
record is ``target``), and val comes from ``val_files`` or a ``val_fraction`` of the target records.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from optsel.pipeline.data.pysource import PySourceConfig
from optsel.pipeline.data.pysource import items as pysource_items
from optsel.pipeline.data.records import (
    BadRecord,
    HFSourceConfig,
    Record,
    Rendered,
    TemplateConfig,
    chat_text_bytes,
    chat_tokens,
    hf_records,
    jsonl_records,
    parquet_records,
    render_record,
)
from optsel.pipeline.data.synthetic import SyntheticConfig, generate
from optsel.pipeline.data.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer, tokenizer_identity
from optsel.pipeline.files import jsonio
from optsel.pipeline.files.folders import new_sibling

log = logging.getLogger("optsel.prepare")

COLUMNS = {
    "tokens": "ndarray:int32",
    "prompt_len": "int32",
    "sample_id": "int64",
    "kind": "str",
    "kind_id": "int32",
    "prompt": "str",
    "answer": "str",
}
#: template.format messages / prompt_completion: a per-token loss mask too (1: the token is trained on)
CHAT_COLUMNS = {**COLUMNS, "loss_mask": "ndarray:uint8"}
#: one JSON line per written sample: {"sample_id", "split", "origin"} (origin: file:line, row or synthetic #)
ORIGINS = "sample_origins.jsonl"
OUTPUTS = ("train", "val", "tokenizer", "kinds.json", ORIGINS, "prepare_report.json")
MAX_BAD_EXAMPLES = 20
MAX_NOTE_CHARS = 500
#: default ``max_record_bytes``: max(1 MiB, RECORD_BYTES_PER_TOKEN * max_seq_len)
MIN_RECORD_BYTES = 1 << 20
RECORD_BYTES_PER_TOKEN = 64


@dataclass(kw_only=True)
class PrepareConfig:
    """Everything ``prepare`` needs; strict (unknown keys are errors, see optsel/config_loader.py).

    ``max_record_bytes``: the largest input record accepted, in bytes. A JSONL line longer than this is
    skipped unread (never held in memory whole, parsed or tokenized), and so is a record of any source
    whose rendered prompt + response is longer (UTF-8 bytes); each is counted in the report's
    ``rejected_oversize`` with its file:line in ``bad_examples``, whatever ``on_bad_record`` and
    ``overlong`` say (it cannot be truncated without being parsed). Default (null):
    ``max(1 MiB, 64 * max_seq_len)``: 64 bytes per token is over 10x what BPE tokenizers average and 3x
    the worst JSON escaping under the byte tokenizer (a ``\\uXXXX\\uXXXX`` pair is 12 bytes for 4
    tokens), so a record under the cap that fits the window is never refused, and the 1 MiB floor leaves
    room for fields the template does not use. What it bounds: one record at the 1 MiB cap costs ~2 s and
    ~200 MB to tokenize (byte tokenizer), where an uncapped 20 MB one cost 47 s and 4.1 GB only to be
    rejected as overlong.
    """

    out_dir: str  #: folder the shards, tokenizer/ and kinds.json are written to
    source: Literal["synthetic", "jsonl", "parquet", "hf", "pysource"] = "synthetic"  #: where the records come from
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  #: source synthetic: the bundled stream's mix
    pysource: PySourceConfig = field(default_factory=PySourceConfig)  #: source pysource: Python source trees
    files: list[str] = field(default_factory=list)  #: jsonl/parquet: train input files
    val_files: list[str] = field(default_factory=list)  #: jsonl/parquet: val input files (else val_fraction)
    val_fraction: float = 0.1  #: file/hf sources without val files: share of target records held out
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)  #: source hf: a datasets dataset
    #: how a record's fields become prompt and response text
    template: TemplateConfig = field(default_factory=TemplateConfig)
    #: undecodable / missing field / wrong type: fail, or skip and count it
    on_bad_record: Literal["error", "skip"] = "error"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  #: the tokenizer (saved to <out_dir>/tokenizer)
    max_seq_len: int = 64  #: tokens incl. EOS (and BOS)
    overlong: Literal["truncate", "reject"] = "truncate"  #: a record over max_seq_len: cut it to fit, or reject it
    compression: str | None = "zstd"  #: shard compression codec (e.g. zstd, gz, br; null: none)
    hashes: list[str] = field(default_factory=lambda: ["sha1", "xxh64"])  #: hashes recorded per shard (unique, sorted)
    size_limit: int = 1 << 26  #: bytes per shard (before compression)
    seed: int = 0  #: seed of the val split and the synthetic stream
    overwrite: bool = False  #: replace an existing out_dir
    max_record_bytes: int | None = None  #: cap on one input record's bytes; None: max(1 MiB, 64 * max_seq_len)

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2, got {self.max_seq_len}")
        if self.max_record_bytes is not None and self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes: must be >= 1 (or null for the default), got {self.max_record_bytes}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.size_limit < 1024:
            raise ValueError(f"size_limit: must be >= 1024 bytes, got {self.size_limit}")
        if self.source in ("jsonl", "parquet") and not self.files:
            raise ValueError(f"files: at least one input file is required for source {self.source!r}")
        if self.source not in ("jsonl", "parquet") and (self.files or self.val_files):
            raise ValueError(f"files: only used with source 'jsonl' or 'parquet' (source is {self.source!r})")
        if self.source == "hf" and not self.hf.path:
            raise ValueError("hf: path is required for source 'hf'")
        if self.template.format != "fields" and self.source in ("synthetic", "pysource"):
            raise ValueError(
                f"template: format {self.template.format!r} needs a file or hf source (source is {self.source!r})"
            )
        if self.template.format == "messages" and self.tokenizer.kind != "pretrained":
            raise ValueError(
                f"tokenizer: chat records (template.format 'messages') are rendered with the tokenizer's "
                f"chat template; kind {self.tokenizer.kind!r} has none. Use kind 'pretrained' with a "
                f"tokenizer folder whose tokenizer_config.json has a chat_template"
            )
        if self.template.format != "fields" and self.tokenizer.add_bos:
            raise ValueError(
                f"tokenizer.add_bos: not used with template.format {self.template.format!r} (the chat "
                f"template places BOS); set it false"
            )
        if list(self.hashes) != sorted(set(self.hashes)):
            raise ValueError(f"hashes: must be unique and sorted, got {self.hashes}")


def record_byte_cap(cfg: PrepareConfig) -> int:
    """``cfg.max_record_bytes``, or its default from ``max_seq_len`` (see :class:`PrepareConfig`)."""
    if cfg.max_record_bytes is not None:
        return cfg.max_record_bytes
    return max(MIN_RECORD_BYTES, RECORD_BYTES_PER_TOKEN * cfg.max_seq_len)


def _check_codecs(cfg: PrepareConfig) -> None:
    import optsel.pipeline.data.streaming_compat  # noqa: PLC0415, F401  (registers `streaming` without torchvision)

    # isort: split
    from streaming.base.compression import is_compression  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written
    from streaming.base.hashing import is_hash  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    if cfg.compression and not is_compression(cfg.compression):
        raise ValueError(f"compression: unknown codec {cfg.compression!r} (e.g. zstd, gz, br, or null)")
    bad = [h for h in cfg.hashes if not is_hash(h)]
    if bad:
        raise ValueError(f"hashes: unknown algorithm {bad[0]!r} (e.g. sha1, xxh64)")


@dataclass
class PrepareReport:
    """What ``prepare`` wrote and what it dropped (also saved as ``prepare_report.json``)."""

    out_dir: str
    source: str
    records_read: int = 0  # source records seen (synthetic: samples generated)
    num_train: int = 0
    num_val: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # kind name -> kind_id
    kind_counts: dict[str, dict[str, int]] = field(default_factory=lambda: {"train": {}, "val": {}})
    truncated: int = 0  # longer than max_seq_len, cut to it
    rejected_overlong: int = 0  # longer than max_seq_len with overlong=reject, or prompt fills the window
    rejected_oversize: int = 0  # longer than max_record_bytes: rejected unread (not parsed, not tokenized)
    max_record_bytes: int = 0  # the cap in force
    skipped_empty: int = 0  # empty response text
    skipped_bad: int = 0  # undecodable / missing field / wrong type, with on_bad_record=skip
    blank_lines: int = 0  # blank JSONL lines (ignored)
    bad_examples: list[str] = field(default_factory=list)  # first few reasons for skipped/rejected records
    num_shards: dict[str, int] = field(default_factory=dict)
    max_tokens: int = 0
    max_token_id: int = -1  # the largest token id written (the model's vocabulary must exceed it)
    mean_tokens: float = 0.0  # train split
    max_seq_len: int = 0
    tokenizer: dict[str, Any] = field(default_factory=dict)
    replaced: str | None = None  # overwrite: where the previous outputs of out_dir were moved (kept)
    seconds: float = 0.0
    source_stats: dict[str, Any] = field(default_factory=dict)  # source pysource: files read and skipped, per filter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def note(self, message: str) -> None:
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            if len(message) > MAX_NOTE_CHARS:
                message = message[:MAX_NOTE_CHARS] + "..."
            # valid UTF-8 whatever the input held (e.g. an undecodable file name): the report is strict JSON
            self.bad_examples.append(message.encode("utf-8", "backslashreplace").decode("utf-8"))


# -- sources -> (split, ordinal, origin, rendered record); the ordinal becomes the sample_id -------------
Item = tuple[str, int, str, Rendered]


def _synthetic_items(cfg: PrepareConfig, report: PrepareReport) -> Iterator[Item]:
    train, val = generate(cfg.synthetic, cfg.seed)
    for split, samples, offset in (("train", train, 0), ("val", val, len(train))):
        for i, s in enumerate(samples):
            report.records_read += 1
            yield split, offset + i, f"synthetic {split} #{i}", Rendered(s["prompt"], s["answer"], s["kind"])


def _file_records(cfg: PrepareConfig) -> Iterator[tuple[str | None, Record]]:
    """(fixed split or None, record) over the configured inputs, in order."""
    if cfg.source == "hf":
        assert cfg.hf.path is not None
        for rec in hf_records(cfg.hf.path, cfg.hf.name, cfg.hf.split, cfg.hf.local_files_only):
            yield ("train" if cfg.hf.val_split else None), rec
        if cfg.hf.val_split:
            for rec in hf_records(cfg.hf.path, cfg.hf.name, cfg.hf.val_split, cfg.hf.local_files_only):
                yield "val", rec
        return
    cap = record_byte_cap(cfg)
    for split, paths in (("train" if cfg.val_files else None, cfg.files), ("val", cfg.val_files)):
        for path in paths:
            records = jsonl_records(path, max_bytes=cap) if cfg.source == "jsonl" else parquet_records(path)
            for rec in records:
                yield split, rec


def _oversize(report: PrepareReport, origin: str, what: str, cap: int, before: str) -> None:
    report.rejected_oversize += 1
    message = f"{origin}: {what} > max_record_bytes={cap} (rejected before {before})"
    report.note(message)
    log.warning("rejecting record: %s", message)


def _file_items(cfg: PrepareConfig, report: PrepareReport, skip_bad: bool = False) -> Iterator[Item]:
    offset = random.Random(cfg.seed).random()  # val held out evenly: exactly ~val_fraction of the targets
    targets_seen = 0
    cap = record_byte_cap(cfg)
    for ordinal, (split, rec) in enumerate(_file_records(cfg)):
        if rec.blank:
            report.blank_lines += 1
            continue
        report.records_read += 1
        if rec.oversize is not None:
            _oversize(report, rec.origin, f"{rec.oversize} bytes", cap, "parsing and tokenizing")
            continue
        try:
            rendered = render_record(rec, cfg.template)
            kind = rendered.kind
            if split == "val" and kind != "target":
                raise BadRecord(f"{rec.origin}: val records must be 'target', got kind {kind!r}")
        except BadRecord as err:
            if cfg.on_bad_record == "error" and not skip_bad:
                raise
            report.skipped_bad += 1
            report.note(str(err))
            log.warning("skipping bad record: %s", err)
            continue
        prompt, answer = rendered.prompt, rendered.response
        # chars <= UTF-8 bytes <= 4 * chars: the cheap test first, the exact one only on bounded text
        if rendered.chat is not None:
            if chat_text_bytes(rendered.chat) > cap:
                _oversize(report, rec.origin, "its messages' contents", cap, "tokenizing")
                continue
        elif len(prompt) + len(answer) > cap or len(prompt.encode()) + len(answer.encode()) > cap:
            _oversize(report, rec.origin, "its rendered prompt + response", cap, "tokenizing")
            continue
        if split is None:
            split = "train"
            if kind == "target":
                f = cfg.val_fraction
                if int((targets_seen + 1) * f + offset) > int(targets_seen * f + offset):
                    split = "val"
                targets_seen += 1
        yield split, ordinal, rec.origin, rendered


def _check_inputs(cfg: PrepareConfig) -> None:
    for key in ("files", "val_files"):
        for i, path in enumerate(getattr(cfg, key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"input file not found: {path} ({key}[{i}])")
    if cfg.source == "hf" and cfg.hf.local_files_only and not Path(str(cfg.hf.path)).exists():
        raise FileNotFoundError(
            f"hf dataset path not found: {cfg.hf.path} (hf.path; a hub name needs "
            f"hf.local_files_only: false and a network)"
        )


def _check_out_dir(cfg: PrepareConfig) -> Path:
    out = Path(cfg.out_dir)
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"out_dir {out} is a broken symlink")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"out_dir {out} is not empty; set overwrite: true to replace its shards")
    if not out.resolve().name:
        raise ValueError(f"out_dir: {out} is a filesystem root; name a folder to prepare into")
    return out


def _old_outputs(out: Path) -> list[str]:
    """The names of :data:`OUTPUTS` present in ``out``, ``prepare_report.json`` first (its absence marks an
    incomplete dataset, so it goes first when moving a dataset away and last when moving one in)."""
    names = [n for n in OUTPUTS if (out / n).exists() or (out / n).is_symlink()]
    return sorted(names, key=lambda n: n != "prepare_report.json")


def _reserve_aside(out: Path) -> Path:
    """A new empty folder ``<out_dir>.replaced-<time>[-N]`` next to ``out`` for its previous outputs."""
    return new_sibling(out, f".replaced-{time.strftime('%Y%m%d-%H%M%S')}", f"the previous outputs of {out}")


def _created_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, innermost first (made now, removed on failure)."""
    missing = [p for p in path.parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _install(work: Path, out: Path, aside: Path | None) -> None:
    """Move the complete dataset in ``work`` to ``out`` (``out``'s previous outputs to ``aside`` first)."""
    if not out.exists() and not out.is_symlink():
        os.rename(work, out)
        return
    old = _old_outputs(out)
    if old and aside is None:
        raise FileExistsError(
            f"out_dir {out}: prepare outputs appeared there while preparing ({', '.join(old)}); "
            f"nothing was replaced, the new dataset is discarded"
        )
    moved: list[tuple[Path, Path]] = []
    try:
        for name in old:
            os.replace(out / name, aside / name)  # type: ignore[operator]
            moved.append((out / name, aside / name))  # type: ignore[operator]
        for name in reversed(_old_outputs(work)):  # prepare_report.json last: it marks the dataset complete
            os.replace(work / name, out / name)
            moved.append((work / name, out / name))
    except BaseException:
        for src, dst in reversed(moved):  # put everything back: out_dir as it was, the new dataset in work
            os.replace(dst, src)
        raise
    work.rmdir()


def _work_dir(out: Path) -> Path:
    """A new empty sibling ``<out_dir>.partial-<pid>[-N]`` of ``out`` (made with the usual permissions)."""
    return new_sibling(out, f".partial-{os.getpid()}", "a partial folder")


def prepare(cfg: PrepareConfig) -> PrepareReport:
    """Write ``cfg.out_dir`` (train/val shards, tokenizer, kinds.json, report) and return the report.

    Everything is written to a sibling ``<out_dir>.partial-*`` folder and moved into ``out_dir`` at the
    end; on any failure that folder is removed and ``out_dir`` is left exactly as it was (see the module
    docstring; with overwrite the previous outputs go to ``<out_dir>.replaced-<time>``, named in the report).

    Raises FileExistsError (non-empty out_dir without overwrite), FileNotFoundError (a missing input,
    named), ValueError / BadRecord (a bad record with on_bad_record=error, named by file:line).
    """
    started = time.perf_counter()
    _check_codecs(cfg)
    _check_inputs(cfg)
    out = _check_out_dir(cfg)
    made = _created_parents(out.resolve())
    work: Path | None = None
    aside: Path | None = None
    try:
        work = _work_dir(out)
        aside = _reserve_aside(out) if out.is_dir() and _old_outputs(out) else None
        report = _write(cfg, out, work, started, aside)
        _install(work, out, aside)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # this run's own partial output, nothing else
        for folder in ([aside] if aside is not None else []) + made:
            try:
                folder.rmdir()  # only when empty: nothing anybody saved is removed
            except OSError:
                break
        raise
    if aside is not None:
        log.warning(
            "overwrite: the previous outputs of %s were moved to %s (kept; delete it when no longer needed)", out, aside
        )
    log.info(
        "prepared %s: %d train / %d val samples, %d truncated, %d rejected, %d oversize, %d empty, %d bad",
        out,
        report.num_train,
        report.num_val,
        report.truncated,
        report.rejected_overlong,
        report.rejected_oversize,
        report.skipped_empty,
        report.skipped_bad,
    )
    return report


def _write(cfg: PrepareConfig, out: Path, work: Path, started: float, aside: Path | None) -> PrepareReport:
    """The dataset of ``cfg``, written into the empty folder ``work``; its report names ``out``."""
    from optsel.pipeline.data.streaming_compat import MDSWriter  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    report = PrepareReport(
        out_dir=str(out),
        source=cfg.source,
        max_seq_len=cfg.max_seq_len,
        max_record_bytes=record_byte_cap(cfg),
        replaced=None if aside is None else str(aside),
    )

    py_items: list[Item] = []
    if cfg.source == "pysource":
        py_gen, stats = pysource_items(cfg.pysource, cfg.seed)
        py_items = list(py_gen)
        report.records_read = len(py_items)
        report.source_stats = asdict(stats)

    def items() -> Iterator[Item]:
        if cfg.source == "pysource":
            return iter(py_items)
        return _synthetic_items(cfg, report) if cfg.source == "synthetic" else _file_items(cfg, report)

    corpus = None
    if cfg.tokenizer.kind == "bpe":
        scratch = PrepareReport(out_dir=str(out), source=cfg.source)
        gen = generate(cfg.synthetic, cfg.seed)[0] if cfg.source == "synthetic" else None
        if gen is not None:
            corpus = [s["prompt"] + s["answer"] for s in gen]
        elif cfg.source == "pysource":  # the distractors only: the target family's text stays unseen
            corpus = [r.prompt + r.response for _, _, _, r in py_items if r.kind.startswith("distractor/")]
        else:
            # bad records are reported (or raised) by the writing pass below
            corpus = [r.prompt + r.response for _, _, _, r in _file_items(cfg, scratch, skip_bad=True)]
    tok = build_tokenizer(cfg.tokenizer, corpus)
    save_tokenizer(tok, work / "tokenizer")
    eos, bos = int(tok.eos_token_id), tok.bos_token_id
    if cfg.tokenizer.add_bos and bos is None:
        raise ValueError("tokenizer.add_bos: the tokenizer has no BOS token")
    chat_columns = cfg.template.format != "fields"
    if chat_columns and tok.chat_template is None and cfg.template.format == "messages":
        raise ValueError(
            f"tokenizer.path: the tokenizer at {cfg.tokenizer.path} has no chat template "
            f"(chat_template in its tokenizer_config.json), which chat records need"
        )

    kinds: dict[str, int] = {"target": 0, "corrupted": 1}
    if cfg.source == "synthetic":
        kinds = {name: i for i, name in enumerate(cfg.synthetic.kind_names())}
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    lengths: dict[str, list[int]] = {"train": [], "val": []}
    max_id = -1
    origins = open(work / ORIGINS, "w", encoding="utf-8")
    writers = {
        split: MDSWriter(
            out=str(work / split),
            columns=CHAT_COLUMNS if chat_columns else COLUMNS,
            compression=cfg.compression,
            hashes=list(cfg.hashes),
            size_limit=cfg.size_limit,
        )
        for split in ("train", "val")
    }
    try:
        for split, ordinal, origin, rendered in items():
            kind, prompt, answer = rendered.kind, rendered.prompt, rendered.response
            if rendered.chat is not None:
                if tok.chat_template is None:
                    raise ValueError(
                        f"tokenizer: {origin} is a chat record, but the tokenizer has no chat template "
                        f"(use kind 'pretrained' with a tokenizer folder that has one)"
                    )
                try:
                    tokens, mask = chat_tokens(tok, rendered.chat, origin)
                except BadRecord as err:
                    if cfg.on_bad_record == "error":
                        raise
                    report.skipped_bad += 1
                    report.note(str(err))
                    log.warning("skipping bad record: %s", err)
                    continue
            else:
                if not answer.strip():
                    report.skipped_empty += 1
                    report.note(f"{origin}: empty response")
                    continue
                head = tok.encode(prompt, add_special_tokens=False)
                if cfg.tokenizer.add_bos:
                    head = [int(bos)] + head
                tokens = head + tok.encode(answer, add_special_tokens=False) + [eos]
                mask = [0] * len(head) + [1] * (len(tokens) - len(head))
            if 1 not in mask:
                report.skipped_empty += 1
                report.note(f"{origin}: no token to train on (empty assistant turns)")
                continue
            prompt_len = mask.index(1)
            if len(tokens) > cfg.max_seq_len:
                if cfg.overlong == "reject" or prompt_len >= cfg.max_seq_len:
                    report.rejected_overlong += 1
                    why = (
                        "no assistant token within the window"
                        if rendered.chat is not None
                        else "prompt alone fills the window"
                    )
                    report.note(
                        f"{origin}: {len(tokens)} tokens > max_seq_len={cfg.max_seq_len}"
                        + ("" if cfg.overlong == "reject" else f" ({why})")
                    )
                    continue
                tokens, mask = tokens[: cfg.max_seq_len], mask[: cfg.max_seq_len]
                report.truncated += 1
            if rendered.chat is not None:
                prompt, answer = tok.decode(tokens[:prompt_len]), tok.decode(tokens[prompt_len:])
            kind_id = kinds.setdefault(kind, len(kinds))
            row = {
                "tokens": np.asarray(tokens, dtype=np.int32),
                "prompt_len": prompt_len,
                "sample_id": ordinal,
                "kind": kind,
                "kind_id": kind_id,
                "prompt": prompt,
                "answer": answer,
            }
            if chat_columns:
                row["loss_mask"] = np.asarray(mask, dtype=np.uint8)
            writers[split].write(row)
            origins.write(
                jsonio.dumps(
                    {
                        "sample_id": ordinal,
                        "split": split,
                        "origin": origin.encode("utf-8", "backslashreplace").decode("utf-8"),
                    }
                )
                + "\n"
            )
            counts[split][kind] = counts[split].get(kind, 0) + 1
            lengths[split].append(len(tokens))
            max_id = max(max_id, max(tokens))
    except BaseException:
        for writer in writers.values():
            writer.cancel_future_jobs()  # no index for a partial split; the caller removes `work`
        raise
    finally:
        origins.close()
    for writer in writers.values():
        writer.finish()

    report.kinds = kinds
    report.kind_counts = counts
    report.num_train, report.num_val = len(lengths["train"]), len(lengths["val"])
    all_lengths = lengths["train"] + lengths["val"]
    report.max_tokens = max(all_lengths, default=0)
    report.mean_tokens = float(np.mean(lengths["train"])) if lengths["train"] else 0.0
    for split in ("train", "val"):
        index = json.loads((work / split / "index.json").read_text())
        report.num_shards[split] = len(index["shards"])
    report.max_token_id = max_id
    report.tokenizer = {
        **tokenizer_identity(tok, cfg.tokenizer.kind, work / "tokenizer"),
        "add_bos": cfg.tokenizer.add_bos,
    }
    if report.num_train == 0:
        raise ValueError(
            f"no train samples were written to {out / 'train'} (see counts: "
            f"skipped_bad={report.skipped_bad}, skipped_empty={report.skipped_empty}, "
            f"rejected_overlong={report.rejected_overlong}, "
            f"rejected_oversize={report.rejected_oversize})"
        )
    if report.num_val == 0:
        log.warning("the val split under %s is empty: training needs target samples there", out)
    (work / "kinds.json").write_text(jsonio.dumps(kinds, indent=2))
    report.seconds = time.perf_counter() - started
    (work / "prepare_report.json").write_text(jsonio.dumps(report.to_dict(), indent=2))
    return report
