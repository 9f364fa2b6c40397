"""iSCSI names (RFC 7143 §4.2.7): the iqn., eui. and naa. forms."""

from __future__ import annotations

import re

_NAME = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s\x00-\x1f\x7f]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)$")
MAX_NAME_BYTES = 223


def check_iqn(name: str) -> str:
    """Return ``name`` if it is an iSCSI name, else raise ``ValueError`` saying what is expected."""
    if not _NAME.fullmatch(name) or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{name!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui.… or naa.…)")
    return name
