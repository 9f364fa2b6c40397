"""Conversations with the sans-I/O target core, fed 1-10 bytes at a time (RFC 7143)."""

from __future__ import annotations

import os

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import TEXT_MAX_DATA
from node_agent.iscsi.pdu import Opcode, RejectReason
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import MemoryBackingStore
from tests.protocol.conftest import (BLOCKS, INITIATOR, TARGET, chap_response, keys_of, make_registry)

READ10 = 0x28
WRITE10 = 0x2A


def rw10(opcode: int, lba: int, blocks: int, fua: bool = False) -> bytes:
    return bytes([opcode, 0x08 if fua else 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def status_of(replies):
    """Status of the last reply that carries one (SCSI Response or Data-In with S)."""
    for reply in reversed(replies):
        if reply.opcode == Opcode.SCSI_RESPONSE:
            return reply.header.status
        if reply.opcode == Opcode.DATA_IN and reply.header.status_present:
            return reply.header.status
    raise AssertionError(f"no status in {replies}")


def test_login_without_auth_reaches_full_feature(make_initiator):
    """§6.3: one Login Request in the operational stage with T=1 NSG=3."""
    ini = make_initiator()
    reply = ini.login_normal()
    assert reply.header.transit and reply.header.nsg == 3 and reply.header.tsih != 0
    keys = keys_of(reply)
    assert keys["TargetPortalGroupTag"] == "1"
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    assert ini.conn.session is not None


def test_unknown_target_is_not_found(make_initiator):
    ini = make_initiator()
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.io.shoal.test:nope")])
    assert (reply.header.status_class, reply.header.status_detail) == (2, 3)
    assert ini.conn.closing


def test_missing_initiator_name(make_initiator):
    ini = make_initiator()
    reply = ini.login([("TargetName", TARGET)])
    assert (reply.header.status_class, reply.header.status_detail) == (2, 7)


def test_acl_refuses_other_initiators(make_initiator):
    ini = make_initiator(make_registry(allow=frozenset({"iqn.2026-11.io.shoal.test:someone-else"})))
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET)])
    assert (reply.header.status_class, reply.header.status_detail) == (2, 2)


def test_scsi_command_before_login_drops_connection(make_initiator):
    """RFC 7143 §6: only Login Requests before the login phase completes."""
    ini = make_initiator()
    ini.command(bytes(6), read=0)
    assert ini.conn.closing and ini.receive() == []


