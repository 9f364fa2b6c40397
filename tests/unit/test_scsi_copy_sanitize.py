"""EXTENDED COPY / RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18), SANITIZE (SBC-4 §5.30) and SWP (SPC-4 §7.5.8)."""

from __future__ import annotations

import json

import pytest

from node_agent.scsi import sense as S
from node_agent.scsi.sense import parse_sense
from node_agent.scsi import xcopy as X
from node_agent.scsi.device import LogicalUnit, LunMap, LunSettings
from node_agent.scsi.vpd import LunIdentity
from node_agent.storage.backing import FileBackingStore, MemoryBackingStore
from node_agent.target_service import ATOMIC_OPT_IN_BYTES, LunSpec

from test_scsi_support import BS, NEXUS, OTHER, SIZE, cdb16, make_lu, run, sense_of

NBLOCKS = SIZE // BS


def _unit(volume: str, size: int = SIZE, **settings) -> LogicalUnit:
    return LogicalUnit(MemoryBackingStore(size, BS), LunIdentity(volume), target_name="iqn.2026-01.io.shoal:t",
                       settings=LunSettings(**settings))


@pytest.fixture
def pair():
    """Two logical units of one target (LUN 0 and 1), so copies can cross between them."""
    a, b = _unit("vol-a"), _unit("vol-b")
    LunMap({0: a, 1: b})
    for unit in (a, b):
        unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
        run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)  # clear POWER ON
    yield a, b
    a.close(), b.close()


def target_descriptor(unit, *, kind=X.IDENTIFICATION_DESCRIPTOR, lu_id_type=0, nul=False,
                      block_length=BS) -> bytes:
    desc = bytearray(32)
    desc[0] = kind
    desc[1] = lu_id_type << 6 | nul << 5
    desc[4], desc[5], desc[7] = 0x01, 0x03, len(unit.identity.naa)  # binary, LU association, NAA
    desc[8: 8 + len(unit.identity.naa)] = unit.identity.naa
    desc[29:32] = block_length.to_bytes(3, "big")
    return bytes(desc)


def segment(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, kind=X.BLOCK_TO_BLOCK) -> bytes:
    desc = bytearray(28)
    desc[0], desc[2:4] = kind, (24).to_bytes(2, "big")
    desc[4:6], desc[6:8] = src.to_bytes(2, "big"), dst.to_bytes(2, "big")
    desc[10:12] = blocks.to_bytes(2, "big")
    desc[12:20], desc[20:28] = src_lba.to_bytes(8, "big"), dst_lba.to_bytes(8, "big")
    return bytes(desc)


def parameter_list(targets: list[bytes], segments: list[bytes], list_id=1, usage=X.LIST_ID_HOLD) -> bytes:
    t, s = b"".join(targets), b"".join(segments)
    head = bytearray(16)
    head[0], head[1] = list_id, usage << 3
    head[2:4], head[8:12] = len(t).to_bytes(2, "big"), len(s).to_bytes(4, "big")
    return bytes(head) + t + s


def xcopy(unit, params: bytes, *, length: int | None = None, nexus=NEXUS):
    cdb = bytes([0x83, 0]) + bytes(8) + (len(params) if length is None else length).to_bytes(4, "big") + bytes(2)
    return run(unit, cdb, params, nexus=nexus)


def copy_results(unit, sa: int, list_id: int = 1, nexus=NEXUS):
    return run(unit, bytes([0x84, sa, list_id]) + bytes(7) + (1024).to_bytes(4, "big") + bytes(2), nexus=nexus)


def test_copy_between_luns_and_copy_status(pair):
    a, b = pair
    a.backing.write(10 * BS, b"A" * (8 * BS), False)
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 8, 10, 100)])
    assert xcopy(a, params).status == S.GOOD
    assert b.backing.read(100 * BS, 8 * BS) == b"A" * (8 * BS)
    status = copy_results(a, X.SA_COPY_STATUS)
    assert status.status == S.GOOD
    rec = X.COPY_STATUS.decode(status.data)
    assert (rec.copy_manager_status, rec.segments_processed, rec.transfer_count) == (X.COPY_COMPLETED, 1, 4)
    # held per I_T nexus: another initiator sees no such list, and a nexus loss forgets it
    assert sense_of(copy_results(a, X.SA_COPY_STATUS, nexus=OTHER)) == S.INVALID_FIELD_IN_CDB
    a.remove_nexus(NEXUS)
    assert not a.copy_results


