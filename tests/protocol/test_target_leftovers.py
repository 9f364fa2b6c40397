"""Target findings a review left open, each reproduced against the sans-I/O core first (RFC 7143, SAM-5).

- A write whose Data-Out never comes (F=0 on the command and no unsolicited data, or an R2T never answered)
  kept its CmdSN window slot for as long as the session lived: a window of 4 closed after 4 of them.  Now one
  that gets none of its data for ``data_out_timeout`` ends with CHECK CONDITION, ABORTED COMMAND, INITIATOR
  RESPONSE TIMEOUT (checked by ``tick``, once a second), its slot and buffer given back.
- CLEAR TASK SET / LOGICAL UNIT RESET from one session and a command of another session held behind that
  session's CmdSN gap: not a fault.  The CmdSN rule (a function acts on the tasks before its CmdSN) holds in
  the issuing session only; on a third-party session the affected tasks are those already instantiated, and
  the target waits for no new command there (RFC 7143 §4.2.3, multi-task abort semantics, from RFC 5048).  A
  held command is not instantiated until its CmdSN comes up (§4.2.2.1: delivered in order), after the
  function, and then runs as any command does: after a reset it meets the reset's UNIT ATTENTION first.  The
  test below pins that.
- A SCSI Command's Extended CDB AHS was skipped: the logical unit got the first 16 bytes of a longer CDB.  It now
  gets all of them; an unknown AHS type, or an AHS that does not fit, is refused with a Reject and the command
  does not run (it used to run as if the AHS were not there).
- iSCSI names compare after RFC 3722's stringprep (case folded, RFC 7143 §4.2.7.2): a TargetName or SendTargets
  value in another case found nothing, an ACL entry in another case refused its initiator.  Now they match, and a
  fence removes an ACL entry of the fenced name in any case (else the case-blind ACL would let it back in).
"""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings, encode_text, parse_text
from node_agent.iscsi.pdu import Opcode, RejectReason
from node_agent.scsi import sense as S
from node_agent.scsi.sense import SenseCode
from tests.protocol.conftest import INITIATOR, TARGET, FakeClock, Initiator, make_registry
from tests.protocol.test_target_core import READ10, WRITE10, rw10

CHECK_CONDITION = 0x02
INITIATOR_RESPONSE_TIMEOUT = SenseCode(S.ABORTED_COMMAND, 0x4B, 0x06)
NO_PINGS = ConnectionSettings(nop_interval=0)  # the clock jumps by minutes: no NOP-In ping to answer meanwhile


def initiator(registry, *, clock: FakeClock | None = None, config: ConnectionSettings | None = None,
              **kwargs) -> Initiator:
    conn = TargetConnection(registry, TargetSettings(), local_address=("127.0.0.1", 3260), peer="test",
                            config=config or ConnectionSettings(), clock=clock or FakeClock())
    return Initiator(conn, **kwargs)


def sense_of(reply) -> SenseCode:
    assert reply.opcode == Opcode.SCSI_RESPONSE and reply.header.status == CHECK_CONDITION, reply
    return S.parse_sense(reply.data[2:])


def responses(replies) -> list:
    return [r for r in replies if r.opcode == Opcode.SCSI_RESPONSE]


def data_out(ini, itt: int, data: bytes, offset: int, datasn: int, final: bool, ttt: int = P.RESERVED_TAG) -> None:
    ini.send(Opcode.DATA_OUT, data, final=final, lun=bytes(8), itt=itt, ttt=ttt, expstatsn=0, datasn=datasn,
             buffer_offset=offset)


def timeout_of(ini) -> float:
    return ini.conn.config.data_out_timeout


def tick_after(ini, clock: FakeClock, seconds: float) -> None:
    clock.now += seconds
    ini.conn.tick()


# -- 1: a write whose Data-Out never comes ----------------------------------------------------------
def test_writes_whose_unsolicited_data_never_comes_give_their_window_slots_back():
    clock = FakeClock()
    registry = make_registry()
    registry.command_window = 4
    ini = initiator(registry, clock=clock, config=NO_PINGS)
    ini.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    before = bytes(unit.backing.read(0, 4096))
    itts = [ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4096), immediate_bytes=512, unsolicited_follows=True)
            for _ in range(4)]  # 3.5 KiB of unsolicited Data-Out announced for each, within FirstBurstLength
    assert ini.receive() == []  # no R2T: all of it is to come unsolicited
    session = ini.conn.session
    assert session.running == 4 and session.maxcmdsn == (session.expcmdsn - 1) & 0xFFFFFFFF  # the window is shut
    ini.conn.tick()
    tick_after(ini, clock, timeout_of(ini) - 1)
    assert responses(ini.receive()) == [] and session.running == 4  # not yet
    tick_after(ini, clock, 2)
    ended = responses(ini.receive())
    assert [r.header.itt for r in ended] == itts
    assert all(sense_of(r) == INITIATOR_RESPONSE_TIMEOUT for r in ended)
    assert session.running == 0 and session.write_buffers == 0 and registry.write_buffers == 0
    assert not ini.conn._tasks and ended[-1].header.maxcmdsn == (session.expcmdsn + 3) & 0xFFFFFFFF  # open again
    data_out(ini, itts[0], os.urandom(3584), 512, 0, True)  # its data, late: dropped silently
    assert ini.receive() == []
    assert bytes(unit.backing.read(0, 4096)) == before, "a write that timed out landed"
    ini.command(rw10(READ10, 0, 1), read=512)  # the session goes on
    assert [r.opcode for r in ini.receive()] == [Opcode.DATA_IN]


