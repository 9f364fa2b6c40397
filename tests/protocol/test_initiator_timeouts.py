"""A command past ``command_timeout``: task management first, the connection only when that fails.

RFC 7143 §7.1 leaves a command without status to SCSI-level recovery, and ABORT TASK (§11.5.1) ends that one
task; dropping the connection (ERL 0) ends every task of the session and has the session issue them again.
Each case here used to drop the connection at once: every other command in flight was issued again (or
failed), for one slow or lost command.  Now ABORT TASK goes out, the caller waits for its answer (so that
nothing it issues next can run on the target before the aborted command), the others carry on; only an abort
the target refuses, does not answer, or answers "Task does not exist" for a command without status, ends with
the connection dropped.  The caller gets ``CommandTimedOut`` saying whether the command may have been applied,
and no Data-In of it lands in its buffer after that.  The scripted ``Target`` of
tests/protocol/test_initiator_hostile_target.py plays the target (127.0.0.1); the core-level cases feed
``InitiatorConnection`` hand-built PDUs.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.initiator.client import CommandTimedOut
from node_agent.iscsi.pdu import Opcode
from tests.protocol.test_initiator_hostile_target import (BS, TEST_UNIT_READY, Target, device, run, rw16,
                                                          until)
from tests.protocol.test_initiator_review_fixes import READ_8_BLOCKS, logged_in_core, tmf_answer

TIMEOUTS = dict(command_timeout=0.4, abort_timeout=5)  # a command is given up on 0.4 to 0.5 s after it went out


async def later(condition, action, timeout: float = 3.0) -> None:
    """Do ``action()`` once ``condition()`` holds (given up after ``timeout``: the test then fails elsewhere)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if condition():
        action()


def test_a_timed_out_write_is_aborted_alone_and_reported_possibly_applied():
    """The target takes a WRITE (its data came as immediate data) and never answers it, but answers ABORT
    TASK.  A READ in flight all along, answered only after the abort, and the commands issued meanwhile run on
    the same connection, each once: nothing is dropped or issued again.  The WRITE fails with
    ``CommandTimedOut``, ``possibly_applied``: its data reached the target."""
    held: list[int] = []
    slow: list[int] = []

    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] == 0x8A and not held:
            held.append(header.itt)
            return True  # taken, never answered
        if header.cdb[0] == 0x88 and not slow:
            slow.append(header.itt)
            snapshot = bytes(target.disk[8 * BS:9 * BS])
            asyncio.ensure_future(later(lambda: target.tmfs, lambda: writer.write(target.data_in(header.itt,
                                                                                                  snapshot))))
            return True  # answered after the TMF Response
        return False

    async def scenario(client):
        lun = device(client)
        start = time.monotonic()
        write = asyncio.ensure_future(lun.write_blocks(0, b"W" * 4096))
        await until(lambda: held)
        await asyncio.sleep(0.15)  # more than a quarter timeout later: the READ does not time out with it
        read = asyncio.ensure_future(lun.read_blocks(8, 1))
        meanwhile = 0
        while not write.done():
            await lun.test_unit_ready()
            meanwhile += 1
        with pytest.raises(CommandTimedOut, match="may have been applied") as caught:
            await write
        elapsed = time.monotonic() - start
        assert caught.value.possibly_applied and isinstance(caught.value, OSError)
        assert bytes(await asyncio.wait_for(read, 2)) == b"\x5a" * BS
        await lun.write_blocks(0, b"N" * 4096)  # the session carries on
        assert client.conn.outstanding() == [] and client.state == "up"
        return elapsed, meanwhile

    target = Target(answer, tmf_response=C.TMF_COMPLETE)
    target.disk[8 * BS:9 * BS] = b"\x5a" * BS
    elapsed, meanwhile = run(target, scenario, **TIMEOUTS)
    assert 0.4 <= elapsed < 0.9 and meanwhile > 5
    assert target.tmfs == [(C.TMF_ABORT_TASK, held[0])]
    assert target.connections == 1
    commands = target.commands()
    assert commands.count(held[0]) == 1 and commands.count(slow[0]) == 1 and len(commands) == len(set(commands))
    assert bytes(target.disk[:4096]) == b"N" * 4096


