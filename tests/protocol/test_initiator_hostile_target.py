"""Initiator against a target that breaks its promises: a write it did not take in full, answers a command
cannot use, a command it never answers, asynchronous messages, and callers that give up.

Each case ended badly before (a review's findings): a WRITE reported done with half its data on the disk; a
cancelled command issued again after a reconnect, or its Data-In still written into the caller's buffer; a
per-command protocol error turned into an endless loop of reconnects; a command never answered waited
forever; a target's request to log out went unheard.  Shoal's own target does none of this, so ``Target``
scripts the target's side: a small TCP peer on 127.0.0.1 that logs the initiator in (no CHAP), keeps a RAM
disk, records every PDU it receives, and hands each SCSI Command to the test's ``answer`` coroutine (None:
served correctly).  What is checked is the initiator's side of the exchange.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.initiator.blockdev import Capacity, LunDevice
from node_agent.iscsi.initiator.client import CommandTimedOut, IscsiClient
from node_agent.iscsi.pdu import Opcode
from tests.protocol.test_initiator_review_fixes import answer_login, logged_in_core, pdu
from tests.protocol.test_initiator_review_fixes import run as run_scripted

BS = 512
RESERVED = 0xFFFFFFFF
TEST_UNIT_READY = bytes(6)


def rw16(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", opcode, 0, lba, blocks, 0, 0)


Answer = Callable[["Target", int, object, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Target:
    """A scripted target; see the module docstring.  ``answer(target, connection, header, data, reader,
    writer)`` may write anything and returns True when it handled the command (False: served correctly).
    TMF Requests are noted and answered with ``tmf_response``: a response code, or ``tmf_response(target,
    header)`` giving the bytes to send (None: never answered)."""

    def __init__(self, answer: Answer | None = None, *, keys: dict[str, str] | None = None, blocks: int = 64,
                 tmf_response: int | Callable[["Target", object], bytes] | None = None):
        self.answer = answer
        self.tmf_response = tmf_response
        self.keys = keys or {}
        self.disk = bytearray(blocks * BS)
        self.blocks = blocks
        self.connections = 0
        self.received: list[tuple[int, str, int]] = []  # (connection, opcode name, ITT) of every PDU after login
        self.tmfs: list[tuple[int, int]] = []  # (function, referenced ITT) of every TMF Request
        self.statsn = 100
        self.expcmdsn = 1
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Target":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    def commands(self, connection: int | None = None) -> list[int]:
        """ITTs of the SCSI Commands received (on ``connection``)."""
        return [itt for number, name, itt in self.received
                if name == "SCSI_COMMAND" and connection in (None, number)]

    def sn(self, advance: bool = True) -> dict:
        statsn = self.statsn
        self.statsn = (statsn + advance) & 0xFFFFFFFF
        return dict(statsn=statsn, expcmdsn=self.expcmdsn, maxcmdsn=self.expcmdsn + 31)

    def response(self, itt: int, status: int = 0, *, flags: int = 0, residual: int = 0, data: bytes = b"") -> bytes:
        return pdu(Opcode.SCSI_RESPONSE, data, final=True, status=status, itt=itt, residual_count=residual,
                   flags=flags, **self.sn())

    def data_in(self, itt: int, data: bytes, *, datasn: int = 0, offset: int = 0, status: bool = True,
                flags: int = 0, residual: int = 0) -> bytes:
        return pdu(Opcode.DATA_IN, data, final=status, status_present=status, status=0, itt=itt, ttt=RESERVED,
                   datasn=datasn, buffer_offset=offset, residual_count=residual, flags=flags,
                   **self.sn(advance=status))

    def r2t(self, itt: int, offset: int, length: int, ttt: int = 0x100) -> bytes:
        return pdu(Opcode.R2T, final=True, itt=itt, ttt=ttt, r2tsn=0, buffer_offset=offset,
                   desired_data_transfer_length=length, lun=bytes(8), **self.sn(advance=False))

    def tmf_answer(self, itt: int, response: int) -> bytes:
        return pdu(Opcode.TASK_MGMT_RESPONSE, final=True, response=response, itt=itt, **self.sn())

    def async_message(self, event: int, parameter2: int = 0, parameter3: int = 0) -> bytes:
        return pdu(Opcode.ASYNC_MESSAGE, final=True, lun=bytes(8), itt=RESERVED, async_event=event,
                   parameter1=0, parameter2=parameter2, parameter3=parameter3, **self.sn())

    async def read_pdu(self, reader: asyncio.StreamReader) -> tuple[int, object, bytes]:
        bhs = await reader.readexactly(P.BHS_LENGTH)
        ahs, dsl = P.bhs_lengths(bhs)
        payload = await reader.readexactly(ahs + P.pad4(dsl)) if ahs or dsl else b""
        opcode, header = P.decode_header(bhs)
        return opcode, header, bytes(payload[ahs:ahs + dsl])

    async def _data_out(self, reader: asyncio.StreamReader, connection: int) -> tuple[object, bytes]:
        while True:
            opcode, header, data = await self.read_pdu(reader)
            self.received.append((connection, Opcode(opcode).name, header.itt))
            if opcode == Opcode.DATA_OUT:
                return header, data

    async def serve(self, connection: int, header, data: bytes, reader, writer) -> None:
        """Serve a command correctly: READ(16), WRITE(16) (taking unsolicited data, then asking for the rest
        with R2Ts), READ CAPACITY(16); GOOD for anything else."""
        cdb, itt = header.cdb, header.itt
        if cdb[0] == 0x9E:
            writer.write(self.data_in(itt, struct.pack(">QI", self.blocks - 1, BS) + bytes(20)))
        elif cdb[0] == 0x88:
            lba, count = struct.unpack_from(">QI", cdb, 2)
            writer.write(self.data_in(itt, bytes(self.disk[lba * BS:(lba + count) * BS])))
        elif cdb[0] == 0x8A:
            lba = struct.unpack_from(">Q", cdb, 2)[0]
            edtl = header.expected_data_transfer_length
            buf = bytearray(edtl)
            buf[:len(data)] = data
            got, final = len(data), header.final
            while not final:  # unsolicited Data-Out
                out, piece = await self._data_out(reader, connection)
                buf[out.buffer_offset:out.buffer_offset + len(piece)] = piece
                got, final = got + len(piece), out.final
            while got < edtl:
                writer.write(self.r2t(itt, got, edtl - got))
                await writer.drain()
                while True:
                    out, piece = await self._data_out(reader, connection)
                    buf[out.buffer_offset:out.buffer_offset + len(piece)] = piece
                    if out.final:
                        break
                got = edtl
            self.disk[lba * BS:lba * BS + edtl] = buf
            writer.write(self.response(itt))
        else:
            writer.write(self.response(itt))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            await answer_login(self, lambda: self.read_pdu(reader), writer, self.keys)
            while True:
                opcode, header, data = await self.read_pdu(reader)
                self.received.append((number, Opcode(opcode).name, header.itt))
                if opcode == Opcode.LOGOUT_REQUEST:
                    writer.write(pdu(Opcode.LOGOUT_RESPONSE, final=True, response=0, itt=header.itt, **self.sn()))
                    await writer.drain()
                    break
                if opcode == Opcode.NOP_OUT and header.itt != RESERVED:
                    writer.write(pdu(Opcode.NOP_IN, data, final=True, lun=bytes(8), itt=header.itt, ttt=RESERVED,
                                     **self.sn()))
                elif opcode == Opcode.TASK_MGMT_REQUEST:  # noted; unanswered by default: the initiator must not wait
                    self.tmfs.append((header.function, header.referenced_task_tag))
                    if callable(self.tmf_response):
                        writer.write(self.tmf_response(self, header))
                    elif self.tmf_response is not None:
                        writer.write(self.tmf_answer(header.itt, self.tmf_response))
                elif opcode == Opcode.SCSI_COMMAND:
                    self.expcmdsn = header.cmdsn + 1
                    if self.answer is None or not await self.answer(self, number, header, data, reader, writer):
                        await self.serve(number, header, data, reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(target: Target, scenario: Callable[[IscsiClient], Awaitable], **settings) -> object:
    """Connect a client to ``target`` and run ``scenario`` with it (10 s at most: these cases used to hang)."""
    return run_scripted(target, scenario, **(dict(nop_interval=3600, login_timeout=2) | settings))


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def device(client: IscsiClient) -> LunDevice:
    lun = LunDevice(client)
    lun.capacity = Capacity(64, BS)
    return lun


# -- F1: a write the target did not take in full is not a success ----------------------------------------
def test_a_write_answered_good_with_an_underflow_residual_fails():
    """RFC 7143 §11.4.5.1: the residual counts bytes "not transferred".  GOOD with U and 4096 of 8192 bytes
    not taken means half the write is missing: ``write_blocks`` must raise, not return."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x8A:
            return False
        writer.write(target.response(header.itt, flags=0x02, residual=header.expected_data_transfer_length - 4096))
        return True

    async def scenario(client):
        with pytest.raises(C.InitiatorError, match="4096 of the 8192 bytes to write as not transferred"):
            await device(client).write_blocks(0, b"\x5a" * 8192)
        await client.execute(TEST_UNIT_READY)  # the session carries on

    run(Target(answer), scenario, first_burst_length=4096)


