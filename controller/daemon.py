"""``shoal controller``: the controller daemon.

A ``SqliteStore`` (the embedded default), ``ControllerService`` over it with
``GrpcAgentDirectory`` to reach agents, AdminService + RegistrationService on
one gRPC port, the CSI Identity and Controller services on a unix socket
when ``csi_endpoint`` is set, and a background loop that marks silent nodes unhealthy and
runs one reconcile pass every ``loop_interval`` seconds.  Stop order: no more
RPCs (in-flight ones get ``grace`` seconds), no more reconcile passes, close
agent channels, close the store.

``--store kubernetes`` (``KubernetesStore``: state in the chart's CustomResources) runs the same controller
behind leader election (``controller.leader``: a ``coordination.k8s.io`` Lease).  Every replica starts as a
candidate: it binds the gRPC port with a standby server that answers every call ``UNAVAILABLE`` naming the
leader, serves ``/readyz`` as 503 and creates no CSI socket.  Only once it holds the Lease does it open the
store and start what the SQLite controller starts at once (service, gRPC on the same port, the CSI socket, the
reconcile loop), plus Kubernetes Events for operations (``controller.k8s_events``) and topology labels from the
Nodes (``controller.k8s_nodes``).  Losing the Lease stops all of that at once and the process exits non-zero
(like kube-controller-manager): it comes back as a standby.  A clean stop (SIGTERM) stops acting first, then
releases the Lease so a standby takes over at its next retry.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from controller.agents_grpc import AgentCallSettings, AgentTls, GrpcAgentDirectory
from controller.api.server import ServerTls, build_server
from controller.api.standby import build_standby_server
from controller.csi.identity import PLUGIN_NAME, check_driver_name
from controller.csi.server import build_csi_controller_server, release_socket_path, socket_identity, socket_path
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.health import HealthServer
from controller.leader import LeaderElector, LeaderSettings
from controller.metrics import ControllerMetrics
from controller.store.sqlite import SqliteStore
from node_agent.agent.settings import DAY, check_address, parse_seconds
from node_agent.metrics_server import MetricsServer, new_registry
from node_agent.tls_reload import require_client_files
from node_agent.peer_names import ADMIN_NAMES, NODE_NAMES, exposure_warning, parse_names

log = logging.getLogger("shoal.controller")

DEFAULT_LISTEN = "127.0.0.1:7450"
SQLITE, KUBERNETES = "sqlite", "kubernetes"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_namespace(path: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace of the pod this runs in (its service account's), else $POD_NAMESPACE, else "default"."""
    try:
        with open(path) as handle:
            namespace = handle.read().strip()
    except OSError:
        namespace = ""
    return namespace or os.environ.get("POD_NAMESPACE", "") or "default"


@dataclass(frozen=True)
class KubernetesSettings:
    """``--store kubernetes``: where the API server is, the controller's namespace, and the election."""

    kubeconfig: str = ""
    """A kubeconfig file; empty: the pod's service account (in-cluster config)."""
    namespace: str = "default"
    """The controller's namespace: its Lease and the CHAP Secrets live there."""
    api_group: str = "shoal.io"
    """The CRDs' API group (the chart's ``apiGroup``)."""
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    """The Lease and its timing."""
    events_namespace: str = "default"
    """Where Events about the (cluster-scoped) Shoal objects go: the API server accepts no other namespace for
    them (``controller.k8s_events``)."""


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
    csi_driver_name: str = PLUGIN_NAME
    """The CSI driver name GetPluginInfo reports: the CSIDriver object's and the StorageClass provisioner's."""
    store: str = SQLITE
    """``sqlite``: one controller, state in ``db_path``.  ``kubernetes``: state in the API server, any number of
    replicas of which the Lease holder acts (``kubernetes`` says where and how)."""
    kubernetes: KubernetesSettings | None = None
    """Required with ``store="kubernetes"``."""
    health_listen: str = ""
    """Where ``/healthz`` and ``/readyz`` are served over plain HTTP (the chart's probes); empty: not served."""

    def __post_init__(self) -> None:
        # nan passes a plain "<= 0" test: the loop would then spin a core (and inf would end it)
        if not (math.isfinite(self.loop_interval) and self.loop_interval > 0):
            raise ValueError(f"loop_interval {self.loop_interval!r}: expected a positive number of seconds")
        if not (math.isfinite(self.grace) and self.grace >= 0):
            raise ValueError(f"grace {self.grace!r}: expected seconds, 0 or more")


