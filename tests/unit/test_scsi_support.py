"""Shared helpers for the SCSI unit tests (no tests here): a logical unit on either backing store, CDB builders."""

from __future__ import annotations

from node_agent.scsi.device import LogicalUnit, LunSettings, Nexus
from node_agent.scsi.sense import SenseCode, parse_sense
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore

NEXUS = Nexus("iqn.2007-10.com.example:init,i,0x000000000001", "iqn.2026-01.io.shoal:t,t,0x0001")
OTHER = Nexus("iqn.2007-10.com.example:init2,i,0x000000000002", "iqn.2026-01.io.shoal:t,t,0x0001")
SIZE = 4 << 20
BS = 512


def make_lu(kind: str, tmp_path=None, size: int = SIZE, **settings) -> LogicalUnit:
    if kind == "memory":
        backing = MemoryBackingStore(size, BS)
    else:
        backing = FileBackingStore(tmp_path / "lun.img", size, block_size=BS)
    return LogicalUnit(backing, LunIdentity("vol-0001"), target_name="iqn.2026-01.io.shoal:t",
                       settings=LunSettings(**settings))


def run(lu, cdb: bytes, data=None, edtl: int | None = None, nexus=NEXUS):
    if edtl is None:
        edtl = len(data) if data is not None else 4096
    return lu.execute(nexus, bytes(cdb), data, edtl)


def sense_of(result) -> SenseCode:
    return parse_sense(result.sense)


def data_of(lu, result) -> bytes:
    """Data-In bytes, resolving a FileRange the way the transport would."""
    data = result.data
    if hasattr(data, "fd"):
        return lu.backing.read(data.offset, data.length)
    return bytes(data or b"")


def cdb10(opcode: int, lba: int = 0, length: int = 0, byte1: int = 0, control: int = 0) -> bytes:
    return bytes([opcode, byte1]) + lba.to_bytes(4, "big") + b"\0" + length.to_bytes(2, "big") + bytes([control])


def cdb12(opcode: int, lba: int = 0, length: int = 0, byte1: int = 0) -> bytes:
    return bytes([opcode, byte1]) + lba.to_bytes(4, "big") + length.to_bytes(4, "big") + b"\0\0"


def cdb16(opcode: int, lba: int = 0, length: int = 0, byte1: int = 0) -> bytes:
    return bytes([opcode, byte1]) + lba.to_bytes(8, "big") + length.to_bytes(4, "big") + b"\0\0"
