"""Commands whose I/O would block run off the event loop (issue 7, "fair under a slow disk").

The sans-I/O core against a LUN whose backing store always says "would block"
(``NeverReady`` below: ``MemoryBackingStore`` behind the optional
``read_nowait``/``write_nowait`` of our own ``BackingStore`` boundary, as a
cold cache or a stalled disk would answer).  ``offload`` is replaced by a
queue the test drains by hand, so each test decides when the "worker" ends.
The real worker pool and a real slow device are exercised by
``tests/peer/test_slow_disk_fairness.py``.
"""

from __future__ import annotations

import os
import threading

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.pdu import Opcode, RejectReason
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import FileRange, LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore
from tests.protocol.conftest import BLOCKS, TARGET
from tests.protocol.test_target_core import READ10, WRITE10, rw10, status_of


class NeverReady(MemoryBackingStore):
    """A store whose reads and writes would always block."""

    def read_nowait(self, offset, length):
        return None

    def write_nowait(self, offset, data, fua=False):
        return False


def slow_registry(window: int = 128) -> tuple[TargetRegistry, LogicalUnit]:
    lu = LogicalUnit(NeverReady(BLOCKS * 512), LunIdentity(volume_id="vol-slow"), target_name=TARGET)
    return TargetRegistry([TargetNode(TARGET, LunMap({0: lu}))], command_window=window), lu


def with_worker_queue(ini) -> list:
    queue: list = []
    ini.conn.offload = lambda io, done, key=None: queue.append((io, done))
    return queue


def run_worker(queue: list, count: int | None = None) -> None:
    for io, done in [queue.pop(0) for _ in range(len(queue) if count is None else count)]:
        done(io())


def test_blocking_read_and_write_complete_when_the_worker_is_done(make_initiator):
    registry, lu = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    payload = os.urandom(4096)
    ini.command(rw10(WRITE10, 8, 8), write=payload)
    assert ini.receive() == [] and len(queue) == 1  # nothing answered while the write runs
    assert bytes(lu.backing.buf[4096:8192]) == bytes(4096)
    run_worker(queue)
    assert status_of(ini.receive()) == 0
    assert bytes(lu.backing.buf[4096:8192]) == payload
    ini.command(rw10(READ10, 8, 8), read=4096)
    assert ini.receive() == []
    run_worker(queue)
    replies = ini.receive()
    assert status_of(replies) == 0
    assert b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN) == payload


def test_a_pooled_write_buffer_stays_out_of_the_pool_until_the_io_ends(make_initiator):
    registry, lu = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    payload = os.urandom(256 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 512), write=payload, immediate_bytes=0)
    [r2t] = ini.receive()
    ini.send(Opcode.DATA_OUT, payload, final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=0,
             buffer_offset=0)
    assert ini.receive() == [] and registry.buffers.pooled == 0  # the buffer is the worker's
    run_worker(queue)
    assert status_of(ini.receive()) == 0
    assert registry.buffers.pooled == 256 * 1024
    assert bytes(lu.backing.buf[:len(payload)]) == payload


def test_running_commands_hold_their_window_slots(make_initiator):
    """MaxCmdSN stays put while commands run, moves on as they end, and never goes backwards."""
    registry, _ = slow_registry(window=4)
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    session = ini.conn.session
    limit = session.maxcmdsn
    for _ in range(4):
        ini.command(rw10(READ10, 0, 1), read=512)
    assert len(queue) == 4 and session.maxcmdsn == limit == session.expcmdsn - 1  # window closed
    ini.command(rw10(READ10, 0, 1), read=512)  # outside the window: ignored (RFC 7143 §4.2.2.1)
    assert len(queue) == 4 and ini.receive() == []
    ini.cmdsn -= 1
    run_worker(queue, 1)
    [reply] = ini.receive()
    assert reply.header.maxcmdsn == limit + 1 and reply.header.expcmdsn == session.expcmdsn
    ini.command(rw10(READ10, 0, 1), read=512)  # the freed slot takes the next command
    assert len(queue) == 4
    run_worker(queue)
    maxima = [r.header.maxcmdsn for r in ini.receive()]
    assert maxima == sorted(maxima) and maxima[-1] == session.expcmdsn + 3


