"""The target's full feature phase against a hostile or careless initiator, from a review against RFC 7143 (each
case was reproduced first against a real ``shoal target``).

- A task management function acts on every task with a lower CmdSN (§11.5.1), also one held behind a CmdSN
  gap: ABORT TASK SET / CLEAR TASK SET / LOGICAL UNIT RESET answered at once while such a WRITE waited, and it
  ran (and landed) when the gap closed.
- A write command with large immediate data is given its EDTL-sized buffer (direct placement) only when it
  runs now: held behind a gap, or dropped outside the window, 127 of them (16 KiB sent each, EDTL 64 MiB)
  held 8 GiB, and 300 out-of-window ones cost 5 s of CPU.
- Immediate commands take no window slot: as many may run as the window lets ordinary ones, then Reject
  "too many immediate commands" (§11.17.1); 2000 of them on a slow LUN held 500 MiB.
- Write buffers of all the portal's sessions together are bounded (``max_portal_write_buffers``): 24 sessions,
  each within its own bound, held 3 GiB.
- Data-Out the initiator still sends for a write aborted by ABORT TASK or a task set function (it answers its
  outstanding R2Ts, §11.5.1) is dropped silently, not rejected as for no task (libiscsi takes a Reject it
  cannot match for a protocol violation).
"""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.pdu import Opcode, RejectReason
from tests.protocol.conftest import TARGET, FakeClock, Initiator, make_registry
from tests.protocol.test_target_core import WRITE10, rw10

TASK_SET_FULL = 0x28


def initiator(registry, config: ConnectionSettings | None = None, **kwargs) -> Initiator:
    conn = TargetConnection(registry, TargetSettings(), local_address=("127.0.0.1", 3260), peer="test",
                            config=config or ConnectionSettings(), clock=FakeClock())
    return Initiator(conn, **kwargs)


def tmf(ini: Initiator, function: int, *, cmdsn: int, referenced: int = P.RESERVED_TAG):
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=function, lun=bytes(8),
             itt=ini.next_itt(), referenced_task_tag=referenced, cmdsn=cmdsn, refcmdsn=0)
    return ini.receive()


@pytest.mark.parametrize("function", [2, 4, 5], ids=["abort task set", "clear task set", "logical unit reset"])
def test_a_task_set_function_aborts_a_write_held_behind_a_cmdsn_gap(function):
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    before = bytes(unit.backing.read(100 * 512, 512))
    gap = ini.cmdsn
    itt = ini.command(rw10(WRITE10, 100, 1), write=b"W" * 512, cmdsn=gap + 1)  # all its data immediate
    assert ini.receive() == [] and gap + 1 in ini.conn.session.pending
    [answer] = tmf(ini, function, cmdsn=gap + 2)
    assert answer.header.response == 0
    ini.send(Opcode.NOP_OUT, final=True, lun=bytes(8), itt=ini.next_itt(), ttt=P.RESERVED_TAG, cmdsn=gap,
             expstatsn=0)  # the gap closes
    replies = ini.receive()
    assert [r.opcode for r in replies] == [Opcode.NOP_IN]  # nothing for the aborted WRITE
    assert not ini.conn.session.pending and ini.conn.session.expcmdsn == gap + 2
    assert bytes(unit.backing.read(100 * 512, 512)) == before, "the aborted WRITE landed"
    assert itt not in ini.conn._running


