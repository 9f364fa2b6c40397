"""The write (Data-Out) path under a wrong, lost or hostile initiator (a review's findings F1-F8).

Each test drives a real ``TargetConnection`` with hand-built PDUs fed 1 to 10 bytes at a time, and checks
what reaches the volume, not only what is answered: a write is either GOOD with exactly the bytes sent,
or it ends with a status and writes nothing.  Sections cited are RFC 7143's unless named otherwise.
"""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.pdu import Opcode, RejectReason
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi import sense as S
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import MemoryBackingStore
from tests.protocol.conftest import BLOCKS, TARGET, Initiator
from tests.protocol.test_target_core import READ10, WRITE10, rw10, status_of

KIB = 1024
TARGET_B = "iqn.2026-11.io.shoal.test:tenant-b"
CHECK_CONDITION, TASK_SET_FULL = 0x02, 0x28


# -- helpers ----------------------------------------------------------------------------------
def registry_of(*targets: str, command_window: int = 128) -> TargetRegistry:
    nodes = [TargetNode(iqn, LunMap({0: LogicalUnit(MemoryBackingStore(BLOCKS * 512), LunIdentity(volume_id=iqn[-8:]),
                                                    target_name=iqn)}), allowed_initiators=None)
             for iqn in targets]
    return TargetRegistry(nodes, command_window=command_window)


def initiator(clock, registry=None, config: ConnectionSettings | None = None, **kwargs) -> Initiator:
    conn = TargetConnection(registry or registry_of(TARGET), TargetSettings(), peer="test",
                            config=config or ConnectionSettings(), clock=clock)
    return Initiator(conn, **kwargs)


