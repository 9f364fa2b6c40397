"""Where persistent reservations survive a restart: a sidecar file next to the backing file.

SPC-4 §5.13.5 (Persist Through Power Loss): while the last REGISTER had APTPL=1
the registrations and the reservation must outlive a power loss.  They are kept
in ``<backing file>.pr`` as JSON, saved by write-temp, fsync, rename, fsync of
the directory, so a crash leaves either the old or the new state.  Only a
regular backing file gets a sidecar (never ``/dev/...``).
"""

from __future__ import annotations

import json
import os
import stat
import threading

SUFFIX = ".pr"


class PtplStore:
    """The saved reservation state of one logical unit (``Reservations.dump()`` output)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._saved = 0  # the number of the latest state written or removed (``save_numbered``)

    @classmethod
    def beside(cls, backing) -> "PtplStore | None":
        """A store next to ``backing``'s regular file, or None (memory or block-device backing)."""
        path = getattr(backing, "path", None)
        if not path or getattr(backing, "read_only", False):
            return None
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
        except OSError:
            return None
        return cls(path + SUFFIX)

    def load(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def save_numbered(self, number: int, state: dict | None) -> None:
        """Save state ``number`` (None: remove the file), unless a later one is on disk already.  Callers
        on several threads are taken one at a time, so no save overwrites a later one."""
        with self._lock:
            if number <= self._saved:
                return
            if state is None:
                self.remove()
            else:
                self.save(state)
            self._saved = number

    def save(self, state: dict) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(state, sort_keys=True).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._sync_directory()

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