def _chap_login(ini, secret: str, mutual=None):
    base = [("InitiatorName", INITIATOR), ("TargetName", TARGET)]
    reply = ini.login(base + [("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=False)
    assert keys_of(reply)["AuthMethod"] == "CHAP"
    reply = ini.login([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    keys = keys_of(reply)
    assert keys["CHAP_A"] == "5"
    answer = [("CHAP_N", "alice"), ("CHAP_R", chap_response(int(keys["CHAP_I"]), secret, keys["CHAP_C"]))]
    if mutual:
        answer += [("CHAP_I", "77"), ("CHAP_C", "0x" + os.urandom(16).hex())]
    return ini.login(answer, csg=0, nsg=1, transit=True), answer


def test_chap_login_succeeds_with_the_right_secret(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    reply, _ = _chap_login(ini, "correct-horse-battery")
    assert (reply.header.status_class, reply.header.status_detail) == (0, 0)
    assert reply.header.transit and reply.header.nsg == 1
    reply = ini.login([("ImmediateData", "Yes")], csg=1, nsg=3)
    if not reply.header.transit:  # the target offered keys of its own (§6.2): answer them
        offered = keys_of(reply)
        answers = [(k, v) for k, v in offered.items() if k not in ("ImmediateData", "MaxRecvDataSegmentLength",
                                                                       "TargetPortalGroupTag")]
        reply = ini.login(answers, csg=1, nsg=3)
    assert reply.header.transit and reply.header.nsg == 3, keys_of(reply)


def test_chap_login_fails_with_a_wrong_secret(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    reply, _ = _chap_login(ini, "wrong-secret-entirely")
    assert (reply.header.status_class, reply.header.status_detail) == (2, 1)
    assert ini.conn.closing


def test_chap_required_refuses_auth_none(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None")],
                      csg=0, nsg=1)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 1)


def test_chap_required_refuses_skipping_security(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 1)


def test_mutual_chap_target_proves_itself(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery"), mutual=("target", "target-secret-123")))
    reply, answer = _chap_login(ini, "correct-horse-battery", mutual=True)
    keys = keys_of(reply)
    assert keys["CHAP_N"] == "target"
    assert keys["CHAP_R"].lower() == chap_response(77, "target-secret-123", dict(answer)["CHAP_C"]).lower()


def test_discovery_send_targets(make_initiator):
    ini = make_initiator()
    reply = ini.login([("InitiatorName", INITIATOR), ("SessionType", "Discovery")])
    assert reply.header.status_class == 0 and reply.header.transit
    ini.send(Opcode.TEXT_REQUEST, b"SendTargets=All\0", final=True, itt=ini.next_itt(), ttt=P.RESERVED_TAG,
             cmdsn=ini.cmdsn, expstatsn=0)
    [text] = ini.receive()
    assert text.opcode == Opcode.TEXT_RESPONSE
    assert keys_of(text) == {"TargetName": TARGET, "TargetAddress": "127.0.0.1:3260,1"}


def test_write_immediate_then_read_back(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    payload = os.urandom(4096)
    ini.command(rw10(WRITE10, 8, 8), write=payload)
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 8, 8), read=4096)
    replies = ini.receive()
    assert replies[-1].header.status_present and replies[-1].header.status == 0  # phase collapse
    assert b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN) == payload


@pytest.mark.parametrize("edtl", [8192, 2048])
def test_read_with_another_expected_length_carries_the_residual(make_initiator, edtl):
    """A plain 4 KiB READ(10) whose ExpectedDataTransferLength is larger (underflow) or smaller
    (overflow) than the CDB's: at most EDTL bytes, GOOD with U or O and the residual count (§11.4.5.1)."""
    ini = make_initiator()
    ini.login_normal()
    payload = os.urandom(4096)
    ini.command(rw10(WRITE10, 8, 8), write=payload)
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 8, 8), read=edtl)
    replies = ini.receive()
    assert b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN) == payload[:edtl]
    assert status_of(replies) == 0
    last = replies[-1].header
    assert (last.underflow, last.overflow) == (edtl > 4096, edtl < 4096)
    assert last.residual_count == abs(edtl - 4096)


def test_read_larger_than_the_initiators_segment_is_split(make_initiator):
    """A READ the fast path takes (below the sendfile size) but larger than the initiator's
    MaxRecvDataSegmentLength goes out as several Data-In PDUs, the last with the status (§11.7)."""
    ini = make_initiator()
    ini.login_normal([("MaxRecvDataSegmentLength", "4096")])
    payload = os.urandom(16384)
    ini.command(rw10(WRITE10, 0, 32), write=payload)  # 16 KiB of immediate data: the target's limit is larger
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 0, 32), read=len(payload))
    replies = ini.receive()
    data_in = [r for r in replies if r.opcode == Opcode.DATA_IN]
    assert [len(r.data) for r in data_in] == [4096] * 4
    assert b"".join(r.data for r in data_in) == payload and status_of(replies) == 0


def test_large_write_uses_r2t_and_large_read_is_segmented(make_initiator):
    """§11.8 R2T after FirstBurstLength; Data-In split at the peer's MaxRecvDataSegmentLength."""
    ini = make_initiator()
    ini.login_normal()
    payload = os.urandom(512 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 1024), write=payload, immediate_bytes=8192, unsolicited_follows=True)
    # unsolicited Data-Out for the rest of the first burst (InitialR2T=No, FirstBurstLength 262144)
    offset, datasn = 8192, 0
    while offset < 262144:
        chunk = payload[offset:offset + 65536][: 262144 - offset]
        ini.send(Opcode.DATA_OUT, chunk, final=offset + len(chunk) == 262144, lun=bytes(8), itt=itt,
                 ttt=P.RESERVED_TAG, expstatsn=0, datasn=datasn, buffer_offset=offset)
        offset += len(chunk)
        datasn += 1
    [r2t] = ini.receive()
    assert r2t.opcode == Opcode.R2T
    assert r2t.header.buffer_offset == 262144 and r2t.header.desired_data_transfer_length == 262144
    ini.send(Opcode.DATA_OUT, payload[262144:], final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt,
             expstatsn=0, datasn=0, buffer_offset=262144)
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 0, 1024), read=len(payload))
    replies = ini.receive()
    data_in = [r for r in replies if r.opcode == Opcode.DATA_IN]
    assert len(data_in) == 2 and all(len(r.data) <= 262144 for r in data_in)
    assert b"".join(r.data for r in data_in) == payload


