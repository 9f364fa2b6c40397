"""The gRPC half of ``node_agent.peer_names``: the server interceptor that admits a call by the client
certificate's name (a module of its own so that ``shoal target``, which imports the names, loads no gRPC)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import grpc


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """The client certificate's subject common name and DNS subject alternative names, lower-cased (DNS names
    compare without case); {} without one.  Not ``x509_subject_alternative_name``: that holds every SAN
    type, so a certificate with a URI, e-mail or IP SAN ``shoal-admin`` would pass as that name."""
    auth = context.auth_context() or {}
    names = set()
    for key in ("x509_common_name", "peer_dns"):
        for value in auth.get(key, ()):
            names.add((value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).lower())
    return names


class PeerNames(grpc.ServerInterceptor):
    """Admit a call to a listed service only from a client certificate with one of the service's names.

    ``rules`` maps a service's full name (``package.Service``) to the names it admits; other services pass.
    ``own_names`` maps a service's full name to a request field (``node_id``) that must also be one of the
    certificate's names: each caller then acts only as itself (a node registers and heartbeats as the node
    its certificate names, not as another node)."""

    def __init__(self, rules: Mapping[str, Iterable[str]], own_names: Mapping[str, str] | None = None):
        self.rules = {service: frozenset(name.lower() for name in names) for service, names in rules.items()}
        self.own_names = dict(own_names or {})

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        allowed = self.rules.get(service)
        if handler is None or allowed is None:
            return handler
        return _guarded(handler, _checker(service, allowed, self.own_names.get(service)))


def _checker(service: str, allowed: frozenset[str], own_field: str | None) -> Callable:
    def check(request, context: grpc.ServicerContext) -> None:
        names = peer_names(context)
        shown = ", ".join(sorted(names)) or "none"
        if not names & allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the client certificate (names: {shown}) may not call {service}: it admits "
                          f"{', '.join(sorted(allowed))}")
        if own_field is not None:
            own = getattr(request, own_field, None)
            if not isinstance(own, str) or own.lower() not in names:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"the client certificate (names: {shown}) does not name {own_field} {own!r}: "
                              f"{service} takes a caller only as what its certificate names")
    return check


def _guarded(handler: grpc.RpcMethodHandler, check: Callable) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(request, context)`` before it (a stream's request: its iterator)."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for kind, make in kinds:
        behavior = getattr(handler, kind)
        if behavior is not None:
            def guarded(request, context, _behavior=behavior):
                check(request, context)
                return _behavior(request, context)
            return make(guarded, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
