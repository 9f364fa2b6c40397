"""shoalctl's connection to the controller: one channel, one deadline per call, errors as ``CliError``."""

from __future__ import annotations

import grpc

from protos.shoal.v1 import admin_pb2_grpc

#: Exit codes scripts can rely on.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """What shoalctl prints (``shoalctl: <message>``) before exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _read(path: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None


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
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                                       certificate_chain=_read(tls_cert))
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
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

    def _connect(self) -> None:
        """Tell "nobody is listening" apart from "the controller said UNAVAILABLE" (an agent is down)."""
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
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
        return CliError(f"{details} ({code.name})" if details else code.name)
