"""Adjacent small writes of one receive are written with one ``pwritev`` (issue 7, 4 KiB writes).

A sequential stream of 4 KiB WRITEs (``qemu-img bench``, a file system's
journal, ``dd``) arrives as many commands per receive.  The core answers each
fast-path write at once but writes the data of a run of adjacent ones on the
same LUN together (``TargetConnection._gather_write``/``_flush_gather``),
before anything else runs and before the transport can take the answers.
These tests feed a real ``TargetConnection`` a whole batch in one receive (as
the transport does with a socket holding it) over a real ``FileBackingStore``
in ``tmp_path``; the store subclass only records which of its own methods ran
(our own boundary, as ``test_deferred_io.py``'s ``ColdFile``), and one test
makes its writes fail to check that each command is then run again the full
way and a failed one is answered as the full path answers it.
"""

from __future__ import annotations

import errno
import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import FileBackingStore
from tests.protocol.conftest import BLOCKS, TARGET
from tests.protocol.test_target_core import READ10, WRITE10, rw10, status_of

SYNCHRONIZE_CACHE10 = 0x35
BLOCK = 4096


class RecordingFile(FileBackingStore):
    """A real file store that records its writes and flushes; ``fail_at``: offsets whose writes fail
    with EIO (a bad sector), ``can_block``: the store may answer "would block" (no gathering)."""

    fail_at: frozenset[int] = frozenset()
    can_block = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[tuple] = []

    @property
    def inline_writes(self) -> bool:
        return not self.can_block

    def _check(self, offset: int, length: int) -> None:
        if any(offset <= bad < offset + length for bad in self.fail_at):
            raise OSError(errno.EIO, "injected write error")

    def writev(self, offset, buffers, length):
        self.events.append(("writev", offset, len(buffers), length))
        self._check(offset, length)
        super().writev(offset, buffers, length)

    def write_nowait(self, offset, data, fua=False):
        self.events.append(("write", offset, len(data)))
        self._check(offset, len(data))
        return super().write_nowait(offset, data, fua)

    def write(self, offset, data, fua=False):
        self.events.append(("write", offset, len(data)))
        self._check(offset, len(data))
        super().write(offset, data, fua)

    def flush(self):
        self.events.append(("flush",))
        super().flush()


@pytest.fixture
def store(tmp_path):
    store = RecordingFile(tmp_path / "lun.img", BLOCKS * 512)
    yield store
    store.close()


def _session(make_initiator, store, **kwargs):
    lu = LogicalUnit(store, LunIdentity(volume_id="vol-gather"), target_name=TARGET)
    ini = make_initiator(TargetRegistry([TargetNode(TARGET, LunMap({0: lu}))]), **kwargs)
    ini.login_normal()
    store.events.clear()
    return ini, lu


def _pdu(ini, opcode, data=b"", **fields) -> bytes:
    pieces = P.encode_pdu(opcode, data, header_digest=ini.header_digest, data_digest=ini.data_digest, **fields)
    return b"".join(bytes(p) for p in pieces)


def _command(ini, cdb: bytes, *, write: bytes = b"", read: int = 0) -> tuple[int, bytes]:
    """A SCSI Command PDU (all write data immediate) with the next ITT and CmdSN, not sent."""
    itt = ini.next_itt()
    raw = _pdu(ini, Opcode.SCSI_COMMAND, write, final=True, read=bool(read), write=bool(write), attr=1,
               lun=bytes(8), itt=itt, expected_data_transfer_length=read or len(write), cmdsn=ini.cmdsn,
               expstatsn=0, cdb=cdb.ljust(16, b"\0"))
    ini.cmdsn += 1
    return itt, raw


