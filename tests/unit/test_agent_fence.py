"""Fencing an initiator at the target: its persistent-reservation registrations (SPC-4 §5.13.11.4-5, done by
the device server itself, ``persistent_reserve.remove_initiator``) and its sessions and ACL entries
(``TargetRegistry.fence_initiator``).  Real logical units in memory or on a file; no mocks."""

from __future__ import annotations

from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi import sense as S
from node_agent.scsi.device import LunMap
from node_agent.scsi.persistent_reserve import remove_initiator
from node_agent.iscsi.initiator.core import LoginError
from test_scsi_reservations import (EA_AR, K1, K2, OTHER, RESERVE, REGISTER, WE_RO, keys, lu, make_lu,  # noqa: F401
                                    prout, reservation, run, both_registered, write)
from test_scsi_support import NEXUS

FENCED = NEXUS.initiator_port.split(",")[0]
SECOND_ISID = NEXUS.__class__(FENCED + ",i,0x000000000042", NEXUS.target_port)


def test_removes_every_registration_of_the_name_and_releases_its_reservation(lu):
    both_registered(lu)
    lu.add_nexus(SECOND_ISID)
    run(lu, bytes(6), nexus=SECOND_ISID)
    prout(lu, REGISTER, sark=K1, nexus=SECOND_ISID)
    prout(lu, RESERVE, K1, pr_type=WE_RO)
    assert keys(lu) == (3, [K1, K2, K1])
    removed = remove_initiator(lu, FENCED)
    assert set(removed) == {NEXUS, SECOND_ISID}
    assert keys(lu) == (4, [K2]) and reservation(lu) is None
    assert lu.pending_unit_attention(OTHER) == S.RESERVATIONS_RELEASED
    assert lu.pending_unit_attention(NEXUS) == S.REGISTRATIONS_PREEMPTED
    assert write(lu, OTHER) == S.CHECK_CONDITION and write(lu, OTHER) == S.GOOD  # the UA, then the write
    assert remove_initiator(lu, FENCED) == [] and keys(lu) == (4, [K2])  # a repeat changes nothing


def test_a_registration_under_the_name_in_another_case_is_the_initiators_too(lu):
    """iSCSI names compare case-blind (RFC 7143 §4.2.7.2): the device server's fence of a name removes the
    registration made under it in another case, and only that initiator's."""
    both_registered(lu)
    assert FENCED != FENCED.upper()
    removed = remove_initiator(lu, FENCED.upper())
    assert removed == [NEXUS] and keys(lu)[1] == [K2]


def test_an_all_registrants_reservation_stays_with_the_others(lu):
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=EA_AR)
    remove_initiator(lu, FENCED)
    assert keys(lu)[1] == [K2] and reservation(lu) == (0, EA_AR)
    assert lu.pending_unit_attention(OTHER) is None
    assert write(lu, NEXUS) == S.CHECK_CONDITION and write(lu, NEXUS) == S.RESERVATION_CONFLICT


def test_the_saved_aptpl_state_loses_the_registration(tmp_path):
    unit = make_lu("file", tmp_path)
    for n in (NEXUS, OTHER):
        unit.add_nexus(n)
        run(unit, bytes(6), nexus=n)
    prout(unit, REGISTER, sark=K1, flags=0x01)
    prout(unit, REGISTER, sark=K2, flags=0x01, nexus=OTHER)
    remove_initiator(unit, FENCED)
    unit.close()
    again = make_lu("file", tmp_path)  # the target restarted: what APTPL kept
    assert list(again.reservations.registrations.values()) == [K2]
    again.close()


class Conn:
    def __init__(self, cid):
        self.cid = cid
        self.closed = ""

    def close(self, reason):
        self.closed = reason


def test_registry_fence_closes_every_session_of_the_name_and_empties_acls():
    units = [make_lu("memory"), make_lu("memory")]
    try:
        one = TargetNode("iqn.2026-01.io.shoal:one", LunMap({0: units[0]}), allowed_initiators=frozenset({FENCED}))
        two = TargetNode("iqn.2026-01.io.shoal:two", LunMap({0: units[1]}),
                         allowed_initiators=frozenset({FENCED, "iqn.2026-01.io.shoal:other"}))
        registry = TargetRegistry([one, two])
        conns = [Conn(1), Conn(2), Conn(3)]
        registry.open_session(FENCED, 1, one, None, 1, conns[0])
        registry.open_session(FENCED, 2, two, None, 1, conns[1])
        registry.open_session("iqn.2026-01.io.shoal:other", 3, two, None, 1, conns[2])
        closed = registry.fence_initiator(FENCED)
        assert closed == conns[:2] and all(c.closed == "initiator fenced" for c in conns[:2])
        assert conns[2].closed == "" and len(registry.sessions) == 1
        assert not one.admits(FENCED) and not one.admits("iqn.2026-01.io.shoal:other")  # empty ACL: nobody
        assert two.allowed_initiators == frozenset({"iqn.2026-01.io.shoal:other"})
        assert registry.fence_initiator(FENCED) == []
    finally:
        for unit in units:
            unit.close()