def test_abort_task_of_running_command_answers_after_its_io(make_initiator):
    registry, _ = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    itt = ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4096))
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=itt, cmdsn=ini.cmdsn, refcmdsn=ini.cmdsn - 1)
    assert ini.receive() == []  # the write is still running: the abort is not complete
    ini.command(rw10(READ10, 0, 1), read=512, cmdsn=ini.cmdsn)  # other work goes on meanwhile
    run_worker(queue, 1)
    [reply] = ini.receive()  # the TMF answer, and no status of the aborted write
    assert reply.opcode == Opcode.TASK_MGMT_RESPONSE and reply.header.response == 0
    run_worker(queue)
    assert status_of(ini.receive()) == 0


def test_lun_reset_waits_for_running_commands(make_initiator):
    registry, _ = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    ini.command(rw10(READ10, 0, 1), read=512)
    ini.command(rw10(READ10, 1, 1), read=512)
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=5, lun=bytes(8),
             itt=ini.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=ini.cmdsn, refcmdsn=0)
    run_worker(queue, 1)
    assert ini.receive() == []
    run_worker(queue, 1)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.TASK_MGMT_RESPONSE and reply.header.response == 0


def test_task_tag_of_a_running_command_is_in_progress(make_initiator):
    registry, _ = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    with_worker_queue(ini)
    itt = ini.command(rw10(READ10, 0, 1), read=512)
    ini.itt = itt - 1
    ini.command(rw10(READ10, 0, 1), read=512)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.REJECT and reply.header.reason == RejectReason.TASK_IN_PROGRESS


def test_io_of_a_closed_connection_is_dropped_and_the_unit_closes_after_it(make_initiator):
    registry, lu = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    queue = with_worker_queue(ini)
    ini.command(rw10(READ10, 0, 1), read=512)
    ini.conn.connection_lost()
    run_worker(queue)
    assert ini.receive() == []
    lu.close()  # nothing running: returns at once
    # Deferred I/O that reaches a closed unit fails cleanly instead of touching a closed store.
    result = lu.execute(None, rw10(READ10, 0, 1), None, 512)
    assert result.status == 2


class ColdFile(FileBackingStore):
    """A real file whose pages the probe always finds out of the page cache (a cold cache)."""

    def cached(self, offset, length):
        return False

    def read_nowait(self, offset, length):
        return None


def test_a_large_read_of_a_cold_range_is_read_on_a_worker_not_sent_with_sendfile(make_initiator, tmp_path):
    payload = os.urandom(256 * 1024)
    path = tmp_path / "cold.img"
    path.write_bytes(payload + bytes(BLOCKS * 512 - len(payload)))
    lu = LogicalUnit(ColdFile(path), LunIdentity(volume_id="vol-cold"), target_name=TARGET)
    ini = make_initiator(TargetRegistry([TargetNode(TARGET, LunMap({0: lu}))]))
    ini.login_normal()
    queue = with_worker_queue(ini)
    ini.command(rw10(READ10, 0, 512), read=len(payload))
    assert ini.receive() == [] and len(queue) == 1
    run_worker(queue)
    output = ini.conn.take_output()
    assert not any(isinstance(item, FileRange) for item in output)  # bytes read by the worker
    ini.conn._out = output  # hand them back to the scripted initiator's parser
    replies = ini.receive()
    assert status_of(replies) == 0
    assert b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN) == payload
    lu.close()