def test_overlapping_copy_on_one_lun_moves_data_intact(tmp_path):
    """2 MiB in 1 MiB chunks, overlapping forward, on a file unit: its copy runs on a worker (a memory unit's
    copies run on the event loop, kept to one maximum WRITE's worth: ``xcopy.segment_limits``)."""
    a = LogicalUnit(FileBackingStore(tmp_path / "a.img", SIZE, block_size=BS), LunIdentity("vol-a"),
                    target_name="iqn.2026-01.io.shoal:t")
    a.add_nexus(NEXUS)
    run(a, bytes(6))
    pattern = bytes(range(256)) * (4096 * BS // 256)
    a.backing.write(0, pattern, False)
    params = parameter_list([target_descriptor(a)], [segment(0, 0, 4096, 0, 1024)], usage=X.LIST_ID_DISCARD)
    assert xcopy(a, params).status == S.GOOD
    assert a.backing.read(1024 * BS, 4096 * BS) == pattern
    assert sense_of(copy_results(a, X.SA_COPY_STATUS)) == S.INVALID_FIELD_IN_CDB  # DISCARD: nothing held
    a.close()


def test_parameter_list_errors_change_nothing(pair):
    a, b = pair
    good = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 8, 0, 0)])
    assert xcopy(a, b"", length=0).status == S.GOOD
    assert sense_of(xcopy(a, good[:47], length=47)) == S.PARAMETER_LIST_LENGTH_ERROR
    assert sense_of(xcopy(a, good, length=len(good) - 1)) == S.PARAMETER_LIST_LENGTH_ERROR
    too_many = parameter_list([target_descriptor(a)] * (X.MAX_TARGET_DESCRIPTORS + 1), [segment(0, 0, 1, 0, 1)])
    assert sense_of(xcopy(a, too_many)) == S.TOO_MANY_TARGET_DESCRIPTORS
    fc = parameter_list([target_descriptor(a, kind=0xE0)], [segment(0, 0, 1, 0, 1)])
    assert sense_of(xcopy(a, fc)) == S.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE
    lu_id_type = parameter_list([target_descriptor(a, lu_id_type=3)], [segment(0, 0, 1, 0, 1)], list_id=0,
                                usage=X.LIST_ID_NONE)
    assert xcopy(a, lu_id_type).status == S.GOOD  # SPC-4: LU ID TYPE is obsolete and ignored
    stream = parameter_list([target_descriptor(a)], [segment(0, 0, 1, 0, 1, kind=0x03)])
    assert sense_of(xcopy(a, stream)) == S.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE
    assert not any(b.backing.read(0, 8 * BS)) and not a.copy_results


def test_unreachable_targets_and_ranges_abort_the_copy(pair):
    a, b = pair
    cases = [
        parameter_list([target_descriptor(a)], [segment(0, 1, 8, 0, 0)]),  # no descriptor 1
        parameter_list([target_descriptor(a, nul=True)], [segment(0, 0, 8, 0, 100)]),  # NUL
        parameter_list([target_descriptor(a)], [segment(0, 0, 8, 0, NBLOCKS - 1)]),  # past the end
        parameter_list([target_descriptor(a, block_length=4096)], [segment(0, 0, 8, 0, 100)]),  # other medium
    ]
    for params in cases:
        r = xcopy(a, params)
        assert r.status == S.CHECK_CONDITION and sense_of(r).key == S.COPY_ABORTED
    details = copy_results(a, X.SA_FAILED_SEGMENT_DETAILS)
    rec = X.FAILED_SEGMENT_DETAILS_HEADER.decode(details.data)
    assert rec.copy_command_status == S.CHECK_CONDITION
    assert S.parse_sense(details.data[62:]).key == S.COPY_ABORTED


def test_copy_respects_write_protect_and_reservations(pair):
    a, b = pair
    params = parameter_list([target_descriptor(a), target_descriptor(b)], [segment(0, 1, 8, 0, 0)])
    b.read_only = True
    assert sense_of(xcopy(a, params)) == S.WRITE_PROTECTED
    b.read_only = False
    b.reservations.spc2_reserve(OTHER)
    assert xcopy(a, params).status == S.RESERVATION_CONFLICT


