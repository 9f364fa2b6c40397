"""``/healthz`` and ``/readyz`` over plain HTTP for ``shoal controller --health-listen HOST:PORT``.

* ``/healthz``: 200 while the process runs (its liveness probe);
* ``/readyz``: 200 while this replica serves (the Lease holder, or always with SQLite), else 503 with the
  reason ("standby; the leader is X").  The Helm chart's readinessProbe uses it, so the Service only sends
  shoalctl and the agents to the leader; a standby stays alive but unready.

A port of its own rather than a path on ``/metrics``: metrics can be turned off, readiness cannot.  The answers
carry no state beyond the leader's identity (a pod name).
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from node_agent.metrics_server import split_listen

log = logging.getLogger("shoal.controller.health")

Readiness = Callable[[], tuple[bool, str]]
"""() -> (ready, text): whether this replica serves, and a line saying why (or why not)."""


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HealthServer:
    """``start()`` binds and serves in a daemon thread; ``stop()``."""

    def __init__(self, listen: str, readiness: Readiness):
        self.host, self.port = split_listen(listen)
        self.readiness = readiness
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> str:
        """Bind and serve; returns the bound ``HOST:PORT``.  Raises ``OSError`` for a busy port."""
        readiness = self.readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path in ("/healthz", "/livez"):
                    self._answer(200, "ok")
                elif path == "/readyz":
                    ready, text = readiness()
                    self._answer(200 if ready else 503, text)
                else:
                    self._answer(404, "not found: /healthz, /readyz")

            def _answer(self, code: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - probes every few seconds: not logged
                pass

        server_class = _Server6 if ":" in self.host else ThreadingHTTPServer
        try:
            self._httpd = server_class((self.host, self.port), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve health checks on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="health-http", daemon=True)
        self._thread.start()
        log.info("health checks on http://%s/readyz", self.address)
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
