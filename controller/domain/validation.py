"""Argument checks: each returns the value (normalised) or raises ``InvalidArgument`` saying what is wanted.

They run before anything is read or written, so bad input changes nothing.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from controller.domain.errors import InvalidArgument
from controller.domain.model import MODES, Disk

# DNS-label-like (RFC 1123 label): what Kubernetes accepts for most object names.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Node ids are host names: RFC 1123 host names, any case.
_NODE_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_DISK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
# [0-9], not \d: \d matches any Unicode digit ("\uff18\uff10"), which int() reads as a number.
_IQN = re.compile(r"^(iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*(:[^\s\x00-\x1f\x7f]+)?|eui\.[0-9A-Fa-f]{16}"
                  r"|naa\.[0-9A-Fa-f]{16,32})$")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def human_bytes(n: int | float) -> str:
    """1.5 GiB, 512 B: sizes in error messages."""
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


SHOWN_CHARS = 64
"""How much of a value a message quotes: a status message travels in a header, whose size gRPC limits (8 KiB)."""


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for a message (its repr), cut to its first ``limit`` characters when longer."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, not {type(value).__name__}")
    return value


def name(value: Any, what: str = "name") -> str:
    value = _text(value, what)
    if not _NAME.fullmatch(value):
        raise InvalidArgument(f"{what} {shown(value)} is not valid: use 1-63 lowercase letters, digits and '-', "
                              "starting and ending with a letter or digit")
    return value


def node_id(value: Any) -> str:
    value = _text(value, "node id")
    if not _NODE_ID.fullmatch(value):
        raise InvalidArgument(f"node id {shown(value)} is not valid: use a host name (letters, digits, '-', '.')")
    return value


def disk_name(value: Any) -> str:
    value = _text(value, "disk name")
    if not _DISK.fullmatch(value):
        raise InvalidArgument(f"disk name {shown(value)} is not valid: use 1-63 letters, digits, '.', '_' or '-'")
    return value


def iqn(value: Any) -> str:
    value = _text(value, "initiator IQN")
    if not _IQN.fullmatch(value) or len(value.encode()) > 223:
        raise InvalidArgument(f"initiator IQN {shown(value)} is not an iSCSI name "
                              "(iqn.YYYY-MM.reversed.domain[:id], eui.… or naa.…)")
    return value


def address(value: Any, what: str) -> str:
    value = _text(value, what)
    match = _ADDRESS.fullmatch(value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise InvalidArgument(f"{what} {shown(value)} is not host:port")
    return value


def line(value: Any, what: str, *, limit: int) -> str:
    """One line of free text (a fence reason), stripped, at most ``limit`` characters: no control characters
    within, which would forge log lines or drive the terminal that shows it."""
    value = _text(value, what).strip()
    bad = _CONTROL.search(value)
    if bad:
        raise InvalidArgument(f"{what} has a control character ({ascii(bad.group())} at {bad.start()}): "
                              "give one line of text")
    return value[:limit]


def count(value: Any, what: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be a whole number of bytes, not {shown(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        top = f" and at most {maximum} ({human_bytes(maximum)})" if maximum is not None else ""
        raise InvalidArgument(f"{what} {value} is out of range: it must be at least {minimum}{top}")
    return value


def size(value: Any, *, multiple: int, maximum: int, what: str = "size") -> int:
    """A volume size: positive, a multiple of the block size, at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be a whole number of bytes, not {shown(value)}")
    if value <= 0:
        raise InvalidArgument(f"{what} {value} is not positive: give the size in bytes, e.g. 1073741824 for 1 GiB")
    if value > maximum:
        raise InvalidArgument(f"{what} {value} ({human_bytes(value)}) is larger than the largest volume "
                              f"accepted ({human_bytes(maximum)})")
    if value % multiple:
        raise InvalidArgument(f"{what} {value} is not a multiple of {multiple} bytes "
                              f"(the block size); {value - value % multiple + multiple} would be")
    return value


def ratio(value: Any, *, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"overcommit ratio must be a number, not {shown(value)}")
    if not 1.0 <= value <= maximum:
        raise InvalidArgument(f"overcommit ratio {value} is out of range: use 1.0 (no overcommit) "
                              f"up to {maximum}")
    return float(value)


#: Caps of a label map (node labels, volume constraints, CSI topology segments): each is stored on its record and
#: sent back in answers; topology needs a handful.  Checked before the labels themselves, so a huge map costs little.
MAX_LABELS = 64
MAX_LABEL_BYTES = 16 * 1024


def labels(value: Any, what: str = "labels") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a mapping of key to value")
    if len(value) > MAX_LABELS:
        raise InvalidArgument(f"{what}: {len(value)} labels are too many: at most {MAX_LABELS} are accepted")
    size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in value.items())
    if size > MAX_LABEL_BYTES:
        raise InvalidArgument(f"{what}: {human_bytes(size)} of keys and values is too much: at most "
                              f"{human_bytes(MAX_LABEL_BYTES)} ({MAX_LABEL_BYTES} bytes) is accepted")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"{what}: key {shown(key)} is not a label key (letters, digits, '.', '_', '-')")
        if not isinstance(val, str) or not _LABEL_VALUE.fullmatch(val):
            raise InvalidArgument(f"{what}: value {shown(val)} of {key} is not a label value")
        out[key] = val
    return dict(sorted(out.items()))


def mode(value: Any) -> str:
    if value not in MODES:
        raise InvalidArgument(f"mode {shown(value)} is not one of {', '.join(MODES)}")
    return value


def portals(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgument("portals must be a list of host:port")
    out = tuple(address(p, "portal") for p in value)
    if not out:
        raise InvalidArgument("a node needs at least one iSCSI portal (host:port)")
    return out


def disks(value: Any) -> tuple[Disk, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument("disks must be a list")
    out: list[Disk] = []
    for disk in value:
        if not isinstance(disk, Disk):
            raise InvalidArgument(f"disks must be Disk records, not {type(disk).__name__}")
        disk_name(disk.name)
        _text(disk.path, f"path of disk {disk.name}")
        count(disk.capacity_bytes, f"capacity of disk {disk.name}", maximum=1 << 62)
        count(disk.free_bytes, f"free bytes of disk {disk.name}", maximum=disk.capacity_bytes)
        if any(d.name == disk.name for d in out):
            raise InvalidArgument(f"disk {disk.name} is listed twice")
        out.append(disk)
    return tuple(sorted(out, key=lambda d: d.name))
