"""Hostile and careless runs (rows of the bad-input table in docs/reliability.md): checkpoint files
that would run code, a rewritten manifest, a corrupt newest checkpoint, two runs in one run folder, a
forgotten --resume, Ctrl-C (once: save at the step boundary; twice: exit at once), the exit cleanup.

Real components only: checkpoints written by real runs of ``optsel.launch.train`` (FSDP2 and
DeepSpeed, CPU), real flock'd run folders, real signals.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.common import REPO
from support.common import cli_env as _env
from support.common import run_train as _train
from support.hostile import train_args as _args


def _strict_json(path: Path):
    def refuse(token: str):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- 2 / 5. checkpoints: manifest, HMAC, weights-only, fallback ----------------------------------------
class _Boom:
    """Unpickling it writes a marker file (what a replaced checkpoint file could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture(scope="module")
def fsdp2_run(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("fsdp2-ckpt")
    args = _args(data_dir, out, "fsdp2", "checkpoint.every_steps=1", "checkpoint.keep_last=3")
    done = _train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r", args


@pytest.fixture(scope="module")
def deepspeed_run(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ds-ckpt")
    args = _args(
        data_dir, out, "deepspeed", "checkpoint.every_steps=1", "checkpoint.keep_last=1", "training.num_steps=1"
    )
    done = _train(args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r", args


def _rewrite_manifest(step_dir: Path, key: bytes | None = None) -> None:
    """What an attacker with write access but without the key does: make the manifest match again."""
    from optsel.pipeline.checkpoint.manager import build_manifest, sign

    meta = json.loads((step_dir / "meta.json").read_text())
    meta["manifest"] = build_manifest(step_dir)
    if key is not None:  # without a key, an existing (now stale) signature stays as it was
        meta["hmac"] = sign(meta, key)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(".optsel.lock"))
    return dest


def _resume_args(args: list[str], out: Path) -> list[str]:
    return [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={out}"]


def test_checkpoint_manifest_is_written_and_every_file_verified(fsdp2_run):
    from optsel.pipeline.checkpoint.manager import CheckpointConfig, CheckpointError, CheckpointManager

    run_dir, _ = fsdp2_run
    newest = run_dir / "checkpoints" / "step_00000003"
    meta = _strict_json(newest / "meta.json")
    files = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()} - {"meta.json"}
    assert set(meta["manifest"]) == files and {"engine/.metadata", "trainer_rank00000.pt"} <= files
    assert all(
        len(v["sha256"]) == 64 and v["bytes"] == (newest / k).stat().st_size for k, v in meta["manifest"].items()
    )
    assert "hmac" not in meta  # no key configured for this run
    manager = CheckpointManager(CheckpointConfig(), run_dir)
    assert manager.verify(newest)["step"] == 3
    extra = newest / "engine" / "extra.pt"
    extra.write_bytes(b"x")
    try:
        with pytest.raises(CheckpointError, match=r"engine/extra.pt is not in the checkpoint's manifest"):
            manager.verify(newest)
    finally:
        extra.unlink()


def test_replaced_checkpoint_file_does_not_run_code_fsdp2(fsdp2_run, tmp_path):
    import torch

    run_dir, args = fsdp2_run
    marker = tmp_path / "pwned"
    # (a) a replaced trainer state: the manifest names it before anything is unpickled
    copy = _copy_run(run_dir, tmp_path / "a" / "r")
    step = copy / "checkpoints" / "step_00000003"
    torch.save({"step": _Boom(str(marker))}, step / "trainer_rank00000.pt")
    done = _train(_resume_args(args, tmp_path / "a") + [f"--resume-from={step}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trainer_rank00000.pt has 1" in done.stderr and "the manifest says" in done.stderr, done.stderr[-2000:]
    assert not marker.exists()
    # (b) the attacker also rewrites the manifest (no key configured): weights-only loading refuses, naming it
    _rewrite_manifest(step)
    done = _train(_resume_args(args, tmp_path / "a") + [f"--resume-from={step}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trainer_rank00000.pt holds pickled objects" in done.stderr, done.stderr[-2000:]
    assert "builtins.getattr, pathlib.Path, pathlib.PosixPath" in done.stderr, done.stderr[-2000:]  # named
    assert not marker.exists()
    # (c) DCP's .metadata is a plain pickle: the allowlisting unpickler refuses the global
    copy = _copy_run(run_dir, tmp_path / "c" / "r")
    step = copy / "checkpoints" / "step_00000003"
    (step / "engine" / ".metadata").write_bytes(pickle.dumps(_Boom(str(marker))))
    _rewrite_manifest(step)
    done = _train(_resume_args(args, tmp_path / "c") + [f"--resume-from={step}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert ".metadata holds pickled objects outside the allowlist: pathlib.Path.write_text" in done.stderr, done.stderr[
        -2000:
    ]  # pickle.dumps names the method itself (protocol >= 4)
    assert not marker.exists()


def test_hmac_key_refuses_a_rewritten_manifest(fsdp2_run, data_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("correct horse battery staple\n")
    args = _args(data_dir, tmp_path / "signed", "fsdp2", "checkpoint.every_steps=1", "training.num_steps=1")
    done = _train(args, OPTSEL_CHECKPOINT_KEY_FILE=str(key_file))
    assert done.returncode == 0, done.stderr[-2000:]
    step = tmp_path / "signed" / "r" / "checkpoints" / "step_00000001"
    assert len(_strict_json(step / "meta.json")["hmac"]) == 64
    assert "correct horse" not in (step / "meta.json").read_text()  # the key is never written
    (step / "trainer_rank00000.pt").write_bytes((step / "trainer_rank00000.pt").read_bytes() + b"\0")
    _rewrite_manifest(step)  # consistent hashes, but no valid HMAC without the key
    resume = [*args, "training.num_steps=2", f"--resume-from={step}"]
    done = _train(resume, OPTSEL_CHECKPOINT_KEY_FILE=str(key_file))
    assert done.returncode == 2 and "the manifest's HMAC does not match" in done.stderr, done.stderr[-2000:]
    _rewrite_manifest(step, key=b"another key")
    done = _train(resume, OPTSEL_CHECKPOINT_KEY_FILE=str(key_file))
    assert done.returncode == 2 and "HMAC does not match" in done.stderr, done.stderr[-2000:]
    # an unsigned checkpoint is refused while a key is configured
    run_dir, fargs = fsdp2_run
    done = _train(
        _resume_args(fargs, tmp_path / "u") + [f"--resume-from={run_dir / 'checkpoints' / 'step_00000003'}"],
        OPTSEL_CHECKPOINT_KEY="k",
    )
    assert done.returncode == 2 and "is not signed" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_replaced_checkpoint_file_does_not_run_code_deepspeed(deepspeed_run, tmp_path):
    import torch

    run_dir, args = deepspeed_run
    marker = tmp_path / "pwned"
    copy = _copy_run(run_dir, tmp_path / "d" / "r")
    step = copy / "checkpoints" / "step_00000001"
    states = next((step / "engine").glob("*model_states.pt"))
    original = torch.load(states, weights_only=False)
    torch.save({**original, "optsel": {"step": _Boom(str(marker))}}, states)
    _rewrite_manifest(step)
    done = _train(_resume_args(args, tmp_path / "d") + ["training.num_steps=2", f"--resume-from={step}"], timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model_states.pt holds pickled objects that weights-only loading refuses" in done.stderr, done.stderr[-3000:]
    assert "builtins.getattr, pathlib.Path, pathlib.PosixPath" in done.stderr and not marker.exists()
    # an untouched DeepSpeed checkpoint loads weights-only (its two DeepSpeed classes are allowlisted)
    done = _train(
        _resume_args(args, tmp_path / "ok")
        + ["training.num_steps=2", f"--resume-from={run_dir / 'checkpoints' / 'step_00000001'}"],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("damage", ["truncate-optimizer-state", "truncate-meta"])
def test_corrupt_newest_checkpoint_falls_back_to_the_newest_that_verifies(fsdp2_run, tmp_path, damage):
    run_dir, args = fsdp2_run
    copy = _copy_run(run_dir, tmp_path / "r")
    newest = copy / "checkpoints" / "step_00000003"
    bad = next((newest / "engine").glob("*.distcp")) if damage == "truncate-optimizer-state" else newest / "meta.json"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    explicit = _train(_resume_args(args, tmp_path) + [f"--resume-from={newest}"])
    assert explicit.returncode == 2 and str(bad) in explicit.stderr, explicit.stderr[-2000:]
    assert "Traceback" not in explicit.stderr
    done = _train(_resume_args(args, tmp_path) + ["training.num_steps=4", "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping step_00000003" in done.stderr and str(bad.name) in done.stderr, done.stderr[-3000:]
    assert "falling back to" in done.stderr and "step_00000002" in done.stderr
    summary = _strict_json(copy / "summary.json")
    assert summary["resumed_from"].endswith("step_00000002") and summary["num_steps"] == 4


# -- 3 / 4. one run per folder; no implicit deletion --------------------------------------------------
def test_second_run_in_the_same_run_folder_is_refused_naming_the_holder(data_dir, tmp_path):
    from optsel.pipeline.checkpoint.run_lock import RunDirBusyError, RunLock

    run_dir = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from optsel.pipeline.checkpoint.run_lock import RunLock; "
            f"RunLock({str(run_dir)!r}, 'first').acquire(); print('held', flush=True); time.sleep(120)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _train(_args(data_dir, tmp_path))
        assert done.returncode == 2, done.stderr[-2000:]
        assert (
            f"pid {holder.pid} on host {socket.gethostname()}" in done.stderr and "in use by another run" in done.stderr
        )
        assert not (run_dir / "config.yaml").exists()  # nothing of the first run was touched
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over
    record = json.loads((run_dir / ".optsel.lock").read_text())
    assert record["pid"] == holder.pid
    lock = RunLock(run_dir, "second")
    lock.acquire()
    assert json.loads((run_dir / ".optsel.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_fresh_start_into_a_folder_with_checkpoints_is_refused_and_overwrite_moves_them_aside(fsdp2_run, tmp_path):
    run_dir, args = fsdp2_run
    copy = _copy_run(run_dir, tmp_path / "r")
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    done = _train(_resume_args(args, tmp_path))
    assert done.returncode == 2 and "holds checkpoints of an earlier run" in done.stderr, done.stderr[-2000:]
    assert "--overwrite" in done.stderr and "--resume" in done.stderr
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before  # nothing deleted
    done = _train(_resume_args(args, tmp_path) + ["--overwrite"])
    assert done.returncode == 0, done.stderr[-2000:]
    aside = [p for p in tmp_path.joinpath("r").iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before
    logs = [p for p in tmp_path.joinpath("r").iterdir() if p.name.startswith("replaced-")]
    assert len(logs) == 1 and (logs[0] / "metrics.jsonl").is_file()
    assert _strict_json(copy / "summary.json")["resumed_from"] is None


# -- 6. Ctrl-C ---------------------------------------------------------------------------------------
def test_sigint_saves_at_the_step_boundary(data_dir, tmp_path):
    args = _args(data_dir, tmp_path, "fsdp2", "training.num_steps=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "optsel.launch.train", "configs/demo.yaml", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = tmp_path / "r" / "metrics.jsonl"
    end = time.monotonic() + 240
    while not (metrics.is_file() and '"step": 2,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < end, "the run did not reach step 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = _strict_json(tmp_path / "r" / "summary.json")
    assert summary["stopped"] == "SIGINT" and 2 <= summary["num_steps"] < 100000
    saved = sorted((tmp_path / "r" / "checkpoints").glob("step_*"))
    assert saved and _strict_json(saved[-1] / "meta.json")["reason"] == "SIGINT"
    assert int(saved[-1].name.split("_")[1]) == summary["num_steps"]


_DOUBLE_SIGINT = """
import os, signal, sys, time
from optsel.pipeline.train.trainer import StopSignals
signals = StopSignals(["SIGTERM"])
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.1)
os.kill(os.getpid(), signal.SIGINT)          # within 1 s: the launcher forwarding the same Ctrl-C
time.sleep(0.1)
print("first", signals.received, flush=True)
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGINT)          # a second press
time.sleep(5)
print("still running", flush=True)
"""


def test_second_ctrl_c_exits_at_once():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _DOUBLE_SIGINT], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.stdout.splitlines() == ["first SIGINT"], done.stdout + done.stderr
    assert done.returncode == 130 and "second Ctrl-C: exiting now" in done.stderr
    assert time.monotonic() - start < 30


# -- 11. the exit cleanup ----------------------------------------------------------------------------
def test_exit_cleanup_removes_only_this_process_files_and_says_nothing_about_crashes(caplog, monkeypatch, tmp_path):
    from optsel.pipeline.data import streaming_dataset

    other, own = 987601, 987602  # streaming prefixes: another job's (just created) and ours (finished)
    made = []
    for prefix in (other, own):
        for path in (Path("/dev/shm") / f"{prefix:06d}_locals", Path(tmp_path) / f"{prefix:06d}_barrier_filelock"):
            path.write_bytes(b"\0" * 8)
            made.append(path)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(streaming_dataset, "_CLEAN_AT_EXIT", True)
    monkeypatch.setattr(streaming_dataset, "_OWN_PREFIXES", {own})
    try:
        with caplog.at_level(logging.DEBUG, logger="optsel.shm"):
            streaming_dataset._clean_at_exit()
        assert (Path("/dev/shm") / f"{other:06d}_locals").exists(), "a starting job's shared memory was removed"
        assert (tmp_path / f"{other:06d}_barrier_filelock").exists(), "a starting job's file lock was removed"
        assert (
            not (Path("/dev/shm") / f"{own:06d}_locals").exists()
            and not (tmp_path / f"{own:06d}_barrier_filelock").exists()
        )
        assert not [r for r in caplog.records if "crashed runs" in r.getMessage()]
    finally:
        for path in made:
            path.unlink(missing_ok=True)
