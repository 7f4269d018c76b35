"""Where the prepared shards are and how they are streamed: :class:`DataConfig` and the paths it
implies (the split's source, streaming's cache folder).

The prepared directory (``DataConfig.local``) is never modified: StreamingDataset reads the shards
from it as its ``remote`` (a plain path) and keeps its decompressed working copy in a cache directory
(``cache_dir``, default ``$XDG_CACHE_HOME/optsel/streaming/<host>/<hash of the source and its index>/``, with
``~/.cache`` for an unset XDG_CACHE_HOME). Passing the prepared dir as streaming's ``local`` with
``remote=None`` would make streaming decompress the shards next to their ``.zstd`` files and delete the
compressed originals, and later runs would then read the raw files without any hash check. With a
``remote`` (e.g. ``s3://bucket/ds``) shards are downloaded into the cache; ``local`` still holds
``tokenizer/`` and ``kinds.json``.

Streaming reads what is in its cache without checking it again, so the cache is inside the trust
boundary: :func:`split_cache` creates its folders with mode 0700 and refuses one that is a symlink,
another user's, or group/world-writable; the data layer checks every cached file against the source's
index before streaming uses it (:mod:`optsel.pipeline.data.streaming_dataset`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from optsel.config_loader import ConfigError, mask_url
from optsel.pipeline.checkpoint.manager import file_digest

SPLITS = ("train", "val")
#: URL schemes mosaicml-streaming can download from (``streaming.base.storage.download``)
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "sftp", "dbfs", "alipan")
#: streaming's shuffle algorithms (``streaming.base.shuffle.algos``) and hashes it can validate with
SHUFFLE_ALGOS = ("py1br", "py1e", "py1s", "py2s", "naive")
HASHES = (
    "blake2b",
    "blake2s",
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sha3_224",
    "sha3_256",
    "sha3_384",
    "sha3_512",
    "xxh32",
    "xxh64",
    "xxh128",
    "xxh3_64",
    "xxh3_128",
)
#: a path component that is a URL scheme whose "//" was lost (``s3:/bucket``: a local folder "s3:")
_BROKEN_URL = re.compile(
    r"(?:^|/)((?:" + "|".join(re.escape(s) for s in (*REMOTE_SCHEMES, "file", "http", "https", "ftp")) + r"):)(?:/|$)",
    re.IGNORECASE,
)


@dataclass(kw_only=True)
class DataConfig:
    """Where the prepared shards are and how they are streamed."""

    local: str  #: the prepare out_dir: tokenizer/, kinds.json (and train/, val/ unless remote is set)
    remote: str | None = None  #: a remote copy of the prepare out_dir (s3://…, or a plain path)
    cache_dir: str | None = None  #: streaming's working copy; default: $XDG_CACHE_HOME/optsel/streaming/<key>
    shuffle: bool = True  #: shuffle the train stream
    shuffle_seed: int = 0  #: seed of streaming's shuffle
    shuffle_algo: str = "py1e"  #: streaming's shuffle algorithm
    shuffle_block_size: int | None = None  #: streaming's shuffle block size in samples (null: streaming's default)
    num_canonical_nodes: int | None = None  #: fix it to keep the sample order when the world size changes
    num_workers: int = 0  #: DataLoader worker processes per rank
    predownload: int | None = None  #: samples to fetch ahead per worker (streaming default when None)
    validate_hash: str | None = "xxh64"  #: streaming checks every shard it copies into the cache
    verify_shards: Literal["hash", "size", "none"] = "hash"  #: up-front check of local shards (names the file)
    max_seq_len: int | None = None  #: cut samples to this many tokens in collate (None: as prepared)
    download_timeout: float = 60.0  #: seconds per shard
    clean_stale_shm: bool = True  #: remove shared memory / file locks of crashed runs before starting
    allow_pickle: bool = False  #: shards with pickle-encoded columns (code runs on load) are refused unless true

    def __post_init__(self) -> None:
        if not self.local:
            raise ValueError("local: required (the directory written by `optsel prepare`)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2, got {self.max_seq_len}")
        if self.predownload is not None and self.predownload < 1:
            raise ValueError(f"predownload: must be >= 1, got {self.predownload}")
        if self.shuffle_seed < 0:
            raise ValueError(f"shuffle_seed: must be >= 0 (streaming takes no negative seed), got {self.shuffle_seed}")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            raise ValueError(f"shuffle_algo: must be one of {', '.join(SHUFFLE_ALGOS)}, got {self.shuffle_algo!r}")
        for name in ("shuffle_block_size", "num_canonical_nodes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (or unset), got {getattr(self, name)}")
        if not (math.isfinite(self.download_timeout) and self.download_timeout > 0):
            raise ValueError(f"download_timeout: must be a finite number of seconds > 0, got {self.download_timeout}")
        if self.validate_hash is not None and self.validate_hash not in HASHES:
            raise ValueError(f"validate_hash: must be one of {', '.join(HASHES)} (or null), got {self.validate_hash!r}")
        for name in ("local", "remote", "cache_dir"):
            broken = _BROKEN_URL.search(getattr(self, name) or "")
            if broken and "://" not in (getattr(self, name) or ""):
                raise ValueError(
                    f"{name}: {getattr(self, name)!r} has the path component {broken.group(1)!r}: a "
                    f"URL missing a slash ({broken.group(1)}/bucket/ds is a local folder named "
                    f"{broken.group(1)!r}); write {broken.group(1)}//bucket/ds"
                )
        if self.cache_dir is not None and "://" in self.cache_dir:
            raise ValueError("cache_dir: must be a local folder, got a URL")
        if self.remote is not None and self.remote.startswith("file://"):
            raise ValueError("remote: give a plain path, not a file:// URL (streaming needs that)")
        if self.remote is not None and "://" in self.remote:
            scheme = self.remote.split("://", 1)[0].lower()
            if scheme not in REMOTE_SCHEMES:
                raise ValueError(
                    f"remote: unsupported URL scheme {scheme!r} in {mask_url(self.remote)}; streaming "
                    f"reads {', '.join(REMOTE_SCHEMES)} URLs or a plain path"
                )


def is_local(path: str) -> bool:
    return "://" not in path


def source_of(cfg: DataConfig, split: str) -> str:
    base = cfg.remote if cfg.remote is not None else cfg.local
    return os.path.join(base, split) if is_local(base) else f"{base.rstrip('/')}/{split}"


def cache_root(cfg: DataConfig) -> Path:
    """Streaming's working directory for this dataset (split subdirectories below it); nothing is
    created (see :func:`split_cache`)."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    base = cfg.remote if cfg.remote is not None else cfg.local
    key = hashlib.sha1(os.path.abspath(base).encode() if is_local(base) else base.encode())
    if is_local(base):  # a new prepare (different shard hashes) gets a fresh cache
        for split in SPLITS:
            index = Path(base) / split / "index.json"
            if index.is_file():
                key.update(index.read_bytes())
    return default_cache_base() / key.hexdigest()[:16]


