"""Persistent reservations (SPC-4 §5.13, §6.15, §6.16) and RESERVE/RELEASE (SPC-2 §5.5, SPC-3 §5.6.3)
between two I_T nexuses on one logical unit."""

from __future__ import annotations

import json

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.persistent_reserve import transport_id
from node_agent.scsi.reservations import PR_TYPES

from test_scsi_support import NEXUS, OTHER, cdb10, make_lu, run, sense_of

WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 0x1, 0x3, 0x5, 0x6, 0x7, 0x8
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_IGNORE = range(7)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
K1, K2 = 0x1111_2222_3333_4444, 0xAAAA_BBBB_CCCC_DDDD
THIRD = NEXUS.__class__("iqn.2007-10.com.example:init3,i,0x000000000003", NEXUS.target_port)
OBSERVER = NEXUS.__class__("iqn.2007-10.com.example:observer,i,0x000000000004", NEXUS.target_port)


@pytest.fixture
def lu():
    unit = make_lu("memory")
    for n in (NEXUS, OTHER, THIRD, OBSERVER):
        unit.add_nexus(n)
        run(unit, bytes(6), nexus=n)  # consume POWER ON RESET
    yield unit
    unit.close()


def prout(lu, sa, key=0, sark=0, *, pr_type=0, scope=0, flags=0, nexus=NEXUS, length=24):
    cdb = bytes([0x5F, sa, scope << 4 | pr_type, 0, 0]) + length.to_bytes(4, "big") + b"\0"
    data = key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(4) + bytes([flags]) + bytes(3)
    return run(lu, cdb, data[:length], nexus=nexus)


