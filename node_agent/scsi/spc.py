"""Primary commands (SPC-4 §6) for a block logical unit.

Handlers take ``(lu, nexus, cdb, data_out, expected_length)`` where ``cdb`` is
the decoded record of the command's layout, and return Data-In bytes, a
``ScsiResult`` or None (GOOD, no data).  They raise ``CheckCondition``.
"""

from __future__ import annotations

from node_agent.scsi import sense as S
from node_agent.scsi import vpd as V
from node_agent.scsi import xcopy
from node_agent.scsi.cdb import REPORT_LUNS_HEADER
from node_agent.scsi.lun import encode_lun
from node_agent.scsi.modepages import (
    LONG_LBA_BLOCK_DESCRIPTOR,
    MODE_PARAMETER_HEADER_6,
    MODE_PARAMETER_HEADER_10,
    SHORT_LBA_BLOCK_DESCRIPTOR,
)
from node_agent.scsi.sense import CheckCondition, build_sense


def test_unit_ready(lu, nexus, cdb, data_out, edtl):
    """TEST UNIT READY (SPC-4 §6.47): the medium is always ready."""
    return None


def inquiry(lu, nexus, cdb, data_out, edtl):
    """INQUIRY (SPC-4 §6.6): standard data, or the VPD page asked for."""
    if not cdb.evpd:
        if cdb.page_code:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
        return V.standard_inquiry(lu.identity, threepc=True, rmb=lu.settings.removable)
    builder = VPD_PAGES.get(cdb.page_code)
    if builder is None:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    return V.vpd_page(cdb.page_code, builder(lu, nexus))


def _supported_vpd_pages(lu, nexus) -> bytes:
    return bytes(sorted(VPD_PAGES))


def _unit_serial_number(lu, nexus) -> bytes:
    return lu.identity.serial.encode("ascii", "replace")


def _device_identification(lu, nexus) -> bytes:
    return V.device_identification(lu.identity, lu.target_name, nexus.target_port if nexus else None,
                                   nexus.relative_target_port if nexus else 1)


def _block_limits(lu, nexus) -> bytes:
    s = lu.settings
    thin = s.thin_provisioning
    page = V.BLOCK_LIMITS.encode(
        wsnz=True,  # WRITE SAME with zero blocks is refused rather than meaning "to the end"
        maximum_compare_and_write_length=s.max_compare_and_write_blocks,
        optimal_transfer_length_granularity=lu.granularity,
        maximum_transfer_length=lu.max_transfer_blocks,
        optimal_transfer_length=max(1, s.optimal_transfer_bytes // lu.block_size),
        maximum_prefetch_length=lu.max_prefetch_blocks,
        maximum_unmap_lba_count=s.max_unmap_lba_count if thin else 0,
        maximum_unmap_block_descriptor_count=s.max_unmap_descriptors if thin else 0,
        optimal_unmap_granularity=lu.granularity if thin else 0,
        ugavalid=thin,
        unmap_granularity_alignment=0,
        maximum_write_same_length=lu.max_write_same_blocks,
        maximum_atomic_transfer_length=lu.max_atomic_blocks,  # no alignment, granularity or boundaries
    )
    return bytes(page[4:])


def _block_device_characteristics(lu, nexus) -> bytes:
    # WABEREQ=01b: a read after SANITIZE BLOCK ERASE succeeds (deallocated blocks read as zeros).
    # VBULS=1: VERIFY with BYTCHK 01b/11b compares unmapped LBAs too, as the zeros they read as (``sbc.verify``);
    # with 0, SBC-4 would have it end in MISCOMPARE VERIFY OF UNMAPPED LBA.
    page = V.BLOCK_DEVICE_CHARACTERISTICS.encode(medium_rotation_rate=V.NON_ROTATING_MEDIUM,
                                                 wabereq=1 if lu.settings.thin_provisioning else 0, vbuls=True)
    return bytes(page[4:])


def _logical_block_provisioning(lu, nexus) -> bytes:
    thin = lu.settings.thin_provisioning
    page = V.LOGICAL_BLOCK_PROVISIONING.encode(
        lbpu=thin, lbpws=thin, lbpws10=thin, lbprz=thin,
        provisioning_type=V.PROVISIONING_THIN if thin else 0)
    return bytes(page[4:])


#: Supported VPD pages: page code -> body builder (page 00h lists this table).
VPD_PAGES = {
    0x00: _supported_vpd_pages,
    0x80: _unit_serial_number,
    0x83: _device_identification,
    0x8F: xcopy.third_party_copy_vpd,
    0xB0: _block_limits,
    0xB1: _block_device_characteristics,
    0xB2: _logical_block_provisioning,
}


def request_sense(lu, nexus, cdb, data_out, edtl):
    """REQUEST SENSE (SPC-4 §6.39): the oldest pending unit attention (cleared), else SANITIZE IN PROGRESS
    while one runs, or SANITIZE COMMAND FAILED after one failed (SBC-4 §4.11), else NO SENSE."""
    ua = lu.take_unit_attention(nexus)
    if ua is None and lu.sanitizing:
        ua = S.SANITIZE_IN_PROGRESS
    elif ua is None and lu.sanitize_failed:
        ua = S.SANITIZE_COMMAND_FAILED
    return build_sense(ua or S.NO_ADDITIONAL_SENSE, descriptor=cdb.desc)


def report_luns(lu, nexus, cdb, data_out, edtl):
    """REPORT LUNS (SPC-4 §6.33); a pending REPORTED LUNS DATA HAS CHANGED of the I_T nexus is cleared (SAM-5
    §5.14).  The dispatcher never fails it for a pending unit attention (``device._UA_EXEMPT``)."""
    data = report_luns_data(lu.report_luns(), cdb)
    lu.luns_reported(nexus)
    return data


def report_luns_data(luns, cdb) -> bytes:
    """The parameter data, whole: the dispatcher cuts it to the ALLOCATION LENGTH, which "should be at least
    16" (SPC-4 §6.33) but is no error when it is less (§4.2.5.6: the data is truncated)."""
    if cdb.select_report == 0x01:  # well-known logical units only: we have none
        luns = []
    elif cdb.select_report not in (0x00, 0x02):
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    body = b"".join(encode_lun(n) for n in sorted(luns))
    return bytes(REPORT_LUNS_HEADER.encode(lun_list_length=len(body))) + body


def mode_sense_6(lu, nexus, cdb, data_out, edtl):
    """MODE SENSE(6) (SPC-4 §6.11)."""
    pages = lu.mode.pages(cdb.page_code, cdb.subpage_code, cdb.pc, field_pointer=2)
    blocks = b"" if cdb.dbd else _short_block_descriptor(lu)
    total = MODE_PARAMETER_HEADER_6.size + len(blocks) + len(pages)
    head = MODE_PARAMETER_HEADER_6.encode(mode_data_length=min(total - 1, 0xFF), wp=lu.read_only, dpofua=True,
                                          block_descriptor_length=len(blocks))
    return bytes(head) + blocks + pages


def mode_sense_10(lu, nexus, cdb, data_out, edtl):
    """MODE SENSE(10) (SPC-4 §6.12); LLBAA selects the long LBA block descriptor."""
    pages = lu.mode.pages(cdb.page_code, cdb.subpage_code, cdb.pc, field_pointer=2)
    if cdb.dbd:
        blocks = b""
    elif cdb.llbaa:
        blocks = bytes(LONG_LBA_BLOCK_DESCRIPTOR.encode(number_of_blocks=lu.num_blocks,
                                                        logical_block_length=lu.block_size))
    else:
        blocks = _short_block_descriptor(lu)
    total = MODE_PARAMETER_HEADER_10.size + len(blocks) + len(pages)
    head = MODE_PARAMETER_HEADER_10.encode(mode_data_length=total - 2, wp=lu.read_only, dpofua=True,
                                           longlba=bool(cdb.llbaa and blocks), block_descriptor_length=len(blocks))
    return bytes(head) + blocks + pages


def _short_block_descriptor(lu) -> bytes:
    return bytes(SHORT_LBA_BLOCK_DESCRIPTOR.encode(number_of_blocks=min(lu.num_blocks, 0xFFFFFFFF),
                                                   logical_block_length=lu.block_size))


def _mode_select(lu, nexus, cdb, data_out, ten: bool):
    if cdb.sp:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)
    length = cdb.parameter_list_length
    if length == 0:
        return None
    data = bytes(data_out[:length]) if data_out is not None else b""
    if len(data) < length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    if lu.mode.select(data, ten=ten, pf=cdb.pf, block_size=lu.block_size):
        lu.mode_changed(by=nexus)
    return None


