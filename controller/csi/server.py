"""The CSI gRPC server on a unix socket (``--csi-endpoint unix:///path``), as kubelet and the sidecars expect."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import grpc

from controller.csi.controller import ControllerServicer, CsiSettings
from controller.csi.identity import PLUGIN_NAME, IdentityServicer
from controller.domain.service import ControllerService
from protos.csi.v1 import csi_pb2_grpc


def socket_path(endpoint: str) -> str:
    """``unix:///run/csi/csi.sock`` (or ``unix:/run/...``, or a bare path) -> the socket's path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError(f"CSI endpoint {endpoint!r}: give an absolute path, as unix:///path/csi.sock")
    return path


def build_csi_controller_server(service: ControllerService, endpoint: str, *, settings: CsiSettings | None = None,
                                workers: int = 8, servicer: ControllerServicer | None = None,
                                driver_name: str = PLUGIN_NAME) -> grpc.Server:
    """A started server for Identity and Controller on ``endpoint``; a stale socket file is replaced.

    ``servicer``: a Controller servicer made by the caller (tests look inside it); default: one over ``service``.
    ``driver_name``: what GetPluginInfo answers.

    Raises ``OSError`` when the socket cannot be bound.
    """
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    if os.path.exists(path):  # left by a previous run: CSI endpoints are owned by this process
        os.unlink(path)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi-rpc"))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(controller=True, name=driver_name), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(servicer or ControllerServicer(service, settings), server)
    try:
        port = server.add_insecure_port(f"unix://{path}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {endpoint}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {endpoint}")
    server.start()
    return server
