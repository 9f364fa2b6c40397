"""The initiator's per-I/O shortcuts agree with the definitions they shortcut.

Data-Out headers are packed, and Data-In and SCSI Response headers read, with
precompiled structs (node_agent/iscsi/initiator/core.py);
``pdu.LAYOUTS`` stays the definition of every field (RFC 7143 §11.3, §11.4,
§11.7), so each struct is checked against it here.  ``_Slots`` replaces an
``asyncio.Semaphore`` for the queue depth: its hand-over and cancellation rules
are checked on a real event loop.
"""

from __future__ import annotations

import asyncio

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.initiator.client import _Slots
from node_agent.iscsi.pdu import Opcode

LUN = bytes([0, 5, 0, 0, 0, 0, 0, 0])


def test_data_out_struct_matches_the_layout():
    raw = C._DATA_OUT.pack(C._OP_DATA_OUT, 0x80, 0, 262144, LUN, 7, 0x1234, 0, 55, 0, 3, 786432, 0)
    assert bytes(raw) == bytes(P.encode_header(Opcode.DATA_OUT, final=1, data_segment_length=262144, lun=LUN,
                                               itt=7, ttt=0x1234, expstatsn=55, datasn=3, buffer_offset=786432))


def test_data_in_fields_read_by_the_struct():
    raw = P.encode_header(Opcode.DATA_IN, final=1, overflow=0, underflow=1, status_present=1, status=2,
                          data_segment_length=4096, lun=LUN, itt=11, ttt=P.RESERVED_TAG, statsn=21,
                          expcmdsn=31, maxcmdsn=41, datasn=5, buffer_offset=20480, residual_count=512)
    (op, flags, _, status, lengths, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, datasn, offset,
     residual) = C._TARGET_BHS.unpack_from(raw)
    assert op & 0x3F == C._DATA_IN and flags == 0x80 | 0x02 | 0x01 and status == 2
    assert (lengths, lun, itt, ttt) == (4096, LUN, 11, P.RESERVED_TAG)
    assert (statsn, expcmdsn, maxcmdsn, datasn, offset, residual) == (21, 31, 41, 5, 20480, 512)


def test_scsi_response_fields_read_by_the_struct():
    raw = P.encode_header(Opcode.SCSI_RESPONSE, final=1, overflow=1, response=1, status=0x02,
                          data_segment_length=20, itt=12, statsn=22, expcmdsn=32, maxcmdsn=42, expdatasn=6,
                          bidi_residual_count=0, residual_count=1024)
    (op, flags, response, status, lengths, _, itt, _, statsn, expcmdsn, maxcmdsn, expdatasn, _,
     residual) = C._TARGET_BHS.unpack_from(raw)
    assert op & 0x3F == C._SCSI_RESPONSE and flags == 0x80 | 0x04 and (response, status) == (1, 2)
    assert (lengths, itt, statsn, expcmdsn, maxcmdsn, expdatasn, residual) == (20, 12, 22, 32, 42, 6, 1024)


@pytest.mark.parametrize("expcmdsn, maxcmdsn, taken", [
    (10, 41, True), (10, 9, True),  # MaxCmdSN = ExpCmdSN - 1: a closed window, still valid
    (10, 8, False),  # MaxCmdSN < ExpCmdSN - 1: ignored (RFC 7143 §4.2.2.1)
    (0xFFFFFFF0, 5, True),  # across the wrap
    (0, 0xFFFFFFFF, True), (1, 0xFFFFFFFF, False),
])
def test_window_update_rule_in_serial_arithmetic(expcmdsn, maxcmdsn, taken):
    from node_agent.iscsi.serial import sn_add, sn_le
    assert sn_le(sn_add(expcmdsn, -1), maxcmdsn) == taken
    assert ((maxcmdsn - expcmdsn + 1) & C._SN_MASK < C._SN_HALF) == taken


def test_slots_hand_over_in_order_and_survive_cancellation():
    async def scenario():
        slots = _Slots(1)
        slots.free -= 1  # taken
        order = []

        async def waiter(name):
            await slots.wait()
            order.append(name)

        first = asyncio.ensure_future(waiter("first"))
        second = asyncio.ensure_future(waiter("second"))
        third = asyncio.ensure_future(waiter("third"))
        await asyncio.sleep(0)
        first.cancel()  # cancelled while waiting: the slot must skip it
        await asyncio.sleep(0)
        slots.release()  # -> second
        await asyncio.sleep(0)
        assert order == ["second"] and slots.free == 0
        slots.release()  # -> third, which is cancelled before it runs: the slot is passed on, not lost
        third.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)
        assert order == ["second"] and slots.free == 1
        slots.free -= 1
        slots.release()  # nobody waits: back to the counter
        assert slots.free == 1

    asyncio.run(scenario())
