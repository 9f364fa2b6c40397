"""Waiting for a background copy (a snapshot or a clone) with a simple text progress bar.

The bar goes to stderr, so ``-o json|yaml`` on stdout stays parseable.  On a
terminal it is redrawn in place; elsewhere (logs, CI) a line is printed each
time another tenth of the copy is done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

WIDTH = 30
CREATING = "creating"
STALL = 600.0  # seconds without progress after which ``wait`` stops waiting (the copy goes on without it)


_clock, _sleep = time.monotonic, time.sleep  # what ``wait`` measures a stall and waits with (tests give others)


class Stalled(Exception):
    """The copy made no progress for ``STALL`` seconds (its owner unreachable, say): waiting stops."""


def bar(progress: float, width: int = WIDTH) -> str:
    """``[###########-------------------]  37%``"""
    progress = min(1.0, max(0.0, progress))
    done = int(progress * width)
    return f"[{'#' * done}{'-' * (width - done)}] {progress * 100:3.0f}%"


def wait(fetch: Callable[[], Any], what: str, *, first: Any = None, interval: float = 0.5, out=None,
         sleep: Callable[[float], None] | None = None, show: bool = True, stall: float = STALL,
         clock: Callable[[], float] | None = None) -> Any:
    """Call ``fetch()`` (a message with ``state`` and ``progress``) until its state is no longer "creating";
    return the last answer.  ``first``: an answer already in hand (the create's).  ``Stalled`` when its
    progress has not moved for ``stall`` seconds: a copy whose owner stopped answering would otherwise keep
    the command (and a script calling it) waiting for ever."""
    out = out or sys.stderr
    clock, sleep = clock or _clock, sleep or _sleep
    tty = hasattr(out, "isatty") and out.isatty()
    shown = -1
    current = first if first is not None else fetch()
    seen, since = current.progress, clock()
    while current.state == CREATING:
        if current.progress != seen:
            seen, since = current.progress, clock()
        elif clock() - since >= stall:
            if show and shown >= 0 and tty:
                print(file=out)
            raise Stalled(f"{what}: no progress for {stall:.0f} s (at {current.progress * 100:.0f}%)")
        if show:
            step = int(current.progress * 10)
            if tty:
                print(f"\r{what}: {bar(current.progress)}", end="", file=out, flush=True)
            elif step != shown:
                print(f"{what}: {bar(current.progress)}", file=out, flush=True)
            shown = step
        sleep(interval)
        current = fetch()
    if show and shown >= 0:
        print(f"\r{what}: {bar(1.0 if current.state != 'error' else current.progress)}" if tty else
              f"{what}: {bar(1.0 if current.state != 'error' else current.progress)}", file=out, flush=True)
    return current
