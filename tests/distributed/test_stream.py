"""The streaming side on real MDS shards: collate, loaders, 2 real ranks, corrupt shards, stale shm."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from optsel.distributed import DistInfo
from optsel.pipeline.data import loaders as data_lib
from optsel.pipeline.data.collate import collate
from optsel.pipeline.data.config import DataConfig
from optsel.pipeline.data.loaders import build_train_loader, iterate_pools, load_split
from optsel.pipeline.data.prepare import PrepareConfig, prepare
from optsel.pipeline.data.shards import ShardError, verify_split
from optsel.pipeline.data.shm_cleanup import clean_stale_streaming_state, live_shm_names
from optsel.pipeline.data.synthetic import SyntheticConfig

from support.dist import run_distributed

NUM_TRAIN, NUM_VAL = 96, 24
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "ds"
    prepare(
        PrepareConfig(
            out_dir=str(out),
            synthetic=SyntheticConfig(num_train=NUM_TRAIN, num_val=NUM_VAL),
            max_seq_len=32,
            size_limit=1024,
        )
    )
    yield out
    gc.collect()  # drop this process's finished datasets (their shared memory goes with them)
    clean_stale_streaming_state(
        min_age_s=0
    )  # our file locks and crashed children's leftovers; live jobs kept  # our finished datasets' file locks (live jobs are kept)


@pytest.fixture(autouse=True)
def single_rank_env(monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)


def test_collate_masks_prompt_and_padding():
    samples = [
        {"tokens": np.array([5, 6, 7, 8, 2], np.int32), "prompt_len": 3, "sample_id": 11, "kind_id": 0},
        {"tokens": np.array([9, 10, 2], np.int32), "prompt_len": 1, "sample_id": 12, "kind_id": 3},
    ]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, 10, 2, -100, -100]]
    assert batch["sample_id"].tolist() == [11, 12] and batch["kind_id"].tolist() == [0, 3]
    assert all(v.dtype == torch.int64 for k, v in batch.items() if k != "truncated")
    assert batch["truncated"].tolist() == [False, False]
    cut = collate(samples, pad_id=0, max_seq_len=4)
    assert cut["input_ids"].shape == (2, 4) and cut["labels"][0].tolist() == [-100, -100, -100, 8]
    assert cut["truncated"].tolist() == [True, False]


def test_train_loader_pools_epochs_and_val(dataset_dir, tmp_path):
    cfg = DataConfig(local=str(dataset_dir), cache_dir=str(tmp_path / "cache"), shuffle_seed=1)
    assert data_lib.kinds(dataset_dir)["target"] == 0
    before = sorted(p.name for p in (dataset_dir / "train").iterdir())
    loader = build_train_loader(cfg, per_rank_pool_size=16, rank_info=SINGLE)
    pools = iterate_pools(loader)
    epoch0 = [next(pools) for _ in range(NUM_TRAIN // 16)]
    epoch1 = [next(pools) for _ in range(NUM_TRAIN // 16)]
    for pool in epoch0 + epoch1:
        assert pool["input_ids"].shape[0] == 16 and int(pool["attention_mask"].sum(1).min()) > 0
        labelled = pool["labels"] != -100
        assert labelled.any(1).all() and (pool["input_ids"][labelled] == pool["labels"][labelled]).all()
    ids0 = torch.cat([p["sample_id"] for p in epoch0]).tolist()
    ids1 = torch.cat([p["sample_id"] for p in epoch1]).tolist()
    assert sorted(ids0) == sorted(ids1) == list(range(NUM_TRAIN)) and ids0 != ids1  # reshuffled per epoch
    pools.close()
    del pools, loader
    assert sorted(p.name for p in (dataset_dir / "train").iterdir()) == before  # source shards untouched

    val = load_split(cfg, "val", SINGLE)
    assert [int(r["sample_id"]) for r in val] == list(range(NUM_TRAIN, NUM_TRAIN + NUM_VAL))
    assert {r["kind"] for r in val} == {"target"}
    batches = data_lib.build_val_batches(cfg, batch_size=10, rank_info=SINGLE)
    assert [b["input_ids"].shape[0] for b in batches] == [10, 10, 4]


def _rank_epoch(rank: int, world_size: int, local: str, cache: str) -> list[int]:
    from optsel import distributed

    cfg = DataConfig(local=local, cache_dir=cache, shuffle_seed=7)
    loader = build_train_loader(cfg, per_rank_pool_size=8, rank_info=distributed.info())
    return [int(i) for pool in loader for i in pool["sample_id"]]


@pytest.mark.distributed
def test_two_ranks_read_disjoint_complete_deterministic_halves(dataset_dir, tmp_path):
    runs = [
        run_distributed(_rank_epoch, 2, args=(str(dataset_dir), str(tmp_path / f"cache{i}")), timeout_s=90)
        for i in range(2)
    ]
    rank0, rank1 = runs[0]
    assert len(rank0) == len(rank1) == NUM_TRAIN // 2
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == list(range(NUM_TRAIN))
    assert runs[1] == runs[0]  # same seed, fresh cache, fresh processes: same order


def test_corrupt_truncated_and_missing_shards_are_named(dataset_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dataset_dir, bad)
    shards = sorted((bad / "train").glob("shard.*.mds.zstd"))
    blob = bytearray(shards[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(blob))
    cfg = DataConfig(local=str(bad), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ShardError, match=rf"{shards[0]} fails its xxh64 check"):
        build_train_loader(cfg, 8, SINGLE)
    # without the up-front check, streaming's own validate_hash catches it when it copies the shard
    unchecked = DataConfig(local=str(bad), cache_dir=str(tmp_path / "cache2"), verify_shards="none", shuffle=False)
    with pytest.raises(ShardError, match="streaming stopped early on .*Checksum failure"):
        for _ in build_train_loader(unchecked, 8, SINGLE):
            pass
    shards[1].write_bytes(shards[1].read_bytes()[:-5])
    with pytest.raises(ShardError, match=rf"{shards[1]} has \d+ bytes, index says"):
        verify_split(bad / "train", "size")
    shards[1].unlink()
    with pytest.raises(ShardError, match=rf"shard file missing: {shards[1]}"):
        verify_split(bad / "train", "size")
    with pytest.raises(ShardError, match="no MDS index at"):
        load_split(DataConfig(local=str(tmp_path / "nowhere")), "val", SINGLE)
    for text, why in (
        ("[1, 2]", "must hold a JSON object"),
        ('{"version": 2}', "no 'shards' list"),
        ("{not json", "corrupt MDS index"),
    ):
        (bad / "train" / "index.json").write_text(text)
        with pytest.raises(ShardError, match=f"corrupt MDS index {bad / 'train' / 'index.json'}.*{why}|{why}"):
            verify_split(bad / "train", "size")
    with pytest.raises(FileNotFoundError, match="kinds.json not found"):
        data_lib.kinds(tmp_path / "nowhere")


def _open_and_die(local: str, cache: str, ready) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cfg = DataConfig(local=local, cache_dir=cache, clean_stale_shm=False)
    loader = build_train_loader(cfg, 8, SINGLE)
    next(iter(loader))
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup of shared memory


def test_stale_shared_memory_of_a_crashed_run_is_cleaned_live_kept(dataset_dir, tmp_path):
    cfg = DataConfig(local=str(dataset_dir), cache_dir=str(tmp_path / "cache"), clean_stale_shm=False)
    live_loader = build_train_loader(DataConfig(local=str(dataset_dir), cache_dir=str(tmp_path / "live")), 8, SINGLE)
    live_epoch = iter(live_loader)
    next(live_epoch)  # mid-epoch: its shared memory is in use
    live_before = {n for n in live_shm_names() if n.endswith("_locals")}
    shm_before = set(os.listdir("/dev/shm"))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_open_and_die, args=(str(dataset_dir), cfg.cache_dir, ready))
    proc.start()
    proc.join(60)
    assert ready.is_set() and proc.exitcode == -signal.SIGKILL
    leaked = {n for n in set(os.listdir("/dev/shm")) - shm_before if n[:6].isdigit()}
    assert any(n.endswith("_locals") for n in leaked) and not leaked & live_shm_names()
    removed = clean_stale_streaming_state(min_age_s=0)
    assert {f"/dev/shm/{n}" for n in leaked} <= set(removed)
    prefix = next(iter(leaked))[:6]
    assert not any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
    assert not [n for n in os.listdir("/tmp") if n.startswith(prefix + "_")]  # its file locks too
    assert live_before and live_before <= set(os.listdir("/dev/shm"))  # the live dataset's memory is kept
    assert not any(Path(p).name in live_before for p in removed)
    assert len(list(build_train_loader(cfg, 8, SINGLE))) == NUM_TRAIN // 8  # the crashed run's cache works
    assert len(list(live_epoch)) == NUM_TRAIN // 8 - 1
    del live_epoch, live_loader