def test_digests_round_trip_and_bad_data_digest_is_rejected(make_initiator):
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    assert ini.conn.header_digest and ini.conn.data_digest
    payload = os.urandom(512)
    ini.command(rw10(WRITE10, 0, 1), write=payload)
    assert status_of(ini.receive()) == 0
    pieces = P.encode_pdu(Opcode.SCSI_COMMAND, os.urandom(512), header_digest=True, data_digest=True,
                          final=True, write=True, attr=1, lun=bytes(8), itt=ini.next_itt(),
                          expected_data_transfer_length=512, cmdsn=ini.cmdsn, expstatsn=0,
                          cdb=rw10(WRITE10, 0, 1).ljust(16, b"\0"))
    raw = bytearray(b"".join(bytes(p) for p in pieces))
    raw[-1] ^= 0xFF  # corrupt the data digest
    ini.feed(bytes(raw))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.DATA_DIGEST_ERROR
    ini.command(rw10(READ10, 0, 1), read=512, cmdsn=ini.cmdsn)
    replies = ini.receive()
    assert b"".join(r.data for r in replies if r.opcode == Opcode.DATA_IN) == payload


def test_header_digest_error_drops_the_connection(make_initiator):
    ini = make_initiator(header_digest=True)
    ini.login_normal()
    pieces = P.encode_pdu(Opcode.NOP_OUT, header_digest=True, final=True, immediate=True, itt=5,
                          ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn)
    raw = bytearray(b"".join(bytes(p) for p in pieces))
    raw[49] ^= 1
    ini.feed(bytes(raw))
    assert ini.conn.closing


@pytest.mark.parametrize("data_digest", [False, True], ids=["hd", "hd+dd"])
@pytest.mark.parametrize("corrupt", [8, 33, 49], ids=["lun", "cdb", "digest"])
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_header_digest_scsi_commands(make_initiator, corrupt, write, data_digest):
    """A session with a header digest (what QEMU asks for; or both digests, for a command without data) takes
    its SCSI Commands through the fast path after checking the digest there: good ones are answered with
    digested headers, in one batch; one whose header or digest was changed in flight drops the connection and
    runs nothing."""
    ini = make_initiator(header_digest=True, data_digest=data_digest)
    ini.login_normal()
    first, second = os.urandom(512), os.urandom(512)
    ini.command(rw10(WRITE10, 4, 1), write=first)
    ini.command(rw10(READ10, 4, 1), read=512)
    replies = ini.receive()  # the initiator checks the header digest of every reply
    assert [r.opcode for r in replies] == [Opcode.SCSI_RESPONSE, Opcode.DATA_IN]
    assert replies[0].header.status == 0 and replies[1].data == first
    pieces = P.encode_pdu(Opcode.SCSI_COMMAND, second if write else b"", header_digest=True,
                          data_digest=data_digest, final=True,
                          write=write, read=not write, attr=1, lun=bytes(8), itt=ini.next_itt(),
                          expected_data_transfer_length=512, cmdsn=ini.cmdsn, expstatsn=0,
                          cdb=rw10(WRITE10 if write else READ10, 4, 1).ljust(16, b"\0"))
    raw = bytearray(b"".join(bytes(p) for p in pieces))
    raw[corrupt] ^= 0x10  # LUN 0 -> LUN 16, LBA 4 -> 0x10000004, or the digest itself
    ini.feed(bytes(raw))
    assert ini.conn.closing and ini.conn.close_reason == "header digest error"
    assert ini.receive() == []
    check = make_initiator(ini.conn.registry, header_digest=True, data_digest=data_digest)
    check.login_normal()
    check.command(rw10(READ10, 4, 1), read=512)
    [data_in] = check.receive()
    assert data_in.data == first  # the corrupted write wrote nothing


def test_a_data_digest_session_checks_every_write_of_a_run(make_initiator, tmp_path):
    """DataDigest=CRC32C without a header digest: reads (no data) take the fast path, and a run of sequential
    writes in one receive, on a file-backed unit that gathers writes, is never taken by the C run, which checks
    no digests: the write whose data digest is wrong is rejected and writes nothing, its neighbours are written."""
    from node_agent.storage.backing import FileBackingStore

    store = FileBackingStore(str(tmp_path / "lun.img"), size=BLOCKS * 512)
    lu = LogicalUnit(store, LunIdentity(volume_id="vol-dd"), target_name=TARGET)
    ini = make_initiator(TargetRegistry([TargetNode(TARGET, LunMap({0: lu}))]), data_digest=True)
    try:
        ini.login_normal()
        ini.command(rw10(READ10, 0, 1), read=512)
        [data_in] = ini.receive()  # the unit attention of a new unit comes with a status: drain it first
        ini.command(rw10(READ10, 0, 1), read=512)
        [data_in] = ini.receive()
        assert data_in.opcode == Opcode.DATA_IN and data_in.data == bytes(512)
        blocks = [os.urandom(512) for _ in range(3)]
        encoded = []
        for n, block in enumerate(blocks):
            pieces = P.encode_pdu(Opcode.SCSI_COMMAND, block, data_digest=True, final=True, write=True, attr=1,
                                  lun=bytes(8), itt=ini.next_itt(), expected_data_transfer_length=512,
                                  cmdsn=ini.cmdsn, expstatsn=0, cdb=rw10(WRITE10, 8 + n, 1).ljust(16, b"\0"))
            encoded.append(b"".join(bytes(p) for p in pieces))
            ini.cmdsn += 1
        bad = bytearray(encoded[1])
        bad[-1] ^= 0xFF  # the middle write's data digest
        ini.feed(encoded[0] + bytes(bad) + encoded[2])
        replies = ini.receive()
        # RFC 7143 §7.8: the damaged command is rejected and counts as not received, so the one behind it waits
        # for its CmdSN; nothing of either is written meanwhile.
        assert [r.opcode for r in replies] == [Opcode.SCSI_RESPONSE, Opcode.REJECT]
        assert replies[1].header.reason == RejectReason.DATA_DIGEST_ERROR
        assert store.read(8 * 512, 3 * 512) == blocks[0] + bytes(1024)
        ini.feed(encoded[1])  # sent again, whole: both run, in order
        assert [r.opcode for r in ini.receive()] == [Opcode.SCSI_RESPONSE] * 2
        assert store.read(8 * 512, 3 * 512) == b"".join(blocks)
    finally:
        store.close()


