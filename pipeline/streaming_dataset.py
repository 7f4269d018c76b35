"""The split as a mosaicml-streaming dataset: the rank environment streaming reads, the cleanup of
its shared memory, and a StreamingDataset/Stream pair that checks what it reads (see
:mod:`optsel.pipeline.shards`) and raises what streaming would hide.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from optsel.distributed import DistInfo
from optsel.pipeline.data_config import DataConfig, cache_root, is_local, source_of
from optsel.pipeline.shards import ShardError, check_basename, check_columns, sample_problem, verify_split

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


_CheckedStream = None
_CheckedStreamingDataset = None


def open_dataset(cfg: DataConfig, split: str, rank_info: DistInfo, batch_size: int | None, shuffle: bool,
             vocab_size: int | None = None):
    """The split's StreamingDataset for this rank (a checked one, see :func:`_checked_dataset_class`):
    the streaming environment agreed, stale shared memory swept, local shards verified up front."""
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
    source = source_of(cfg, split)
    if is_local(source):
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
        if not is_local(source):  # remote: the index is known only now (local ones were checked above)
            for reader in getattr(dataset, "shards", []):
                check_columns({"column_names": reader.column_names, "column_encodings": reader.column_encodings},
                              Path(source) / "index.json", cfg.allow_pickle)
        return dataset
    except ValueError as err:
        if "Reused local directory" in str(err):
            raise RuntimeError(f"the streaming cache {local} is in use by another live job on this node; "
                               f"give this run its own data.cache_dir") from err
        raise
