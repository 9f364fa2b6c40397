"""One portal, several tenants: a target per volume, each with its own CHAP secrets and ACL (as the node
agent exports volumes), driven by scripted initiators (tests/protocol/conftest.py).

Checked: a discovery session proves the credentials of a target whose ACL admits the initiator name and
answers a mutual challenge with that target's own secret, never another tenant's; session reinstatement
is per I_T nexus (initiator name, ISID, target); a connection added to a session keeps what the session
negotiated.
"""

from __future__ import annotations

import os

from node_agent.iscsi import pdu as P
from node_agent.iscsi.keys import encode_text, parse_text
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.target import Credentials, TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import MemoryBackingStore
from tests.protocol.conftest import BLOCKS, INITIATOR, TARGET, chap_response, keys_of, make_registry
from tests.protocol.test_deferred_io import slow_registry

NODE_A, NODE_B = "iqn.2026-11.io.shoal:node:a", "iqn.2026-11.io.shoal:node:b"
VOL_A, VOL_B = "iqn.2026-11.io.shoal:target:vol-a", "iqn.2026-11.io.shoal:target:vol-b"


def tenant_registry() -> TargetRegistry:
    """vol-a: one-way CHAP for node A; vol-b: CHAP and mutual CHAP for node B."""
    def node(iqn: str, volume: str, chap: Credentials, mutual: Credentials | None, initiator: str) -> TargetNode:
        unit = LogicalUnit(MemoryBackingStore(BLOCKS * 512), LunIdentity(volume_id=volume), target_name=iqn)
        return TargetNode(iqn, LunMap({0: unit}), chap=chap, mutual_chap=mutual, allowed_initiators=[initiator])
    return TargetRegistry([
        node(VOL_A, "vol-a", Credentials("user-a", "secret-of-vol-a-1"), None, NODE_A),
        node(VOL_B, "vol-b", Credentials("user-b", "secret-of-vol-b-1"), Credentials("target-b", "mutual-of-vol-b"),
             NODE_B)])


