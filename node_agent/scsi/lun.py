"""LUN field encoding (SAM-5 §4.7): single-level peripheral and flat space addressing."""

from __future__ import annotations

PERIPHERAL_DEVICE_ADDRESSING = 0b00  # SAM-5 §4.7.7.2: LUN 0-255, bus identifier 0
FLAT_SPACE_ADDRESSING = 0b01  # SAM-5 §4.7.7.4: LUN 0-16383
MAX_LUN = 0x3FFF
NO_LUN = -1  # what decode_lun returns for an address we do not serve


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field: peripheral addressing below 256, flat space addressing up to 16383."""
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN {lun} outside 0..{MAX_LUN}")
    if lun < 256:
        return bytes((PERIPHERAL_DEVICE_ADDRESSING << 6, lun)) + bytes(6)
    return bytes((FLAT_SPACE_ADDRESSING << 6 | lun >> 8, lun & 0xFF)) + bytes(6)


def decode_lun(field: bytes) -> int:
    """The LUN an 8-byte LUN field addresses, or ``NO_LUN`` for a multi-level/other-method address."""
    if len(field) != 8 or any(field[2:]):
        return NO_LUN
    method = field[0] >> 6
    if method == PERIPHERAL_DEVICE_ADDRESSING:
        return field[1] if field[0] & 0x3F == 0 else NO_LUN
    if method == FLAT_SPACE_ADDRESSING:
        return (field[0] & 0x3F) << 8 | field[1]
    return NO_LUN