def test_operating_parameters_and_third_party_copy_vpd(pair):
    a, _ = pair
    rec = X.OPERATING_PARAMETERS.decode(copy_results(a, X.SA_OPERATING_PARAMETERS).data)
    assert (rec.maximum_target_descriptor_count, rec.maximum_segment_descriptor_count) == (
        X.MAX_TARGET_DESCRIPTORS, 1)  # a memory unit copies on the event loop: one segment per command
    page = run(a, bytes([0x12, 1, 0x8F, 4, 0, 0])).data
    assert page[1] == 0x8F and int.from_bytes(page[2:4], "big") == len(page) - 4
    assert page[4:6] == b"\x00\x01" and X.RECEIVE_COPY_RESULTS_OPCODE in page  # supported commands
    assert run(a, bytes([0x12, 0, 0, 0, 96, 0])).data[5] & 0x08  # 3PC in standard INQUIRY


# -- SANITIZE ---------------------------------------------------------------------------------
AUSE = 0x20  # SANITIZE byte 1: EXIT FAILURE MODE may end the failed state should this sanitize fail


def sanitize(unit, sa: int, params: bytes = b"", length: int | None = None, nexus=NEXUS):
    n = len(params) if length is None else length
    return run(unit, bytes([0x48, sa]) + bytes(5) + n.to_bytes(2, "big") + b"\0", params or None, nexus=nexus)


@pytest.fixture(params=["memory", "file"])
def lu(request, tmp_path):
    unit = make_lu(request.param, tmp_path)
    unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
    run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)
    yield unit
    unit.close()


