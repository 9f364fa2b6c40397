"""The node agent put together: disks, portal, exports, attachments, AgentService, registration.

With ``csi_endpoint`` set it also serves CSI Identity and Node on that unix socket
(``node_agent.csi``), over the same attachments: ControllerPublishVolume records a
target here (AttachVolume with ``defer_login``), NodeStageVolume logs in through
``AttachmentManager.login`` in this process, NodeUnstageVolume logs out.  The agent
announces its connector as the node label ``shoal.io/connector`` ("kernel" where
``iscsi_tcp`` and open-iscsi are there, else "userspace"; a ``--label`` overrides
it), and the CSI controller publishes in that mode.  NodeGetInfo reports the
topology labels the controller recorded at the last Register (``NodeLabels``):
the CSI server opens before the first Register, and until it succeeds
NodeGetInfo waits a few seconds, then answers UNAVAILABLE.

Start order matters for consumers: the portal starts and the recorded exports
are served again *before* the gRPC server opens or the controller hears from
us, so initiators logged in before a restart get back in without waiting for
anyone.  Stop order is the reverse: no more RPCs, no more heartbeats, then the
userspace attachments (they cannot outlive this process) and the portal.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc

from controller.csi.server import release_socket_path, socket_identity, socket_path
from node_agent.agent.attachments import KERNEL, USERSPACE, AttachmentManager
from node_agent.agent.exports import ExportManager, ExportSettings
from node_agent.agent.metrics import AgentCollector
from node_agent.agent.portal import PortalThread
from node_agent.agent.registration import NodeAnnouncement, Registrar
from node_agent.agent.servicer import AgentServicer
from node_agent.agent.settings import AgentSettings, TlsFiles, check_pems
from node_agent.agent.snapshots import SnapshotManager
from node_agent.agent.volumes import VolumeManager
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter
from node_agent.csi.node import NodeLabels, NodeServicer
from node_agent.csi.server import build_csi_node_server
from node_agent.host.connector import CONNECTOR_LABEL, Connector, preferred_connector
from node_agent.host.runner import SubprocessRunner
from node_agent.metrics_server import MetricsServer, new_registry
from node_agent.peer_check import PeerNames
from node_agent.peer_names import AGENT_SERVICE, exposure_warning
from node_agent.iscsi.connection import ConnectionSettings
from node_agent.iscsi.keys import TargetSettings
from node_agent.target_service import PortalConfig
from node_agent.tls_reload import TLS_BIND_HINT, ChangedFiles, ReloadingServerTls, client_files_problem
from protos.shoal.v1 import agent_pb2_grpc

log = logging.getLogger("shoal.agent")


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS for AgentService; with a CA, clients must present a certificate it signed (mutual TLS).  The files
    are read again when they change (``node_agent.tls_reload``)."""
    return ReloadingServerTls(tls.cert, tls.key, tls.ca).credentials()


#: gRPC's reconnect backoff grows to 120 s while the controller is down (heartbeats fail at once
#: meanwhile), so after a controller restart this node would look unhealthy for up to two minutes.
#: Capped at 1 s, heartbeats resume within about a second of the controller's return.
CONTROLLER_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))


def controller_channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=CONTROLLER_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                               certificate_chain=_read(tls.cert))
    return grpc.secure_channel(address, credentials, options=CONTROLLER_CHANNEL_OPTIONS)


def default_connectors(settings: AgentSettings) -> dict[str, Callable[[], Connector]]:
    """The host connectors, built on first use (the kernel one needs open-iscsi, the userspace one FUSE)."""
    def userspace() -> Connector:
        from node_agent.host.userspace import UserspaceConnector, UserspaceSettings

        return UserspaceConnector(UserspaceSettings(state_dir=os.path.join(settings.data_dir, "userspace"),
                                                    initiator_iqn=settings.initiator_iqn,
                                                    header_digest=settings.iscsi_header_digest,
                                                    data_digest=settings.iscsi_data_digest,
                                                    reconnect_timeout=settings.userspace_reconnect_timeout))

    def kernel() -> Connector:
        from node_agent.host.kernel import KernelConnector, KernelSettings

        return KernelConnector(settings=KernelSettings(lock_dir=os.path.join(settings.data_dir, "locks"),
                                                       initiator_iqn=settings.initiator_iqn,
                                                       header_digest=settings.iscsi_header_digest,
                                                       data_digest=settings.iscsi_data_digest))

    return {USERSPACE: userspace, KERNEL: kernel}