def test_portal_fence_waits_for_commands_running_on_workers(tmp_path):
    """Writes of the fenced initiator still running on the worker pool (a slow disk: tests/support/slow_target)
    when its session closes have reached the disk when ``fence_initiator`` returns; it says how many it waited
    for; the initiator's session is gone and its login refused.  Real portal and initiator on 127.0.0.1."""
    import asyncio

    import pytest

    from node_agent.agent.portal import PortalThread
    from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient
    from node_agent.iscsi.target import Credentials
    from node_agent.target_service import LunSpec, PortalConfig
    from tests.support.slow_target import DelayedBackingStore

    iqn, x, y = "iqn.2026-01.io.shoal:fence-test", "iqn.2026-01.io.shoal:host-x", "iqn.2026-01.io.shoal:host-y"
    chap = Credentials("fence-user", "fence-secret-123")
    path = tmp_path / "lun.img"
    path.write_bytes(bytes(1 << 20))
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    host, port = portal.start()
    try:
        portal.add_target(iqn, LunSpec(str(path), wrap=lambda backing: DelayedBackingStore(backing, 0.3)),
                          chap=chap, mutual_chap=None, allowed_initiators=[x, y])

        def in_flight() -> int:
            registry = portal.service.registry
            return sum(c.in_flight() for s in registry.sessions.values() for c in s.connections.values())

        async def scenario():
            settings = ClientSettings(initiator_iqn=x, login_timeout=5, reconnect_timeout=0.5)
            own = (chap.user, initiator_secret(chap.secret, x))  # each initiator's own secret (chap.py)
            client = await IscsiClient(host, port, iqn, settings=settings, chap=own).connect()
            await client.execute(bytes(6))  # TEST UNIT READY: past the first unit attention
            writes = [asyncio.ensure_future(client.execute(bytes([0x2A, 0, 0, 0, 0, 8 * i, 0, 0, 1, 0]),
                                                           data_out=bytes([0xA0 + i]) * 512)) for i in range(4)]
            while portal.call(in_flight) == 0:
                await asyncio.sleep(0.01)
            result = await asyncio.get_running_loop().run_in_executor(None, portal.fence_initiator, x)
            on_disk = path.read_bytes()
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - the session is gone
                pass
            return result, on_disk, outcomes

        result, on_disk, outcomes = asyncio.run(scenario())
        assert result.targets == (iqn,) and result.sessions_closed == 1 and result.commands_waited >= 1
        assert portal.call(in_flight) == 0
        for i, outcome in enumerate(outcomes):
            if not isinstance(outcome, BaseException):  # acknowledged before the fence: on disk, of course
                assert on_disk[i * 4096:i * 4096 + 512] == bytes([0xA0 + i]) * 512
        # every write that was running when the session closed finished before the fence returned
        running = [i for i in range(4) if on_disk[i * 4096:i * 4096 + 512] == bytes([0xA0 + i]) * 512]
        assert len(running) >= result.commands_waited
        settings = ClientSettings(initiator_iqn=x, login_timeout=5, reconnect_timeout=0.5)

        async def relogin():
            await IscsiClient(host, port, iqn, settings=settings,
                              chap=(chap.user, initiator_secret(chap.secret, x))).connect()

        with pytest.raises(LoginError):
            asyncio.run(relogin())
    finally:
        portal.stop()


def test_a_fence_stops_a_sanitize_its_initiator_started_under_another_spelling(lu):
    """``stop_sanitize(name)`` compares names as iSCSI does: the pass of ``NAME`` is stopped for ``name``, and
    not for another initiator.  (The running pass is set up directly: a real one is in
    test_portal_admin_fairness.py; here only whose it is matters.)"""
    lu._sanitize, lu._sanitize_by = [False], NEXUS  # a pass of NEXUS's initiator, running
    assert not lu.stop_sanitize(OTHER.initiator_port.split(",")[0]) and not lu.sanitize_stopping
    assert lu.stop_sanitize(FENCED.upper()) and lu.sanitize_stopping