def test_sanitize_overwrite_replicates_the_pattern(lu):
    lu.backing.write(0, b"x" * (16 * BS), False)
    assert sanitize(lu, 0x01, bytes([0x01, 0, 0, 4]) + b"\xde\xad\xbe\xef").status == S.GOOD
    assert lu.backing.read(0, 16) == b"\xde\xad\xbe\xef" * 4
    assert lu.backing.read(SIZE - BS, BS) == b"\xde\xad\xbe\xef" * (BS // 4)
    # INVERT with two passes: the last pass writes the pattern itself
    assert sanitize(lu, 0x01, bytes([0x82, 0, 0, 1]) + b"\x0f").status == S.GOOD
    assert lu.backing.read(0, BS) == b"\x0f" * BS


@pytest.mark.parametrize("params,length", [
    (b"", 4), (bytes([1, 0, 0, 1, 0]), BS + 5),  # parameter list length outside 5..block+4: CDB field
])
def test_sanitize_overwrite_bad_length_is_invalid_field_in_cdb(lu, params, length):
    r = sanitize(lu, 0x01, params.ljust(length, b"\0"), length=length)
    assert sense_of(r) == S.INVALID_FIELD_IN_CDB


@pytest.mark.parametrize("header", [bytes([0, 0, 0, 4]), bytes([1, 0, 0, 0]), bytes([1, 0, 2, 4])])
def test_sanitize_overwrite_bad_parameters_change_nothing(lu, header):
    lu.backing.write(0, b"k" * BS, False)
    assert sense_of(sanitize(lu, 0x01, header + b"\0" * 4)) == S.INVALID_FIELD_IN_PARAMETER_LIST
    assert lu.backing.read(0, BS) == b"k" * BS


def test_sanitize_block_erase_deallocates_everything(lu):
    lu.backing.write(0, b"z" * (64 << 10), False)
    assert sense_of(sanitize(lu, 0x02, bytes(8))) == S.INVALID_FIELD_IN_CDB
    assert sanitize(lu, 0x02).status == S.GOOD
    assert not any(lu.backing.read(0, 64 << 10))
    status = run(lu, cdb16(0x9E, 0, 4096, byte1=0x12))
    assert status.data[8 + 12] & 0x0F == 1  # deallocated


def test_sanitize_exit_failure_mode_crypto_erase_and_reservations(lu):
    assert sanitize(lu, 0x1F).status == S.GOOD
    assert sense_of(sanitize(lu, 0x1F, bytes(8))) == S.INVALID_FIELD_IN_CDB
    assert sense_of(sanitize(lu, 0x03)) == S.INVALID_FIELD_IN_CDB  # no crypto erase: nothing is encrypted
    lu.reservations.spc2_reserve(OTHER)
    assert sanitize(lu, 0x02).status == S.RESERVATION_CONFLICT


class FailingWrites:
    """A backing store whose writes and hole punches fail once ``budget`` of them have been done (a disk
    dying part way through a sanitize)."""

    def __init__(self, inner, budget: int):
        self._inner, self.budget = inner, budget

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise OSError(5, "Input/output error")

    def write(self, offset, data, fua=False):
        self._spend()
        return self._inner.write(offset, data, fua)

    def writev(self, offset, buffers, length):
        self._spend()
        return self._inner.writev(offset, buffers, length)

    def punch(self, offset, length):
        self._spend()
        return self._inner.punch(offset, length)


class FailingFileWrites(FailingWrites):
    """The same over a store that can say "would block": the unit runs SANITIZE as deferred I/O."""

    def read_nowait(self, offset, length):
        return self._inner.read_nowait(offset, length)

    def write_nowait(self, offset, data, fua=False):
        self._spend()
        return self._inner.write_nowait(offset, data, fua)


@pytest.mark.parametrize("kind", ["memory", "file"])  # the pass inline, or as a worker would run it
@pytest.mark.parametrize("action", ["overwrite", "block erase"])
def test_a_sanitize_that_fails_part_way_ends_media_access_until_exit_failure_mode(action, kind, tmp_path):
    """SBC-4 §4.11: a sanitize that fails leaves the unit refusing media access with MEDIUM ERROR, SANITIZE
    COMMAND FAILED (INQUIRY, REPORT LUNS, REQUEST SENSE and SANITIZE still answer), so a half-erased
    medium is never served as if all were well; EXIT FAILURE MODE, or a sanitize that succeeds, ends it."""
    if kind == "memory":
        inner, wrapper = MemoryBackingStore(SIZE, BS), FailingWrites
    else:
        inner, wrapper = FileBackingStore(tmp_path / "f.img", SIZE, block_size=BS), FailingFileWrites
    inner.write(0, b"secret" * 1000, False)
    budget = 1 if action == "overwrite" else 0  # the overwrite fails after its first write
    unit = LogicalUnit(wrapper(inner, budget), LunIdentity(volume_id="vol-failing"), target_name="iqn.x:t")
    unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
    run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)
    params = bytes([0x01, 0, 0, 1, 0xA5]) if action == "overwrite" else b""
    first = sanitize(unit, AUSE | (0x01 if action == "overwrite" else 0x02), params)
    assert first.status == S.CHECK_CONDITION  # the pass failed: its own status says so
    read = run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), nexus=OTHER)
    assert sense_of(read) == S.SANITIZE_COMMAND_FAILED
    assert sense_of(run(unit, bytes(6))) == S.SANITIZE_COMMAND_FAILED  # TEST UNIT READY too
    request_sense = run(unit, bytes([0x03, 0, 0, 0, 252, 0]), edtl=252)
    assert request_sense.status == S.GOOD and parse_sense(bytes(request_sense.data)) == S.SANITIZE_COMMAND_FAILED
    assert run(unit, bytes([0x12, 0, 0, 0, 96, 0])).status == S.GOOD  # INQUIRY answers
    assert run(unit, bytes([0xA0]) + bytes(5) + (64).to_bytes(4, "big") + bytes(2), edtl=64).status == S.GOOD
    assert sanitize(unit, 0x1F).status == S.GOOD  # EXIT FAILURE MODE (the sanitize had AUSE)
    assert run(unit, bytes(6)).status == S.GOOD
    assert run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), nexus=OTHER).status == S.GOOD
    # Failed again, without AUSE: EXIT FAILURE MODE is refused (SBC-4 §5.30.1); a sanitize that succeeds ends it.
    unit.backing.budget = 0
    assert sanitize(unit, 0x02).status == S.CHECK_CONDITION
    assert sense_of(run(unit, bytes(6))) == S.SANITIZE_COMMAND_FAILED
    assert sense_of(sanitize(unit, 0x1F)) == S.INVALID_FIELD_IN_CDB
    assert sense_of(run(unit, bytes(6))) == S.SANITIZE_COMMAND_FAILED
    unit.backing.budget = 10**6
    assert sanitize(unit, 0x02).status == S.GOOD
    assert run(unit, bytes(6)).status == S.GOOD and not any(inner.read(0, 6000))
    assert (unit.write_nowait is None) == (kind == "memory")  # which path the pass took
    unit.close()