def test_unknown_opcode_is_rejected_and_service_continues(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.feed(bytes([0x1C, 0x80]) + bytes(46))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert reject.data[:2] == bytes([0x1C, 0x80])
    ini.send(Opcode.NOP_OUT, b"ping", final=True, immediate=True, itt=9, ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn)
    [nop_in] = ini.receive()
    assert nop_in.opcode == Opcode.NOP_IN and nop_in.data == b"ping"


def test_data_out_for_unknown_task_is_rejected(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.DATA_OUT, bytes(512), final=True, itt=0xABC, ttt=P.RESERVED_TAG, datasn=0, buffer_offset=0)
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD


def test_data_segment_past_the_negotiated_limit_drops_connection(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.NOP_OUT, bytes(262148), final=True, immediate=True, itt=9, ttt=P.RESERVED_TAG,
             cmdsn=ini.cmdsn)
    replies = ini.receive()
    assert replies and replies[0].opcode == Opcode.REJECT
    assert ini.conn.closing


def test_cmdsn_outside_window_is_ignored_and_gaps_are_ordered(make_initiator):
    """§4.2.2.1: outside the window silently ignored; within it, executed in CmdSN order."""
    ini = make_initiator()
    ini.login_normal()
    start = ini.cmdsn
    ini.command(rw10(WRITE10, 0, 1), write=b"A" * 512, cmdsn=start + 1000)  # outside: ignored
    assert ini.receive() == []
    ini.command(rw10(WRITE10, 0, 1), write=b"C" * 512, cmdsn=start + 1)  # ahead: held
    assert ini.receive() == []
    ini.command(rw10(WRITE10, 0, 1), write=b"B" * 512, cmdsn=start)  # fills the gap: both run, in order
    assert len(ini.receive()) == 2
    ini.cmdsn = start + 2
    ini.command(rw10(READ10, 0, 1), read=512)
    assert b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN) == b"C" * 512


def test_target_pings_idle_initiator_and_drops_silent_one(make_initiator, clock):
    ini = make_initiator()
    ini.login_normal()
    clock.now += 11
    ini.conn.tick()
    [ping] = ini.receive()
    assert ping.opcode == Opcode.NOP_IN and ping.header.itt == P.RESERVED_TAG and ping.header.ttt != P.RESERVED_TAG
    ini.send(Opcode.NOP_OUT, final=True, immediate=True, itt=P.RESERVED_TAG, ttt=ping.header.ttt, cmdsn=ini.cmdsn)
    assert ini.receive() == []
    clock.now += 11
    ini.conn.tick()
    assert ini.receive()[0].opcode == Opcode.NOP_IN
    clock.now += 31
    ini.conn.tick()
    assert ini.conn.closing


