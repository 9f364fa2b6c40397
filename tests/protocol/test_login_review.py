"""Login checks found by a review of the target's login and authentication (2026-12-06).

Each test failed before its fix: a transit of the operational stage to itself
was agreed to, and an empty initiator ACL given to ``TargetService`` admitted
every initiator (fail-open).  The short-secret warning is in
``tests/unit/test_iscsi_chap.py``.
"""

from __future__ import annotations

import pytest

from node_agent.iscsi.target import Credentials
from node_agent.target_service import LunSpec, PortalConfig, TargetConfig, TargetService
from tests.protocol.conftest import INITIATOR, TARGET, keys_of

INITIATOR_ERROR = (2, 0)


def _status(reply) -> tuple[int, int]:
    return reply.header.status_class, reply.header.status_detail


@pytest.mark.parametrize("csg,nsg", [(1, 1), (0, 0), (1, 0), (0, 2), (1, 2)])
def test_a_transit_that_does_not_go_forward_is_refused(make_initiator, csg, nsg):
    """RFC 7143 §6.3: the stages go 0 -> 1 -> 3 or 0 -> 3; a transit to the stage itself, back, or to the
    reserved stage 2 is an initiator error, not agreed to (it had answered T=1 CSG=1 NSG=1 with success)."""
    ini = make_initiator()
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=csg, nsg=nsg, transit=True)
    assert _status(reply) == INITIATOR_ERROR


def test_a_transit_to_itself_after_negotiating_is_refused_too(make_initiator):
    ini = make_initiator()
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("ImmediateData", "Yes")],
                      csg=1, nsg=3, transit=False)
    assert _status(reply) == (0, 0)
    offered = [(k, v) for k, v in keys_of(reply).items()
               if k not in ("ImmediateData", "MaxRecvDataSegmentLength", "TargetPortalGroupTag")]
    assert _status(ini.login(offered, csg=1, nsg=1, transit=True)) == INITIATOR_ERROR


def test_the_forward_transits_still_work(make_initiator):
    ini = make_initiator()
    reply = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=0, nsg=1, transit=True)
    assert _status(reply) == (0, 0) and reply.header.nsg == 1


def test_an_empty_acl_admits_nobody_and_is_refused_as_configuration(tmp_path):
    """``allowed_initiators=[]`` used to become "no ACL", which admits every initiator."""
    with pytest.raises(ValueError, match="at least one initiator"):
        TargetConfig(TARGET, [LunSpec(str(tmp_path / "lun"))], allowed_initiators=[]).validate()
    service = TargetService(portal=PortalConfig())
    with pytest.raises(ValueError, match="at least one initiator"):
        service.add_target(TARGET, [LunSpec(str(tmp_path / "lun"), size=1 << 20)],
                           chap=Credentials("u", "secret-123456789"), allowed_initiators=[])
    assert service.registry is None or TARGET not in service.registry.targets
    node = service.add_routed_target(TARGET, chap=None, mutual_chap=None, allowed_initiators=frozenset())
    assert not node.admits(INITIATOR)  # a routed target's (worker) empty ACL: nobody, as fence leaves it
    assert service.add_routed_target(TARGET + "2", chap=None, mutual_chap=None,
                                     allowed_initiators=None).admits(INITIATOR)


# -- discovery: what the proved secret opens --------------------------------------------------------------
NODE_A, NODE_B = "iqn.2026-11.io.shoal.test:node-a", "iqn.2026-11.io.shoal.test:node-b"
VOL_B, VOL_C = "iqn.2026-11.io.shoal.test:target:vol-b", "iqn.2026-11.io.shoal.test:target:vol-c"
OPEN = "iqn.2026-11.io.shoal.test:target:open"


def _node(iqn, chap, initiators):
    from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
    from node_agent.storage.backing import MemoryBackingStore
    from node_agent.iscsi.target import TargetNode

    unit = LogicalUnit(MemoryBackingStore(2048 * 512), LunIdentity(volume_id=iqn), target_name=iqn)
    return TargetNode(iqn, LunMap({0: unit}), chap=chap, allowed_initiators=frozenset(initiators))


def _discover(ini, name, *, secret=None, user=None) -> tuple[tuple[int, int], list[str]]:
    """A discovery login as ``name`` (with CHAP when ``secret`` is given), then SendTargets=All."""
    from node_agent.iscsi import pdu as P
    from node_agent.iscsi.keys import parse_text
    from node_agent.iscsi.pdu import Opcode
    from tests.protocol.conftest import chap_response

    keys = [("InitiatorName", name), ("SessionType", "Discovery"), ("AuthMethod", "CHAP" if secret else "None")]
    reply = ini.login(keys, csg=0, nsg=3, transit=secret is None)
    if secret is not None and _status(reply) == (0, 0):
        reply = ini.login([("CHAP_A", "5")], csg=0, nsg=3, transit=False)
        k = keys_of(reply)
        reply = ini.login([("CHAP_N", user), ("CHAP_R", chap_response(int(k["CHAP_I"]), secret, k["CHAP_C"]))],
                          csg=0, nsg=3, transit=True)
    if _status(reply) != (0, 0):
        return _status(reply), []
    ini.send(Opcode.TEXT_REQUEST, b"SendTargets=All\0", final=True, itt=ini.next_itt(), ttt=P.RESERVED_TAG,
             cmdsn=ini.cmdsn, expstatsn=0)
    [text] = ini.receive()
    return (0, 0), [v for k, v in parse_text(text.data) if k == "TargetName"]


def test_discovery_lists_only_the_targets_the_proved_secret_opens(make_initiator):
    """Node A knows the secret of vol-c (exported to A and B) and claims node B's name: it used to be shown
    vol-b too, B's own target, whose secret it never proved."""
    from node_agent.iscsi.target import Credentials, TargetRegistry

    registry = TargetRegistry([_node(VOL_B, Credentials("user-b", "secret-of-vol-b-1"), [NODE_B]),
                               _node(VOL_C, Credentials("user-c", "secret-of-vol-c-1"), [NODE_A, NODE_B]),
                               _node(OPEN, None, [NODE_B])])
    status, names = _discover(make_initiator(registry), NODE_B, secret="secret-of-vol-c-1", user="user-c")
    assert status == (0, 0) and sorted(names) == [OPEN, VOL_C]
    status, names = _discover(make_initiator(registry), NODE_B, secret="secret-of-vol-b-1", user="user-b")
    assert status == (0, 0) and sorted(names) == [OPEN, VOL_B]  # vol-b's secret does not open vol-c


def test_an_initiator_only_open_targets_admit_discovers_them_without_chap(make_initiator):
    """With a CHAP target on the portal, an initiator admitted only by an open target was refused discovery
    (AUTHORIZATION FAILURE) though it could log in to that target."""
    from node_agent.iscsi.target import Credentials, TargetRegistry

    registry = TargetRegistry([_node(OPEN, None, [NODE_A]),
                               _node(VOL_B, Credentials("user-b", "secret-of-vol-b-1"), [NODE_B])])
    assert _discover(make_initiator(registry), NODE_A) == ((0, 0), [OPEN])
    # one a CHAP target admits must still use CHAP, and a name no target admits is refused
    assert _discover(make_initiator(registry), NODE_B)[0] == (2, 1)
    assert _discover(make_initiator(registry), "iqn.2026-11.io.shoal.test:stranger")[0] == (2, 2)


def test_logins_adding_connections_at_once_cannot_pass_max_connections():
    """MaxConnections was checked on a login's first PDU only: two connections added to a session at the
    same time both passed it and both joined, one more than agreed.  It is checked again as one joins."""
    from node_agent.iscsi.keys import TargetSettings, encode_text
    from tests.protocol.conftest import make_registry
    from tests.protocol.test_text_negotiation_review import NORMAL, initiator, login_pdu

    registry, settings = make_registry(), TargetSettings(max_connections=2)
    leading = initiator(registry, settings)
    tsih = leading.login_normal(extra=[("MaxConnections", "2")]).header.tsih
    one = initiator(registry, settings, isid=leading.isid, tsih=tsih)
    two = initiator(registry, settings, isid=leading.isid, tsih=tsih)
    assert _status(login_pdu(one, encode_text(NORMAL), transit=False, cid=1)) == (0, 0)
    assert _status(login_pdu(two, encode_text(NORMAL), transit=False, cid=2)) == (0, 0)
    first = login_pdu(one, b"", cid=1)
    assert _status(first) == (0, 0) and first.header.transit and first.header.nsg == 3
    assert _status(login_pdu(two, b"", cid=2)) == (2, 0x06)  # Too many connections (§11.13.5)
    [session] = [s for s in registry.sessions.values() if s.tsih == tsih]
    assert sorted(session.connections) == [0, 1]