@pytest.mark.parametrize("state", ["failed", "sanitizing", "ejected"])
@pytest.mark.parametrize("role", ["source", "destination"])
def test_extended_copy_does_not_reach_a_medium_out_of_reach(tmp_path, state, role):
    """EXTENDED COPY sent to another LUN must not read or write a unit whose own commands are refused: one
    left by a failed sanitize (its half-erased data copied out and served elsewhere), one whose sanitize
    runs (written under the pass), or a removable one whose medium is out.  The copy ends with COPY ABORTED,
    COPY TARGET DEVICE NOT REACHABLE, and neither medium changes."""
    a_inner = FileBackingStore(tmp_path / "a.img", SIZE, block_size=BS)
    a_inner.write(0, b"S" * BS * 4, False)
    a = LogicalUnit(FailingFileWrites(a_inner, 0 if state == "failed" else 10**6), LunIdentity("vol-a"),
                    target_name="iqn.x:t", settings=LunSettings(removable=state == "ejected"))
    b = LogicalUnit(FileBackingStore(tmp_path / "b.img", SIZE, block_size=BS), LunIdentity("vol-b"),
                    target_name="iqn.x:t")
    b.backing.write(0, b"N" * BS * 4, False)
    LunMap({0: a, 1: b})
    for unit in (a, b):
        unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
        run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)
    pending = None
    if state == "failed":
        assert sanitize(a, 0x02).status == S.CHECK_CONDITION
    elif state == "sanitizing":  # accepted, its pass not yet run by a "worker"
        pending = a.execute_deferrable(NEXUS, bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, 5, 0]), bytes([1, 0, 0, 1, 0xA5]),
                                       5)
        assert pending.blocking is not None and a.sanitizing
    else:
        assert run(a, bytes([0x1B, 0, 0, 0, 0x02, 0])).status == S.GOOD  # START STOP UNIT: eject
    descriptors = [target_descriptor(a), target_descriptor(b)]
    source, destination = (0, 1) if role == "source" else (1, 0)
    result = xcopy(b, parameter_list(descriptors, [segment(source, destination, 4, 0, 0)]), nexus=OTHER)
    assert result.status == S.CHECK_CONDITION and sense_of(result) == S.COPY_TARGET_DEVICE_NOT_REACHABLE
    assert a_inner.read(0, 4) == b"SSSS" and b.backing.read(0, 4) == b"NNNN"
    if pending is not None:
        pending.blocking()
    a.close(), b.close()


def test_a_write_accepted_before_a_sanitize_does_not_land_after_its_pass(tmp_path):
    """A WRITE accepted before the SANITIZE and still running on a worker when the pass's worker starts (the
    portal's pool starts one unit's jobs in order, not one at a time) must not land after the pass: its data
    would outlive a sanitize that answered GOOD.  The pass waits for it."""
    import threading

    release, writing = threading.Event(), threading.Event()

    class HeldWrites(FailingFileWrites):  # every write "would block"; the first waits for ``release``
        def write_nowait(self, offset, data, fua=False):
            return False

        def write(self, offset, data, fua=False):
            if not writing.is_set():
                writing.set()
                release.wait(10)
            return super().write(offset, data, fua)

    inner = FileBackingStore(tmp_path / "f.img", SIZE, block_size=BS)
    unit = LogicalUnit(HeldWrites(inner, 10**6), LunIdentity(volume_id="vol-order"), target_name="iqn.x:t")
    unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
    run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)
    write = unit.execute_deferrable(OTHER, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), b"OLD!" * (BS // 4), BS)
    erase = unit.execute_deferrable(NEXUS, bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, 5, 0]), bytes([1, 0, 0, 1, 0xA5]), 5)
    assert write.blocking is not None and erase.blocking is not None
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("write", write.blocking()))
    first.start()
    assert writing.wait(10)  # the WRITE runs on its worker, held inside the store
    second = threading.Thread(target=lambda: results.setdefault("sanitize", erase.blocking()))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the pass began while a WRITE accepted before it still ran"
    release.set()
    first.join(10), second.join(10)
    assert results["write"].status == results["sanitize"].status == S.GOOD
    assert inner.read(0, 4) == b"\xa5" * 4  # the pass came last
    unit.close()