def prin(lu, sa, alloc=4096, nexus=NEXUS):
    return run(lu, bytes([0x5E, sa, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0", nexus=nexus)


def keys(lu):
    """(PRGENERATION, keys) as an unregistered bystander sees them."""
    data = prin(lu, READ_KEYS, nexus=OBSERVER).data
    n = int.from_bytes(data[4:8], "big") // 8
    return int.from_bytes(data[:4], "big"), [int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big") for i in range(n)]


def reservation(lu):
    data = prin(lu, READ_RESERVATION, nexus=OBSERVER).data
    if int.from_bytes(data[4:8], "big") == 0:
        return None
    return int.from_bytes(data[8:16], "big"), data[21] & 0x0F


def read(lu, nexus):
    return run(lu, cdb10(0x28, 0, 1), nexus=nexus).status


def write(lu, nexus):
    return run(lu, cdb10(0x2A, 0, 1), bytes(512), nexus=nexus).status


def both_registered(lu):
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1).status == S.GOOD
    assert prout(lu, REGISTER_AND_IGNORE, sark=K2, nexus=OTHER).status == S.GOOD


# -- PERSISTENT RESERVE IN data formats (golden bytes) ------------------------------------
def test_read_keys_and_reservation_golden_bytes(lu):
    """SPC-4 §6.15.2/§6.15.3: PRGENERATION, ADDITIONAL LENGTH, then keys / one descriptor."""
    assert prin(lu, READ_KEYS).data == bytes(8)
    assert prin(lu, READ_RESERVATION).data == bytes(8)
    both_registered(lu)
    assert prin(lu, READ_KEYS).data == (bytes.fromhex("00000002 00000010") + K1.to_bytes(8, "big")
                                        + K2.to_bytes(8, "big"))
    assert prout(lu, RESERVE, K1, pr_type=EA).status == S.GOOD
    assert prin(lu, READ_RESERVATION).data == (bytes.fromhex("00000002 00000010") + K1.to_bytes(8, "big")
                                               + bytes.fromhex("00000000 00 03 0000"))


def test_read_keys_allocation_length_keeps_additional_length(lu):
    """SPC-4 §6.15.2: ADDITIONAL LENGTH is not cut by the allocation length (libiscsi PrinReadKeys.Truncate)."""
    prout(lu, REGISTER, sark=K1)
    assert prin(lu, READ_KEYS, alloc=8).data == bytes.fromhex("00000001 00000008")


def test_report_capabilities_golden_bytes(lu):
    """SPC-4 §6.15.4: LENGTH 8, CRH=1, TMV=1, ALLOW COMMANDS=001b, all six types, no PTPL/SIP/ATP."""
    assert prin(lu, REPORT_CAPABILITIES).data == bytes.fromhex("0008 10 90 ea01 0000")


def test_read_full_status_golden_bytes(lu):
    """SPC-4 §6.15.5: a descriptor per registration with an iSCSI TransportID (format 01b)."""
    prout(lu, REGISTER, sark=K1)
    prout(lu, RESERVE, K1, pr_type=WE)
    tid = transport_id(NEXUS.initiator_port)
    name = NEXUS.initiator_port.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    assert tid == bytes([0x45, 0]) + len(name).to_bytes(2, "big") + name
    expected = (K1.to_bytes(8, "big") + bytes(4) + bytes([0x01, 0x01]) + bytes(4) + (1).to_bytes(2, "big")
                + len(tid).to_bytes(4, "big") + tid)
    assert prin(lu, READ_FULL_STATUS).data == (1).to_bytes(4, "big") + len(expected).to_bytes(4, "big") + expected


@pytest.mark.parametrize("sa", range(4, 0x20))
def test_prin_unknown_service_actions(lu, sa):
    """libiscsi PrinServiceactionRange: service actions 04h-1Fh are INVALID FIELD IN CDB."""
    assert sense_of(prin(lu, sa)) == S.INVALID_FIELD_IN_CDB


# -- registration (SPC-4 §5.13.7) ---------------------------------------------------------
def test_register_reregister_unregister_and_generation(lu):
    assert prout(lu, REGISTER, sark=K1).status == S.GOOD
    assert keys(lu) == (1, [K1])
    assert prout(lu, REGISTER, sark=K1 + 1).status == S.RESERVATION_CONFLICT  # wrong RESERVATION KEY (0)
    assert prout(lu, REGISTER, K1, K2).status == S.GOOD  # change the key
    assert keys(lu) == (2, [K2])
    assert prout(lu, REGISTER_AND_IGNORE, 12345, K1).status == S.GOOD
    assert keys(lu) == (3, [K1])
    assert prout(lu, REGISTER, K1, 0).status == S.GOOD  # unregister
    assert keys(lu) == (4, [])
    assert prout(lu, REGISTER, 0, 0).status == S.GOOD  # nothing to do: generation unchanged
    assert keys(lu) == (4, [])
    assert prout(lu, REGISTER, 7, 8).status == S.RESERVATION_CONFLICT  # unregistered with a key


def test_parameter_list_checks(lu):
    """SPC-4 §6.16.3: 24 bytes; SPEC_I_PT, ALL_TG_PT and APTPL are not supported (REPORT CAPABILITIES)."""
    assert sense_of(prout(lu, REGISTER, sark=K1, length=20)) == S.PARAMETER_LIST_LENGTH_ERROR
    for flag in (0x08, 0x04, 0x01):
        r = prout(lu, REGISTER, sark=K1, flags=flag)
        assert sense_of(r) == S.INVALID_FIELD_IN_PARAMETER_LIST and r.sense[15] & 0x40 == 0
    assert keys(lu) == (0, [])
    prout(lu, REGISTER, sark=K1)
    assert sense_of(prout(lu, RESERVE, K1, pr_type=EA, scope=1)) == S.INVALID_FIELD_IN_CDB
    assert sense_of(prout(lu, RESERVE, K1, pr_type=2)) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, bytes([0x5F, 7, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24))) == S.INVALID_FIELD_IN_CDB


# -- RESERVE / RELEASE and the conflict table (SPC-4 §5.13.1 table 66) -----------------------
ACCESS = {  # type -> (registered other reads, writes, unregistered other reads, writes): libiscsi ProutReserve
    EA: (False, False, False, False), WE: (True, False, True, False),
    EA_RO: (True, True, False, False), WE_RO: (True, True, True, False),
    EA_AR: (True, True, False, False), WE_AR: (True, True, True, False),
}


@pytest.mark.parametrize("pr_type", sorted(ACCESS), ids=lambda t: PR_TYPES[t].name)
def test_access_by_type(lu, pr_type):
    both_registered(lu)
    assert prout(lu, RESERVE, K1, pr_type=pr_type).status == S.GOOD
    assert reservation(lu) == (0 if PR_TYPES[pr_type].registrants == "all" else K1, pr_type)
    assert read(lu, NEXUS) == S.GOOD and write(lu, NEXUS) == S.GOOD
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[pr_type]
    ok = {True: S.GOOD, False: S.RESERVATION_CONFLICT}
    assert (read(lu, OTHER), write(lu, OTHER)) == (ok[reg_read], ok[reg_write])
    assert prout(lu, REGISTER, K2, 0, nexus=OTHER).status == S.GOOD
    assert (read(lu, OTHER), write(lu, OTHER)) == (ok[unreg_read], ok[unreg_write])
    # commands every type allows (SPC-4 table 66): INQUIRY, TEST UNIT READY, READ CAPACITY, PR IN/OUT
    for cdb in (bytes([0x12, 0, 0, 0, 36, 0]), bytes(6), bytes([0x25]) + bytes(9)):
        assert run(lu, cdb, nexus=OTHER).status == S.GOOD
    assert prin(lu, READ_KEYS, nexus=OTHER).status == S.GOOD
    assert prout(lu, RELEASE, K1, pr_type=pr_type).status == S.GOOD
    assert reservation(lu) is None and write(lu, OTHER) == S.GOOD


def test_reserve_rules(lu):
    both_registered(lu)
    assert prout(lu, RESERVE, 99, pr_type=EA).status == S.RESERVATION_CONFLICT  # wrong key
    assert prout(lu, RESERVE, K1, pr_type=EA, nexus=THIRD).status == S.RESERVATION_CONFLICT  # unregistered
    assert prout(lu, RESERVE, K1, pr_type=EA).status == S.GOOD
    assert prout(lu, RESERVE, K1, pr_type=EA).status == S.GOOD  # the holder may repeat it
    assert prout(lu, RESERVE, K1, pr_type=WE).status == S.RESERVATION_CONFLICT  # but not change the type
    assert prout(lu, RESERVE, K2, pr_type=EA, nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert prout(lu, RELEASE, K2, pr_type=EA, nexus=OTHER).status == S.GOOD  # not the holder: no-op
    assert reservation(lu) == (K1, EA)
    assert sense_of(prout(lu, RELEASE, K1, pr_type=WE)) == S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION
    assert keys(lu)[0] == 2  # RESERVE and RELEASE do not touch PRGENERATION


@pytest.mark.parametrize("pr_type", sorted(ACCESS), ids=lambda t: PR_TYPES[t].name)
def test_holder_unregistering(lu, pr_type):
    """libiscsi ProutReserve.Ownership*: the holder leaving ends the reservation unless all registrants hold it;
    for registrants-only types the other registrants get RESERVATIONS RELEASED (SPC-4 §5.13.11.2.3)."""
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=pr_type)
    assert prout(lu, REGISTER, K1, 0).status == S.GOOD
    if PR_TYPES[pr_type].registrants == "all":
        assert reservation(lu) == (0, pr_type)
        assert prout(lu, RELEASE, K2, pr_type=pr_type, nexus=OTHER).status == S.GOOD
        assert reservation(lu) is None
    else:
        assert reservation(lu) is None
    released = PR_TYPES[pr_type].registrants == "only"
    assert lu.pending_unit_attention(OTHER) == (S.RESERVATIONS_RELEASED if released else None)


def test_release_of_registrants_type_tells_the_others(lu):
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=WE_AR)
    prout(lu, RELEASE, K1, pr_type=WE_AR)
    assert lu.pending_unit_attention(OTHER) == S.RESERVATIONS_RELEASED
    assert lu.pending_unit_attention(NEXUS) is None and lu.pending_unit_attention(THIRD) is None


def test_clear(lu):
    """libiscsi ProutClear.Simple: everything goes, PRGENERATION + 1, the others see RESERVATIONS PREEMPTED."""
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=EA)
    assert prout(lu, CLEAR, K2, nexus=THIRD).status == S.RESERVATION_CONFLICT
    assert prout(lu, CLEAR, K1).status == S.GOOD
    assert keys(lu) == (3, []) and reservation(lu) is None
    assert sense_of(run(lu, bytes(6), nexus=OTHER)) == S.RESERVATIONS_PREEMPTED
    assert lu.pending_unit_attention(NEXUS) is None and lu.pending_unit_attention(THIRD) is None


