"""Checkpoints, keys and the metrics endpoint against a hostile reviewer (rows of the bad-input table in
docs/reliability.md): the checkpoint key decided at start-up, signed checkpoints without the key, edited
manifests and meta.json, symlinked checkpoint files, resuming onto other data, a taken metrics port, and
scrape clients that hold connections open.

Real components only: checkpoints written by real runs of ``optsel.launch.train`` (FSDP2, CPU), the real
metrics server scraped over HTTP.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from support.common import run_train as _train
from support.hostile import train_args

KEY_VARS = ("OPTSEL_CHECKPOINT_KEY", "OPTSEL_CHECKPOINT_KEY_FILE")


def _args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """A 2-step FSDP2 random run that checkpoints every step (a later override wins)."""
    return train_args(data_dir, out, "fsdp2", "training.num_steps=2", "checkpoint.every_steps=1", *extra)


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("ckpt-untrusted", num_train=256, num_val=64)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-step FSDP2 run that saved step_00000001 and step_00000002 (unsigned)."""
    out = tmp_path_factory.mktemp("ckpt-run")
    args = _args(data_dir, out)
    done = _train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r", args


@pytest.fixture
def no_key(monkeypatch):
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)


def _copy_checkpoints(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir / "checkpoints", dest / "checkpoints")
    return dest / "checkpoints"


def _edit_meta(step_dir: Path, edit) -> None:
    meta = json.loads((step_dir / "meta.json").read_text())
    edit(meta)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _manager(root: Path, **config):
    from optsel.pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager

    return CheckpointManager(CheckpointConfig(dir=str(root), **config), root.parent)


# -- the key is decided when the run starts -----------------------------------------------------------
def test_a_blank_key_file_stops_the_run_before_step_1(data_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("   \n\t\n")
    done = _train(_args(data_dir, tmp_path / "out"), OPTSEL_CHECKPOINT_KEY_FILE=str(key_file))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the key file is empty or holds only white space" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    metrics = tmp_path / "out" / "r" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step trained
    assert not (tmp_path / "out" / "r" / "checkpoints").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"OPTSEL_CHECKPOINT_KEY": ""}, "OPTSEL_CHECKPOINT_KEY is set but empty"),
        ({"OPTSEL_CHECKPOINT_KEY": "  "}, "OPTSEL_CHECKPOINT_KEY is set but empty"),
        ({"OPTSEL_CHECKPOINT_KEY_FILE": ""}, "OPTSEL_CHECKPOINT_KEY_FILE is set but empty"),
        ({"OPTSEL_CHECKPOINT_KEY": "k", "OPTSEL_CHECKPOINT_KEY_FILE": "/etc/hostname"}, "both set"),
    ],
)
def test_a_set_but_empty_key_is_an_error_when_the_manager_is_made(tmp_path, no_key, monkeypatch, env, message):
    from optsel.pipeline.checkpoint.manager import CheckpointError

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(CheckpointError, match=message):
        _manager(tmp_path / "checkpoints")


def test_a_signed_checkpoint_without_the_key_is_refused_unless_allow_unsigned(run, tmp_path, no_key, caplog):
    from optsel.pipeline.checkpoint.manager import CheckpointKeyError, sign

    root = _copy_checkpoints(run[0], tmp_path)
    for step in root.iterdir():
        _edit_meta(step, lambda meta: meta.update(hmac=sign(meta, b"the key")))
    with pytest.raises(CheckpointKeyError, match=r"HMAC-signed but no key is configured.*--allow-unsigned"):
        _manager(root).verify(root / "step_00000002")
    with pytest.raises(CheckpointKeyError, match="HMAC-signed"):  # auto does not fall back past a key problem
        _manager(root, resume="auto").to_resume()
    with caplog.at_level(logging.WARNING, logger="optsel.checkpoint"):
        assert _manager(root, resume="auto", allow_unsigned=True).to_resume() == root / "step_00000002"
    assert "checking file hashes only, and this run saves unsigned checkpoints" in caplog.text


