"""The container is real: the CPU image is built with podman from a debootstrapped Debian base
(scripts/container_image.sh), then `optsel prepare` and a 2-rank demo run inside it as the non-root
user with the data and run folders mounted from the host, the metrics endpoint is scraped from
outside the container while it trains, and the image's Python packages are the pinned set.

If podman cannot run here the test fails with podman's own reason: it is never skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.common import REPO

IMAGE = os.environ.get("OPTSEL_IMAGE", "localhost/optsel:0.1.0-cpu")
UID = 1000  # the image's user `optsel`


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(REPO / "scripts/containers/containers.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(REPO / "scripts/containers/storage.conf")
    return env


def _podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(
            f"podman {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done


def _host_folder(path: Path) -> Path:
    """A host folder the container's user can write (podman runs as root here; the user is uid 1000)."""
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_cpu_image_builds_and_runs_the_demo(tmp_path):
    tools = subprocess.run(
        ["bash", str(REPO / "scripts/install_container_tools.sh")], capture_output=True, text=True, timeout=900
    )
    assert tools.returncode == 0, f"cannot install podman/debootstrap: {tools.stderr[-3000:]}"
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, f"podman cannot run on this machine: {info.stderr[-3000:]}"
    assert info.stdout.split() == ["runc", "overlay"], info.stdout

    # 1. Build (cached layers make a rebuild after a source change cheap; see the script).
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(REPO / "scripts/container_image.sh")],
        env={**_env(), "OPTSEL_IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=2700,
    )
    build_s = time.monotonic() - started
    assert built.returncode == 0, f"image build failed after {build_s:.0f} s:\n{built.stderr[-6000:]}"
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"image {IMAGE}: build {build_s:.0f} s, {size / 1e6:.0f} MB")
    inspected = json.loads(_podman("image", "inspect", IMAGE).stdout)[0]
    assert inspected["Config"]["User"] == "optsel" and "9477/tcp" in inspected["Config"]["ExposedPorts"]
    assert "127.0.0.1:9477/metrics" in inspected["Healthcheck"]["Test"][-1]

    # 5. The image's Python packages are exactly the pinned set (plus optsel's wheel).
    frozen = _podman("run", "--rm", "--entrypoint", "python", IMAGE, "-m", "pip", "list", "--format=freeze").stdout
    installed = {
        re.sub(r"[-_.]+", "-", n).lower(): v.split("+")[0]
        for n, v in (line.split("==") for line in frozen.splitlines() if "==" in line)
    }
    pinned = dict(
        line.split("==")
        for line in (REPO / "requirements/lock.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    wrong = {n: (v, installed.get(n)) for n, v in pinned.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(pinned) - {"optsel"})
    assert not wrong and not extra, f"image differs from requirements/lock.txt: wrong {wrong}, unpinned {extra}"
    assert installed["optsel"] == "0.1.0"
    location = _podman(
        "run",
        "--rm",
        "--entrypoint",
        "python",
        IMAGE,
        "-c",
        "import optsel, optsel.resources as r; print(optsel.__file__, r.dashboard_path())",
    ).stdout
    assert "/site-packages/optsel/" in location and "/site-packages/optsel/monitoring/grafana/" in location  # a wheel

    # 2. prepare and a 2-rank demo as the non-root user, data and runs mounted from the host.
    data = _host_folder(tmp_path / "data")
    runs = _host_folder(tmp_path / "runs")
    mounts = ["-v", f"{data}:/workspace/data", "-v", f"{runs}:/workspace/runs"]
    prepared = _podman(
        "run",
        "--rm",
        *mounts,
        IMAGE,
        "prepare",
        "prepare_synthetic",
        "synthetic.num_train=2048",
        "synthetic.num_val=160",
        timeout=600,
    )
    assert (data / "synthetic" / "train" / "index.json").is_file(), prepared.stdout[-2000:]
    assert (data / "synthetic" / "train" / "index.json").stat().st_uid == UID

    port = _free_port()
    name = f"optsel-ci-{os.getpid()}"
    _podman(
        "run",
        "-d",
        "--name",
        name,
        "--shm-size",
        "1g",
        "-p",
        f"127.0.0.1:{port}:9477",
        *mounts,
        IMAGE,
        "launch",
        "--nproc",
        "2",
        "demo",
        "monitoring.bind_address=0.0.0.0",
        "training.num_steps=16",
        "training.eval_every=0",
        "training.num_eval_samples=16",
        "training.progress_bar=false",
        "checkpoint.every_steps=8",
    )
    try:
        # 3. Scrape the endpoint from outside the container while it trains; the HEALTHCHECK passes then.
        seen: list[float] = []
        healthy = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(seen) < 2:
            state = _podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                if state != "true":
                    break
                time.sleep(0.5)
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if (
                        sample.name == "optsel_steps_total"
                        and sample.value > 0
                        and (not seen or sample.value > seen[-1])
                    ):
                        seen.append(sample.value)
            if healthy is None:
                healthy = _podman("healthcheck", "run", name, check=False)
            time.sleep(0.5)
        exit_code = _podman("wait", name, timeout=900).stdout.strip()
        logs = _podman("logs", name).stdout + _podman("logs", name).stderr
    finally:
        _podman("rm", "-f", name, check=False)
    assert exit_code == "0", f"demo exited with {exit_code}:\n{logs[-5000:]}"
    assert len(seen) >= 2 and seen[-1] > seen[0], (
        f"steps counter not scraped moving from outside: {seen}\n{logs[-3000:]}"
    )
    assert healthy is not None and healthy.returncode == 0, healthy.stdout + healthy.stderr if healthy else "no probe"

    # 4. The host's run folder holds the summary and the checkpoints, written by the container's user.
    summary = json.loads((runs / "demo" / "summary.json").read_text())
    assert summary["num_steps"] == 16 and summary["world_size"] == 2 and summary["engine"] == "deepspeed"
    checkpoints = sorted(p.name for p in (runs / "demo" / "checkpoints").iterdir())
    assert len(checkpoints) >= 1 and any("16" in c for c in checkpoints), checkpoints
    assert (runs / "demo" / "summary.json").stat().st_uid == UID
    shutil.rmtree(tmp_path, ignore_errors=True)
