"""``/metrics`` over HTTP for ``shoal controller`` and ``shoal agent`` (Prometheus text format).

Each daemon keeps its own ``CollectorRegistry`` (no module-level state, so
tests can run several in one process) and serves it with ``MetricsServer``:
prometheus-client's WSGI app on a threading ``wsgiref`` server in a daemon
thread, request lines not logged.  The numbers are computed by collectors at
scrape time; nothing here knows what they are.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("shoal.metrics")


def new_registry() -> CollectorRegistry:
    """A registry with the process's own metrics (CPU seconds, resident memory, open fds)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def split_listen(text: str, what: str = "metrics address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); port 0 picks a free one.  ``what``: the error's subject."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _cut(connection: socket.socket) -> None:
    """End ``connection`` under its handler's feet: a blocked read returns end-of-file, a write fails."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:  # the client is already gone
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``max_connections`` at once: further ones are closed unanswered, so
    clients that connect and never finish a request cannot pile up threads.  Each connection is cut
    ``_QuietHandler.timeout`` seconds after it was accepted, whatever it sends meanwhile: a per-read timeout
    alone let a client that sends a byte every few seconds keep its slot forever (and 16 of them every slot).
    Scrapers and probes come one at a time, a few per minute."""

    daemon_threads = True
    allow_reuse_address = True
    max_connections = 16
    request_queue_size = 64  # listen backlog: socketserver's 5 drops a burst's SYNs (a 1 s retry each)

    def __init__(self, *args, **kwargs) -> None:
        self._lock = threading.Lock()  # before TCPServer.__init__: a failed bind calls server_close
        self._open: dict[socket.socket, float] = {}  # connection -> when to cut it (monotonic; inf: cut)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = len(self._open) >= self.max_connections
            if not full:
                self._open[request] = time.monotonic() + self.RequestHandlerClass.timeout
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)  # the thread frees the slot (shutdown_request)

    def shutdown_request(self, request) -> None:
        with self._lock:  # from here on service_actions no longer touches the socket
            self._open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Every poll interval (0.2 s) of serve_forever: cut the connections past their deadline (each keeps its
        slot until its thread has ended)."""
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            for request, deadline in self._open.items():
                if deadline <= now:
                    _cut(request)
                    self._open[request] = math.inf

    def server_close(self) -> None:
        with self._lock:
            for request in self._open:
                _cut(request)
        super().server_close()

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or hung up: not worth socketserver's traceback on stderr
        log.debug("request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds a connection may last, from accept to close (_Server cuts it then)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class HttpEndpoint:
    """One WSGI app on ``HOST:PORT`` in a daemon thread: ``start()``, then ``stop()``.

    The metrics server and the controller's health checks (``controller.health``) are both this: a small
    threading server whose request lines are not logged (probes and scrapes come every few seconds).
    """

    what = "HTTP"  # for the log line and the bind error: "metrics", "health checks"
    path = "/"

    def __init__(self, listen: str, app):
        self.host, self.port = split_listen(listen, f"{self.what} address")
        self.app = app
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` actually bound (the port filled in when 0 was asked)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}{self.path}"

    def start(self) -> str:
        """Bind and serve; returns the bound ``HOST:PORT``.  Raises ``OSError`` for a busy port."""
        server_class = _Server6 if ":" in self.host else _Server
        try:
            self._httpd = make_server(self.host, self.port, self.app, server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot serve {self.what} on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"{self.what}-http", daemon=True)
        self._thread.start()
        log.info("%s on %s", self.what, self.url)
        return self.address

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class MetricsServer(HttpEndpoint):
    """``GET /metrics`` (any path, in fact) answered from ``registry``."""

    what = "metrics"
    path = "/metrics"

    def __init__(self, listen: str, registry: CollectorRegistry):
        super().__init__(listen, make_wsgi_app(registry))
        self.registry = registry
