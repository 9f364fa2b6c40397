"""READ/WRITE(10/16) through ``LogicalUnit._read_write`` answer exactly as the full dispatcher does.

The fast path decodes these CDBs with one ``struct`` unpack and gives up
(returns None, having done nothing) on anything unusual; the full path
(``_validate`` and the ``sbc`` handlers) is the definition.  Each case runs the
same command on two logical units with identical media and state: one as
shipped, one with the fast path switched off (``device._FAST_RW`` emptied:
our own module's table, nothing outside the SCSI layer is replaced), and
compares status, sense, data, ``data_out_length`` and the media afterwards.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.scsi import device
from node_agent.scsi import sense as S
from test_scsi_support import NEXUS, make_lu

SIZE = 1 << 20
BS = 512
BLOCKS = SIZE // BS
OTHER = device.Nexus("iqn.2007-10.com.example:other,i,0x000000000002", "iqn.2026-01.io.shoal:t,t,0x0001")


def _unit(state: str):
    return prepared(make_lu("memory", size=SIZE, read_only=(state == "read-only")), state)


def prepared(lu, state: str):
    """``lu`` with the test pattern on its medium and in ``state`` (plain, unit-attention, reserved, ...)."""
    lu.backing.buf[:] = bytes(range(256)) * (SIZE // 256)
    lu.take_unit_attention(NEXUS)  # the power-on unit attention
    if state == "unit-attention":
        lu.establish_ua(S.MODE_PARAMETERS_CHANGED)
    elif state == "reserved":
        lu.reservations.spc2_reserve(OTHER)
    elif state == "wce-off":
        lu._fua_always = True
    return lu


def _cdb(opcode: int, flags: int, lba: int, count: int, group: int, control: int) -> bytes:
    if opcode in (0x28, 0x2A):
        body = bytes([opcode, flags]) + (lba & 0xFFFFFFFF).to_bytes(4, "big") + bytes([group]) + \
            (count & 0xFFFF).to_bytes(2, "big") + bytes([control])
    else:
        body = bytes([opcode, flags]) + (lba & (1 << 64) - 1).to_bytes(8, "big") + \
            (count & 0xFFFFFFFF).to_bytes(4, "big") + bytes([group, control])
    return body.ljust(16, b"\0")  # as iSCSI carries it


def _same(opcode, flags, lba, count, group, control, data_len, state, monkeypatch):
    cdb = _cdb(opcode, flags, lba, count, group, control)
    data = None if data_len is None else bytes([0x5A]) * data_len
    fast_lu, full_lu = _unit(state), _unit(state)
    fast = fast_lu.execute(NEXUS, cdb, data, data_len or count * BS)
    with monkeypatch.context() as m:
        m.setattr(device, "_FAST_RW", {})
        full = full_lu.execute(NEXUS, cdb, data, data_len or count * BS)
    assert (fast.status, fast.sense, fast.data_out_length) == (full.status, full.sense, full.data_out_length)
    assert bytes(fast.data or b"") == bytes(full.data or b"")
    assert bytes(fast_lu.backing.buf) == bytes(full_lu.backing.buf)
    assert fast_lu.io_counters() == full_lu.io_counters()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([0x28, 0x88, 0x2A, 0x8A]), flags=st.integers(0, 255),
       lba=st.one_of(st.integers(0, BLOCKS + 2), st.just(2**32 - 1), st.just(2**64 - 1)),
       count=st.one_of(st.integers(0, 16), st.just(BLOCKS), st.just(0xFFFF)),
       group=st.one_of(st.just(0), st.integers(0, 255)), control=st.one_of(st.just(0), st.integers(0, 255)),
       short=st.sampled_from([None, 0, -BS, BS]),
       state=st.sampled_from(["plain", "plain", "unit-attention", "reserved", "read-only", "wce-off"]))
def test_fast_path_answers_as_the_full_path(opcode, flags, lba, count, group, control, short, state, monkeypatch):
    data_len = None if short is None or opcode in (0x28, 0x88) else max(0, count * BS + short)
    _same(opcode, flags, lba, count, group, control, data_len, state, monkeypatch)


@pytest.mark.parametrize("opcode", [0x28, 0x88, 0x2A, 0x8A])
def test_common_reads_and_writes_take_the_fast_path(opcode):
    """The plain 4 KiB command is answered by ``_read_write`` itself (not just passed on)."""
    lu = _unit("plain")
    cdb = _cdb(opcode, 0, 8, 8, 0, 0)
    write = opcode in (0x2A, 0x8A)
    result = lu._read_write(device._FAST_RW[opcode], cdb, bytes(4096) if write else None)
    assert result is not None and result.status == S.GOOD
    if write:
        assert result.data_out_length == 4096 and bytes(lu.backing.buf[4096:8192]) == bytes(4096)
    else:
        assert bytes(result.data) == bytes(lu.backing.buf[4096:8192])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from([0x28, 0x88, 0x2A, 0x8A, 0x12]), flags=st.integers(0, 255),
       lba=st.one_of(st.integers(0, BLOCKS + 2), st.just(2**32 - 1), st.just(2**64 - 1)),
       count=st.one_of(st.integers(0, 16), st.just(BLOCKS), st.just(0xFFFF)),
       group=st.one_of(st.just(0), st.integers(0, 255)), control=st.one_of(st.just(0), st.integers(0, 255)),
       state=st.sampled_from(["plain", "plain", "unit-attention", "reserved", "read-only", "wce-off"]))
def test_read_inline_answers_only_what_the_full_path_reads(opcode, flags, lba, count, group, control, state,
                                                          monkeypatch):
    """``read_inline`` (the transport's hot path for reads) gives the data only where the full path
    answers GOOD with that same data; otherwise None, with nothing counted."""
    cdb = _cdb(opcode, flags, lba, count, group, control)
    inline_lu, full_lu = _unit(state), _unit(state)
    data = inline_lu.read_inline(cdb)
    if data is None:
        assert inline_lu.io_counters() == (0, 0, 0, 0)
        return
    assert opcode in (0x28, 0x88)
    with monkeypatch.context() as m:
        m.setattr(device, "_FAST_RW", {})
        full = full_lu.execute(NEXUS, cdb, None, count * BS)
    assert (full.status, full.sense) == (S.GOOD, b"") and bytes(data) == bytes(full.data)
    assert inline_lu.io_counters() == full_lu.io_counters()


def test_read_inline_reads_the_common_read():
    lu = _unit("plain")
    assert bytes(lu.read_inline(_cdb(0x28, 0, 8, 8, 0, 0))) == bytes(lu.backing.buf[4096:8192])
    assert lu.io_counters() == (1, 4096, 0, 0)
