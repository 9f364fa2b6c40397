"""The one table from domain errors to gRPC status codes, used by every servicer and, read backwards,
by the agent client (``controller.agents_grpc``) to turn an agent's status back into a domain error."""

from __future__ import annotations

import grpc

from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted, Unavailable)
from controller.store.base import StoreConflict


class Unimplemented(DomainError):
    """The API has the RPC but this controller does not do it yet (snapshots, clones)."""


#: First matching class wins; admin.proto's header says what each code means to a caller.
GRPC_CODES: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    # the Kubernetes store lost a resourceVersion check (another controller wrote): the caller retries
    (StoreConflict, grpc.StatusCode.ABORTED),
)


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for a domain error, or None for anything else (a bug: the caller answers INTERNAL)."""
    for cls, code in GRPC_CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return None


def domain_error(code: grpc.StatusCode, message: str) -> DomainError:
    """The domain error for a status an agent answered with (the table read backwards).

    DEADLINE_EXCEEDED is ``Unavailable`` (retry later); codes outside the table
    (INTERNAL, UNKNOWN: a fault inside the agent) are ``Unavailable`` too: the
    domain treats any failed agent call as worth retrying, and says so. An agent has no state store, so its
    ABORTED is ``Unavailable`` too, never a ``StoreConflict``.
    """
    for cls, table_code in GRPC_CODES:
        if code == table_code and cls is not StoreConflict:
            return cls(message)
    return Unavailable(message)