def test_an_initiator_left_after_a_failed_sanitize_can_preempt_the_reservation_and_recover(tmp_path):
    """The failed state ends media access only (SBC-4 §4.11): the reservation commands still run, so the
    initiator left when the holder of a WRITE EXCLUSIVE reservation failed a sanitize and died can PREEMPT
    it, then sanitize again (or EXIT FAILURE MODE); before, PREEMPT got SANITIZE COMMAND FAILED and the others
    RESERVATION CONFLICT, a state only a fence could end."""
    from test_scsi_reservations import K1, K2, PREEMPT, REGISTER, RESERVE, WE, prout

    inner = FileBackingStore(tmp_path / "f.img", SIZE, block_size=BS)
    unit = LogicalUnit(FailingFileWrites(inner, 0), LunIdentity(volume_id="vol-pr"), target_name="iqn.x:t")
    unit.add_nexus(NEXUS), unit.add_nexus(OTHER)
    run(unit, bytes(6)), run(unit, bytes(6), nexus=OTHER)
    assert prout(unit, REGISTER, 0, K1).status == prout(unit, REGISTER, 0, K2, nexus=OTHER).status == S.GOOD
    assert prout(unit, RESERVE, K1, pr_type=WE).status == S.GOOD
    assert sanitize(unit, 0x02).status == S.CHECK_CONDITION  # the holder's block erase fails
    assert sanitize(unit, 0x02, nexus=OTHER).status == S.RESERVATION_CONFLICT
    assert prout(unit, PREEMPT, K2, K1, pr_type=WE, nexus=OTHER).status == S.GOOD
    run(unit, bytes(6), nexus=OTHER)  # a unit attention may be queued; the state is still failed
    unit.backing.budget = 10**6
    assert sanitize(unit, 0x02, nexus=OTHER).status == S.GOOD
    assert run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), nexus=OTHER).status == S.GOOD
    unit.close()


def test_the_failed_sanitize_state_outlives_the_unit(tmp_path):
    """The failed-sanitize state is kept beside the backing file (``<file>.sanitize``): on disk before the
    pass writes its first block, there for as long as the pass runs or the unit stays failed, so a unit
    opened again on the file (a restarted target or agent, after a crash or a kill part way through the
    pass: the process is gone, the half-erased medium is not) starts in the failed state.  EXIT FAILURE
    MODE removes the mark, and so does a sanitize that succeeds (after its flush)."""
    path, mark = tmp_path / "f.img", tmp_path / "f.img.sanitize"
    seen = []

    class Watched(FailingFileWrites):
        def _spend(self):
            seen.append(mark.exists())
            super()._spend()

    def open_unit(budget=10**6):
        inner = FileBackingStore(path, SIZE, block_size=BS)
        unit = LogicalUnit(Watched(inner, budget), LunIdentity(volume_id="vol-kept"), target_name="iqn.x:t")
        unit.add_nexus(NEXUS)
        run(unit, bytes(6))  # the power-on unit attention
        return unit

    FileBackingStore(path, SIZE, block_size=BS).write(0, b"secret" * 1000, False)
    unit = open_unit(budget=1)
    assert sanitize(unit, AUSE | 0x01, bytes([0x01, 0, 0, 1, 0xA5])).status == S.CHECK_CONDITION  # fails part way
    assert seen == [True, True] and mark.exists()
    unit.close()  # dropped in the failed state, as a kill would leave it
    assert "SANITIZE OVERWRITE" in mark.read_text() and json.loads(mark.read_text())["ause"] is True
    again = open_unit()
    assert sense_of(run(again, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]))) == S.SANITIZE_COMMAND_FAILED
    request_sense = run(again, bytes([0x03, 0, 0, 0, 252, 0]), edtl=252)
    assert parse_sense(bytes(request_sense.data)) == S.SANITIZE_COMMAND_FAILED
    assert sanitize(again, 0x1F).status == S.GOOD and not mark.exists()  # EXIT FAILURE MODE
    assert run(again, bytes(6)).status == S.GOOD
    again.close()
    fresh = open_unit()
    assert run(fresh, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])).status == S.GOOD  # the mark went with the state
    seen.clear()
    assert sanitize(fresh, 0x02).status == S.GOOD and not mark.exists()  # a block erase that succeeds
    assert seen == [True] and not any(fresh.backing.read(0, 6000))
    fresh.close()
    assert not mark.exists() and run(open_unit(), bytes(6)).status == S.GOOD


def test_a_sanitize_whose_mark_cannot_be_written_erases_nothing_and_changes_no_state(tmp_path, monkeypatch):
    """The mark goes to disk before the first block changes; if it cannot (a full or read-only directory),
    the SANITIZE fails without touching the medium, and the unit is not left in the failed state."""
    from node_agent.scsi import sidecar

    def refuse(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sidecar, "write_durably", refuse)
    inner = FileBackingStore(tmp_path / "f.img", SIZE, block_size=BS)
    inner.write(0, b"keep" * 100, False)
    unit = LogicalUnit(FailingFileWrites(inner, 10**6), LunIdentity(volume_id="vol-m"), target_name="iqn.x:t")
    unit.add_nexus(NEXUS)
    run(unit, bytes(6))
    assert sanitize(unit, 0x02).status == S.CHECK_CONDITION
    assert inner.read(0, 4) == b"keep" and not (tmp_path / "f.img.sanitize").exists()
    assert run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])).status == S.GOOD
    unit.close()