def write_cmd(ini, lba: int, length: int, immediate: bytes = b"", *, final: bool = True, write: bool = True,
              cmdsn: int | None = None, immediate_bit: bool = False, blocks: int | None = None) -> int:
    """A WRITE(10) of ``blocks`` (default: ``length`` bytes' worth) with EDTL ``length``."""
    itt = ini.next_itt()
    blocks = min(length // 512, 0xFFFF) if blocks is None else blocks
    ini.send(Opcode.SCSI_COMMAND, immediate, final=final, write=write, immediate=immediate_bit, attr=1,
             lun=bytes(8), itt=itt, expected_data_transfer_length=length, cmdsn=ini.cmdsn if cmdsn is None else cmdsn,
             expstatsn=0, cdb=rw10(WRITE10, lba, blocks).ljust(16, b"\0"))
    if cmdsn is None and not immediate_bit:
        ini.cmdsn += 1
    return itt


def data_out(ini, itt: int, data: bytes, offset: int, datasn: int, final: bool, ttt: int = P.RESERVED_TAG) -> None:
    ini.send(Opcode.DATA_OUT, data, final=final, lun=bytes(8), itt=itt, ttt=ttt, expstatsn=0, datasn=datasn,
             buffer_offset=offset)


def answer(ini, itt: int, r2t, data: bytes) -> None:
    """Answer an R2T with ``data`` in PDUs of 256 KiB (the target's MaxRecvDataSegmentLength)."""
    offset, step = r2t.header.buffer_offset, 256 * KIB
    for datasn, start in enumerate(range(0, len(data), step)):
        data_out(ini, itt, data[start:start + step], offset + start, datasn, start + step >= len(data),
                 ttt=r2t.header.ttt)


def read_back(ini, lba: int, length: int) -> bytes:
    ini.command(rw10(READ10, lba, length // 512), read=length)
    return b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN)


def fill(ini, length: int) -> bytes:
    """Known bytes on the volume at LBA 0, to check later that a failed write left them alone."""
    known = os.urandom(length)
    ini.command(rw10(WRITE10, 0, length // 512), write=known, immediate_bytes=0)
    [r2t] = ini.receive()
    data_out(ini, ini.itt, known, 0, 0, True, ttt=r2t.header.ttt)
    assert status_of(ini.receive()) == 0
    return known


def sense_of(response) -> S.SenseCode:
    assert response.opcode == Opcode.SCSI_RESPONSE and response.header.status == CHECK_CONDITION, response
    return S.parse_sense(response.data[2:])


def only_response(replies, itt: int):
    responses = [r for r in replies if r.opcode == Opcode.SCSI_RESPONSE and r.header.itt == itt]
    assert len(responses) == 1, replies
    return responses[0]


def assert_nothing_held(ini) -> None:
    """No write left waiting, and the session's window slots and write-buffer bytes all given back."""
    session = ini.conn.session
    assert not ini.conn._tasks and session.running == 0 and session.write_buffers == 0


# -- F1: overlapping, duplicate or skipping Data-Out --------------------------------------------
def test_duplicate_solicited_data_out_is_refused_and_no_other_tenants_bytes_are_written(clock):
    """§13.18 DataPDUInOrder=Yes: PDUs at continuously increasing addresses, no gaps, no overlays.  A PDU
    again at offset 0 used to count twice, so the write ran with [64K, 128K) never received: what a pooled
    buffer held from tenant A's write went to tenant B's volume.  Now it is rejected (Invalid PDU Field,
    §11.17.1), and the task ends with CHECK CONDITION (§7.3), writing nothing."""
    registry = registry_of(TARGET, TARGET_B)
    a = initiator(clock, registry)
    a.login_normal()
    size = 128 * KIB
    secret = fill(a, size)
    assert registry.buffers.pooled >= size  # A's bytes are in a free pooled buffer
    b = initiator(clock, registry, isid=0x400001370009)
    b.login_normal(extra=[("TargetName", TARGET_B)])
    itt = write_cmd(b, 0, size)
    [r2t] = b.receive()
    mine = b"\xbb" * (64 * KIB)
    data_out(b, itt, mine, 0, 0, False, ttt=r2t.header.ttt)
    data_out(b, itt, mine, 0, 1, True, ttt=r2t.header.ttt)  # offset 0 again: an overlay
    replies = b.receive()
    assert [r.opcode for r in replies] == [Opcode.REJECT, Opcode.SCSI_RESPONSE]
    assert replies[0].header.reason == RejectReason.INVALID_PDU_FIELD
    assert sense_of(replies[1]) == S.DATA_PHASE_ERROR
    on_disk = read_back(b, 0, size)
    assert on_disk == bytes(size) and secret[64 * KIB:] not in on_disk
    assert_nothing_held(b)


def test_unsolicited_data_out_overlapping_the_immediate_data_is_refused(make_initiator):
    """InitialR2T=No: the first unsolicited PDU must start where the immediate data ended (§13.18)."""
    ini = make_initiator()
    ini.login_normal()
    size = 128 * KIB
    known = fill(ini, size)
    mine = b"\xcc" * (64 * KIB)
    itt = write_cmd(ini, 0, size, immediate=mine, final=False)
    assert ini.receive() == []  # the rest of the first burst (FirstBurstLength 256 KiB) comes unsolicited
    data_out(ini, itt, mine, 0, 0, True)  # offset 0 again (should be 64 KiB)
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.REJECT, Opcode.SCSI_RESPONSE]
    assert sense_of(replies[1]) == S.DATA_PHASE_ERROR
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


def test_data_out_past_the_next_offset_is_refused_and_later_pdus_are_dropped_silently(make_initiator):
    """A PDU that skips ahead would leave a hole: refused like an overlay.  The initiator (ERL 0) goes on
    with its sequence: those PDUs are dropped without more Rejects (one per task: libiscsi fails the task
    on the first and takes a Reject it cannot match as a protocol violation), and the F=1 ends the task."""
    ini = make_initiator()
    ini.login_normal()
    size = 256 * KIB
    known = fill(ini, size)
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size)
    [r2t] = ini.receive()
    ttt = r2t.header.ttt
    data_out(ini, itt, payload[64 * KIB:128 * KIB], 64 * KIB, 0, False, ttt=ttt)  # skips [0, 64K)
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD
    data_out(ini, itt, payload[:64 * KIB], 0, 1, False, ttt=ttt)
    data_out(ini, itt, payload[128 * KIB:], 128 * KIB, 2, True, ttt=ttt)
    assert sense_of(only_response(ini.receive(), itt)) == S.DATA_PHASE_ERROR
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


def test_a_write_runs_only_when_every_byte_came_in_order(make_initiator):
    """The common case still runs: immediate data, unsolicited Data-Out, then R2T bursts, all in order and
    placed straight into the task buffer (PDUs of 64 KiB fed in small pieces)."""
    ini = make_initiator()
    ini.login_normal()
    size = 1024 * KIB
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size, immediate=payload[:16 * KIB], final=False)
    for datasn, offset in enumerate(range(16 * KIB, 256 * KIB, 80 * KIB)):
        data_out(ini, itt, payload[offset:offset + 80 * KIB], offset, datasn, offset + 80 * KIB == 256 * KIB)
    [r2t] = ini.receive()
    assert (r2t.header.buffer_offset, r2t.header.desired_data_transfer_length) == (256 * KIB, 768 * KIB)
    for datasn, offset in enumerate(range(256 * KIB, size, 256 * KIB)):
        data_out(ini, itt, payload[offset:offset + 256 * KIB], offset, datasn, offset + 256 * KIB == size,
                 ttt=r2t.header.ttt)
    assert status_of(ini.receive()) == 0
    assert read_back(ini, 0, size) == payload
    assert_nothing_held(ini)


# -- F1 (digest variant) and F4: data digest errors at ErrorRecoveryLevel 0 ---------------------
def _data_out_pdu(itt: int, ttt: int, data: bytes, offset: int, datasn: int, final: bool, corrupt: bool) -> bytes:
    pieces = P.encode_pdu(Opcode.DATA_OUT, data, header_digest=True, data_digest=True, final=final, lun=bytes(8),
                          itt=itt, ttt=ttt, datasn=datasn, buffer_offset=offset)
    raw = bytearray(b"".join(bytes(p) for p in pieces))
    if corrupt:
        raw[48 + 4 + 10] ^= 0xFF  # a payload byte: the data digest no longer matches
    return bytes(raw)


def test_a_rejected_digest_error_payload_never_reaches_the_volume(make_initiator):
    """A directly placed payload lands in the task buffer before its digest is checked.  An overlapping one
    used to be placed over good data and the write then went on GOOD with its bytes.  Now it is never placed
    (not where the sequence goes on); at ERL 0 the write ends with CHECK CONDITION, PROTOCOL SERVICE CRC
    ERROR (§7.8) and the volume keeps what it had.  (The review's repro expected GOOD with the good bytes,
    which only a recovery R2T, ERL 1, could give.)"""
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    size = 128 * KIB
    known = fill(ini, size)
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size)
    [r2t] = ini.receive()
    ttt = r2t.header.ttt
    ini.conn.receive(_data_out_pdu(itt, ttt, payload[:64 * KIB], 0, 0, False, False))
    assert ini.receive() == []
    raw = _data_out_pdu(itt, ttt, os.urandom(64 * KIB), 0, 1, False, True)  # overlapping, bad digest
    ini.conn.receive(raw[:200])  # a header and the start of its payload: the rest would be placed directly
    ini.conn.receive(raw[200:])
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.DATA_DIGEST_ERROR
    ini.conn.receive(_data_out_pdu(itt, ttt, payload[64 * KIB:], 64 * KIB, 1, True, False))
    assert sense_of(only_response(ini.receive(), itt)) == S.PROTOCOL_SERVICE_CRC_ERROR
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


