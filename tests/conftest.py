"""Test hygiene and fixtures shared by every test module.

The tests are split by kind: ``unit/`` (in-process, one rank), ``distributed/`` (R gloo ranks in local
processes), ``e2e/`` (the ``optsel`` CLI, containers, Prometheus, in subprocesses). What they share lives in
``support/`` (paths and the subprocess environment, brute-force references, the rank runner): this folder
is put on ``sys.path`` so that every module imports it as ``support``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may export launcher variables into this process (streaming reads RANK /
    WORLD_SIZE / LOCAL_WORLD_SIZE from the environment, and the data layer sets them for a single
    process). Restore the environment after every test so that they never leak into the launchers and
    subprocesses of later tests (a stale LOCAL_WORLD_SIZE=1 makes every rank a streaming leader)."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prepare_synthetic(tmp_path_factory) -> Callable[..., Path]:
    """``prepare_synthetic(name, num_train, num_val)``: run ``optsel prepare`` (the CLI, in a subprocess,
    with the built-in ``configs/prepare_synthetic.yaml``) into a fresh temporary folder named after
    ``name`` and return the prepared directory. Test modules wrap it in their own ``data_dir`` fixture."""

    def run(name: str, num_train: int, num_val: int) -> Path:
        out = tmp_path_factory.mktemp(name) / "synthetic"
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "optsel.launch.cli",
                "prepare",
                "configs/prepare_synthetic.yaml",
                f"out_dir={out}",
                f"synthetic.num_train={num_train}",
                f"synthetic.num_val={num_val}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return out

    return run