def kubernetes_client(kubeconfig: str = ""):
    """An ``ApiClient`` from ``kubeconfig``, or from the pod's service account when empty."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    # One attempt per call: urllib3 would otherwise try a timed-out request 3 more times, each with the whole
    # timeout, and a partitioned leader would notice its lost Lease (and stop writing) long after a standby
    # took it over.  The callers retry on their own schedule.
    configuration.retries = False
    return client.ApiClient(configuration)


class ControllerDaemon:
    """The controller put together; ``start()``, then ``stop()``.

    With ``store="kubernetes"``, ``start()`` makes a candidate: ``leading`` is set while it holds the Lease and
    serves, ``lost`` once it lost the Lease (or failed to start leading); ``run`` exits non-zero then.
    """

    def __init__(self, settings: DaemonSettings, controller_settings: ControllerSettings | None = None):
        self.settings = settings
        self.controller_settings = controller_settings or ControllerSettings()
        self.store = None
        self.agents: GrpcAgentDirectory | None = None
        self.service: ControllerService | None = None
        self.server = None
        self.csi_server = None
        self.address = ""
        self.metrics = ControllerMetrics(new_registry())
        self.metrics_server: MetricsServer | None = None
        self.metrics_address = ""
        self.health_server: HealthServer | None = None
        self.health_address = ""
        self.elector: LeaderElector | None = None
        self.leading = threading.Event()
        self.lost = threading.Event()
        self._standby = None
        self._recorder = None
        self._prepared = None
        self._csi_socket: tuple[int, int] | None = None  # the socket file this process bound (socket_identity)
        self._api_clients: list = []
        self._phase = threading.Lock()  # becoming leader and stopping to lead, one at a time
        self._campaign_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loops: list[threading.Thread] = []

    def start(self) -> None:
        s = self.settings
        if s.store == KUBERNETES:
            self._start_candidate()
            return
        directory = os.path.dirname(os.path.abspath(s.db_path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            try:
                self.store = SqliteStore(s.db_path)
            except sqlite3.Error as exc:  # not a database, locked, a newer schema: say which file
                raise OSError(f"cannot open the state file {s.db_path}: {exc}") from None
            self._serve(s.listen)
            self._start_http()
        except BaseException:
            self.stop()
            raise
        log.info("controller serving on %s (state in %s%s)", self.address, s.db_path, ", TLS" if s.tls else "")
        warning = exposure_warning(self.address, s.tls is not None, bool(s.tls and s.tls.client_ca),
                                   "the controller's AdminService (CHAP secrets, delete, fence)",
                                   "--tls-cert/--tls-key/--tls-client-ca")
        if warning:
            log.warning("%s", warning)

    def _serve(self, listen: str, node_labels=None, reuse_port: bool = False) -> None:
        """Act on ``self.store``: the service, AdminService + RegistrationService, the CSI socket, the loop.

        ``reuse_port``: the gRPC port is shared with this process's standby server for the handoff (``_lead``).
        """
        s = self.settings
        self.agents = GrpcAgentDirectory(s.agents, on_error=self.metrics.agent_error)
        if self.elector is not None:  # agent calls, like store writes, only while the Lease is surely ours
            self.agents.may_call = self.elector.holds_lease
        self.service = ControllerService(self.store, self.agents, settings=self.controller_settings)
        self.metrics.watch(self.service)
        self.server, port = build_server(self.service, listen, tls=s.tls, workers=s.workers,
                                         metrics=self.metrics, node_labels=node_labels, reuse_port=reuse_port)
        if s.csi_endpoint:
            self.csi_server = build_csi_controller_server(self.service, s.csi_endpoint,
                                                          driver_name=s.csi_driver_name)
            self._csi_socket = socket_identity(socket_path(s.csi_endpoint))
        host = listen.rpartition(":")[0]
        self.address = f"{host}:{port}"
        # Two loops: a reconcile pass waits on agents (GetState of a hung agent takes its whole deadline and
        # retries), and that must never hold up noticing a silent node and fencing it.
        self._loops = [threading.Thread(target=self._run_loop, args=(self.health_once,), name="controller-health",
                                        daemon=True),
                       threading.Thread(target=self._run_loop, args=(self.reconcile_once,),
                                        name="controller-reconcile", daemon=True)]
        for loop in self._loops:
            loop.start()

    def _start_http(self) -> None:
        s = self.settings
        if s.metrics_listen:
            self.metrics_server = MetricsServer(s.metrics_listen, self.metrics.registry)
            self.metrics_address = self.metrics_server.start()
        if s.health_listen:
            self.health_server = HealthServer(s.health_listen, self.readiness)
            self.health_address = self.health_server.start()

    def readiness(self) -> tuple[bool, str]:
        """(serving?, why): ``/readyz``'s answer."""
        if self.settings.store != KUBERNETES:
            return self.server is not None, "serving" if self.server is not None else "not serving"
        if self.leading.is_set():
            return True, f"leader ({self.elector.identity})"
        leader = self.elector.leader() if self.elector is not None else ""
        return False, f"standby; the leader is {leader}" if leader else "standby; no leader elected yet"

    # ---- --store kubernetes: candidate, leader, standby ------------------------------------------

    def _start_candidate(self) -> None:
        s = self.settings
        k = s.kubernetes
        if k is None:
            raise ValueError("store=kubernetes needs KubernetesSettings")
        try:
            # The Lease gets a client (a connection pool) of its own: renewals never wait behind store calls.
            lease_api = kubernetes_client(k.kubeconfig)
            self._api_clients = [lease_api, kubernetes_client(k.kubeconfig)]
            self._prepare_leading(self._api_clients[1])
            self.elector = LeaderElector(lease_api, k.leader, on_started_leading=self._lead,
                                         on_stopped_leading=self._stop_leading,
                                         on_new_leader=lambda who: log.info("the leader is now %s",
                                                                            who or "nobody (released)"))
            self._standby, port = build_standby_server(s.listen, self.elector.leader, tls=s.tls)
            self.address = f"{s.listen.rpartition(':')[0]}:{port}"
            self._start_http()
            self._campaign_thread = threading.Thread(target=self._campaign, name="leader-election", daemon=True)
            self._campaign_thread.start()
        except BaseException:
            self.stop()
            raise
        log.info("controller %s on %s: candidate for lease %s/%s (state in the Kubernetes API)",
                 k.leader.identity, self.address, k.leader.namespace, k.leader.lease_name)

    def _campaign(self) -> None:
        if self.elector.run(self._stop):
            self.lost.set()

    def _prepare_leading(self, api) -> None:
        """Everything leading needs that writes nothing, made while still a candidate: the Kubernetes client's
        API classes and their models take seconds to load, and a standby's takeover should not wait for that."""
        from controller.k8s_events import EventRecorder, EventSettings, OperationEvents
        from controller.k8s_nodes import KubernetesNodeLabels
        from controller.store.kubernetes import KubernetesStore, KubernetesStoreSettings, object_name

        k = self.settings.kubernetes
        store = KubernetesStore(api, KubernetesStoreSettings(namespace=k.namespace, api_group=k.api_group))
        # Writes only while the Lease is ours by this process's own clock: a pass still running when it was lost
        # (an agent call that hung) must not write after a standby may have taken over.
        store.may_write = lambda: self.elector is not None and self.elector.holds_lease()
        self._recorder = EventRecorder(api, EventSettings(namespace=k.events_namespace, api_group=k.api_group,
                                                          instance=k.leader.identity),
                                       object_name=lambda kind, key: object_name(key))
        self._prepared = (OperationEvents(store, self._recorder), KubernetesNodeLabels(api))

    def _lead(self) -> None:
        """The elector's ``on_started_leading`` (a thread of its own): open the store, then serve."""
        k = self.settings.kubernetes
        with self._phase:
            if self._stop.is_set() or self.lost.is_set():
                return
            try:
                self.store, node_labels = self._prepared
                self._recorder.start()
                # The same port as the standby server (both bind with SO_REUSEPORT); then the standby goes.
                self._serve(self.address, node_labels=node_labels, reuse_port=True)
                self._standby.stop(0)
                self._standby = None
            except Exception:  # noqa: BLE001 - holding the Lease without serving helps nobody: give it up
                log.exception("cannot start leading: giving the lease up")
                self.lost.set()
                return
            if self._stop.is_set():  # lost (or stopped) while starting: _stop_leading tears it down next
                return
            self.leading.set()
        log.info("controller %s is the leader: serving on %s", k.leader.identity, self.address)

    def _stop_leading(self) -> None:
        """The elector's ``on_stopped_leading``: stop acting, at once (the lease may be someone else's soon)."""
        lost = not self._stop.is_set()
        self._stop.set()  # the reconcile loop; and _lead, if it is still starting, does not open
        self.leading.clear()
        with self._phase:
            self.leading.clear()
            # A standby may take the Lease over once it has seen no renewal for lease_duration (or at once, when a
            # clean stop releases it); renewals stopped renew_deadline ago at least when it was lost, and stopped
            # now on a clean stop (SIGTERM, a rolling update).  What still runs then (a pass waiting on a hung
            # agent) must be gone by that time: the store refuses its writes and no agent call of it starts once
            # the Lease is not surely ours (``holds_lease``); calls under way are cut by closing the agent
            # channels; and should a loop still run, this process ends before a call of it could cross a new
            # leader's.  The clean stop first gives the gRPC calls under way their grace.
            leader = self.settings.kubernetes.leader
            margin = max(0.5, leader.lease_duration - leader.renew_deadline - 1.0)
            running = self._stop_acting(grace=0.0 if lost else self.settings.grace, join_timeout=margin)
            if running and self.agents is not None:
                self.agents.close()  # a call hung on an agent fails at once (CANCELLED), and none starts
                running = self._stop_acting(grace=0.0, join_timeout=1.0)
            if running:
                log.critical("%s and %s did not stop within %.1f s: exiting now, before a new leader may act",
                             "lost the leader lease" if lost else "stopping", ", ".join(running), margin)
                logging.shutdown()
                os._exit(1)

    def _stop_acting(self, grace: float, join_timeout: float | None = None) -> list[str]:
        """Stop serving and the loops; the names of loops still running after ``join_timeout`` (None: up to an
        agent call's timeout and 10 s each).  Those stay known: a later call waits for them again."""
        if self.csi_server is not None:
            # The path first, while it surely is this socket (calls under way still get their grace)
            release_socket_path(socket_path(self.settings.csi_endpoint), self._csi_socket)
            self._csi_socket = None
            self.csi_server.stop(grace=grace).wait(grace + 5)
            self.csi_server = None
        if self.server is not None:
            self.server.stop(grace=grace).wait(grace + 5)
            self.server = None
        self._stop.set()
        deadline = time.monotonic() + (self.settings.agents.timeout + 10 if join_timeout is None else join_timeout)
        for loop in self._loops:
            loop.join(max(0.0, deadline - time.monotonic()) if join_timeout is not None
                      else self.settings.agents.timeout + 10)
        running = [loop.name for loop in self._loops if loop.is_alive()]
        self._loops = [loop for loop in self._loops if loop.is_alive()]  # still to be waited for
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        return running

    def stop(self) -> None:
        self._stop.set()
        if self._campaign_thread is not None:  # stops leading (if it was), then releases the Lease
            self._campaign_thread.join(self.settings.grace + self.settings.kubernetes.leader.renew_deadline + 10)
            self._campaign_thread = None
        with self._phase:
            self._stop_acting(self.settings.grace)
        if self._standby is not None:
            self._standby.stop(0)
            self._standby = None
        if self.health_server is not None:
            self.health_server.stop()
            self.health_server = None
        if self.metrics_server is not None:  # before the store closes: a scrape reads it
            self.metrics_server.stop()
            self.metrics_server = None
        if self.agents is not None:
            self.agents.close()
            self.agents = None
        if self.store is not None:
            close = getattr(self.store, "close", None)
            if close is not None:
                close()
            self.store = None
        for api in self._api_clients:
            api.close()
        self._api_clients = []

    def _run_loop(self, one_pass) -> None:
        while not self._stop.wait(self.settings.loop_interval):
            one_pass()

    def loop_once(self) -> list[str]:
        """One health/fence pass, then one reconcile pass; returns what they did."""
        return self.health_once() + self.reconcile_once()

    def health_once(self) -> list[str]:
        """Mark silent nodes unhealthy, fence (``fence_grace``) and retry fences still under way."""
        return self._pass("health/fence", lambda: (self.service.mark_unhealthy(), self.service.fence_pass())[1])

    def reconcile_once(self) -> list[str]:
        """One reconcile pass: the store against what each healthy agent reports."""
        return self._pass("reconcile", lambda: self.service.reconcile_once())

    def _pass(self, what: str, run) -> list[str]:
        assert self.service is not None
        try:
            repaired = run()
        except Exception:  # noqa: BLE001 - the loop must outlive a bug in one pass; the next pass retries
            log.exception("%s pass failed", what)
            return []
        for line in repaired:
            log.info("%s: %s", what, line)
        return repaired