def test_a_write_answered_good_before_all_its_data_was_asked_for_fails():
    """InitialR2T=Yes and no immediate data: every byte must be asked for with an R2T (§11.8).  A target
    that asks for the first 4 KiB of 8 and answers GOOD did not take the rest."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x8A:
            return False
        writer.write(target.r2t(header.itt, 0, 4096))
        await writer.drain()
        while not (await target._data_out(reader, connection))[0].final:
            pass
        writer.write(target.response(header.itt))
        return True

    async def scenario(client):
        assert client.params.initial_r2t and not client.params.immediate_data
        with pytest.raises(C.InitiatorError, match="GOOD status after 4096 of the 8192 bytes to write were sent"):
            await device(client).write_blocks(0, b"\x5a" * 8192)

    run(Target(answer), scenario, initial_r2t=True, immediate_data=False)


@pytest.mark.parametrize("settings", [dict(), dict(initial_r2t=True, immediate_data=False),
                                      dict(first_burst_length=8192)],
                         ids=["immediate-unsolicited-solicited", "all-solicited", "immediate-then-solicited"])
def test_a_write_whose_every_byte_was_sent_succeeds(settings):
    """The count of bytes sent covers immediate data, unsolicited Data-Out and each R2T's Data-Out."""
    payload = bytes(range(256)) * 128  # 32 KiB: more than an 8 KiB first burst, several Data-Out PDUs

    async def scenario(client):
        await device(client).write_blocks(0, payload)
        return True

    target = Target(blocks=128)
    assert run(target, scenario, **settings)
    assert bytes(target.disk[:len(payload)]) == payload


