"""The metrics-sink seam: every step the trainer hands one flat dict (slash keys, base units; see
docs/architecture.md, "Metrics") to each sink.

    sinks = MultiSink(build_sinks(cfg.monitoring, run_dir=..., rank=..., local_rank=..., world_size=...,
                                  engine="deepspeed", method="ftw"))      # raises PortInUseError here
    sinks.log_info({"version": ..., "engine": ..., "method": ..., "world_size": "2"})
    sinks.log(metrics, step=step)                                        # every rank, every step
    sinks.close()

Implementations: ``JsonlSink`` (one JSON object per line), ``PrometheusSink`` (HTTP endpoint, served by
prometheus-client), ``TextfileSink`` (node-exporter textfile collector), ``MultiSink`` (fan-out).
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from optsel.distributed import DistInfo
from optsel.monitoring.exposition import MetricsServer, PortInUseError, write_file_sd, write_textfile
from optsel.monitoring.metrics import OptselMetrics

log = logging.getLogger(__name__)

DEFAULT_PORT = 9477  # 9400 is dcgm-exporter's default, 9100 node-exporter's, 9090 Prometheus'


@dataclass(kw_only=True)
class MonitoringConfig:
    """Where metrics go.

    enabled: serve Prometheus metrics over HTTP (rank 0: job-level + its own per-rank metrics).
    bind_address: address the HTTP server binds ("0.0.0.0" to be scraped from other hosts).
    port: base port; rank 0 serves on it, and with ``per_rank_endpoints`` every rank serves on
        port + local_rank. 0 lets the OS pick a free port (tests); the bound port is logged and written
        as a file_sd target file to <run_dir>/prometheus/rank<r>.json.
    per_rank_endpoints: every rank exports its own per-rank metrics (endpoint and textfile), not only rank 0.
    port_in_use: "error" fails at start naming address:port; "next" takes the next free port.
    max_port_tries: ports tried with port_in_use="next".
    idle_timeout_s: seconds a scrape connection may stay silent before the server drops it.
    max_connections: scrape connections served at once (more are closed on accept).
    textfile: path of a node-exporter textfile (*.prom), rewritten atomically each step; ranks > 0
        (with per_rank_endpoints) write <stem>.rank<r>.prom next to it. None: no textfile.
    jsonl: rank 0 appends every step to <run_dir>/metrics.jsonl.
    """

    enabled: bool = True  #: serve Prometheus metrics over HTTP (rank 0: job-level + its own per-rank metrics)
    bind_address: str = "127.0.0.1"  #: address the HTTP server binds (0.0.0.0 to be scraped from other hosts)
    port: int = DEFAULT_PORT  #: base port (rank r serves on port + local_rank with per_rank_endpoints; 0: the OS picks)
    per_rank_endpoints: bool = False  #: every rank exports its own per-rank metrics, not only rank 0
    #: error: fail at start naming address:port; next: take the next free port
    port_in_use: Literal["error", "next"] = "error"
    max_port_tries: int = 10  #: ports tried with port_in_use next
    idle_timeout_s: float = 10.0  #: seconds a scrape connection may stay silent before the server drops it
    max_connections: int = 16  #: scrape connections served at once (more are closed on accept)
    textfile: str | None = None  #: a node-exporter textfile (*.prom) rewritten each step (null: none)
    jsonl: bool = True  #: rank 0 appends every step to <run_dir>/metrics.jsonl

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        if self.port_in_use not in ("error", "next"):
            raise ValueError(f"port_in_use: expected 'error' or 'next', got {self.port_in_use!r}")
        if self.max_port_tries < 1:
            raise ValueError(f"max_port_tries: must be >= 1, got {self.max_port_tries}")
        if not (math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0):
            raise ValueError(f"idle_timeout_s: must be a finite number of seconds > 0, got {self.idle_timeout_s}")
        if not 1 <= self.max_connections <= 1024:
            raise ValueError(f"max_connections: must be in 1..1024, got {self.max_connections}")
        if not self.bind_address:
            raise ValueError("bind_address: must not be empty (use 127.0.0.1, 0.0.0.0 or a host address)")
        if self.textfile is not None and not str(self.textfile).endswith(".prom"):
            raise ValueError(f"textfile: {self.textfile!r} must end in .prom (node-exporter reads only *.prom)")


class MetricsSink(ABC):
    """Receives the per-step metrics dict. ``log`` is called on every rank; sinks decide what to keep."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """One step's metrics (slash keys, base units); step is the optimizer step (0 = before training)."""

    def log_info(self, info: dict[str, str]) -> None:  # noqa: B027  (optional hook: a sink may ignore it)
        """Run metadata (version, engine, method, world_size, ...), once at start."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Flush and release files, sockets, threads (idempotent)."""


