"""Untrusted data and shared caches (the data rows of the security issue; docs/reliability.md): a
dataset whose tokenizer asks to run code, a model folder that does, a streaming cache that holds another
dataset's files or is not private, an index that miscounts or repeats its shards, a decompression bomb,
values that used to crash with a raw traceback (bad sample counts, entries, kinds.json, a pool larger
than the split, a missing data.local) and config values streaming cannot use.

Real components only: datasets prepared by ``optsel prepare`` (the ``prepare_synthetic`` fixture) and
shards written with streaming's MDSWriter, real transformers loaders, real StreamingDatasets, real runs
of ``optsel.launch.train`` where the finding is what the command prints.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optsel.distributed import DistInfo

from support.common import REPO
from support.common import cli_env as _env
from support.common import run_train as _train

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)
VAL_COLUMNS = {"tokens": "ndarray:int32", "prompt_len": "int32", "sample_id": "int64", "kind_id": "int32"}


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("untrusted-data", num_train=512, num_val=64)


@pytest.fixture
def single_rank_env(monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)


def _cfg(local: Path, cache: Path | None, **kw):
    from optsel.pipeline.data.config import DataConfig

    return DataConfig(local=str(local), cache_dir=None if cache is None else str(cache), clean_stale_shm=False, **kw)


def _rows(data_dir: Path, cache: Path) -> list[dict]:
    from optsel.pipeline.data.loaders import load_split

    return [
        {
            "tokens": np.asarray(r["tokens"], dtype=np.int32),
            "prompt_len": int(r["prompt_len"]),
            "sample_id": int(r["sample_id"]),
            "kind_id": int(r["kind_id"]),
        }
        for r in load_split(_cfg(data_dir, cache), "val", SINGLE)
    ]


def _copy_with_val(data_dir: Path, dest: Path, rows: list[dict]) -> Path:
    """A copy of the prepared dataset whose val split holds ``rows`` (MDSWriter, raw shards, xxh64)."""
    from optsel.pipeline.data.streaming_compat import MDSWriter

    shutil.copytree(data_dir, dest, ignore=shutil.ignore_patterns("val"))
    with MDSWriter(out=str(dest / "val"), columns=VAL_COLUMNS, compression=None, hashes=["xxh64"]) as writer:
        for row in rows:
            writer.write(row)
    return dest


def _edit_index(split: Path, edit) -> None:
    index = json.loads((split / "index.json").read_text())
    edit(index)
    (split / "index.json").write_text(json.dumps(index))


def _run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose stdin answers "y" (to transformers' "run the custom code?")."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=_env(**env),
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=180,
    )


# -- 1. a dataset (or model folder) cannot run code --------------------------------------------------------
_EVIL = "from pathlib import Path\nPath({marker!r}).write_text('code ran')\n{body}"


def test_tokenizer_with_auto_map_is_refused_and_runs_no_code(data_dir, tmp_path):
    tok = tmp_path / "tokenizer"
    shutil.copytree(data_dir / "tokenizer", tok)
    marker = tmp_path / "marker"
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizerFast", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizerFast"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "evil.py").write_text(
        _EVIL.format(
            marker=str(marker),
            body=(
                "from transformers import PreTrainedTokenizerFast\n"
                "class EvilTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
            ),
        )
    )
    done = _run_python(
        "import sys; from optsel.pipeline.data.tokenizer import load_tokenizer; load_tokenizer(sys.argv[1])",
        str(tok),
        HF_MODULES_CACHE=str(tmp_path / "hf-modules"),
    )
    assert not marker.exists(), "the tokenizer's code ran"
    assert done.returncode != 0
    assert f"{tok / 'tokenizer_config.json'} has an 'auto_map' entry" in done.stderr, done.stderr[-2000:]
    assert "config key 'data.local'" in done.stderr and "never runs code from a dataset" in done.stderr


def test_model_folder_with_auto_map_is_refused_and_runs_no_code(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "marker"
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
            }
        )
    )
    (model / "evil.py").write_text(
        _EVIL.format(
            marker=str(marker),
            body=(
                "from transformers import PretrainedConfig\n"
                "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
            ),
        )
    )
    code = (
        "import sys; from optsel.pipeline.train.model import ModelConfig, build_model; "
        "build_model(ModelConfig(source='local', path=sys.argv[1]), 259, 0, 1, 2)"
    )
    done = _run_python(code, str(model), HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    assert not marker.exists(), "the model folder's code ran"
    assert done.returncode != 0
    assert f"config key 'model.path': {model / 'config.json'} has an 'auto_map' entry" in done.stderr, done.stderr[
        -2000:
    ]


# -- 2. the streaming cache is part of the trust boundary ---------------------------------------------------
def test_a_cache_holding_another_datasets_files_is_checked_against_the_source(
    data_dir, tmp_path, single_rank_env, caplog
):
    """A cache filled from another dataset (its index.json and raw shard), or only its raw shard put in
    place of ours: the run reads the source's samples, and says what it removed."""
    cache = tmp_path / "cache"
    truth = _rows(data_dir, tmp_path / "own-cache")
    other_rows = [dict(r, tokens=r["tokens"][::-1].copy(), sample_id=r["sample_id"] + 1000) for r in truth]
    other = _copy_with_val(data_dir, tmp_path / "other", other_rows)
    assert _rows(other, cache)[0]["sample_id"] == truth[0]["sample_id"] + 1000  # the cache now holds other's files
    with caplog.at_level(logging.WARNING, logger="optsel.data"):
        rows = _rows(data_dir, cache)
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in truth]
    assert rows[0]["tokens"].tolist() == truth[0]["tokens"].tolist()
    assert "its index.json is not the source's" in caplog.text
    caplog.clear()
    shutil.copy(other / "val" / "shard.00000.mds", cache / "val" / "shard.00000.mds")  # a foreign raw shard
    with caplog.at_level(logging.WARNING, logger="optsel.data"):
        rows = _rows(data_dir, cache)
    assert rows[0]["tokens"].tolist() == truth[0]["tokens"].tolist()
    assert f"{cache / 'val' / 'shard.00000.mds'} does not match the source's index" in caplog.text


