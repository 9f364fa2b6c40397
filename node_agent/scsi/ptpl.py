"""Where persistent reservations survive a restart: a sidecar file next to the backing file.

SPC-4 §5.13.5 (Persist Through Power Loss): while the last REGISTER had APTPL=1
the registrations and the reservation must outlive a power loss.  They are kept
in ``<backing file>.pr`` as JSON, saved by write-temp, fsync, rename, fsync of
the directory, so a crash leaves either the old or the new state.  Only a
regular backing file gets a sidecar (never ``/dev/...``).
"""

from __future__ import annotations

import json
import threading

from node_agent.scsi.sidecar import path_beside, remove_durably, write_durably

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
        path = path_beside(backing, SUFFIX)
        return None if path is None else cls(path)

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
        write_durably(self.path, json.dumps(state, sort_keys=True).encode("utf-8"))

    def remove(self) -> None:
        remove_durably(self.path)
