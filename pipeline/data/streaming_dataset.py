"""The split as a mosaicml-streaming dataset: the rank environment streaming reads, the cleanup of
its shared memory, the streaming cache checked against the source, and a StreamingDataset/Stream pair
that checks what it reads (see :mod:`optsel.pipeline.data.shards`) and raises what streaming would hide.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from optsel import distributed
from optsel.distributed import DistInfo
from optsel.pipeline.data.config import DataConfig, is_local, source_of, split_cache
from optsel.pipeline.data.shards import (
    ShardError,
    check_columns,
    check_count,
    check_index,
    decompress_bounded,
    file_matches,
    sample_problem,
    verify_split,
)
from optsel.pipeline.data.shm_cleanup import clean_stale_streaming_state
from optsel.pipeline.files import jsonio

log = logging.getLogger("optsel.data")

_CLEAN_AT_EXIT = False
#: streaming shm prefixes of the datasets this process made (the exit cleanup touches only these)
_OWN_PREFIXES: set[int] = set()


def _clean_at_exit() -> None:
    """Registered at import, so it runs after streaming's own atexit handlers (LIFO) have unmapped and
    unlinked this process's shared memory: then the file locks of *this process's* prefixes in /tmp can
    go too. Other prefixes are left alone (a job starting on the same node may have just created
    them); crashed runs' leftovers are swept at the next start, with the age guard."""
    if _CLEAN_AT_EXIT and _OWN_PREFIXES:
        try:
            clean_stale_streaming_state(only_prefixes=set(_OWN_PREFIXES))
        except Exception:  # never fail an exiting process over housekeeping
            pass


atexit.register(_clean_at_exit)


# -- distributed environment for streaming ------------------------------------------------------------
def _streaming_env(rank_info: DistInfo) -> None:
    """Streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment: make them agree."""
    env = os.environ
    for key, value in (
        ("RANK", rank_info.rank),
        ("WORLD_SIZE", rank_info.world_size),
        ("LOCAL_RANK", rank_info.local_rank),
    ):
        if env.get(key) in (None, ""):
            env[key] = str(value)
        elif int(env[key]) != value:
            raise RuntimeError(f"environment {key}={env[key]} disagrees with the process group ({value})")
    if env.get("LOCAL_WORLD_SIZE") in (None, ""):
        guess = env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if not guess and rank_info.world_size == 1:
            guess = "1"
        if not guess:
            raise RuntimeError(
                "LOCAL_WORLD_SIZE is not set: launch with torchrun or the deepspeed launcher, "
                "or export LOCAL_WORLD_SIZE (ranks per node)"
            )
        env["LOCAL_WORLD_SIZE"] = guess
    if rank_info.world_size % int(env["LOCAL_WORLD_SIZE"]):
        raise RuntimeError(
            f"LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']} does not divide the world size {rank_info.world_size}"
        )


def fresh_index(source: str, local: Path) -> None:
    """Before streaming opens the split (local leader): streaming uses a cached ``index.json`` as it
    finds it, so a local source's copy that differs from the source's is removed (with a warning) and a
    remote one's always (it is small); streaming then copies the source's."""
    cached = local / "index.json"
    if not (cached.exists() or cached.is_symlink()):
        return
    if is_local(source):
        origin = Path(source) / "index.json"
        if not cached.is_symlink() and cached.is_file() and cached.read_bytes() == origin.read_bytes():
            return
        log.warning(
            "streaming cache %s: its index.json is not the source's %s (a stale or foreign copy); removed, "
            "it is copied again",
            local,
            origin,
        )
    cached.unlink()