def test_the_default_cache_is_private_and_one_others_can_write_is_refused(
    data_dir, tmp_path, single_rank_env, monkeypatch
):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.data.config import cache_root
    from optsel.pipeline.data.loaders import load_split

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = _cfg(data_dir, None)
    assert len(load_split(cfg, "val", SINGLE)) == 64
    root = cache_root(cfg)
    assert root.parent.parent == tmp_path / "xdg" / "optsel" / "streaming"  # .../<host>/<key>
    assert root.parent.name and "/" not in root.parent.name
    for folder in (root / "val", root, root.parent, root.parent.parent, root.parent.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    (tmp_path / "xdg" / "optsel").chmod(0o777)
    with pytest.raises(ConfigError, match=r"cache folder .*/xdg/optsel is group- or world-writable \(mode 0777"):
        load_split(cfg, "val", SINGLE)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="group- or world-writable") as err:
        load_split(_cfg(data_dir, shared), "val", SINGLE)
    assert err.value.path == "data.cache_dir" and str(shared) in str(err.value)
    if os.getuid() == 0:  # root can hand a folder to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 4321, -1)
        with pytest.raises(ConfigError, match=r"is owned by uid 4321"):
            load_split(_cfg(data_dir, theirs), "val", SINGLE)


@pytest.mark.parametrize("link", ["split", "cache"])
def test_a_symlinked_cache_or_split_folder_is_refused_and_nothing_written_there(
    data_dir, tmp_path, single_rank_env, link
):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.data.loaders import load_split

    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    cache = tmp_path / "cache"
    if link == "split":
        cache.mkdir(mode=0o700)
        (cache / "val").symlink_to(target)
    else:
        cache.symlink_to(target)
    with pytest.raises(ConfigError, match=r"is a symlink") as err:
        load_split(_cfg(data_dir, cache), "val", SINGLE)
    assert err.value.path == "data.cache_dir"
    assert list(target.iterdir()) == []


# -- 5. the index must count and list its shards right -------------------------------------------------------
def _crafted(data_dir: Path, tmp_path: Path, edit) -> Path:
    crafted = tmp_path / "crafted"
    shutil.copytree(data_dir, crafted)
    _edit_index(crafted / "train", edit)
    return crafted


