"""The initiator core against the target core, wired back to back in memory (no sockets).

Bytes travel in chunks of 1 to 10 bytes both ways, so every framing path of
both cores is exercised. Real-network tests of the initiator are in
tests/peer/test_initiator.py.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.keys import InitiatorSettings, TargetSettings
from node_agent.iscsi.pdu import Opcode
from tests.protocol.conftest import INITIATOR, TARGET, make_registry


class Wire:
    """Moves bytes between the two cores in small random chunks."""

    def __init__(self, target, initiator, seed=3):
        self.target, self.initiator = target, initiator
        self.rng = random.Random(seed)
        self.events = []

    def pump(self) -> list:
        for _ in range(1000):
            moved = False
            for source, sink in ((self.initiator, self.target), (self.target, self.initiator)):
                data = b"".join(bytes(p) if not isinstance(p, tuple) else self._file(p)
                                for p in source.take_output())
                pos = 0
                while pos < len(data):
                    step = self.rng.randint(1, 10)
                    sink.receive(data[pos:pos + step])
                    pos += step
                moved |= bool(data)
            self.events += self.initiator.take_events()
            if not moved:
                break
        events, self.events = self.events, []
        return events

    @staticmethod
    def _file(piece) -> bytes:
        return os.pread(piece.fd, piece.length, piece.offset)


def pair(make_initiator, *, chap=None, mutual=None, digests=False, hook=None, registry=None):
    target = make_initiator(registry or make_registry(chap=chap, mutual=mutual)).conn
    offer = ("CRC32C",) if digests else ("None",)
    settings = InitiatorSettings(INITIATOR, TARGET, header_digest=offer, data_digest=offer)
    initiator = C.InitiatorConnection(settings, isid=C.random_isid(), chap=chap, mutual_chap=mutual, pdu_hook=hook)
    wire = Wire(target, initiator)
    initiator.start_login()
    events = wire.pump()
    return wire, initiator, events


def rw16(opcode, lba, blocks):
    return struct.pack(">BBQIBB", opcode, 0, lba, blocks, 0, 0)


def run(wire, initiator, cdb, **kw):
    itt = initiator.submit(cdb, **kw)
    events = [e for e in wire.pump() if getattr(e, "itt", None) == itt]
    assert len(events) == 1, events
    return events[0]


@pytest.mark.parametrize("chap, mutual", [(None, None), (("alice", "initiator-secret"), None),
                                          (("alice", "initiator-secret"), ("target", "target-secret"))])
def test_login_then_io(make_initiator, chap, mutual):
    wire, initiator, events = pair(make_initiator, chap=chap, mutual=mutual)
    assert isinstance(events[0], C.LoggedIn) and events[0].tsih
    run(wire, initiator, bytes(6))  # takes the power-on unit attention
    payload = os.urandom(600 * 1024)  # immediate, unsolicited and solicited data
    done = run(wire, initiator, rw16(0x8A, 16, len(payload) // 512), data_out=payload)
    assert done.status == 0
    done = run(wire, initiator, rw16(0x88, 16, len(payload) // 512), read_length=len(payload))
    assert done.status == 0 and bytes(done.data) == payload


def test_wrong_secret_is_a_login_error(make_initiator):
    target = make_initiator(make_registry(chap=("alice", "initiator-secret"))).conn
    initiator = C.InitiatorConnection(InitiatorSettings(INITIATOR, TARGET), isid=1,
                                      chap=("alice", "not-the-secret!"))
    initiator.start_login()
    with pytest.raises(C.LoginError) as exc:
        Wire(target, initiator).pump()
    assert (exc.value.status_class, exc.value.status_detail) == (2, 1)


def test_digests_both_ways(make_initiator):
    wire, initiator, events = pair(make_initiator, digests=True)
    assert events[0].params.header_digest and events[0].params.data_digest
    run(wire, initiator, bytes(6))
    payload = os.urandom(64 * 1024)
    assert run(wire, initiator, rw16(0x8A, 0, 128), data_out=payload).status == 0
    assert bytes(run(wire, initiator, rw16(0x88, 0, 128), read_length=len(payload)).data) == payload
    # Data segments that need padding: the data digest covers data and pad (RFC 7143 §11.2.3).
    itt = initiator.nop_out(b"hello")
    assert wire.pump() == [C.NopReply(itt, b"hello")]
    initiator.text([("SendTargets", "")])
    [text] = wire.pump()
    assert ("TargetName", TARGET) in text.pairs
    assert not wire.target.closing


def test_insisting_on_digests_fails_the_login_where_the_target_refuses(make_initiator):
    """Offering only CRC32C (``shoal iscsi --header-digest CRC32C``) to a target that allows only None:
    the target answers Reject, and the initiator ends the login instead of going on without digests."""
    def refusing(registry):
        return make_initiator(registry, settings=TargetSettings(header_digest=("None",), data_digest=("None",)))
    with pytest.raises(C.InitiatorError, match="HeaderDigest"):
        pair(refusing, digests=True)


def test_residuals_and_check_condition(make_initiator):
    wire, initiator, _ = pair(make_initiator)
    run(wire, initiator, bytes(6))
    done = run(wire, initiator, bytes([0x12, 0, 0, 0, 255, 0]), read_length=255)  # INQUIRY: short data
    assert done.status == 0 and done.underflow and len(done.data) == 255 - done.residual
    done = run(wire, initiator, rw16(0x88, 1 << 40, 1), read_length=512)  # past the end
    assert done.status == 2 and done.sense[2] & 0x0F == 0x05 and done.sense[12] == 0x21


def test_target_ping_is_answered(make_initiator, clock):
    wire, initiator, _ = pair(make_initiator)
    clock.now += 11
    wire.target.tick()
    wire.pump()
    assert wire.target._ping is None  # answered
    clock.now += 31
    wire.target.tick()
    assert not wire.target.closing


def test_nop_text_tmf_logout(make_initiator):
    wire, initiator, _ = pair(make_initiator)
    itt = initiator.nop_out(b"hello")
    [reply] = wire.pump()
    assert reply == C.NopReply(itt, b"hello")
    itt = initiator.text([("SendTargets", "")])
    [text] = wire.pump()
    assert ("TargetName", TARGET) in text.pairs
    itt = initiator.task_management(5, 0)
    [tmf] = wire.pump()
    assert tmf == C.TmfDone(itt, 0)
    itt = initiator.logout()
    [out] = wire.pump()
    assert out == C.LoggedOut(itt, 0) and wire.target.closing


def test_pdu_hook_rewrites_outgoing_pdus(make_initiator):
    """The negative-test hook: a corrupted DataSN makes our target reject the Data-Out (§11.7) as an invalid
    field describing a data transfer (§11.17.1: Invalid PDU Field, not Protocol Error)."""
    def hook(opcode, header, data):
        if opcode == Opcode.DATA_OUT:
            header[36:40] = (27).to_bytes(4, "big")
        return header, data

    wire, initiator, _ = pair(make_initiator, hook=hook)
    run(wire, initiator, bytes(6))
    itt = initiator.submit(rw16(0x8A, 0, 1024), data_out=os.urandom(512 * 1024))
    events = wire.pump()
    assert any(isinstance(e, C.TaskRejected) and e.reason == P.RejectReason.INVALID_PDU_FIELD for e in events)
    assert itt not in [e.itt for e in events if isinstance(e, C.TaskDone)]


def test_commands_wait_for_the_cmdsn_window(make_initiator):
    registry = make_registry()
    registry.command_window = 4
    wire, initiator, _ = pair(make_initiator, registry=registry)
    run(wire, initiator, bytes(6))
    itts = [initiator.submit(bytes(6)) for _ in range(20)]
    assert len(initiator._waiting) > 0  # more than the window allows are held back
    done = [e for e in wire.pump() if isinstance(e, C.TaskDone)]
    assert sorted(e.itt for e in done) == sorted(itts)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_wrong_digest_from_the_target_ends_the_connection(make_initiator, where):
    """RFC 7143 §7.8: a Data-In whose header or data digest does not match is an error the initiator reports
    (at ErrorRecoveryLevel 0 the connection is dropped), never data handed to the caller."""
    wire, initiator, _ = pair(make_initiator, digests=True)
    run(wire, initiator, bytes(6))
    initiator.submit(rw16(0x88, 0, 8), read_length=4096)  # one Data-In of 4 KiB with status
    wire.target.receive(b"".join(bytes(p) for p in initiator.take_output()))
    reply = bytearray(b"".join(bytes(p) for p in wire.target.take_output()))
    assert len(reply) == 48 + 4 + 4096 + 4
    reply[48 if where == "header" else 48 + 4 + 4096] ^= 0x01  # one bit of the digest
    with pytest.raises(C.InitiatorError, match=f"{where} digest error"):
        initiator.receive(bytes(reply))
    assert not [e for e in initiator.take_events() if getattr(e, "status", None) == 0]