@pytest.mark.parametrize("chunk", [64 * KIB, 8 * KIB], ids=["direct-placed", "whole-in-rx"])
def test_data_digest_error_at_erl0_ends_the_task_with_protocol_service_crc_error(make_initiator, chunk):
    """§7.8: a discarded data PDU is asked for again (recovery R2T: ERL 1) or the task ends with CHECK
    CONDITION, ABORTED COMMAND, 47h/05h once the F=1 of every outstanding R2T came (§11.4.7.2).  The task
    used to wait for ever: the next PDUs (DataSN + 1) were refused one by one, the F=1 too."""
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    assert ini.conn.params.error_recovery_level == 0
    size = 128 * KIB
    known = fill(ini, size)
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size)
    [r2t] = ini.receive()
    replies = []
    for datasn, offset in enumerate(range(0, size, chunk)):
        ini.conn.receive(_data_out_pdu(itt, r2t.header.ttt, payload[offset:offset + chunk], offset, datasn,
                                       offset + chunk == size, datasn == 0))
        replies += ini.receive()
    assert [r.opcode for r in replies] == [Opcode.REJECT, Opcode.SCSI_RESPONSE]
    assert replies[0].header.reason == RejectReason.DATA_DIGEST_ERROR
    response = sense_of(replies[1])
    assert response == S.PROTOCOL_SERVICE_CRC_ERROR and response.key == S.ABORTED_COMMAND
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


