"""Checkpoint and exact resume.

Straight S steps vs. S/2 + stop + resume to S (in-process, 2 gloo ranks, each engine × random/ftw);
a SIGKILLed rank under torchrun ends the job quickly and a ``--resume`` relaunch finishes it; SIGTERM
to torchrun (as SLURM preemption sends) checkpoints and stops; in every case the loss sequence and
the selected (and drawn) sample ids equal the straight run's. Plus: atomic saves, keep-last pruning,
and refusing checkpoints of another config or world size with the key named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support.common import REPO
from support.common import cli_env as _env
from support.common import run_train as _train
from support.dist import run_distributed

sys.path.insert(0, str(REPO))

from benchmarks.soak import records as _records  # noqa: E402  (one reader of a run's logs, shared with the soak)

STEPS = 6


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("ckpt-shards", num_train=1024, num_val=96)


def _overrides(data_dir: Path, out: Path, engine: str, method: str, *extra: str) -> list[str]:
    return [
        f"data.local={data_dir}",
        f"output_dir={out}",
        "training.progress_bar=false",
        "training.num_eval_samples=16",
        "monitoring.port=0",
        "training.eval_every=2",
        f"engine.name={engine}",
        f"selection.method={method}",
        f"training.num_steps={STEPS}",
        "selection.pool_size=16",
        "selection.budget=4",
        "selection.num_target_samples=8",
        *extra,
    ]


def _assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = _records(straight), _records(resumed)
    assert b["steps"] == list(range(1, STEPS + 1)), "a step is missing or repeated in the resumed run's log"
    for key in ("selected", "weights", "drawn", "train_loss", "eval_loss"):
        assert a[key] == b[key], f"{key} differs between the straight and the resumed run"
    drawn = [sid for step in b["drawn"] for sid in step]
    assert len(drawn) == len(set(drawn)), "a sample was consumed twice across the resume"


# -- in-process: straight vs stop + resume, each engine × method -------------------------------------
def _straight_and_split(rank: int, world: int, overrides: list[str]) -> dict:
    from optsel.pipeline.train.run_config import load_run_config
    from optsel.pipeline.train.trainer import Trainer

    def run(*extra: str) -> dict:
        trainer = Trainer(load_run_config(REPO / "configs/demo.yaml", overrides + list(extra)))
        try:
            return trainer.train()
        finally:
            trainer.close()

    straight = run("run_name=straight")
    first = run("run_name=split", f"training.stop_at_step={STEPS // 2}")
    second = run("run_name=split", "checkpoint.resume=auto")
    return {"straight": straight, "first": first, "second": second}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
@pytest.mark.parametrize("method", ["random", "ftw"])
def test_stop_and_resume_equals_straight_run(data_dir, tmp_path, engine, method):
    results = run_distributed(
        _straight_and_split, 2, args=(_overrides(data_dir, tmp_path, engine, method),), init=engine, timeout_s=600
    )
    first, second = results[0]["first"], results[0]["second"]
    assert first["stopped"] == f"training.stop_at_step={STEPS // 2}" and first["num_steps"] == STEPS // 2
    assert second["resumed_from"].endswith(f"step_{STEPS // 2:08d}") and second["num_steps"] == STEPS
    assert second["stopped"] is None
    assert results[0]["straight"]["final_eval_loss"] == second["final_eval_loss"]
    _assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert second["checkpoint_seconds"]["load"] > 0


# -- real launcher: SIGKILL a rank, SIGTERM the job ---------------------------------------------------
def _torchrun(overrides: list[str], log: Path) -> subprocess.Popen:
    from optsel.launch.launchers import build_command

    cmd = build_command("torchrun", 2, "configs/demo.yaml", overrides)
    cmd.insert(cmd.index("-m", 2), "--monitor_interval=0.2")
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


@pytest.fixture(scope="module")
def straight_runs(data_dir, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Reference straight runs under torchrun, made once per (engine, method)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(engine: str, method: str) -> Path:
        if (engine, method) not in cache:
            out = tmp_path_factory.mktemp(f"straight-{engine}-{method}")
            log = out / "log.txt"
            proc = _torchrun(_overrides(data_dir, out, engine, method, "run_name=r"), log)
            assert _finish(proc, 300) == 0, log.read_text()[-4000:]
            cache[(engine, method)] = out / "r"
        return cache[(engine, method)]

    return get  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
@pytest.mark.parametrize("method", ["random", "ftw"])
def test_sigkilled_rank_ends_job_and_resume_finishes_it(data_dir, tmp_path, straight_runs, engine, method):
    reference = straight_runs(engine, method)
    args = _overrides(
        data_dir,
        tmp_path,
        engine,
        method,
        "run_name=r",
        "checkpoint.every_steps=2",
        "checkpoint.resume=auto",
        "engine.collective_timeout_s=60",
    )
    proc = _torchrun(args, tmp_path / "killed.txt")
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000002" / "meta.json"
    _wait_for(ckpt.is_file, proc, 240, "the step-2 checkpoint")
    victim = _worker(proc, 1)
    victim.kill()
    killed_at = time.monotonic()
    code = _finish(proc, 120)
    ended_after = time.monotonic() - killed_at
    log = (tmp_path / "killed.txt").read_text()
    assert code != 0, "the job must fail when a rank dies"
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after a rank died"
    assert "exitcode  : -9" in log or "Signal 9" in log, log[-3000:]  # torchrun names the dead rank
    assert "rank 0: lost contact with another rank" in log, log[-3000:]  # the survivor says why it ends
    summary_file = tmp_path / "r" / "summary.json"
    assert not summary_file.exists() or json.loads(summary_file.read_text())["num_steps"] < STEPS

    proc = _torchrun(args, tmp_path / "resumed.txt")
    assert _finish(proc, 300) == 0, (tmp_path / "resumed.txt").read_text()[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["resumed_from"] is not None and summary["num_steps"] == STEPS
    _assert_same_run(reference, tmp_path / "r")


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_then_resume_matches(data_dir, tmp_path, straight_runs):
    reference = straight_runs("fsdp2", "ftw")
    args = _overrides(data_dir, tmp_path, "fsdp2", "ftw", "run_name=r", "checkpoint.resume=auto")
    proc = _torchrun(args, tmp_path / "preempted.txt")
    metrics = tmp_path / "r" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and '"step": 1,' in metrics.read_text(), proc, 240, "step 1")
    os.kill(proc.pid, signal.SIGTERM)  # what SLURM sends to the job step before preemption
    _finish(proc, 120)
    log = (tmp_path / "preempted.txt").read_text()
    saved = sorted((tmp_path / "r" / "checkpoints").glob("step_*"))
    assert saved and all(p.name.startswith("step_") and not p.name.endswith(".partial") for p in saved), log[-3000:]
    meta = json.loads((saved[-1] / "meta.json").read_text())
    assert meta["reason"] == "SIGTERM" and meta["step"] < STEPS, meta
    # the relaunch goes through `optsel launch --resume` (what a requeued job script runs)
    fresh_args = [a for a in args if a != "checkpoint.resume=auto"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.cli",
            "launch",
            "--nproc",
            "2",
            "--resume",
            "configs/demo.yaml",
            *fresh_args,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "checkpoint.resume=auto" in done.stderr  # the launcher printed the command it ran
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["resumed_from"].endswith(saved[-1].name)
    _assert_same_run(reference, tmp_path / "r")


# -- the checkpoint folder: atomicity, pruning, refusing the wrong checkpoint -------------------------


@pytest.fixture(scope="module")
def one_rank_run(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("one-rank")
    args = _overrides(
        data_dir,
        out,
        "fsdp2",
        "ftw",
        "run_name=r",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "training.stop_at_step=3",
    )
    done = _train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r", args


def test_keeps_last_n_and_ignores_partial_saves(one_rank_run):
    from optsel.pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager

    run_dir, _ = one_rank_run
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"], names  # keep_last=2 pruned step 1
    crashed = run_dir / "checkpoints" / "step_00000009.partial"  # what a crash mid-save leaves
    (crashed / "engine").mkdir(parents=True)
    (crashed / "trainer_rank00000.pt").write_bytes(b"half written")
    try:
        manager = CheckpointManager(CheckpointConfig(resume="auto"), run_dir)
        assert manager.latest() == run_dir / "checkpoints" / "step_00000003"
        assert manager.to_resume() == run_dir / "checkpoints" / "step_00000003"
        from optsel.pipeline.checkpoint.manager import CheckpointError

        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            CheckpointManager(CheckpointConfig(resume=str(crashed)), run_dir).to_resume()
    finally:
        import shutil

        shutil.rmtree(crashed)


@pytest.mark.parametrize(
    "change, key",
    [
        ("selection.budget=8", "selection.budget"),
        ("optimizer.lr=0.01", "optimizer.lr"),
        ("selection.method=random", "selection.method"),
    ],
)
def test_resume_refuses_another_config_naming_the_key(one_rank_run, change, key):
    run_dir, args = one_rank_run
    done = _train([a for a in args if not a.startswith("training.stop_at_step")] + ["--resume", change])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another config" in done.stderr and key in done.stderr, done.stderr[-2000:]


def test_resume_refuses_another_world_size(one_rank_run):
    from optsel.pipeline.checkpoint.manager import CheckpointConfig, CheckpointError, CheckpointManager

    run_dir, _ = one_rank_run
    manager = CheckpointManager(CheckpointConfig(), run_dir)
    path = manager.latest()
    meta = json.loads((path / "meta.json").read_text())
    with pytest.raises(CheckpointError, match="saved by 1 ranks, this run has 2"):
        manager.check_compatible(path, meta["config"], world_size=2)


def test_resume_from_missing_or_corrupt_checkpoint_is_named(one_rank_run, tmp_path):
    run_dir, args = one_rank_run
    base = [a for a in args if not a.startswith(("training.stop_at_step", "output_dir"))] + [f"output_dir={tmp_path}"]
    done = _train(base + [f"--resume-from={tmp_path / 'nowhere'}"])
    assert done.returncode == 2 and "checkpoint.resume" in done.stderr and "does not exist" in done.stderr
    import shutil

    broken = tmp_path / "copy" / "step_00000003"
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", broken)
    (broken / "trainer_rank00000.pt").write_bytes(b"\x00garbage")
    done = _train(base + [f"--resume-from={broken}"])
    assert done.returncode != 0
    assert "trainer_rank00000.pt" in done.stderr, done.stderr[-2000:]