def test_logout_closes_session(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    registry = ini.conn.registry
    ini.send(Opcode.LOGOUT_REQUEST, final=True, immediate=True, reason=0, itt=ini.next_itt(), cid=0,
             cmdsn=ini.cmdsn)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.LOGOUT_RESPONSE and reply.header.response == 0
    assert ini.conn.closing and not registry.sessions


def test_session_reinstatement_replaces_old_session(make_initiator):
    """§6.3.5: a leading login with the same InitiatorName and ISID closes the old session."""
    registry = make_registry()
    first = make_initiator(registry)
    first.login_normal()
    second = make_initiator(registry)
    second.login_normal()
    assert first.conn.closing and not second.conn.closing
    assert len(registry.sessions) == 1


def test_abort_task_of_write_waiting_for_data(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    itt = ini.command(rw10(WRITE10, 0, 1024), write=os.urandom(512 * 1024), immediate_bytes=0)
    ini.receive()
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=1, lun=bytes(8), itt=ini.next_itt(),
             referenced_task_tag=itt, cmdsn=ini.cmdsn, refcmdsn=ini.cmdsn - 1)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.TASK_MGMT_RESPONSE and reply.header.response == 0
    # Data-Out that comes for it after the abort (the initiator answers what it had been asked for, §11.5.1) is
    # dropped without a Reject; nothing of it is written.
    ini.send(Opcode.DATA_OUT, bytes(512), final=True, itt=itt, ttt=P.RESERVED_TAG, datasn=0, buffer_offset=0)
    assert ini.receive() == []
    assert itt not in ini.conn._tasks


@pytest.mark.parametrize("cdb", [bytes([0xFF]) + bytes(15), rw10(READ10, 2**31, 1)])
def test_bad_cdbs_get_check_condition(make_initiator, cdb):
    ini = make_initiator()
    ini.login_normal()
    ini.command(cdb, read=512)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.SCSI_RESPONSE and reply.header.status == 2
    assert len(reply.data) > 2 and reply.data[2] & 0x7F in (0x70, 0x72)


@pytest.mark.parametrize("function, asc_ascq", [(5, (0x29, 0x03)), (6, (0x29, 0x00))])
def test_lun_and_target_reset_raise_unit_attention(make_initiator, function, asc_ascq):
    """LOGICAL UNIT RESET / TARGET WARM RESET (§11.5.1) answer Function complete; the next command sees the UA."""
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=function, lun=bytes(8),
             itt=ini.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=ini.cmdsn, refcmdsn=0)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.TASK_MGMT_RESPONSE and reply.header.response == 0
    ini.command(bytes(6))  # TEST UNIT READY
    [status] = ini.receive()
    assert status.header.status == 2
    sense = status.data[2:]
    assert (sense[12], sense[13]) == asc_ascq


def test_lun_reset_of_absent_lun(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=5, lun=bytes([0, 9]) + bytes(6),
             itt=ini.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=ini.cmdsn, refcmdsn=0)
    [reply] = ini.receive()
    assert reply.header.response == 2  # LUN does not exist


def test_target_cold_reset_ends_only_the_sessions_of_the_target_it_was_sent_to(make_initiator):
    """§11.5.1 TARGET COLD RESET on a portal with one target per volume, each with its own ACL: the sessions
    to the target the issuing session logged in to end (the issuing one too, after its answer); a session to
    the portal's other target, admitted by another ACL, goes on, without a unit attention from the reset."""
    registry = make_registry(allow=frozenset({INITIATOR}))
    other_target, tenant = "iqn.2026-11.io.shoal.test:other", "iqn.2026-11.io.shoal.test:tenant"
    other_unit = LogicalUnit(MemoryBackingStore(BLOCKS * 512), LunIdentity(volume_id="vol-other"),
                             target_name=other_target)
    registry.add_target(TargetNode(other_target, LunMap({0: other_unit}), allowed_initiators=frozenset({tenant})))
    victim = make_initiator(registry)
    victim.login_normal()
    resetter, neighbour = make_initiator(registry, isid=0x400001370001), make_initiator(registry, isid=0x400001370002)
    for ini in (resetter, neighbour):
        ini.login_normal([("InitiatorName", tenant), ("TargetName", other_target)])
    resetter.send(Opcode.TASK_MGMT_REQUEST, final=True, immediate=True, function=7, lun=bytes(8),
                  itt=resetter.next_itt(), referenced_task_tag=P.RESERVED_TAG, cmdsn=resetter.cmdsn, refcmdsn=0)
    [reply] = resetter.receive()
    assert reply.opcode == Opcode.TASK_MGMT_RESPONSE and reply.header.response == 0
    assert resetter.conn.closing and neighbour.conn.closing
    assert not victim.conn.closing and [s.target.iqn for s in registry.sessions.values()] == [TARGET]
    victim.command(bytes(6))  # TEST UNIT READY: GOOD, no unit attention from the other target's reset
    [status] = victim.receive()
    assert status.opcode == Opcode.SCSI_RESPONSE and status.header.status == 0


def test_login_request_in_full_feature_phase_is_rejected(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.LOGIN_REQUEST, b"InitiatorName=x\0", immediate=True, transit=True, csg=1, nsg=3,
             isid=ini.isid, tsih=ini.tsih, itt=ini.next_itt(), cmdsn=ini.cmdsn)
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.PROTOCOL_ERROR