def test_data_digest_error_on_the_last_pdu_ends_the_task_at_once(make_initiator):
    """The header of a PDU whose data digest failed is sound (its header digest held): its F=1 ends the
    sequence, so the CHECK CONDITION follows the Reject at once."""
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    size = 32 * KIB
    itt = write_cmd(ini, 0, size)
    [r2t] = ini.receive()
    ini.conn.receive(_data_out_pdu(itt, r2t.header.ttt, os.urandom(size), 0, 0, True, True))
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.REJECT, Opcode.SCSI_RESPONSE]
    assert sense_of(replies[1]) == S.PROTOCOL_SERVICE_CRC_ERROR
    assert_nothing_held(ini)


def test_a_dataSN_out_of_order_is_an_implied_digest_error(make_initiator):
    """§7.9: a Data-Out with an out-of-order DataSN means an earlier one was lost to a digest error: it is
    handled as one (§7.8), ending the task with PROTOCOL SERVICE CRC ERROR."""
    ini = make_initiator()
    ini.login_normal()
    itt = write_cmd(ini, 0, 8 * KIB, immediate=os.urandom(4 * KIB), final=False)
    data_out(ini, itt, os.urandom(4 * KIB), 4 * KIB, 27, True)
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.REJECT, Opcode.SCSI_RESPONSE]
    assert replies[0].header.reason == RejectReason.INVALID_PDU_FIELD
    assert sense_of(replies[1]) == S.PROTOCOL_SERVICE_CRC_ERROR
    assert_nothing_held(ini)


# -- F2: unsolicited Data-Out where none may come ---------------------------------------------
@pytest.mark.parametrize("initial_r2t", ["Yes", "No"], ids=["InitialR2T=Yes", "command F=1"])
def test_unsolicited_data_out_where_none_may_come_is_refused(make_initiator, initial_r2t):
    """§13.10 InitialR2T=Yes: the initiator MUST NOT send unsolicited Data-Out; §11.3.1: F=1 on a write
    command says none follows.  Such a PDU used to be taken if it lay within the immediate data (overwriting
    it, counted twice).  Now: Reject (Protocol Error), nothing written, and the task ends with CHECK
    CONDITION, "Unexpected unsolicited data" (ABORTED COMMAND, 0Ch/0Ch, §11.4.7.2) once its R2T is answered."""
    ini = make_initiator()
    ini.login_normal(extra=[("InitialR2T", initial_r2t)])
    assert ini.conn.params.initial_r2t is (initial_r2t == "Yes")
    size = 128 * KIB
    known = fill(ini, size)
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size, immediate=payload[:64 * KIB], final=True)
    [r2t] = ini.receive()
    assert r2t.opcode == Opcode.R2T and r2t.header.buffer_offset == 64 * KIB
    data_out(ini, itt, b"\xee" * (64 * KIB), 0, 0, True)  # unsolicited: must not be taken
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.PROTOCOL_ERROR
    data_out(ini, itt, payload[64 * KIB:], 64 * KIB, 0, True, ttt=r2t.header.ttt)  # the R2T, answered in full
    assert sense_of(only_response(ini.receive(), itt)) == S.UNEXPECTED_UNSOLICITED_DATA
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


