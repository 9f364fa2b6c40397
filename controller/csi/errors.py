"""The CSI error table and the wrapper every CSI RPC runs in.

The domain's errors map to the same codes as for the admin API
(``controller.api.errors.GRPC_CODES``); CSI adds two of its own that only the
CSI layer decides: ``OutOfRange`` (a capacity the plugin cannot give) and
``Aborted`` (an operation on the same volume is still under way, or a
pagination token that is no longer valid: the CO retries). A ``StoreConflict`` of the Kubernetes store (another
controller wrote the object since this one read it) is ABORTED too, through the domain table.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import grpc

from controller.api.decorators import capped, summary
from controller.api.errors import GRPC_CODES
from controller.domain.errors import DomainError, InvalidArgument

log = logging.getLogger("shoal.csi")


class OutOfRange(DomainError):
    """The capacity range asked for cannot be honoured (CSI: OUT_OF_RANGE)."""


class Aborted(DomainError):
    """Retry: an operation on the same object is pending, or the starting token is stale (CSI: ABORTED)."""

    temporary = True


#: First matching class wins: CSI's own codes, then the domain's table.
CSI_CODES: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (Aborted, grpc.StatusCode.ABORTED),
) + GRPC_CODES


def csi_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    for cls, code in CSI_CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return None


def csi_rpc(*required: str):
    """Wrap a CSI servicer method: ``required`` fields must be set (spec: INVALID_ARGUMENT when missing).

    A dotted name (``capacity_range.required_bytes``) is not supported on purpose: nested
    checks belong to the method, which knows the spec's code for each.  Secrets fields are
    never logged (``summary`` leaves them out; mount flags only appear as a count).
    """
    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        def handler(self, request, context: grpc.ServicerContext):
            started = time.monotonic()
            try:
                for field in required:
                    value = getattr(request, field)
                    if not value or (hasattr(value, "ByteSize") and not request.HasField(field)):
                        raise InvalidArgument(f"{field} is required")
                response = method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, bugs included
                status = csi_status(exc)
                if status is None:
                    log.exception("%s(%s) failed", name, summary(request))
                    status = (grpc.StatusCode.INTERNAL, f"{name} failed inside the plugin; see its log")
                else:
                    status = (status[0], capped(status[1]))  # a long message would turn the code into another
                    log.info("%s(%s): %s: %s", name, summary(request), status[0].name, status[1])
                context.abort(*status)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s(%s): OK in %.3f s", name, summary(request), time.monotonic() - started)
            return response
        return handler
    return wrap


class InFlight:
    """Keys with an operation under way: a second CSI call on the same key is ABORTED (the spec's
    "operation pending for volume"), instead of queueing behind the first in a sidecar's timeout."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._keys: set[str] = set()

    @contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        with self._guard:
            if key in self._keys:
                raise Aborted(f"an operation on {what} is already under way: retry when it is done")
            self._keys.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._keys.discard(key)
