"""``shoal target`` with some LUNs on a deliberately slow TEST device (never for production).

``DelayedBackingStore`` wraps a real ``FileBackingStore`` and makes every read,
write, flush and hole punch (and a close after writes, which flushes) a *blocking* call that sleeps ``delay`` seconds first, as a
disk with a cold cache or a stalled network volume would; it offers
``read_nowait``/``write_nowait`` that always say "would block" (and no ``fd``,
so reads never go to ``sendfile``).  The target must hand its I/O to the
worker pool and keep serving other sessions meanwhile: that is what the
fairness test checks.

The device is selectable only from here (no production option names it):

    python -m tests.support.slow_target --slow PATH [--slow PATH ...] [--delay 0.05] -- target ARGS...

runs ``node_agent.cli.main(ARGS)`` with the LUNs whose file is one of the
``--slow`` paths wrapped (``running_shoal_target(..., command=slow_command(...))``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class DelayedBackingStore:
    """A backing store whose every I/O blocks for ``delay`` seconds (a TEST device)."""

    fd = None  # no sendfile: every read goes through ``read`` (and so through the delay)

    def __init__(self, inner, delay: float):
        self.inner = inner
        self.delay = delay
        self.size = inner.size
        self.block_size = inner.block_size
        self.read_only = getattr(inner, "read_only", False)
        self.path = getattr(inner, "path", None)  # the file's sidecars (reservations, sanitize mark) beside it
        self.unflushed = False  # written since the last flush: closing must flush, slowly

    def read_nowait(self, offset: int, length: int):
        return None  # this device always blocks

    def write_nowait(self, offset: int, data, fua: bool = False) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(self.delay)
        return self.inner.read(offset, length)

    def write(self, offset: int, data, fua: bool = False) -> None:
        time.sleep(self.delay)
        self.inner.write(offset, data, fua)
        self.unflushed = not fua

    def flush(self) -> None:
        time.sleep(self.delay)
        self.unflushed = False
        self.inner.flush()

    def punch(self, offset: int, length: int) -> None:
        time.sleep(self.delay)
        self.inner.punch(offset, length)

    def extent(self, offset: int, limit: int):
        return self.inner.extent(offset, limit)

    def is_mapped(self, offset: int, length: int) -> bool:
        return self.inner.is_mapped(offset, length)

    def resize(self, new_size: int) -> None:
        self.inner.resize(new_size)
        self.size = new_size

    def close(self) -> None:
        if self.unflushed:  # closing flushes (fdatasync): as slowly as ``flush`` when written since the last
            time.sleep(self.delay)
        self.inner.close()


def slow_command(slow_paths: list, delay: float = 0.05) -> list[str]:
    """The argv prefix that starts ``shoal target`` with ``slow_paths`` on the delayed device."""
    argv = [sys.executable, "-m", "tests.support.slow_target", "--delay", str(delay)]
    for path in slow_paths:
        argv += ["--slow", str(path)]
    return argv + ["--"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shoal target with LUNs on a slow TEST device")
    parser.add_argument("--slow", action="append", default=[], help="backing file to serve through the delay")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds every read/write/flush blocks")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    slow = {os.path.realpath(p) for p in args.slow}

    from node_agent import cli, target_service

    real_open_lun = target_service.open_lun

    def open_lun(spec, iqn):
        if os.path.realpath(spec.path) in slow:
            spec = dataclasses.replace(spec, wrap=lambda backing: DelayedBackingStore(backing, args.delay))
        return real_open_lun(spec, iqn)

    target_service.open_lun = open_lun
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
