"""``LogicalUnit.gather_offset`` accepts only writes the full path answers GOOD, and writes them alike.

The target writes adjacent fast-path WRITEs of one receive with one
``writev`` (``connection.py``, gathered small writes): it answers GOOD as soon
as ``gather_offset`` accepts a command, so that must never accept one the full
dispatcher (``_validate`` and the ``sbc`` handler, the definition) would answer
otherwise.  Each case runs the same command on two units with identical media
and state, as ``test_scsi_fast_path.py`` does: one through ``gather_offset``
and ``write_gathered``, one the full way (``device._FAST_RW`` emptied).  The
store is ``MemoryBackingStore`` with a ``writev`` and ``inline_writes`` (our
own boundary: the file store's ``writev`` is exercised in
``tests/protocol/test_gathered_writes.py``).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.scsi import device
from node_agent.scsi import sense as S
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunSettings
from node_agent.storage.backing import MemoryBackingStore
from test_scsi_fast_path import BLOCKS, BS, SIZE, _cdb, prepared
from test_scsi_support import NEXUS


class GatheringMemory(MemoryBackingStore):
    """A memory medium that offers ``writev`` and writes inline (like ext4's page cache here)."""

    inline_writes = True

    def writev(self, offset, buffers, length):
        assert sum(map(len, buffers)) == length
        self.write(offset, b"".join(bytes(b) for b in buffers))


def _unit(state: str) -> LogicalUnit:
    return prepared(LogicalUnit(GatheringMemory(SIZE, BS, read_only=(state == "read-only")), LunIdentity("vol-0001"),
                                target_name="iqn.2026-01.io.shoal:t", settings=LunSettings()), state)


PLAIN = {"opcode": 0x2A, "flags": 0, "lba": 8, "count": 8, "group": 0, "control": 0, "short": 0, "state": "plain"}
UNUSUAL = {
    "opcode": st.sampled_from([0x2A, 0x8A, 0x28, 0x88]),
    "flags": st.integers(0, 255),
    "lba": st.one_of(st.integers(0, BLOCKS + 2), st.just(2**32 - 1), st.just(2**64 - 1)),
    "count": st.one_of(st.integers(0, 16), st.just(BLOCKS), st.just(0xFFFF)),
    "group": st.integers(0, 255),
    "control": st.integers(0, 255),
    "short": st.sampled_from([-BS, BS, None]),
    "state": st.sampled_from(["unit-attention", "reserved", "read-only", "wce-off"]),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.sets(st.sampled_from(sorted(UNUSUAL)), max_size=3).flatmap(
    lambda names: st.fixed_dictionaries({name: UNUSUAL[name] for name in names})))
def test_a_gathered_write_is_one_the_full_path_answers_good(fields, monkeypatch):
    """The plain 4 KiB WRITE(10) with up to three of its fields drawn from unusual values."""
    case = {**PLAIN, **fields}
    cdb = _cdb(case["opcode"], case["flags"], case["lba"], case["count"], case["group"], case["control"])
    short = case["short"]
    data = None if short is None else bytes([0x5A]) * max(0, (case["count"] & 0xFFFF) * BS + short)
    gathered, full = _unit(case["state"]), _unit(case["state"])
    before = bytes(gathered.backing.buf)
    offset = gathered.gather_offset(cdb, data)
    if offset is None:
        assert bytes(gathered.backing.buf) == before  # declined: nothing done
        return
    assert gathered.write_gathered(offset, [memoryview(data)], len(data), 1)
    with monkeypatch.context() as m:
        m.setattr(device, "_FAST_RW", {})
        answer = full.execute(NEXUS, cdb, data, len(data))
    assert (answer.status, answer.sense, answer.data_out_length) == (S.GOOD, b"", len(data))
    assert bytes(gathered.backing.buf) == bytes(full.backing.buf)
    assert gathered.io_counters() == full.io_counters()


class FailingMemory(GatheringMemory):
    def writev(self, offset, buffers, length):
        raise OSError(5, "injected EIO")


def test_the_plain_write_is_gathered_and_a_failing_writev_counts_nothing():
    lu = _unit("plain")
    assert lu.gather_offset(_cdb(0x2A, 0, 8, 8, 0, 0), bytes(4096)) == 8 * BS
    failing = LogicalUnit(FailingMemory(SIZE, BS), LunIdentity("vol-0002"), target_name="iqn.2026-01.io.shoal:t")
    assert not failing.write_gathered(8 * BS, [bytes(4096)], 4096, 1)
    assert failing.io_counters() == (0, 0, 0, 0)