def _checked_dataset_class() -> type[Any]:
    """StreamingDataset that checks what it reads and raises what streaming would hide.

    - its Stream checks the index it reads (entries, sample counts, plain and unique file names; see
      :func:`~optsel.pipeline.data.shards.check_index`) before any shard file is touched, local and remote
      sources alike; before streaming counts the cached shards as present, every cached file whose
      size or hash disagrees with that index is removed (streaming copies it again); a shard is
      decompressed only up to its index's raw size, and a copied shard's header must hold its index's
      sample count;
    - ``get_item`` names the shard file and the sample when a sample does not decode, or when its
      tokens fall outside [0, vocab_size) or its ``prompt_len`` outside [0, len(tokens)];
    - a failure of the background download/validation thread is raised at the end of the pass
      (streaming itself only *ends the epoch early*, which would silently shorten training).
    """
    from optsel.pipeline.data.streaming_compat import Stream, StreamingDataset  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

    global _CheckedStreamingDataset, _CheckedStream
    if _CheckedStreamingDataset is None:

        class CheckedStream(Stream):
            #: shard file name -> (streaming's FileInfo of its raw file, its sample count)
            _expected: dict[str, tuple[Any, int]]

            @property
            def _index_path(self) -> str:
                return f"{self.remote or self.local}/{self.split or ''}".rstrip("/") + "/index.json"

            def _check_index(self) -> None:
                cached = Path(self.local, self.split, "index.json")
                check_index(
                    jsonio.read_object(
                        cached,
                        ShardError,
                        f"no MDS index at {self._index_path}",
                        f"corrupt MDS index {self._index_path}",
                    ),
                    self._index_path,
                )

            def get_shards(self, world, allow_unsafe_types):
                try:
                    shards = super().get_shards(world, allow_unsafe_types)
                except Exception:
                    if Path(self.local, self.split, "index.json").is_file():
                        self._check_index()  # names the entry when the index is what streaming failed on
                    raise
                self._check_index()
                self._expected = {
                    info.basename: (raw, reader.samples)
                    for reader in shards
                    for raw, zipped in reader.file_pairs
                    for info in (raw, zipped)
                    if info is not None
                }
                return shards

            def _source_file(self, basename: str) -> Path | None:
                return Path(self.remote, self.split, basename) if self.remote and is_local(self.remote) else None

            def set_up_local(self, shards, cache_usage_per_shard) -> None:
                for reader in shards:
                    for raw, zipped in reader.file_pairs:
                        for info in (raw, zipped):
                            path = Path(self.local, self.split, info.basename) if info is not None else None
                            if path is None or not (path.exists() or path.is_symlink()):
                                continue
                            if not file_matches(
                                path, info.bytes, info.hashes, self.validate_hash, self._source_file(info.basename)
                            ):
                                log.warning(
                                    "streaming cache: %s does not match the source's index %s (size or "
                                    "hash); removed, it is copied again",
                                    path,
                                    self._index_path,
                                )
                                path.unlink()
                super().set_up_local(shards, cache_usage_per_shard)

            def _decompress_shard_part(self, zip_info, zip_filename, raw_filename, compression) -> None:
                raw_info, samples = self._expected[zip_info.basename]
                where = f"shard {self._index_path.removesuffix('index.json')}{zip_info.basename}"
                data = Path(zip_filename).read_bytes()
                if self.validate_hash:
                    from streaming.base.hashing import get_hash  # noqa: PLC0415 - heavy: mosaicml-streaming, imported when shards are read or written

                    if self.validate_hash not in zip_info.hashes:
                        raise ShardError(
                            f"{where}: data.validate_hash={self.validate_hash} but its index has only "
                            f"{sorted(zip_info.hashes)} hashes; choose one of those"
                        )
                    if get_hash(self.validate_hash, data) != zip_info.hashes[self.validate_hash]:
                        raise ShardError(
                            f"Checksum failure: {zip_filename} ({where}) fails its {self.validate_hash} check"
                        )
                raw = decompress_bounded(compression, data, raw_info.bytes, where)
                if len(raw) != raw_info.bytes:
                    raise ShardError(f"{where} decompresses to {len(raw)} bytes, its index says {raw_info.bytes}")
                check_count(raw, samples, where, self._index_path)
                tmp = raw_filename + ".tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(raw)
                os.rename(tmp, raw_filename)
                if not self.safe_keep_zip:
                    os.remove(zip_filename)

            def _prepare_shard_part(self, raw_info, zip_info=None, compression=None) -> int:
                delta = super()._prepare_shard_part(raw_info, zip_info, compression)
                if zip_info is None:  # a copied raw shard (decompressed ones were checked above)
                    path = Path(self.local, self.split, raw_info.basename)
                    where = f"shard {self._index_path.removesuffix('index.json')}{raw_info.basename}"
                    if path.stat().st_size != raw_info.bytes:
                        raise ShardError(f"{where} has {path.stat().st_size} bytes, its index says {raw_info.bytes}")
                    with open(path, "rb") as f:
                        head = f.read(4)
                    check_count(head, self._expected[raw_info.basename][1], where, self._index_path)
                return delta

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
                    raise ShardError(
                        f"{self._where(sample_id)}: cannot be decoded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); the shard's hash may "
                        f"match its index but its contents are not valid MDS samples"
                    ) from err
                problem = sample_problem(sample, self.vocab_size)
                if problem:
                    sid = sample.get("sample_id") if isinstance(sample, dict) else None
                    raise ShardError(
                        f"{self._where(sample_id)}" + (f", sample_id {sid}" if sid is not None else "") + f": {problem}"
                    )
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