def _set_samples(value):
    def edit(index):
        index["shards"][0]["samples"] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set_samples(100),
            r"shard\.00000\.mds\.zstd holds 512 samples \(its header\), but .*index\.json says "
            r"samples=100: the index under-counts",
        ),
        (_set_samples(600), r"holds 512 samples \(its header\), but .* says samples=600: the index over-counts"),
        (
            lambda index: index["shards"].append(dict(index["shards"][0])),
            r"shard file 'shard\.00000\.mds' is listed twice \(shards\[0\] and shards\[1\]\)",
        ),
        (_set_samples(-5), r"index\.json: shards\[0\]\.samples is -5, outside \[0, \d+\]"),
        (_set_samples("abc"), r"index\.json: shards\[0\]\.samples must be an integer, got 'abc'"),
        (
            _set_samples(10**12),
            r"index\.json: shards\[0\]\.samples is 1000000000000, outside \[0, \d+\]: a raw shard of "
            r"\d+ bytes \(raw_data\.bytes\) cannot hold more",
        ),
        (lambda index: index["shards"].__setitem__(0, 42), r"index\.json: shards\[0\] is a int, not a mapping"),
        (
            lambda index: index["shards"][0]["raw_data"].__setitem__("bytes", -1),
            r"shards\[0\]\.raw_data\.bytes must be an integer in \[0, 4294967295\], got -1",
        ),
    ],
    ids=[
        "under-count",
        "over-count",
        "listed-twice",
        "negative",
        "not-a-number",
        "huge",
        "not-a-mapping",
        "negative-size",
    ],
)
def test_index_that_miscounts_or_repeats_shards_is_refused_before_training(
    data_dir, tmp_path, single_rank_env, edit, message
):
    from optsel.pipeline.data.loaders import build_train_loader
    from optsel.pipeline.data.shards import ShardError

    crafted = _crafted(data_dir, tmp_path, edit)
    with pytest.raises(ShardError, match=message) as err:
        build_train_loader(_cfg(crafted, tmp_path / "cache"), 8, SINGLE)
    assert str(crafted / "train") in str(err.value)


def test_the_stream_checks_a_remote_index_before_streaming_allocates(data_dir, tmp_path, single_rank_env, monkeypatch):
    """For a remote (read by streaming only), the Stream checks the index it downloaded: a crafted
    sample count is refused before streaming sizes its arrays by it (10**12 samples: 7.28 TiB). The
    up-front check is switched off to reach it with a local copy."""
    from optsel.pipeline.data import streaming_dataset
    from optsel.pipeline.data.loaders import build_train_loader
    from optsel.pipeline.data.shards import ShardError

    crafted = _crafted(data_dir, tmp_path, _set_samples(10**12))
    monkeypatch.setattr(streaming_dataset, "verify_split", lambda *a, **k: 0)
    with pytest.raises(ShardError, match=r"shards\[0\]\.samples is 1000000000000, outside"):
        build_train_loader(_cfg(crafted, tmp_path / "cache", remote=str(crafted)), 8, SINGLE)


# -- 6. a decompression bomb is stopped at the index's size ------------------------------------------------
def _bomb(data_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy whose val shard decompresses to 210 MB (the real shard, then zeros); its index's zip size and
    hashes match the bomb, its raw_data.bytes stays the real shard's."""
    import zstd

    from optsel.pipeline.data.streaming_compat import MDSWriter  # noqa: F401  (registers streaming)

    # isort: split
    from streaming.base.hashing import get_hash

    crafted = tmp_path / "bomb"
    shutil.copytree(data_dir, crafted)
    index = json.loads((crafted / "val" / "index.json").read_text())
    shard = index["shards"][0]
    real = zstd.decompress((crafted / "val" / shard["zip_data"]["basename"]).read_bytes())
    bomb = zstd.compress(real + bytes(210 * 2**20 - len(real)), 19)
    assert len(bomb) < 64 * 1024 and shard["raw_data"]["bytes"] == len(real)
    (crafted / "val" / shard["zip_data"]["basename"]).write_bytes(bomb)
    shard["zip_data"].update(bytes=len(bomb), hashes={h: get_hash(h, bomb) for h in shard["zip_data"]["hashes"]})
    (crafted / "val" / "index.json").write_text(json.dumps(index))
    return crafted, len(real)


def test_decompression_bomb_is_refused_and_never_written_to_the_cache(data_dir, tmp_path, single_rank_env):
    from optsel.pipeline.data.loaders import load_split
    from optsel.pipeline.data.shards import ShardError, verify_split

    crafted, raw_bytes = _bomb(data_dir, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ShardError, match=r"decompresses to more than the \d+ bytes its index gives"):
        load_split(_cfg(crafted, cache, verify_shards="none"), "val", SINGLE)  # streaming's own copy
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in written) < 1 << 20, written
    assert not (cache / "val" / "shard.00000.mds").exists()
    with pytest.raises(
        ShardError,
        match=rf"shard\.00000\.mds\.zstd would decompress to {210 * 2**20} bytes, but its "
        rf"index says raw_data\.bytes={raw_bytes} \(a decompression bomb\)",
    ):
        verify_split(crafted / "val")  # the up-front check of a local source, from the zstd frame header


@pytest.mark.parametrize("algo, compress", [("gz", gzip.compress), ("bz2", bz2.compress)])
def test_streamed_decompression_stops_past_the_index_size(algo, compress):
    from optsel.pipeline.data.shards import ShardError, decompress_bounded

    data = compress(bytes(64 * 2**20))
    assert decompress_bounded(algo, compress(b"abc" * 10), 30, "x") == b"abc" * 10
    with pytest.raises(ShardError, match=r"x decompresses to more than the 1000 bytes"):
        decompress_bounded(algo, data, 1000, "x")