def test_preempt_removes_a_registration(lu):
    """libiscsi ProutPreempt.RemoveRegistration: no reservation; PRGENERATION + 1; REGISTRATIONS PREEMPTED."""
    both_registered(lu)
    assert prout(lu, PREEMPT, K2, K1, pr_type=EA, nexus=OTHER).status == S.GOOD
    assert keys(lu) == (3, [K2])
    assert sense_of(run(lu, bytes(6))) == S.REGISTRATIONS_PREEMPTED
    assert sense_of(prout(lu, PREEMPT, K2, 0, pr_type=EA, nexus=OTHER)) == S.INVALID_FIELD_IN_PARAMETER_LIST
    assert prout(lu, PREEMPT, K2, 42, pr_type=EA, nexus=OTHER).status == S.RESERVATION_CONFLICT


@pytest.mark.parametrize("pr_type,scope", [(0, 0), (0x0F, 0), (WE, 2)], ids=["type 0", "type 15", "scope 2"])
def test_preempt_of_a_key_that_holds_no_reservation_ignores_scope_and_type(lu, pr_type, scope):
    """SPC-4 §5.13.11.4.3 b): SCOPE and TYPE are ignored when the key names no reservation holder (sg_persist
    sends TYPE 0 when none is given); they used to be refused with INVALID FIELD IN CDB."""
    both_registered(lu)
    assert prout(lu, PREEMPT, K2, K1, pr_type=pr_type, scope=scope, nexus=OTHER).status == S.GOOD
    assert keys(lu) == (3, [K2]) and reservation(lu) is None


