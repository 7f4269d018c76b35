"""What a prepared MDS split must be before the trainer reads it: the checks of the index (entries,
sample counts against the shard files' own headers, columns and encodings, plain and unique shard file
names, file sizes and hashes), of each decoded sample, and a decompression that stops at the size the
index gives. Every failure is a :class:`ShardError` naming the file (and the key or the sample).
"""

from __future__ import annotations

import bz2
import hashlib
import os
import zlib
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np

from optsel.config_loader import mask_secrets
from optsel.pipeline.files import jsonio


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard; the message names the file (a remote's URL with its
    credentials masked)."""

    def __init__(self, message: str = ""):
        super().__init__(mask_secrets(str(message)))


#: columns the trainer reads → accepted MDS encodings
REQUIRED_COLUMNS = {
    "tokens": (
        "ndarray:int8",
        "ndarray:int16",
        "ndarray:int32",
        "ndarray:int64",
        "ndarray:uint8",
        "ndarray:uint16",
        "ndarray:uint32",
    ),
    "prompt_len": ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "int"),
    "sample_id": ("int32", "int64", "uint32", "uint64", "int"),
    "kind_id": ("int8", "int16", "int32", "int64", "uint8", "uint16", "int"),
}
PICKLE_ENCODINGS = ("pkl",)
#: an MDS shard starts with its sample count and count + 1 uint32 offsets, so it holds < 2**32 bytes
MAX_SHARD_BYTES = 2**32 - 1
#: the keys streaming's MDS reader needs in every ``shards`` entry of an index
ENTRY_KEYS = (
    "column_encodings",
    "column_names",
    "column_sizes",
    "compression",
    "format",
    "hashes",
    "raw_data",
    "samples",
    "size_limit",
    "version",
    "zip_data",
)


def check_columns(shard: dict[str, Any], index_path: Path, allow_pickle: bool = False) -> None:
    """The shard's columns hold what the trainer reads, with numeric encodings; pickle-encoded
    columns are refused unless ``allow_pickle`` (unpickling runs code from the file)."""
    encodings = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
    pickled = [name for name, enc in encodings.items() if enc in PICKLE_ENCODINGS]
    if pickled and not allow_pickle:
        raise ShardError(
            f"{index_path}: column(s) {pickled} are pickle-encoded; loading them can run code from the "
            f"file. Re-write the shards without pickle, or set data.allow_pickle=true if you trust them"
        )
    for name, allowed in REQUIRED_COLUMNS.items():
        if name not in encodings:
            raise ShardError(
                f"{index_path}: column '{name}' is missing (columns: {sorted(encodings)}); "
                f"write shards with `optsel prepare`"
            )
        if encodings[name] not in allowed:
            raise ShardError(
                f"{index_path}: column '{name}' has encoding '{encodings[name]}', expected one of {list(allowed)}"
            )


def check_basename(name: Any, index_path: Any) -> None:
    """A shard file name from an index must be a plain file name: streaming joins it to the cache
    folder and writes there, so ``../x`` or an absolute path would write anywhere."""
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or "/" in name
        or "\\" in name
        or ".." in name
        or "\x00" in name
        or name in (".", "~")
        or name.startswith("~")
    ):
        raise ShardError(
            f"{index_path}: shard file name {name!r} is not a plain file name (absolute, or contains "
            f"'/', '\\' or '..'); refusing the index (streaming would write outside its cache)"
        )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_file_info(info: Any, where: str) -> None:
    """A ``raw_data`` / ``zip_data`` entry: {basename, bytes in [0, 2**32), hashes: {algo: hex}}."""
    if not isinstance(info, dict):
        raise ShardError(f"{where} must be a mapping with basename, bytes and hashes, got {type(info).__name__}")
    size = info.get("bytes")
    if not _is_int(size) or not 0 <= size <= MAX_SHARD_BYTES:
        raise ShardError(f"{where}.bytes must be an integer in [0, {MAX_SHARD_BYTES}], got {size!r}")
    hashes = info.get("hashes", {})
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise ShardError(f"{where}.hashes must map hash names to hex strings, got {hashes!r:.80}")


def check_entry(shard: Any, index_path: Any, position: int) -> None:
    """One ``shards`` entry of an MDS index: a mapping with streaming's keys, plain file names, sizes in
    range and a ``samples`` count that the raw shard's size can hold (its header alone takes
    4 * (samples + 2) bytes), so that a crafted count cannot make streaming allocate terabytes."""
    where = f"{index_path}: shards[{position}]"
    if not isinstance(shard, dict):
        raise ShardError(f"{where} is a {type(shard).__name__}, not a mapping (corrupt index)")
    missing = [key for key in ENTRY_KEYS if key not in shard]
    if missing:
        raise ShardError(f"{where} lacks the key(s) {missing} (corrupt index, or not written by MDSWriter)")
    if shard["version"] != 2 or shard["format"] != "mds":
        raise ShardError(
            f"{where}: format {shard['format']!r} version {shard['version']!r}; optsel reads MDS "
            f"version 2 shards (written by `optsel prepare`)"
        )
    _check_file_info(shard["raw_data"], f"{where}.raw_data")
    check_basename(shard["raw_data"].get("basename"), index_path)
    if shard["zip_data"] is not None:
        _check_file_info(shard["zip_data"], f"{where}.zip_data")
        check_basename(shard["zip_data"].get("basename"), index_path)
        if not isinstance(shard["compression"], str):
            raise ShardError(f"{where}: zip_data is set but compression is {shard['compression']!r}")
    samples, size = shard["samples"], shard["raw_data"]["bytes"]
    if not _is_int(samples):
        raise ShardError(f"{where}.samples must be an integer, got {samples!r:.80}")
    most = max(size // 4 - 2, 0)
    if not 0 <= samples <= most:
        raise ShardError(
            f"{where}.samples is {samples}, outside [0, {most}]: a raw shard of {size} bytes "
            f"(raw_data.bytes) cannot hold more (corrupt or crafted index)"
        )


def check_index(index: dict[str, Any], index_path: Any) -> list[dict[str, Any]]:
    """The ``shards`` list of a parsed MDS index, each entry checked (:func:`check_entry`) and no shard
    file listed twice (streaming would read every sample of it twice)."""
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"corrupt MDS index {index_path}: no 'shards' list")
    seen: dict[str, int] = {}
    for position, shard in enumerate(shards):
        check_entry(shard, index_path, position)
        for info in (shard["raw_data"], shard["zip_data"]):
            if info is None:
                continue
            name = info["basename"]
            if name in seen:
                raise ShardError(
                    f"{index_path}: shard file {name!r} is listed twice (shards[{seen[name]}] and "
                    f"shards[{position}]); every sample in it would be read twice"
                )
            seen[name] = position
    return shards


def header_count(head: bytes, where: Any) -> int:
    """The sample count an MDS shard's header gives (its first 4 bytes, a little-endian uint32)."""
    if len(head) < 4:
        raise ShardError(f"{where} is too short to hold an MDS header ({len(head)} bytes)")
    return int.from_bytes(head[:4], "little")