def test_unsolicited_data_out_after_the_first_burst_ended_is_refused(make_initiator):
    """F=1 ended the unsolicited sequence (§11.7.1): more unsolicited data is unexpected."""
    ini = make_initiator()
    ini.login_normal()
    size = 16 * KIB
    known = fill(ini, size)
    payload = os.urandom(size)
    itt = write_cmd(ini, 0, size, immediate=payload[:4 * KIB], final=False)
    data_out(ini, itt, payload[4 * KIB:8 * KIB], 4 * KIB, 0, True)  # ends the first burst early
    [gap] = ini.receive()
    assert gap.opcode == Opcode.R2T and gap.header.buffer_offset == 8 * KIB
    data_out(ini, itt, payload[8 * KIB:], 8 * KIB, 1, True)  # unsolicited again
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.PROTOCOL_ERROR
    data_out(ini, itt, payload[8 * KIB:], 8 * KIB, 0, True, ttt=gap.header.ttt)
    assert sense_of(only_response(ini.receive(), itt)) == S.UNEXPECTED_UNSOLICITED_DATA
    assert read_back(ini, 0, size) == known


# -- F3: an R2T answered short -----------------------------------------------------------------
def test_short_answer_to_an_r2t_ends_the_task_with_incorrect_amount_of_data(make_initiator):
    """F=1 before an R2T's length (§11.7.1) used to leave the task waiting for ever, holding its buffer.  The
    rest can never come at ERL 0: CHECK CONDITION, "Incorrect amount of data" (ABORTED COMMAND, 0Ch/0Dh,
    §11.4.7.2), nothing written."""
    ini = make_initiator()
    ini.login_normal()
    size = 128 * KIB
    known = fill(ini, size)
    itt = write_cmd(ini, 0, size)
    [r2t] = ini.receive()
    assert r2t.header.desired_data_transfer_length == size
    data_out(ini, itt, os.urandom(64 * KIB), 0, 0, True, ttt=r2t.header.ttt)  # 64 of 128 KiB, F=1
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.SCSI_RESPONSE]
    assert sense_of(replies[0]) == S.INCORRECT_AMOUNT_OF_DATA
    assert read_back(ini, 0, size) == known
    assert_nothing_held(ini)


# -- F5: unsolicited data of a command held for CmdSN order ------------------------------------
def test_unsolicited_data_of_a_command_held_behind_a_cmdsn_gap_is_kept(make_initiator):
    """Unsolicited Data-Out is sent right behind its command whatever its CmdSN (§3.2.4.2).  It used to be
    rejected while the command waited in the CmdSN queue, and the write then waited for ever for a first
    burst that had come and gone.  Now the write's task is made when the command is held: its data is taken,
    nothing runs or is solicited before the gap fills, then it runs."""
    ini = make_initiator()
    ini.login_normal()
    gap = ini.cmdsn
    payload = os.urandom(512 * KIB)
    itt = write_cmd(ini, 0, len(payload), immediate=payload[:4 * KIB], final=False, cmdsn=gap + 1)
    data_out(ini, itt, payload[4 * KIB:256 * KIB], 4 * KIB, 0, True)
    assert ini.receive() == []  # held: no R2T, no answer yet
    assert ini.conn.session.running == 0  # no window slot before its CmdSN comes up
    ini.command(bytes(6), cmdsn=gap)  # the missing CmdSN: TEST UNIT READY
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.SCSI_RESPONSE, Opcode.R2T]
    [r2t] = replies[1:]
    assert (r2t.header.buffer_offset, r2t.header.desired_data_transfer_length) == (256 * KIB, 256 * KIB)
    data_out(ini, itt, payload[256 * KIB:], 256 * KIB, 0, True, ttt=r2t.header.ttt)
    assert status_of(ini.receive()) == 0
    ini.cmdsn = gap + 2
    assert read_back(ini, 0, len(payload)) == payload
    assert_nothing_held(ini)