def test_an_unanswered_r2t_times_out_and_a_write_whose_data_keeps_coming_does_not():
    clock = FakeClock()
    ini = initiator(make_registry(), clock=clock, config=NO_PINGS)
    ini.login_normal()
    stuck = ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4096), immediate_bytes=0)
    slow_data = os.urandom(8192)
    slow = ini.command(rw10(WRITE10, 8, 16), write=slow_data, immediate_bytes=0)
    r2ts = {r.header.itt: r for r in ini.receive()}
    assert set(r2ts) == {stuck, slow}
    ini.conn.tick()
    for n in range(4):  # 1 KiB of the slow write's burst every 0.6 of the timeout: it keeps going
        tick_after(ini, clock, timeout_of(ini) * 0.6)
        data_out(ini, slow, slow_data[n * 1024:(n + 1) * 1024], n * 1024, n, False, ttt=r2ts[slow].header.ttt)
    ended = responses(ini.receive())
    assert [(r.header.itt, sense_of(r)) for r in ended] == [(stuck, INITIATOR_RESPONSE_TIMEOUT)]
    data_out(ini, slow, slow_data[4096:], 4096, 4, True, ttt=r2ts[slow].header.ttt)
    [done] = ini.receive()
    assert (done.header.itt, done.header.status) == (slow, 0)
    assert ini.conn.session.running == 0 and not ini.conn._tasks


def test_a_write_whose_large_data_out_is_being_received_into_its_buffer_is_not_timed_out():
    """A payload of 16 KiB or more goes straight into the task's buffer as it comes (``_start_direct``), counted
    only once whole: however slowly it comes, the task must not end (its buffer back in the pool) meanwhile."""
    clock = FakeClock()
    registry = make_registry()
    ini = initiator(registry, clock=clock, config=NO_PINGS)
    ini.login_normal()
    payload = os.urandom(64 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 128), write=payload, immediate_bytes=0)
    [r2t] = ini.receive()
    pdu = b"".join(bytes(p) for p in P.encode_pdu(Opcode.DATA_OUT, payload, final=True, lun=bytes(8), itt=itt,
                                                  ttt=r2t.header.ttt, expstatsn=0, datasn=0, buffer_offset=0))
    ini.conn.receive(pdu[:48 + 1024])
    assert ini.conn._sink is not None  # the rest of the payload goes straight into the task's buffer
    ini.conn.tick()
    tick_after(ini, clock, timeout_of(ini) + 1)
    assert ini.receive() == [] and itt in ini.conn._tasks
    ini.conn.receive(pdu[48 + 1024:])
    [done] = ini.receive()
    assert (done.header.itt, done.header.status) == (itt, 0)
    assert bytes(registry.targets[TARGET].luns.luns[0].backing.read(0, len(payload))) == payload


def test_a_failed_write_waiting_for_an_f_bit_that_never_comes_ends_with_its_own_error():
    """§7.8: a write whose Data-Out failed answers once its Data-Out stopped; an initiator that dropped it on the
    Reject never sends the F=1: the timeout ends it, with the error it already had."""
    clock = FakeClock()
    ini = initiator(make_registry(), clock=clock, config=NO_PINGS)
    ini.login_normal()
    itt = ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4096), immediate_bytes=0)
    [r2t] = ini.receive()
    data_out(ini, itt, b"x" * 512, 1024, 0, False, ttt=r2t.header.ttt)  # out of order: rejected, task failed
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT
    ini.conn.tick()
    tick_after(ini, clock, timeout_of(ini) + 1)
    [ended] = ini.receive()
    assert ended.header.itt == itt and sense_of(ended) == S.DATA_PHASE_ERROR
    assert ini.conn.session.running == 0