def test_text_in_full_feature_phase_answers_unknown_keys(make_initiator):
    ini = make_initiator()
    ini.login_normal()
    ini.send(Opcode.TEXT_REQUEST, b"X-com.example.Foo=1\0MaxRecvDataSegmentLength=65536\0", final=True,
             itt=ini.next_itt(), ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn, expstatsn=0)
    ini.cmdsn += 1
    [text] = ini.receive()
    assert keys_of(text) == {"X-com.example.Foo": "NotUnderstood"}
    assert ini.conn.max_xmit == 65536


def _text_request(ini, data: bytes, *, itt: int, ttt: int = P.RESERVED_TAG, cont: bool = False):
    """One Text Request (in CmdSN order) and the one PDU it is answered with."""
    ini.send(Opcode.TEXT_REQUEST, data, final=not cont, cont=cont, itt=itt, ttt=ttt, cmdsn=ini.cmdsn, expstatsn=0)
    ini.cmdsn += 1
    [reply] = ini.receive()
    return reply


def _discovery(make_initiator):
    ini = make_initiator()
    assert ini.login([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]).header.status_class == 0
    return ini


def test_text_request_continued_with_the_c_bit_is_joined_before_it_is_answered(make_initiator):
    """§11.10.2: SendTargets=All split mid-key over three Text Requests with C=1, C=1, C=0.  Each continued
    piece gets an empty Text Response with F=0 and a Target Transfer Tag, which the next piece carries
    back with the same Initiator Task Tag; the last piece gets the answer to the whole text."""
    ini = _discovery(make_initiator)
    itt, ttt = ini.next_itt(), P.RESERVED_TAG
    for piece in (b"SendTar", b"gets=A"):
        reply = _text_request(ini, piece, itt=itt, ttt=ttt, cont=True)
        assert reply.opcode == Opcode.TEXT_RESPONSE and reply.data == b""
        assert not reply.header.final and not reply.header.cont and reply.header.itt == itt
        assert reply.header.ttt not in (P.RESERVED_TAG, ttt)
        ttt = reply.header.ttt
    reply = _text_request(ini, b"ll\0", itt=itt, ttt=ttt)
    assert reply.opcode == Opcode.TEXT_RESPONSE and reply.header.final and reply.header.ttt == P.RESERVED_TAG
    assert keys_of(reply) == {"TargetName": TARGET, "TargetAddress": "127.0.0.1:3260,1"}


def test_a_continued_text_request_past_the_limit_is_rejected_and_dropped(make_initiator):
    """The pieces of a continued Text Request are held up to ``TEXT_MAX_DATA`` bytes: the piece past it gets
    a Long Operation Reject (§11.17.1) and the pieces go, so continuing with its tag is rejected too."""
    ini = _discovery(make_initiator)
    itt, ttt, held = ini.next_itt(), P.RESERVED_TAG, 0
    piece = b"X-com.example.Long=" + b"a" * 4077
    while held + len(piece) <= TEXT_MAX_DATA:
        reply = _text_request(ini, piece, itt=itt, ttt=ttt, cont=True)
        assert reply.opcode == Opcode.TEXT_RESPONSE and not reply.header.final
        ttt, held = reply.header.ttt, held + len(piece)
    reject = _text_request(ini, piece, itt=itt, ttt=ttt, cont=True)
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.LONG_OPERATION_REJECT
    reject = _text_request(ini, b"\0", itt=itt, ttt=ttt)
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD


def test_a_new_text_request_drops_the_one_being_continued(make_initiator):
    """§11.10.4: a Text Request with the reserved Target Transfer Tag starts a new exchange, and an initiator
    has one outstanding per connection (§11.10): one with another Initiator Task Tag is answered on its own,
    and the pieces of the earlier request are gone (continuing it is rejected)."""
    ini = _discovery(make_initiator)
    first = ini.next_itt()
    ttt = _text_request(ini, b"SendTar", itt=first, cont=True).header.ttt
    reply = _text_request(ini, b"SendTargets=All\0", itt=ini.next_itt())
    assert reply.header.final and keys_of(reply) == {"TargetName": TARGET, "TargetAddress": "127.0.0.1:3260,1"}
    reject = _text_request(ini, b"gets=All\0", itt=first, ttt=ttt)
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD


@pytest.mark.parametrize("case", ["another initiator task tag", "both C and F"])
def test_a_text_request_breaking_the_continue_rules_is_rejected(make_initiator, case):
    """§11.10.3: the pieces of a continued request share its Initiator Task Tag; §11.10.2: C=1 needs F=0."""
    ini = _discovery(make_initiator)
    itt = ini.next_itt()
    ttt = _text_request(ini, b"SendTar", itt=itt, cont=True).header.ttt
    if case == "another initiator task tag":
        reject, reason = _text_request(ini, b"gets=All\0", itt=itt + 1, ttt=ttt), RejectReason.INVALID_PDU_FIELD
    else:
        ini.send(Opcode.TEXT_REQUEST, b"gets=", final=True, cont=True, itt=itt, ttt=ttt, cmdsn=ini.cmdsn)
        ini.cmdsn += 1
        [reject], reason = ini.receive(), RejectReason.PROTOCOL_ERROR
    assert reject.opcode == Opcode.REJECT and reject.header.reason == reason


def test_command_with_final_bit_means_no_unsolicited_data(make_initiator):
    """§11.3.1: F=1 on the SCSI Command: the next data is solicited right after the immediate data."""
    ini = make_initiator()
    ini.login_normal()
    payload = os.urandom(64 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 128), write=payload, immediate_bytes=4096)
    [r2t] = ini.receive()
    assert r2t.opcode == Opcode.R2T and r2t.header.buffer_offset == 4096
    assert r2t.header.desired_data_transfer_length == len(payload) - 4096
    ini.send(Opcode.DATA_OUT, payload[4096:], final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt,
             datasn=0, buffer_offset=4096)
    assert status_of(ini.receive()) == 0


def test_first_burst_ended_early_is_solicited(make_initiator):
    """An unsolicited sequence ended (F=1) before FirstBurstLength: the gap is asked for with an R2T."""
    ini = make_initiator()
    ini.login_normal()
    payload = os.urandom(512 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 1024), write=payload, immediate_bytes=4096, unsolicited_follows=True)
    [first] = ini.receive()  # R2T for what lies beyond the first burst
    assert first.header.buffer_offset == 262144
    ini.send(Opcode.DATA_OUT, payload[4096:8192], final=True, lun=bytes(8), itt=itt, ttt=P.RESERVED_TAG,
             datasn=0, buffer_offset=4096)
    ini.send(Opcode.DATA_OUT, payload[262144:], final=True, lun=bytes(8), itt=itt, ttt=first.header.ttt,
             datasn=0, buffer_offset=262144)
    [gap] = ini.receive()
    assert gap.opcode == Opcode.R2T and gap.header.buffer_offset == 8192
    assert gap.header.desired_data_transfer_length == 262144 - 8192
    ini.send(Opcode.DATA_OUT, payload[8192:262144], final=True, lun=bytes(8), itt=itt, ttt=gap.header.ttt,
             datasn=0, buffer_offset=8192)
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 0, 1024), read=len(payload))
    assert b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN) == payload


def test_large_data_out_with_digests_placed_directly(make_initiator):
    """Data-Out payloads of 16 KiB and more are received into the task buffer; digests still checked.

    A payload whose data digest fails is rejected (RFC 7143 §7.8).  At ErrorRecoveryLevel 0 nobody sends it
    again (that takes a recovery R2T, ERL 1): the initiator goes on with the next PDU, and the target ends
    the task with CHECK CONDITION, PROTOCOL SERVICE CRC ERROR once the R2T's last PDU came (§7.8), writing
    nothing.  (This test used to resend the bad PDU with the same DataSN and expect GOOD: a recovery the
    target never asked for, which a real ERL 0 initiator does not do.)  The command retried then succeeds."""
    ini = make_initiator(header_digest=True, data_digest=True)
    ini.login_normal()
    payload = os.urandom(128 * 1024)
    itt = ini.command(rw10(WRITE10, 0, 256), write=payload, immediate_bytes=0)
    [r2t] = ini.receive()
    bad = bytearray(payload[:65536])
    pieces = P.encode_pdu(Opcode.DATA_OUT, bytes(bad), header_digest=True, data_digest=True, final=False,
                          lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=0, buffer_offset=0)
    raw = bytearray(b"".join(bytes(p) for p in pieces))
    raw[100] ^= 0x01  # corrupt one payload byte: the data digest no longer matches
    ini.feed(bytes(raw))
    [reject] = ini.receive()
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.DATA_DIGEST_ERROR
    ini.send(Opcode.DATA_OUT, payload[65536:], final=True, lun=bytes(8), itt=itt, ttt=r2t.header.ttt, datasn=1,
             buffer_offset=65536)
    [failed] = ini.receive()
    assert failed.opcode == Opcode.SCSI_RESPONSE and failed.header.itt == itt and failed.header.status == 0x02
    assert failed.data[2 + 2] & 0x0F == 0x0B and failed.data[2 + 12:2 + 14] == bytes([0x47, 0x05])
    ini.command(rw10(READ10, 0, 256), read=len(payload))
    assert b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN) == bytes(len(payload))
    itt = ini.command(rw10(WRITE10, 0, 256), write=payload, immediate_bytes=0)
    [r2t] = ini.receive()
    for datasn, offset in enumerate((0, 65536)):
        ini.send(Opcode.DATA_OUT, payload[offset:offset + 65536], final=offset == 65536, lun=bytes(8), itt=itt,
                 ttt=r2t.header.ttt, datasn=datasn, buffer_offset=offset)
    assert status_of(ini.receive()) == 0
    ini.command(rw10(READ10, 0, 256), read=len(payload))
    assert b"".join(r.data for r in ini.receive() if r.opcode == Opcode.DATA_IN) == payload