def chap_discovery(ini, name: str, user: str, secret: str, mutual_challenge: str = ""):
    """A discovery login with CHAP (and a mutual challenge when given); the last Login Response."""
    reply = ini.login([("InitiatorName", name), ("SessionType", "Discovery"), ("AuthMethod", "CHAP")],
                      csg=0, nsg=1, transit=False)
    if reply.header.status_class:
        return reply
    reply = ini.login([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    keys = keys_of(reply)
    answer = [("CHAP_N", user), ("CHAP_R", chap_response(int(keys["CHAP_I"]), secret, keys["CHAP_C"]))]
    if mutual_challenge:
        answer += [("CHAP_I", "42"), ("CHAP_C", mutual_challenge)]
    return ini.login(answer, csg=0, nsg=3, transit=True)


def send_targets(ini) -> list[str]:
    ini.send(Opcode.TEXT_REQUEST, b"SendTargets=All\0", final=True, itt=ini.next_itt(), ttt=P.RESERVED_TAG,
             cmdsn=ini.cmdsn, expstatsn=0)
    [text] = ini.receive()
    return [v for k, v in parse_text(text.data) if k == "TargetName"]


def test_discovery_never_answers_with_another_tenants_mutual_secret(make_initiator):
    """Node A proves vol-a's credentials and sends a mutual challenge: vol-a has no mutual secret, so the
    login fails; it used to be answered with vol-b's (node A could then pose as vol-b's target to node B)."""
    challenge = "0x" + "11" * 16
    reply = chap_discovery(make_initiator(tenant_registry()), NODE_A, "user-a", "secret-of-vol-a-1", challenge)
    assert (reply.header.status_class, reply.header.status_detail) == (2, 1)
    assert chap_response(42, "mutual-of-vol-b", challenge).lower() not in reply.data.decode(errors="replace").lower()


def test_each_tenant_discovers_with_its_own_credentials_and_sees_its_own_targets(make_initiator):
    registry = tenant_registry()
    a = make_initiator(registry)
    reply = chap_discovery(a, NODE_A, "user-a", "secret-of-vol-a-1")
    assert (reply.header.status_class, reply.header.status_detail) == (0, 0)
    assert send_targets(a) == [VOL_A]
    b = make_initiator(registry)
    challenge = "0x" + os.urandom(16).hex()
    reply = chap_discovery(b, NODE_B, "user-b", "secret-of-vol-b-1", challenge)
    assert (reply.header.status_class, reply.header.status_detail) == (0, 0)  # used to fail: vol-a's came first
    keys = keys_of(reply)
    assert keys["CHAP_N"] == "target-b"
    assert keys["CHAP_R"].lower() == chap_response(42, "mutual-of-vol-b", challenge).lower()
    assert send_targets(b) == [VOL_B]


def test_a_claimed_initiator_name_needs_the_credentials_its_acl_goes_with(make_initiator):
    """Node A with vol-a's secret, claiming node B's name, used to log in and list vol-b's target."""
    registry = tenant_registry()
    reply = chap_discovery(make_initiator(registry), NODE_B, "user-a", "secret-of-vol-a-1")
    assert (reply.header.status_class, reply.header.status_detail) == (2, 1)
    reply = chap_discovery(make_initiator(registry), "iqn.2026-11.io.shoal:node:nobody", "user-a",
                           "secret-of-vol-a-1")
    assert (reply.header.status_class, reply.header.status_detail) == (2, 2)  # in no ACL: authorization failure
    assert not registry.sessions


def _login_b(ini, target: str = VOL_B):
    """A Normal login of node B to ``target`` (CHAP, no mutual); the final Login Response."""
    reply = ini.login([("InitiatorName", NODE_B), ("TargetName", target), ("SessionType", "Normal"),
                       ("AuthMethod", "CHAP")], csg=0, nsg=1, transit=False)
    keys = keys_of(reply)
    reply = ini.login([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    keys = keys_of(reply)
    reply = ini.login([("CHAP_N", "user-b"),
                       ("CHAP_R", chap_response(int(keys["CHAP_I"]), "secret-of-vol-b-1", keys["CHAP_C"]))],
                      csg=0, nsg=1, transit=True)
    assert (reply.header.status_class, reply.header.status_detail) == (0, 0), keys_of(reply)
    reply = ini.login([("ImmediateData", "Yes")], csg=1, nsg=3)
    if not reply.header.transit:  # the target offered keys of its own (§6.2): take them
        reply = ini.login([(k, v) for k, v in keys_of(reply).items() if k not in (
            "ImmediateData", "MaxRecvDataSegmentLength", "TargetPortalGroupTag")], csg=1, nsg=3)
    assert reply.header.transit and reply.header.nsg == 3, keys_of(reply)
    ini.tsih = reply.header.tsih
    return reply


def test_session_reinstatement_closes_the_old_session_whatever_else_shares_the_isid(make_initiator):
    """RFC 7143 §6.3.5: the I_T nexus is initiator name, ISID and target.  A discovery session with the
    same ISID used to hide the old session from the reinstatement, leaving two sessions on one nexus (the
    end of either would drop the other's unit attentions and SPC-2 reservation)."""
    registry = tenant_registry()
    discovery = make_initiator(registry)
    chap_discovery(discovery, NODE_B, "user-b", "secret-of-vol-b-1")
    first = make_initiator(registry)
    _login_b(first)
    second = make_initiator(registry)
    _login_b(second)
    assert first.conn.closing and not second.conn.closing and not discovery.conn.closing
    normal = [s for s in registry.sessions.values() if s.target is not None]
    assert len(normal) == 1 and normal[0].tsih == second.tsih


def test_a_reinstated_connection_keeps_what_the_session_negotiated(make_initiator):
    """§6.3.4: a connection reinstated in a session (TSIH given) works with the session-wide values: a 128 KiB
    immediate WRITE (FirstBurstLength 262144, InitialR2T=No) is not refused after it as before it."""
    registry = make_registry()
    first = make_initiator(registry)
    first.login_normal()
    again = make_initiator(registry, tsih=first.tsih)
    reply = again.login([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                         ("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "262144")])
    assert (reply.header.status_class, reply.header.status_detail) == (0, 0)
    assert first.conn.closing  # the same CID: the old connection is replaced
    params = again.conn.params
    assert (params.first_burst_length, params.initial_r2t, params.immediate_data) == (262144, False, True)
    again.cmdsn = first.cmdsn
    payload = os.urandom(128 * 1024)
    again.command(bytes([0x2A, 0]) + (0).to_bytes(4, "big") + b"\0" + (256).to_bytes(2, "big") + b"\0",
                  write=payload)
    [reply] = again.receive()
    assert reply.opcode == Opcode.SCSI_RESPONSE and reply.header.status == 0


def test_a_reinstating_login_is_answered_once_the_old_sessions_writes_have_landed(make_initiator):
    """RFC 7143 §6.3.5: a session reinstated ends with its tasks.  A WRITE of the old session still on a
    worker (a slow disk) used to land after the login was answered, so after the new session's own writes to
    the same blocks; the Login Response now waits for it (and the connection takes no PDU meanwhile)."""
    registry, unit = slow_registry()  # every read and write would block: a worker's, run when the test says
    store = unit.backing
    jobs = []
    first = make_initiator(registry)
    first.conn.offload = lambda io, done, key=None: jobs.append((io, done))
    first.login_normal()
    first.command(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), write=b"O" * 512)  # WRITE(10) LBA 0, on a "worker"
    assert len(jobs) == 1 and first.conn.io_running() == 1
    second = make_initiator(registry)
    keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
            ("HeaderDigest", "None"), ("DataDigest", "None"), ("ImmediateData", "Yes"), ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", "262144"), ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144")]
    second.send(Opcode.LOGIN_REQUEST, encode_text(keys),
                immediate=True, transit=True, csg=1, nsg=3, isid=second.isid, tsih=0, itt=second.next_itt(),
                cid=0, cmdsn=second.cmdsn, expstatsn=0, digests=False)
    assert first.conn.closing
    assert second.receive() == []  # held: the old session's WRITE still runs
    io, done = jobs.pop()
    done(io())  # the WRITE lands, then its connection finds itself drained
    assert store.read(0, 512) == b"O" * 512
    [reply] = second.receive()
    assert reply.opcode == Opcode.LOGIN_RESPONSE and (reply.header.status_class, reply.header.status_detail) == (0, 0)
    assert reply.header.transit and reply.header.nsg == 3
