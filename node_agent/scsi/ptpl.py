"""Where persistent reservations survive a restart: a sidecar file next to the backing file.

SPC-4 §5.13.5 (Persist Through Power Loss): while the last REGISTER had APTPL=1
the registrations and the reservation must outlive a power loss.  They are kept
in ``<backing file>.pr`` as JSON, saved by write-temp, fsync, rename, fsync of
the directory, so a crash leaves either the old or the new state.  Only a
regular backing file gets a sidecar (never ``/dev/...``).

A read-only unit (``LunSettings.read_only``, or a backing store opened
read-only) has one too: it loads it, so reservations persisted with APTPL hold
when the volume is exported read-only, and it keeps it up to date.  The file is
the device server's own metadata, not medium data: write protection is of the
medium (SBC-3 §4.11; PERSISTENT RESERVE OUT is not among the commands it ends),
and a device that reports PTPL_A=1 must keep what later changes make of the
state.  Where the file cannot be written (a read-only file system), the change
fails and is undone (``Reservations.settle_saves``).
"""

from __future__ import annotations

import json
import logging
import os
import threading

from node_agent.scsi.sidecar import path_beside, remove_durably, write_durably

SUFFIX = ".pr"
log = logging.getLogger("shoal.scsi")
_UNKNOWN = object()  # what the file holds before ``load`` or a save: a failed save puts nothing back


class UnsavedChangeIncluded(Exception):
    """A state not saved: it holds a change whose own save failed, which is undone (``save_numbered``)."""


class PtplStore:
    """The saved reservation state of one logical unit (``Reservations.dump()`` output)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._saved = 0  # the number of the latest state written or removed (``save_numbered``)
        self._failed: dict[int, int] = {}  # lineage -> the lowest number of its states whose save failed
        self._content: object = _UNKNOWN  # what the file holds, as far as this store knows (None: no file)

    @classmethod
    def beside(cls, backing) -> "PtplStore | None":
        """A store next to ``backing``'s regular file, or None (memory or block-device backing).  A read-only
        backing store gets one too (see the module docstring)."""
        path = path_beside(backing, SUFFIX, writable=False)
        return None if path is None else cls(path)

    def load(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            self._content = None
            return None
        self._content = content
        return json.loads(content.decode("utf-8"))

    def save_numbered(self, number: int, state: dict | None, lineage: int = 0) -> None:
        """Save state ``number`` (None: remove the file), unless a later one is on disk already.  Callers
        on several threads are taken one at a time, so no save overwrites a later one.

        States are numbered in the order they were taken, and a lineage counts the changes undone before
        (``Reservations``): a state of the same lineage numbered after one whose save failed holds that
        change, which is being undone, so it is refused (``UnsavedChangeIncluded``), never written.  A failed
        save leaves the file as it was."""
        with self._lock:
            failed = self._failed.get(lineage)
            if failed is not None and failed < number:
                raise UnsavedChangeIncluded(f"{self.path}: not saved: it holds an earlier change whose save "
                                            "failed")
            if number <= self._saved:
                return
            try:
                if state is None:
                    self.remove()
                else:
                    self.save(state)
            except BaseException:
                self._failed[lineage] = number if failed is None else min(failed, number)
                self._put_back()
                raise
            self._saved = number

    def save(self, state: dict) -> None:
        content = json.dumps(state, sort_keys=True).encode("utf-8")
        write_durably(self.path, content)
        self._content = content

    def remove(self) -> None:
        remove_durably(self.path)
        self._content = None

    def _put_back(self) -> None:
        """After a failed save: the file as it was.  A failure before the rename leaves it so already (only the
        temporary file, perhaps half written on a full disk, goes); one after it (the directory's fsync)
        leaves the new state in place, which would come back at the next start although it was undone."""
        tmp, content = f"{self.path}.tmp", self._content
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            try:
                with open(self.path, "rb") as f:
                    now: bytes | None = f.read()
            except FileNotFoundError:
                now = None
            if content is not _UNKNOWN and now != content:
                if content is None:
                    remove_durably(self.path)
                else:
                    write_durably(self.path, content)
        except OSError as exc:
            log.error("%s: putting the saved reservation state back after a failed save failed too: %s",
                      self.path, exc)