def _writes(ini, lbas: list[int]) -> tuple[list[int], list[bytes], bytes]:
    itts, payloads, batch = [], [], b""
    for lba in lbas:
        payload = os.urandom(BLOCK)
        itt, raw = _command(ini, rw10(WRITE10, lba, BLOCK // 512), write=payload)
        itts.append(itt)
        payloads.append(payload)
        batch += raw
    return itts, payloads, batch


def _responses(replies) -> list:
    return [r for r in replies if r.opcode == Opcode.SCSI_RESPONSE]


def _on_disk(store, lba: int, length: int) -> bytes:
    return os.pread(store.fd, length, lba * 512)


@pytest.mark.parametrize("digests", [False, True])
def test_adjacent_writes_of_one_receive_are_one_pwritev_and_a_read_behind_them_sees_them(
        make_initiator, store, digests):
    ini, lu = _session(make_initiator, store, header_digest=digests, data_digest=digests)
    commands_before = lu.io_counters()[2]
    itts, payloads, batch = _writes(ini, [16 + 8 * i for i in range(8)])
    read_itt, read_pdu = _command(ini, rw10(READ10, 16, 64), read=8 * BLOCK)
    ini.conn.receive(batch + read_pdu)  # one receive, as the transport gets it from a full socket
    replies = ini.receive()
    responses = _responses(replies)
    assert [r.header.itt for r in responses] == itts and all(r.header.status == 0 for r in responses)
    statsns = [r.header.statsn for r in responses]
    assert statsns == list(range(statsns[0], statsns[0] + 8))
    assert store.events == [("writev", 16 * 512, 8, 8 * BLOCK)]  # one system call for the eight
    data_in = [r for r in replies if r.opcode == Opcode.DATA_IN]
    assert data_in[-1].header.itt == read_itt and status_of(replies) == 0
    assert b"".join(r.data for r in data_in) == b"".join(payloads)  # written before the read ran
    assert _on_disk(store, 16, 8 * BLOCK) == b"".join(payloads)
    assert lu.io_counters()[2] == commands_before + 8


def test_a_gap_another_command_or_the_end_of_the_receive_ends_a_gather(make_initiator, store):
    ini, _ = _session(make_initiator, store)
    _, first, batch = _writes(ini, [0, 8])
    _, second, more = _writes(ini, [100, 108])  # not adjacent to the first two
    _, sync = _command(ini, rw10(SYNCHRONIZE_CACHE10, 0, 0))
    _, third, last = _writes(ini, [200])
    ini.conn.receive(batch + more + sync + last)
    assert [r.header.status for r in _responses(ini.receive())] == [0] * 6
    assert store.events == [("writev", 0, 2, 2 * BLOCK), ("writev", 100 * 512, 2, 2 * BLOCK), ("flush",),
                            ("writev", 200 * 512, 1, BLOCK)]
    assert _on_disk(store, 0, 2 * BLOCK) == b"".join(first)
    assert _on_disk(store, 100, 2 * BLOCK) == b"".join(second)
    assert _on_disk(store, 200, BLOCK) == third[0]


def test_a_write_split_over_receives_is_written_when_its_receive_ends(make_initiator, store):
    """The transport may hand the batch over in pieces: whatever is whole at the end of a receive is
    written before ``buffer_updated`` returns (the receive buffer is then free to be reused)."""
    ini, _ = _session(make_initiator, store)
    _, payloads, batch = _writes(ini, [0, 8, 16])
    cut = len(batch) * 2 // 3  # inside the third command
    ini.conn.receive(batch[:cut])
    assert store.events == [("writev", 0, 2, 2 * BLOCK)]
    assert len(_responses(ini.receive())) == 2
    ini.conn.receive(batch[cut:])
    assert store.events[1:] == [("writev", 16 * 512, 1, BLOCK)]
    assert _on_disk(store, 0, 3 * BLOCK) == b"".join(payloads)


@pytest.mark.parametrize("digests", [False, True])
def test_a_failed_gathered_write_answers_each_command_as_the_full_path_does(make_initiator, store, digests):
    ini, lu = _session(make_initiator, store, header_digest=digests, data_digest=digests)
    store.fail_at = frozenset({24 * 512})  # the third write's block
    expected = lu.execute(None, rw10(WRITE10, 24, 8), bytes(BLOCK), BLOCK)  # today's answer to that failure
    assert expected.status == 2 and expected.sense
    store.events.clear()
    itts, payloads, batch = _writes(ini, [8, 16, 24, 32])
    ini.conn.receive(batch)
    responses = _responses(ini.receive())
    assert [r.header.itt for r in responses] == itts
    assert [r.header.status for r in responses] == [0, 0, 2, 0]
    assert responses[2].data[2:] == expected.sense  # sense data, after its 2-byte length
    statsns = [r.header.statsn for r in responses]
    assert statsns == list(range(statsns[0], statsns[0] + 4))  # the replacement kept its StatSN
    assert store.events[0] == ("writev", 8 * 512, 4, 4 * BLOCK)
    assert [e[1] for e in store.events[1:]] == [8 * 512, 16 * 512, 24 * 512, 32 * 512]  # one by one
    for lba, payload in zip([8, 16, 32], [payloads[0], payloads[1], payloads[3]]):
        assert _on_disk(store, lba, BLOCK) == payload
    store.fail_at = frozenset()
    _, again, batch = _writes(ini, [24])  # the session goes on
    ini.conn.receive(batch)
    assert status_of(ini.receive()) == 0 and _on_disk(store, 24, BLOCK) == again[0]


def test_a_store_that_can_say_would_block_is_asked_write_by_write(make_initiator, store):
    store.can_block = True
    ini, _ = _session(make_initiator, store)
    _, payloads, batch = _writes(ini, [0, 8, 16])
    ini.conn.receive(batch)
    assert [r.header.status for r in _responses(ini.receive())] == [0, 0, 0]
    assert store.events == [("write", 0, BLOCK), ("write", 8 * 512, BLOCK), ("write", 16 * 512, BLOCK)]
    assert _on_disk(store, 0, 3 * BLOCK) == b"".join(payloads)