def test_a_held_write_whose_data_all_came_runs_when_its_cmdsn_comes_up(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    gap = ini.cmdsn
    payload = os.urandom(8 * KIB)
    itt = write_cmd(ini, 0, len(payload), immediate=payload[:4 * KIB], final=False, cmdsn=gap + 1)
    data_out(ini, itt, payload[4 * KIB:], 4 * KIB, 0, True)
    assert ini.receive() == []
    ini.command(bytes(6), cmdsn=gap)
    replies = ini.receive()
    assert [r.header.itt for r in replies if r.opcode == Opcode.SCSI_RESPONSE][-1] == itt
    assert status_of(replies) == 0
    ini.cmdsn = gap + 2
    assert read_back(ini, 0, len(payload)) == payload
    assert_nothing_held(ini)


def test_abort_task_of_a_held_write_keeps_its_cmdsn_and_the_commands_behind_it(make_initiator):
    """ABORT TASK of a command held behind a gap: it never runs, but its CmdSN was received and must still
    be passed in order; the pending entry used to be deleted, leaving a gap nothing could fill."""
    ini = make_initiator()
    ini.login_normal()
    gap = ini.cmdsn
    held = write_cmd(ini, 0, 8 * KIB, immediate=os.urandom(4 * KIB), final=False, cmdsn=gap + 1)
    behind = ini.command(rw10(READ10, 0, 1), read=512, cmdsn=gap + 2)
    assert ini.receive() == []
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=held, cmdsn=gap, refcmdsn=gap + 1)
    [tmf] = ini.receive()
    assert tmf.opcode == Opcode.TASK_MGMT_RESPONSE and tmf.header.response == 0
    data_out(ini, held, os.urandom(4 * KIB), 4 * KIB, 0, True)  # its announced data, late: dropped, nothing runs
    assert ini.receive() == []
    ini.command(bytes(6), cmdsn=gap)  # fills the gap: the READ behind the aborted write runs
    replies = ini.receive()
    assert {r.header.itt for r in replies if r.opcode in (Opcode.SCSI_RESPONSE, Opcode.DATA_IN)} >= {behind}
    assert held not in {r.header.itt for r in replies}
    assert ini.conn.session.expcmdsn == gap + 3 and not ini.conn.session.pending
    assert_nothing_held(ini)


# -- F6: writes waiting for Data-Out are bounded ---------------------------------------------------
def test_writes_waiting_for_data_out_keep_their_cmdsn_window_slot(clock):
    """Each such write holds a buffer of its EDTL; they used to leave the CmdSN window open, so 48-byte
    commands could allocate 64 MiB each without end.  Now each keeps its slot until it ends (§3.2.2.1, as
    LIO and tgt do): after ``window`` of them MaxCmdSN = ExpCmdSN - 1, and a command past it is ignored
    (§4.2.2.1) without allocating anything.  (The review's repro sent 12 commands into a window of 4 and
    expected an R2T for each, which no bound allows.)"""
    window = 4
    ini = initiator(clock, registry_of(TARGET, command_window=window))
    ini.login_normal()
    edtl = 1024 * KIB
    r2ts = []
    for _ in range(window):
        write_cmd(ini, 0, edtl)
        [r2t] = ini.receive()
        assert r2t.opcode == Opcode.R2T
        r2ts.append(r2t)
    last = r2ts[-1].header
    assert last.maxcmdsn == (last.expcmdsn - 1) & 0xFFFFFFFF  # closed
    session = ini.conn.session
    assert session.running == window and session.write_buffers == window * edtl
    write_cmd(ini, 0, edtl)  # past MaxCmdSN: ignored
    assert ini.receive() == [] and len(ini.conn._tasks) == window
    ini.cmdsn -= 1
    answer(ini, r2ts[0].header.itt, r2ts[0], os.urandom(edtl))
    [done] = ini.receive()
    assert done.header.status == 0 and done.header.maxcmdsn == done.header.expcmdsn  # one slot open again
    assert session.running == window - 1 and session.write_buffers == (window - 1) * edtl


