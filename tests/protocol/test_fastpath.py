"""The gathered-write run in C (``node_agent/iscsi/_fastpath.c``) against the Python path it stands in for.

``TargetConnection._process`` hands a WRITE(10/16) without digests, and the SCSI
Commands behind it in the same receive, to ``_fastpath.gather_run``, which takes
each one exactly as ``_scsi_command_fast`` + ``LogicalUnit.gather_offset`` +
``_gather_write`` would, and stops, untouched, at the first one those would not
take.  So the two paths must be indistinguishable from outside: these tests
feed the same byte stream, cut into the same receives, to two real
``TargetConnection``s over two real ``FileBackingStore`` files, one with the C
run and one without (``connection._GATHER_RUN`` set to None for it, as on a
machine where the extension was not built, or with SHOAL_FASTPATH=off), and
compare every byte each sends, what ends up in each file, the sequence numbers
and the I/O counters.  Hypothesis draws the commands: writes that continue a
run and writes that do not, every refusing bit of byte 1, the group and
CONTROL bytes, lengths that disagree, ranges past the end, CmdSNs out of
order, repeated task tags, other LUNs (one with a unit attention still
pending, one absent), reads and other commands in between.

``make venv`` builds the extension (``setup.py``; ``make deps`` installs gcc and
python3-dev), so ``test_the_c_run_is_built`` fails rather than skips without it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.iscsi import connection
from node_agent.iscsi import pdu as P
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import FileRange, LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import FileBackingStore
from tests.protocol.conftest import BLOCKS, TARGET

try:
    from node_agent.iscsi import _fastpath
except ImportError:  # reported by test_the_c_run_is_built
    _fastpath = None

C_RUN = getattr(_fastpath, "gather_run", None)
UNITS = (0, 1)  # LUN 0: its unit attention taken at login; LUN 1: still pending until a command takes it
ABSENT_LUN = 7
needs_c = pytest.mark.skipif(C_RUN is None, reason="the C run is not built (test_the_c_run_is_built fails)")


def test_the_c_run_is_built():
    assert _fastpath is not None, "node_agent/iscsi/_fastpath.c is not built: `make venv` builds it (gcc, python3-dev)"
    if os.environ.get("SHOAL_FASTPATH", "on") != "off":
        assert connection._GATHER_RUN is C_RUN


@contextlib.contextmanager
def _python_path():
    saved = connection._GATHER_RUN
    connection._GATHER_RUN = None
    try:
        yield
    finally:
        connection._GATHER_RUN = saved


def _raw(conn) -> bytes:
    out = bytearray()
    for item in conn.take_output():
        out += os.pread(item.fd, item.length, item.offset) if isinstance(item, FileRange) else bytes(item)
    return bytes(out)


class _Side:
    """One target: a logged-in session over real files, LUN 0 and LUN 1."""

    def __init__(self, make_initiator, directory: Path, name: str):
        self.stores = [FileBackingStore(str(directory / f"{name}-{lun}.img"), BLOCKS * 512) for lun in UNITS]
        self.units = [LogicalUnit(store, LunIdentity(volume_id=f"vol-{name}-{lun}"), target_name=TARGET)
                      for lun, store in zip(UNITS, self.stores)]
        self.ini = make_initiator(TargetRegistry([TargetNode(TARGET, LunMap(dict(zip(UNITS, self.units))))]))
        self.ini.login_normal()
        for store in self.stores:  # a store learns on its first write whether writes run inline (ext4: yes)
            store.write_nowait(0, bytes(512))
            assert store.inline_writes, "the C run is for stores that write inline; this file system does not"

    def feed(self, data: bytes) -> bytes:
        self.ini.conn.receive(data)
        return _raw(self.ini.conn)

    def state(self) -> tuple:
        conn = self.ini.conn
        return (conn.statsn, conn.session.expcmdsn, len(conn.session.pending), conn.closing, conn.close_reason,
                [unit.io_counters() for unit in self.units],
                [(store.fua_writes, store.flushes) for store in self.stores],  # FUA honoured the same way
                [os.pread(store.fd, BLOCKS * 512, 0) for store in self.stores])

    def close(self) -> None:
        for store in self.stores:
            store.close()


def _cdb(kind: str, lba: int, blocks: int, byte1: int, group: int, control: int) -> bytes:
    if kind in ("write10", "read10"):
        return (bytes([0x2A if kind == "write10" else 0x28, byte1]) + (lba & 0xFFFFFFFF).to_bytes(4, "big")
                + bytes([group]) + (blocks & 0xFFFF).to_bytes(2, "big") + bytes([control]))
    if kind == "write16":
        return (bytes([0x8A, byte1]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big")
                + bytes([group, control]))
    return bytes(6)  # TEST UNIT READY


def _odd(common, *rare):
    """Mostly ``common`` (about 19 draws in 20, so that runs of plain writes are common too); now and
    then one of ``rare``."""
    return st.sampled_from([common] * (19 * len(rare)) + list(rare))


# One command: what it is, where it goes, and what may be odd about it (each field mostly the plain case).
_COMMAND = st.fixed_dictionaries({
    "kind": st.sampled_from(["write10"] * 6 + ["write16"] * 3 + ["read10", "tur"]),
    "where": _odd("next", "random", "end", "past"),
    "lba": st.integers(0, BLOCKS - 1),
    "blocks": st.sampled_from([8, 8, 8, 1, 2, 0]),
    "byte1": _odd(0, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80),
    "group": _odd(0, 0x1F, 0x20, 0x80),
    "control": _odd(0, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80),
    "lun": _odd(0, 1, ABSENT_LUN, "tail"),
    "data": _odd("exact", "short", "long", "none"),
    "edtl": _odd("data", "more", "less"),
    "w": _odd(True, False),
    "immediate": _odd(False, True),
    "bit7": _odd(False, True),
    "itt": _odd("new", "repeat"),
})


def _stream(commands: list[dict], cmdsn: int, itt: int) -> list[bytes]:
    """The PDUs of ``commands``, CmdSN and task tags following on from the initiator's."""
    pdus, next_lba = [], 0
    for index, c in enumerate(commands):
        blocks = c["blocks"]
        lba = {"next": next_lba, "random": c["lba"], "end": BLOCKS - blocks, "past": BLOCKS - blocks + 1}[c["where"]]
        lba = max(lba, 0)
        writes = c["kind"].startswith("write")
        length = blocks * 512
        if writes:
            size = {"exact": length, "short": max(length - 512, 0), "long": length + 512, "none": 0}[c["data"]]
            data = (index + 1).to_bytes(2, "big") * (size // 2)
            edtl = {"data": size, "more": size + 512, "less": max(size - 512, 0)}[c["edtl"]]
        else:
            data, edtl = b"", length if c["kind"] == "read10" else 0
        # "tail": LUN 0 with a stray last byte (no LUN this target has)
        lun_field = bytes(7) + b"\x01" if c["lun"] == "tail" else bytes([0, c["lun"]]) + bytes(6)
        if c["itt"] == "new" or not pdus:  # "repeat": the previous command's tag again
            itt += 1
        raw = bytearray(b"".join(bytes(p) for p in P.encode_pdu(
            Opcode.SCSI_COMMAND, data, header_digest=False, data_digest=False, final=True,
            read=c["kind"] == "read10", write=writes and c["w"], attr=1, immediate=c["immediate"],
            lun=lun_field, itt=itt, expected_data_transfer_length=edtl, cmdsn=cmdsn,
            expstatsn=0, cdb=_cdb(c["kind"], lba, blocks, c["byte1"], c["group"], c["control"]).ljust(16, b"\0"))))
        if c["bit7"]:
            raw[0] |= 0x80
        if not c["immediate"]:
            cmdsn = (cmdsn + 1) & 0xFFFFFFFF
        pdus.append(bytes(raw))
        next_lba = lba + blocks
    return pdus


@needs_c
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(_COMMAND, min_size=4, max_size=32), data=st.data())
def test_the_c_run_answers_and_writes_exactly_as_the_python_path(make_initiator, commands, data):
    with tempfile.TemporaryDirectory(prefix="shoal-fastpath-") as tmp:
        c_side, py_side = _Side(make_initiator, Path(tmp), "c"), _Side(make_initiator, Path(tmp), "py")
        try:
            assert (c_side.ini.cmdsn, c_side.ini.itt) == (py_side.ini.cmdsn, py_side.ini.itt)
            pdus = _stream(commands, c_side.ini.cmdsn, c_side.ini.itt)
            for swap in data.draw(st.lists(st.integers(0, max(len(pdus) - 2, 0)), max_size=2), label="swaps"):
                if swap + 1 < len(pdus):  # a CmdSN gap: the later command waits in the session's pending
                    pdus[swap], pdus[swap + 1] = pdus[swap + 1], pdus[swap]
            stream = b"".join(pdus)
            cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4), label="cuts"))
            _compare(c_side, py_side, stream, cuts)
        finally:
            c_side.close()
            py_side.close()


