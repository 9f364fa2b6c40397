"""The initiator keeps to the target's CmdSN window (RFC 7143 §4.2.2.1) through every way it moves.

The window of non-immediate commands is ExpCmdSN..MaxCmdSN, compared in serial arithmetic (RFC 1982): it
shrinks as ExpCmdSN advances past a MaxCmdSN that stays, down to none at all (MaxCmdSN = ExpCmdSN - 1), and
wraps through 0.  The initiator takes MaxCmdSN from a PDU only when the PDU's own pair is valid (MaxCmdSN >=
ExpCmdSN - 1) and it is newer (serial-greater) than the one it has: an older value is ignored, as Linux's
``__iscsi_update_cmdsn`` and libiscsi do.  The core is fed hand-built PDUs (each fast path: SCSI Response,
Data-In; and the generic one: NOP-In); what goes out is read back from its output.  The closed window through
a client: the commands wait, the idle-connection NOP-Out asks for the window again, and they go.
"""

from __future__ import annotations

import asyncio

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.pdu import Opcode
from tests.protocol.test_initiator_hostile_target import RESERVED, TEST_UNIT_READY, Target, run, until
from tests.protocol.test_initiator_review_fixes import logged_in_core, pdu

MASK = 0xFFFFFFFF


def sent_cmdsns(conn: C.InitiatorConnection) -> list[int]:
    """CmdSNs of the SCSI Commands in the core's output (commands without data: one BHS each)."""
    wire = b"".join(bytes(piece) for piece in conn.take_output())
    cmdsns = []
    for pos in range(0, len(wire), P.BHS_LENGTH):
        opcode, header = P.decode_header(wire[pos:pos + P.BHS_LENGTH])
        if opcode == Opcode.SCSI_COMMAND:
            assert not header.immediate
            cmdsns.append(header.cmdsn)
    return cmdsns


def core_at(cmdsn: int, maxcmdsn: int) -> C.InitiatorConnection:
    """A logged-in core (as ``logged_in_core``) whose next CmdSN is ``cmdsn``, the window open to ``maxcmdsn``."""
    model = logged_in_core()
    conn = C.InitiatorConnection(model.settings, isid=model.isid, initial_cmdsn=cmdsn)
    conn.params, conn.logged_in, conn.stage, conn.maxcmdsn = model.params, True, C.FULL_FEATURE, maxcmdsn
    return conn


def nop_in(expcmdsn: int, maxcmdsn: int) -> bytes:
    """An unsolicited NOP-In that carries only the window (§11.19: ITT and TTT reserved)."""
    return pdu(Opcode.NOP_IN, final=True, lun=bytes(8), itt=RESERVED, ttt=RESERVED, statsn=5,
               expcmdsn=expcmdsn & MASK, maxcmdsn=maxcmdsn & MASK)


def scsi_response(itt: int, expcmdsn: int, maxcmdsn: int) -> bytes:
    return pdu(Opcode.SCSI_RESPONSE, final=True, status=0, itt=itt, statsn=5, expcmdsn=expcmdsn & MASK,
               maxcmdsn=maxcmdsn & MASK)


def data_in(itt: int, expcmdsn: int, maxcmdsn: int) -> bytes:
    return pdu(Opcode.DATA_IN, bytes(512), final=True, status_present=True, status=0, itt=itt, ttt=RESERVED,
               datasn=0, buffer_offset=0, statsn=5, expcmdsn=expcmdsn & MASK, maxcmdsn=maxcmdsn & MASK)


@pytest.mark.parametrize("start", [1, 0xFFFFFFFE, 0x7FFFFFFE], ids=["low", "across-0", "across-half"])
def test_never_more_commands_than_the_window_and_in_serial_order(start):
    """A window of 4 from ``start``: exactly 4 commands go out, with consecutive CmdSNs (through 0 when it
    wraps); each SCSI Response that moves the window on lets exactly that many more out."""
    conn = core_at(start, start + 3)
    itts = [conn.submit(TEST_UNIT_READY) for _ in range(10)]
    assert sent_cmdsns(conn) == [(start + n) & MASK for n in range(4)]
    conn.receive(scsi_response(itts[0], start + 1, start + 4))  # one ended: one more slot
    assert sent_cmdsns(conn) == [(start + 4) & MASK]
    conn.receive(scsi_response(itts[1], start + 2, start + 7))  # the window grows by three
    assert sent_cmdsns(conn) == [(start + n) & MASK for n in range(5, 8)]
    assert len(conn._waiting) == 2


@pytest.mark.parametrize("carrier", ["scsi-response", "data-in", "nop-in"])
def test_an_older_max_cmdsn_is_ignored(carrier):
    """§4.2.2.1: a PDU MaxCmdSN not greater than the local one is ignored, even when the PDU's own pair is
    valid.  The window was opened to 40; a later PDU saying 3 (an out-of-date value) must not shut 37 commands
    out of a window the target already granted (they would wait for a NOP-Out to ask it again)."""
    conn = core_at(1, 40)
    reader = conn.submit(bytes([0x08, 0, 0, 0, 1, 0]), read_length=512)  # READ(6): its Data-In may carry it
    waiter = conn.submit(TEST_UNIT_READY)
    assert sent_cmdsns(conn) == [1, 2]
    stale = {"scsi-response": scsi_response(reader, 2, 3), "data-in": data_in(reader, 2, 3),
             "nop-in": nop_in(2, 3)}[carrier]
    conn.receive(stale)
    assert conn.maxcmdsn == 40
    for _ in range(38):
        conn.submit(TEST_UNIT_READY)
    assert sent_cmdsns(conn) == list(range(3, 41))
    assert waiter in conn.outstanding()