class Agent:
    """One node agent; ``start()`` then ``stop()``."""

    def __init__(self, settings: AgentSettings, *,
                 connectors: Mapping[str, Callable[[], Connector]] | None = None,
                 channel_factory: Callable[[str, TlsFiles | None], grpc.Channel] = controller_channel):
        self.settings = settings
        self.connectors = connectors if connectors is not None else default_connectors(settings)
        self.channel_factory = channel_factory
        self.volumes: VolumeManager | None = None
        self.snapshots: SnapshotManager | None = None
        self.portal: PortalThread | None = None
        self.exports: ExportManager | None = None
        self.attachments: AttachmentManager | None = None
        self.server: grpc.Server | None = None
        self.registrar: Registrar | None = None
        self.agent_address = ""
        self.portal_address = ""
        self.metrics_registry = new_registry()
        self.metrics_registry.register(AgentCollector(self))
        self.metrics_server: MetricsServer | None = None
        self.metrics_address = ""
        self.csi_server: grpc.Server | None = None
        self._csi_socket: tuple[int, int] | None = None  # the socket file this process bound (socket_identity)
        # NodeGetInfo's labels: the controller's record, set by every Register (the agent's own without one)
        self.node_labels = NodeLabels(None if settings.controller else settings.labels)
        # Volumes whose fenced attachment a thread is dropping now (``_drop_fenced``).
        self._dropping: set[str] = set()
        self._drops_guard = threading.Lock()

    def start(self) -> None:
        s = self.settings
        if s.server_tls is not None:  # a bad PEM now, before anything is served (gRPC would only fail to bind)
            check_pems(s.server_tls.cert, s.server_tls.key, s.server_tls.ca)
        os.makedirs(s.data_dir, mode=0o700, exist_ok=True)
        # With the data directory as its state: a disk that is not the disk the agent set up (not mounted yet,
        # another disk) is left alone and reported unavailable (volumes.py, "Disk identity").
        self.volumes = VolumeManager(s.effective_disks(), background_copies=True, state_dir=s.data_dir)
        self.snapshots = SnapshotManager(self.volumes)
        host, port = split_host_port(s.portal_listen)
        self.portal = PortalThread(PortalConfig(host, port, TargetSettings(header_digest=s.iscsi_header_digest,
                                                                          data_digest=s.iscsi_data_digest),
                                                ConnectionSettings(nop_interval=s.iscsi_nop_interval,
                                                                   nop_timeout=s.iscsi_nop_timeout)))
        try:
            bound = self.portal.start()
            self.portal_address = join_host_port(bound[0], bound[1])
            portals = s.advertise_portals or (self._advertised_portal(bound),)
            self.exports = ExportManager(ExportSettings(s.data_dir, s.target_prefix, tuple(portals)),
                                         self.volumes, self.portal)
            self.volumes.quiesce = self.exports.quiesced  # copies start with an exported LUN held still
            self.exports.restore()
            self.attachments = AttachmentManager(s.data_dir, self.connectors,
                                                 in_use=Mounter(SubprocessRunner()).users)
            self.attachments.restore()
            self._serve()
            if s.csi_endpoint:
                self._serve_csi()
            if s.metrics_listen:
                self.metrics_server = MetricsServer(s.metrics_listen, self.metrics_registry)
                self.metrics_address = self.metrics_server.start()
            self._register(tuple(portals))
        except BaseException:
            self.stop()
            raise
        log.info("node agent %s: AgentService on %s, iSCSI portal on %s", s.node_id, self.agent_address,
                 self.portal_address)

    def stop(self) -> None:
        if self.csi_server is not None:
            # The path first, while it surely is this socket (calls under way still get their grace)
            release_socket_path(socket_path(self.settings.csi_endpoint), self._csi_socket)
            self._csi_socket = None
            self.csi_server.stop(grace=5).wait(10)
            self.csi_server = None
        if self.server is not None:
            self.server.stop(grace=5).wait(10)
            self.server = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.registrar is not None:
            self.registrar.stop()
            self.registrar = None
        if self.attachments is not None:
            self.attachments.close()
        if self.snapshots is not None:
            self.snapshots.close()  # background copies stop; a restart records them as interrupted
        if self.volumes is not None:
            self.volumes.close()
        if self.portal is not None:
            self.portal.stop()
            self.portal = None

    def _advertised_portal(self, bound: tuple[str, int]) -> str:
        if _is_wildcard(bound[0]):
            raise ValueError(f"the portal listens on {self.settings.portal_listen}: give the address consumers "
                             "reach it at (advertise_portals / --advertise-portal IP:PORT)")
        return join_host_port(bound[0], bound[1])

    def _serve(self) -> None:
        s = self.settings
        assert self.volumes and self.exports and self.attachments
        interceptors = []
        if s.server_tls is not None and s.server_tls.ca:  # mutual TLS: only the controller's certificate
            interceptors.append(PeerNames({AGENT_SERVICE: s.controller_names}))
        # Not gRPC's default SO_REUSEPORT: a second agent on the port would start and take half the calls.
        server = grpc.server(ThreadPoolExecutor(max_workers=s.grpc_workers, thread_name_prefix="agent-rpc"),
                             interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(s.node_id, self.volumes, self.exports, self.attachments, self.snapshots), server)
        host, port = split_host_port(s.listen)
        address = join_host_port(host, port)
        credentials = server_credentials(s.server_tls) if s.server_tls is not None else None
        try:
            bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises RuntimeError for a port it cannot bind
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {s.listen} for AgentService: the port is in use, or the address is "
                          "not this host's" + (TLS_BIND_HINT if credentials else ""))
        warning = exposure_warning(address, s.server_tls is not None, bool(s.server_tls and s.server_tls.ca),
                                   "AgentService (export any volume of this node)",
                                   "--tls-cert/--tls-key/--tls-client-ca")
        if warning:
            log.warning("%s", warning)
        server.start()
        self.server = server
        self.agent_address = join_host_port(host, bound)

    def _serve_csi(self) -> None:
        """CSI Identity + Node on ``csi_endpoint``, over this agent's attachments and the host's mount tools."""
        s = self.settings
        assert self.attachments is not None
        servicer = NodeServicer(s.node_id, self.node_labels, DeviceResolver(self.attachments),
                                Mounter(SubprocessRunner()))
        self.csi_server = build_csi_node_server(servicer, s.csi_endpoint, driver_name=s.csi_driver_name)
        self._csi_socket = socket_identity(socket_path(s.csi_endpoint))

    def _register(self, portals: tuple[str, ...]) -> None:
        s = self.settings
        if not s.controller:
            log.info("no controller address: not registering")
            return
        advertised = s.advertise_address
        if not advertised:
            host, port = split_host_port(self.agent_address)
            advertised = join_host_port(socket.getfqdn() if _is_wildcard(host) else host, port)
        assert self.volumes is not None
        labels = dict(s.labels)
        labels.setdefault(CONNECTOR_LABEL, preferred_connector())  # how CSI publishes reach this node
        self.registrar = Registrar(
            NodeAnnouncement(s.node_id, s.initiator_iqn, advertised, portals, labels),
            self.volumes.disks, self.channel_factory(s.controller, s.controller_tls),
            timeout=s.register_timeout, max_backoff=s.max_register_backoff,
            default_interval=s.default_heartbeat_interval, on_drop=self._drop_fenced,
            on_registered=self.node_labels.set, renew=self._controller_channel_renewal())
        self.registrar.start()

    def _controller_channel_renewal(self) -> Callable[[], grpc.Channel | None] | None:
        """For the Registrar: a new channel to the controller once the client TLS files changed and load."""
        s = self.settings
        tls = s.controller_tls
        if tls is None:
            return None
        files = ChangedFiles(tls.ca, tls.cert, tls.key)

        def renew() -> grpc.Channel | None:
            if not files.changed():
                return None
            problem = client_files_problem(tls.cert, tls.key, tls.ca)
            if problem:
                log.warning("TLS files towards the controller changed but do not load; keeping the previous "
                            "ones: %s", problem)
                return None
            log.info("TLS files towards the controller changed: a new channel uses them")
            return self.channel_factory(s.controller, tls)
        return renew

    def _drop_fenced(self, volume_ids: list[str]) -> None:
        """This node was fenced: forget the attachments the controller names (their owners refuse the
        sessions anyway), each on a thread of its own, one at a time per volume.

        Called on the heartbeat thread, which must not wait for them: a detach flushes first, and a flush on a
        session its owner cut off waits until the reconnect gives up (30 s for a userspace one, open-iscsi's
        replacement timeout for a kernel one), longer than the controller's heartbeat timeout, so the node
        would be marked unhealthy, and its next attach refused, for as long."""
        with self._drops_guard:
            if self.attachments is None:
                return
            new = {v: record for v in volume_ids
                   if v not in self._dropping and (record := self.attachments.get(v)) is not None}
            self._dropping.update(new)
        for volume_id, record in new.items():
            threading.Thread(target=self._drop_one, args=(volume_id, record), name=f"fence-drop-{volume_id[:8]}",
                             daemon=True).start()

    def _drop_one(self, volume_id: str, record) -> None:
        """Detach ``record`` (only that one: an attach made once unfenced is another).  A logout that fails on
        a dead session is only logged: the next heartbeat names the volume again."""
        try:
            if self.attachments.detach(volume_id, only=record):
                log.warning("fenced: volume %s detached (its owner no longer exports it here)", volume_id)
        except Exception as exc:  # noqa: BLE001 - the record goes on the next heartbeat's retry
            log.warning("fenced: volume %s not detached yet: %s", volume_id, exc)
        finally:
            with self._drops_guard:
                self._dropping.discard(volume_id)