# ----------------------------------------------------------------------------- command line

def _seconds(least: float):
    """An argparse type: seconds from ``least`` (an interval shorter would spin) to a day (``parse_seconds``)."""
    def seconds(text: str) -> float:
        try:
            return parse_seconds(text, least)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return seconds


def add_parser(sub) -> None:
    """``shoal controller``'s flags (node_agent/cli.py calls this beside ``target`` and ``agent``)."""
    defaults = DaemonSettings()
    heartbeat = ControllerSettings()
    parser = sub.add_parser("controller", help="run the controller (admin API, agent registration, reconcile)",
                            description="Decide where volumes live and who may use them: AdminService for "
                                        "shoalctl, RegistrationService for node agents, state in SQLite (or, "
                                        "with --store kubernetes, in the Kubernetes API, one leader at a time).")
    parser.add_argument("--db", default=defaults.db_path, help="SQLite state file (default %(default)s)")
    parser.add_argument("--listen", default=defaults.listen, metavar="HOST:PORT",
                        help="gRPC address (default %(default)s; port 0 picks one)")
    parser.add_argument("--heartbeat-interval", type=_seconds(0.1), default=heartbeat.heartbeat_interval,
                        metavar="SECONDS", help="agents heartbeat this often (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=_seconds(0.1), default=heartbeat.heartbeat_timeout,
                        metavar="SECONDS", help="a node silent this long is unhealthy (default %(default)s)")
    parser.add_argument("--fence-grace", type=_seconds(0), default=heartbeat.fence_grace, metavar="SECONDS",
                        help="fence a node silent this long (0: never on its own, only shoalctl node fence; "
                             "default %(default)s)")
    parser.add_argument("--loop-interval", type=_seconds(0.1), default=defaults.loop_interval, metavar="SECONDS",
                        help="seconds between health/reconcile passes (default %(default)s)")
    parser.add_argument("--tls-cert", default="", help="PEM certificate for the controller's port (enables TLS)")
    parser.add_argument("--tls-key", default="", help="PEM key for --tls-cert")
    parser.add_argument("--tls-client-ca", default="", help="require client certificates signed by this CA (mTLS)")
    # No default value: given without --tls-client-ca they are refused rather than ignored
    parser.add_argument("--tls-admin-names", metavar="NAME[,NAME...]",
                        help="with --tls-client-ca: client certificate names (CN or DNS SAN) AdminService admits "
                             f"(default {','.join(ADMIN_NAMES)})")
    parser.add_argument("--tls-node-names", metavar="NAME[,NAME...]",
                        help="with --tls-client-ca: client certificate names the agents' registration admits "
                             f"(default {','.join(NODE_NAMES)})")
    parser.add_argument("--tls-node-id-in-certificate", action="store_true",
                        help="with --tls-client-ca: a node registers and heartbeats only under a node id its "
                             "certificate also names (CN or DNS SAN): per-node certificates, so no node can act "
                             "as another")
    parser.add_argument("--agent-ca", default="", help="CA that signed the agents' certificates (agent TLS)")
    parser.add_argument("--agent-cert", default="", help="client certificate towards agents (mTLS)")
    parser.add_argument("--agent-key", default="", help="key for --agent-cert")
    parser.add_argument("--agent-server-name", default="", metavar="NAME",
                        help="name the agents' certificates carry, checked instead of the address dialled")
    parser.add_argument("--metrics-listen", default=defaults.metrics_listen, metavar="HOST:PORT",
                        help="serve Prometheus /metrics over HTTP here (default: off; e.g. 127.0.0.1:9450)")
    parser.add_argument("--csi-endpoint", default=defaults.csi_endpoint, metavar="unix:///PATH",
                        help="serve the CSI Identity and Controller services on this unix socket (default: off)")
    parser.add_argument("--csi-driver-name", default=defaults.csi_driver_name, metavar="NAME",
                        help="the CSI driver name GetPluginInfo reports (default %(default)s)")
    parser.add_argument("--health-listen", default=defaults.health_listen, metavar="HOST:PORT",
                        help="serve /healthz and /readyz (200 only while this replica serves) over HTTP here "
                             "(default: off)")
    parser.add_argument("--ready-file", metavar="FILE",
                        help='write {"controller": HOST:PORT, "metrics": HOST:PORT, "health": HOST:PORT} as JSON '
                             'here once listening (with --store kubernetes: as a candidate, before leading)')
    k8s = parser.add_argument_group("--store kubernetes (state in the Kubernetes API, leader election)")
    k8s.add_argument("--store", choices=(SQLITE, KUBERNETES), default=defaults.store,
                     help="where the state lives (default %(default)s: the --db file)")
    k8s.add_argument("--kubeconfig", default="", metavar="FILE",
                     help="kubeconfig for the API server (default: the pod's service account)")
    k8s.add_argument("--namespace", default=None,
                     help="the controller's namespace, for its Lease and CHAP Secrets (default: the pod's, from "
                          "its service account, else $POD_NAMESPACE, else default)")
    k8s.add_argument("--api-group", default=KubernetesSettings.api_group, metavar="GROUP",
                     help="API group of Shoal's CustomResources (default %(default)s)")
    k8s.add_argument("--lease-name", default=os.environ.get("SHOAL_LEASE_NAME") or LeaderSettings.lease_name,
                     metavar="NAME", help="the Lease the replicas compete for (default: $SHOAL_LEASE_NAME, else "
                                          "%(default)s)")
    k8s.add_argument("--lease-duration", type=int, default=LeaderSettings.lease_duration, metavar="SECONDS",
                     help="a standby takes over after the leader failed to renew for this long "
                          "(default %(default)s)")
    k8s.add_argument("--lease-renew-deadline", type=_seconds(0.1), default=None, metavar="SECONDS",
                     help="the leader stops acting when it could not renew for this long "
                          "(default: 2/3 of --lease-duration)")
    k8s.add_argument("--lease-retry-period", type=_seconds(0.1), default=None, metavar="SECONDS",
                     help="seconds between renewals and attempts to acquire (default: 2/15 of --lease-duration)")