# -- 2: task set functions and another session's commands held behind its CmdSN gap ----------------------
@pytest.mark.parametrize("function", [4, 5], ids=["clear task set", "logical unit reset"])
def test_another_sessions_command_held_behind_its_gap_is_not_an_instantiated_task(function):
    from tests.protocol.test_tmf_review import tmf
    registry = make_registry()
    a, b = initiator(registry), initiator(registry, isid=0x400001370009)
    a.login_normal()
    b.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    gap = a.cmdsn
    itt = a.command(rw10(WRITE10, 100, 1), write=b"W" * 512, cmdsn=gap + 1)  # all its data immediate
    assert a.receive() == [] and gap + 1 in a.conn.session.pending
    [answer] = tmf(b, function)
    assert answer.header.response == 0 and a.receive() == []
    a.send(Opcode.NOP_OUT, final=True, lun=bytes(8), itt=a.next_itt(), ttt=P.RESERVED_TAG, cmdsn=gap, expstatsn=0)
    [nop, response] = a.receive()
    assert nop.opcode == Opcode.NOP_IN and response.header.itt == itt
    if function == 5:  # it is the first command of that nexus after the reset: the reset's unit attention
        assert sense_of(response) == S.BUS_DEVICE_RESET_FUNCTION_OCCURRED
        assert bytes(unit.backing.read(100 * 512, 512)) == bytes(512)
    else:  # CLEAR TASK SET (TAS=1) leaves no unit attention: it runs as a command that came after it
        assert response.header.status == 0
        assert bytes(unit.backing.read(100 * 512, 512)) == b"W" * 512


# -- 3: Additional Header Segments of a SCSI Command ----------------------------------------------
def command_with_ahs(ini, cdb: bytes, ahs: bytes, *, write: bytes = b"", read: int = 0, r: bool | None = None,
                     w: bool | None = None) -> int:
    """A SCSI Command whose first 16 CDB bytes are ``cdb[:16]``, with ``ahs`` (padded to words) after the BHS."""
    assert len(ahs) % 4 == 0
    itt = ini.next_itt()
    header = P.encode_header(Opcode.SCSI_COMMAND, total_ahs_length=len(ahs) // 4, data_segment_length=len(write),
                             final=True, read=bool(read) if r is None else r, write=bool(write) if w is None else w,
                             attr=1, lun=bytes(8), itt=itt, expected_data_transfer_length=read or len(write),
                             cmdsn=ini.cmdsn, expstatsn=0, cdb=cdb[:16].ljust(16, b"\0"))
    ini.cmdsn += 1
    pdu = bytes(header) + ahs
    if ini.header_digest:
        pdu += P.digest_bytes(pdu)
    if write:
        padded = write + bytes(P.pad4(len(write)) - len(write))
        pdu += padded + (P.digest_bytes(padded) if ini.data_digest else b"")
    ini.feed(pdu)
    return itt


def extended_cdb_ahs(cdb: bytes) -> bytes:
    """RFC 7143 §11.2.2.3: AHSLength = CDB length - 15, AHSType 1, a reserved byte, the bytes past the 16th."""
    body = (len(cdb) - 15).to_bytes(2, "big") + b"\x01\x00" + cdb[16:]
    return body + bytes(-len(body) % 4)


def recording(unit) -> list:
    """The CDBs ``unit`` is given from now on (a spy on its entry point; it still runs each one)."""
    seen: list = []
    run = unit.execute_deferrable

    def execute_deferrable(nexus, cdb, *args, **kwargs):
        seen.append(bytes(cdb))
        return run(nexus, cdb, *args, **kwargs)
    unit.execute_deferrable = execute_deferrable
    return seen


READ32 = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09, 0, 0]) + (5).to_bytes(8, "big") + bytes(8) \
    + (1).to_bytes(4, "big")  # SBC-3 READ(32): variable length, service action 0009h, one block at LBA 5


@pytest.mark.parametrize("digests", [False, True], ids=["no digests", "digests"])
def test_an_extended_cdb_reaches_the_logical_unit_whole(digests):
    registry = make_registry()
    ini = initiator(registry, header_digest=digests, data_digest=digests)
    ini.login_normal()
    seen = recording(registry.targets[TARGET].luns.luns[0])
    assert len(READ32) == 32
    itt = command_with_ahs(ini, READ32, extended_cdb_ahs(READ32), read=512)
    [reply] = ini.receive()
    assert reply.header.itt == itt and sense_of(reply) == S.INVALID_COMMAND_OPERATION_CODE
    assert seen == [READ32], "the unit got a truncated CDB"
    ini.command(rw10(READ10, 0, 1), read=512)  # the CmdSN was taken: the next one runs
    assert [r.opcode for r in ini.receive()] == [Opcode.DATA_IN]


