"""Rendering: aligned tables and ``key: value`` blocks for people, ``-o json`` / ``-o yaml`` for scripts.

Commands hand over plain dicts (sizes in bytes, times as Unix seconds) plus the
columns a table shows; JSON and YAML print the dicts whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controller.cli.sizes import human

FORMATS = ("table", "json", "yaml")


@dataclass(frozen=True)
class Column:
    title: str
    key: str
    show: Callable[[Any], str] = str


def size(value: Any) -> str:
    return human(value) if value else "0"


def age(value: Any) -> str:
    if not value:
        return "never"
    seconds = max(0.0, time.time() - float(value))
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def joined(value: Any) -> str:
    return ",".join(str(v) for v in value) if value else "-"


def add_output_flag(parser) -> None:
    """``-o`` after a subcommand; it overrides a ``-o`` given before the noun (``add_global_output_flag``)."""
    parser.add_argument("-o", "--output", choices=FORMATS, default=argparse.SUPPRESS,
                        help="output format (default table)")


def add_global_output_flag(parser) -> None:
    """``shoalctl -o json status`` as well as ``shoalctl status -o json``."""
    parser.add_argument("-o", "--output", choices=FORMATS, default="table",
                        help="output format of commands that print objects (default table)")


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    import yaml  # PyYAML

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")


def emit_list(rows: list[dict], columns: Sequence[Column], fmt: str, *, key: str, out=None) -> None:
    out = out or sys.stdout
    if fmt != "table":
        print(_dump({key: rows}, fmt), file=out)
        return
    if not rows:
        print(f"no {key}", file=out)
        return
    cells = [[c.title for c in columns]] + [[c.show(row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip(), file=out)


def emit_object(data: dict, fields: Sequence[Column], fmt: str, out=None) -> None:
    out = out or sys.stdout
    if fmt != "table":
        print(_dump(data, fmt), file=out)
        return
    width = max(len(f.title) for f in fields) + 1
    for field in fields:
        print(f"{(field.title + ':').ljust(width)} {field.show(data.get(field.key))}", file=out)


def emit_message(text: str, data: dict | None, fmt: str, out=None) -> None:
    """A mutation's result: a sentence for people, the object for scripts."""
    out = out or sys.stdout
    if fmt != "table" and data is not None:
        print(_dump(data, fmt), file=out)
    else:
        print(text, file=out)


def emit_deleted(kind: str, name: str, existed: bool, fmt: str, out=None) -> None:
    """An idempotent delete's result: whether there was something to delete (a typo is not "deleted")."""
    emit_message(f"{kind} {name} deleted" if existed else f"{kind} {name} does not exist: nothing deleted",
                 {"name": name, "deleted": existed}, fmt, out)


def emit_detached(name: str, node: str, was_attached: bool, fmt: str, *, verb: str = "detach", out=None) -> None:
    """An idempotent detach's result (``verb``: detach or disconnect): whether ``node`` had the volume."""
    past, participle = ("disconnected", "connected") if verb == "disconnect" else ("detached", "attached")
    emit_message(f"volume {name} {past} from {node}" if was_attached else
                 f"volume {name} was not {participle} to {node}: nothing {past}",
                 {"name": name, "node": node, "detached": was_attached}, fmt, out)
