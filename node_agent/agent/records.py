"""The agent's own records: JSON files saved by write-temp, fsync, rename (then fsync of the directory).

A reader sees the old file or the new one, never a torn one, also after a
power loss.  Secrets go in files created 0600.  A file that is there but does
not hold what it should (empty, not JSON, not the expected type: a filesystem
repaired after a crash, a hand edit) is ``CorruptRecord``, whose message names
the file: whoever reads it decides whether that stops the agent or one volume.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("shoal.agent.records")


def write_json(path: str, data: Any, *, mode: int = 0o644) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, file mode ``mode``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # a leftover temp file may have had another mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.replace(tmp, path)
    fsync_dir(directory)


class CorruptRecord(ValueError):
    """A record that exists but cannot be read as what it should be; the message names the file."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: corrupt record ({why})")
        self.path = path
        self.why = why


def read_json(path: str, default: Any, expect: type | None = None) -> Any:
    """The file's JSON, or ``default`` when it does not exist; ``CorruptRecord`` (naming the file) when it is
    not JSON, or, with ``expect``, not of that type (``dict``: a JSON object)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return default
    except ValueError as exc:  # JSONDecodeError (an empty file too), UnicodeDecodeError (binary garbage)
        raise CorruptRecord(path, str(exc) or type(exc).__name__) from None
    if expect is not None and not isinstance(data, expect):
        raise CorruptRecord(path, f"expected {_KINDS.get(expect, expect.__name__)}, found {_kind(data)}")
    return data


_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
          int: "a JSON number", float: "a JSON number"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), f"a JSON {type(value).__name__}")


TEMP_SUFFIX = ".tmp"
"""Of the temporary file of an atomic write: ``write_json`` here, and ``scsi.sidecar.write_durably`` (a LUN's
persistent reservations and sanitize mark) beside a volume's image."""


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the temporary files (``*.tmp``) a stop left in ``directory``; the names removed.

    Only at start, before anything writes there: such a file is a write the stop cut before its rename, so
    the record it was to replace is still whole under its own name (or was never made), and nothing reads
    the temporary file.  No file of a volume or snapshot ends so (theirs end in ``.img``, ``.json``,
    ``.pr``, ``.sanitize``, ``.creating``, whatever the id), so no user data goes."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


def remove_temp(path: str) -> None:
    """The temporary file a stop left of ``write_json(path)``, removed; ``path`` itself (whole, or never made) is
    never touched."""
    if not os.path.isfile(path + TEMP_SUFFIX):
        return
    try:
        os.unlink(path + TEMP_SUFFIX)
    except FileNotFoundError:
        return
    log.info("removed %s, left by a write a stop interrupted (%s itself is whole)", path + TEMP_SUFFIX,
             os.path.basename(path))


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
