"""Small state files kept next to a logical unit's backing file, written so a crash leaves old or new.

A unit whose state must outlive the process serving it (a restart of ``shoal
target`` or the agent, a crash, a power loss) keeps it in ``<backing file>
<suffix>``: persistent reservations (``ptpl.PtplStore``, ``.pr``) and the mark
of a sanitize that has not finished (``SanitizeMark``, ``.sanitize``).  Only a
regular backing file gets sidecars: never ``/dev/...`` or a memory store.  A
read-only backing store only looks for a ``.sanitize`` mark (it writes none) but
keeps its ``.pr`` (reservations are the device's metadata, not medium data, and
a unit that reports PTPL_A=1 must keep later changes).  Writes go write-temp, fsync, rename, fsync of the
directory; removals unlink and fsync the directory.
"""

from __future__ import annotations

import json
import os
import stat
import time


def path_beside(backing, suffix: str, *, writable: bool = True) -> str | None:
    """``<backing file><suffix>`` for a regular backing file (a writable one unless ``writable`` is False),
    else None."""
    path = getattr(backing, "path", None)
    if not path or (writable and getattr(backing, "read_only", False)):
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    return path + suffix


def write_durably(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: on disk, with its directory entry, when this returns."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_directory(path)


def remove_durably(path: str) -> None:
    """Remove ``path`` (gone already: nothing to do), the removal on disk when this returns."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    sync_directory(path)


def sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SANITIZE_SUFFIX = ".sanitize"


class SanitizeMark:
    """``<backing file>.sanitize``: on disk from before a sanitize's pass writes its first block until the
    pass is over and its data stable, and for as long as the unit stays in the failed-sanitize state.

    A unit that opens its backing file and finds the mark was stopped during a sanitize (a crash, a kill, a
    power loss: the pass died with the process) or left in the failed state: it starts in that state (SBC-4
    §4.11), so a half-erased medium is never served as if all were well, and the next owner sees SANITIZE
    COMMAND FAILED until a sanitize completes or EXIT FAILURE MODE.  A read-only unit honours the mark too
    (SANITIZE, EXIT FAILURE MODE included, needs a writable one): a read-only export of a half-erased
    volume must not serve it either."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def beside(cls, backing) -> "SanitizeMark | None":
        path = path_beside(backing, SANITIZE_SUFFIX, writable=False)
        return None if path is None else cls(path)

    def present(self) -> bool:
        return os.path.lexists(self.path)

    def describe(self) -> str:
        """What the mark says (the sanitize's kind, who started it, when), for the log."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                record = json.load(handle)
            return (f"{record.get('kind', 'a sanitize')} started by {record.get('by') or 'an initiator'} "
                    f"at {record.get('started', '?')}")
        except (OSError, ValueError, AttributeError):
            return "a sanitize (unreadable mark)"

    def allows_exit(self) -> bool:
        """The sanitize had AUSE set: EXIT FAILURE MODE may end the failed state (an unreadable mark: no)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle).get("ause") is True
        except (OSError, ValueError, AttributeError):
            return False

    def set(self, kind: str, by: str | None, ause: bool = False) -> None:
        record = {"kind": kind, "by": by, "ause": ause,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_durably(self.path, json.dumps(record, sort_keys=True).encode("utf-8"))

    def clear(self) -> None:
        remove_durably(self.path)
