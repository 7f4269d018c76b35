"""End to end with a real Prometheus server: two optsel endpoints (rank 0 job-level, rank 1 per-rank,
ports base and base+1 as a 2-rank job uses them), a file_sd target file written by
targets_from_slurm, Prometheus on 127.0.0.1 with a 1 s scrape interval and optsel's alert rules,
queried back through /api/v1/query and /api/v1/alerts. A second run of the same engine and method,
on the same host and job (its target from the file_sd file the sink writes itself), is told apart by
its ``run`` label."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from test_metrics import LABELS, MONITORING, free_port_pair, require_tool, step_dict

from optsel.distributed import DistInfo
from optsel.monitoring import targets_from_slurm
from optsel.monitoring.sinks import MonitoringConfig, MultiSink, PrometheusSink


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_for(what: str, fn, timeout_s: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}"
            )
        try:
            last = fn()
            if last:
                return last
        except OSError as err:  # not listening yet
            last = err
        time.sleep(0.25)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what} (last: {last!r}):\n{log.read_text()[-3000:]}"
    )


def test_real_prometheus_scrapes_both_ranks_and_evaluates_rules(tmp_path):
    prometheus = require_tool("prometheus")
    base = free_port_pair()
    cfg = MonitoringConfig(port=base, per_rank_endpoints=True)
    sinks = MultiSink([PrometheusSink(cfg, DistInfo(rank=r, world_size=2, local_rank=r), LABELS) for r in (0, 1)])
    other = PrometheusSink(
        MonitoringConfig(port=0), DistInfo(), {**LABELS, "run": "other"}, targets_dir=tmp_path / "sd"
    )  # writes sd/rank0.json: {optsel_run: other}
    other.log(step_dict(1, loss=7.0), step=1)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=2\n")
    targets_from_slurm.main(
        [
            "--out",
            str(tmp_path / "sd" / "optsel.json"),
            "--hostfile",
            str(hostfile),
            "--port",
            str(base),
            "--per-rank-endpoints",
            "--job",
            "e2e",
        ]
    )
    shutil.copy(MONITORING / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: optsel\n"
        f"    file_sd_configs: [{{files: ['{tmp_path / 'sd'}/*.json'], refresh_interval: 1s}}]\n"
    )
    web = free_port_pair()
    api = f"http://127.0.0.1:{web}/api/v1"
    log = tmp_path / "prometheus.log"
    sinks.log(step_dict(1, loss=2.0), step=1)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def query(expr: str) -> list:
            return _get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]

        up = _wait_for("all targets up", lambda: len(query("up == 1")) == 3 and query("up == 1"), 30, proc, log)
        assert {r["metric"]["instance"] for r in up} == {
            f"127.0.0.1:{base}",
            f"127.0.0.1:{base + 1}",
            f"127.0.0.1:{other.port}",
        }
        assert {r["metric"].get("optsel_job") for r in up} == {"e2e", None}

        losses = _wait_for(
            "optsel_train_loss of both runs",
            lambda: len(query("optsel_train_loss")) == 2 and query("optsel_train_loss"),
            10,
            proc,
            log,
        )
        by_run = {r["metric"]["run"]: r for r in losses}  # same engine, method, host, job: run tells them apart
        assert {run: float(r["value"][1]) for run, r in by_run.items()} == {LABELS["run"]: 2.0, "other": 7.0}
        loss = by_run[LABELS["run"]]
        assert loss["metric"]["instance"] == f"127.0.0.1:{base}" and loss["metric"]["method"] == "ftw"
        assert float(query('optsel_train_loss{run="other"}')[0]["value"][1]) == 7.0
        # the run's own target file labels its target: process_* series (no run label) are found by run too
        (rss,) = query('process_resident_memory_bytes{optsel_run="other"}')
        assert rss["metric"]["instance"] == f"127.0.0.1:{other.port}"

        # values move: a new step with a NaN-skipped step reaches Prometheus and fires OptselNaNSteps
        sinks.log({**step_dict(2, loss=1.25), "train/skipped_steps": 1.0}, step=2)
        _wait_for(
            "loss 1.25", lambda: [r for r in query("optsel_train_loss") if float(r["value"][1]) == 1.25], 10, proc, log
        )

        def last_steps():  # both ranks' endpoints, scraped independently
            got = sorted(
                (r["metric"]["rank"], float(r["value"][1])) for r in query(f'optsel_last_step{{run="{LABELS["run"]}"}}')
            )
            return got if got == [("0", 2.0), ("1", 2.0)] else None

        _wait_for("step 2 from both ranks", last_steps, 10, proc, log)

        def nan_alert():
            alerts = _get(f"{api}/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "OptselNaNSteps" and a["state"] == "firing"]

        (alert,) = _wait_for("OptselNaNSteps firing", nan_alert, 15, proc, log)
        assert alert["labels"]["instance"] == f"127.0.0.1:{base}"
        rules = _get(f"{api}/rules")["data"]["groups"][0]["rules"]
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sinks.close()
        other.close()
    assert proc.returncode == 0, log.read_text()[-3000:]