def test_zstd_without_a_declared_size_is_refused():
    """A zstd frame that declares no size (here: RLE blocks of 128 KiB each, 6 KB that would expand to
    210 MB) cannot be bounded by one-shot decompression: refused."""
    from optsel.pipeline.data.shards import ShardError, decompress_bounded

    blocks = b"".join((int(i == 1679) | 1 << 1 | (128 * 1024) << 3).to_bytes(3, "little") + b"\0" for i in range(1680))
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0, 0x38]) + blocks
    with pytest.raises(ShardError, match="does not declare its decompressed size"):
        decompress_bounded("zstd", frame, 56_000, "x")


# -- 11. what used to be a raw traceback is a named error ----------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"corrupt .*kinds\.json: Expecting property name"),
        ("[1, 2]", r"corrupt .*kinds\.json: it must hold a JSON object"),
        ('{"target": "zero"}', r"corrupt .*kinds\.json: kind 'target' has id 'zero', expected an integer"),
        ('{"target": true}', r"kind 'target' has id True"),
        ('{"target": 0, "other": 0}', r"two kinds share an id"),
        ('{"target": -1}', r"kind 'target' has id -1"),
    ],
)
def test_bad_kinds_json_is_named(data_dir, tmp_path, text, message):
    from optsel.pipeline.data import loaders as data_lib
    from optsel.pipeline.data.shards import ShardError

    (tmp_path / "kinds.json").write_text(text)
    with pytest.raises(ShardError, match=message):
        data_lib.kinds(tmp_path)
    assert data_lib.kinds(data_dir)["target"] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "selection.pool_size=1024",
            r"config key 'selection\.pool_size': a pool takes 1024 samples per rank .* gives "
            r"512 samples per rank",
        ),
        ("data.local=/nonexistent", r"config key 'data\.local': /nonexistent does not exist"),
    ],
)
def test_pool_larger_than_the_split_and_a_missing_data_local_are_named(data_dir, tmp_path, override, message):
    import re

    args = [
        f"data.local={data_dir}",
        f"output_dir={tmp_path}",
        "run_name=r",
        "training.progress_bar=false",
        "training.num_eval_samples=8",
        "monitoring.port=0",
        "training.eval_every=0",
        "engine.name=fsdp2",
        "selection.method=random",
        "training.num_steps=1",
        "selection.pool_size=8",
        "selection.budget=4",
        "selection.num_target_samples=4",
        override,
    ]
    done = _train(args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(message, done.stderr) and "Traceback" not in done.stderr, done.stderr[-3000:]


# -- 14 / config: values that cannot work are refused at config load ----------------------------------------
@pytest.mark.parametrize(
    "override, key, message",
    [
        ("data.remote=s3:/bucket/ds", "data.remote", "a URL missing a slash"),
        ("data.remote=gs:/bucket", "data.remote", "a URL missing a slash"),
        ("data.shuffle_seed=-1", "data.shuffle_seed", "must be >= 0"),
        ("data.shuffle_block_size=-1", "data.shuffle_block_size", "must be >= 1"),
        ("data.shuffle_block_size=0", "data.shuffle_block_size", "must be >= 1"),
        ("data.num_canonical_nodes=0", "data.num_canonical_nodes", "must be >= 1"),
        ("data.shuffle_algo=py9", "data.shuffle_algo", "must be one of"),
        ("data.download_timeout=0", "data.download_timeout", "must be a finite number"),
        ("data.download_timeout=.nan", "data.download_timeout", "must be a finite number"),
        ("data.validate_hash=crc99", "data.validate_hash", "must be one of"),
    ],
)
def test_data_config_refuses_values_streaming_cannot_use(override, key, message):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.train.run_config import load_run_config

    with pytest.raises(ConfigError, match=message) as err:
        load_run_config(REPO / "configs/demo.yaml", [override])
    assert err.value.path == key, str(err.value)


def test_the_config_lists_match_streaming():
    from optsel.pipeline.data.streaming_compat import MDSWriter  # noqa: F401  (registers streaming)

    # isort: split
    from streaming.base.hashing import get_hashes
    from streaming.base.shuffle import algos

    from optsel.pipeline.data.config import HASHES, SHUFFLE_ALGOS

    assert set(SHUFFLE_ALGOS) == set(algos) and set(HASHES) <= get_hashes()


def test_a_default_cache_that_cannot_be_created_is_named(data_dir, tmp_path, single_rank_env, monkeypatch):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.data.loaders import load_split

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    with pytest.raises(ConfigError, match=r"cannot create the streaming cache folder .*a-file/cache .*XDG_CACHE_HOME"):
        load_split(_cfg(data_dir, None), "val", SINGLE)
