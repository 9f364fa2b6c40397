"""``shoal controller``: the controller daemon.

A ``SqliteStore`` (the embedded default), ``ControllerService`` over it with
``GrpcAgentDirectory`` to reach agents, AdminService + RegistrationService on
one gRPC port, the CSI Identity and Controller services on a unix socket
when ``csi_endpoint`` is set, and a background loop that marks silent nodes unhealthy and
runs one reconcile pass every ``loop_interval`` seconds.  Stop order: no more
RPCs (in-flight ones get ``grace`` seconds), no more reconcile passes, close
agent channels, close the store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from controller.agents_grpc import AgentCallSettings, AgentTls, GrpcAgentDirectory
from controller.api.server import ServerTls, build_server
from controller.csi.server import build_csi_controller_server, socket_path
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.metrics import ControllerMetrics
from controller.store.sqlite import SqliteStore
from node_agent.metrics_server import MetricsServer, new_registry

log = logging.getLogger("shoal.controller")

DEFAULT_LISTEN = "127.0.0.1:7450"


@dataclass(frozen=True)
class DaemonSettings:
    """How the controller process runs (``shoal controller`` flags map onto these fields)."""

    db_path: str = "/var/lib/shoal/controller.db"
    """The SQLite state file (created 0600: it holds CHAP secrets)."""
    listen: str = DEFAULT_LISTEN
    """AdminService and RegistrationService address; port 0 picks a free one.  7450: shoalctl's default."""
    loop_interval: float = 5.0
    """Seconds between passes of the health/reconcile loop: as often as agents heartbeat by default,
    so a silent node is marked unhealthy within one interval of its timeout."""
    grace: float = 5.0
    """Seconds in-flight RPCs get to finish when the daemon stops."""
    workers: int = 16
    """Threads serving RPCs (attach and detach block on agents for seconds)."""
    tls: ServerTls | None = None
    """TLS on the controller's port; None: plaintext (loopback, ``shoal up``)."""
    metrics_listen: str = ""
    """Where ``/metrics`` is served over plain HTTP (Prometheus); empty: not served.  Off by default:
    the page names pools and nodes, so an operator picks the address (``shoal up`` uses loopback)."""
    agents: AgentCallSettings = field(default_factory=AgentCallSettings)
    """Deadlines, retries and TLS of calls to node agents."""
    csi_endpoint: str = ""
    """``unix:///path/controller.sock``: serve CSI Identity and Controller there (the CSI sidecars' socket);
    empty: no CSI."""


