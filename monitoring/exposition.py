"""Serving a registry: prometheus-client's WSGI app in a bounded HTTP server (with a clear error, or the
next free port, when the port is taken) and the node-exporter textfile (written atomically), for
air-gapped nodes.

prometheus-client's own ``start_http_server`` starts a thread per connection and waits on a client for
ever, so a client that sends half a request header holds a thread for as long as it likes. The server
here is the same WSGI app behind a thread-per-connection server with two limits: a connection idle for
``idle_timeout_s`` is dropped, and at most ``max_connections`` are served at once (more are closed on
accept and counted in ``refused``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, write_to_textfile

log = logging.getLogger(__name__)


class PortInUseError(RuntimeError):
    """The metrics port is taken (raised at sink construction, before training starts)."""


class _QuietHandler(WSGIRequestHandler):
    """No access log; ``timeout`` (set per server) is applied to the connection's socket, so a client
    that stops sending is dropped after that many seconds."""

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` at once; connections beyond that are
    closed on accept (and counted in ``refused``)."""

    daemon_threads = True
    max_connections = 16

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self.refused = 0

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _start_server(
    registry: CollectorRegistry, addr: str, port: int, idle_timeout_s: float, max_connections: int
) -> tuple[_BoundedServer, threading.Thread]:
    """prometheus-client's WSGI app for ``registry`` served on ``addr:port`` in a daemon thread."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    handler = type("_Handler", (_QuietHandler,), {"timeout": idle_timeout_s})
    server_class = cast(
        type[_BoundedServer],
        type("_Server", (_BoundedServer,), {"address_family": family[0], "max_connections": max_connections}),
    )
    host = cast(str, family[4][0])  # an AF_INET/AF_INET6 address: (host, port, ...)
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=handler)
    thread = threading.Thread(target=server.serve_forever, name=f"optsel-metrics-{port}", daemon=True)
    thread.start()
    return server, thread


class MetricsServer:
    """prometheus-client's HTTP server for ``registry`` on ``addr:port`` in a daemon thread.

    port: first port to try; 0 lets the OS choose a free one.
    on_in_use: "error" raises ``PortInUseError`` naming ``addr:port`` and ``config_key``; "next" tries
        port+1, port+2, ... (``max_tries`` ports in all) and logs the one it got.
    idle_timeout_s: seconds a connection may stay silent before it is dropped.
    max_connections: connections served at once; more are closed on accept.
    ``self.port`` is the bound port; ``close()`` stops the thread and releases the socket.
    """

    _server: _BoundedServer | None  #: None once closed

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        addr: str,
        port: int,
        on_in_use: str = "error",
        max_tries: int = 10,
        config_key: str = "monitoring.port",
        idle_timeout_s: float = 10.0,
        max_connections: int = 16,
    ):
        if on_in_use not in ("error", "next"):
            raise ValueError(f"on_in_use: expected 'error' or 'next', got {on_in_use!r}")
        if not idle_timeout_s > 0 or max_connections < 1:
            raise ValueError(
                f"idle_timeout_s must be > 0 and max_connections >= 1, got {idle_timeout_s}, {max_connections}"
            )
        tries = 1 if on_in_use == "error" or port == 0 else max(1, max_tries)
        last_error: OSError | None = None
        for candidate in range(port, port + tries):
            try:
                self._server, self._thread = _start_server(registry, addr, candidate, idle_timeout_s, max_connections)
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise PortInUseError(
                        f"cannot serve metrics on {_hostport(addr, candidate)}: {err} "
                        f"(set {config_key.rsplit('.', 1)[0]}.bind_address / {config_key})"
                    ) from err
                last_error = err
                continue
            self.addr = addr
            self.port = int(self._server.server_address[1])
            if candidate != port:
                log.warning("metrics port %d in use; serving on %s instead", port, _hostport(addr, self.port))
            log.info("serving Prometheus metrics on http://%s/metrics", _hostport(addr, self.port))
            return
        if tries == 1:
            raise PortInUseError(
                f"metrics port {_hostport(addr, port)} is already in use ({last_error}); choose another with "
                f"{config_key}=<port>, or set monitoring.port_in_use=next to take the next free port"
            )
        raise PortInUseError(
            f"metrics ports {_hostport(addr, port)}..{port + tries - 1} are all in use ({config_key}={port}, "
            f"monitoring.max_port_tries={tries}); choose another {config_key}"
        )

    @property
    def refused(self) -> int:
        """Connections closed on accept because ``max_connections`` were being served."""
        server = getattr(self, "_server", None)
        return server.refused if server is not None else 0

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
