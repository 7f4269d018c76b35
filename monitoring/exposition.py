"""Serving a registry: prometheus-client's own HTTP server (with a clear error, or the next free port,
when the port is taken) and the node-exporter textfile (written atomically), for air-gapped nodes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile

log = logging.getLogger(__name__)


class PortInUseError(RuntimeError):
    """The metrics port is taken (raised at sink construction, before training starts)."""


class MetricsServer:
    """prometheus-client's HTTP server for ``registry`` on ``addr:port`` in a daemon thread.

    port: first port to try; 0 lets the OS choose a free one.
    on_in_use: "error" raises ``PortInUseError`` naming ``addr:port`` and ``config_key``; "next" tries
        port+1, port+2, ... (``max_tries`` ports in all) and logs the one it got.
    ``self.port`` is the bound port; ``close()`` stops the thread and releases the socket.
    """

    def __init__(self, registry: CollectorRegistry, *, addr: str, port: int, on_in_use: str = "error",
                 max_tries: int = 10, config_key: str = "monitoring.port"):
        if on_in_use not in ("error", "next"):
            raise ValueError(f"on_in_use: expected 'error' or 'next', got {on_in_use!r}")
        tries = 1 if on_in_use == "error" or port == 0 else max(1, max_tries)
        last_error: OSError | None = None
        for candidate in range(port, port + tries):
            try:
                started = start_http_server(candidate, addr=addr, registry=registry)
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise PortInUseError(f"cannot serve metrics on {_hostport(addr, candidate)}: {err} "
                                         f"(set {config_key.rsplit('.', 1)[0]}.bind_address / {config_key})") from err
                last_error = err
                continue
            if not isinstance(started, tuple):  # prometheus-client < 0.20 returned None: no way to stop it
                raise RuntimeError("prometheus-client >= 0.20 is required (start_http_server must return "
                                   "(server, thread))")
            self._server, self._thread = started
            self.addr = addr
            self.port = int(self._server.server_address[1])
            if candidate != port:
                log.warning("metrics port %d in use; serving on %s instead", port, _hostport(addr, self.port))
            log.info("serving Prometheus metrics on http://%s/metrics", _hostport(addr, self.port))
            return
        if tries == 1:
            raise PortInUseError(
                f"metrics port {_hostport(addr, port)} is already in use ({last_error}); choose another with "
                f"{config_key}=<port>, or set monitoring.port_in_use=next to take the next free port")
        raise PortInUseError(
            f"metrics ports {_hostport(addr, port)}..{port + tries - 1} are all in use ({config_key}={port}, "
            f"monitoring.max_port_tries={tries}); choose another {config_key}")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("", "0.0.0.0") else "::1" if self.addr == "::" else self.addr
        return f"http://{_hostport(host, self.port)}/metrics"

    def close(self) -> None:
        """Stop serving (idempotent); returns once the serving thread has ended."""
        server = getattr(self, "_server", None)
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5.0)
        self._server = None


def write_textfile(path: str | Path, registry: CollectorRegistry) -> None:
    """Write ``registry`` in the text format to ``path`` (must end in .prom for node-exporter's
    textfile collector) atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    if path.suffix != ".prom":
        raise ValueError(f"monitoring.textfile: {str(path)!r} must end in .prom (node-exporter reads only *.prom)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def write_file_sd(path: str | Path, addr: str, port: int, labels: dict[str, str]) -> None:
    """A Prometheus file_sd target file for one endpoint (written atomically). A wildcard bind address
    is advertised as this host's name."""
    host = socket.gethostname() if addr in ("", "0.0.0.0", "::") else addr
    _atomic_write(Path(path), json.dumps([{"targets": [_hostport(host, port)], "labels": labels}], indent=1) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["MetricsServer", "PortInUseError", "write_file_sd", "write_textfile"]