def test_large_immediate_data_gets_its_buffer_only_when_the_command_runs_now():
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    conn = ini.conn
    payload = os.urandom(32 * 1024)
    for cmdsn in (ini.cmdsn + 1, ini.cmdsn + 100000):  # behind a gap; far outside the window
        pieces = P.encode_pdu(Opcode.SCSI_COMMAND, payload, header_digest=False, data_digest=False, final=True,
                              write=True, attr=1, lun=bytes(8), itt=ini.next_itt(),
                              expected_data_transfer_length=64 << 20, cmdsn=cmdsn, expstatsn=0,
                              cdb=rw10(WRITE10, 0, 8).ljust(16, b"\0"))
        raw = b"".join(bytes(p) for p in pieces)
        conn.receive(raw[:48 + 1024])  # the header and a little of its data: where would the rest go?
        assert conn._sink is None and conn._trailer is None, "an EDTL-sized buffer before the CmdSN check"
        conn.receive(raw[48 + 1024:])
    assert ini.receive() == [] and registry.write_buffers == 0
    # the next command in order still gets its data placed straight into its buffer
    pieces = P.encode_pdu(Opcode.SCSI_COMMAND, payload, header_digest=False, data_digest=False, final=True,
                          write=True, attr=1, lun=bytes(8), itt=ini.next_itt(), expected_data_transfer_length=len(payload),
                          cmdsn=ini.cmdsn, expstatsn=0, cdb=rw10(WRITE10, 0, 64).ljust(16, b"\0"))
    raw = b"".join(bytes(p) for p in pieces)
    conn.receive(raw[:48 + 1024])
    assert conn._sink is not None
    conn.receive(raw[48 + 1024:])


def test_immediate_commands_beyond_the_window_are_rejected():
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    conn = ini.conn
    window = conn.session.command_window

    class Blocked:  # a running command whose I/O has not ended (a slow disk), taking no window slot
        counted = False

    for number in range(window):
        conn._running[0x9000 + number] = Blocked()
    itt = ini.next_itt()
    ini.send(Opcode.SCSI_COMMAND, b"", final=True, immediate=True, attr=1, lun=bytes(8), itt=itt,
             expected_data_transfer_length=0, cmdsn=ini.cmdsn, expstatsn=0, cdb=bytes(16))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.IMMEDIATE_COMMAND_REJECT
    conn._running.pop(0x9000)
    ini.send(Opcode.SCSI_COMMAND, b"", final=True, immediate=True, attr=1, lun=bytes(8), itt=ini.next_itt(),
             expected_data_transfer_length=0, cmdsn=ini.cmdsn, expstatsn=0, cdb=bytes(16))
    assert [r.opcode for r in ini.receive()] == [Opcode.SCSI_RESPONSE]
    conn._running.clear()


def test_the_portals_sessions_share_one_bound_on_write_buffers():
    registry = make_registry()
    config = ConnectionSettings(max_session_write_buffers=64 << 20, max_portal_write_buffers=40 << 20)
    sessions = [initiator(registry, config, isid=0x400001370100 + n) for n in range(3)]
    statuses = []
    for ini in sessions:
        ini.login_normal()
        ini.command(rw10(WRITE10, 0, 16 << 11), write=bytes(16 << 20), immediate_bytes=0)  # 16 MiB, data to come
        statuses.append([(r.opcode, getattr(r.header, "status", None)) for r in ini.receive()])
    assert statuses[:2] == [[(Opcode.R2T, None)]] * 2  # 32 MiB held by two sessions
    assert statuses[2] == [(Opcode.SCSI_RESPONSE, TASK_SET_FULL)]  # a third would pass 40 MiB
    assert registry.write_buffers == 32 << 20
    sessions[0].conn.connection_lost()
    assert registry.write_buffers == 16 << 20


@pytest.mark.parametrize("function", [1, 2], ids=["abort task", "abort task set"])
def test_data_out_owed_for_an_aborted_write_is_dropped_silently(function):
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    before = bytes(unit.backing.read(0, 4096))
    itt = ini.command(rw10(WRITE10, 0, 8), write=os.urandom(4096), immediate_bytes=0)
    [r2t] = ini.receive()
    ini.send(Opcode.DATA_OUT, b"x" * 1024, final=False, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=0,
             buffer_offset=0)
    [answer] = tmf(ini, function, cmdsn=ini.cmdsn, referenced=itt)
    assert answer.header.response == 0
    ini.send(Opcode.DATA_OUT, b"x" * 3072, final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=1,
             buffer_offset=1024)  # the rest of the burst, as the initiator owes it
    assert ini.receive() == []  # no Reject, no response
    assert bytes(unit.backing.read(0, 4096)) == before
    ini.send(Opcode.DATA_OUT, b"y" * 512, final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=2,
             buffer_offset=0)  # past the end of what was owed: rejected again
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD
