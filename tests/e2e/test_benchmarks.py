"""The four benchmarks run from the CLI in their --quick form and write their tables (with the command and
date) and JSON; the numbers themselves are the benchmarks' business, the structure and sanity are tested here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.common import REPO


def _bench(name: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "optsel.launch.cli", "bench", name, "--quick", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quality_quick(tmp_path):
    done = _bench("quality", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["grid_file"] == "benchmarks/quality_grid.yaml"
    assert {"random", "oracle", "greats", "ftw"} <= set(summary["overall"])
    (cell,) = summary["cells"]
    assert cell["cell"] == "t15-c25-lh-k4" and cell["seeds"] == [0, 1] and isinstance(cell["valid"], bool)
    for method, m in cell["methods"].items():
        assert m["final_loss"][0] > 0 and abs(sum(m["precision"].values()) - 1) < 1e-6, method
        assert (m["gap_closed"] is None) == (not cell["valid"])
    # the oracle really reads the kinds: far more weight on clean target than random's base rate
    assert cell["methods"]["oracle"]["precision"]["target"] > cell["methods"]["random"]["precision"]["target"] + 0.2
    assert cell["methods"]["random"]["ess"] == pytest.approx(4.0)
    md = (tmp_path / "summary.md").read_text()
    assert "Command: `python -m benchmarks.quality --quick" in md and "| ftw |" in md and "gap closed" in md
    for png in ("curves.png", "gap_closed.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # finished runs are stored and reused: a second invocation runs nothing new
    again = _bench("quality", tmp_path)
    assert again.returncode == 0 and "[quality] t15" not in again.stdout


@pytest.mark.slow
def test_quality_equal_compute_quick(tmp_path):
    """Every method spends about the budget method's counted FLOPs: a cheaper one runs more steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.cli",
            "bench",
            "quality",
            "--quick",
            "--equal-compute",
            f"--out={tmp_path}",
            "--workers=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (cell,) = json.loads((tmp_path / "summary.json").read_text())["cells"]
    rows = cell["methods"]
    assert cell["budget_method"] == "ftw" and rows["ftw"]["steps"][0] == 4  # the quick grid's steps
    assert rows["random"]["steps"][0] > rows["ftw"]["steps"][0]  # random's step is cheaper
    for name, r in rows.items():  # within one step's FLOPs of the budget (or capped by the stream)
        assert r["capped"] or abs(r["flops_over_budget"][0] - 1) < 1.0 / r["steps"][0] + 0.05, (name, r)
    assert (tmp_path / "loss_vs_flops.png").stat().st_size > 1000
    assert "| random |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    done = _bench("overhead", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert [b["N"] // b["k"] for b in data["tables"]] == [2, 4]
    for block in data["tables"]:
        rows = block["rows"]
        # the reference is random's own step: a plain step on k (its FLOPs exactly; its time about)
        assert rows["random"]["flop_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert rows["random"]["flop_ratio_to_plain_N"] == pytest.approx(block["k"] / block["N"], rel=1e-6)
        # stage 1 scores by a forward pass: the head-only two-stage step is cheaper than the one-stage step,
        # and a scoring window cheaper again
        assert (
            rows["ftw[head only, W=T/4]"]["flop_ratio"]
            < rows["ftw[head only]"]["flop_ratio"]
            < rows["ftw (one stage, exact b)"]["flop_ratio"]
        )
    assert "| ftw[head only] |" in (tmp_path / "overhead.md").read_text()
    assert (tmp_path / "overhead.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, files",
    [
        ("speed", ["speed.json", "speed.md"]),
        ("select_grid", ["select_grid.json", "select_grid.md"]),
        ("distributed_select", ["distributed_select.json", "distributed_select.md"]),
    ],
)
def test_cost_benchmarks_quick(tmp_path, name, files):
    done = _bench(name, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for f in files:
        assert (tmp_path / f).stat().st_size > 200, f
    md = (tmp_path / files[1]).read_text()
    assert f"python -m benchmarks.{name}" in md and re.search(r"\d{4}-\d{2}-\d{2}", md), md[:500]
    data = json.loads((tmp_path / files[0]).read_text())
    if name == "speed":
        rows = data["steps"]["small"]["rows"]
        assert rows["plain"]["step_s"] > 0 and rows["ftw[exact]"]["select_s"] > 0
        assert rows["ftw[exact]"]["ratio_to_plain"] > 1  # selection costs something on top of the plain step
        assert len(rows["ftw[auto]"]["ratios"]) == data["meta"]["repeats"]  # one ratio per interleaved round
        n, k = data["steps"]["small"]["N"], data["steps"]["small"]["k"]
        # counted FLOPs: random trains k of N rows, full all N, FTW's single pass beats its two-pass step
        assert rows["random"]["flop_ratio"] == pytest.approx(k / n, rel=1e-6)
        assert rows["full"]["flop_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert 1 < rows["ftw[exact]"]["flop_ratio"] < rows["ftw[exact, two-pass]"]["flop_ratio"]
        grid = data["flop_grid"]  # a larger pool against the same k and |V|: a cheaper step, nearer its floor
        assert grid[1]["N"] > grid[0]["N"] and grid[1]["default"] < grid[0]["default"]
        assert all(g["default"] >= g["floor"] - 0.05 for g in grid)
    if name == "select_grid":
        errs = [r["rel_frob_err_mean"] for r in data["sketch"]]
        assert errs == sorted(errs, reverse=True)  # a bigger sketch, a smaller error
    if name == "distributed_select":
        two = [r for r in data["rows"] if r["R"] == 2]
        assert two and all(r["ranks_agree"] for r in two) and all(r["selector_bytes"] > 0 for r in two)


@pytest.mark.slow
def test_sketch_alignment_quick(tmp_path):
    done = _bench("sketch_alignment", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "sketch_alignment.json").read_text())
    assert [row["width"] for row in data["rows"]] == [32, 64]
    for row in data["rows"]:
        (stats,) = row["by_dim"].values()
        assert -1 <= stats["spearman"]["mean"] <= 1
        assert 0 <= stats["filter_share"]["min"] <= stats["filter_share"]["mean"] <= 1
        assert 0 <= stats["chosen_share"]["mean"] <= 1
    assert "| 64 |" in (tmp_path / "sketch_alignment.md").read_text()


def test_sketch_alignment_measures():
    from benchmarks.sketch_alignment import spearman, top_share

    x = torch.tensor([0.3, -1.0, 2.0, 0.1, 5.0], dtype=torch.float64)
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # ranks only
    assert top_share(x, x, 2) == 1.0 and top_share(x, -x, 2) == 0.0
    assert top_share(x, torch.tensor([5.0, 0, 0, 0, 9.0], dtype=torch.float64), 2) == 0.5  # {4, 2} vs {4, 0}


def test_bench_usage_and_unknown_name():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "optsel.launch.cli", "bench", "nope"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 2
        and "quality,speed,overhead,select_grid,distributed_select,soak,sketch_alignment" in done.stderr
    )