@pytest.mark.parametrize("sa", [PREEMPT, PREEMPT_AND_ABORT])
def test_preempt_the_holder(lu, sa):
    """SPC-4 §5.13.11.4.4: the preempter holds a new reservation; the holder's registration goes."""
    both_registered(lu)
    prout(lu, REGISTER_AND_IGNORE, sark=K1, nexus=THIRD)  # a second registrant with the holder's key
    prout(lu, RESERVE, K1, pr_type=WE)
    assert prout(lu, sa, K2, K1, pr_type=EA, nexus=OTHER).status == S.GOOD
    assert reservation(lu) == (K2, EA) and keys(lu) == (4, [K2])
    for n in (NEXUS, THIRD):
        assert lu.pending_unit_attention(n) == S.REGISTRATIONS_PREEMPTED
        assert write(lu, n) == S.CHECK_CONDITION  # the unit attention first
        assert write(lu, n) == S.RESERVATION_CONFLICT


def test_preempt_all_registrants_with_zero_key(lu):
    """SPC-4 §5.13.11.4.5: SARK 0 under an all-registrants type removes every other registrant."""
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=EA_AR)
    assert prout(lu, PREEMPT, K2, 0, pr_type=WE, nexus=OTHER).status == S.GOOD
    assert reservation(lu) == (K2, WE) and keys(lu)[1] == [K2]


def test_reservations_survive_resets_and_nexus_loss(lu):
    both_registered(lu)
    prout(lu, RESERVE, K1, pr_type=EA)
    lu.reset("lun")
    lu.remove_nexus(NEXUS)
    run(lu, bytes(6), nexus=OBSERVER)
    assert reservation(lu) == (K1, EA)
    run(lu, bytes(6), nexus=OTHER)
    assert read(lu, OTHER) == S.RESERVATION_CONFLICT


# -- RESERVE(6) / RELEASE(6) ------------------------------------------------------------------
RESERVE6, RELEASE6 = bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0])
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 255, 0])


