"""``/metrics`` over HTTP for ``shoal controller`` and ``shoal agent`` (Prometheus text format).

Each daemon keeps its own ``CollectorRegistry`` (no module-level state, so
tests can run several in one process) and serves it with ``MetricsServer``:
prometheus-client's WSGI app on a threading ``wsgiref`` server in a daemon
thread, request lines not logged.  The numbers are computed by collectors at
scrape time; nothing here knows what they are.
"""

from __future__ import annotations

import logging
import socket
import threading
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


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``max_connections`` at once: further ones are closed unanswered, so
    clients that connect and never finish a request cannot pile up threads (each also times out, see
    ``_QuietHandler``).  Scrapers and probes come one at a time, a few per minute."""

    daemon_threads = True
    allow_reuse_address = True
    max_connections = 16

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # the thread releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or hung up: not worth socketserver's traceback on stderr
        log.debug("request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds a connection may take to send its request (and to read the answer)

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