# -- F2: a command whose caller gave up is forgotten --------------------------------------------------
def test_a_cancelled_write_is_aborted_and_not_issued_again_after_a_reconnect():
    """A WRITE the target leaves unanswered; its caller gives up (``wait_for``).  ABORT TASK goes out for it,
    and after the connection drops the reinstated session does not issue it again: it would otherwise land
    after a later write to the same blocks and undo it."""
    held: list[int] = []

    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] == 0x8A and not held:
            held.append(header.itt)
            return True  # received, never answered
        return False

    async def scenario(client):
        lun = device(client)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lun.write_blocks(0, b"A" * 4096), 0.2)
        await lun.write_blocks(0, b"B" * 4096)
        await until(lambda: target.tmfs)
        client._proto.transport.abort()
        await until(lambda: target.connections == 2 and client.state == "up")
        await client.execute(TEST_UNIT_READY)
        assert client.conn.outstanding() == []

    target = Target(answer)
    run(target, scenario)
    assert target.tmfs == [(C.TMF_ABORT_TASK, held[0])]
    assert held[0] not in target.commands(2)
    assert bytes(target.disk[:4096]) == b"B" * 4096


def test_a_cancelled_read_never_writes_into_the_callers_buffer():
    """The caller of ``read_into`` takes its buffer back when it stops waiting; Data-In arriving later for
    the read must not land there."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x88:
            return False

        async def later():
            await asyncio.sleep(0.2)
            writer.write(target.data_in(header.itt, b"X" * 4096))
        asyncio.ensure_future(later())
        return True

    async def scenario(client):
        buffer = bytearray(4096)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(device(client).read_into(0, buffer), 0.05)
        await asyncio.sleep(0.3)  # the late Data-In has come (and was ignored)
        await client.execute(TEST_UNIT_READY)
        return buffer

    assert run(Target(answer), scenario) == bytes(4096)


@pytest.mark.parametrize("digest", [False, True], ids=["no-digest", "data-digest"])
def test_a_read_cancelled_while_its_data_in_is_placed_in_the_buffer_stops_writing_there(digest):
    """A large Data-In payload is received straight into the caller's buffer, over several receives.  If
    its command is cancelled in between, the rest goes elsewhere, and the PDU still ends well (its data
    digest checked against what came, not against the buffer the caller now reuses)."""
    conn = logged_in_core()
    conn.data_digest = digest
    size = 128 * 1024
    buffer = bytearray(b"\xee" * size)
    itt = conn.submit(rw16(0x88, 0, size // BS), buffer=buffer)
    conn.take_output()
    payload = b"\xab" * size
    wire = pdu(Opcode.DATA_IN, payload, final=True, status_present=True, status=0, itt=itt, ttt=RESERVED,
               datasn=0, buffer_offset=0, statsn=1, expcmdsn=1, maxcmdsn=64)
    if digest:
        wire += P.digest(payload)
    wire += pdu(Opcode.NOP_IN, final=True, lun=bytes(8), itt=RESERVED, ttt=RESERVED, statsn=2, expcmdsn=1,
                maxcmdsn=64)
    conn.receive(wire[:1000])
    placed = 1000 - P.BHS_LENGTH
    assert buffer[:placed] == payload[:placed]  # received in place
    assert conn.cancel(itt) is not None  # ABORT TASK queued
    buffer[:] = b"\x00" * size  # the caller reuses its buffer
    for start in range(1000, len(wire), 1000):
        conn.receive(wire[start:start + 1000])
    assert buffer == bytes(size)
    assert conn.take_events() == [] and conn.outstanding() == [] and not conn.closed


# -- F4: a per-command protocol error fails that command, not the session -----------------------------
@pytest.mark.parametrize("cdb, kind, reply, error", [
    (rw16(0x88, 0, 8), "read", lambda t, h: t.data_in(h.itt, b"\xaa" * 8192), "beyond its expected transfer"),
    (rw16(0x88, 0, 8), "read", lambda t, h: t.data_in(h.itt, b"\xaa" * 4096, datasn=5), "DataSN 5, 0 expected"),
    (rw16(0x88, 0, 8), "read", lambda t, h: t.r2t(h.itt, 0, 4096), "no data to write"),
    (rw16(0x8A, 0, 8), "write", lambda t, h: t.r2t(h.itt, 4096, 4096), "bytes 4096-8192 of a 4096-byte write"),
    (rw16(0x8A, 0, 8), "write", lambda t, h: t.r2t(h.itt, 0, 0), "R2T for 0 bytes"),
], ids=["data-in-too-long", "wrong-datasn", "r2t-for-a-read", "r2t-beyond-the-write", "r2t-of-0-bytes"])
def test_a_protocol_error_in_one_commands_answer_fails_that_command(cdb, kind, reply, error):
    """Each answer is well framed but impossible for its command.  It used to drop the connection, and the
    reinstated session issued the command again, to get the same answer: thousands of reconnects a second,
    the caller waiting forever.  Now the command fails, once, and the session carries on."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != cdb[0]:
            return False
        writer.write(reply(target, header))
        return True

    async def scenario(client):
        kwargs = dict(read_length=4096) if kind == "read" else dict(data_out=bytes(4096))
        with pytest.raises(C.InitiatorError, match=error):
            await client.execute(cdb, **kwargs)
        await client.execute(TEST_UNIT_READY)
        return client.state

    settings = dict(initial_r2t=True, immediate_data=False) if kind == "write" else {}
    target = Target(answer)
    assert run(target, scenario, **settings) == "up"
    assert target.connections == 1 and len(target.commands()) == 2