def test_reserve6_two_initiators(lu):
    """libiscsi Reserve6.2Initiators (SPC-2 §5.5.1)."""
    assert run(lu, RESERVE6).status == S.GOOD
    assert run(lu, RESERVE6).status == S.GOOD
    assert run(lu, RESERVE6, nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert run(lu, RELEASE6, nexus=OTHER).status == S.GOOD  # not ours: a no-op
    assert run(lu, MODE_SENSE6).status == S.GOOD
    for cdb in (MODE_SENSE6, bytes(6), cdb10(0x28, 0, 1)):
        assert run(lu, cdb, nexus=OTHER).status == S.RESERVATION_CONFLICT
    for cdb in (bytes([0x12, 0, 0, 0, 36, 0]), bytes([0x03, 0, 0, 0, 18, 0]), bytes([0xA0]) + bytes(5) + b"\0\0\0\x10\0\0"):
        assert run(lu, cdb, nexus=OTHER).status == S.GOOD
    assert run(lu, RELEASE6).status == S.GOOD
    assert run(lu, RESERVE6, nexus=OTHER).status == S.GOOD
    assert run(lu, bytes([0x56]) + bytes(9)).status == S.RESERVATION_CONFLICT  # RESERVE(10) too
    assert run(lu, bytes([0x57]) + bytes(9), nexus=OTHER).status == S.GOOD  # RELEASE(10)
    assert run(lu, bytes(6)).status == S.GOOD


@pytest.mark.parametrize("how", ["logout", "lun reset", "target reset"])
def test_reserve6_released_by_nexus_loss_and_resets(lu, how):
    """libiscsi Reserve6.Logout/ITNexusLoss/LUNReset/TargetWarmReset: SPC-2 reservations do not survive."""
    run(lu, RESERVE6)
    if how == "logout":
        lu.remove_nexus(NEXUS)
    else:
        lu.reset(how.split()[0])
        run(lu, bytes(6), nexus=OTHER)
    assert run(lu, RESERVE6, nexus=OTHER).status == S.GOOD


def test_reserve6_and_persistent_reservations(lu):
    """SPC-3 §5.6.3: PR commands conflict with an SPC-2 reservation; with registrations RESERVE(6) conflicts
    unless the persistent reservation lets the nexus through, and then it changes nothing."""
    run(lu, RESERVE6)
    assert prin(lu, READ_KEYS).status == S.RESERVATION_CONFLICT
    assert prout(lu, REGISTER, sark=K1).status == S.RESERVATION_CONFLICT
    run(lu, RELEASE6)
    both_registered(lu)
    assert run(lu, RESERVE6).status == S.RESERVATION_CONFLICT
    prout(lu, RESERVE, K1, pr_type=WE)
    assert run(lu, RESERVE6).status == S.GOOD and lu.reservations.spc2_holder is None
    assert run(lu, RESERVE6, nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert run(lu, RELEASE6).status == S.GOOD and reservation(lu) == (K1, WE)


def test_reserve10_third_party_is_refused(lu):
    assert sense_of(run(lu, bytes([0x56, 0x10]) + bytes(8))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(lu, bytes([0x16, 0x01, 0, 0, 0, 0]))) == S.INVALID_FIELD_IN_CDB  # extent (obsolete)


# -- Persist Through Power Loss (SPC-4 §5.13.5) -------------------------------------------------
def test_aptpl_survives_a_restart_on_a_file(tmp_path):
    """APTPL=1 saves registrations and the reservation beside the backing file; a new logical unit on
    the same file (a target restart) has them; APTPL=0 in a later REGISTER drops the saved copy."""
    lu = make_lu("file", tmp_path)
    for n in (NEXUS, OTHER):
        lu.add_nexus(n)
        run(lu, bytes(6), nexus=n)
    caps = run(lu, bytes([0x5E, REPORT_CAPABILITIES, 0, 0, 0, 0, 0, 0, 8, 0])).data
    assert caps[2] & 0x01 and not caps[3] & 0x01  # PTPL_C=1, PTPL_A=0
    assert prout(lu, REGISTER, sark=K1, flags=0x01).status == S.GOOD
    assert prout(lu, REGISTER, sark=K2, flags=0x01, nexus=OTHER).status == S.GOOD
    assert prout(lu, RESERVE, K1, pr_type=WE_RO).status == S.GOOD
    sidecar = tmp_path / "lun.img.pr"
    assert sidecar.exists()
    lu.close()

    again = make_lu("file", tmp_path)
    for n in (NEXUS, OTHER):
        again.add_nexus(n)
        run(again, bytes(6), nexus=n)
    data = run(again, bytes([0x5E, READ_RESERVATION, 0, 0, 0, 0, 0, 0, 64, 0])).data
    assert int.from_bytes(data[:4], "big") == 2 and int.from_bytes(data[8:16], "big") == K1 and data[21] == WE_RO
    assert run(again, bytes([0x5E, REPORT_CAPABILITIES, 0, 0, 0, 0, 0, 0, 8, 0])).data[3] & 0x01  # PTPL_A
    third = NEXUS.__class__("iqn.2007-10.com.example:late,i,0x000000000009", NEXUS.target_port)
    again.add_nexus(third)
    run(again, bytes(6), nexus=third)
    assert write(again, third) == S.RESERVATION_CONFLICT and write(again, OTHER) == S.GOOD
    assert prout(again, REGISTER, K2, K2, nexus=OTHER).status == S.GOOD  # APTPL=0 now
    assert not sidecar.exists()
    again.close()


@pytest.mark.parametrize("content", ['{"version": 1, "generation": 2, "aptpl"', '{"version": 7}', '[]'],
                         ids=["truncated", "unknown version", "not an object"])
def test_an_unreadable_reservation_file_is_named_and_nothing_is_served_without_it(tmp_path, content):
    """A damaged ``.pr`` file: the unit is not opened without its reservations (an initiator they fence could
    write again), and the error names the file and what to do, instead of a bare JSON message."""
    (tmp_path / "lun.img.pr").write_text(content)
    with pytest.raises(ValueError, match=r"lun\.img\.pr: the saved persistent reservations cannot be read .*"
                                         "move it aside to drop its reservations"):
        make_lu("file", tmp_path)


_REGISTERED = {"initiator_port": "iqn.2007-10.com.example:init,i,0x000000000001",
               "target_port": "iqn.2026-01.io.shoal:t,t,0x0001", "relative_target_port": 1, "key": 17}
_SAVED = {"version": 1, "generation": 3, "aptpl": True, "registrations": [_REGISTERED], "type": 1, "holder": 0}


@pytest.mark.parametrize("change", [
    {"generation": "5"}, {"generation": True}, {"generation": -1}, {"aptpl": 1}, {"type": 2}, {"type": "1"},
    {"holder": 1}, {"holder": None}, {"type": 7}, {"registrations": {}},
    {"registrations": [dict(_REGISTERED, key="17")]}, {"registrations": [dict(_REGISTERED, key=1 << 64)]},
    {"registrations": [dict(_REGISTERED, key=0)]}, {"registrations": [dict(_REGISTERED, initiator_port=5)]},
    {"registrations": [_REGISTERED, _REGISTERED]},
], ids=lambda change: json.dumps(change)[:40])
def test_a_reservation_file_with_a_value_of_the_wrong_kind_is_refused_as_unreadable(tmp_path, change):
    """Valid JSON holding a value of the wrong kind (a hand edit, damage) is refused whole, as a file that is
    not JSON is: loaded, it left a unit whose PR commands all failed (INTERNAL TARGET FAILURE) while its
    reservation stayed enforced, so no initiator could PREEMPT or CLEAR it."""
    (tmp_path / "lun.img.pr").write_text(json.dumps(_SAVED))
    make_lu("file", tmp_path).close()  # the file as dump() writes it loads
    (tmp_path / "lun.img.pr").write_text(json.dumps(dict(_SAVED, **change)))
    with pytest.raises(ValueError, match=r"lun\.img\.pr: the saved persistent reservations cannot be read"):
        make_lu("file", tmp_path)


def test_aptpl_refused_without_a_file(lu):
    """A memory backing store offers no PTPL (PTPL_C=0): APTPL=1 is an invalid field."""
    assert sense_of(prout(lu, REGISTER, sark=K1, flags=0x01)) == S.INVALID_FIELD_IN_PARAMETER_LIST
