"""shoalctl's connection to the controller: one channel, one deadline per call, errors as ``CliError``."""

from __future__ import annotations

import socket

import grpc

from protos.shoal.v1 import admin_pb2_grpc

#: Exit codes scripts can rely on.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """What shoalctl prints (``shoalctl: <message>``) before exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR, status: str = ""):
        super().__init__(message)
        self.code = code
        self.status = status  # the controller's gRPC status name (NOT_FOUND, ...); "" when none came


def _read(path: str, flag: str = "", marker: bytes = b"") -> bytes | None:
    """A PEM file's bytes; a usage error when it cannot be read or holds no ``marker`` block (gRPC would only
    log "Could not load any root certificate" and time out)."""
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    if marker and marker not in data:
        raise CliError(f"{flag} {path}: no PEM {marker.decode().strip('- ').lower()} in it", EXIT_USAGE)
    return data


def _listening(address: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at ``address`` (HOST:PORT, [V6]:PORT)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class Api:
    """AdminService at ``address``; ``call("GetVolume", request)`` returns the answer or raises ``CliError``."""

    def __init__(self, address: str, source: str, *, timeout: float, connect_timeout: float = 5.0,
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        self.address = address
        self.source = source
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        if tls_ca or tls_cert or tls_key:
            if bool(tls_cert) != bool(tls_key):
                raise CliError("--tls-cert and --tls-key go together", EXIT_USAGE)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "--tls-ca", b"CERTIFICATE-----"),
                private_key=_read(tls_key, "--tls-key", b"PRIVATE KEY-----"),
                certificate_chain=_read(tls_cert, "--tls-cert", b"CERTIFICATE-----"))
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        self.tls = bool(tls_ca or tls_cert or tls_key)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self._connected = False

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request):
        self._connect()
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None

    def exists(self, method: str, request) -> bool:
        """Whether ``method`` (a Get) finds what ``request`` names: False on NOT_FOUND, other errors raised."""
        try:
            self.call(method, request)
        except CliError as exc:
            if exc.status == "NOT_FOUND":
                return False
            raise
        return True

    def _connect(self) -> None:
        """Tell "nobody is listening" apart from "the controller said UNAVAILABLE" (an agent is down)."""
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            if _listening(self.address, self.connect_timeout):  # a port answers: the handshake is what failed
                hint = ("the TLS handshake failed: check --tls-ca (the CA of the controller's certificate) and, "
                        "for mutual TLS, --tls-cert/--tls-key" if self.tls else
                        "it does not speak plaintext gRPC: if it serves TLS, give --tls-ca (and --tls-cert/"
                        "--tls-key for mutual TLS)")
                raise CliError(f"cannot talk to the controller at {self.address} (from {self.source}): {hint}") \
                    from None
            raise CliError(f"controller unreachable at {self.address} (from {self.source}): is `shoal up` "
                           "running? Otherwise give --controller HOST:PORT or set SHOAL_CONTROLLER") from None
        self._connected = True

    def _error(self, method: str, exc: grpc.RpcError) -> CliError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(f"the controller did not answer {method} within {self.timeout:g} s; it may still "
                            "finish: check with a list or show, or raise --timeout")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return CliError(details or f"the controller does not implement {method}")
        return CliError(f"{details} ({code.name})" if details else code.name, status=code.name)
