"""``rpc``: what every controller RPC does around its body.

Required-field checks (``INVALID_ARGUMENT`` naming the field, before anything
is read or written), one log line per call (the request's fields, never a
secret: no admin or registration request carries one, and fields named like
one are left out anyway; answers are never logged, and GetPublishSecret's is the only one with a secret), and errors turned into statuses through the one
table of ``errors.GRPC_CODES``, their messages cut to ``MAX_DETAILS_BYTES``.
Anything else is a bug: logged with its traceback and answered ``INTERNAL``
without details.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from google.protobuf.message import Message

from controller.api.errors import grpc_status
from controller.domain.errors import InvalidArgument

log = logging.getLogger("shoal.controller.api")

_SECRET_WORDS = ("secret", "password", "token", "key")

MAX_DETAILS_BYTES = 2048
"""A status message travels in the grpc-message trailer, percent-encoded (up to 3 bytes a byte): a client refuses
trailers past 8 KiB (16 KiB for certain) with RESOURCE_EXHAUSTED, which would hide the real code."""


def summary(request: Message, limit: int = 200) -> str:
    """``name='v1', size_bytes=1073741824``: the set scalar fields of a request, secrets left out."""
    parts = []
    for field, value in request.ListFields():
        if any(word in field.name for word in _SECRET_WORDS):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            shown = repr(dict(value)) if field.message_type.fields_by_name["value"].message_type is None \
                else f"<{len(value)} item(s)>"
        elif field.type == field.TYPE_MESSAGE:
            shown = f"<{len(value)} item(s)>" if field.is_repeated else "<message>"
        elif field.is_repeated:
            shown = repr(list(value))
        else:
            shown = repr(value)
        parts.append(f"{field.name}={shown}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[:limit] + "…"


def capped(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``details`` cut to ``limit`` bytes of UTF-8 (at a character), saying so: the code stays the one answered."""
    data = details.encode()
    if len(data) <= limit:
        return details
    return data[:limit].decode(errors="ignore") + f"… (cut: {len(details)} characters)"


def rpc(*required: str):
    """Wrap a servicer method: ``required`` fields must be set (non-empty, non-zero)."""
    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        def handler(self, request, context: grpc.ServicerContext):
            started = time.monotonic()
            try:
                for field in required:
                    if not getattr(request, field):
                        raise InvalidArgument(f"{field} is required")
                response = method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, bugs included
                status = grpc_status(exc)
                if status is None:
                    log.exception("%s(%s) failed", name, summary(request))
                    status = (grpc.StatusCode.INTERNAL, f"{name} failed inside the controller; see its log")
                else:
                    status = (status[0], capped(status[1]))
                    log.info("%s(%s): %s: %s", name, summary(request), status[0].name, status[1])
                context.abort(*status)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s(%s): OK in %.3f s", name, summary(request), time.monotonic() - started)
            return response
        return handler
    return wrap
