"""The package outside the checkout: built-in files through importlib.resources, configs by name,
relative paths resolved against the config file's folder, and a built wheel that trains from a fresh
virtual environment in a directory that is not the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from optsel import resources
from optsel.config_loader import ConfigError
from optsel.pipeline.train.run_config import load_prepare_config, load_run_config

from support.common import REPO

BUNDLED = [
    "demo",
    "prepare_synthetic",
    "prepare_jsonl_example",
    "prepare_pysource",
    "deepspeed/zero3.json",
    "deepspeed/zero3_cpu_adam.json",
    "slurm/optsel-srun.sbatch",
    "slurm/optsel-torchrun.sbatch",
    "grafana/optsel-dashboard.json",
    "prometheus/alerts.yml",
]


def test_builtin_files_found_by_name():
    files = resources.builtin_files()
    for name in BUNDLED:
        assert name in files and files[name].is_file(), name
    assert json.loads(resources.dashboard_path().read_text())["panels"]
    assert "groups:" in resources.alert_rules_path().read_text()
    with pytest.raises(FileNotFoundError, match="built-in: .*demo"):
        resources.builtin_path("nosuch")


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "ds").mkdir(parents=True)
    (project / "ds" / "z3.json").write_text((REPO / "configs/deepspeed/zero3.json").read_text())
    (project / "run.yaml").write_text(
        "run_name: r\noutput_dir: out\ndata: {local: ../shared/data}\ntraining: {num_steps: 1}\n"
        'engine: {deepspeed_config: ds/z3.json}\ncheckpoint: {dir: "${PWD}/ckpt", resume: auto}\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("OPTSEL_TEST_ROOT", str(tmp_path / "env"))
    config = load_run_config(
        project / "run.yaml", ["monitoring.textfile=${OPTSEL_TEST_ROOT}/m.prom", "data.cache_dir=cache"]
    )
    assert config.output_dir == str(project / "out")
    assert config.data.local == str(tmp_path / "shared" / "data")
    assert config.engine.deepspeed_config == str(project / "ds" / "z3.json")
    assert config.checkpoint.dir == str(elsewhere / "ckpt")  # $PWD: the current directory
    assert config.checkpoint.resume == "auto"
    assert config.monitoring.textfile == str(tmp_path / "env" / "m.prom")  # overrides: environment + current directory
    assert config.data.cache_dir == str(elsewhere / "cache")
    # A config that does not name a DeepSpeed JSON gets the bundled one, from any directory.
    (project / "bare.yaml").write_text("data: {local: d}\ntraining: {num_steps: 1}\n")
    assert load_run_config(project / "bare.yaml").engine.deepspeed_config == str(
        resources.builtin_path("deepspeed/zero3.json")
    )
    with pytest.raises(ConfigError, match=r"config key 'output_dir'.*\$OPTSEL_UNSET_VAR"):
        load_run_config(project / "bare.yaml", ["output_dir=$OPTSEL_UNSET_VAR/x"])


def test_builtin_configs_by_name_write_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_run_config("demo")
    assert config.data.local == str(tmp_path / "data" / "synthetic")
    assert config.output_dir == str(tmp_path / "runs")
    assert Path(config.engine.deepspeed_config) == resources.builtin_path("deepspeed/zero3.json")
    assert load_prepare_config("prepare_synthetic").out_dir == str(tmp_path / "data" / "synthetic")
    (tmp_path / "demo").mkdir()  # a folder named like the built-in does not shadow it; a file would
    assert load_run_config("demo.yaml").run_name == "demo"
    with pytest.raises(ConfigError, match="no built-in config of that name; built-in: demo"):
        load_run_config("demo_typo")


def test_every_python_folder_is_a_listed_package():
    """A subpackage missing from pyproject's explicit list is left out of the wheel (and the container):
    every folder holding an __init__.py under a mapped package directory must be listed."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    for package, folder in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *rel.parts])
            assert name in listed, f"{name} ({init.parent.relative_to(REPO)}) is not in pyproject's packages"


def test_lock_is_the_tested_environment():
    """requirements/lock.txt (what the container image installs) pins what this environment runs."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_lock.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lock = (REPO / "requirements/lock.txt").read_text()
    for pin in ("torch==2.13.0", "deepspeed==0.19.8", "mosaicml-streaming==0.13.0"):
        assert f"\n{pin}\n" in lock, pin


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


@pytest.mark.slow
def test_wheel_trains_from_a_fresh_venv_outside_the_checkout(tmp_path):
    """Build the wheel, install it (no editable link, no checkout on sys.path) into a new venv, and from
    a folder outside the checkout prepare data, train with the default engine and read the bundled files.

    The new venv sees the dependencies of the tested environment through a .pth line (the same pinned
    versions, requirements/lock.txt; reinstalling torch and DeepSpeed here would add minutes and test
    pip, not optsel); optsel itself comes only from the wheel. The container test installs the wheel
    with its whole dependency set from scratch."""
    dist = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(dist),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "would be ignored" not in built.stderr
    (wheel,) = dist.glob("optsel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in [
        "optsel/configs/demo.yaml",
        "optsel/configs/deepspeed/zero3.json",
        "optsel/launch/slurm/optsel-torchrun.sbatch",
        "optsel/monitoring/grafana/optsel-dashboard.json",
        "optsel/monitoring/prometheus/alerts.yml",
    ]:
        assert member in names, member

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [_venv_python(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "tested-stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(_venv_python(venv)),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "work"  # not the checkout, and the checkout is not on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=f"{venv / 'bin'}:{env['PATH']}")
    optsel = [str(venv / "bin" / "optsel")]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(optsel + list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"optsel {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done

    where = subprocess.run(
        [
            _venv_python(venv),
            "-c",
            "import optsel, optsel.resources as r, json; "
            "print(json.dumps([optsel.__file__, str(r.dashboard_path()), str(r.builtin_path('demo'))]))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(site) and not Path(path).is_relative_to(REPO), path
    dashboard = Path(run("configs", "path", "grafana/optsel-dashboard.json").stdout.strip())
    assert dashboard.is_relative_to(site) and json.loads(dashboard.read_text())["panels"]
    assert "slurm/optsel-torchrun.sbatch" in run("configs", "list").stdout
    assert "zero_optimization" in run("configs", "show", "deepspeed/zero3.json").stdout

    run("prepare", "prepare_synthetic", "synthetic.num_train=512", "synthetic.num_val=64")
    assert (work / "data" / "synthetic" / "train" / "index.json").is_file()
    # A user config next to the data, naming no DeepSpeed JSON: the default engine with its bundled config.
    (work / "cfg").mkdir()
    (work / "cfg" / "tiny.yaml").write_text(
        "run_name: tiny\noutput_dir: ../runs\ndata: {local: ../data/synthetic}\n"
        "training: {num_steps: 2, num_eval_samples: 8, max_new_tokens: 2, progress_bar: false}\n"
        "selection: {method: random, pool_size: 8, budget: 4, num_target_samples: 4}\n"
        "monitoring: {enabled: false}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        optsel + ["train", str(work / "cfg" / "tiny.yaml")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((work / "runs" / "tiny" / "summary.json").read_text())
    assert summary["num_steps"] == 2
    resolved = (work / "runs" / "tiny" / "config.yaml").read_text()
    assert "engine" in resolved and str(dashboard.parents[2] / "configs" / "deepspeed" / "zero3.json") in resolved
