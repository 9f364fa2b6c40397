"""Serial number arithmetic for CmdSN/StatSN/DataSN (RFC 1982, as RFC 7143 §4.2.2.1 requires)."""

from __future__ import annotations

_HALF = 1 << 31
_MOD = 1 << 32


def sn_add(a: int, n: int) -> int:
    return (a + n) % _MOD


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial arithmetic."""
    return a != b and ((a < b and b - a < _HALF) or (a > b and a - b > _HALF))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def in_window(sn: int, low: int, high: int) -> bool:
    """low <= sn <= high in serial arithmetic."""
    return sn_le(low, sn) and sn_le(sn, high)