def test_an_r2t_above_max_burst_length_fails_the_write():
    """§13.13: an R2T asks for at most MaxBurstLength bytes."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x8A:
            return False
        writer.write(target.r2t(header.itt, 0, header.expected_data_transfer_length))
        return True

    async def scenario(client):
        with pytest.raises(C.InitiatorError, match="more than the MaxBurstLength of 8192"):
            await device(client).write_blocks(0, bytes(16384))
        await until(lambda: target.tmfs)  # the target holds the write: ABORT TASK ends it there

    target = Target(answer)
    run(target, scenario, initial_r2t=True, immediate_data=False, max_burst_length=8192, first_burst_length=8192)
    assert [function for function, _ in target.tmfs] == [C.TMF_ABORT_TASK]


def test_a_command_outstanding_through_repeated_protocol_error_drops_fails(caplog):
    """An answer that breaks the framing (here an undecodable opcode) must drop the connection (ERL 0); if
    the command it answers gets it again each time it is issued, it fails after the third drop instead of
    looping; the protocol error is logged."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x88:
            return False
        writer.write(bytes([0x3E]) + bytes(47))  # a reserved target opcode
        return True

    async def scenario(client):
        with pytest.raises(C.InitiatorError, match="dropped 3 times for a protocol error"):
            await client.execute(rw16(0x88, 0, 8), read_length=4096)
        await client.execute(TEST_UNIT_READY)

    target = Target(answer)
    with caplog.at_level(logging.WARNING, logger="shoal.iscsi.initiator"):
        run(target, scenario)
    assert len([itt for itt in target.commands() if itt == target.commands()[0]]) == C.MAX_PROTOCOL_ERROR_DROPS
    assert "protocol error from 127.0.0.1" in caplog.text