def test_a_task_set_abort_waits_for_its_task_not_for_an_outlived_sanitize_with_the_same_tag(make_initiator):
    """An aborted SANITIZE goes on (SBC-4 §4.11) and its tag may be reused at once.  When that pass ends, a TMF
    waiting for the newer command with the same tag (ABORT TASK SET on another LUN) must go on waiting for it:
    a TMF is answered once its tasks have ended (RFC 7143 §11.5.1)."""
    luns = {n: LogicalUnit(NeverReady(BLOCKS * 512), LunIdentity(volume_id=f"vol-{n}"), target_name=TARGET)
            for n in (0, 1)}
    registry = TargetRegistry([TargetNode(TARGET, LunMap(luns))], command_window=128)
    ini = make_initiator(registry)
    ini.login_normal()
    for lun in (0, 1):
        ini.command(bytes(6), lun=lun)
        ini.receive()  # the power-on unit attention
    queue = with_worker_queue(ini)
    itt = ini.command(bytes([0x48, 0x02]) + bytes(8), lun=0)  # SANITIZE BLOCK ERASE, on a "worker"
    assert len(queue) == 1 and luns[0].sanitizing
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=itt, cmdsn=ini.cmdsn, refcmdsn=ini.cmdsn - 1)  # ABORT TASK
    [answer] = ini.receive()
    assert answer.opcode == Opcode.TASK_MGMT_RESPONSE  # at once: the pass goes on
    ini.itt = itt - 1
    assert ini.command(rw10(READ10, 0, 1), read=512, lun=1) == itt  # the tag reused, for LUN 1
    assert len(queue) == 2
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=2, lun=bytes([0, 1]) + bytes(6),
             itt=ini.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=ini.cmdsn, refcmdsn=0)  # ABORT TASK SET
    assert ini.receive() == []  # it waits for the READ
    io, done = queue.pop(0)
    done(io())  # the SANITIZE's pass ends; the READ has not
    assert not [pdu for pdu in ini.receive() if pdu.opcode == Opcode.TASK_MGMT_RESPONSE], \
        "ABORT TASK SET was answered while its task still ran"
    io, done = queue.pop(0)
    done(io())  # now the READ ends (aborted: no response of its own)
    assert [pdu.opcode for pdu in ini.receive()] == [Opcode.TASK_MGMT_RESPONSE]


def test_a_sanitize_with_immed_is_answered_at_once_and_its_pass_goes_on(make_initiator):
    """SBC-4 §5.30.1: with IMMED the SANITIZE's status comes once the CDB and parameters are checked; the
    pass goes on on its worker (SANITIZE IN PROGRESS meanwhile), its task tag is free at once, and the
    connection still counts it as I/O in flight (a fence waits for it)."""
    registry, lu = slow_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    ini.command(bytes(6))
    ini.receive()  # the power-on unit attention
    queue = with_worker_queue(ini)
    itt = ini.command(bytes([0x48, 0x80 | 0x02]) + bytes(8))  # SANITIZE BLOCK ERASE, IMMED
    replies = ini.receive()
    assert status_of(replies) == 0 and replies[-1].header.itt == itt  # GOOD before the pass
    assert len(queue) == 1 and lu.sanitizing and ini.conn.in_flight() == 1
    ini.itt = itt - 1
    assert ini.command(bytes(6)) == itt  # the tag again, at once: TEST UNIT READY
    replies = ini.receive()
    assert status_of(replies) == 2 and replies[-1].header.itt == itt  # CHECK CONDITION: SANITIZE IN PROGRESS
    run_worker(queue)
    assert ini.receive() == [] and ini.conn.in_flight() == 0  # no second answer for the SANITIZE
    ini.command(bytes(6))
    assert status_of(ini.receive()) == 0 and not lu.sanitizing


def _prout(ini, service_action: int, key: int, sark: int, pr_type: int = 0) -> int:
    """PERSISTENT RESERVE OUT(10) with a 24-byte parameter list (SPC-4 §6.16)."""
    cdb = bytes([0x5F, service_action, pr_type, 0, 0, 0, 0, 0, 24, 0])
    return ini.command(cdb, write=key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(8))


def _write_held_on_a_worker(a, lu):
    """A's 4 KiB WRITE at LBA 0 running on its worker (a thread), held before its data reaches the medium: the
    event that lets it go on, the thread, where its result goes, and the ``done`` that completes it."""
    a_jobs = with_worker_queue(a)
    a.command(rw10(WRITE10, 0, 8), write=b"S" * 4096)
    assert a.receive() == [] and len(a_jobs) == 1
    landing, release = threading.Event(), threading.Event()
    write = lu.backing.write

    def held_write(offset, data, fua=False):
        landing.set()
        release.wait(10)
        write(offset, data, fua)
    lu.backing.write = held_write
    a_io, a_done = a_jobs.pop()
    a_thread, a_result = _on_a_thread(a_io)
    assert landing.wait(10)
    return release, a_thread, a_result, a_done