def test_no_data_in_of_a_timed_out_read_lands_in_the_callers_buffer_after_it_failed():
    """The target sends half a READ's data, holds the rest, answers ABORT TASK "Function complete", then (a
    target breaking §11.6.1) the rest of the data with status.  The caller's buffer is as it was when
    ``CommandTimedOut`` was raised: the late Data-In went nowhere."""
    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] != 0x88:
            return False
        writer.write(target.data_in(header.itt, b"A" * 4096, status=False))
        late = target.data_in(header.itt, b"X" * 4096, datasn=1, offset=4096)
        asyncio.ensure_future(later(lambda: target.tmfs, lambda: writer.write(late)))
        return True

    async def scenario(client):
        buffer = bytearray(8192)
        with pytest.raises(CommandTimedOut) as caught:
            await client.execute(rw16(0x88, 0, 16), buffer=buffer)
        failed_with = bytes(buffer)
        await asyncio.sleep(0.2)  # the late Data-In has come
        await client.execute(TEST_UNIT_READY)
        return caught.value, failed_with, bytes(buffer)

    target = Target(answer, tmf_response=C.TMF_COMPLETE)
    error, failed_with, after = run(target, scenario, **TIMEOUTS)
    assert after == failed_with and b"X" not in after and error.possibly_applied
    assert target.tmfs and target.connections == 1


def test_a_status_that_comes_before_the_abort_answer_completes_the_command():
    """ABORT TASK crosses the command's own answer: the target sends the READ's data and status, then "Task
    does not exist" (§11.6.1).  The caller gets the data, not an error."""
    async def answer(target, connection, header, data, reader, writer):
        return header.cdb[0] == 0x88  # held until the TMF comes

    def tmf(target, header):
        return target.data_in(header.referenced_task_tag, b"D" * 4096) + target.tmf_answer(header.itt,
                                                                                           C.TMF_NO_TASK)

    async def scenario(client):
        return bytes((await client.execute(READ_8_BLOCKS, read_length=4096)).data)

    target = Target(answer, tmf_response=tmf)
    assert run(target, scenario, **TIMEOUTS) == b"D" * 4096
    assert len(target.tmfs) == 1 and target.connections == 1


@pytest.mark.parametrize("response", [255, 5, C.TMF_NO_TASK],
                         ids=["function-rejected", "not-supported", "task-does-not-exist"])
def test_an_abort_that_does_not_end_the_command_drops_the_connection_at_once(response):
    """ABORT TASK answered "Function rejected" or "not supported": the target may still run the command.
    "Task does not exist" for a command without status: the target never got it, or holds it behind a CmdSN
    it never got (tgtd answers so, and every later command then waits behind that gap for ever).  Either way
    the connection is dropped without waiting out ``abort_timeout``; the reinstatement ends the command on
    the target (§6.3.5).  A command in flight with it is issued again on the new connection and completes."""
    held: list[int] = []

    async def answer(target, connection, header, data, reader, writer):
        if connection == 1 and header.cdb[0] == 0x8A and not held:
            held.append(header.itt)
            return True
        return connection == 1 and header.cdb[0] == 0x88  # the READ: answered on the next connection only

    async def scenario(client):
        lun = device(client)
        start = time.monotonic()
        write = asyncio.ensure_future(lun.write_blocks(0, b"W" * 4096))
        await until(lambda: held)
        await asyncio.sleep(0.15)  # more than a quarter timeout later: the READ does not time out with it
        read = asyncio.ensure_future(lun.read_blocks(8, 1))
        with pytest.raises(CommandTimedOut, match=f"ABORT TASK answered {response}: the connection was dropped") \
                as caught:
            await write
        assert caught.value.possibly_applied
        elapsed = time.monotonic() - start
        assert bytes(await asyncio.wait_for(read, 3)) == bytes(BS)
        return elapsed

    target = Target(answer, tmf_response=response)
    assert run(target, scenario, **TIMEOUTS) < 0.9  # not 5 s of abort_timeout
    assert target.tmfs == [(C.TMF_ABORT_TASK, held[0])]
    assert target.connections == 2 and held[0] not in target.commands(2) and len(target.commands(2)) == 1


def test_a_connection_lost_while_the_abort_is_out_fails_the_command_as_timed_out():
    """The connection goes while ABORT TASK waits for its answer: the reinstatement ends the command on the
    target (§6.3.5), so it fails (``CommandTimedOut``, not the abort's ``ConnectionLost``) and is not issued
    again."""
    held: list[int] = []

    async def answer(target, connection, header, data, reader, writer):
        if header.cdb[0] == 0x88 and not held:
            held.append(header.itt)
            return True
        return False

    async def scenario(client):
        command = asyncio.ensure_future(client.execute(READ_8_BLOCKS, read_length=4096))
        await until(lambda: target.tmfs)
        assert not command.done()  # the caller waits for the abort's answer
        client._proto.transport.abort()
        with pytest.raises(CommandTimedOut, match="connection was lost"):
            await asyncio.wait_for(command, 2)
        await client.execute(TEST_UNIT_READY)

    target = Target(answer)  # TMFs unanswered
    run(target, scenario, **TIMEOUTS)
    assert target.connections == 2 and held[0] not in target.commands(2)


