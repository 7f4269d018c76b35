"""What a prepared MDS split must be before the trainer reads it: the checks of the index (columns
and encodings, plain shard file names, file sizes and hashes) and of each decoded sample. Every
failure is a :class:`ShardError` naming the file (and the sample).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from optsel.pipeline import jsonio


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard; the message names the file."""


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
    index = jsonio.read_object(index_path, ShardError,
                               f"no MDS index at {index_path}: run `optsel prepare` (or check data.local/remote)",
                               f"corrupt MDS index {index_path}")
    if not isinstance(index.get("shards"), list):
        raise ShardError(f"corrupt MDS index {index_path}: no 'shards' list")
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