def test_a_unit_without_a_regular_file_keeps_no_sanitize_mark():
    """Memory stores and block devices have no place for a sidecar: their units work as before (the state
    lasts as long as the unit)."""
    from node_agent.scsi.sidecar import SanitizeMark
    assert SanitizeMark.beside(MemoryBackingStore(SIZE, BS)) is None
    assert SanitizeMark.beside(type("Dev", (), {"path": "/dev/null", "read_only": False})()) is None


def test_a_read_only_unit_honours_the_mark_and_needs_a_writable_one_to_leave_it(tmp_path):
    """A read-only export of a volume whose sanitize failed must not serve the half-erased medium either; it
    cannot leave the state (EXIT FAILURE MODE writes: DATA PROTECT), a writable export of it can."""
    path, mark = tmp_path / "r.img", tmp_path / "r.img.sanitize"
    FileBackingStore(path, SIZE, block_size=BS).close()
    mark.write_text('{"ause": true}')
    unit = LogicalUnit(FileBackingStore(path, read_only=True), LunIdentity(volume_id="vol-ro"), target_name="iqn.x:t")
    unit.add_nexus(NEXUS)
    run(unit, bytes(6))
    assert sense_of(run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]))) == S.SANITIZE_COMMAND_FAILED
    assert sense_of(sanitize(unit, 0x1F)) == S.WRITE_PROTECTED and mark.exists()
    unit.close()
    writable = LogicalUnit(FileBackingStore(path), LunIdentity(volume_id="vol-ro"), target_name="iqn.x:t")
    writable.add_nexus(NEXUS)
    run(writable, bytes(6))
    assert sanitize(writable, 0x1F).status == S.GOOD and not mark.exists()
    assert run(writable, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])).status == S.GOOD
    writable.close()


# -- write protect --------------------------------------------------------------------------
def mode_select_swp(unit, on: bool, nexus=NEXUS):
    page = bytearray(run(unit, bytes([0x1A, 0x08, 0x0A, 0, 255, 0]), nexus=nexus).data[4:])
    page[0] &= 0x3F  # PS is reserved in MODE SELECT
    page[4] = (page[4] & ~0x08) | (0x08 if on else 0)
    data = bytes(4) + bytes(page)
    return run(unit, bytes([0x15, 0x10, 0, 0, len(data), 0]), data, nexus=nexus)


def test_swp_write_protects_for_every_nexus_until_cleared(lu):
    assert mode_select_swp(lu, True, nexus=OTHER).status == S.GOOD
    assert sense_of(run(lu, bytes(6))) == S.MODE_PARAMETERS_CHANGED
    w = run(lu, cdb16(0x8A, 0, 1), b"\0" * BS)
    assert w.status == S.CHECK_CONDITION and sense_of(w).key == S.DATA_PROTECT
    assert run(lu, bytes([0x1A, 0, 0x3F, 0, 255, 0])).data[2] & 0x80  # WP in the mode parameter header
    assert mode_select_swp(lu, False, nexus=OTHER).status == S.GOOD
    run(lu, bytes(6))
    assert run(lu, cdb16(0x8A, 0, 1), b"\0" * BS).status == S.GOOD


def test_read_only_lun_stays_protected_when_swp_is_cleared(tmp_path):
    unit = make_lu("memory", read_only=True)
    unit.add_nexus(NEXUS)
    run(unit, bytes(6))
    assert mode_select_swp(unit, False).status == S.GOOD
    assert sense_of(run(unit, cdb16(0x8A, 0, 1), b"\0" * BS)) == S.WRITE_PROTECTED


# -- removable medium ---------------------------------------------------------------------------
def start_stop(unit, *, load: bool, nexus=NEXUS):
    return run(unit, bytes([0x1B, 0, 0, 0, 0x02 | int(load), 0]), nexus=nexus)


def prevent(unit, on: bool, nexus=NEXUS):
    return run(unit, bytes([0x1E, 0, 0, 0, int(on), 0]), nexus=nexus)