def _on_a_thread(io):
    """Run a worker's job ``io`` on a thread of its own, started: the thread and the list its result goes to."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(io()))
    thread.start()
    return thread, result


def test_preempt_and_abort_answers_once_the_preempted_write_on_a_worker_has_ended(make_initiator):
    """SPC-4 §5.13.11.5: PREEMPT AND ABORT aborts the preempted nexus's commands.  One whose WRITE already runs
    on a worker cannot be called back: it now ends with TASK ABORTED (not GOOD), and the preempting initiator's
    GOOD waits for it, so the stale data never lands after that GOOD (it used to: GOOD at once, the write later,
    over what the new holder wrote)."""
    registry, lu = slow_registry()
    a, b = make_initiator(registry), make_initiator(registry, isid=0x400001370099)
    a.login_normal(), b.login_normal()
    for ini, key in ((a, 0x11), (b, 0x22)):
        _prout(ini, 0, 0, key)  # REGISTER
        assert status_of(ini.receive()) == 0
    _prout(a, 1, 0x11, 0, pr_type=1)  # A: RESERVE Write Exclusive
    assert status_of(a.receive()) == 0
    b_jobs = with_worker_queue(b)
    release, a_thread, a_result, a_done = _write_held_on_a_worker(a, lu)
    _prout(b, 5, 0x22, 0x11, pr_type=1)  # B: PREEMPT AND ABORT of A's key
    assert b.receive() == [] and len(b_jobs) == 1  # not answered: A's WRITE still runs
    b_io, b_done = b_jobs.pop()
    b_thread, b_result = _on_a_thread(b_io)
    b_thread.join(0.3)
    assert b_thread.is_alive()  # B's answer waits for A's write
    release.set()
    a_thread.join(10), b_thread.join(10)
    a_done(a_result[0])
    assert status_of(a.receive()) == 0x40  # TASK ABORTED, not GOOD
    b_done(b_result[0])
    assert status_of(b.receive()) == 0
    assert bytes(lu.backing.buf[:4096]) == b"S" * 4096  # it landed before B's GOOD, never after


@pytest.mark.parametrize("function, name", [(4, "clear task set"), (5, "logical unit reset"),
                                            (6, "target warm reset")])
def test_a_reset_answers_once_another_sessions_aborted_write_on_a_worker_has_ended(make_initiator, function, name):
    """SAM-5 §7.4, §7.6: CLEAR TASK SET and the resets abort every initiator's tasks on the unit.  One whose WRITE
    already runs on a worker cannot be called back: it ends with TASK ABORTED, and the reset's answer waits for
    it, so its data never lands after that answer (it used to: FUNCTION COMPLETE at once, the write later)."""
    registry, lu = slow_registry()
    a, b = make_initiator(registry), make_initiator(registry, isid=0x400001370099)
    a.login_normal(), b.login_normal()
    b_jobs = with_worker_queue(b)
    release, a_thread, a_result, a_done = _write_held_on_a_worker(a, lu)
    b.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=function, lun=bytes(8),
           itt=b.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=b.cmdsn, refcmdsn=0)
    assert b.receive() == [] and len(b_jobs) == 1, f"{name} answered while A's WRITE still runs"
    b_io, b_done = b_jobs.pop()
    b_thread, b_result = _on_a_thread(b_io)
    b_thread.join(0.3)
    assert b_thread.is_alive()  # B's answer waits for A's write
    release.set()
    a_thread.join(10), b_thread.join(10)
    a_done(a_result[0])
    [aborted] = [r for r in a.receive() if r.opcode == Opcode.SCSI_RESPONSE]
    assert aborted.header.status == 0x40  # TASK ABORTED, not GOOD
    assert b.receive() == []  # the drain job's completion answers, not A's
    b_done(b_result[0])
    [answer] = b.receive()
    assert answer.opcode == Opcode.TASK_MGMT_RESPONSE and answer.header.response == 0
    assert bytes(lu.backing.buf[:4096]) == b"S" * 4096  # it landed before the answer, never after


def test_a_reset_with_no_other_sessions_io_is_answered_at_once(make_initiator):
    """No other session had a command on the unit: no worker hop, the answer comes right away."""
    registry, lu = slow_registry()
    a, b = make_initiator(registry), make_initiator(registry, isid=0x400001370099)
    a.login_normal(), b.login_normal()
    b_jobs = with_worker_queue(b)
    b.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=5, lun=bytes(8),
           itt=b.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=b.cmdsn, refcmdsn=0)
    [answer] = b.receive()
    assert answer.opcode == Opcode.TASK_MGMT_RESPONSE and answer.header.response == 0 and not b_jobs
