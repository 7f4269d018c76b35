"""A third-party selector, installed with pip, plugs into optsel through the ``optsel.selectors``
entry-point group: the CLI lists it, ``get_selector_factory`` builds it, ``optsel train`` trains with
it; a plug-in that takes a built-in's name (``random``) is refused with both places named.

The plug-ins are real distributions (a pyproject.toml each) built offline and installed with
``pip install --target`` into a folder that only the subprocesses see (PYTHONPATH)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.common import REPO, cli_env

FIRST_K = '''"""The first k rows of the global pool, weight 1/k each."""

import time
from typing import Any

import torch

from optsel import distributed
from optsel.selection.base import Batch, Selection, Selector, uniform_selection


class FirstK(Selector):
    name = "first_k"

    def __init__(self, *, budget: int, **_: Any) -> None:
        self.budget = budget

    def select(self, pool: Batch, target: Batch | None = None) -> Selection:
        start = time.perf_counter()
        sizes = distributed.gather_sizes(int(pool["input_ids"].shape[0]))
        chosen = torch.arange(min(self.budget, sum(sizes)))
        return uniform_selection(chosen, sizes, {"select": time.perf_counter() - start})
'''

IMPOSTOR = '''"""A plug-in that takes the built-in name ``random``."""

from optsel.selection.base import Selector


class Impostor(Selector):
    def select(self, pool, target=None):
        raise AssertionError("never built")
'''


def _pyproject(dist: str, module: str, entry_point: str) -> str:
    return f"""[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1"

[project.entry-points."optsel.selectors"]
{entry_point}

[tool.setuptools]
py-modules = ["{module}"]
"""


def _install(root: Path, dist: str, module: str, source: str, entry_point: str) -> Path:
    """Write the plug-in ``dist`` under ``root``, pip-install it (offline) into ``root/site``; return that."""
    project = root / dist
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(_pyproject(dist, module, entry_point))
    (project / f"{module}.py").write_text(source)
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*pip, "--target", str(site), str(project)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (site / f"{module}.py").is_file()
    return site


@pytest.fixture(scope="module")
def first_k_site(tmp_path_factory) -> Path:
    return _install(
        tmp_path_factory.mktemp("first_k"),
        "optsel-first-k",
        "optsel_first_k",
        FIRST_K,
        'first_k = "optsel_first_k:FirstK"',
    )


@pytest.fixture(scope="module")
def impostor_site(tmp_path_factory) -> Path:
    return _install(
        tmp_path_factory.mktemp("impostor"),
        "optsel-impostor",
        "optsel_impostor",
        IMPOSTOR,
        'random = "optsel_impostor:Impostor"',
    )


def _run(site: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=cli_env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _method_line(listing: str) -> str:
    return next(line for line in listing.splitlines() if line.startswith("selection.method "))


BUILD_AND_SELECT = """
import json, torch
from optsel.selection.base import get_selector_factory
selector = get_selector_factory("first_k")(model=None, optimizer=None, budget=3, seed=0)
pool = {"input_ids": torch.ones(5, 4, dtype=torch.long), "attention_mask": torch.ones(5, 4, dtype=torch.long),
        "labels": torch.ones(5, 4, dtype=torch.long)}
sel = selector.select(pool)
print(json.dumps({"class": type(selector).__module__ + "." + type(selector).__name__,
                  "indices": sel.indices.tolist(), "weights": sel.weights.tolist(), "local": sel.local_indices.tolist()}))
"""


def test_an_installed_plugin_selector_is_listed_and_selects(first_k_site):
    listed = _run(first_k_site, ["-m", "optsel.launch.cli", "configs", "keys", "run"])
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "first_k" in _method_line(listed.stdout) and "random" in _method_line(listed.stdout)
    without = subprocess.run(
        [sys.executable, "-m", "optsel.launch.cli", "configs", "keys", "run"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert without.returncode == 0 and "first_k" not in _method_line(without.stdout)  # the plug-in, not optsel

    built = _run(first_k_site, ["-c", BUILD_AND_SELECT])
    assert built.returncode == 0, built.stderr[-3000:]
    result = json.loads(built.stdout.strip().splitlines()[-1])
    assert result["class"] == "optsel_first_k.FirstK"
    assert result["indices"] == [0, 1, 2] and result["local"] == [0, 1, 2]
    assert result["weights"] == pytest.approx([1 / 3] * 3)


def test_a_plugin_taking_a_builtin_name_is_refused(impostor_site):
    for args in (
        ["-c", "from optsel.selection.base import selector_names; selector_names()"],
        ["-m", "optsel.launch.cli", "configs", "keys", "run"],
    ):
        done = _run(impostor_site, args)
        assert done.returncode != 0
        message = done.stderr.strip().splitlines()[-1]
        assert "selector 'random' is built in (optsel.selection.simple.RandomSelector)" in message, done.stderr[-3000:]
        assert "entry point 'random = optsel_impostor:Impostor'" in message
        assert "distribution optsel-impostor 0.1" in message


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("plugins", num_train=256, num_val=32)


@pytest.mark.slow
def test_optsel_train_runs_with_the_plugin_selector(first_k_site, data_dir, tmp_path):
    """Two steps of one-process FSDP2 training: each step trains on the first k rows of its pool."""
    overrides = {
        "data.local": data_dir,
        "output_dir": tmp_path,
        "run_name": "first_k",
        "engine.name": "fsdp2",
        "selection.method": "first_k",
        "selection.pool_size": 16,
        "selection.budget": 4,
        "selection.num_target_samples": 4,
        "training.num_steps": 2,
        "training.eval_every": 0,
        "training.num_eval_samples": 4,
        "training.max_new_tokens": 2,
        "training.progress_bar": "false",
        "training.callbacks.plot": "false",
        "monitoring.enabled": "false",
        "checkpoint.every_steps": 0,
    }
    done = _run(
        first_k_site,
        ["-m", "optsel.launch.cli", "train", "configs/demo.yaml", *(f"{k}={v}" for k, v in overrides.items())],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "first_k" / "selections.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert step["sample_ids"] == step["pool_sample_ids"][:4] and step["weights"] == [0.25] * 4
    assert json.loads((tmp_path / "first_k" / "summary.json").read_text())["method"] == "first_k"