@pytest.mark.parametrize("carrier", ["scsi-response", "data-in", "nop-in"])
def test_an_older_max_cmdsn_across_the_wrap_is_ignored(carrier):
    """Serial arithmetic: 0x00000002 is newer than 0xFFFFFFF0, and 0xFFFFFFF8 older than 0x00000002."""
    conn = core_at(0xFFFFFFF0, 2)
    reader = conn.submit(bytes([0x08, 0, 0, 0, 1, 0]), read_length=512)
    assert sent_cmdsns(conn) == [0xFFFFFFF0]
    stale = {"scsi-response": scsi_response(reader, 0xFFFFFFF1, 0xFFFFFFF8),
             "data-in": data_in(reader, 0xFFFFFFF1, 0xFFFFFFF8), "nop-in": nop_in(0xFFFFFFF1, 0xFFFFFFF8)}[carrier]
    conn.receive(stale)
    assert conn.maxcmdsn == 2
    for _ in range(20):
        conn.submit(TEST_UNIT_READY)
    assert sent_cmdsns(conn) == [(0xFFFFFFF1 + n) & MASK for n in range(18)]  # 0xFFFFFFF1 .. 2


@pytest.mark.parametrize("carrier", ["scsi-response", "nop-in"])
def test_an_invalid_window_is_ignored(carrier):
    """MaxCmdSN < ExpCmdSN - 1: both are ignored (§4.2.2.1), even when that MaxCmdSN is the newer one."""
    conn = core_at(1, 1)
    first = conn.submit(TEST_UNIT_READY)
    conn.submit(TEST_UNIT_READY)
    assert sent_cmdsns(conn) == [1]
    conn.receive(scsi_response(first, 10, 8) if carrier == "scsi-response" else nop_in(10, 8))
    assert conn.maxcmdsn == 1 and sent_cmdsns(conn) == []


def test_a_closed_window_holds_every_command_until_it_opens():
    """MaxCmdSN = ExpCmdSN - 1: no room at all (a window of zero).  Nothing goes out, however many are
    submitted; an immediate NOP-Out still does (immediate PDUs are outside the window); the NOP-In that
    answers it with a newer MaxCmdSN lets exactly that many commands out, in order."""
    conn = core_at(5, 7)
    first = [conn.submit(TEST_UNIT_READY) for _ in range(3)]
    assert sent_cmdsns(conn) == [5, 6, 7]
    conn.receive(scsi_response(first[0], 8, 7))  # three received, one ended, the window closed
    assert conn.maxcmdsn == 7
    for _ in range(4):
        conn.submit(TEST_UNIT_READY)
    assert sent_cmdsns(conn) == []
    ping = conn.nop_out()
    wire = b"".join(bytes(piece) for piece in conn.take_output())
    opcode, header = P.decode_header(wire[:P.BHS_LENGTH])
    assert opcode == Opcode.NOP_OUT and header.immediate and header.cmdsn == 8 and len(wire) == P.BHS_LENGTH
    conn.receive(pdu(Opcode.NOP_IN, final=True, lun=bytes(8), itt=ping, ttt=RESERVED, statsn=5, expcmdsn=8,
                     maxcmdsn=9))
    assert sent_cmdsns(conn) == [8, 9]
    assert len(conn._waiting) == 2


def test_a_closed_window_is_asked_for_again_by_the_idle_ping():
    """Through a client: the target grants a window of one command at login and keeps MaxCmdSN there, so its
    answer to that command closes the window (ExpCmdSN moves on past it); it says nothing more until asked.
    The second command waits, instead of going out beyond MaxCmdSN (a target drops such a command silently)
    or waiting for ever: the idle-connection NOP-Out's answer opens the window again."""
    order: list[str] = []

    class ClosingTarget(Target):
        def sn(self, advance: bool = True) -> dict:
            values = super().sn(advance)
            if not self.reopened:
                values["maxcmdsn"] = 1
            return values

    async def answer(target, connection, header, data, reader, writer):
        order.append("command")
        return False

    target = ClosingTarget(answer)
    target.reopened = False
    original_read = target.read_pdu

    async def read_pdu(reader):
        opcode, header, data = await original_read(reader)
        if opcode == Opcode.NOP_OUT and header.itt != RESERVED:
            order.append("nop-out")
            target.reopened = True  # its answer carries an open window
        return opcode, header, data
    target.read_pdu = read_pdu

    async def scenario(client):
        await client.execute(TEST_UNIT_READY)
        assert client.conn.maxcmdsn == (client.conn.cmdsn - 1) & MASK  # closed
        second = asyncio.ensure_future(client.execute(TEST_UNIT_READY))
        await asyncio.sleep(0.05)
        assert not second.done() and len(client.conn._waiting) == 1 and order == ["command"]
        await asyncio.wait_for(second, 3)
        await until(lambda: len(order) == 3)

    run(target, scenario, nop_interval=0.2, nop_timeout=2)
    assert order == ["command", "nop-out", "command"] and target.connections == 1
