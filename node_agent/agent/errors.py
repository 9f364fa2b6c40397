"""The agent's errors, split temporary/permanent, and the one table that maps them to gRPC codes.

Managers raise these (or let the host connectors' and storage errors through);
the servicer turns any of them into a status with ``grpc_status``.  Messages
say what to do and never carry a CHAP secret.
"""

from __future__ import annotations

import errno

import grpc

from node_agent.host.connector import (
    IdentityMismatch,
    InvalidVolumeTarget,
    PermanentConnectorError,
    TemporaryConnectorError,
)


class AgentError(Exception):
    """Something the caller should hear about; ``temporary`` says whether a retry may help."""

    temporary = False


class InvalidArgument(AgentError):
    """The request is malformed; nothing was changed."""


class NotFound(AgentError):
    """The volume or disk named does not exist here."""


class AlreadyExists(AgentError):
    """The id is taken with other, incompatible parameters."""


class FailedPrecondition(AgentError):
    """The current state forbids it (e.g. deleting an exported volume)."""


class ResourceExhausted(AgentError):
    """No space on the disk."""


class Unavailable(AgentError):
    """A temporary condition (a portal not answering, a busy device): retry later."""

    temporary = True


#: The one table: first matching class wins, so subclasses come before their bases.
GRPC_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidVolumeTarget, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (IdentityMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (TemporaryConnectorError, grpc.StatusCode.UNAVAILABLE),
    (PermanentConnectorError, grpc.StatusCode.FAILED_PRECONDITION),
)

_OS_CODES = {
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EBUSY: grpc.StatusCode.UNAVAILABLE,
    errno.EAGAIN: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for an expected error, or None for a bug (the servicer reports INTERNAL and logs it)."""
    for cls, code in GRPC_CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    if isinstance(exc, OSError) and exc.errno in _OS_CODES:
        return _OS_CODES[exc.errno], f"{exc.strerror or exc}"
    return None
