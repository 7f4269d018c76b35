"""Metrics sinks with real parts: prometheus-client registries and HTTP servers scraped over HTTP,
promtool on the scraped text and the ops files, node-exporter textfiles, 2 gloo ranks with per-rank
endpoints. promtool comes from scripts/install_prometheus.sh (CI runs it before pytest)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from optsel.config_loader import ConfigError, from_mapping
from optsel.distributed import DistInfo
from optsel.monitoring import targets_from_slurm
from optsel.monitoring.metrics import MAX_LABEL_VALUES, OptselMetrics, exported_names
from optsel.monitoring.sinks import (
    JsonlSink,
    MetricsSink,
    MonitoringConfig,
    MultiSink,
    PortInUseError,
    PrometheusSink,
    TextfileSink,
    build_sinks,
)

from support.common import REPO
from support.dist import run_distributed

MONITORING = REPO / "monitoring"
LABELS = {"run": "demo", "engine": "fsdp2", "method": "ftw"}


def require_tool(name: str) -> str:
    """Path of a Prometheus tool; fail (root or CI=true: scripts/install_prometheus.sh must have run)
    or, for a non-root developer without it, skip loudly."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found: run scripts/install_prometheus.sh (apt-get installs Debian's prometheus)"
    if os.environ.get("CI") == "true" or os.geteuid() == 0:
        pytest.fail(message)
    pytest.skip("!!! SKIPPED, NOT TESTED: " + message)


