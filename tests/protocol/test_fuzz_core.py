"""Fuzzing the target core with malformed PDUs (issue 2, "Bad input").

Whatever bytes arrive, the core never raises, the stored blocks do not change
(no PDU here is a well-formed write), and another session on the same target
keeps working.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from node_agent.iscsi import pdu as P
from node_agent.iscsi.pdu import Opcode
from tests.protocol.conftest import make_registry
from tests.protocol.test_target_core import rw10, status_of

WRITE_OPCODES = {0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x42, 0x89, 0x8B, 0x91, 0x9F}


def _is_write(data: bytes) -> bool:
    return len(data) >= 48 and data[0] & 0x3F == Opcode.SCSI_COMMAND and data[32] in WRITE_OPCODES


garbage_pdus = st.one_of(
    st.binary(min_size=0, max_size=200),
    st.builds(lambda op, rest: bytes([op]) + rest, st.sampled_from([int(o) for o in Opcode] + [0x07, 0x1C, 0x3E]),
              st.binary(min_size=47, max_size=47)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(garbage_pdus, min_size=1, max_size=6))
def test_random_pdus_never_crash_or_change_data(make_initiator, chunks):
    registry = make_registry()
    ini = make_initiator(registry)
    ini.login_normal()
    pattern = os.urandom(512)
    ini.command(rw10(0x2A, 5, 1), write=pattern)
    assert status_of(ini.receive()) == 0
    for chunk in chunks:
        if _is_write(chunk):
            continue
        ini.feed(chunk)
        ini.receive()
        if ini.conn.closing:
            break
    # A second, fresh session still reads the block unchanged.
    other = make_initiator(registry, isid=0x400001370099)
    other.login_normal()
    other.command(rw10(0x28, 5, 1), read=512)
    replies = other.receive()
    data = b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN)
    assert data == pattern, replies


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cdb=st.binary(min_size=16, max_size=16), edtl=st.integers(0, 1 << 20), read=st.booleans())
def test_random_cdbs_get_a_status(make_initiator, cdb, edtl, read):
    """Every CDB (that is not a write) gets GOOD or CHECK CONDITION with sense, never a crash."""
    if cdb[0] in WRITE_OPCODES or cdb[0] in (0x15, 0x55, 0x3B, 0x04, 0x5F, 0x83):
        return
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.SCSI_COMMAND, final=True, read=read, attr=1, lun=bytes(8), itt=77,
             expected_data_transfer_length=edtl, cmdsn=ini.cmdsn, expstatsn=0, cdb=cdb)
    replies = ini.receive()
    assert not ini.conn.closing
    statuses = [r for r in replies if r.opcode == Opcode.SCSI_RESPONSE or
                (r.opcode == Opcode.DATA_IN and r.header.status_present)]
    assert len(statuses) == 1, replies
    if statuses[0].opcode == Opcode.SCSI_RESPONSE and statuses[0].header.status == 2:
        assert len(statuses[0].data) >= 2 + 8
    total = sum(len(r.data) for r in replies if r.opcode == Opcode.DATA_IN)
    assert total <= edtl
    assert P.RESERVED_TAG not in [r.header.itt for r in statuses]
