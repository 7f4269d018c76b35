"""The streaming side: MDS shards written by prepare → per-rank pools (batches) for the trainer.

The prepared directory (``DataConfig.local``) is never modified: StreamingDataset reads the shards
from it as its ``remote`` (a plain path) and keeps its decompressed working copy in a cache directory
(``cache_dir``, default ``<tmp>/optsel-streaming-<uid>/<hash of the index>/``). Passing the prepared
dir as streaming's ``local`` with ``remote=None`` would make streaming decompress the shards next to
their ``.zstd`` files and delete the compressed originals, and later runs would then read the raw files
without any hash check. With a ``remote`` (e.g. ``s3://bucket/ds``) shards are downloaded into the
cache; ``local`` still holds ``tokenizer/`` and ``kinds.json``.

Every rank draws the same number of samples per step (the per-rank pool size, ``drop_last``);
``collate`` builds the batch of docs/architecture.md.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from optsel.distributed import DistInfo
from optsel.distributed import info as dist_info

log = logging.getLogger("optsel.data")

Batch = dict[str, torch.Tensor]
SPLITS = ("train", "val")
#: URL schemes mosaicml-streaming can download from (``streaming.base.storage.download``)
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "sftp", "dbfs", "alipan")


@dataclass(kw_only=True)
class DataConfig:
    """Where the prepared shards are and how they are streamed."""

    local: str  # the prepare out_dir: tokenizer/, kinds.json (and train/, val/ unless remote is set)
    remote: str | None = None  # a remote copy of the prepare out_dir (s3://…, or a plain path)
    cache_dir: str | None = None  # streaming's working copy; default: <tmp>/optsel-streaming-<uid>/<key>
    shuffle: bool = True
    shuffle_seed: int = 0
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None  # fix it to keep the sample order when the world size changes
    num_workers: int = 0  # DataLoader worker processes per rank
    predownload: int | None = None  # samples to fetch ahead per worker (streaming default when None)
    validate_hash: str | None = "xxh64"  # streaming checks every shard it copies into the cache
    verify_shards: Literal["hash", "size", "none"] = "hash"  # up-front check of local shards (names the file)
    max_seq_len: int | None = None  # cut samples to this many tokens in collate (None: as prepared)
    download_timeout: float = 60.0  # seconds per shard
    clean_stale_shm: bool = True  # remove shared memory / file locks of crashed runs before starting
    allow_pickle: bool = False  # shards with pickle-encoded columns (code runs on load) are refused unless true

    def __post_init__(self) -> None:
        if not self.local:
            raise ValueError("local: required (the directory written by `optsel prepare`)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2, got {self.max_seq_len}")
        if self.predownload is not None and self.predownload < 1:
            raise ValueError(f"predownload: must be >= 1, got {self.predownload}")
        if self.remote is not None and self.remote.startswith("file://"):
            raise ValueError("remote: give a plain path, not a file:// URL (streaming needs that)")
        if self.remote is not None and "://" in self.remote:
            scheme = self.remote.split("://", 1)[0].lower()
            if scheme not in REMOTE_SCHEMES:
                from optsel.config_loader import mask_url

                raise ValueError(f"remote: unsupported URL scheme {scheme!r} in {mask_url(self.remote)}; streaming "
                                 f"reads {', '.join(REMOTE_SCHEMES)} URLs or a plain path")


_CLEAN_AT_EXIT = False
#: streaming shm prefixes of the datasets this process made (the exit cleanup touches only these)
_OWN_PREFIXES: set[int] = set()


def _clean_at_exit() -> None:
    """Registered at import, so it runs after streaming's own atexit handlers (LIFO) have unmapped and
    unlinked this process's shared memory: then the file locks of *this process's* prefixes in /tmp can
    go too. Other prefixes are left alone (a job starting on the same node may have just created
    them); crashed runs' leftovers are swept at the next start, with the age guard."""
    if _CLEAN_AT_EXIT and _OWN_PREFIXES:
        from optsel.pipeline.shm_cleanup import clean_stale_streaming_state

        try:
            clean_stale_streaming_state(only_prefixes=set(_OWN_PREFIXES))
        except Exception:  # never fail an exiting process over housekeeping
            pass


