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
