"""Where the prepared shards are and how they are streamed: :class:`DataConfig` and the paths it
implies (the split's source, streaming's cache folder).

The prepared directory (``DataConfig.local``) is never modified: StreamingDataset reads the shards
from it as its ``remote`` (a plain path) and keeps its decompressed working copy in a cache directory
(``cache_dir``, default ``<tmp>/optsel-streaming-<uid>/<hash of the index>/``). Passing the prepared
dir as streaming's ``local`` with ``remote=None`` would make streaming decompress the shards next to
their ``.zstd`` files and delete the compressed originals, and later runs would then read the raw files
without any hash check. With a ``remote`` (e.g. ``s3://bucket/ds``) shards are downloaded into the
cache; ``local`` still holds ``tokenizer/`` and ``kinds.json``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def is_local(path: str) -> bool:
    return "://" not in path


def source_of(cfg: DataConfig, split: str) -> str:
    base = cfg.remote if cfg.remote is not None else cfg.local
    return os.path.join(base, split) if is_local(base) else f"{base.rstrip('/')}/{split}"


def cache_root(cfg: DataConfig) -> Path:
    """Streaming's working directory for this dataset (split subdirectories below it)."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    base = cfg.remote if cfg.remote is not None else cfg.local
    key = hashlib.sha1(os.path.abspath(base).encode() if is_local(base) else base.encode())
    if is_local(base):  # a new prepare (different shard hashes) gets a fresh cache
        for split in SPLITS:
            index = Path(base) / split / "index.json"
            if index.is_file():
                key.update(index.read_bytes())
    return Path(tempfile.gettempdir()) / f"optsel-streaming-{os.getuid()}" / key.hexdigest()[:16]
