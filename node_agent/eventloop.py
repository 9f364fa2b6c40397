"""The event loop Shoal's iSCSI code runs on: uvloop where installed, else asyncio's own.

uvloop saves 5–10 % CPU per I/O here, and its ``transport.writelines`` sends a batch with its large payloads in
one ``writev`` without copying them.  ``SHOAL_EVENT_LOOP=asyncio`` forces the standard loop (to compare, or to
rule uvloop out when chasing a bug).  ``shoal target``, ``shoal iscsi`` and the agent's portal thread all take
their loop from here, so they always run on the same kind.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _uvloop():
    if os.environ.get("SHOAL_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop ``new_event_loop`` makes."""
    uvloop = _uvloop()
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def freeze_startup_objects() -> None:
    """For a daemon that has started: hide every object alive now from the garbage collector
    (``gc.freeze``).  Its modules, settings and servers live until it exits, and without this every
    full collection scans them all on the event loop that runs it: the portal runs one after a
    connection closed (a connection's core and channel refer to each other), which stalled every
    other session for 10 ms in ``shoal target`` (32,000 objects) and 40 ms with gRPC and the Kubernetes
    client loaded.  Frozen objects are never collected: only a process's entry point calls this, once
    it is serving, never code a test process runs."""
    gc.collect()  # startup's own garbage goes now, not into the frozen generation
    gc.freeze()