def mode_select_6(lu, nexus, cdb, data_out, edtl):
    """MODE SELECT(6) (SPC-4 §6.9)."""
    return _mode_select(lu, nexus, cdb, data_out, ten=False)


def mode_select_10(lu, nexus, cdb, data_out, edtl):
    """MODE SELECT(10) (SPC-4 §6.10)."""
    return _mode_select(lu, nexus, cdb, data_out, ten=True)


def prevent_allow_medium_removal(lu, nexus, cdb, data_out, edtl):
    """PREVENT ALLOW MEDIUM REMOVAL (SPC-4 §6.13): per I_T nexus on a removable medium; else accepted."""
    if not lu.settings.removable:
        return None  # a fixed medium cannot be removed anyway
    if cdb.prevent == 0b01:
        lu.prevent_removal.add(nexus)
    elif cdb.prevent == 0b00:
        lu.prevent_removal.discard(nexus)
    else:  # 10b/11b: medium changer prevention, obsolete for block devices
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=4, bit_pointer=1)
    return None


def absent_lun_inquiry(cdb) -> bytes:
    """INQUIRY data for a LUN with no logical unit: peripheral qualifier 011b, type 1Fh (SPC-4 §6.6.2)."""
    if cdb.evpd:
        if cdb.page_code != 0x00:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
        return V.vpd_page(0x00, b"\x00", device_type=V.NO_DEVICE_TYPE | V.PQ_NOT_CONNECTED << 5)
    if cdb.page_code:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    identity = V.LunIdentity(volume_id="none", product="")
    return V.standard_inquiry(identity, qualifier=V.PQ_NOT_CONNECTED, device_type=V.NO_DEVICE_TYPE)


def report_supported_task_management_functions(lu, nexus, cdb, data_out, edtl):
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.40): what the iSCSI target carries out.

    ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET and TARGET RESET
    (iSCSI's TARGET WARM/COLD RESET); no CLEAR ACA, QUERY TASK or I_T NEXUS RESET.
    REPTD=1 adds the extended format with no timeouts reported (TMFTMOV=0)."""
    head = bytes((0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0x00))  # ATS ATSS CTSS LURS TRS; QUAS QTSS ITNRS clear
    if cdb.reptd:
        return head + bytes((0x00, 0x0C)) + bytes(12)
    return head + bytes(2)
