"""The agent's CSI server: Identity (no Controller service) and Node, on a unix socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from controller.csi.identity import PLUGIN_NAME, IdentityServicer
from controller.csi.server import bind_socket
from node_agent.csi.node import NodeServicer
from protos.csi.v1 import csi_pb2_grpc


def build_csi_node_server(servicer: NodeServicer, endpoint: str, *, workers: int = 8,
                          driver_name: str = PLUGIN_NAME) -> grpc.Server:
    """A started server on ``endpoint`` (``unix:///path``, see ``bind_socket``).

    ``driver_name``: what GetPluginInfo answers (the same as the controller's).

    Raises ``OSError`` when the socket cannot be bound.
    """
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi-node"))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(controller=False, name=driver_name), server)
    csi_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    bind_socket(server, endpoint)
    server.start()
    return server
