"""``optsel prepare``: turn the synthetic stream or local files into MDS shards for training.

Output layout under ``out_dir`` (see docs/architecture.md): ``train/`` and ``val/`` MDS datasets with
the columns of :data:`COLUMNS`, ``tokenizer/``, ``kinds.json`` and ``prepare_report.json`` (written
last: its presence marks a complete prepare).

Sources: ``synthetic`` (:mod:`optsel.pipeline.synthetic`), ``jsonl`` and ``parquet`` files, ``hf`` (a
``datasets`` dataset saved with ``save_to_disk`` or loadable with ``load_dataset(path)``; a hub name only
with ``hf.local_files_only: false`` on a machine with network). For file sources ``template`` renders
prompt and response from record fields, the kind comes from ``template.kind_field`` (default: every
record is ``target``), and val comes from ``val_files`` or a ``val_fraction`` of the target records.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from optsel.pipeline import jsonio
from optsel.pipeline.records import (BadRecord, HFSourceConfig, Record, TemplateConfig, hf_records, jsonl_records,
                                     parquet_records, render)
from optsel.pipeline.synthetic import SyntheticConfig, generate
from optsel.pipeline.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer

log = logging.getLogger("optsel.prepare")

COLUMNS = {"tokens": "ndarray:int32", "prompt_len": "int32", "sample_id": "int64", "kind": "str",
           "kind_id": "int32", "prompt": "str", "answer": "str"}
OUTPUTS = ("train", "val", "tokenizer", "kinds.json", "prepare_report.json")
MAX_BAD_EXAMPLES = 20


@dataclass(kw_only=True)
class PrepareConfig:
    """Everything ``prepare`` needs; strict (unknown keys are errors, see optsel/config_loader.py)."""

    out_dir: str
    source: Literal["synthetic", "jsonl", "parquet", "hf"] = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    files: list[str] = field(default_factory=list)  # jsonl/parquet: train input files
    val_files: list[str] = field(default_factory=list)  # jsonl/parquet: val input files (else val_fraction)
    val_fraction: float = 0.1  # file/hf sources without val files: share of target records held out
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    on_bad_record: Literal["error", "skip"] = "error"  # undecodable / missing field / wrong type
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_seq_len: int = 64  # tokens incl. EOS (and BOS)
    overlong: Literal["truncate", "reject"] = "truncate"
    compression: str | None = "zstd"
    hashes: list[str] = field(default_factory=lambda: ["sha1", "xxh64"])
    size_limit: int = 1 << 26  # bytes per shard (before compression)
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2, got {self.max_seq_len}")
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
        if list(self.hashes) != sorted(set(self.hashes)):
            raise ValueError(f"hashes: must be unique and sorted, got {self.hashes}")


def _check_codecs(cfg: PrepareConfig) -> None:
    import optsel.pipeline.streaming_compat  # noqa: F401  (registers `streaming` without torchvision)
    from streaming.base.compression import is_compression
    from streaming.base.hashing import is_hash

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
    skipped_empty: int = 0  # empty response text
    skipped_bad: int = 0  # undecodable / missing field / wrong type, with on_bad_record=skip
    blank_lines: int = 0  # blank JSONL lines (ignored)
    bad_examples: list[str] = field(default_factory=list)  # first few reasons for skipped/rejected records
    num_shards: dict[str, int] = field(default_factory=dict)
    max_tokens: int = 0
    mean_tokens: float = 0.0  # train split
    max_seq_len: int = 0
    tokenizer: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def note(self, message: str) -> None:
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append(message)


# -- sources -> (split, ordinal, origin, prompt, answer, kind) ------------------------------------------
Item = tuple[str, int, str, str, str, str]


def _synthetic_items(cfg: PrepareConfig, report: PrepareReport) -> Iterator[Item]:
    train, val = generate(cfg.synthetic, cfg.seed)
    for split, samples, offset in (("train", train, 0), ("val", val, len(train))):
        for i, s in enumerate(samples):
            report.records_read += 1
            yield split, offset + i, f"synthetic {split} #{i}", s["prompt"], s["answer"], s["kind"]


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
    reader = jsonl_records if cfg.source == "jsonl" else parquet_records
    for split, paths in (("train" if cfg.val_files else None, cfg.files), ("val", cfg.val_files)):
        for path in paths:
            for rec in reader(path):
                yield split, rec


def _file_items(cfg: PrepareConfig, report: PrepareReport, skip_bad: bool = False) -> Iterator[Item]:
    offset = random.Random(cfg.seed).random()  # val held out evenly: exactly ~val_fraction of the targets
    targets_seen = 0
    for ordinal, (split, rec) in enumerate(_file_records(cfg)):
        if rec.blank:
            report.blank_lines += 1
            continue
        report.records_read += 1
        try:
            prompt, answer, kind = render(rec, cfg.template)
            if split == "val" and kind != "target":
                raise BadRecord(f"{rec.origin}: val records must be 'target', got kind {kind!r}")
        except BadRecord as err:
            if cfg.on_bad_record == "error" and not skip_bad:
                raise
            report.skipped_bad += 1
            report.note(str(err))
            log.warning("skipping bad record: %s", err)
            continue
        if split is None:
            split = "train"
            if kind == "target":
                f = cfg.val_fraction
                if int((targets_seen + 1) * f + offset) > int(targets_seen * f + offset):
                    split = "val"
                targets_seen += 1
        yield split, ordinal, rec.origin, prompt, answer, kind


def _check_inputs(cfg: PrepareConfig) -> None:
    for key in ("files", "val_files"):
        for i, path in enumerate(getattr(cfg, key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"input file not found: {path} ({key}[{i}])")
    if cfg.source == "hf" and cfg.hf.local_files_only and not Path(str(cfg.hf.path)).exists():
        raise FileNotFoundError(f"hf dataset path not found: {cfg.hf.path} (hf.path; a hub name needs "
                                f"hf.local_files_only: false and a network)")


def _prepare_out_dir(cfg: PrepareConfig) -> Path:
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"out_dir {out} is not empty; set overwrite: true to replace its shards")
        import shutil

        for name in OUTPUTS:  # only what prepare writes; anything else in out_dir is left alone
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare(cfg: PrepareConfig) -> PrepareReport:
    """Write ``cfg.out_dir`` (train/val shards, tokenizer, kinds.json, report) and return the report.

    Raises FileExistsError (non-empty out_dir without overwrite), FileNotFoundError (a missing input,
    named), ValueError / BadRecord (a bad record with on_bad_record=error, named by file:line).
    """
    from optsel.pipeline.streaming_compat import MDSWriter

    started = time.perf_counter()
    _check_codecs(cfg)
    _check_inputs(cfg)
    out = _prepare_out_dir(cfg)
    report = PrepareReport(out_dir=str(out), source=cfg.source, max_seq_len=cfg.max_seq_len)

    def items() -> Iterator[Item]:
        return _synthetic_items(cfg, report) if cfg.source == "synthetic" else _file_items(cfg, report)

    corpus = None
    if cfg.tokenizer.kind == "bpe":
        scratch = PrepareReport(out_dir=str(out), source=cfg.source)
        gen = generate(cfg.synthetic, cfg.seed)[0] if cfg.source == "synthetic" else None
        if gen is not None:
            corpus = [s["prompt"] + s["answer"] for s in gen]
        else:
            # bad records are reported (or raised) by the writing pass below
            corpus = [p + a for _, _, _, p, a, _ in _file_items(cfg, scratch, skip_bad=True)]
    tok = build_tokenizer(cfg.tokenizer, corpus)
    save_tokenizer(tok, out / "tokenizer")
    eos, bos = int(tok.eos_token_id), tok.bos_token_id
    if cfg.tokenizer.add_bos and bos is None:
        raise ValueError("tokenizer.add_bos: the tokenizer has no BOS token")

    kinds: dict[str, int] = {"target": 0, "corrupted": 1}
    if cfg.source == "synthetic":
        kinds = {name: i for i, name in enumerate(cfg.synthetic.kind_names())}
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    lengths: dict[str, list[int]] = {"train": [], "val": []}
    writers = {split: MDSWriter(out=str(out / split), columns=COLUMNS, compression=cfg.compression,
                                hashes=list(cfg.hashes), size_limit=cfg.size_limit)
               for split in ("train", "val")}
    try:
        for split, ordinal, origin, prompt, answer, kind in items():
            if not answer.strip():
                report.skipped_empty += 1
                report.note(f"{origin}: empty response")
                continue
            head = tok.encode(prompt, add_special_tokens=False)
            if cfg.tokenizer.add_bos:
                head = [int(bos)] + head
            tokens = head + tok.encode(answer, add_special_tokens=False) + [eos]
            if len(tokens) > cfg.max_seq_len:
                if cfg.overlong == "reject" or len(head) >= cfg.max_seq_len:
                    report.rejected_overlong += 1
                    report.note(f"{origin}: {len(tokens)} tokens > max_seq_len={cfg.max_seq_len}"
                                + ("" if cfg.overlong == "reject" else " (prompt alone fills the window)"))
                    continue
                tokens = tokens[: cfg.max_seq_len]
                report.truncated += 1
            kind_id = kinds.setdefault(kind, len(kinds))
            writers[split].write({"tokens": np.asarray(tokens, dtype=np.int32), "prompt_len": len(head),
                                  "sample_id": ordinal, "kind": kind, "kind_id": kind_id,
                                  "prompt": prompt, "answer": answer})
            counts[split][kind] = counts[split].get(kind, 0) + 1
            lengths[split].append(len(tokens))
    finally:
        for writer in writers.values():
            writer.finish()

    report.kinds = kinds
    report.kind_counts = counts
    report.num_train, report.num_val = len(lengths["train"]), len(lengths["val"])
    all_lengths = lengths["train"] + lengths["val"]
    report.max_tokens = max(all_lengths, default=0)
    report.mean_tokens = float(np.mean(lengths["train"])) if lengths["train"] else 0.0
    for split in ("train", "val"):
        index = json.loads((out / split / "index.json").read_text())
        report.num_shards[split] = len(index["shards"])
    report.tokenizer = {"kind": cfg.tokenizer.kind, "vocab_size": len(tok), "pad_id": tok.pad_token_id,
                        "eos_id": eos, "bos_id": bos, "add_bos": cfg.tokenizer.add_bos}
    if report.num_train == 0:
        raise ValueError(f"no train samples were written to {out / 'train'} (see counts: "
                         f"skipped_bad={report.skipped_bad}, skipped_empty={report.skipped_empty}, "
                         f"rejected_overlong={report.rejected_overlong})")
    if report.num_val == 0:
        log.warning("the val split under %s is empty: training needs target samples there", out)
    (out / "kinds.json").write_text(json.dumps(kinds, indent=2))
    report.seconds = time.perf_counter() - started
    (out / "prepare_report.json").write_text(jsonio.dumps(report.to_dict(), indent=2))
    log.info("prepared %s: %d train / %d val samples, %d truncated, %d rejected, %d empty, %d bad",
             out, report.num_train, report.num_val, report.truncated, report.rejected_overlong,
             report.skipped_empty, report.skipped_bad)
    return report