def test_write_buffers_past_the_session_budget_end_with_task_set_full(clock):
    """The window bounds their number, ``max_session_write_buffers`` their bytes (128 writes of 64 MiB would
    still be 8 GiB).  A write past it ends at once with TASK SET FULL (SAM-5 §5.3.1), which initiators retry;
    the unsolicited data it announced is dropped silently."""
    mib = 1024 * KIB
    ini = initiator(clock, config=ConnectionSettings(max_session_write_buffers=2 * mib))
    ini.login_normal()
    a = write_cmd(ini, 0, mib)
    [r2t_a] = ini.receive()
    write_cmd(ini, 0, mib)
    [_] = ini.receive()
    full = write_cmd(ini, 0, mib, immediate=os.urandom(4 * KIB), final=False)
    [refused] = ini.receive()
    assert refused.opcode == Opcode.SCSI_RESPONSE and refused.header.itt == full
    assert refused.header.status == TASK_SET_FULL
    data_out(ini, full, os.urandom(64 * KIB), 4 * KIB, 0, True)  # its unsolicited data: dropped
    assert ini.receive() == []
    assert ini.conn.session.write_buffers == 2 * mib
    answer(ini, a, r2t_a, os.urandom(mib))
    assert status_of(ini.receive()) == 0
    write_cmd(ini, 0, mib)  # room again
    assert [r.opcode for r in ini.receive()] == [Opcode.R2T]


def test_immediate_write_commands_cannot_pile_up_tasks(clock):
    """Immediate commands take no window slot: waiting writes past twice the window end with TASK SET FULL."""
    window = 4
    ini = initiator(clock, registry_of(TARGET, command_window=window))
    ini.login_normal()
    statuses = []
    for _ in range(3 * window):
        write_cmd(ini, 0, 64 * KIB, immediate_bit=True)
        statuses += [r.header.status if r.opcode == Opcode.SCSI_RESPONSE else "R2T" for r in ini.receive()]
    assert statuses == ["R2T"] * (2 * window) + [TASK_SET_FULL] * window
    assert len(ini.conn._tasks) == 2 * window


# -- F7: a WRITE without the W bit -------------------------------------------------------------
def test_write_without_the_w_bit_and_a_length_is_refused(make_initiator):
    """§11.3.1: W MUST be 1 when data is expected.  Such a WRITE(10) used to be answered GOOD with no
    residual although nothing was received or written: now CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD
    IN COMMAND INFORMATION UNIT (what LIO answers a WRITE whose transfer does not fit its CDB)."""
    ini = make_initiator()
    ini.login_normal()
    known = os.urandom(4 * KIB)
    write_cmd(ini, 0, len(known), immediate=known)
    assert status_of(ini.receive()) == 0
    itt = write_cmd(ini, 0, len(known), write=False)
    [response] = ini.receive()
    assert response.header.itt == itt
    assert sense_of(response) == S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    assert read_back(ini, 0, len(known)) == known


def test_write_without_the_w_bit_and_no_length_is_a_transfer_of_nothing(make_initiator):
    """With EDTL 0, R and W may both be 0 (§11.3.1): answered as with W=1 and EDTL 0 (libiscsi's
    iSCSIResiduals): GOOD, nothing written, the residual overflow says so."""
    ini = make_initiator()
    ini.login_normal()
    known = fill(ini, 4 * KIB)
    for w_bit in (False, True):
        write_cmd(ini, 0, 0, write=w_bit, blocks=8)
        [response] = ini.receive()
        assert response.header.status == 0 and response.header.overflow
        assert response.header.residual_count == 4 * KIB
    assert read_back(ini, 0, 4 * KIB) == known


# -- F8: ABORT TASK of a command never received ---------------------------------------------------
def test_abort_task_of_a_lost_command_fills_the_cmdsn_gap(make_initiator):
    """§11.5.1 b): the Referenced Task Tag names no task but RefCmdSN is in the window and before the
    request's CmdSN: the target considers that CmdSN received and answers Function complete.  The gap used
    to stay, and every command held behind it with it."""
    ini = make_initiator()
    ini.login_normal()
    lost = ini.cmdsn  # this command's PDU never arrived (e.g. discarded for a data digest error)
    payload = os.urandom(4 * KIB)
    itt = write_cmd(ini, 0, len(payload), immediate=payload, cmdsn=lost + 1)
    assert ini.receive() == []  # held behind the gap
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=0x7777, cmdsn=lost + 2, refcmdsn=lost)
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.TASK_MGMT_RESPONSE, Opcode.SCSI_RESPONSE]
    assert replies[0].header.response == 0 and replies[1].header.itt == itt and replies[1].header.status == 0
    assert ini.conn.session.expcmdsn == lost + 2
    ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4 * KIB), cmdsn=lost)  # the lost one, late: a duplicate
    assert ini.receive() == []
    ini.cmdsn = lost + 2
    assert read_back(ini, 0, len(payload)) == payload


