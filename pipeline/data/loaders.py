"""The loader: prepared MDS shards → per-rank pools (batches) for the trainer, and the val split.

Every rank draws the same number of samples per step (the per-rank pool size, ``drop_last``);
:func:`~optsel.pipeline.data.collate.collate` builds the batch of docs/architecture.md. Where the shards
are and how they are streamed: :mod:`optsel.pipeline.data.config`; what they must hold:
:mod:`optsel.pipeline.data.shards`; the checked StreamingDataset: :mod:`optsel.pipeline.data.streaming_dataset`.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from optsel.config_loader import ConfigError
from optsel.distributed import DistInfo
from optsel.distributed import info as dist_info
from optsel.pipeline.data.collate import Batch, collate
from optsel.pipeline.data.config import SPLITS, DataConfig, source_of
from optsel.pipeline.data.shards import ShardError  # (the trainer raises data_lib.ShardError)
from optsel.pipeline.data.streaming_dataset import open_dataset
from optsel.pipeline.data.tokenizer import file_sha256, load_tokenizer, vocab_sha256
from optsel.pipeline.files import jsonio

log = logging.getLogger("optsel.data")


def check_local(cfg: DataConfig) -> None:
    """``data.local`` is a folder (the prepared directory: tokenizer/, kinds.json); a ConfigError naming
    the key otherwise."""
    local = Path(cfg.local)
    if not local.is_dir():
        raise ConfigError(
            "data.local",
            f"{local} {'is not a folder' if local.exists() else 'does not exist'}; it must "
            f"be the directory written by `optsel prepare`",
        )


def kinds(data_dir: str | Path) -> dict[str, int]:
    """kind name → kind_id, from ``<data_dir>/kinds.json`` (a JSON object of names to distinct
    non-negative integers; a ShardError naming the file and the key otherwise)."""
    path = Path(data_dir) / "kinds.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} a directory written by `optsel prepare`?")
    table = jsonio.read_object(path, ShardError, f"{path} not found", f"corrupt {path}")
    for name, kind_id in table.items():
        if not isinstance(kind_id, int) or isinstance(kind_id, bool) or not 0 <= kind_id < 2**31:
            raise ShardError(f"corrupt {path}: kind {name!r} has id {kind_id!r:.60}, expected an integer in [0, 2**31)")
    if len(set(table.values())) != len(table):
        raise ShardError(f"corrupt {path}: two kinds share an id ({table})")
    return dict(table)


def _special_ids(value: Any) -> set[int]:
    """A config's special id (an int, a list of ints for several EOS tokens, or None) as a set."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def check_identity(data_dir: str | Path, tokenizer, model, model_cfg: Any = None) -> None:
    """Refuse, before step 1, a tokenizer or model that does not match the prepared data (a ConfigError
    naming both sides). ``tokenizer``: the one loaded from ``<data_dir>/tokenizer``; ``model``: the built
    model (its ``config``); ``model_cfg``: the run's ModelConfig (a ``local`` model folder with its own
    tokenizer is compared with the data's).

    Checks: ``<data_dir>/tokenizer/tokenizer.json`` is the one prepare recorded (its sha256) with the
    recorded vocab size and special ids; the model's vocabulary covers the tokenizer's and the largest id
    in the data; the model config's pad/bos/eos ids (where set) are the tokenizer's; a tokenizer saved in
    ``model.path`` has the data tokenizer's vocabulary and special ids. Data prepared before the identity
    was recorded (no ``tokenizer_json_sha256`` in prepare_report.json) is checked against the loaded
    tokenizer only, with a warning."""

    data_dir = Path(data_dir)
    tok_dir = data_dir / "tokenizer"
    report_path = data_dir / "prepare_report.json"
    report = (
        jsonio.read_object(report_path, ShardError, f"{report_path} not found", f"corrupt {report_path}")
        if report_path.is_file()
        else {}
    )
    recorded_tokenizer = report.get("tokenizer")
    recorded: dict[str, Any] = recorded_tokenizer if isinstance(recorded_tokenizer, dict) else {}
    here = {
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
    }
    if recorded.get("tokenizer_json_sha256"):
        sha = file_sha256(tok_dir / "tokenizer.json")
        if sha != recorded["tokenizer_json_sha256"]:
            raise ConfigError(
                "data.local",
                f"{tok_dir}/tokenizer.json (sha256 {sha}) is not the tokenizer the data "
                f"was prepared with ({report_path}: sha256 "
                f"{recorded['tokenizer_json_sha256']}); re-prepare the data",
            )
        for key, value in here.items():
            if recorded.get(key) != value:
                raise ConfigError(
                    "data.local",
                    f"the tokenizer in {tok_dir} has {key} {value}, but the data was "
                    f"prepared with {key} {recorded.get(key)} ({report_path})",
                )
    else:
        log.warning(
            "%s records no tokenizer identity (prepared before optsel recorded it); checking the model "
            "against %s only. Re-prepare to get the full check",
            report_path,
            tok_dir,
        )
    config = getattr(model, "config", None)
    rows = int(model.get_input_embeddings().weight.shape[0])
    model_vocab = min(rows, int(getattr(config, "vocab_size", None) or rows))
    max_id = report.get("max_token_id")
    where = (
        f"model.path {model_cfg.path}"
        if model_cfg is not None and getattr(model_cfg, "source", "") == "local"
        else "the model"
    )
    if model_vocab < len(tokenizer):
        raise ConfigError(
            "model",
            f"{where} has a vocabulary of {model_vocab}, smaller than the data tokenizer's "
            f"{len(tokenizer)} ({tok_dir}); use the model the data was tokenized for",
        )
    if isinstance(max_id, int) and max_id >= model_vocab:
        raise ConfigError(
            "model", f"{where} has a vocabulary of {model_vocab}, but the data under {data_dir} holds token id {max_id}"
        )
    for name, attr in (("pad_id", "pad_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        ours, theirs = here[name], _special_ids(getattr(config, attr, None))
        if ours is not None and theirs and int(ours) not in theirs:
            raise ConfigError(
                "model",
                f"{where} has {attr} {sorted(theirs) if len(theirs) > 1 else min(theirs)}, but "
                f"the data's tokenizer ({tok_dir}) has {name} {ours}; the data was prepared "
                f"with another tokenizer than the model's",
            )
    folder = Path(model_cfg.path) if model_cfg is not None and getattr(model_cfg, "source", "") == "local" else None
    if folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        theirs_tok = load_tokenizer(folder, key="model.path")
        mine, other = vocab_sha256(tokenizer), vocab_sha256(theirs_tok)
        if mine != other or len(theirs_tok) != len(tokenizer):
            raise ConfigError(
                "model.path",
                f"the tokenizer saved with the model ({folder}: vocab size "
                f"{len(theirs_tok)}, vocab sha256 {other[:12]}) is not the one the data "
                f"was prepared with ({tok_dir}: vocab size {len(tokenizer)}, vocab sha256 "
                f"{mine[:12]}); prepare the data with tokenizer.kind: pretrained, "
                f"tokenizer.path: {folder}",
            )
        for name, attr in (("pad_id", "pad_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
            if getattr(theirs_tok, attr) != here[name]:
                raise ConfigError(
                    "model.path",
                    f"the tokenizer saved with the model ({folder}) has {name} "
                    f"{getattr(theirs_tok, attr)}, the data's ({tok_dir}) {here[name]}",
                )


def _pad_id(cfg: DataConfig) -> int:
    return int(load_tokenizer(Path(cfg.local) / "tokenizer").pad_token_id)


def build_train_loader(
    cfg: DataConfig,
    per_rank_pool_size: int,
    rank_info: DistInfo | None = None,
    pad_id: int | None = None,
    vocab_size: int | None = None,
):
    """A StreamingDataLoader over the train split yielding this rank's pool (a collated Batch).

    Every rank yields batches of exactly ``per_rank_pool_size`` samples (drop_last), the same number
    per epoch on every rank; iterating the loader again starts the next epoch. ``pad_id`` defaults to
    the prepared tokenizer's. The loader has ``state_dict()`` / ``load_state_dict()`` for exact resume.
    ``vocab_size``: token ids at or above it are a ShardError naming the shard and sample.
    """
    from optsel.pipeline.data.streaming_compat import StreamingDataLoader  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    if per_rank_pool_size < 1:
        raise ValueError(f"per_rank_pool_size: must be >= 1, got {per_rank_pool_size}")
    rank_info = rank_info or dist_info()
    pad_id = _pad_id(cfg) if pad_id is None else pad_id
    dataset = open_dataset(cfg, "train", rank_info, per_rank_pool_size, cfg.shuffle, vocab_size)
    if len(dataset) < per_rank_pool_size:
        world = rank_info.world_size
        raise ConfigError(
            "selection.pool_size",
            f"a pool takes {per_rank_pool_size} samples per rank ({per_rank_pool_size * world} on {world} "
            f"rank(s)), but the train split under {source_of(cfg, 'train')} gives {len(dataset)} samples "
            f"per rank ({dataset.num_samples} in all); lower selection.pool_size or prepare more samples",
        )
    return StreamingDataLoader(
        dataset,
        batch_size=per_rank_pool_size,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, pad_id=pad_id, max_seq_len=cfg.max_seq_len),
        drop_last=True,
        persistent_workers=False,
    )


def iterate_pools(
    loader: Iterable[Batch],
    on_epoch_end: Callable[[], None] | None = None,
    resumed: bool = False,
    where: str = "the train loader",
) -> Iterator[Batch]:
    """Pools forever: epoch after epoch (streaming advances the epoch on each new pass), calling
    ``on_epoch_end`` after each. An epoch without a full pool is an error, except right after a resume
    (``resumed``: the loader may continue at the very end of the saved epoch), and never twice in a row."""
    empty_in_a_row = 0
    while True:
        got = 0
        for pool in loader:
            got += 1
            yield pool
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row > 1 or (got == 0 and not resumed):
            raise RuntimeError(f"{where} yields no full pool (too few samples per rank)")
        if on_epoch_end is not None:
            on_epoch_end()


def share_of(rows: list, rank: int, world: int) -> list:
    """This rank's round-robin share of ``rows`` after trimming to a multiple of ``world``, so that every
    rank gets the same number (collectives over the shares stay in step)."""
    return rows[: len(rows) // world * world][rank::world]


def batches_of(rows: list[dict[str, Any]], pad_id: int, max_seq_len: int | None, batch_size: int = 32) -> list[Batch]:
    """``rows`` collated into batches of ``batch_size`` (the last one may be smaller)."""
    return [collate(rows[i : i + batch_size], pad_id, max_seq_len) for i in range(0, len(rows), batch_size)]


def load_split(
    cfg: DataConfig, split: str = "val", rank_info: DistInfo | None = None, vocab_size: int | None = None
) -> list[dict[str, Any]]:
    """Every sample of ``split`` in stored order (all ranks get all of it); for small splits (val).

    Goes through StreamingDataset like training (same cache, same hash checks); call it on every rank.
    """
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    dataset = open_dataset(cfg, split, rank_info or dist_info(), batch_size=None, shuffle=False, vocab_size=vocab_size)
    try:
        return [dict(dataset.get_item(i)) for i in range(dataset.size)]
    finally:
        del dataset
        gc.collect()  # release the shared memory now, not at interpreter exit


def build_val_batches(
    cfg: DataConfig,
    pad_id: int | None = None,
    batch_size: int = 32,
    rank_info: DistInfo | None = None,
    limit: int | None = None,
) -> list[Batch]:
    """This rank's share of the (first ``limit``) val samples as collated batches.

    Samples are dealt round-robin after trimming to a multiple of the world size, so every rank gets
    the same number of samples (and batches).
    """
    rank_info = rank_info or dist_info()
    pad_id = _pad_id(cfg) if pad_id is None else pad_id
    rows = share_of(load_split(cfg, "val", rank_info)[:limit], rank_info.rank, rank_info.world_size)
    return batches_of(rows, pad_id, cfg.max_seq_len, batch_size)
