"""What a standby controller serves on the gRPC port: every call answered ``UNAVAILABLE``, naming the leader.

With ``--store kubernetes`` only the Lease holder runs the admin and registration services.  A standby binds the
same port anyway, so a client that reaches it (through a Service before the readiness probe took the standby
out, or by address) learns who leads and that it should retry, instead of a bare "connection refused".  Agents'
registration and heartbeats retry UNAVAILABLE; the message says which replica to expect.

No request is parsed (the handler takes raw bytes), so every method of every service gets the same answer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc

from controller.api.server import ServerTls, server_credentials


class _Refuse(grpc.GenericRpcHandler):
    def __init__(self, leader: Callable[[], str]):
        self.leader = leader
        self.handler = grpc.unary_unary_rpc_method_handler(self._refuse)

    def service(self, handler_call_details):
        return self.handler

    def _refuse(self, request: bytes, context: grpc.ServicerContext):
        leader = self.leader()
        who = f"the leader is {leader}" if leader else "no leader is elected yet"
        context.abort(grpc.StatusCode.UNAVAILABLE,
                      f"this Shoal controller is a standby ({who}): retry; the leader serves this call")


def build_standby_server(listen: str, leader: Callable[[], str], *, tls: ServerTls | None = None,
                         workers: int = 2) -> tuple[grpc.Server, int]:
    """A started server refusing everything on ``listen``; returns it and the bound port.

    Raises ``OSError`` when the address cannot be bound.
    """
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="controller-standby"))
    server.add_generic_rpc_handlers((_Refuse(leader),))
    try:
        port = server.add_secure_port(listen, server_credentials(tls)) if tls else server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {listen} (address in use?)")
    server.start()
    return server, port
