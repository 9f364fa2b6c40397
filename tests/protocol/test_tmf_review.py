"""Task management, SendTargets and NOP-In, from a review against RFC 7143 (each case was reproduced first).

- LOGICAL UNIT RESET, CLEAR TASK SET and TARGET WARM RESET from one session left another session's tasks
  running: a WRITE waiting for its Data-Out when the reset answered "Function complete" still landed after it.
  They end every session's tasks to the unit (SAM-5: a reset aborts all tasks; the control mode page's TST is
  000b, one task set for all initiators), each with TASK ABORTED; ABORT TASK SET stays with its own I_T nexus.
- ABORT TASK SET and CLEAR TASK SET on a LUN that does not exist answer "LUN does not exist" (§11.6.1).
- SendTargets=All is refused on a Normal session (Appendix C: "MUST NOT be supported on an operational
  session"); an empty value (the session's own target) is still answered.
- The NOP-In echoing ping data carries at most the initiator's MaxRecvDataSegmentLength (§11.18.5).
"""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.keys import TargetSettings, parse_text
from node_agent.iscsi.pdu import Opcode
from tests.protocol.conftest import TARGET, FakeClock, Initiator, make_registry
from tests.protocol.test_target_core import WRITE10, rw10

TASK_ABORTED = 0x40
LUN_DOES_NOT_EXIST = 2


def initiator(registry, **kwargs) -> Initiator:
    conn = TargetConnection(registry, TargetSettings(), local_address=("127.0.0.1", 3260), peer="test",
                            config=ConnectionSettings(), clock=FakeClock())
    return Initiator(conn, **kwargs)


def tmf(ini: Initiator, function: int, lun: int = 0):
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=function, lun=bytes([0, lun]) + bytes(6),
             itt=ini.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=ini.cmdsn, refcmdsn=0)
    return ini.receive()


@pytest.mark.parametrize("function, name", [(2, "abort task set"), (4, "clear task set"),
                                            (5, "logical unit reset"), (6, "target warm reset")])
def test_a_reset_from_another_session_ends_a_write_waiting_for_its_data(function, name):
    registry = make_registry()
    a, b = initiator(registry), initiator(registry, isid=0x400001370009)
    a.login_normal()
    b.login_normal()
    unit = registry.targets[TARGET].luns.luns[0]
    before = bytes(unit.backing.read(0, 2048))
    payload = os.urandom(2048)
    itt = a.command(rw10(WRITE10, 0, 4), write=payload, immediate_bytes=0)  # waits for its Data-Out
    [r2t] = a.receive()
    assert r2t.opcode == Opcode.R2T
    [answer] = tmf(b, function)
    assert answer.header.response == 0, name
    received = a.receive()
    if function == 2:  # ABORT TASK SET: only the issuing I_T nexus's tasks (SAM-5 §7.2)
        assert received == [] and itt in a.conn._tasks
        return
    assert [(r.header.itt, r.header.status) for r in received] == [(itt, TASK_ABORTED)], name
    a.send(Opcode.DATA_OUT, payload, final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=0,
           buffer_offset=0)
    assert not [r for r in a.receive() if r.opcode == Opcode.SCSI_RESPONSE], "the aborted WRITE answered again"
    assert bytes(unit.backing.read(0, 2048)) == before, f"{name}: the aborted WRITE landed"


@pytest.mark.parametrize("function", [2, 4, 5])  # ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
def test_task_set_functions_on_an_absent_lun_say_so(function):
    ini = initiator(make_registry())
    ini.login_normal()
    [answer] = tmf(ini, function, lun=9)
    assert answer.header.response == LUN_DOES_NOT_EXIST


def test_send_targets_all_is_refused_on_a_normal_session_and_answered_on_discovery():
    registry = make_registry()
    ini = initiator(registry)
    ini.login_normal()
    for value, expected in ((b"All", [("SendTargets", "Reject")]), (b"", None)):
        ini.send(Opcode.TEXT_REQUEST, b"SendTargets=" + value + b"\0", final=True, itt=ini.next_itt(),
                 ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn, expstatsn=0)
        ini.cmdsn += 1
        [reply] = ini.receive()
        pairs = parse_text(reply.data)
        if expected is not None:
            assert pairs == expected
        else:  # the session's own target
            assert ("TargetName", TARGET) in pairs
    discovery = initiator(registry)
    reply = discovery.login([("InitiatorName", "iqn.2026-11.io.shoal.test:init"), ("SessionType", "Discovery"),
                             ("HeaderDigest", "None"), ("DataDigest", "None")])
    assert reply.header.status_class == 0
    discovery.send(Opcode.TEXT_REQUEST, b"SendTargets=All\0", final=True, itt=discovery.next_itt(),
                   ttt=P.RESERVED_TAG, cmdsn=discovery.cmdsn, expstatsn=0)
    [reply] = discovery.receive()
    assert ("TargetName", TARGET) in parse_text(reply.data)


def test_a_ping_is_echoed_within_the_initiators_receive_limit():
    ini = initiator(make_registry())
    ini.login_normal([("MaxRecvDataSegmentLength", "512")])
    ping = bytes(range(256)) * 16  # 4096 bytes: within the target's limit, beyond the initiator's
    ini.send(Opcode.NOP_OUT, ping, final=True, immediate=True, lun=bytes(8), itt=ini.next_itt(), ttt=P.RESERVED_TAG,
             cmdsn=ini.cmdsn, expstatsn=0)
    [nop_in] = ini.receive()
    assert nop_in.opcode == Opcode.NOP_IN and nop_in.data == ping[:512]
