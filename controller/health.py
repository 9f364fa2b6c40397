"""``/healthz`` and ``/readyz`` over plain HTTP for ``shoal controller --health-listen HOST:PORT``.

* ``/healthz``: 200 while the process runs (its liveness probe);
* ``/readyz``: 200 while this replica serves (the Lease holder, or always with SQLite), else 503 with the
  reason ("standby; the leader is X").  The Helm chart's readinessProbe uses it, so the Service only sends
  shoalctl and the agents to the leader; a standby stays alive but unready.

A port of its own rather than a path on ``/metrics``: metrics can be turned off, readiness cannot.  The answers
carry no state beyond the leader's identity (a pod name).
"""

from __future__ import annotations

from typing import Callable

from node_agent.metrics_server import HttpEndpoint

Readiness = Callable[[], tuple[bool, str]]
"""() -> (ready, text): whether this replica serves, and a line saying why (or why not)."""


def health_app(readiness: Readiness):
    """The WSGI app: ``/healthz`` (and ``/livez``) 200, ``/readyz`` 200 or 503 with ``readiness``'s text."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            code, text = "405 Method Not Allowed", "GET only"
        elif path in ("/healthz", "/livez"):
            code, text = "200 OK", "ok"
        elif path == "/readyz":
            ready, text = readiness()
            code = "200 OK" if ready else "503 Service Unavailable"
        else:
            code, text = "404 Not Found", "not found: /healthz, /readyz"
        body = (text + "\n").encode()
        start_response(code, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class HealthServer(HttpEndpoint):
    """``start()`` binds and serves in a daemon thread; ``stop()``."""

    what = "health checks"
    path = "/readyz"

    def __init__(self, listen: str, readiness: Readiness):
        super().__init__(listen, health_app(readiness))
        self.readiness = readiness
