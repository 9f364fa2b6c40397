"""The agent's own records: JSON files saved by write-temp, fsync, rename (then fsync of the directory).

A reader sees the old file or the new one, never a torn one, also after a
power loss.  Secrets go in files created 0600.
"""

from __future__ import annotations

import json
import os
from typing import Any


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


def read_json(path: str, default: Any) -> Any:
    """The file's JSON, or ``default`` when it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