def test_abort_task_of_a_lost_command_further_ahead_is_passed_in_order(make_initiator):
    """RefCmdSN after another gap: it is marked received and passed once the earlier gap fills."""
    ini = make_initiator()
    ini.login_normal()
    first = ini.cmdsn
    behind = ini.command(bytes(6), cmdsn=first + 2)
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=0x7777, cmdsn=first + 3, refcmdsn=first + 1)
    assert [(r.opcode, r.header.response) for r in ini.receive()] == [(Opcode.TASK_MGMT_RESPONSE, 0)]
    ini.command(bytes(6), cmdsn=first)
    replies = ini.receive()
    assert [r.header.itt for r in replies if r.opcode == Opcode.SCSI_RESPONSE][-1] == behind
    assert ini.conn.session.expcmdsn == first + 3 and not ini.conn.session.pending


# -- the review's other notes ------------------------------------------------------------------
def test_data_out_with_a_ttt_the_target_never_gave_is_an_invalid_pdu_field(make_initiator):
    """§11.17.1: Invalid PDU Field is the reason for invalid fields describing a data transfer (a TTT, a
    buffer offset); it used to be Protocol Error when the ITT was known."""
    ini = make_initiator()
    ini.login_normal()
    itt = write_cmd(ini, 0, 8 * KIB)
    [r2t] = ini.receive()
    data_out(ini, itt, os.urandom(8 * KIB), 0, 0, True, ttt=r2t.header.ttt + 1000)
    replies = ini.receive()
    assert replies[0].opcode == Opcode.REJECT and replies[0].header.reason == RejectReason.INVALID_PDU_FIELD


def test_tags_of_ended_writes_kept_to_drop_their_data_are_bounded(make_initiator):
    """A write refused when it comes (here: EDTL past ``max_write_buffer``) with unsolicited data announced
    is answered at once and its tag kept, to drop that data silently; an initiator that never sends it used
    to grow that set without end."""
    ini = make_initiator()
    ini.login_normal()
    for _ in range(1000):
        itt = write_cmd(ini, 0, 128 * 1024 * KIB, immediate=os.urandom(512), final=False)
        [response] = ini.receive()
        assert response.header.itt == itt and sense_of(response) == S.INVALID_FIELD_IN_CDB
    assert len(ini.conn._dead_itts) <= 256
    data_out(ini, itt, os.urandom(512), 512, 0, True)  # the last one's data: still dropped silently
    assert ini.receive() == []
    assert_nothing_held(ini)


def test_a_held_write_past_the_budget_ends_with_task_set_full_when_its_cmdsn_comes_up(clock):
    """A write held for CmdSN order that would pass the session's budget gets no buffer: its unsolicited
    data is dropped silently, and it ends with TASK SET FULL in CmdSN order, not before."""
    mib = 1024 * KIB
    ini = initiator(clock, config=ConnectionSettings(max_session_write_buffers=mib))
    ini.login_normal()
    gap = ini.cmdsn
    first = write_cmd(ini, 0, mib, cmdsn=gap + 1, immediate=os.urandom(4 * KIB), final=False)
    second = write_cmd(ini, 0, mib, cmdsn=gap + 2, immediate=os.urandom(4 * KIB), final=False)
    data_out(ini, second, os.urandom(64 * KIB), 4 * KIB, 0, True)
    assert ini.receive() == []
    ini.command(bytes(6), cmdsn=gap)
    replies = ini.receive()
    full = only_response(replies, second)
    assert full.header.status == TASK_SET_FULL
    assert first not in {r.header.itt for r in replies if r.opcode == Opcode.SCSI_RESPONSE}
    assert ini.conn.session.write_buffers == mib and ini.conn.session.running == 1