atexit.register(_clean_at_exit)


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard; the message names the file."""


# -- metadata ---------------------------------------------------------------------------------------
def kinds(data_dir: str | Path) -> dict[str, int]:
    """kind name → kind_id, from ``<data_dir>/kinds.json``."""
    path = Path(data_dir) / "kinds.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} a directory written by `optsel prepare`?")
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


def _is_local(path: str) -> bool:
    return "://" not in path


def _source(cfg: DataConfig, split: str) -> str:
    base = cfg.remote if cfg.remote is not None else cfg.local
    return os.path.join(base, split) if _is_local(base) else f"{base.rstrip('/')}/{split}"


#: columns the trainer reads → accepted MDS encodings
REQUIRED_COLUMNS = {"tokens": ("ndarray:int8", "ndarray:int16", "ndarray:int32", "ndarray:int64", "ndarray:uint8",
                               "ndarray:uint16", "ndarray:uint32"),
                    "prompt_len": ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "int"),
                    "sample_id": ("int32", "int64", "uint32", "uint64", "int"),
                    "kind_id": ("int8", "int16", "int32", "int64", "uint8", "uint16", "int")}
PICKLE_ENCODINGS = ("pkl",)


def check_columns(shard: dict[str, Any], index_path: Path, allow_pickle: bool = False) -> None:
    """The shard's columns hold what the trainer reads, with numeric encodings; pickle-encoded
    columns are refused unless ``allow_pickle`` (unpickling runs code from the file)."""
    encodings = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
    pickled = [name for name, enc in encodings.items() if enc in PICKLE_ENCODINGS]
    if pickled and not allow_pickle:
        raise ShardError(f"{index_path}: column(s) {pickled} are pickle-encoded; loading them can run code from the "
                         f"file. Re-write the shards without pickle, or set data.allow_pickle=true if you trust them")
    for name, allowed in REQUIRED_COLUMNS.items():
        if name not in encodings:
            raise ShardError(f"{index_path}: column '{name}' is missing (columns: {sorted(encodings)}); "
                             f"write shards with `optsel prepare`")
        if encodings[name] not in allowed:
            raise ShardError(f"{index_path}: column '{name}' has encoding '{encodings[name]}', expected one of "
                             f"{list(allowed)}")


def check_basename(name: Any, index_path: Any) -> None:
    """A shard file name from an index must be a plain file name: streaming joins it to the cache
    folder and writes there, so ``../x`` or an absolute path would write anywhere."""
    if (not isinstance(name, str) or not name or os.path.isabs(name) or "/" in name or "\\" in name
            or ".." in name or "\x00" in name or name in (".", "~") or name.startswith("~")):
        raise ShardError(f"{index_path}: shard file name {name!r} is not a plain file name (absolute, or contains "
                         f"'/', '\\' or '..'); refusing the index (streaming would write outside its cache)")


def check_index_basenames(shards: Iterable[dict[str, Any]], index_path: Any) -> None:
    """Every raw and zip basename of the index's shard entries is a plain file name."""
    for shard in shards:
        for key in ("raw_data", "zip_data"):
            info = shard.get(key) if isinstance(shard, dict) else None
            if info:
                check_basename(info.get("basename") if isinstance(info, dict) else None, index_path)