def check_count(head: bytes, samples: int, where: Any, index_path: Any) -> None:
    """The index's ``samples`` of a shard equals the count in the shard's own header."""
    count = header_count(head, where)
    if count != samples:
        raise ShardError(
            f"{where} holds {count} samples (its header), but {index_path} says samples={samples}: "
            f"the index {'under-counts (samples would be dropped)' if samples < count else 'over-counts'}"
            f"; re-write it with `optsel prepare`"
        )


def _head(path: Path, n: int = 4) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def file_matches(path: Path, size: int, hashes: dict[str, str], algo: str | None, source: Path | None) -> bool:
    """Whether ``path`` (a cached copy) has ``size`` bytes and the index's hash (``algo`` if the index
    has it, else its first); without hashes in the index, the same sha256 as the ``source`` file. False
    when it cannot be told (no hashes, no readable source)."""

    from streaming.base.hashing import get_hash  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
        return False
    data = path.read_bytes()
    if hashes:
        name = algo if algo in hashes else sorted(hashes)[0]
        return get_hash(name, data) == hashes[name]
    if source is None or not source.is_file():
        return False
    return hashlib.sha256(data).digest() == hashlib.sha256(source.read_bytes()).digest()


def verify_split(
    split_dir: str | Path,
    mode: Literal["hash", "size", "none"] = "hash",
    algo: str | None = None,
    allow_pickle: bool = False,
) -> int:
    """Check that every shard listed in ``split_dir/index.json`` has the trainer's columns (no pickle
    unless allowed) and exists with its size (and hash; mode "none" checks columns only).

    Returns the number of samples. Raises ShardError naming the missing/truncated/corrupt file.
    """
    from optsel.pipeline.data.streaming_compat import MDSWriter  # noqa: PLC0415, F401  (registers `streaming`)

    # isort: split
    from streaming.base.hashing import get_hash  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    index = jsonio.read_object(
        index_path,
        ShardError,
        f"no MDS index at {index_path}: run `optsel prepare` (or check data.local/remote)",
        f"corrupt MDS index {index_path}",
    )
    total = 0
    for shard in check_index(index, index_path):
        total += shard["samples"]
        check_columns(shard, index_path, allow_pickle)
        if mode == "none":
            continue
        info = shard["zip_data"] or shard["raw_data"]
        path = split_dir / info["basename"]
        if not path.is_file():
            raise ShardError(f"shard file missing: {path} (listed in {index_path})")
        size = path.stat().st_size
        if size != int(info["bytes"]):
            raise ShardError(f"shard file {path} has {size} bytes, index says {info['bytes']} (truncated or replaced)")
        data = path.read_bytes() if mode == "hash" or shard["zip_data"] is not None else _head(path)
        if mode == "hash" and info.get("hashes"):
            name = algo if algo is not None and algo in info["hashes"] else sorted(info["hashes"])[0]
            if get_hash(name, data) != info["hashes"][name]:
                raise ShardError(f"shard file {path} fails its {name} check (corrupt)")
        raw_bytes = shard["raw_data"]["bytes"]
        if shard["zip_data"] is None:
            head = data
        else:
            check_declared_size(shard["compression"], data, raw_bytes, path)
            head = decompressed_head(shard["compression"], data, raw_bytes, path)
        check_count(head, shard["samples"], path, index_path)
    return total


