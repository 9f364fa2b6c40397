"""The initiator core's per-I/O path against the target core, in memory: where Data-In lands.

Bytes move the way a socket delivers them (up to 64 KiB per receive, through
``get_buffer``/``buffer_updated``, as ``asyncio.BufferedProtocol`` does), so
the direct placement of large Data-In payloads into the command's buffer is
exercised as in production: RFC 7143 §11.7 (Data-In: DataSN, Buffer Offset,
residuals), §11.2.3 (padding and digests).  The byte-by-byte conversations are
in test_initiator_core.py.
"""

from __future__ import annotations

import os
import struct

import pytest

from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.keys import InitiatorSettings
from tests.protocol.conftest import BLOCKS, INITIATOR, TARGET

RECEIVE = 64 * 1024  # bytes one socket receive may return


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


class SocketWire:
    """Moves bytes both ways in socket-sized receives; counts the bytes received into ``watched``."""

    def __init__(self, target, initiator):
        self.target, self.initiator = target, initiator
        self.watched: bytearray | None = None
        self.into_watched = 0

    def _to_initiator(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.initiator.closed:
            space = self.initiator.get_buffer()
            count = min(len(space), len(view), RECEIVE)
            space[:count] = view[:count]
            if self.watched is not None and space.obj is self.watched:
                self.into_watched += count
            view = view[count:]
            self.initiator.buffer_updated(count)

    def pump(self) -> list:
        events = []
        for _ in range(1000):
            out = b"".join(bytes(p) for p in self.initiator.take_output())
            if out:
                self.target.receive(out)
            back = b"".join(os.pread(p.fd, p.length, p.offset) if isinstance(p, tuple) else bytes(p)
                            for p in self.target.take_output())
            if back:
                self._to_initiator(back)
            events += self.initiator.take_events()
            if not out and not back:
                return events
        raise AssertionError("the conversation did not settle")


def connect(make_initiator, *, digests: bool = False):
    target = make_initiator().conn
    offer = ("CRC32C",) if digests else ("None",)
    initiator = C.InitiatorConnection(InitiatorSettings(INITIATOR, TARGET, header_digest=offer, data_digest=offer),
                                      isid=C.random_isid())
    wire = SocketWire(target, initiator)
    initiator.start_login()
    assert isinstance(wire.pump()[0], C.LoggedIn)
    run(wire, initiator, bytes(6))  # TEST UNIT READY takes the power-on unit attention
    return wire, initiator


def run(wire, initiator, cdb, **kw) -> C.TaskDone:
    itt = initiator.submit(cdb, **kw)
    done = [e for e in wire.pump() if getattr(e, "itt", None) == itt]
    assert len(done) == 1, done
    return done[0]


@pytest.mark.parametrize("digests", [False, True])
def test_large_reads_land_in_the_callers_buffer(make_initiator, digests):
    """1 MiB = four 256 KiB Data-In PDUs (DataSN 0-3, offsets 0-768 KiB), each placed in the caller's buffer."""
    wire, initiator = connect(make_initiator, digests=digests)
    payload = os.urandom(BLOCKS * 512)
    assert run(wire, initiator, write16(0, BLOCKS), data_out=payload).status == 0
    buffer = bytearray(len(payload))
    wire.watched = buffer
    done = run(wire, initiator, read16(0, BLOCKS), buffer=buffer)
    assert done.status == 0 and not done.underflow
    assert done.data is buffer and bytes(buffer) == payload  # the caller's buffer itself, no copy
    # All but the head of the first receive goes straight in; without direct placement of every
    # PDU (e.g. a wrong DataSN or offset field) three quarters would be copied via the receive buffer.
    assert wire.into_watched >= len(payload) - RECEIVE


def test_underflow_places_each_pdu_at_its_buffer_offset(make_initiator):
    """Asked for more than the target sends: U bit and residual (§11.7.5), data at the right offsets."""
    wire, initiator = connect(make_initiator)
    payload = os.urandom(1536 * 512)
    assert run(wire, initiator, write16(0, 1536), data_out=payload).status == 0
    buffer = bytearray(b"\xee" * (1 << 20))
    done = run(wire, initiator, read16(0, 1536), buffer=buffer)  # EDTL 1 MiB, 768 KiB transferred
    assert done.status == 0 and done.underflow and done.residual == (1 << 20) - len(payload)
    assert bytes(done.data) == payload and buffer[len(payload):] == b"\xee" * done.residual


def test_small_and_large_commands_interleave(make_initiator):
    """4 KiB reads (copied from the receive buffer) and 1 MiB reads (placed) in one batch."""
    wire, initiator = connect(make_initiator)
    payload = os.urandom(BLOCKS * 512)
    assert run(wire, initiator, write16(0, BLOCKS), data_out=payload).status == 0
    buffers = {}
    for lba, blocks in ((0, 8), (0, BLOCKS), (8, 8), (1024, 1024), (2040, 8)):
        buffers[initiator.submit(read16(lba, blocks), buffer=bytearray(blocks * 512))] = (lba, blocks)
    done = {e.itt: e for e in wire.pump() if isinstance(e, C.TaskDone)}
    assert set(done) == set(buffers)
    for itt, (lba, blocks) in buffers.items():
        assert done[itt].status == 0 and bytes(done[itt].data) == payload[lba * 512:(lba + blocks) * 512]


def test_read_length_shorter_than_the_buffer(make_initiator):
    wire, initiator = connect(make_initiator)
    buffer = bytearray(8192)
    done = run(wire, initiator, read16(0, 8), buffer=buffer, read_length=4096)
    assert done.status == 0 and len(done.data) == 4096


def test_bad_read_buffers_are_refused(make_initiator):
    _, initiator = connect(make_initiator)
    with pytest.raises(ValueError, match="writable"):
        initiator.submit(read16(0, 8), buffer=bytes(4096))
    with pytest.raises(ValueError, match="exceeds"):
        initiator.submit(read16(0, 8), buffer=bytearray(4096), read_length=8192)
    assert initiator.outstanding() == []


def test_a_batch_of_commands_is_one_send_buffer(make_initiator):
    """Commands submitted together come out as one buffer (one send); a large payload stays separate."""
    wire, initiator = connect(make_initiator)
    for lba in range(32):
        initiator.submit(read16(lba * 8, 8), read_length=4096)
    out = initiator.take_output()
    assert len(out) == 1 and len(out[0]) == 32 * 48
    payload = memoryview(os.urandom(256 * 1024))
    initiator.submit(write16(0, 512), data_out=payload)
    out = initiator.take_output()
    assert [len(p) for p in out] == [48, len(payload)] and out[1].obj is payload.obj  # not copied