def default_cache_base() -> Path:
    """``$XDG_CACHE_HOME/optsel/streaming/<host>`` (``~/.cache/…`` when unset or relative). The host
    name keeps nodes apart where the home folder is one shared filesystem: each node's streaming leader
    writes its own working copy."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()).strip(".") or "host"
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "optsel" / "streaming" / host


def check_private(path: Path) -> None:
    """``path`` is a real folder (not a symlink) of this user that no one else may write; otherwise a
    ConfigError on data.cache_dir naming the folder and what is wrong."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        problem = f"is a symlink (to {os.readlink(path)})"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    elif info.st_mode & 0o022:
        problem = f"is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o}; chmod go-w it)"
    else:
        return
    raise ConfigError(
        "data.cache_dir",
        f"the streaming cache folder {path} {problem}; streaming reads the shards "
        f"in its cache without checking them again, so the cache must be a private "
        f"folder of this user (set data.cache_dir to one)",
    )


def split_cache(cfg: DataConfig, split: str) -> Path:
    """The split's cache folder, made top down: every folder optsel owns on the way (the cache folder,
    or ``optsel/streaming/<host>/<key>`` of the default, and any missing parent) is created with mode 0700 and
    must pass :func:`check_private` before anything is created inside it."""
    root = cache_root(cfg)
    first = root if cfg.cache_dir is not None else default_cache_base().parent.parent  # .../optsel
    folder = root / split
    chain = [p for p in reversed(first.parents) if not (p.exists() or p.is_symlink())]  # missing parents
    chain += [first] + [
        first.joinpath(*folder.relative_to(first).parts[:n]) for n in range(1, len(folder.relative_to(first).parts) + 1)
    ]
    for path in chain:
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # there already (or another local rank made it)
            pass
        except OSError as err:
            raise ConfigError(
                "data.cache_dir",
                f"cannot create the streaming cache folder {path} ({err.strerror}); "
                f"set data.cache_dir, or XDG_CACHE_HOME, to a folder this user can "
                f"write",
            ) from err
        check_private(path)
    return folder


def dataset_identity(cfg: DataConfig) -> dict[str, str]:
    """{split: SHA-256 of its index.json} of the data a run streams : the
    source's index for local data, streaming's downloaded copy for a remote. The index lists every
    shard with its size and hashes, so equal identities mean equal data. A split without an index
    (not yet downloaded) is left out."""
    out: dict[str, str] = {}
    for split in SPLITS:
        source = source_of(cfg, split)
        index = Path(source) / "index.json" if is_local(source) else cache_root(cfg) / split / "index.json"
        if index.is_file():
            out[split] = file_digest(index)
    return out