def _compare(c_side: _Side, py_side: _Side, stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` to both, cut into receives at ``cuts``: the same bytes back after each, the same
    state at the end."""
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        piece = stream[start:end]
        if not piece:
            continue
        sent_by_c = c_side.feed(piece)
        with _python_path():
            sent_by_python = py_side.feed(piece)
        assert sent_by_c == sent_by_python
    assert c_side.state() == py_side.state()


PLAIN = dict(kind="write10", where="next", lba=0, blocks=8, byte1=0, group=0, control=0, lun=0, data="exact",
             edtl="data", w=True, immediate=False, bit7=False, itt="new")
# Every way a command can differ from the plain write, one field at a time (the values ``_COMMAND`` draws).
ODD_ONES = [(name, value) for name, values in (
    ("kind", ["write16", "read10", "tur"]), ("where", ["random", "end", "past"]), ("blocks", [1, 2, 0]),
    ("byte1", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80]), ("group", [0x1F, 0x20, 0x80]),
    ("control", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80]), ("lun", [1, ABSENT_LUN, "tail"]),
    ("data", ["short", "long", "none"]), ("edtl", ["more", "less"]), ("w", [False]), ("immediate", [True]),
    ("bit7", [True]), ("itt", ["repeat"])) for value in values]


@needs_c
@pytest.mark.parametrize("name,value", ODD_ONES, ids=[f"{n}={v}" for n, v in ODD_ONES])
@pytest.mark.parametrize("where", ["first", "inside"])
def test_one_odd_command_in_a_run_of_writes(make_initiator, tmp_path, name, value, where):
    """A run of plain writes with one command changed in one field, first in its receive or inside the
    run; and for a repeated tag, behind a write still waiting for its data (its tag in use)."""
    c_side, py_side = _Side(make_initiator, tmp_path, "c"), _Side(make_initiator, tmp_path, "py")
    try:
        commands = [dict(PLAIN) for _ in range(6)]
        odd = 0 if where == "first" else 3
        commands[odd][name] = value
        if name == "itt":
            commands[odd - 1 if odd else 1]["edtl"] = "more"  # that tag's task waits for a Data-Out
            if not odd:
                commands[0], commands[1] = commands[1], commands[0]
                commands[1]["itt"] = "repeat"
        stream = b"".join(_stream(commands, c_side.ini.cmdsn, c_side.ini.itt))
        _compare(c_side, py_side, stream, [])
    finally:
        c_side.close()
        py_side.close()


@needs_c
def test_a_plain_stream_of_writes_is_taken_by_the_c_run(make_initiator, tmp_path, monkeypatch):
    """The equivalence above would hold trivially if the C run never took anything: here it takes all
    eight writes of one receive (the first one too), written with one ``pwritev``."""
    taken = []

    def counting(*args):
        result = C_RUN(*args)
        taken.append(result[1])
        return result

    monkeypatch.setattr(connection, "_GATHER_RUN", counting)
    side = _Side(make_initiator, tmp_path, "c")
    try:
        write = dict(kind="write10", where="next", lba=0, blocks=8, byte1=0, group=0, control=0, lun=0,
                     data="exact", edtl="data", w=True, immediate=False, bit7=False, itt="new")
        # The store learns on its first write that ext4 writes inline (``inline_writes``); until then
        # each write asks it on its own, the Python way.
        side.feed(b"".join(_stream([write], side.ini.cmdsn, side.ini.itt)))
        side.ini.cmdsn, side.ini.itt = side.ini.cmdsn + 1, side.ini.itt + 1
        assert side.stores[0].inline_writes
        taken.clear()
        calls = []
        real = side.units[0]._writev
        side.units[0]._writev = lambda offset, pieces, length: (calls.append((offset, len(pieces), length)),
                                                                real(offset, pieces, length))[1]
        replies = side.feed(b"".join(_stream([write] * 8, side.ini.cmdsn, side.ini.itt)))
        side.ini.cmdsn, side.ini.itt = side.ini.cmdsn + 8, side.ini.itt + 8
        assert sum(taken) == 8 and taken[0] > 1
        assert calls == [(0, 8, 8 * 4096)]
        assert len(replies) == 8 * 48 and all(replies[i] == 0x21 and replies[i + 3] == 0 for i in range(0, 8 * 48, 48))
        expected = b"".join((i + 1).to_bytes(2, "big") * 2048 for i in range(8))
        assert os.pread(side.stores[0].fd, 8 * 4096, 0) == expected
        # A gather holds at most _GATHER_MAX writes (one pwritev each): 130 in one receive are two.
        calls.clear()
        replies = side.feed(b"".join(_stream([dict(write, blocks=1)] * 130, side.ini.cmdsn, side.ini.itt)))
        assert len(replies) == 130 * 48
        assert calls == [(0, 128, 128 * 512), (128 * 512, 2, 2 * 512)]
    finally:
        side.close()


@needs_c
def test_gather_run_refuses_bad_arguments_without_touching_anything():
    buf = bytearray(96)
    view = memoryview(buf)
    pieces, out, commands = [], [], []
    good = [view, 0, 96, 4096, 1, 31, {}, {}, bytes(8), 2048, 512, 2048, -1, 128, 1, pieces, out, commands]
    assert C_RUN(*good)[1] == 0  # zeros are no SCSI Command: nothing taken
    with pytest.raises(TypeError, match="18 arguments"):
        C_RUN(*good[:-1])
    for index, bad in ((0, buf), (6, []), (8, bytes(7)), (15, ())):
        args = list(good)
        args[index] = bad
        with pytest.raises(TypeError):
            C_RUN(*args)
    for index, bad in ((2, 97), (10, 0), (4, 1 << 32), (12, -2), (1, -1)):
        args = list(good)
        args[index] = bad
        with pytest.raises(ValueError):
            C_RUN(*args)
    view.release()
    assert pieces == out == commands == [] and buf == bytearray(96)
