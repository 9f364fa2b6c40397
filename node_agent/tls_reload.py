"""Server TLS that follows its files: a certificate renewed on disk is served without a restart.

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
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

from node_agent.agent.settings import check_pems

log = logging.getLogger("shoal.tls")


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class ReloadingServerTls:
    """The server side of TLS from PEM files: ``cert`` (chain) and ``key``, and with ``client_ca`` the CA that
    client certificates must be signed by (mutual TLS).  Raises ``ValueError`` naming the file when they do
    not load at start (gRPC itself would only fail to bind)."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.paths = tuple(p for p in (cert, key, client_ca) if p)
        self.cert, self.key, self.client_ca = cert, key, client_ca
        check_pems(cert, key, client_ca)
        self._stamp = self._stamps()
        self._first = self._configuration()
        self._lock = threading.Lock()
        self.reloads = 0  # configurations taken from changed files since start

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._first, self.fetch,
                                                   require_client_authentication=bool(self.client_ca))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake: a new configuration, or None for "the same as before"."""
        try:
            stamp = self._stamps()
        except OSError:  # a file is being replaced this very moment: the next connection looks again
            return None
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:  # another handshake's thread took it meanwhile
                return None
            self._stamp = stamp  # a change that does not load is reported once, not on every connection
            try:
                check_pems(self.cert, self.key, self.client_ca)
                configuration = self._configuration()
            except (ValueError, OSError) as exc:
                log.warning("TLS files changed but do not load, still serving the previous certificate: %s", exc)
                return None
            self.reloads += 1
            log.info("TLS certificate %s reloaded: new connections get it", self.cert)
            return configuration

    def _stamps(self) -> tuple:
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, self.paths))

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key), _read(self.cert))], root_certificates=_read(self.client_ca) if self.client_ca else None)