def _prout(sa: int, key: int, sa_key: int, pr_type: int = 0) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT CDB and its 24-byte parameter list (SPC-4 §6.16)."""
    cdb = bytes([0x5F, sa, pr_type, 0, 0]) + (24).to_bytes(4, "big") + b"\0"
    return cdb, key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)


def test_preempt_and_abort_ends_the_preempted_initiators_outstanding_write(make_initiator):
    """SPC-4 §5.13.11.5: A holds Write Exclusive; B's WRITE still waiting for Data-Out ends with TASK
    ABORTED (TAS=1) when A preempts B with PREEMPT AND ABORT; B's late Data-Out is dropped, and B,
    no longer registered, gets REGISTRATIONS PREEMPTED then RESERVATION CONFLICT."""
    registry = make_registry()
    a, b = make_initiator(registry), make_initiator(registry, isid=0x400001370001)
    a.login_normal(), b.login_normal()
    for ini, key in ((a, 0xA), (b, 0xB)):
        cdb, params = _prout(0x00, 0, key)
        ini.command(cdb, write=params)
        assert ini.receive()[0].header.status == 0
    cdb, params = _prout(0x01, 0xA, 0, pr_type=0x01)  # A reserves: Write Exclusive
    a.command(cdb, write=params)
    assert a.receive()[0].header.status == 0
    pending = b.command(rw10(WRITE10, 0, 8), write=bytes(4096), immediate_bytes=0)
    assert [r.opcode for r in b.receive()] == [Opcode.R2T]
    cdb, params = _prout(0x05, 0xA, 0xB, pr_type=0x01)  # PREEMPT AND ABORT, Write Exclusive
    a.command(cdb, write=params)
    assert a.receive()[0].header.status == 0
    [aborted] = b.receive()
    assert aborted.opcode == Opcode.SCSI_RESPONSE and aborted.header.itt == pending
    assert aborted.header.status == 0x40  # TASK ABORTED
    b.send(Opcode.DATA_OUT, bytes(4096), final=True, itt=pending, ttt=P.RESERVED_TAG, datasn=0, buffer_offset=0)
    assert b.receive() == []  # dropped, not run
    b.command(rw10(WRITE10, 0, 1), write=bytes(512))
    [ua] = b.receive()
    assert ua.header.status == 0x02 and ua.data[2 + 12: 2 + 14] == bytes([0x2A, 0x05])  # REGISTRATIONS PREEMPTED
    b.command(rw10(WRITE10, 0, 1), write=bytes(512))
    assert b.receive()[-1].header.status == 0x18  # RESERVATION CONFLICT: B is no longer registered


@pytest.mark.parametrize("keys", [
    [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None"), ("AuthMethod", "CHAP")],
    [("InitiatorName", INITIATOR), ("InitiatorName", "iqn.2026-01.io.shoal:other"), ("TargetName", TARGET)],
], ids=["AuthMethod twice", "InitiatorName twice"])
def test_a_key_twice_in_one_login_request_is_an_initiator_error(make_initiator, keys):
    """RFC 7143 §6.2: a key is offered once.  "Last one wins" let two readers of the PDU (the worker router
    and the login) disagree on what was meant."""
    reply = make_initiator().login(keys, csg=0, nsg=1, transit=False)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 0)


def test_authmethod_again_after_the_challenge_is_an_initiator_error(make_initiator):
    """A second AuthMethod used to start CHAP over with a fresh challenge, past chap.py's own check."""
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP")], csg=0, nsg=1,
              transit=False)
    ini.login([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    reply = ini.login([("AuthMethod", "CHAP")], csg=0, nsg=1, transit=False)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 0)


def test_a_name_changed_during_the_login_is_an_initiator_error(make_initiator):
    ini = make_initiator(make_registry(chap=("alice", "correct-horse-battery")))
    ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP")], csg=0, nsg=1,
              transit=False)
    reply = ini.login([("InitiatorName", "iqn.2026-01.io.shoal:other"), ("CHAP_A", "5")], csg=0, nsg=1,
                      transit=False)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 0)
