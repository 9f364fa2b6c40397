"""The domain's error hierarchy: one class per gRPC status the admin API answers with.

Every message says what happened and what to do.  ``temporary`` splits the
hierarchy the way kopf splits ``TemporaryError``/``PermanentError``: a
temporary error is worth retrying after a delay, a permanent one is not until
something changes.  ``controller/api`` maps each class to one gRPC code.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    temporary = False

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(DomainError):
    """Bad input; nothing was changed."""


class NotFound(DomainError):
    """The named object does not exist."""


class AlreadyExists(DomainError):
    """An object of that name exists with other parameters."""


class FailedPrecondition(DomainError):
    """The current state forbids the operation (e.g. deleting an attached volume)."""


class ResourceExhausted(DomainError):
    """No node has room for the request."""


class Unavailable(DomainError):
    """A node agent cannot be reached (or is unhealthy): retry later."""

    temporary = True
