"""One gRPC server for both controller services, plaintext or TLS (mutual TLS when a client CA is given)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from controller.api.admin import AdminServicer
from controller.api.registration import RegistrationServicer
from controller.domain.service import ControllerService
from controller.metrics import ControllerMetrics
from node_agent.peer_check import PeerNames
from node_agent.peer_names import ADMIN_NAMES, ADMIN_SERVICE, NODE_NAMES, REGISTRATION_SERVICE
from node_agent.tls_reload import TLS_BIND_HINT, ReloadingServerTls
from protos.shoal.v1 import admin_pb2_grpc, agent_pb2_grpc


@dataclass(frozen=True)
class ServerTls:
    """PEM files for the controller's port."""

    cert: str
    """The controller's certificate chain."""
    key: str
    """Its private key."""
    client_ca: str = ""
    """When set, clients (shoalctl, agents) must present a certificate this CA signed (mutual TLS)."""
    admin_names: tuple[str, ...] = ADMIN_NAMES
    """With ``client_ca``: the certificate names AdminService admits (``node_agent.peer_names``)."""
    node_names: tuple[str, ...] = NODE_NAMES
    """With ``client_ca``: the certificate names RegistrationService admits (the agents')."""
    node_id_in_certificate: bool = False
    """With ``client_ca``: a node registers and heartbeats only under a name its certificate also carries (its
    node id as CN or DNS SAN, beside one of ``node_names``), so a node cannot act as another: per-node
    certificates (``--tls-node-id-in-certificate``)."""

    def __post_init__(self) -> None:
        if not self.cert or not self.key:
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.node_id_in_certificate and not self.client_ca:
            raise ValueError("--tls-node-id-in-certificate needs --tls-client-ca: only client certificates carry "
                             "names to check")


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials that follow the files (a renewed certificate is served to new connections without a restart:
    ``node_agent.tls_reload``).  Raises ``ValueError`` naming the file for a PEM that does not load (gRPC would
    only fail to bind)."""
    return ReloadingServerTls(tls.cert, tls.key, tls.client_ca).credentials()


def build_server(service: ControllerService, listen: str, *, tls: ServerTls | None = None,
                 workers: int = 16, metrics: ControllerMetrics | None = None,
                 node_labels=None, reuse_port: bool = False) -> tuple[grpc.Server, int]:
    """A started server for AdminService and RegistrationService on ``listen``; returns it and the bound port.

    ``metrics`` gets AdminService's observations (attach latency); None: a private, unserved registry.
    ``node_labels``: RegistrationService's label merger (``--store kubernetes``); None: the agent's labels as sent.
    ``reuse_port``: bind with SO_REUSEPORT, only for a new leader taking the port over from its own standby
    server (``controller.api.standby``).  Otherwise a port another process holds is refused: with gRPC's default
    SO_REUSEPORT a second controller would start on it and take half the connections, with another state.

    Raises ``OSError`` when the address cannot be bound (say, a busy port), ``ValueError`` for bad TLS files.
    """
    interceptors = []
    if tls is not None and tls.client_ca:  # who may call what, by client certificate name
        interceptors.append(PeerNames({ADMIN_SERVICE: tls.admin_names, REGISTRATION_SERVICE: tls.node_names},
                                      {REGISTRATION_SERVICE: "node_id"} if tls.node_id_in_certificate else None))
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="controller-rpc"),
                         interceptors=interceptors, options=[("grpc.so_reuseport", int(reuse_port))])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(service, metrics), server)
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(RegistrationServicer(service, node_labels), server)
    credentials = server_credentials(tls) if tls else None
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError:  # grpcio raises RuntimeError for a port it cannot bind
        port = 0
    if not port:
        raise OSError(f"cannot listen on {listen}: the port is in use, or the address is not this host's"
                      + (TLS_BIND_HINT if credentials else ""))
    server.start()
    return server, port