# -- F5: a command the target never answers times out ----------------------------------------------------
def test_a_command_never_answered_fails_after_the_command_timeout():
    """The target answers pings but never one READ, nor the ABORT TASK sent for it: the pings cannot tell, the
    command timeout does.  Between one and 1.25 timeouts ABORT TASK goes out; unanswered for ``abort_timeout``,
    the connection is dropped so that the reinstatement ends the command on the target, and it fails with
    ``CommandTimedOut`` (an ``OSError``: EIO through FUSE), not issued again.  (An abort the target answers:
    tests/protocol/test_initiator_timeouts.py.)"""
    held: list[int] = []

    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] == 0x88 and not held:
            held.append(header.itt)
            return True
        return False

    async def scenario(client):
        start = time.monotonic()
        with pytest.raises(CommandTimedOut) as caught:
            await client.execute(rw16(0x88, 0, 8), read_length=4096)
        elapsed = time.monotonic() - start
        assert isinstance(caught.value, OSError)
        await client.execute(TEST_UNIT_READY)  # waits for the reinstated session
        return elapsed

    target = Target(answer)
    elapsed = run(target, scenario, command_timeout=0.4, abort_timeout=0.3, nop_interval=0.1, nop_timeout=1)
    assert 0.4 + 0.3 <= elapsed < 1.3
    assert target.tmfs == [(C.TMF_ABORT_TASK, held[0])]
    assert target.connections == 2 and held[0] not in target.commands(2)


@pytest.mark.parametrize("timeout", [0, None])
def test_no_command_timeout_when_disabled(timeout):
    async def scenario(client):
        return client._expirer

    assert run(Target(), scenario, command_timeout=timeout) is None


# -- F7: asynchronous messages ------------------------------------------------------------------------------
def test_a_logout_requested_by_the_target_is_sent_and_the_session_logs_in_again():
    """RFC 7143 §11.9.1, AsyncEvent 1: the initiator MUST send a Logout within Parameter3 seconds.  It does at
    once, then logs in again; a command issued meanwhile runs on the new connection."""
    async def answer(target, connection, header, data, reader, writer):
        if connection == 1 and header.cdb[0] == 0x00:
            writer.write(target.response(header.itt) + target.async_message(1, parameter3=1))
            return True
        return False

    async def scenario(client):
        await client.execute(TEST_UNIT_READY)
        await until(lambda: ("LOGOUT_REQUEST" in [name for _, name, _ in target.received]), 1.0)
        await until(lambda: target.connections == 2 and client.state == "up")
        await client.execute(TEST_UNIT_READY)

    target = Target(answer)
    run(target, scenario)
    assert target.commands(2)


def test_time2wait_of_a_connection_drop_announced_by_the_target_is_honoured():
    """AsyncEvent 2 (the target will drop the connection): Parameter2 is the Time2Wait before reconnecting."""
    dropped: list[float] = []
    logins: list[float] = []

    async def answer(target, connection, header, data, reader, writer):
        if connection == 1 and header.cdb[0] == 0x00:
            writer.write(target.response(header.itt) + target.async_message(2, parameter2=1))
            await writer.drain()
            dropped.append(time.monotonic())
            writer.close()
            return True
        logins.append(time.monotonic())
        return False

    async def scenario(client):
        await client.execute(TEST_UNIT_READY)
        await until(lambda: dropped)
        await client.execute(TEST_UNIT_READY)  # waits for the reconnect

    target = Target(answer)
    run(target, scenario)
    assert target.connections == 2 and logins[0] - dropped[0] >= 0.95