def settings_from_args(args: argparse.Namespace) -> tuple[DaemonSettings, ControllerSettings]:
    # Every address now, before the state file is created: a missing port would be gRPC's default, 443, and a
    # host that does not resolve would fail only at the bind, after the store was opened.
    check_address(args.listen, "--listen", bind=True)
    if args.metrics_listen:
        check_address(args.metrics_listen, "--metrics-listen", bind=True)
    if args.health_listen:
        check_address(args.health_listen, "--health-listen", bind=True)
    names = {}
    for flag, given, default in (("--tls-admin-names", args.tls_admin_names, ADMIN_NAMES),
                                 ("--tls-node-names", args.tls_node_names, NODE_NAMES)):
        names[flag] = default if given is None else parse_names(given)
        if given is not None and not args.tls_client_ca:  # only client certificates carry names to check
            raise ValueError(f"{flag} needs --tls-client-ca")
    tls = None
    if args.tls_cert or args.tls_key:
        tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca, admin_names=names["--tls-admin-names"],
                        node_names=names["--tls-node-names"],
                        node_id_in_certificate=args.tls_node_id_in_certificate)
    elif args.tls_node_id_in_certificate:
        raise ValueError("--tls-node-id-in-certificate needs --tls-cert, --tls-key and --tls-client-ca")
    if args.tls_client_ca and tls is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    agent_tls = None
    if args.agent_ca or args.agent_cert or args.agent_key or args.agent_server_name:
        agent_tls = AgentTls(args.agent_ca, args.agent_cert, args.agent_key, args.agent_server_name)
        require_client_files(agent_tls.cert, agent_tls.key, agent_tls.ca, "--agent-ca/--agent-cert/--agent-key")
    if args.csi_endpoint:
        socket_path(args.csi_endpoint)  # ValueError now rather than after the store is open
    check_driver_name(args.csi_driver_name)
    kubernetes = None
    if args.store == KUBERNETES:
        if args.lease_duration > DAY:
            raise ValueError(f"--lease-duration {args.lease_duration}: at most {DAY:g} seconds")
        namespace = args.namespace or pod_namespace()
        leader = LeaderSettings.for_duration(args.lease_duration, renew_deadline=args.lease_renew_deadline,
                                             retry_period=args.lease_retry_period, lease_name=args.lease_name,
                                             namespace=namespace)
        kubernetes = KubernetesSettings(kubeconfig=args.kubeconfig, namespace=namespace, api_group=args.api_group,
                                        leader=leader)
    daemon = DaemonSettings(db_path=args.db, listen=args.listen, loop_interval=args.loop_interval, tls=tls,
                            agents=AgentCallSettings(tls=agent_tls), metrics_listen=args.metrics_listen,
                            csi_endpoint=args.csi_endpoint, csi_driver_name=args.csi_driver_name,
                            store=args.store, kubernetes=kubernetes, health_listen=args.health_listen)
    return daemon, ControllerSettings(heartbeat_interval=args.heartbeat_interval,
                                      heartbeat_timeout=args.heartbeat_timeout, fence_grace=args.fence_grace)