class ControllerDaemon:
    """The controller put together; ``start()``, then ``stop()``."""

    def __init__(self, settings: DaemonSettings, controller_settings: ControllerSettings | None = None):
        self.settings = settings
        self.controller_settings = controller_settings or ControllerSettings()
        self.store: SqliteStore | None = None
        self.agents: GrpcAgentDirectory | None = None
        self.service: ControllerService | None = None
        self.server = None
        self.csi_server = None
        self.address = ""
        self.metrics = ControllerMetrics(new_registry())
        self.metrics_server: MetricsServer | None = None
        self.metrics_address = ""
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    def start(self) -> None:
        s = self.settings
        directory = os.path.dirname(os.path.abspath(s.db_path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            try:
                self.store = SqliteStore(s.db_path)
            except sqlite3.Error as exc:  # not a database, locked, a newer schema: say which file
                raise OSError(f"cannot open the state file {s.db_path}: {exc}") from None
            self.agents = GrpcAgentDirectory(s.agents, on_error=self.metrics.agent_error)
            self.service = ControllerService(self.store, self.agents, settings=self.controller_settings)
            self.metrics.watch(self.service)
            self.server, port = build_server(self.service, s.listen, tls=s.tls, workers=s.workers,
                                             metrics=self.metrics)
            if s.csi_endpoint:
                self.csi_server = build_csi_controller_server(self.service, s.csi_endpoint)
            host = s.listen.rpartition(":")[0]
            self.address = f"{host}:{port}"
            self._loop = threading.Thread(target=self._run_loop, name="controller-loop", daemon=True)
            self._loop.start()
            if s.metrics_listen:
                self.metrics_server = MetricsServer(s.metrics_listen, self.metrics.registry)
                self.metrics_address = self.metrics_server.start()
        except BaseException:
            self.stop()
            raise
        log.info("controller serving on %s (state in %s%s)", self.address, s.db_path, ", TLS" if s.tls else "")

    def stop(self) -> None:
        if self.csi_server is not None:
            self.csi_server.stop(grace=self.settings.grace).wait(self.settings.grace + 5)
            self.csi_server = None
            try:
                os.unlink(socket_path(self.settings.csi_endpoint))
            except FileNotFoundError:
                pass
        if self.server is not None:
            self.server.stop(grace=self.settings.grace).wait(self.settings.grace + 5)
            self.server = None
        self._stop.set()
        if self._loop is not None:
            self._loop.join(self.settings.agents.timeout + 10)
            self._loop = None
        if self.metrics_server is not None:  # before the store closes: a scrape reads it
            self.metrics_server.stop()
            self.metrics_server = None
        if self.agents is not None:
            self.agents.close()
            self.agents = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _run_loop(self) -> None:
        while not self._stop.wait(self.settings.loop_interval):
            self.loop_once()

    def loop_once(self) -> list[str]:
        """Mark silent nodes unhealthy, then one reconcile pass; returns what it repaired."""
        assert self.service is not None
        try:
            self.service.mark_unhealthy()
            repaired = self.service.reconcile_once()
        except Exception:  # noqa: BLE001 - the loop must outlive a bug in one pass; the next pass retries
            log.exception("health/reconcile pass failed")
            return []
        for line in repaired:
            log.info("reconcile: %s", line)
        return repaired


# ----------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """``shoal controller``'s flags (node_agent/cli.py calls this beside ``target`` and ``agent``)."""
    defaults = DaemonSettings()
    heartbeat = ControllerSettings()
    parser = sub.add_parser("controller", help="run the controller (admin API, agent registration, reconcile)",
                            description="Decide where volumes live and who may use them: AdminService for "
                                        "shoalctl, RegistrationService for node agents, state in SQLite.")
    parser.add_argument("--db", default=defaults.db_path, help="SQLite state file (default %(default)s)")
    parser.add_argument("--listen", default=defaults.listen, metavar="HOST:PORT",
                        help="gRPC address (default %(default)s; port 0 picks one)")
    parser.add_argument("--heartbeat-interval", type=float, default=heartbeat.heartbeat_interval, metavar="SECONDS",
                        help="agents heartbeat this often (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=heartbeat.heartbeat_timeout, metavar="SECONDS",
                        help="a node silent this long is unhealthy (default %(default)s)")
    parser.add_argument("--loop-interval", type=float, default=defaults.loop_interval, metavar="SECONDS",
                        help="seconds between health/reconcile passes (default %(default)s)")
    parser.add_argument("--tls-cert", default="", help="PEM certificate for the controller's port (enables TLS)")
    parser.add_argument("--tls-key", default="", help="PEM key for --tls-cert")
    parser.add_argument("--tls-client-ca", default="", help="require client certificates signed by this CA (mTLS)")
    parser.add_argument("--agent-ca", default="", help="CA that signed the agents' certificates (agent TLS)")
    parser.add_argument("--agent-cert", default="", help="client certificate towards agents (mTLS)")
    parser.add_argument("--agent-key", default="", help="key for --agent-cert")
    parser.add_argument("--agent-server-name", default="", metavar="NAME",
                        help="name the agents' certificates carry, checked instead of the address dialled")
    parser.add_argument("--metrics-listen", default=defaults.metrics_listen, metavar="HOST:PORT",
                        help="serve Prometheus /metrics over HTTP here (default: off; e.g. 127.0.0.1:9450)")
    parser.add_argument("--csi-endpoint", default=defaults.csi_endpoint, metavar="unix:///PATH",
                        help="serve the CSI Identity and Controller services on this unix socket (default: off)")
    parser.add_argument("--ready-file", metavar="FILE",
                        help='write {"controller": HOST:PORT, "metrics": HOST:PORT} as JSON here once serving')


def settings_from_args(args: argparse.Namespace) -> tuple[DaemonSettings, ControllerSettings]:
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert or args.tls_key else None
    if args.tls_client_ca and tls is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    agent_tls = None
    if args.agent_ca or args.agent_cert or args.agent_key or args.agent_server_name:
        agent_tls = AgentTls(args.agent_ca, args.agent_cert, args.agent_key, args.agent_server_name)
    if args.csi_endpoint:
        socket_path(args.csi_endpoint)  # ValueError now rather than after the store is open
    if args.loop_interval <= 0:
        raise ValueError("--loop-interval must be positive")
    daemon = DaemonSettings(db_path=args.db, listen=args.listen, loop_interval=args.loop_interval, tls=tls,
                            agents=AgentCallSettings(tls=agent_tls), metrics_listen=args.metrics_listen,
                            csi_endpoint=args.csi_endpoint)
    return daemon, ControllerSettings(heartbeat_interval=args.heartbeat_interval,
                                      heartbeat_timeout=args.heartbeat_timeout)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    daemon = ControllerDaemon(*settings_from_args(args))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    daemon.start()
    try:
        if args.ready_file:
            _write_json(args.ready_file, {"controller": daemon.address, "metrics": daemon.metrics_address,
                                          "pid": os.getpid(), "time": time.time()})
        while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        daemon.stop()
    log.info("controller stopped")
    return 0