def test_a_command_still_waiting_for_the_cmdsn_window_times_out_without_an_abort():
    """A window of one command (MaxCmdSN stays 1): the first is held by the target, the second never leaves
    the initiator.  Both time out: the first through ABORT TASK, ``possibly_applied``; the second at once,
    with nothing to abort and not applied.  The connection stays."""
    held: list[int] = []

    class OneSlot(Target):
        def sn(self, advance: bool = True) -> dict:
            return super().sn(advance) | dict(maxcmdsn=1)

    async def answer(target, connection, header, data, reader, writer):
        held.append(header.itt)
        return True

    async def scenario(client):
        first = asyncio.ensure_future(client.execute(rw16(0x8A, 0, 1), data_out=bytes(BS)))
        await until(lambda: held)
        second = asyncio.ensure_future(client.execute(rw16(0x8A, 1, 1), data_out=bytes(BS)))
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 3)
        assert client.state == "up"
        return results

    target = OneSlot(answer, tmf_response=C.TMF_COMPLETE)
    first, second = run(target, scenario, **TIMEOUTS)
    assert isinstance(first, CommandTimedOut) and first.possibly_applied
    assert isinstance(second, CommandTimedOut) and not second.possibly_applied
    assert "it was not applied" in str(second)
    assert target.tmfs == [(C.TMF_ABORT_TASK, held[0])] and held == target.commands()
    assert target.connections == 1


# -- the core's part ---------------------------------------------------------------------------------------
def test_abort_keeps_the_command_until_the_target_answers():
    """``abort`` sends ABORT TASK and leaves the command outstanding: its SCSI Response may still end it;
    "Function complete" forgets it (``TmfDone.aborted``)."""
    conn = logged_in_core()
    victim = conn.submit(READ_8_BLOCKS, read_length=4096)
    other = conn.submit(READ_8_BLOCKS, read_length=4096)
    assert conn.issued(victim)
    tmf = conn.abort(victim)
    assert tmf is not None and sorted(conn.outstanding()) == sorted([victim, other])
    assert tmf_answer(conn, tmf, C.TMF_COMPLETE) == [C.TmfDone(tmf, C.TMF_COMPLETE, (victim,))]
    assert conn.outstanding() == [other] and not conn.issued(victim)


def test_abort_of_a_command_that_has_not_gone_out_is_none():
    """Still waiting for the CmdSN window: nothing to abort (the caller forgets it), and not ``issued``."""
    conn = logged_in_core()
    conn.maxcmdsn = 1
    sent = conn.submit(READ_8_BLOCKS, read_length=4096)
    waiting = conn.submit(READ_8_BLOCKS, read_length=4096)
    conn.take_output()
    assert conn.abort(waiting) is None and not conn.issued(waiting) and conn.issued(sent)
    assert conn.take_output() == []
    assert conn.abort(0x7777) is None


def test_a_command_adopted_after_a_reconnect_counts_as_issued():
    """It went out on the lost connection, so it may have run there, even while it waits on the new one."""
    old = logged_in_core()
    itt = old.submit(READ_8_BLOCKS, read_length=4096)
    new = C.InitiatorConnection(old.settings, isid=old.isid, initial_cmdsn=old.cmdsn)
    new.adopt(old)  # not logged in yet: it waits
    assert itt in new.outstanding() and new.issued(itt) and new.abort(itt) is None


def test_a_tmf_referencing_a_command_not_sent_carries_the_current_cmdsn():
    """RefCmdSN of a command that never went out: the TMF's own CmdSN (a CmdSN field cannot say "none")."""
    conn = logged_in_core()
    conn.maxcmdsn = 0  # closed
    waiting = conn.submit(READ_8_BLOCKS, read_length=4096)
    conn.task_management(C.TMF_ABORT_TASK, 0, waiting)
    wire = b"".join(bytes(piece) for piece in conn.take_output())
    opcode, header = P.decode_header(wire[:P.BHS_LENGTH])
    assert opcode == Opcode.TASK_MGMT_REQUEST and header.refcmdsn == conn.cmdsn == 1

