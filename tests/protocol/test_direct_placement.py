"""Large write payloads are received straight into the write task's buffer, with every check kept.

Issue 7 (1 MiB writes): QEMU sends a 1 MiB WRITE as a SCSI Command with
256 KiB of immediate data and three solicited Data-Out PDUs of 256 KiB.  The
core places the immediate data of such a command directly into a pooled
buffer that becomes the write task's (no copy out of the receive buffer, no
second copy into the task), and after each directly received payload offers
the transport only the trailer and the next header, so that the next large
payload is placed directly too.  These tests feed a real ``TargetConnection``
the way the transport does (``receive`` offers the bytes through
``get_buffer``/``buffer_updated`` as a socket with everything queued would)
and check the placement, the answers, the data on the medium, and that
digests, ordering and the immediate-data limits are still enforced.
"""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.pdu import Opcode, RejectReason
from tests.protocol.test_target_core import READ10, WRITE10, rw10, status_of

KIB = 1024


def _pdu(ini, opcode, data=b"", **fields) -> bytes:
    pieces = P.encode_pdu(opcode, data, header_digest=ini.header_digest, data_digest=ini.data_digest, **fields)
    return b"".join(bytes(p) for p in pieces)


def _command(ini, itt: int, cmdsn: int, lba: int, payload: bytes, immediate: int) -> bytes:
    return _pdu(ini, Opcode.SCSI_COMMAND, payload[:immediate], final=True, write=True, attr=1, lun=bytes(8),
                itt=itt, expected_data_transfer_length=len(payload), cmdsn=cmdsn, expstatsn=0,
                cdb=rw10(WRITE10, lba, len(payload) // 512).ljust(16, b"\0"))


def _count_copied_data_outs(conn) -> list[int]:
    """Lengths of the Data-Out payloads that arrived whole in the receive buffer (and were copied)."""
    copied: list[int] = []
    original = conn._data_out

    def data_out(header, data, raw):
        copied.append(len(data))
        original(header, data, raw)
    conn._data_out = data_out  # the core calls it through the instance
    return copied


def _scatter_receive(conn, data: bytes) -> None:
    """What the transport does (server.py ``_on_readable``) with a socket holding ``data``: one
    ``recvmsg_into`` over ``get_buffers()`` while a payload is being placed, else ``recv_into``."""
    view = memoryview(data)
    while view and not conn.closing:
        buffers = conn.get_buffers() or [conn.get_buffer()]
        count = 0
        for buffer in buffers:
            n = min(len(buffer), len(view) - count)
            buffer[:n] = view[count:count + n]
            count += n
        conn.buffer_updated(count)
        view = view[count:]


def _read_back(ini, lba: int, length: int) -> bytes:
    ini.command(rw10(READ10, lba, length // 512), read=length)
    return b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN)


@pytest.mark.parametrize("scatter", [False, True], ids=["get_buffer", "get_buffers"])
@pytest.mark.parametrize("digests", [False, True])
def test_one_mib_write_is_placed_directly_and_the_task_adopts_the_buffer(make_initiator, digests, scatter):
    ini = make_initiator(header_digest=digests, data_digest=digests)
    ini.login_normal()
    conn = ini.conn
    copied = _count_copied_data_outs(conn)
    payload = os.urandom(KIB * KIB)
    itt = ini.next_itt()
    raw = _command(ini, itt, ini.cmdsn, 0, payload, 256 * KIB)
    ini.cmdsn += 1
    conn.receive(raw[:48 + 4 * digests + 100])  # the header and the first 100 bytes of immediate data
    placed = conn._trailer[6]
    assert conn._sink is not None and conn._sink.obj is placed.buffer  # the rest goes straight there
    assert bytes(placed.buffer[:100]) == payload[:100]
    conn.receive(raw[48 + 4 * digests + 100:])
    [r2t] = ini.receive()
    assert r2t.opcode == Opcode.R2T and r2t.header.buffer_offset == 256 * KIB
    assert r2t.header.desired_data_transfer_length == 768 * KIB
    assert conn._tasks[itt].buffer is placed.buffer  # adopted, not copied
    stream = b"".join(_pdu(ini, Opcode.DATA_OUT, payload[offset:offset + 256 * KIB], final=n == 2,
                           lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=n, buffer_offset=offset)
                      for n, offset in enumerate(range(256 * KIB, KIB * KIB, 256 * KIB)))
    if scatter:  # all three at once, as from a socket that holds them all
        _scatter_receive(conn, stream)
    else:
        conn.receive(stream)
    assert status_of(ini.receive()) == 0
    assert copied == []  # each payload was placed directly, none copied out of the receive buffer
    assert _read_back(ini, 0, len(payload)) == payload


def test_whole_write_as_large_immediate_data_and_out_of_order_cmdsn(make_initiator):
    """All data immediate (64 KiB); the later CmdSN arrives first and waits, holding its placed buffer."""
    ini = make_initiator()
    ini.login_normal()
    first, second = os.urandom(64 * KIB), os.urandom(64 * KIB)
    cmdsn = ini.cmdsn
    ini.conn.receive(_command(ini, ini.next_itt(), cmdsn + 1, 256, second, len(second)))
    assert ini.receive() == []  # held for CmdSN order
    ini.conn.receive(_command(ini, ini.next_itt(), cmdsn, 0, first, len(first)))
    replies = ini.receive()
    assert [r.header.status for r in replies if r.opcode == Opcode.SCSI_RESPONSE] == [0, 0]
    ini.cmdsn = cmdsn + 2
    assert _read_back(ini, 0, len(first)) == first
    assert _read_back(ini, 256, len(second)) == second


def test_data_digest_error_in_large_immediate_data_is_rejected_and_writes_nothing(make_initiator):
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    before = _read_back(ini, 0, 64 * KIB)
    payload = os.urandom(64 * KIB)
    raw = bytearray(_command(ini, ini.next_itt(), ini.cmdsn, 0, payload, len(payload)))
    raw[1000] ^= 0x01  # one payload byte: the data digest no longer matches
    ini.conn.receive(bytes(raw))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.DATA_DIGEST_ERROR
    assert not ini.conn._tasks and not ini.conn.closing
    assert _read_back(ini, 0, 64 * KIB) == before  # the same CmdSN was not consumed: still expected next
    ini.conn.receive(_command(ini, ini.next_itt(), ini.cmdsn, 0, payload, len(payload)))
    ini.cmdsn += 1
    assert status_of(ini.receive()) == 0
    assert _read_back(ini, 0, len(payload)) == payload


def test_header_digest_error_on_a_large_write_command_drops_the_connection(make_initiator):
    ini = make_initiator(header_digest=True)
    ini.login_normal()
    raw = bytearray(_command(ini, ini.next_itt(), ini.cmdsn, 0, os.urandom(64 * KIB), 64 * KIB))
    raw[49] ^= 0x01  # the header digest
    ini.conn.receive(bytes(raw[:48 + 4 + 1000]))
    assert ini.conn.closing and ini.conn.close_reason == "header digest error"


@pytest.mark.parametrize("case", ["immediate-data-off", "more-than-edtl", "no-write-bit"])
def test_large_immediate_data_the_session_does_not_allow_is_rejected_as_before(make_initiator, case):
    settings = TargetSettings(immediate_data=False) if case == "immediate-data-off" else None
    ini = make_initiator(settings=settings)
    ini.login_normal()
    payload = os.urandom(32 * KIB)
    edtl = 16 * KIB if case == "more-than-edtl" else len(payload)
    raw = _pdu(ini, Opcode.SCSI_COMMAND, payload, final=True, write=case != "no-write-bit",
               read=case == "no-write-bit", attr=1, lun=bytes(8), itt=ini.next_itt(),
               expected_data_transfer_length=edtl, cmdsn=ini.cmdsn, expstatsn=0,
               cdb=rw10(WRITE10, 0, edtl // 512).ljust(16, b"\0"))
    ini.conn.receive(raw[:48 + 100])
    assert ini.conn._sink is None and ini.conn._trailer is None  # not placed: framed the ordinary way
    ini.conn.receive(raw[48 + 100:])
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.PROTOCOL_ERROR
    assert not ini.conn.closing
