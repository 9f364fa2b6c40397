"""The CSI gRPC server on a unix socket (``--csi-endpoint unix:///path``), as kubelet and the sidecars expect."""

from __future__ import annotations

import os
import secrets
import socket
import stat
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


def claim_socket_path(path: str, endpoint: str) -> None:
    """Make ``path`` free to bind: a socket file nobody answers on (left by a process that died) is removed.

    Anything else is refused with ``OSError``: a socket that answers is another instance's (removing it would cut
    that one off from kubelet and the sidecars), and a file that is not a socket is no CSI endpoint (a typo).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot listen on {endpoint}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens: stale
            os.unlink(path)
            return
        except OSError as exc:
            raise OSError(f"cannot listen on {endpoint}: {path} cannot be checked: {exc.strerror or exc}") from None
    raise OSError(f"cannot listen on {endpoint}: another process serves it")


def socket_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at ``path``, or None when there is none."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def release_socket_path(path: str, identity: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the socket file ``identity`` names (the one this process bound): another
    instance may have bound the path since, and its socket stays.  Call it while the server still runs: its
    socket keeps the inode, so no other file can have that identity."""
    if identity is not None and socket_identity(path) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def bind_socket(server: grpc.Server, endpoint: str) -> None:
    """Bind ``server`` (not started yet) to ``endpoint``'s path; a stale socket file there is replaced, a live
    one or another file refused (``claim_socket_path``).

    gRPC unlinks the path it bound when the server stops, whatever is there by then, another instance's socket
    too: so it binds a private name beside it, which is then renamed into place.  The path is removed by
    ``release_socket_path`` instead.  Raises ``OSError`` when the socket cannot be bound.
    """
    path = socket_path(endpoint)
    directory = os.path.dirname(path) or "/"
    os.makedirs(directory, exist_ok=True)
    claim_socket_path(path, endpoint)
    private = os.path.join(directory, f".{secrets.token_hex(3)}")  # short: sun_path ends at 107 bytes
    try:
        port = server.add_insecure_port(f"unix://{private}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {endpoint}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {endpoint}")
    os.rename(private, path)


def build_csi_controller_server(service: ControllerService, endpoint: str, *, settings: CsiSettings | None = None,
                                workers: int = 8, servicer: ControllerServicer | None = None,
                                driver_name: str = PLUGIN_NAME) -> grpc.Server:
    """A started server for Identity and Controller on ``endpoint`` (``bind_socket``).

    ``servicer``: a Controller servicer made by the caller (tests look inside it); default: one over ``service``.
    ``driver_name``: what GetPluginInfo answers.

    Raises ``OSError`` when the socket cannot be bound.
    """
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi-rpc"))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(controller=True, name=driver_name), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(servicer or ControllerServicer(service, settings), server)
    bind_socket(server, endpoint)
    server.start()
    return server
