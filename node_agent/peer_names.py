"""Who may call which gRPC service: the client certificate's name, checked per service (mutual TLS).

Mutual TLS proves that a caller holds a certificate the CA signed; by itself it says nothing about what the
caller may do. With one CA for the controller, the nodes and the admins (as the Helm chart and the test PKI
make them), a node's certificate used to pass everywhere: as the controller's on every other agent
(``ExportVolume`` of any volume to an initiator name and CHAP secret it chose, then read the data over iSCSI)
and as an admin's on the controller (``GetPublishSecret``, ``DeleteVolume``, fencing). So each service admits
only client certificates whose subject common name, or one of whose DNS subject alternative names, is on its
list (``PeerNames``):

- ``shoal.agent.v1.AgentService`` (on every agent) is called by the controller: ``shoal-controller``
  (agent ``--tls-controller-names``);
- ``shoal.admin.v1.AdminService`` (controller) by shoalctl, or from inside the controller's pod with its own
  certificate: ``shoal-admin`` and ``shoal-controller`` (controller ``--tls-admin-names``);
- ``shoal.agent.v1.RegistrationService`` (controller) by the agents: ``shoal-node`` (controller
  ``--tls-node-names``).

A refused call ends with PERMISSION_DENIED naming the certificate and the service; nothing runs. The check is
made only where the port asks for client certificates (``--tls-client-ca``): without them a caller has no name
to check, which is what TLS without a client CA (or plaintext, for a loopback port) means.

Registration does not tie a certificate to a node id yet: with the chart's shared ``node.crt`` a node can still
register as another node id (and receive the export calls meant for it).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import grpc

CONTROLLER_NAMES = ("shoal-controller",)
ADMIN_NAMES = ("shoal-admin", "shoal-controller")
NODE_NAMES = ("shoal-node",)

AGENT_SERVICE = "shoal.agent.v1.AgentService"
ADMIN_SERVICE = "shoal.admin.v1.AdminService"
REGISTRATION_SERVICE = "shoal.agent.v1.RegistrationService"


def parse_names(text: str) -> tuple[str, ...]:
    """``--tls-*-names``: a comma-separated list of certificate names; at least one."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("give at least one certificate name")
    return names


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """The client certificate's subject common name and DNS subject alternative names ({} without one)."""
    auth = context.auth_context() or {}
    names = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return names


class PeerNames(grpc.ServerInterceptor):
    """Admit a call to a listed service only from a client certificate with one of the service's names.

    ``rules`` maps a service's full name (``package.Service``) to the names it admits; other services pass."""

    def __init__(self, rules: Mapping[str, Iterable[str]]):
        self.rules = {service: frozenset(names) for service, names in rules.items()}

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        allowed = self.rules.get(service)
        if handler is None or allowed is None:
            return handler
        return _guarded(handler, service, allowed)


def _guarded(handler: grpc.RpcMethodHandler, service: str, allowed: frozenset[str]) -> grpc.RpcMethodHandler:
    def check(context: grpc.ServicerContext) -> None:
        names = peer_names(context)
        if not names & allowed:
            shown = ", ".join(sorted(names)) or "none"
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the client certificate (names: {shown}) may not call {service}: it admits "
                          f"{', '.join(sorted(allowed))}")

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for kind, make in kinds:
        behavior = getattr(handler, kind)
        if behavior is not None:
            def guarded(request, context, _behavior=behavior):
                check(context)
                return _behavior(request, context)
            return make(guarded, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
