"""Persistent reservations, from a review: a PERSISTENT RESERVE OUT whose APTPL save fails is undone (SPC-4
§5.13.5: what is in force is what a power loss keeps), a read-only unit keeps its saved reservations, and the
conflict table's entries for READ CAPACITY, READ DEFECT DATA and START STOP UNIT (SBC-3 §4.16 table 13, SPC-2
§5.5.1 and table B.1)."""

from __future__ import annotations

import errno
import json

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.device import LogicalUnit, LunSettings
from node_agent.scsi.persistent_reserve import INSUFFICIENT_REGISTRATION_RESOURCES, remove_initiator
from node_agent.scsi.ptpl import UnsavedChangeIncluded
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage.backing import FileBackingStore

from test_scsi_reservations import (CLEAR, EA, EA_RO, K1, K2, OBSERVER, PREEMPT, PREEMPT_AND_ABORT,
                                    REGISTER_AND_IGNORE, RELEASE, REPORT_CAPABILITIES, RESERVE, THIRD, WE,
                                    WE_RO, keys, prout, reservation)
from test_scsi_support import BS, NEXUS, OTHER, cdb10, cdb16, make_lu, run, sense_of

APTPL = 0x01
K3 = 0x3333_3333_3333_3333


def logged_in(unit, nexuses=(NEXUS, OTHER, THIRD, OBSERVER)):
    for n in nexuses:
        unit.add_nexus(n)
        run(unit, bytes(6), nexus=n)  # past POWER ON RESET
    return unit


@pytest.fixture(params=["worker", "inline"])
def unit(request, tmp_path):
    """A unit on a file, its saves on a worker (a store with non-blocking I/O: the command's answer comes from
    the deferred job) or inline (an ``atomic`` unit runs all its I/O on the loop)."""
    atomic = {"max_atomic_transfer_bytes": 1 << 20} if request.param == "inline" else {}
    lu = logged_in(make_lu("file", tmp_path, **atomic))
    assert (lu.write_nowait is None) == (request.param == "inline")
    yield lu
    lu.close()


def failing(store, monkeypatch, code=errno.ENOSPC):
    """Saves (and removals) of ``store`` fail with ``code``, as on a full or broken file system."""
    def fail(*args):
        raise OSError(code, "injected")
    monkeypatch.setattr(store, "save", fail)
    monkeypatch.setattr(store, "remove", fail)


def saved_file(lu):
    with open(lu.reservations.store.path) as handle:
        return json.load(handle)


def tur(lu, nexus):
    """TEST UNIT READY's answer: GOOD, or the pending unit attention."""
    result = run(lu, bytes(6), nexus=nexus)
    return S.GOOD if result.status == S.GOOD else sense_of(result)


# -- 1. a PERSISTENT RESERVE OUT whose save fails is undone --------------------------------------------
@pytest.mark.parametrize("code,sense", [(errno.ENOSPC, INSUFFICIENT_REGISTRATION_RESOURCES),
                                        (errno.EDQUOT, INSUFFICIENT_REGISTRATION_RESOURCES),
                                        (errno.EIO, S.INTERNAL_TARGET_FAILURE)], ids=["ENOSPC", "EDQUOT", "EIO"])
