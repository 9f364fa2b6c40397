"""Where shoalctl finds the controller: ``--controller``, ``$SHOAL_CONTROLLER``, the context file, the default.

The context file is JSON written by ``shoal up`` (``{"controller": "HOST:PORT", ...}``) at
``$SHOAL_CONTEXT``, else ``$XDG_CONFIG_HOME/shoal/context.json`` (``~/.config/shoal/context.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_CONTROLLER = "127.0.0.1:7450"


def context_path() -> Path:
    if os.environ.get("SHOAL_CONTEXT"):
        return Path(os.environ["SHOAL_CONTEXT"])
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "shoal" / "context.json"


def read_context(path: Path | None = None) -> dict:
    """The context file's contents, or {} when there is none (or it is not readable JSON)."""
    try:
        data = json.loads((path or context_path()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_context(path: Path, data: dict) -> None:
    """Write-temp, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def controller_address(flag: str | None) -> tuple[str, str]:
    """The address to use and where it came from (for error messages)."""
    if flag:
        return flag, "--controller"
    if os.environ.get("SHOAL_CONTROLLER"):
        return os.environ["SHOAL_CONTROLLER"], "SHOAL_CONTROLLER"
    path = context_path()
    address = read_context(path).get("controller")
    if isinstance(address, str) and address:
        return address, str(path)
    return DEFAULT_CONTROLLER, "the default"