class JsonlSink(MetricsSink):
    """Appends ``{"step": s, "time": unix_seconds, <key>: value, ...}`` per line to ``path``, flushed
    each line. Non-finite values are written as null (strict JSON). Run info goes to
    ``<path stem>.info.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record: dict[str, float | None] = {"step": int(step), "time": time.time()}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def log_info(self, info: dict[str, str]) -> None:
        self.path.with_name(self.path.stem + ".info.json").write_text(json.dumps(info, indent=2) + "\n")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class PrometheusSink(MetricsSink):
    """Serves optsel's metrics (monitoring/metrics.py) plus process, platform and GC metrics on
    ``config.bind_address:port`` with prometheus-client's HTTP server, from a registry of its own.

    port = config.port (+ rank_info.local_rank when config.per_rank_endpoints). Rank 0 also exports
    the job-level families. Raises ``PortInUseError`` at construction if the port is taken.
    labels: constant ``run`` / ``engine`` / ``method`` label values. targets_dir: where to write this
    endpoint's file_sd target file (``rank<r>.json``, with the target labels ``optsel_endpoint`` and,
    given a run, ``optsel_run``: on every series of the target, process_* too), or None.
    """

    def __init__(
        self,
        config: MonitoringConfig,
        rank_info: DistInfo,
        labels: dict[str, str] | None = None,
        targets_dir: str | Path | None = None,
    ):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.metrics = OptselMetrics(self.registry, rank=rank_info.rank, job_level=rank_info.rank == 0, labels=labels)
        port = config.port + (rank_info.local_rank if config.per_rank_endpoints and config.port else 0)
        if port > 65535:
            raise PortInUseError(f"monitoring.port: {config.port} + local rank {rank_info.local_rank} exceeds 65535")
        self.server = MetricsServer(
            self.registry,
            addr=config.bind_address,
            port=port,
            on_in_use=config.port_in_use,
            max_tries=config.max_port_tries,
            idle_timeout_s=config.idle_timeout_s,
            max_connections=config.max_connections,
        )
        self.port = self.server.port
        if targets_dir is not None:
            target_labels = {"optsel_endpoint": "job" if rank_info.rank == 0 else "rank"}
            if (labels or {}).get("run"):
                target_labels["optsel_run"] = self.metrics.base_labels["run"]  # bounded and masked
            write_file_sd(
                Path(targets_dir) / f"rank{rank_info.rank}.json", config.bind_address, self.port, target_labels
            )

    @property
    def url(self) -> str:
        return self.server.url

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics, step)

    def log_info(self, info: dict[str, str]) -> None:
        self.metrics.set_info(info)

    def close(self) -> None:
        self.server.close()


class TextfileSink(MetricsSink):
    """Rewrites ``path`` (*.prom) atomically after every ``log`` for node-exporter's textfile collector
    (air-gapped nodes, no HTTP server). Only optsel's own families: process metrics would collide
    across the ranks' files."""

    def __init__(self, path: str | Path, rank_info: DistInfo, labels: dict[str, str] | None = None):
        self.path = Path(path)
        self.registry = CollectorRegistry()
        self.metrics = OptselMetrics(self.registry, rank=rank_info.rank, job_level=rank_info.rank == 0, labels=labels)
        write_textfile(self.path, self.registry)  # fail at start on a bad path, not mid-run

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics, step)
        write_textfile(self.path, self.registry)

    def log_info(self, info: dict[str, str]) -> None:
        self.metrics.set_info(info)
        write_textfile(self.path, self.registry)


class MultiSink(MetricsSink):
    """Fans out to ``sinks``. A sink that raises in ``log``/``log_info`` is logged (with traceback, once
    per sink) and counted in ``self.failures``; training goes on and the other sinks still get the step."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = list(sinks)
        self.failures: dict[str, int] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            self._guard(sink, sink.log, metrics, step)

    def log_info(self, info: dict[str, str]) -> None:
        for sink in self.sinks:
            self._guard(sink, sink.log_info, info)

    def close(self) -> None:
        for sink in self.sinks:
            self._guard(sink, sink.close)

    def _guard(self, sink: MetricsSink, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a broken sink must not end training
            name = type(sink).__name__
            self.failures[name] = self.failures.get(name, 0) + 1
            if self.failures[name] == 1:
                log.exception(
                    "metrics sink %s failed (counted in MultiSink.failures; further failures are logged at DEBUG)", name
                )
            else:
                log.debug("metrics sink %s failed again", name, exc_info=True)


def build_sinks(
    cfg: MonitoringConfig,
    run_dir: str | Path,
    rank: int,
    local_rank: int,
    world_size: int,
    engine: str,
    method: str,
    run: str = "",
) -> list[MetricsSink]:
    """The sinks this rank needs: JSONL on rank 0; Prometheus endpoint and textfile on rank 0, and on
    every rank with ``cfg.per_rank_endpoints``. ``run`` (the run_name) is the ``run`` label of every
    family. Raises ``PortInUseError`` (before training) when the port is taken and
    ``cfg.port_in_use == "error"``."""
    run_dir = Path(run_dir)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    labels = {"run": run, "engine": engine, "method": method}
    exports = rank == 0 or cfg.per_rank_endpoints
    sinks: list[MetricsSink] = []
    try:
        if cfg.jsonl and rank == 0:
            sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
        if cfg.textfile is not None and exports:
            path = Path(cfg.textfile)
            if rank != 0:
                path = path.with_name(f"{path.stem}.rank{rank}.prom")
            sinks.append(TextfileSink(path, info, labels))
        if cfg.enabled and exports:
            sinks.append(PrometheusSink(cfg, info, labels, targets_dir=run_dir / "prometheus"))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = [
    "DEFAULT_PORT",
    "JsonlSink",
    "MetricsSink",
    "MonitoringConfig",
    "MultiSink",
    "PortInUseError",
    "PrometheusSink",
    "TextfileSink",
    "build_sinks",
]