# -- bounded decompression ----------------------------------------------------------------------------
_ZSTD_MAGIC = 0xFD2FB528


def _zstd_frames(data: bytes):
    """(declared content size or None, offset of the first block, frame header descriptor) of each
    zstd frame in ``data`` (RFC 8878), skipping skippable frames; ValueError on malformed frames."""
    pos = 0
    while pos < len(data):
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame: magic, 4-byte size, payload
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC or pos + 5 > len(data):
            raise ValueError(f"not a zstd frame at byte {pos}")
        fhd = data[pos + 4]
        single, fcs_flag = (fhd >> 5) & 1, fhd >> 6
        header = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        fcs_len = ((1 if single else 0), 2, 4, 8)[fcs_flag]
        content = None
        if fcs_len:
            content = int.from_bytes(data[header : header + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        first_block = pos = header + fcs_len
        while True:  # blocks: a 3-byte header (last bit, type, size), then the block's bytes
            if pos + 3 > len(data):
                raise ValueError("truncated zstd frame")
            block = int.from_bytes(data[pos : pos + 3], "little")
            kind, size = (block >> 1) & 3, block >> 3
            if kind == 3:
                raise ValueError("reserved zstd block type")
            pos += 3 + (1 if kind == 1 else size)
            if block & 1:
                break
        pos += 4 * ((fhd >> 2) & 1)  # content checksum
        if pos > len(data):
            raise ValueError("truncated zstd frame")
        yield content, first_block, fhd


def _zstd_size(data: bytes, where: Any) -> int:
    """The decompressed size all zstd frames of ``data`` declare (ShardError if a frame declares none)."""
    try:
        sizes = [content for content, _, _ in _zstd_frames(data)]
    except ValueError as err:
        raise ShardError(f"{where}: not a valid zstd file ({err})") from err
    if any(size is None for size in sizes):
        raise ShardError(
            f"{where}: a zstd frame does not declare its decompressed size, so its decompression "
            f"cannot be bounded; re-compress it with MDSWriter (`optsel prepare`)"
        )
    return sum(sizes)


def check_declared_size(compression: str, data: bytes, limit: int, where: Any) -> None:
    """Without decompressing: a zstd shard declares exactly ``limit`` (the index's raw_data.bytes)."""
    if compression.split(":")[0] == "zstd":
        size = _zstd_size(data, where)
        if size != limit:
            raise ShardError(
                f"{where} would decompress to {size} bytes, but its index says raw_data.bytes={limit} "
                f"({'a decompression bomb' if size > limit else 'corrupt'}); refusing to decompress it"
            )


def _bomb(where: Any, limit: int) -> ShardError:
    return ShardError(
        f"{where} decompresses to more than the {limit} bytes its index gives (raw_data.bytes): "
        f"a decompression bomb or a corrupt index; stopped, nothing written"
    )


def _stream_decompress(make, data: bytes, limit: int, where: Any) -> bytes:
    """gzip / bzip2 (possibly multi-member): decompress at most ``limit + 1`` bytes, then stop."""
    out, rest = bytearray(), data
    while rest:
        decompressor = make()
        out += decompressor.decompress(rest, limit + 1 - len(out))
        if len(out) > limit:
            raise _bomb(where, limit)
        if not decompressor.eof:
            raise ShardError(f"{where}: truncated compressed data")
        rest = decompressor.unused_data
    return bytes(out)


def decompress_bounded(compression: str, data: bytes, limit: int, where: Any) -> bytes:
    """``data`` decompressed, never more than ``limit`` bytes (the index's raw_data.bytes): zstd frames
    must declare their size (checked before decompressing), gzip / bzip2 are decompressed in steps that
    stop past ``limit``, snappy's length prefix is read first, brotli's output buffer is capped."""
    algo = compression.split(":")[0]
    try:
        if algo == "zstd":
            import zstd  # noqa: PLC0415 - optional compression codec

            if _zstd_size(data, where) > limit:
                raise _bomb(where, limit)
            out = zstd.decompress(data)
        elif algo == "gz":
            out = _stream_decompress(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), data, limit, where)
        elif algo == "bz2":
            out = _stream_decompress(bz2.BZ2Decompressor, data, limit, where)
        elif algo == "snappy":
            import snappy  # noqa: PLC0415 - optional compression codec

            declared, shift = 0, 0
            for byte in data[:10]:  # the uncompressed length, a varint
                declared |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            if declared > limit:
                raise _bomb(where, limit)
            out = snappy.decompress(data)
        elif algo == "br":
            import brotli  # noqa: PLC0415 - optional compression codec

            decompressor = brotli.Decompressor()
            out = decompressor.process(data, output_buffer_limit=limit + 1)
            if len(out) > limit or not decompressor.is_finished():
                raise _bomb(where, limit) if len(out) > limit else ShardError(f"{where}: truncated brotli data")
        else:
            raise ShardError(f"{where}: unsupported compression {compression!r}")
    except ShardError:
        raise
    except Exception as err:  # noqa: BLE001 - the decompressors' own errors
        raise ShardError(f"{where}: cannot be decompressed as {compression} ({type(err).__name__}: {err})") from err
    if len(out) > limit:
        raise _bomb(where, limit)
    return out


def decompressed_head(compression: str, data: bytes, limit: int, where: Any, n: int = 4) -> bytes:
    """The first ``n`` decompressed bytes (an MDS header) of a shard. zstd: only its first block is
    decompressed (as a one-block frame); other compressions: the whole shard, bounded by ``limit``."""
    if compression.split(":")[0] == "zstd":
        try:
            import zstd  # noqa: PLC0415 - optional compression codec

            _, first, fhd = next(_zstd_frames(data))
            block = int.from_bytes(data[first : first + 3], "little")
            kind, size = (block >> 1) & 3, block >> 3
            if kind == 0:
                return data[first + 3 : first + 3 + n]
            if kind == 1:
                return data[first + 3 : first + 4] * min(n, size)
            if not fhd & 3:  # no dictionary: the first block decodes alone
                one = (block | 1).to_bytes(3, "little") + data[first + 3 : first + 3 + size]
                return zstd.decompress(_ZSTD_MAGIC.to_bytes(4, "little") + bytes([0, 0x38]) + one)[:n]
        except Exception:  # noqa: BLE001 - fall back to the bounded full decompression
            pass
    return decompress_bounded(compression, data, limit, where)[:n]


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
            return (
                f"token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
                if vocab_size is not None
                else f"token id {bad} is negative"
            )
    prompt_len = int(sample["prompt_len"])
    if not 0 <= prompt_len <= tokens.size:
        return f"prompt_len {prompt_len} is outside [0, length {tokens.size}]"
    return ""