def test_removable_medium_eject_load_and_prevent():
    unit = make_lu("memory", removable=True)
    for n in (NEXUS, OTHER):
        unit.add_nexus(n), run(unit, bytes(6), nexus=n)
    assert run(unit, bytes([0x12, 0, 0, 0, 96, 0])).data[1] & 0x80  # RMB
    assert prevent(unit, True, nexus=OTHER).status == S.GOOD
    assert sense_of(start_stop(unit, load=False)) == S.MEDIUM_REMOVAL_PREVENTED  # another nexus prevents it
    assert prevent(unit, False, nexus=OTHER).status == S.GOOD
    assert start_stop(unit, load=False).status == S.GOOD
    for cdb in (bytes(6), cdb16(0x88, 0, 1), cdb16(0x8A, 0, 1)):
        assert sense_of(run(unit, cdb, b"\0" * BS if cdb[0] == 0x8A else None)) == S.MEDIUM_NOT_PRESENT
    assert run(unit, bytes([0x12, 0, 0, 0, 96, 0])).status == S.GOOD  # INQUIRY still answers
    assert start_stop(unit, load=True).status == S.GOOD
    assert run(unit, bytes(6)).status == S.GOOD


@pytest.mark.parametrize("how", ["lun", "target", "nexus loss"])
def test_resets_and_nexus_loss_end_prevention(how):
    unit = make_lu("memory", removable=True)
    unit.add_nexus(NEXUS), run(unit, bytes(6))
    prevent(unit, True)
    if how == "nexus loss":
        unit.remove_nexus(NEXUS)
        unit.add_nexus(NEXUS)
    else:
        unit.reset(how)
    run(unit, bytes(6))  # the reset's unit attention
    assert start_stop(unit, load=False).status == S.GOOD


def test_fixed_medium_refuses_eject_and_accepts_prevent(lu):
    assert sense_of(start_stop(lu, load=False)) == S.INVALID_FIELD_IN_CDB
    assert prevent(lu, True).status == S.GOOD and not lu.prevent_removal


# -- LUN options on the command line ------------------------------------------------------------
@pytest.mark.parametrize("text,path,size,ro,atomic", [
    ("/d/a.img", "/d/a.img", None, False, 0),
    ("/d/a.img:64M", "/d/a.img", 64 << 20, False, 0),
    ("/d/a.img:64M:ro", "/d/a.img", 64 << 20, True, 0),
    ("/d/a.img:ro", "/d/a.img", None, True, 0),
    ("/d/a.img:16M:atomic:ro", "/d/a.img", 16 << 20, True, ATOMIC_OPT_IN_BYTES),
    ("/d/a.img:16M:removable", "/d/a.img", 16 << 20, False, 0),
])
def test_lun_spec_options(text, path, size, ro, atomic):
    spec = LunSpec.parse(text)
    assert (spec.path, spec.size, spec.settings.read_only, spec.settings.max_atomic_transfer_bytes) == (
        path, size, ro, atomic)


def test_lun_spec_without_a_path_is_refused():
    with pytest.raises(ValueError):
        LunSpec.parse(":ro")


def test_report_supported_task_management_functions(lu):
    """SPC-4 §6.40: ATS, ATSS, CTSS, LURS and TRS; the extended format with REPTD=1."""
    cdb = bytes([0xA3, 0x0D, 0, 0, 0, 0]) + (16).to_bytes(4, "big") + bytes(2)
    assert run(lu, cdb).data == bytes([0xDA, 0x00, 0x00, 0x00])
    extended = run(lu, cdb[:2] + b"\x80" + cdb[3:]).data
    assert len(extended) == 16 and extended[3] == 0x0C


def test_an_atomic_units_sanitize_runs_on_a_worker_not_on_the_loop(tmp_path):
    """A WRITE ATOMIC unit runs its reads and writes inline, one at a time; its SANITIZE pass (minutes on a
    large medium) goes to a worker all the same, so the portal's loop serves other sessions meanwhile, while
    the gate refuses the unit's other commands (SANITIZE IN PROGRESS) and its atomicity holds."""
    unit = LogicalUnit(FileBackingStore(tmp_path / "a.img", SIZE, block_size=BS), LunIdentity("vol-a"),
                       target_name="iqn.x:t", settings=LunSettings(max_atomic_transfer_bytes=1 << 20))
    unit.backing.write(0, b"S" * BS * 4, False)
    unit.add_nexus(NEXUS)
    run(unit, bytes(6))
    pending = unit.execute_deferrable(NEXUS, bytes([0x48, 0x02]) + bytes(8), None, 0)  # BLOCK ERASE
    assert pending.blocking is not None and unit.sanitizing
    assert sense_of(run(unit, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]))) == S.SANITIZE_IN_PROGRESS
    assert pending.blocking().status == S.GOOD and not unit.sanitizing
    assert not any(unit.backing.read(0, BS * 4))
    unit.close()
