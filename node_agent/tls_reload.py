"""TLS that follows its files: a certificate renewed on disk is used without a restart.

Certificates are short-lived where they are managed well (cert-manager renews at two thirds of their life, a
Kubernetes Secret mounted as a volume is swapped in place, certbot rewrites the files), and a server that read
its certificate once at start would go on presenting the old one until it expires and every client refuses
it.  ``ReloadingServerTls`` gives gRPC ``dynamic_ssl_server_credentials``: before each new connection's
handshake gRPC asks it for the configuration, and it answers with the files' current contents when their
modification time, size or inode changed (a Secret volume's symlink swap changes all three).  Connections
already open keep the certificate they were made with.

A change that does not load (a key written before its certificate, a truncated file) is not taken: the
server goes on with what it served, says so once per change in the log, and takes the files as soon as a
later change makes them a good pair again.  Contents of key files never reach a log line.

Clients are renewed by whoever holds their channels, with ``ChangedFiles`` and ``client_files_problem``: the
agent's registration loop takes a new channel to the controller (``Registrar.renew``), and the controller's
``GrpcAgentDirectory`` opens new channels to agents and closes the old ones once the calls on them are over.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading

import grpc

from node_agent.agent.settings import check_pems

log = logging.getLogger("shoal.tls")


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class ChangedFiles:
    """Tells when files changed since the last look: their modification time, size or inode."""

    def __init__(self, *paths: str):
        self.paths = tuple(p for p in paths if p)
        self._stamp = self._now()

    def _now(self) -> tuple | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, self.paths))
        except OSError:  # a file being replaced this very moment: the next look sees it
            return None

    def changed(self) -> bool:
        """True once per change."""
        now = self._now()
        if now is None or now == self._stamp:
            return False
        self._stamp = now
        return True


TLS_BIND_HINT = (", or gRPC could not use the TLS certificate and key (it takes RSA, ECDSA P-256/P-384/P-521 and "
                 "Ed25519 keys; not RSA-PSS or Ed448)")
"""Said when a port with TLS does not bind: gRPC (BoringSSL) refuses some keys Python's OpenSSL loads, and then
only fails to bind."""


def require_client_files(cert: str, key: str, ca: str, flags: str) -> None:
    """``ValueError`` naming ``flags`` at start when the client side's files do not load: found only at the first
    call, they would look like a peer that is down."""
    problem = client_files_problem(cert, key, ca)
    if problem:
        raise ValueError(f"{flags}: {problem}")


def client_files_problem(cert: str, key: str, ca: str) -> str:
    """Why the client side's PEM files (``cert`` and ``key`` optional, together) do not load; "" when they do."""
    try:
        if cert or key:
            check_pems(cert, key, ca)
        elif ca:
            _check_ca(ca)
    except ValueError as exc:
        return str(exc)
    return ""


def _check_ca(ca: str) -> None:
    try:
        ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError):
        raise ValueError(f"TLS CA {ca}: cannot be read, or no PEM certificate in it") from None


class ReloadingServerTls:
    """The server side of TLS from PEM files: ``cert`` (chain) and ``key``, and with ``client_ca`` the CA that
    client certificates must be signed by (mutual TLS).  Raises ``ValueError`` naming the file when they do
    not load at start (gRPC itself would only fail to bind)."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        check_pems(cert, key, client_ca)
        self._files = ChangedFiles(cert, key, client_ca)
        self._first = self._configuration()
        self._lock = threading.Lock()
        self.reloads = 0  # configurations taken from changed files since start

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._first, self.fetch,
                                                   require_client_authentication=bool(self.client_ca))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake: a new configuration, or None for "the same as before"."""
        with self._lock:  # handshakes on several threads: one of them takes a change
            if not self._files.changed():  # (a change that does not load is reported once, not every time)
                return None
            try:
                check_pems(self.cert, self.key, self.client_ca)
                configuration = self._configuration()
            except (ValueError, OSError) as exc:
                log.warning("TLS files changed but do not load, still serving the previous certificate: %s", exc)
                return None
            self.reloads += 1
            log.info("TLS certificate %s reloaded: new connections get it", self.cert)
            return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key), _read(self.cert))], root_certificates=_read(self.client_ca) if self.client_ca else None)