def test_allow_unsigned_resumes_end_to_end_and_saves_unsigned(run, data_dir, tmp_path):
    from optsel.pipeline.checkpoint.manager import sign

    out = tmp_path / "out"
    shutil.copytree(run[0], out / "r", ignore=shutil.ignore_patterns(".optsel.lock"))
    step = out / "r" / "checkpoints" / "step_00000002"
    _edit_meta(step, lambda meta: meta.update(hmac=sign(meta, b"the key")))
    args = _args(data_dir, out, "training.num_steps=3")
    done = _train([*args, f"--resume-from={step}"])
    assert done.returncode == 2 and "--allow-unsigned" in done.stderr, done.stderr[-2000:]
    done = _train([*args, f"--resume-from={step}", "--allow-unsigned"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hmac" not in json.loads((out / "r" / "checkpoints" / "step_00000003" / "meta.json").read_text())


# -- edited manifests and meta.json are named errors, and auto falls back ----------------------------
@pytest.mark.parametrize(
    "entry, message",
    [
        ({"bytes": "abc", "sha256": "0" * 64}, r"has bytes='abc', expected an integer >= 0"),
        ({"bytes": -1, "sha256": "0" * 64}, r"has bytes=-1"),
        ({"bytes": True, "sha256": "0" * 64}, r"has bytes=True"),
        ("a string", r"is a str, expected a mapping"),
        ({"bytes": 10}, r"has no valid 'sha256' \(got None\)"),
        ({"bytes": 10, "sha256": "not hex"}, r"has no valid 'sha256'"),
    ],
)
def test_a_bad_manifest_entry_is_named_and_auto_falls_back(run, tmp_path, no_key, entry, message):
    from optsel.pipeline.checkpoint.manager import CheckpointError

    root = _copy_checkpoints(run[0], tmp_path)
    newest = root / "step_00000002"
    _edit_meta(newest, lambda meta: meta["manifest"].update({"trainer_rank00000.pt": entry}))
    with pytest.raises(CheckpointError, match=r"meta.json: manifest entry 'trainer_rank00000.pt' " + message):
        _manager(root).verify(newest)
    assert _manager(root, resume="auto").to_resume() == root / "step_00000001"


@pytest.mark.parametrize("world_size", ["<absent>", "2", 0, None])
def test_meta_without_a_usable_world_size_is_named(run, tmp_path, no_key, world_size):
    from optsel.pipeline.checkpoint.manager import CheckpointError

    root = _copy_checkpoints(run[0], tmp_path)
    step = root / "step_00000002"
    _edit_meta(
        step, lambda meta: meta.pop("world_size") if world_size == "<absent>" else meta.update(world_size=world_size)
    )
    with pytest.raises(CheckpointError, match=r"'world_size' is missing or not a positive integer"):
        _manager(root).check_compatible(step, {}, 1)


def test_a_symlinked_checkpoint_file_is_named_as_a_link(run, tmp_path, no_key):
    from optsel.pipeline.checkpoint.manager import CheckpointError

    root = _copy_checkpoints(run[0], tmp_path)
    step = root / "step_00000002"
    state = step / "trainer_rank00000.pt"
    real = tmp_path / "elsewhere.pt"
    state.rename(real)
    state.symlink_to(real)
    with pytest.raises(CheckpointError, match=r"trainer_rank00000.pt is a symbolic link \(to .*elsewhere.pt\)"):
        _manager(root).verify(step)


# -- a checkpoint knows the data it was made from ------------------------------------------------------
def test_checkpoints_record_the_dataset_and_resume_onto_other_data_is_refused(
    run, data_dir, prepare_synthetic, tmp_path
):
    from optsel.pipeline.checkpoint.manager import file_digest

    run_dir, _ = run
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["data"] == {split: file_digest(data_dir / split / "index.json") for split in ("train", "val")}
    other = prepare_synthetic("ckpt-other-data", num_train=192, num_val=64)
    out = tmp_path / "out"
    shutil.copytree(run_dir, out / "r", ignore=shutil.ignore_patterns(".optsel.lock"))
    step = out / "r" / "checkpoints" / "step_00000002"
    args = [a for a in _args(other, out, "training.num_steps=3")]
    done = _train([*args, f"--resume-from={step}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "was made from other data" in done.stderr and "train: checkpoint " in done.stderr, done.stderr[-2000:]
    assert "--allow-other-data" in done.stderr
    done = _train([*args, f"--resume-from={step}", "--allow-other-data"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr and "onto other data" in done.stderr, done.stderr[-2000:]


# -- the metrics endpoint ------------------------------------------------------------------------------
def test_a_taken_metrics_port_is_a_named_error_not_a_traceback(data_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = [a for a in _args(data_dir, tmp_path / "out") if not a.startswith("monitoring.port")]
        done = _train([*args, f"monitoring.port={port}", "monitoring.port_in_use=error"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"metrics port 127.0.0.1:{port} is already in use" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _server(**limits):
    from prometheus_client import CollectorRegistry, Gauge

    from optsel.monitoring.exposition import MetricsServer

    registry = CollectorRegistry()
    Gauge("optsel_probe", "a probe", registry=registry).set(7)
    return MetricsServer(registry, addr="127.0.0.1", port=0, **limits)


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_client_that_sends_half_a_header_is_dropped_after_the_idle_timeout():
    server = _server(idle_timeout_s=0.5)
    try:
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes the header
        start = time.monotonic()
        assert _closed_by_server(conn, within=5.0)
        assert time.monotonic() - start < 4.0
        conn.close()
        assert b"optsel_probe 7.0" in urllib.request.urlopen(server.url, timeout=5).read()
    finally:
        server.close()


def test_connections_beyond_the_limit_are_closed_and_scrapes_work_again_after():
    server = _server(idle_timeout_s=1.0, max_connections=2)
    try:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        for conn in held:
            conn.sendall(b"GET /")  # each holds a serving thread
        time.sleep(0.2)
        third = socket.create_connection(("127.0.0.1", server.port))
        assert _closed_by_server(third, within=0.5)  # closed on accept, long before the idle timeout
        assert server.refused == 1
        third.close()
        assert all(_closed_by_server(conn, within=5.0) for conn in held)  # dropped when idle
        for conn in held:
            conn.close()
        assert b"optsel_probe 7.0" in urllib.request.urlopen(server.url, timeout=5).read()
    finally:
        server.close()


@pytest.mark.parametrize("bad", [{"idle_timeout_s": 0}, {"idle_timeout_s": float("nan")}, {"max_connections": 0}])
def test_server_limits_that_cannot_work_are_refused(bad):
    from optsel.monitoring.sinks import MonitoringConfig

    with pytest.raises(ValueError, match=next(iter(bad))):
        MonitoringConfig(**bad)


def test_a_5000_character_kind_name_is_exported_bounded_and_distinct():
    import re

    from prometheus_client import CollectorRegistry

    from optsel.monitoring.exposition import MetricsServer
    from optsel.monitoring.metrics import MAX_LABEL_LENGTH, OptselMetrics

    registry = CollectorRegistry()
    metrics = OptselMetrics(registry, rank=0, job_level=True, labels={"engine": "fsdp2", "method": "m" * 5000})
    long_a, long_b = "a" * 4999 + "1", "a" * 4999 + "2"
    metrics.update(
        {f"select/precision/{long_a}": 0.25, f"select/precision/{long_b}": 0.75, "select/precision/ok": 0.0}, step=1
    )
    server = MetricsServer(registry, addr="127.0.0.1", port=0)
    try:
        text = urllib.request.urlopen(server.url, timeout=5).read().decode()
    finally:
        server.close()
    kinds = re.findall(r'optsel_selection_precision_ratio\{[^}]*kind="([^"]*)"', text)
    assert len(kinds) == 3 and len(set(kinds)) == 3 and "ok" in kinds
    assert max(len(k) for k in kinds) == MAX_LABEL_LENGTH
    assert all(len(v) <= MAX_LABEL_LENGTH for v in re.findall(r'method="([^"]*)"', text))
