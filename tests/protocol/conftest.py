"""Protocol conversations with the sans-I/O target core.

No mocks: a real ``TargetConnection`` over a real ``LunMap`` whose LUNs sit on
``MemoryBackingStore`` (our own backing-store boundary; the file store is
exercised by the peer tests). ``Initiator`` below is a minimal scripted
initiator that builds PDUs with our codec and feeds the core in chunks of 1 to
10 bytes, the way TCP may split them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings, encode_text, parse_text
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.target import Credentials, TargetNode, TargetRegistry
from node_agent.scsi.device import FileRange, LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import MemoryBackingStore

TARGET = "iqn.2026-11.io.shoal.test:core"
INITIATOR = "iqn.2026-11.io.shoal.test:initiator"
BLOCKS = 2048  # 1 MiB of 512-byte blocks


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Received:
    opcode: int
    header: object
    data: bytes


@dataclass
class Initiator:
    """A scripted initiator talking to one ``TargetConnection``."""

    conn: TargetConnection
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    cmdsn: int = 1
    itt: int = 0x100
    isid: int = 0x400001370000
    header_digest: bool = False
    data_digest: bool = False
    tsih: int = 0

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            step = self.rng.randint(1, 10)
            self.conn.receive(data[pos:pos + step])
            pos += step

    def send(self, opcode: Opcode, data: bytes = b"", *, digests: bool | None = None, **fields) -> None:
        use = digests if digests is not None else True
        pieces = P.encode_pdu(opcode, data, header_digest=self.header_digest and use,
                              data_digest=self.data_digest and use, **fields)
        self.feed(b"".join(bytes(p) for p in pieces))

    def receive(self) -> list[Received]:
        raw = bytearray()
        for item in self.conn.take_output():
            if isinstance(item, FileRange):
                import os
                raw += os.pread(item.fd, item.length, item.offset)
            else:
                raw += bytes(item)
        out = []
        pos = 0
        while pos < len(raw):
            bhs = bytes(raw[pos:pos + 48])
            opcode, header = P.decode_header(bhs)
            digests = opcode != Opcode.LOGIN_RESPONSE
            hd = self.header_digest and digests
            dd = self.data_digest and digests
            ahs, dsl = P.bhs_lengths(bhs)
            start = pos + 48 + ahs + (4 if hd else 0)
            if hd:
                assert raw[start - 4:start] == P.digest_bytes(bhs)
            data = bytes(raw[start:start + dsl])
            if dd and dsl:
                end = start + P.pad4(dsl)
                assert raw[end:end + 4] == P.digest_bytes(raw[start:end])
            out.append(Received(opcode, header, data))
            pos += P.frame_length(bhs, hd, dd)
        return out

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def login(self, keys: list[tuple[str, str]], *, csg: int = 1, nsg: int = 3, transit: bool = True,
              tsih: int | None = None, cid: int = 0) -> Received:
        self.send(Opcode.LOGIN_REQUEST, encode_text(keys), immediate=True, transit=transit, csg=csg, nsg=nsg,
                  isid=self.isid, tsih=self.tsih if tsih is None else tsih, itt=self.next_itt(), cid=cid,
                  cmdsn=self.cmdsn, expstatsn=0, digests=False)
        [reply] = self.receive()
        assert reply.opcode == Opcode.LOGIN_RESPONSE
        return reply

    def login_normal(self, extra: list[tuple[str, str]] = (), clear_unit_attention: bool = True) -> Received:
        keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C,None" if self.header_digest else "None"),
                ("DataDigest", "CRC32C,None" if self.data_digest else "None"),
                ("ImmediateData", "Yes"), ("InitialR2T", "No"), ("MaxRecvDataSegmentLength", "262144"),
                ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144")]
        replaced = dict(extra)  # ``extra`` keys replace these (a key is offered once, §6.2)
        keys = [(key, replaced.pop(key, value)) for key, value in keys] + list(replaced.items())
        reply = self.login(keys)
        assert (reply.header.status_class, reply.header.status_detail) == (0, 0), reply
        self.tsih = reply.header.tsih
        if clear_unit_attention:
            # A new I_T nexus has a POWER ON/RESET unit attention (SPC-4 §5.14): take it.
            self.command(bytes(6))
            self.receive()
        return reply

    def command(self, cdb: bytes, *, read: int = 0, write: bytes = b"", immediate_bytes: int | None = None,
                lun: int = 0, cmdsn: int | None = None, unsolicited_follows: bool = False) -> int:
        itt = self.next_itt()
        immediate = write if immediate_bytes is None else write[:immediate_bytes]
        self.send(Opcode.SCSI_COMMAND, immediate, final=not unsolicited_follows,
                  read=bool(read), write=bool(write), attr=1, lun=bytes([0, lun]) + bytes(6), itt=itt,
                  expected_data_transfer_length=read or len(write), cmdsn=self.cmdsn if cmdsn is None else cmdsn,
                  expstatsn=0, cdb=cdb.ljust(16, b"\0"))
        if cmdsn is None:
            self.cmdsn += 1
        return itt


def chap_response(identifier: int, secret: str, challenge_hex: str) -> str:
    """RFC 1994: MD5(identifier || secret || challenge)."""
    challenge = bytes.fromhex(challenge_hex[2:])
    return "0x" + hashlib.md5(bytes([identifier]) + secret.encode() + challenge).hexdigest()


def keys_of(reply: Received) -> dict[str, str]:
    return dict(parse_text(reply.data))


def make_registry(*, chap=None, mutual=None, allow=None, settings=None) -> TargetRegistry:
    store = MemoryBackingStore(BLOCKS * 512)
    lu = LogicalUnit(store, LunIdentity(volume_id="vol-core"), target_name=TARGET)
    node = TargetNode(TARGET, LunMap({0: lu}), chap=chap and Credentials(*chap),
                      mutual_chap=mutual and Credentials(*mutual), allowed_initiators=allow)
    return TargetRegistry([node])


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_initiator(clock):
    def make(registry=None, settings=None, **kwargs) -> Initiator:
        registry = registry or make_registry()
        conn = TargetConnection(registry, settings or TargetSettings(), local_address=("127.0.0.1", 3260),
                                peer="test", config=ConnectionSettings(), clock=clock)
        return Initiator(conn, **kwargs)
    return make
