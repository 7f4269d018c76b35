"""The fault-injection soak (benchmarks/soak.py) in its --quick form: a 2-rank FSDP2 run under torchrun gets a
SIGKILL on a random rank, is resumed, gets a SIGTERM, is resumed, and finishes equal to a straight run (losses,
drawn and selected sample ids, weights, eval loss; no sample lost or repeated). The full soak (M >= 20 kills per
engine) is a benchmark: `optsel bench soak`, results in results/soak/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.common import REPO


@pytest.mark.slow
def test_soak_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "optsel.launch.cli", "bench", "soak", "--quick", f"--out={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    (result,) = report["engines"]
    assert result["engine"] == "fsdp2" and result["passed"], result["problems"]
    assert result["kills"] == 2 and result["sigkill"] == 1 and result["sigterm"] == 1
    kills = [e for e in result["events"] if "signal" in e]
    assert kills[0]["exit_code"] != 0  # a SIGKILLed rank ends the job
    assert kills[1]["exit_code"] == 0  # SIGTERM: every rank checkpoints and stops cleanly
    assert kills[1]["resumed_from"] >= 1 and result["launches"] >= 3
    md = (tmp_path / "soak.md").read_text()
    assert "python -m benchmarks.soak --quick" in md and "**pass**" in md