def verify_split(split_dir: str | Path, mode: Literal["hash", "size", "none"] = "hash",
                 algo: str | None = None, allow_pickle: bool = False) -> int:
    """Check that every shard listed in ``split_dir/index.json`` has the trainer's columns (no pickle
    unless allowed) and exists with its size (and hash; mode "none" checks columns only).

    Returns the number of samples. Raises ShardError naming the missing/truncated/corrupt file.
    """
    from optsel.pipeline.streaming_compat import MDSWriter  # noqa: F401  (registers `streaming`)
    from streaming.base.hashing import get_hash

    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    if not index_path.is_file():
        raise ShardError(f"no MDS index at {index_path}: run `optsel prepare` (or check data.local/remote)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"corrupt MDS index {index_path}: {err}") from err
    check_index_basenames(index["shards"], index_path)
    total = 0
    for shard in index["shards"]:
        total += int(shard["samples"])
        check_columns(shard, index_path, allow_pickle)
        if mode == "none":
            continue
        info = shard.get("zip_data") or shard["raw_data"]
        path = split_dir / info["basename"]
        if not path.is_file():
            raise ShardError(f"shard file missing: {path} (listed in {index_path})")
        size = path.stat().st_size
        if size != int(info["bytes"]):
            raise ShardError(f"shard file {path} has {size} bytes, index says {info['bytes']} (truncated or replaced)")
        if mode == "hash" and info.get("hashes"):
            name = algo if algo in info["hashes"] else sorted(info["hashes"])[0]
            if get_hash(name, path.read_bytes()) != info["hashes"][name]:
                raise ShardError(f"shard file {path} fails its {name} check (corrupt)")
    return total


def cache_root(cfg: DataConfig) -> Path:
    """Streaming's working directory for this dataset (split subdirectories below it)."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    base = cfg.remote if cfg.remote is not None else cfg.local
    key = hashlib.sha1(os.path.abspath(base).encode() if _is_local(base) else base.encode())
    if _is_local(base):  # a new prepare (different shard hashes) gets a fresh cache
        for split in SPLITS:
            index = Path(base) / split / "index.json"
            if index.is_file():
                key.update(index.read_bytes())
    return Path(tempfile.gettempdir()) / f"optsel-streaming-{os.getuid()}" / key.hexdigest()[:16]


# -- distributed environment for streaming ------------------------------------------------------------
def _streaming_env(rank_info: DistInfo) -> None:
    """Streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment: make them agree."""
    env = os.environ
    for key, value in (("RANK", rank_info.rank), ("WORLD_SIZE", rank_info.world_size),
                       ("LOCAL_RANK", rank_info.local_rank)):
        if env.get(key) in (None, ""):
            env[key] = str(value)
        elif int(env[key]) != value:
            raise RuntimeError(f"environment {key}={env[key]} disagrees with the process group ({value})")
    if env.get("LOCAL_WORLD_SIZE") in (None, ""):
        guess = env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if not guess and rank_info.world_size == 1:
            guess = "1"
        if not guess:
            raise RuntimeError("LOCAL_WORLD_SIZE is not set: launch with torchrun or the deepspeed launcher, "
                               "or export LOCAL_WORLD_SIZE (ranks per node)")
        env["LOCAL_WORLD_SIZE"] = guess
    if rank_info.world_size % int(env["LOCAL_WORLD_SIZE"]):
        raise RuntimeError(f"LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']} does not divide the world size "
                           f"{rank_info.world_size}")


def _checked_dataset_class():
    """StreamingDataset that checks what it reads and raises what streaming would hide.

    - its Stream refuses an index whose raw or zip shard names are not plain file names, right after
      the index is read and before any shard file is touched (local and remote sources alike);
    - ``get_item`` names the shard file and the sample when a sample does not decode, or when its
      tokens fall outside [0, vocab_size) or its ``prompt_len`` outside [0, len(tokens)];
    - a failure of the background download/validation thread is raised at the end of the pass
      (streaming itself only *ends the epoch early*, which would silently shorten training).
    """
    from optsel.pipeline.streaming_compat import Stream, StreamingDataset

    global _CheckedStreamingDataset, _CheckedStream
    if _CheckedStreamingDataset is None:
        class CheckedStream(Stream):
            def get_shards(self, world, allow_unsafe_types):
                shards = super().get_shards(world, allow_unsafe_types)
                index_path = f"{self.remote or self.local}/{self.split or ''}".rstrip("/") + "/index.json"
                for reader in shards:
                    for raw, zipped in reader.file_pairs:
                        for info in (raw, zipped):
                            if info is not None:
                                check_basename(info.basename, index_path)
                return shards

        class CheckedStreamingDataset(StreamingDataset):
            vocab_size: int | None = None

            def on_exception(self, future) -> None:
                if future.exception() is not None:
                    self._optsel_failure = future.exception()
                super().on_exception(future)

            def _where(self, sample_id: int) -> str:
                try:
                    shard_id, in_shard = self.spanner[sample_id]
                    reader = self.shards[shard_id]
                    stream = self.streams[self.stream_per_shard[shard_id]]
                    raw = reader.file_pairs[0][0]
                    zipped = reader.file_pairs[0][1]
                    name = (zipped or raw).basename
                    base = f"{stream.remote or stream.local}/{stream.split or ''}".rstrip("/")
                    return f"shard {base}/{name}, sample {in_shard} of the shard (dataset index {sample_id})"
                except Exception:  # noqa: BLE001 - the message must not fail
                    return f"dataset index {sample_id}"

            def get_item(self, sample_id: int, retry: int = 7):
                try:
                    sample = super().get_item(sample_id, retry)
                except ShardError:
                    raise
                except Exception as err:
                    if "Background thread failed" in str(err):
                        raise
                    raise ShardError(f"{self._where(sample_id)}: cannot be decoded ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200] if str(err) else ''}); the shard's hash may "
                                     f"match its index but its contents are not valid MDS samples") from err
                problem = sample_problem(sample, self.vocab_size)
                if problem:
                    sid = sample.get("sample_id") if isinstance(sample, dict) else None
                    raise ShardError(f"{self._where(sample_id)}" + (f", sample_id {sid}" if sid is not None else "")
                                     + f": {problem}")
                return sample

            def __iter__(self):
                yield from super().__iter__()
                failure = getattr(self, "_optsel_failure", None)
                if failure is not None:
                    raise ShardError(f"streaming stopped early on {self.streams[0].remote}: {failure}") from failure

        CheckedStreamingDataset.__qualname__ = CheckedStreamingDataset.__name__ = "_CheckedStreamingDataset"
        CheckedStream.__qualname__ = CheckedStream.__name__ = "_CheckedStream"
        _CheckedStreamingDataset, _CheckedStream = CheckedStreamingDataset, CheckedStream
    return _CheckedStreamingDataset


def sample_problem(sample: Any, vocab_size: int | None) -> str:
    """What is wrong with one decoded MDS row ("" if nothing): ``tokens`` a 1-d integer array with
    ids in [0, vocab_size), ``prompt_len`` in [0, len(tokens)]. Vectorised (one min/max per sample)."""
    if not isinstance(sample, dict) or "tokens" not in sample or "prompt_len" not in sample:
        return f"not a sample with tokens and prompt_len (got {type(sample).__name__})"
    tokens = np.asarray(sample["tokens"])
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        return f"tokens must be a 1-d integer array, got shape {tokens.shape} dtype {tokens.dtype}"
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = low if low < 0 else high
            return (f"token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
                    if vocab_size is not None else f"token id {bad} is negative")
    prompt_len = int(sample["prompt_len"])
    if not 0 <= prompt_len <= tokens.size:
        return f"prompt_len {prompt_len} is outside [0, length {tokens.size}]"
    return ""


_CheckedStream = None
_CheckedStreamingDataset = None


def _dataset(cfg: DataConfig, split: str, rank_info: DistInfo, batch_size: int | None, shuffle: bool,
             vocab_size: int | None = None):
    StreamingDataset = _checked_dataset_class()

    _streaming_env(rank_info)
    if cfg.clean_stale_shm:
        global _CLEAN_AT_EXIT
        _CLEAN_AT_EXIT = True
        if rank_info.local_rank == 0:
            from optsel.pipeline.shm_cleanup import clean_stale_streaming_state

            clean_stale_streaming_state()
        # streaming's ranks each scan /dev/shm for the next free prefix before their first barrier:
        # none may scan while the local leader is still removing stale files (they would disagree)
        from optsel import distributed

        distributed.barrier()
    source = _source(cfg, split)
    if _is_local(source):
        verify_split(source, cfg.verify_shards, cfg.validate_hash, cfg.allow_pickle)
    local = cache_root(cfg) / split
    local.mkdir(parents=True, exist_ok=True)
    try:
        stream = _CheckedStream(remote=source, local=str(local))
        dataset = StreamingDataset(streams=[stream], batch_size=batch_size, shuffle=shuffle,
                                   shuffle_seed=cfg.shuffle_seed, shuffle_algo=cfg.shuffle_algo,
                                   shuffle_block_size=cfg.shuffle_block_size,
                                   num_canonical_nodes=cfg.num_canonical_nodes, predownload=cfg.predownload,
                                   validate_hash=cfg.validate_hash, download_timeout=cfg.download_timeout)
        dataset.vocab_size = vocab_size
        if getattr(dataset, "_shm_prefix_int", None) is not None:
            _OWN_PREFIXES.add(int(dataset._shm_prefix_int))
        if not _is_local(source):  # remote: the index is known only now (local ones were checked above)
            for reader in getattr(dataset, "shards", []):
                check_columns({"column_names": reader.column_names, "column_encodings": reader.column_encodings},
                              Path(source) / "index.json", cfg.allow_pickle)
        return dataset
    except ValueError as err:
        if "Reused local directory" in str(err):
            raise RuntimeError(f"the streaming cache {local} is in use by another live job on this node; "
                               f"give this run its own data.cache_dir") from err
        raise


# -- batches ------------------------------------------------------------------------------------------
def collate(samples: Sequence[dict[str, Any]], pad_id: int, max_seq_len: int | None = None) -> Batch:
    """Samples (MDS rows) → the batch of docs/architecture.md, right-padded to the longest sample.

    input_ids / attention_mask / labels: [n, T] int64 (labels -100 on prompt and padding, unshifted);
    sample_id, kind_id: [n] int64. ``max_seq_len`` cuts longer samples; truncated: [n] bool, which were cut.
    """
    if not samples:
        raise ValueError("collate: no samples")
    full = [np.asarray(s["tokens"], dtype=np.int64) for s in samples]
    tokens = [t[:max_seq_len] for t in full]
    width = max(len(t) for t in tokens)
    n = len(samples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (toks, sample) in enumerate(zip(tokens, samples)):
        length = len(toks)
        row = torch.from_numpy(toks)
        input_ids[i, :length] = row
        attention_mask[i, :length] = 1
        start = min(int(sample["prompt_len"]), length)
        labels[i, start:length] = row[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "sample_id": torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.long),
            "kind_id": torch.tensor([int(s["kind_id"]) for s in samples], dtype=torch.long),
            "truncated": torch.tensor([len(t) < len(f) for t, f in zip(tokens, full)], dtype=torch.bool)}


def _pad_id(cfg: DataConfig) -> int:
    from optsel.pipeline.tokenizer import load_tokenizer

    return int(load_tokenizer(Path(cfg.local) / "tokenizer").pad_token_id)


def build_train_loader(cfg: DataConfig, per_rank_pool_size: int, rank_info: DistInfo | None = None,
                       pad_id: int | None = None, vocab_size: int | None = None):
    """A StreamingDataLoader over the train split yielding this rank's pool (a collated Batch).

    Every rank yields batches of exactly ``per_rank_pool_size`` samples (drop_last), the same number
    per epoch on every rank; iterating the loader again starts the next epoch. ``pad_id`` defaults to
    the prepared tokenizer's. The loader has ``state_dict()`` / ``load_state_dict()`` for exact resume.
    ``vocab_size``: token ids at or above it are a ShardError naming the shard and sample.
    """
    from optsel.pipeline.streaming_compat import StreamingDataLoader

    if per_rank_pool_size < 1:
        raise ValueError(f"per_rank_pool_size: must be >= 1, got {per_rank_pool_size}")
    rank_info = rank_info or dist_info()
    pad_id = _pad_id(cfg) if pad_id is None else pad_id
    dataset = _dataset(cfg, "train", rank_info, per_rank_pool_size, cfg.shuffle, vocab_size)
    if len(dataset) < per_rank_pool_size:
        raise ValueError(f"the train split under {_source(cfg, 'train')} gives {len(dataset)} samples per rank, "
                         f"fewer than one pool of {per_rank_pool_size}")
    return StreamingDataLoader(dataset, batch_size=per_rank_pool_size, num_workers=cfg.num_workers,
                               collate_fn=functools.partial(collate, pad_id=pad_id, max_seq_len=cfg.max_seq_len),
                               drop_last=True, persistent_workers=False)


def iterate_pools(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Pools forever: epoch after epoch (streaming advances the epoch on each new pass)."""
    while True:
        got = 0
        for pool in loader:
            got += 1
            yield pool
        if got == 0:
            raise RuntimeError("the train loader yields no full pool (too few samples per rank)")


def load_split(cfg: DataConfig, split: str = "val", rank_info: DistInfo | None = None,
               vocab_size: int | None = None) -> list[dict[str, Any]]:
    """Every sample of ``split`` in stored order (all ranks get all of it); for small splits (val).

    Goes through StreamingDataset like training (same cache, same hash checks); call it on every rank.
    """
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    dataset = _dataset(cfg, split, rank_info or dist_info(), batch_size=None, shuffle=False, vocab_size=vocab_size)
    try:
        return [dict(dataset.get_item(i)) for i in range(dataset.size)]
    finally:
        del dataset
        gc.collect()  # release the shared memory now, not at interpreter exit


def build_val_batches(cfg: DataConfig, pad_id: int | None = None, batch_size: int = 32,
                      rank_info: DistInfo | None = None, limit: int | None = None) -> list[Batch]:
    """This rank's share of the (first ``limit``) val samples as collated batches.

    Samples are dealt round-robin after trimming to a multiple of the world size, so every rank gets
    the same number of samples (and batches).
    """
    rank_info = rank_info or dist_info()
    pad_id = _pad_id(cfg) if pad_id is None else pad_id
    rows = load_split(cfg, "val", rank_info)[:limit]
    rows = rows[: len(rows) // rank_info.world_size * rank_info.world_size][rank_info.rank::rank_info.world_size]
    return [collate(rows[i:i + batch_size], pad_id, cfg.max_seq_len) for i in range(0, len(rows), batch_size)]