_CheckedStream: type[Any] | None = None
_CheckedStreamingDataset: type[Any] | None = None


def open_dataset(
    cfg: DataConfig,
    split: str,
    rank_info: DistInfo,
    batch_size: int | None,
    shuffle: bool,
    vocab_size: int | None = None,
):
    """The split's StreamingDataset for this rank (a checked one, see :func:`_checked_dataset_class`):
    the streaming environment agreed, stale shared memory swept, local shards verified up front."""
    StreamingDataset = _checked_dataset_class()

    _streaming_env(rank_info)
    if cfg.clean_stale_shm:
        global _CLEAN_AT_EXIT
        _CLEAN_AT_EXIT = True
        if rank_info.local_rank == 0:
            clean_stale_streaming_state()
        # streaming's ranks each scan /dev/shm for the next free prefix before their first barrier:
        # none may scan while the local leader is still removing stale files (they would disagree);
        # the barrier below (after the cache check) keeps them apart
    source = source_of(cfg, split)
    if is_local(source):
        verify_split(source, cfg.verify_shards, cfg.validate_hash, cfg.allow_pickle)
    local = split_cache(cfg, split)
    if rank_info.local_rank == 0:
        fresh_index(source, local)

    distributed.barrier()  # no rank reads the cached index before the local leader has checked it
    try:
        assert _CheckedStream is not None  # made with the dataset class above
        stream = _CheckedStream(remote=source, local=str(local))
        dataset = StreamingDataset(
            streams=[stream],
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=cfg.shuffle_seed,
            shuffle_algo=cfg.shuffle_algo,
            shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes,
            predownload=cfg.predownload,
            validate_hash=cfg.validate_hash,
            download_timeout=cfg.download_timeout,
        )
        dataset.vocab_size = vocab_size
        if getattr(dataset, "_shm_prefix_int", None) is not None:
            _OWN_PREFIXES.add(int(dataset._shm_prefix_int))
        if not is_local(source):  # remote: the index is known only now (local ones were checked above)
            for reader in getattr(dataset, "shards", []):
                check_columns(
                    {"column_names": reader.column_names, "column_encodings": reader.column_encodings},
                    Path(source) / "index.json",
                    cfg.allow_pickle,
                )
        return dataset
    except ValueError as err:
        if "Reused local directory" in str(err):
            raise RuntimeError(
                f"the streaming cache {local} is in use by another live job on this node; "
                f"give this run its own data.cache_dir"
            ) from err
        raise