def _write_json(path: str, data: dict) -> None:
    """Through a fresh temporary file of an unguessable name (``write_file_atomically``): never through
    whatever another user put at a fixed ``PATH.tmp`` in a shared directory."""
    from node_agent.cli import write_file_atomically

    write_file_atomically(path, json.dumps(data))


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM (0), or until the Lease is lost (1: come back as a standby)."""
    from node_agent.cli import remove_file

    daemon = ControllerDaemon(*settings_from_args(args))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    remove_file(args.ready_file)  # a previous run's would name ports nobody serves (removed again once stopped)
    daemon.start()
    try:
        if args.ready_file:
            _write_json(args.ready_file, {"controller": daemon.address, "metrics": daemon.metrics_address,
                                          "health": daemon.health_address, "store": daemon.settings.store,
                                          "identity": daemon.elector.identity if daemon.elector else "",
                                          "pid": os.getpid(), "time": time.time()})
        while not stop.wait(0.2):  # a timed wait keeps the main thread responsive to signals
            if daemon.lost.is_set():
                break
    finally:
        daemon.stop()
    remove_file(args.ready_file)
    if daemon.lost.is_set():
        log.error("controller stopped: it lost the leader lease (a restart comes back as a standby)")
        return 1
    log.info("controller stopped")
    return 0