def step_dict(step: int, loss: float = 2.0) -> dict[str, float]:
    """A synthetic per-step dict with the keys of docs/architecture.md."""
    return {
        "train/loss": loss,
        "train/lr": 1e-4,
        "train/grad_norm": 0.5,
        "train/tokens": 100.0,
        "train/samples": 4.0,
        "train/tokens_per_second": 1000.0,
        "train/samples_per_second": 40.0,
        "train/pool_samples_per_second": 80.0,
        "train/samples_seen": 8.0 * step,
        "train/skipped_steps": 0.0,
        "time/step_seconds": 0.1,
        "time/phase/data": 0.01,
        "time/phase/select": 0.05,
        "time/phase/solve": 0.02,
        "time/phase/train": 0.03,
        "select/pool_size": 8.0,
        "select/filtered": 6.0,
        "select/selected": 4.0,
        "select/ess": 3.2,
        "select/weight_entropy": 1.2,
        "select/utility_mean": 0.1,
        "select/utility_min": -0.5,
        "select/utility_max": 0.7,
        "select/gram_condition": 1e3,
        "select/comm_bytes": 4096.0,
        "select/fallback/ridge_jitter": 1.0,
        "select/solver_status/optimal": 1.0,
        "select/precision/target": 0.75,
        "select/precision/distractor/arith": 0.25,
        "eval/loss": loss + 0.5,
        "eval/exact_match": 0.1,
        "sys/rss_bytes": 1.5e8,
        "train/last_step_timestamp_seconds": 1.7e9 + step,
    }


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text, parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in parsed.items() if n == name and set(labels.items()) <= set(lab)]
    assert len(hits) == 1, f"{name} {labels}: {len(hits)} samples"
    return hits[0]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535 and port_is_free(port) and port_is_free(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


# -- the mapping -------------------------------------------------------------------------------------
def test_step_dict_maps_to_families_and_accumulates(caplog):
    registry = CollectorRegistry()
    metrics = OptselMetrics(registry, rank=0, job_level=True, labels=LABELS)
    metrics.set_info({"version": "0.1.0", "engine": "fsdp2", "method": "ftw", "world_size": "2"})
    metrics.update({"eval/loss": 3.0}, step=0)
    metrics.update({**step_dict(1), "custom/thing": 1.0}, step=1)
    second = {
        **step_dict(2, loss=1.5),
        "train/skipped_steps": 1.0,
        "train/grad_norm": float("nan"),
        "train/tokens": float("nan"),
    }
    metrics.update(second, step=2)
    got = samples(generate_latest(registry).decode())
    assert value(got, "optsel_train_loss", **LABELS) == 1.5
    assert value(got, "optsel_eval_loss") == 2.0
    assert math.isnan(value(got, "optsel_grad_norm"))
    assert value(got, "optsel_trained_tokens_total") == 100.0  # the NaN increment was dropped...
    assert value(got, "optsel_monitoring_invalid_values_total", rank="0") == 1.0  # ...and counted
    assert value(got, "optsel_candidates_seen_total") == 16.0
    assert value(got, "optsel_candidates_filtered_total") == 12.0
    assert value(got, "optsel_candidates_selected_total") == 8.0
    assert value(got, "optsel_skipped_steps_total") == 1.0  # cumulative key: increase only
    assert value(got, "optsel_selection_fallbacks_total", reason="ridge_jitter") == 2.0
    assert value(got, "optsel_selection_solver_status_total", status="optimal") == 2.0
    assert value(got, "optsel_selection_precision_ratio", kind="distractor/arith") == 0.25
    assert value(got, "optsel_selection_comm_bytes_total", rank="0") == 8192.0
    assert value(got, "optsel_step_duration_seconds_count", rank="0") == 2.0
    assert value(got, "optsel_step_phase_duration_seconds_sum", phase="solve") == pytest.approx(0.04)
    assert value(got, "optsel_step_duration_seconds_bucket", le="0.1") == 2.0
    assert value(got, "optsel_last_step_timestamp_seconds", rank="0") == 1.7e9 + 2
    assert value(got, "optsel_last_step", rank="0") == 2.0
    assert value(got, "optsel_steps_total", rank="0") == 2.0  # step 0 (initial eval) is not a step
    assert value(got, "optsel_monitoring_unknown_keys_total") == 1.0  # custom/thing; samples_seen is known
    assert value(got, "optsel_run_info", version="0.1.0", world_size="2", rank="0", run="demo") == 1.0
    assert "custom/thing" in caplog.text
    unlabelled = {name for name, lab in got if name.startswith("optsel_") and dict(lab).get("run") != "demo"}
    assert not unlabelled, f"families without the run label: {unlabelled}"  # every family, the info metric too
    names = {name for name, _ in got}
    assert names <= exported_names(), names - exported_names()
    assert not [n for n in names if not n.startswith("optsel_")]


def test_rank_without_job_level_exports_only_per_rank_families():
    registry = CollectorRegistry()
    OptselMetrics(registry, rank=1, job_level=False, labels=LABELS).update(step_dict(1), step=1)
    got = samples(generate_latest(registry).decode())
    assert value(got, "optsel_step_duration_seconds_count", rank="1") == 1.0
    assert value(got, "optsel_process_resident_memory_bytes", rank="1") == 1.5e8
    assert not [n for n, _ in got if n.startswith(("optsel_train_loss", "optsel_candidates", "optsel_selection_f"))]


def test_label_values_are_bounded():
    registry = CollectorRegistry()
    metrics = OptselMetrics(registry, rank=0, job_level=True)
    metrics.update({f"select/fallback/reason{i}": 1.0 for i in range(MAX_LABEL_VALUES + 10)}, step=1)
    got = samples(generate_latest(registry).decode())
    reasons = {dict(lab)["reason"] for n, lab in got if n == "optsel_selection_fallbacks_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1 and "other" in reasons
    assert value(got, "optsel_selection_fallbacks_total", reason="other") == 10.0
    with pytest.raises(ValueError, match="labels"):
        OptselMetrics(CollectorRegistry(), rank=0, job_level=True, labels={"sample_id": "7"})


def test_run_label_is_bounded_and_masked():
    """The run label is the run_name: any string a user writes, so cut to MAX_LABEL_LENGTH and masked."""
    from optsel.monitoring.metrics import MAX_LABEL_LENGTH

    registry = CollectorRegistry()
    long_run = "r" * 500 + "-token=hunter2"
    metrics = OptselMetrics(registry, rank=0, job_level=True, labels={**LABELS, "run": long_run})
    metrics.update(step_dict(1), step=1)
    metrics.set_info({"version": "0.1.0"})
    runs = {dict(lab)["run"] for n, lab in samples(generate_latest(registry).decode()) if n.startswith("optsel_")}
    assert len(runs) == 1
    (run,) = runs
    assert len(run) == MAX_LABEL_LENGTH and run.startswith("rrr") and "hunter2" not in run
    other = OptselMetrics(CollectorRegistry(), rank=0, job_level=True, labels={**LABELS, "run": "r" * 500 + "-b"})
    assert other.base_labels["run"] != run  # two long names that share a head stay apart (hash suffix)
    with pytest.raises(ValueError, match="run"):
        metrics.set_info({"run": "x"})


# -- HTTP exposition -----------------------------------------------------------------------------------
def test_live_endpoint_values_move_promtool_accepts_and_close_frees_port():
    promtool = require_tool("promtool")
    sink = PrometheusSink(MonitoringConfig(port=0), DistInfo(), LABELS)
    try:
        sink.log_info({"version": "0.1.0", "engine": "fsdp2", "method": "ftw", "world_size": "1"})
        sink.log(step_dict(1, loss=2.0), step=1)
        first = scrape(sink.url)
        sink.log(step_dict(2, loss=1.25), step=2)
        second = scrape(sink.url)
    finally:
        sink.close()
    a, b = samples(first), samples(second)
    assert value(a, "optsel_train_loss") == 2.0 and value(b, "optsel_train_loss") == 1.25
    assert value(b, "optsel_trained_tokens_total") == 2 * value(a, "optsel_trained_tokens_total") == 200.0
    assert value(b, "optsel_step_duration_seconds_count") == 2.0
    assert any(n == "process_resident_memory_bytes" for n, _ in b)  # ProcessCollector
    assert any(n == "python_info" for n, _ in b)  # PlatformCollector
    check = subprocess.run([promtool, "check", "metrics"], input=second, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not sink.server._thread.is_alive()
    again = PrometheusSink(MonitoringConfig(port=sink.port), DistInfo(), LABELS)  # close() released the port
    again.close()
    sink.close()  # idempotent


def test_port_in_use_is_a_clear_error_or_the_next_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MonitoringConfig(port=port)
        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*monitoring\.port"):
            build_sinks(cfg, tmp_path, rank=0, local_rank=0, world_size=1, engine="fsdp2", method="ftw")
        sink = PrometheusSink(MonitoringConfig(port=port, port_in_use="next", max_port_tries=20), DistInfo(), LABELS)
        try:
            assert sink.port != port and port < sink.port < port + 20
            sink.log(step_dict(1), step=1)
            assert value(samples(scrape(sink.url)), "optsel_train_loss") == 2.0
        finally:
            sink.close()


def test_two_sinks_in_one_process_have_separate_registries():
    """Two runs of the same engine and method: only the run label tells their series apart."""
    first, second = (PrometheusSink(MonitoringConfig(port=0), DistInfo(), {**LABELS, "run": r}) for r in ("a", "b"))
    try:
        first.log({"train/loss": 1.0}, step=1)
        second.log({"train/loss": 2.0}, step=1)
        a, b = samples(scrape(first.url)), samples(scrape(second.url))
        assert value(a, "optsel_train_loss", run="a") == 1.0
        assert not [k for k in a if ("run", "b") in k[1]]
        assert value(b, "optsel_train_loss", run="b") == 2.0
        optsel_series = [k for k in (*a, *b) if k[0].startswith("optsel_")]
        assert len(optsel_series) == len(set(optsel_series))  # both in one Prometheus: no series collides
    finally:
        first.close()
        second.close()


# -- files ---------------------------------------------------------------------------------------------
def test_textfile_sink_rewrites_atomically(tmp_path):
    path = tmp_path / "textfile" / "optsel.prom"
    sink = TextfileSink(path, DistInfo(), LABELS)
    assert path.exists()  # written at start: a bad path fails before training
    sink.log(step_dict(1, loss=3.0), step=1)
    assert value(samples(path.read_text()), "optsel_train_loss") == 3.0
    sink.log(step_dict(2, loss=2.5), step=2)
    assert value(samples(path.read_text()), "optsel_train_loss") == 2.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["optsel.prom"]  # no temp files left
    assert not [n for n, _ in samples(path.read_text()) if n.startswith("process_")]
    with pytest.raises(ValueError, match="textfile"):
        TextfileSink(tmp_path / "optsel.txt", DistInfo())


def test_jsonl_sink_writes_flushed_strict_json_lines(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log_info({"version": "0.1.0", "method": "ftw"})
    sink.log({"train/loss": 2.0, "train/grad_norm": float("nan")}, step=1)
    sink.log({"train/loss": 1.0, "eval/loss": float("inf")}, step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close: flushed per line
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 2.0 and records[0]["train/grad_norm"] is None
    assert records[1]["eval/loss"] is None
    assert json.loads((tmp_path / "metrics.info.json").read_text())["method"] == "ftw"
    sink.close()
    sink.close()


def test_build_sinks_by_rank(tmp_path):
    cfg = MonitoringConfig(port=0, textfile=str(tmp_path / "node" / "optsel.prom"))
    rank0 = build_sinks(cfg, tmp_path / "run", rank=0, local_rank=0, world_size=2, engine="deepspeed", method="ftw")
    rank1 = build_sinks(cfg, tmp_path / "run", rank=1, local_rank=1, world_size=2, engine="deepspeed", method="ftw")
    per_rank = MonitoringConfig(port=0, per_rank_endpoints=True, textfile=cfg.textfile, jsonl=False)
    rank1_per = build_sinks(
        per_rank, tmp_path / "run", rank=1, local_rank=1, world_size=2, engine="deepspeed", method="ftw"
    )
    try:
        assert [type(s) for s in rank0] == [JsonlSink, TextfileSink, PrometheusSink]
        assert rank1 == []
        assert [type(s) for s in rank1_per] == [TextfileSink, PrometheusSink]
        assert rank1_per[0].path.name == "optsel.rank1.prom"
        target = json.loads((tmp_path / "run" / "prometheus" / "rank0.json").read_text())
        assert target[0]["targets"] == [f"127.0.0.1:{rank0[2].port}"]
        assert target[0]["labels"] == {"optsel_endpoint": "job"}  # no run given: no optsel_run target label
        MultiSink(rank0).log(step_dict(1), step=1)
        assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["select/ess"] == 3.2
    finally:
        MultiSink(rank0 + rank1_per).close()


def test_multisink_survives_a_broken_sink(tmp_path, caplog):
    class Broken(MetricsSink):
        def log(self, metrics, step):
            raise OSError("disk full")

    good = JsonlSink(tmp_path / "m.jsonl")
    multi = MultiSink([Broken(), good])
    multi.log({"train/loss": 1.0}, step=1)
    multi.log({"train/loss": 0.5}, step=2)
    multi.close()
    assert multi.failures == {"Broken": 2}
    assert "disk full" in caplog.text
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_config_is_strict():
    cfg = from_mapping(MonitoringConfig, {"port": 9500, "port_in_use": "next"}, "monitoring")
    assert cfg.port == 9500 and cfg.bind_address == "127.0.0.1"
    with pytest.raises(ConfigError, match="monitoring.port_in_use"):
        from_mapping(MonitoringConfig, {"port_in_use": "retry"}, "monitoring")
    with pytest.raises(ConfigError, match="monitoring.prot"):
        from_mapping(MonitoringConfig, {"prot": 1}, "monitoring")
    with pytest.raises(ValueError, match="port:"):
        MonitoringConfig(port=70000)
    with pytest.raises(ValueError, match="textfile:"):
        MonitoringConfig(textfile="/tmp/x.txt")


# -- ops files -----------------------------------------------------------------------------------------
def test_promtool_accepts_alert_rules_and_scrape_configs():
    promtool = require_tool("promtool")
    prom = MONITORING / "prometheus"
    rules = subprocess.run([promtool, "check", "rules", str(prom / "alerts.yml")], capture_output=True, text=True)
    assert rules.returncode == 0 and "6 rules found" in rules.stdout, rules.stdout + rules.stderr
    for name in ("scrape-static.yml", "scrape-file-sd.yml"):
        check = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(prom / name)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_rule_unit_tests_fire_the_alerts():
    """monitoring/prometheus/alerts_test.yml: synthetic series must fire (and not fire) each alert."""
    promtool = require_tool("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=MONITORING / "prometheus", capture_output=True, text=True
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_dashboard_and_alerts_use_only_exported_metrics():
    dashboard = json.loads((MONITORING / "grafana" / "optsel-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("tokens", "loss", "effective sample size", "fallbacks", "skew"):
        assert topic in titles
    exprs.append((MONITORING / "prometheus" / "alerts.yml").read_text())
    used = {name for expr in exprs for name in re.findall(r"\boptsel_[a-z_]+", expr)}
    assert used and used <= exported_names(), used - exported_names()
    readme = (MONITORING / "README.md").read_text()
    for name in {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}:
        assert f"`{name}" in readme, f"{name} missing from the metric table in monitoring/README.md"


def test_targets_from_slurm_nodelist_and_hostfile(tmp_path):
    assert targets_from_slurm._expand_hostlist("node[01-03,07],gpu5") == [
        "node01",
        "node02",
        "node03",
        "node07",
        "gpu5",
    ]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# deepspeed hostfile\nworker-0 slots=2\nworker-1 slots=2\n")
    out = tmp_path / "sd" / "job.json"
    assert (
        targets_from_slurm.main(
            [
                "--out",
                str(out),
                "--hostfile",
                str(hostfile),
                "--port",
                "9500",
                "--per-rank-endpoints",
                "--job",
                "123",
                "--label",
                "team=nlp",
            ]
        )
        == 0
    )
    groups = json.loads(out.read_text())
    assert groups[0] == {
        "targets": ["worker-0:9500"],
        "labels": {"optsel_job": "123", "team": "nlp", "optsel_endpoint": "job"},
    }
    assert groups[1]["targets"] == ["worker-0:9501", "worker-1:9500", "worker-1:9501"]
    targets_from_slurm.main(["--out", str(out), "--nodelist", "gpu[1-2]", "--ranks-per-node", "4", "--job", "9"])
    assert json.loads(out.read_text()) == [
        {"targets": ["gpu1:9477"], "labels": {"optsel_job": "9", "optsel_endpoint": "job"}}
    ]
    with pytest.raises(ValueError, match="hostfile"):
        empty = tmp_path / "empty"
        empty.write_text("# nothing\n")
        targets_from_slurm.parse_hostfile(empty)


# -- 2 gloo ranks, per-rank endpoints --------------------------------------------------------------------
def _rank_body(rank: int, world_size: int, base_port: int, run_dir: str) -> dict:
    """What the trainer does on each rank: build_sinks, log every step; rank 0 then scrapes both endpoints."""
    from optsel import distributed

    cfg = MonitoringConfig(port=base_port, per_rank_endpoints=True, jsonl=False)
    info = distributed.info()
    sinks = MultiSink(
        build_sinks(
            cfg,
            run_dir,
            rank=info.rank,
            local_rank=info.local_rank,
            world_size=info.world_size,
            engine="fsdp2",
            method="ftw",
            run="demo",
        )
    )
    try:
        for step in (1, 2, 3):
            local_loss = torch.tensor([float(rank + step)])
            job_loss = float(distributed.all_reduce_sum(local_loss)) / world_size  # the job-level value
            metrics = step_dict(step, loss=job_loss)
            metrics["time/step_seconds"] = 0.1 * (rank + 1)  # rank 1 is slower: skew
            sinks.log(metrics, step=step)
        distributed.barrier()  # both endpoints have 3 steps
        scraped = {}
        if rank == 0:
            for r in range(world_size):
                scraped[r] = scrape(f"http://127.0.0.1:{base_port + r}/metrics")
        distributed.barrier()  # keep every endpoint up until rank 0 has read it
        (prom,) = [s for s in sinks.sinks if isinstance(s, PrometheusSink)]
        return {"port": prom.port, "scraped": scraped, "failures": sinks.failures}
    finally:
        sinks.close()


@pytest.mark.distributed
def test_two_gloo_ranks_serve_per_rank_endpoints_and_rank0_job_level(tmp_path):
    base = free_port_pair()
    results = run_distributed(_rank_body, world_size=2, args=(base, str(tmp_path)), timeout_s=90)
    assert [r["port"] for r in results] == [base, base + 1]
    assert [r["failures"] for r in results] == [{}, {}]
    targets = [json.loads((tmp_path / "prometheus" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [t[0]["targets"] for t in targets] == [[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]
    assert [t[0]["labels"] for t in targets] == [
        {"optsel_endpoint": "job", "optsel_run": "demo"},
        {"optsel_endpoint": "rank", "optsel_run": "demo"},
    ]
    rank0, rank1 = (samples(results[0]["scraped"][r]) for r in (0, 1))
    # job level on rank 0's endpoint only: mean over ranks of (rank + 3) at step 3 = 3.5
    assert value(rank0, "optsel_train_loss", **LABELS) == 3.5
    assert not [n for n, _ in rank1 if n == "optsel_train_loss"]
    # per-rank metrics on each endpoint, with its own rank label
    assert value(rank0, "optsel_step_duration_seconds_sum", rank="0") == pytest.approx(0.3)
    assert value(rank1, "optsel_step_duration_seconds_sum", rank="1", run="demo") == pytest.approx(0.6)
    assert value(rank1, "optsel_last_step", rank="1") == 3.0
    assert not [lab for n, lab in rank1 if n.startswith("optsel_") and ("rank", "0") in lab]
