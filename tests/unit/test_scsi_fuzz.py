"""Fuzz the CDB dispatcher (hypothesis): it never raises, always answers with a valid status and
sense, and changes stored blocks only for a write command that ended GOOD."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.scsi import sense as S
from node_agent.scsi.commands import ALL_COMMANDS, COMMANDS_BY_OPCODE
from node_agent.scsi.device import LunMap

from test_scsi_support import NEXUS, make_lu

OPCODES = sorted({c.opcode for c in ALL_COMMANDS})
WRITERS = {c.opcode for c in ALL_COMMANDS if c.writes}
SIZE = 256 << 10


def _fresh():
    lu = make_lu("memory", size=SIZE)
    lu.backing.buf[:] = bytes(range(256)) * (SIZE // 256)
    return lu


LU = _fresh()
PRISTINE = bytes(LU.backing.buf)

cdb_strategy = st.one_of(
    st.binary(min_size=1, max_size=16),
    st.builds(lambda op, rest: bytes([op]) + rest, st.sampled_from(OPCODES), st.binary(min_size=5, max_size=15)),
    st.builds(lambda op, b1, rest: bytes([op, b1]) + rest, st.sampled_from(OPCODES),
              st.sampled_from([0, 0x02, 0x08, 0x10, 0x12]), st.binary(min_size=4, max_size=14)),
)


def _check(result):
    # RESERVATION CONFLICT: random PERSISTENT RESERVE OUT / RESERVE(6) CDBs can leave reservations behind.
    assert result.status in (S.GOOD, S.CHECK_CONDITION, S.RESERVATION_CONFLICT)
    if result.status == S.CHECK_CONDITION:
        code = S.parse_sense(result.sense)
        assert code.key in (S.ILLEGAL_REQUEST, S.UNIT_ATTENTION, S.MISCOMPARE, S.DATA_PROTECT, S.HARDWARE_ERROR)
        assert code.key != S.HARDWARE_ERROR, "a handler crashed"
    else:
        assert result.sense == b""


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=cdb_strategy, data=st.one_of(st.none(), st.binary(max_size=2048)), edtl=st.integers(0, 1 << 20))
def test_random_cdbs_never_raise_and_never_change_blocks_unless_a_good_write(cdb, data, edtl):
    before = bytes(LU.backing.buf)
    result = LU.execute(NEXUS, cdb, data, edtl)
    _check(result)
    changed = bytes(LU.backing.buf) != before
    if changed:
        assert result.status == S.GOOD and cdb[0] in WRITERS
        LU.backing.buf[:] = PRISTINE  # keep later examples comparable
    if cdb[0] == 0x15 or cdb[0] == 0x55:
        LU.mode.__init__()  # undo MODE SELECT so the sense format stays predictable


@settings(max_examples=300, deadline=None)
@given(lun=st.integers(0, 20), cdb=cdb_strategy, data=st.one_of(st.none(), st.binary(max_size=64)))
def test_lun_map_never_raises(lun, cdb, data):
    luns = LunMap({0: LU})
    _check(luns.execute(NEXUS, lun, cdb, data, 4096))


def test_every_command_rejects_each_reserved_bit():
    """Setting any single reserved CDB bit gives INVALID FIELD IN CDB pointing at that bit."""
    lu = _fresh()
    for cmd in ALL_COMMANDS:
        for index, mask in cmd.reserved:
            for bit in range(8):
                if not mask >> bit & 1:
                    continue
                cdb = bytearray(cmd.layout.size)
                cdb[0] = cmd.opcode
                if cmd.service_action is not None:
                    cdb[1] = cmd.service_action
                cdb[index] |= 1 << bit
                r = lu.execute(NEXUS, bytes(cdb), None, 0)
                assert S.parse_sense(r.sense) == S.INVALID_FIELD_IN_CDB, (cmd.name, index, bit)
                assert r.sense[15] & 0x40 and int.from_bytes(r.sense[16:18], "big") == index
    assert set(COMMANDS_BY_OPCODE)