@pytest.mark.parametrize("sa", [PREEMPT, PREEMPT_AND_ABORT])
def test_a_preempt_whose_save_fails_is_undone_and_tells_nobody(unit, monkeypatch, sa, code, sense):
    """SPC-4 §5.13.5: with APTPL=1 the state in force is the state saved.  A PREEMPT whose save fails ends with
    CHECK CONDITION (a full file system: ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES, §5.13.7;
    anything else: HARDWARE ERROR, INTERNAL TARGET FAILURE) and leaves nothing of itself: the preempted
    initiator keeps its registration and reservation and gets no REGISTRATIONS PREEMPTED, the generation
    and the saved file are as before, and the next save works."""
    assert prout(unit, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    assert prout(unit, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER).status == S.GOOD
    assert prout(unit, RESERVE, K2, pr_type=EA, nexus=OTHER).status == S.GOOD
    before, on_disk = (keys(unit), reservation(unit)), saved_file(unit)
    failing(unit.reservations.store, monkeypatch, code)

    answer = prout(unit, sa, K1, K2, pr_type=EA)
    assert answer.status == S.CHECK_CONDITION and sense_of(answer) == sense
    assert (keys(unit), reservation(unit)) == before == ((2, [K1, K2]), (K2, EA))
    assert tur(unit, OTHER) == S.GOOD  # no REGISTRATIONS PREEMPTED for a preemption that did not happen
    assert run(unit, cdb10(0x2A, 0, 1), bytes(BS), nexus=OTHER).status == S.GOOD  # still the holder
    assert run(unit, cdb10(0x28, 0, 1)).status == S.RESERVATION_CONFLICT
    assert saved_file(unit) == on_disk

    monkeypatch.undo()
    assert prout(unit, sa, K1, K2, pr_type=EA).status == S.GOOD  # the disk is back: the same PREEMPT works
    assert tur(unit, OTHER) == S.REGISTRATIONS_PREEMPTED
    assert keys(unit) == (3, [K1]) and saved_file(unit)["generation"] == 3


def test_release_and_clear_whose_save_fails_announce_nothing(unit, monkeypatch):
    """RELEASE of a registrants-only reservation and CLEAR tell the other registrants (RESERVATIONS RELEASED,
    RESERVATIONS PREEMPTED, SPC-4 §5.13.11.2) only once the change is saved: not for one that was undone."""
    assert prout(unit, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    assert prout(unit, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER).status == S.GOOD
    assert prout(unit, RESERVE, K1, pr_type=WE_RO).status == S.GOOD
    failing(unit.reservations.store, monkeypatch, errno.EIO)
    for answer in (prout(unit, RELEASE, K1, pr_type=WE_RO), prout(unit, CLEAR, K1)):
        assert sense_of(answer) == S.INTERNAL_TARGET_FAILURE
        assert reservation(unit) == (K1, WE_RO) and keys(unit) == (2, [K1, K2])
        assert tur(unit, OTHER) == S.GOOD


def test_a_register_with_aptpl_0_whose_removal_fails_keeps_aptpl(unit, monkeypatch):
    """APTPL=0 drops the saved copy; when that fails the REGISTER is undone: the new key, and APTPL=0 with it
    (PTPL_A still 1), so the state in force is still the one on disk."""
    assert prout(unit, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    failing(unit.reservations.store, monkeypatch, errno.EIO)
    assert sense_of(prout(unit, REGISTER_AND_IGNORE, sark=K2)) == S.INTERNAL_TARGET_FAILURE
    assert keys(unit) == (1, [K1]) and unit.reservations.aptpl
    assert run(unit, bytes([0x5E, REPORT_CAPABILITIES, 0, 0, 0, 0, 0, 0, 8, 0])).data[3] & 0x01  # PTPL_A


def deferred_prout(lu, sa, key=0, sark=0, *, pr_type=0, flags=0, nexus=NEXUS):
    """A PERSISTENT RESERVE OUT as the transport runs it: decided now, its save (``blocking``) run later."""
    cdb = bytes([0x5F, sa, pr_type, 0, 0, 0, 0, 0, 24, 0])
    data = key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(4) + bytes([flags]) + bytes(3)
    result = lu.execute_deferrable(nexus, cdb, data, 24)
    assert result.blocking is not None
    return result.blocking


def test_a_change_made_on_top_of_one_whose_save_fails_is_undone_with_it(tmp_path, monkeypatch):
    """Two initiators register while the first save is still on its worker: the second state holds the first
    registration.  The first save fails: the store refuses to write the second (it would put the undone
    registration on disk), both commands fail, both are undone, and a fence taken on top of them meanwhile is
    undone too (its caller's save raises; its retry removes the registration again).  Changes made after
    that are saved as usual."""
    lu = logged_in(make_lu("file", tmp_path))
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    store, on_disk = lu.reservations.store, saved_file(lu)
    first = deferred_prout(lu, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER)
    second = deferred_prout(lu, REGISTER_AND_IGNORE, sark=K3, flags=APTPL, nexus=THIRD)
    assert remove_initiator(lu, NEXUS.initiator_port.split(",")[0], save=False) == [NEXUS]
    fence_save = lu.reservations.save_later()
    real_save = store.save
    failing(store, monkeypatch, errno.EIO)
    assert sense_of(first()) == S.INTERNAL_TARGET_FAILURE
    monkeypatch.setattr(store, "save", real_save)  # the disk is fine again: still, nothing later is written
    assert sense_of(second()) == S.INTERNAL_TARGET_FAILURE
    with pytest.raises(UnsavedChangeIncluded):
        fence_save()
    assert saved_file(lu) == on_disk
    assert keys(lu) == (1, [K1]) and tur(lu, OTHER) == S.GOOD
    assert tur(lu, NEXUS) == S.GOOD  # no REGISTRATIONS PREEMPTED: the fence was undone
    assert remove_initiator(lu, NEXUS.initiator_port.split(",")[0]) == [NEXUS]  # the fence's retry
    assert keys(lu) == (2, []) and saved_file(lu)["registrations"] == []
    assert prout(lu, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER).status == S.GOOD
    assert [r["key"] for r in saved_file(lu)["registrations"]] == [K2]
    lu.close()


def test_saves_that_end_out_of_order_keep_both_changes(tmp_path):
    """The later of two saves ends first: it wrote both registrations, the earlier one has nothing left to do;
    both commands answer GOOD and nothing is undone (``save_later`` numbering)."""
    lu = logged_in(make_lu("file", tmp_path))
    first = deferred_prout(lu, REGISTER_AND_IGNORE, sark=K1, flags=APTPL)
    second = deferred_prout(lu, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER)
    assert second().status == S.GOOD and first().status == S.GOOD
    assert keys(lu) == (2, [K1, K2])
    assert [r["key"] for r in saved_file(lu)["registrations"]] == [K1, K2]
    lu.close()


def test_a_preempt_and_abort_waits_for_its_save_before_announcing(tmp_path):
    """While the save of a PREEMPT runs, the preempted initiator is fenced already (its WRITE conflicts) but is
    told only once the save has ended: the unit attention is for a preemption that happened."""
    lu = logged_in(make_lu("file", tmp_path))
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    assert prout(lu, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER).status == S.GOOD
    assert prout(lu, RESERVE, K2, pr_type=WE, nexus=OTHER).status == S.GOOD
    save = deferred_prout(lu, PREEMPT_AND_ABORT, K1, K2, pr_type=WE)
    assert run(lu, cdb10(0x2A, 0, 1), bytes(BS), nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert tur(lu, OTHER) == S.GOOD
    assert save().status == S.GOOD
    assert tur(lu, OTHER) == S.REGISTRATIONS_PREEMPTED
    lu.close()


# -- 2. a read-only unit keeps its saved reservations ----------------------------------------------------
@pytest.mark.parametrize("how", ["read-only backing store", "LunSettings(read_only=True)"])
def test_a_read_only_unit_honours_and_keeps_its_saved_reservations(tmp_path, how):
    """Reservations persisted with APTPL (SPC-4 §5.13.5) hold when the volume is exported read-only: the unit
    loads them, reports PTPL_C and PTPL_A, enforces them, and saves what later changes make of them (the
    ``.pr`` file is reservation metadata, not medium data: write protection is of the medium)."""
    lu = logged_in(make_lu("file", tmp_path))
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1, flags=APTPL).status == S.GOOD
    assert prout(lu, REGISTER_AND_IGNORE, sark=K2, flags=APTPL, nexus=OTHER).status == S.GOOD
    assert prout(lu, RESERVE, K1, pr_type=EA_RO).status == S.GOOD
    lu.close()

    path = tmp_path / "lun.img"
    if how == "read-only backing store":
        backing, settings = FileBackingStore(path, read_only=True, block_size=BS), LunSettings()
    else:
        backing, settings = FileBackingStore(path, block_size=BS), LunSettings(read_only=True)
    ro = logged_in(LogicalUnit(backing, LunIdentity("vol-0001"), target_name="t", settings=settings))
    assert ro.read_only
    assert reservation(ro) == (K1, EA_RO) and keys(ro) == (2, [K1, K2])
    caps = run(ro, bytes([0x5E, REPORT_CAPABILITIES, 0, 0, 0, 0, 0, 0, 8, 0])).data
    assert caps[2] & 0x01 and caps[3] & 0x01  # PTPL_C, PTPL_A
    assert run(ro, cdb10(0x28, 0, 1), nexus=THIRD).status == S.RESERVATION_CONFLICT
    assert run(ro, cdb10(0x28, 0, 1), nexus=OTHER).status == S.GOOD
    assert sense_of(run(ro, cdb10(0x2A, 0, 1), bytes(BS))) == S.WRITE_PROTECTED
    assert prout(ro, PREEMPT, K2, K1, pr_type=EA_RO, nexus=OTHER).status == S.GOOD
    ro.close()
    again = logged_in(make_lu("file", tmp_path))
    assert reservation(again) == (K2, EA_RO) and keys(again) == (3, [K2])
    again.close()


# -- 3. the conflict table ------------------------------------------------------------------------------
READ_CAPACITY_10 = bytes([0x25]) + bytes(9)
READ_CAPACITY_16 = cdb16(0x9E, 0, 32, byte1=0x10)
READ_DEFECT_DATA_10 = bytes([0x37, 0, 0x18, 0, 0, 0, 0, 0, 8, 0])
READ_DEFECT_DATA_12 = bytes([0xB7, 0x18]) + bytes(4) + (8).to_bytes(4, "big") + bytes(2)


def ssu(start: int, power_condition: int = 0) -> bytes:
    """START STOP UNIT (SBC-3 §5.20), IMMED and NO_FLUSH off."""
    return bytes([0x1B, 0, 0, 0, power_condition << 4 | start, 0])


@pytest.fixture
def lu():
    unit = logged_in(make_lu("memory"))
    yield unit
    unit.close()


@pytest.mark.parametrize("cdb", [READ_CAPACITY_10, READ_CAPACITY_16], ids=["10", "16"])
def test_read_capacity_runs_under_another_nexus_s_reserve(lu, cdb):
    """SPC-2 table B.1: READ CAPACITY is allowed while another initiator holds a RESERVE(6)/(10) (a host
    scanning a shared LUN sizes it); a READ still conflicts."""
    assert run(lu, bytes([0x16, 0, 0, 0, 0, 0])).status == S.GOOD
    assert run(lu, cdb, nexus=OTHER).status == S.GOOD
    assert run(lu, cdb10(0x28, 0, 1), nexus=OTHER).status == S.RESERVATION_CONFLICT


@pytest.mark.parametrize("cdb", [READ_DEFECT_DATA_10, READ_DEFECT_DATA_12], ids=["10", "12"])
def test_read_defect_data_conflicts_with_write_exclusive(lu, cdb):
    """SBC-3 table 13: READ DEFECT DATA conflicts under Write Exclusive and Exclusive Access from any other
    I_T nexus, registered or not, and under the registrants-only types from an unregistered one; a
    registrant of a registrants-only type may send it, and so may the holder."""
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1).status == S.GOOD
    assert prout(lu, REGISTER_AND_IGNORE, sark=K2, nexus=OTHER).status == S.GOOD
    for pr_type in (WE, EA):
        assert prout(lu, RESERVE, K1, pr_type=pr_type).status == S.GOOD
        assert run(lu, cdb).status == S.GOOD
        assert run(lu, cdb, nexus=OTHER).status == S.RESERVATION_CONFLICT
        assert run(lu, cdb, nexus=THIRD).status == S.RESERVATION_CONFLICT
        assert prout(lu, RELEASE, K1, pr_type=pr_type).status == S.GOOD
    assert prout(lu, RESERVE, K1, pr_type=WE_RO).status == S.GOOD
    assert run(lu, cdb, nexus=OTHER).status == S.GOOD
    assert run(lu, cdb, nexus=THIRD).status == S.RESERVATION_CONFLICT


@pytest.mark.parametrize("pr_type", [WE, EA, EA_RO])
def test_start_stop_unit_start_runs_under_any_reservation_other_forms_conflict(lu, pr_type):
    """SBC-3 table 13: START STOP UNIT with START=1 and POWER CONDITION 0 is allowed under every persistent
    reservation; with START=0, or any other POWER CONDITION, it conflicts as a write does."""
    assert prout(lu, REGISTER_AND_IGNORE, sark=K1).status == S.GOOD
    assert prout(lu, RESERVE, K1, pr_type=pr_type).status == S.GOOD
    assert run(lu, ssu(1), nexus=THIRD).status == S.GOOD
    for other in (ssu(0), ssu(1, power_condition=1), ssu(0, power_condition=3)):
        assert run(lu, other, nexus=THIRD).status == S.RESERVATION_CONFLICT
        assert run(lu, other).status == S.GOOD  # the holder


def test_start_stop_unit_start_runs_under_another_nexus_s_reserve(lu):
    """SPC-2 table B.1: the same under a RESERVE(6) held by another initiator."""
    assert run(lu, bytes([0x16, 0, 0, 0, 0, 0])).status == S.GOOD
    assert run(lu, ssu(1), nexus=OTHER).status == S.GOOD
    assert run(lu, ssu(0), nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert run(lu, ssu(1, power_condition=1), nexus=OTHER).status == S.RESERVATION_CONFLICT


def test_a_short_start_stop_unit_cdb_is_not_exempt():
    """The exemption reads the CDB's bytes before it is validated: a CDB too short to say START=1 is not."""
    from node_agent.scsi.commands import COMMANDS_BY_OPCODE
    command = COMMANDS_BY_OPCODE[0x1B]
    assert command.runs_reserved(ssu(1)) and not command.runs_reserved(ssu(1)[:4])
    assert not command.runs_reserved(ssu(1, 2)) and not command.runs_reserved(ssu(0))
