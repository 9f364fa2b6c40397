"""Sizes as people write them: ``64MiB``, ``1GiB``, ``1G``, ``1.5TiB``, ``4096``; binary units throughout."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
MAX_BYTES = (1 << 64) - 1  # what the API's uint64 carries; the controller sets the real limit
_SIZE = re.compile(r"^\s*(?P<number>[-+]?[0-9]*\.?[0-9]+)\s*(?P<unit>[KMGTPE]?)(?P<suffix>iB|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes; ``ValueError`` saying what is accepted.  ``1GB`` is refused: 10^9 or 2^30 is a guess."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"bad size {text!r}: use bytes or a number with K, M, G, T, P (binary: 1G = 1GiB = 2^30)")
    unit, suffix = match.group("unit").upper(), match.group("suffix") or ""
    if unit and suffix.lower() == "b":
        raise ValueError(f"bad size {text!r}: write {match.group('number')}{unit}iB (binary) or the bytes; "
                         f"{unit}B could mean powers of 10 or of 2")
    try:
        value = Decimal(match.group("number")) * UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"bad size {text!r}") from None
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    if value != value.to_integral_value():
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    if value > MAX_BYTES:
        raise ValueError(f"bad size {text!r}: larger than any volume can be")
    return int(value)


def human(n: int | float) -> str:
    """``1.0 GiB``, ``512 B``."""
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