# -- F8: answers too short, or too long ------------------------------------------------------------------
@pytest.mark.parametrize("command, call, error", [
    (0x9E, lambda lun: lun.read_capacity(), "READ CAPACITY"),
    (0x5E, lambda lun: lun.read_keys(), "READ KEYS"),
    (0x5E, lambda lun: lun.read_reservation(), "READ RESERVATION"),
], ids=["read-capacity", "read-keys", "read-reservation"])
def test_short_parameter_data_is_an_io_error(command, call, error):
    """GOOD with an underflow residual and no data: an ``IOError`` naming the command (``SyncLun.open`` tries
    the next portal on one), not a ``struct.error``."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != command:
            return False
        writer.write(target.response(header.itt, flags=0x02, residual=header.expected_data_transfer_length))
        return True

    async def scenario(client):
        with pytest.raises(IOError, match=f"{error}.* returned 0 bytes"):
            await call(device(client))

    run(Target(answer), scenario)


def test_read_reservation_with_a_descriptor_cut_short_is_an_io_error():
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x5E:
            return False
        writer.write(target.data_in(header.itt, struct.pack(">II", 1, 16) + bytes(4), flags=0x02, residual=12))
        return True

    async def scenario(client):
        with pytest.raises(IOError, match="returned 12 bytes of parameter data, 24 needed"):
            await device(client).read_reservation()

    run(Target(answer), scenario)


def test_sense_data_longer_than_its_segment_fails_the_command():
    """§11.4.7: SenseLength, then that many bytes of sense data.  200 announced and 18 present: the sense
    data is cut, and the command fails instead of passing the cut sense on as the answer."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x00:
            return False
        sense = bytes([0x70, 0, 0x06]) + bytes(15)
        writer.write(target.response(header.itt, status=2, data=(200).to_bytes(2, "big") + sense))
        return True

    async def scenario(client):
        with pytest.raises(C.InitiatorError, match="SenseLength of 200 bytes in a data segment of 20"):
            await client.execute(TEST_UNIT_READY, check=False)

    run(Target(answer), scenario)


def test_a_pdu_larger_than_our_max_recv_data_segment_length_ends_the_connection():
    """§13.12: the target sends at most the MaxRecvDataSegmentLength we declared per PDU; a larger one is a
    protocol error (and would otherwise make the receive buffer grow to whatever the target says)."""
    conn = logged_in_core()
    header = P.encode_header(Opcode.NOP_IN, final=True, lun=bytes(8), itt=RESERVED, ttt=RESERVED, statsn=1,
                             expcmdsn=1, maxcmdsn=64, data_segment_length=262145)
    with pytest.raises(C.InitiatorError, match="262145-byte data segment, more than our MaxRecvDataSegmentLength"):
        conn.receive(bytes(header))
    assert conn.closed


# -- F3: a read-modify-write and a whole-block write to the same block -------------------------------------
def test_a_whole_block_write_waits_for_a_read_modify_write_of_its_block():
    """``LunDevice.write`` of a partial block reads the block, merges and writes it back.  A whole-block write
    landing between that READ and WRITE would be overwritten with the stale copy: it waits instead, so the
    block ends as one of the two orders gives (here the whole-block write last: all ``N``)."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x88:
            return False
        snapshot = bytes(target.disk[:BS])

        async def later():  # the RMW's READ is answered late, with the block as it was when it came in
            await asyncio.sleep(0.2)
            writer.write(target.data_in(header.itt, snapshot))
        asyncio.ensure_future(later())
        return True

    async def scenario(client):
        lun = device(client)
        rmw = asyncio.ensure_future(lun.write(100, b"x" * 10))
        await until(lambda: target.commands())
        await lun.write(0, b"N" * BS)
        await rmw

    target = Target(answer)
    run(target, scenario)
    assert bytes(target.disk[:BS]) == b"N" * BS


# -- a target out of room for now: TASK SET FULL / BUSY are retried ---------------------------------------
@pytest.mark.parametrize("status", [0x28, 0x08], ids=["task set full", "busy"])
def test_task_set_full_and_busy_are_sent_again_after_a_pause(status):
    """SAM-5 §5.3.1: TASK SET FULL and BUSY say the target ran nothing and has no room for the command now
    (Shoal's target answers TASK SET FULL when its write buffers are taken): the command is sent again after
    a pause, as Linux's SCSI layer does, not failed at once; past ``busy_retries`` the status is the caller's."""
    refused, limit = [], [3]

    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x00 or len(refused) >= limit[0]:
            return False
        refused.append(time.monotonic())
        writer.write(target.response(header.itt, status=status))
        return True

    async def scenario(client):
        started = time.monotonic()
        done = await client.execute(TEST_UNIT_READY)
        assert done.status == 0 and len(refused) == 3 and time.monotonic() - started >= 0.005 + 0.01 + 0.02
        refused.clear()
        limit[0] = 4  # one more refusal than the retries
        with pytest.raises(Exception, match=f"{status:#04x}"):  # CommandFailed: no retries left
            await client.execute(TEST_UNIT_READY)
        assert len(refused) == 4

    run(Target(answer), scenario, busy_retries=3)