@pytest.mark.parametrize("ahs, reason", [
    (b"\x00\x05\x03\x00" + bytes(4), RejectReason.COMMAND_NOT_SUPPORTED),  # AHSType 3: reserved
    (b"\x00\x01\x3c\x00", RejectReason.COMMAND_NOT_SUPPORTED),  # AHSType 60: a vendor's
    (b"\x00\x00\x01\x00", RejectReason.PROTOCOL_ERROR),  # Extended CDB with AHSLength 0
    (b"\x00\x01\x01\x00", RejectReason.PROTOCOL_ERROR),  # Extended CDB of no byte (CDBLength 16 < 17)
    (b"\x00\x11\x01\x00" + bytes(8), RejectReason.PROTOCOL_ERROR),  # longer than TotalAHSLength
    (b"\x00\x05\x02\x00" + (512).to_bytes(4, "big"), RejectReason.PROTOCOL_ERROR),  # bidirectional, W only
], ids=["reserved type", "vendor type", "zero length", "cdb of 16", "past the total", "bidi without R"])
def test_a_write_with_an_ahs_the_target_cannot_take_is_refused_and_does_not_run(ahs, reason):
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    before = bytes(unit.backing.read(0, 512))
    command_with_ahs(ini, rw10(WRITE10, 0, 1), ahs, write=os.urandom(512))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == reason
    assert bytes(unit.backing.read(0, 512)) == before, "the write ran as if its AHS were not there"
    ini.command(rw10(READ10, 0, 1), read=512)  # its CmdSN was taken, in order: the next command runs
    assert [r.opcode for r in ini.receive()] == [Opcode.DATA_IN]
    assert ini.conn.session.running == 0 and not ini.conn.session.pending


def test_a_bidirectional_command_with_its_read_length_ahs_is_answered_as_the_unit_answers_it():
    """The unit has no bidirectional command (XDWRITEREAD(10) here): the AHS is taken, the CDB refused."""
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    seen = recording(registry.targets[TARGET].luns.luns[0])
    xdwriteread = bytes([0x53, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    bidi = b"\x00\x05\x02\x00" + (512).to_bytes(4, "big")
    itt = command_with_ahs(ini, xdwriteread, bidi, write=os.urandom(512), r=True, w=True)
    [reply] = ini.receive()
    assert reply.header.itt == itt and sense_of(reply) == S.INVALID_COMMAND_OPERATION_CODE
    assert seen == [xdwriteread.ljust(16, b"\0")]


# -- 4: iSCSI names compare as RFC 3722 normalizes them -----------------------------------------------
def refused_login(ini, target: str, name: str):
    reply = ini.login([("InitiatorName", name), ("TargetName", target), ("SessionType", "Normal")])
    return reply.header.status_class, reply.header.status_detail


def test_a_target_name_in_another_case_is_found():
    ini = initiator(make_registry())
    ini.login_normal(extra=[("TargetName", TARGET.upper())])  # asserts success
    assert ini.conn.session.target.iqn == TARGET
    assert refused_login(initiator(make_registry()), TARGET + "x", INITIATOR) == (2, 3)  # another name: not found


def test_an_acl_entry_in_another_case_admits_its_initiator_and_no_other():
    registry = make_registry(allow=frozenset({INITIATOR.upper()}))
    initiator(registry).login_normal()  # asserts success
    assert refused_login(initiator(registry, isid=0x400001370001), TARGET, INITIATOR + "-2") == (2, 2)


def test_a_fence_removes_the_fenced_name_in_any_case():
    registry = make_registry(allow=frozenset({INITIATOR.upper(), "iqn.2026-11.io.shoal.test:other"}))
    ini = initiator(registry)
    ini.login_normal()
    closed = registry.fence_initiator(INITIATOR)
    assert closed == [ini.conn] and ini.conn.closing
    assert registry.targets[TARGET].allowed_initiators == frozenset({"iqn.2026-11.io.shoal.test:other"})
    again = initiator(registry, isid=0x400001370002)
    assert refused_login(again, TARGET.upper(), INITIATOR.upper()) == (2, 2), "the fenced initiator is let back in"


def test_a_login_of_the_same_name_in_another_case_and_isid_reinstates_the_session():
    registry = make_registry()
    old = initiator(registry)
    old.login_normal()
    new = initiator(registry)
    new.login_normal(extra=[("InitiatorName", INITIATOR.upper())])
    assert old.conn.closing and list(registry.sessions.values()) == [new.conn.session]


def test_send_targets_finds_a_target_named_in_another_case():
    ini = initiator(make_registry())
    reply = ini.login([("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("HeaderDigest", "None"),
                       ("DataDigest", "None")])
    assert reply.header.status_class == 0 and ini.conn.session is not None
    ini.send(Opcode.TEXT_REQUEST, encode_text([("SendTargets", TARGET.upper())]), final=True, lun=bytes(8),
             itt=ini.next_itt(), ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn, expstatsn=0)
    [answer] = ini.receive()
    assert ("TargetName", TARGET) in parse_text(answer.data)
