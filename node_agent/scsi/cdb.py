"""Command descriptor blocks as field tables (SPC-4 §4.2, SBC-3 §5).

Every bit a CDB defines is a ``Field``; every bit no field covers is reserved,
and the dispatcher rejects a CDB with a reserved bit set (INVALID FIELD IN
CDB with a field pointer) by computing the reserved mask from these tables.
Obsolete bits that initiators still send (FUA_NV, SYNC_NV, PBDATA/LBDATA, INQUIRY's
SCSI-2 LUN field) are listed so they are accepted and ignored.  The CONTROL byte is the last byte
of every CDB (SAM-5 §5.2); its NACA bit is checked by the dispatcher.
"""

from __future__ import annotations

from node_agent.wire import Field, Layout


_OFFSETS: dict[type, dict[str, int]] = {}


def _cdb(name: str, size: int, *fields: Field) -> Layout:
    layout = Layout(name, size, (Field("opcode", 0, 0xFF), *fields, Field("control", size - 1, 0xFF)))
    _OFFSETS[layout.record] = {f.name: f.offset for f in layout.fields}
    return layout


def offset_of(record, name: str) -> int:
    """Byte offset of field ``name`` in the CDB a decoded ``record`` came from (for field pointers)."""
    return _OFFSETS[type(record)][name]


def _sa(offset: int = 1) -> Field:
    return Field("service_action", offset, 0x1F)


# -- SPC-4 -------------------------------------------------------------------
TEST_UNIT_READY = _cdb("TEST UNIT READY", 6)  # SPC-4 §6.47
REQUEST_SENSE = _cdb("REQUEST SENSE", 6,  # SPC-4 §6.39
    Field("desc", 1, 0x01),
    Field("allocation_length", 4, 0xFF))
INQUIRY = _cdb("INQUIRY", 6,  # SPC-4 §6.6
    # Bits 7-5 of byte 1: the LUN field of SCSI-2, reserved since SPC-3 but still sent by Linux.  Its SCSI layer
    # fills it in while it holds a target for SCSI-2 (``scsi_dispatch_cmd``), which it does until an INQUIRY
    # of one of its LUNs has answered: a first scan of LUN 1 sends 0x20 there, and refusing it leaves the LUN
    # without a disk (no other command carries it: the answer's version ends it).  Accepted and ignored, as
    # LIO and tgt do; iSCSI addresses the LUN in the PDU header.
    Field("scsi2_lun", 1, 0xE0),
    Field("evpd", 1, 0x01),
    Field("page_code", 2, 0xFF),
    Field("allocation_length", 3, 0xFFFF))
MODE_SELECT_6 = _cdb("MODE SELECT(6)", 6,  # SPC-4 §6.9
    Field("pf", 1, 0x10),
    Field("sp", 1, 0x01),
    Field("parameter_list_length", 4, 0xFF))
MODE_SELECT_10 = _cdb("MODE SELECT(10)", 10,  # SPC-4 §6.10
    Field("pf", 1, 0x10),
    Field("sp", 1, 0x01),
    Field("parameter_list_length", 7, 0xFFFF))
MODE_SENSE_6 = _cdb("MODE SENSE(6)", 6,  # SPC-4 §6.11
    Field("dbd", 1, 0x08),
    Field("pc", 2, 0xC0),
    Field("page_code", 2, 0x3F),
    Field("subpage_code", 3, 0xFF),
    Field("allocation_length", 4, 0xFF))
MODE_SENSE_10 = _cdb("MODE SENSE(10)", 10,  # SPC-4 §6.12
    Field("llbaa", 1, 0x10),
    Field("dbd", 1, 0x08),
    Field("pc", 2, 0xC0),
    Field("page_code", 2, 0x3F),
    Field("subpage_code", 3, 0xFF),
    Field("allocation_length", 7, 0xFFFF))
REPORT_LUNS = _cdb("REPORT LUNS", 12,  # SPC-4 §6.33
    Field("select_report", 2, 0xFF),
    Field("allocation_length", 6, 0xFFFFFFFF))
REPORT_SUPPORTED_OPERATION_CODES = _cdb("REPORT SUPPORTED OPERATION CODES", 12,  # SPC-4 §6.35
    _sa(),
    Field("rctd", 2, 0x80),
    Field("reporting_options", 2, 0x07),
    Field("requested_operation_code", 3, 0xFF),
    Field("requested_service_action", 4, 0xFFFF),
    Field("allocation_length", 6, 0xFFFFFFFF))
REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = _cdb("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", 12,  # SPC-4 §6.40
    _sa(),
    Field("reptd", 2, 0x80),
    Field("allocation_length", 6, 0xFFFFFFFF))
PREVENT_ALLOW_MEDIUM_REMOVAL = _cdb("PREVENT ALLOW MEDIUM REMOVAL", 6,  # SPC-4 §6.13
    Field("prevent", 4, 0x03))

PERSISTENT_RESERVE_IN = _cdb("PERSISTENT RESERVE IN", 10,  # SPC-4 §6.15.1 table 169
    _sa(),
    Field("allocation_length", 7, 0xFFFF))
PERSISTENT_RESERVE_OUT = _cdb("PERSISTENT RESERVE OUT", 10,  # SPC-4 §6.16.1 table 199
    _sa(),
    Field("scope", 2, 0xF0),
    Field("type", 2, 0x0F),
    Field("parameter_list_length", 5, 0xFFFFFFFF))
# SPC-2 §7.21/§7.17 RESERVE/RELEASE(6): bytes 1-4 are obsolete (third-party and extent
# reservations), which we refuse by treating them as reserved.
RESERVE_6 = _cdb("RESERVE(6)", 6)
RELEASE_6 = _cdb("RELEASE(6)", 6)
RESERVE_10 = _cdb("RESERVE(10)", 10,  # SPC-2 §7.22
    Field("thirdpty", 1, 0x10),
    Field("longid", 1, 0x02),
    Field("third_party_device_id", 3, 0xFF),
    Field("parameter_list_length", 7, 0xFFFF))
RELEASE_10 = _cdb("RELEASE(10)", 10,  # SPC-2 §7.18
    Field("thirdpty", 1, 0x10),
    Field("longid", 1, 0x02),
    Field("third_party_device_id", 3, 0xFF),
    Field("parameter_list_length", 7, 0xFFFF))

# -- SBC-3 -------------------------------------------------------------------
READ_6 = _cdb("READ(6)", 6,  # SBC-3 §5.7
    Field("lba", 1, 0x1FFFFF),
    Field("transfer_length", 4, 0xFF))
WRITE_6 = _cdb("WRITE(6)", 6,  # SBC-3 §5.32
    Field("lba", 1, 0x1FFFFF),
    Field("transfer_length", 4, 0xFF))


def _rw_flags(protect: str) -> tuple[Field, ...]:
    """Byte 1 of READ/WRITE(10/12/16): RDPROTECT/WRPROTECT, DPO, FUA, FUA_NV (SBC-3 §5.8)."""
    return (Field(protect, 1, 0xE0), Field("dpo", 1, 0x10), Field("fua", 1, 0x08), Field("fua_nv", 1, 0x02))


READ_10 = _cdb("READ(10)", 10,  # SBC-3 §5.8
    *_rw_flags("rdprotect"), Field("rarc", 1, 0x04),
    Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F), Field("transfer_length", 7, 0xFFFF))
READ_12 = _cdb("READ(12)", 12,  # SBC-3 §5.9
    *_rw_flags("rdprotect"), Field("rarc", 1, 0x04),
    Field("lba", 2, 0xFFFFFFFF), Field("transfer_length", 6, 0xFFFFFFFF), Field("group_number", 10, 0x1F))
READ_16 = _cdb("READ(16)", 16,  # SBC-3 §5.10
    *_rw_flags("rdprotect"), Field("rarc", 1, 0x04),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("transfer_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
WRITE_10 = _cdb("WRITE(10)", 10,  # SBC-3 §5.33
    *_rw_flags("wrprotect"),
    Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F), Field("transfer_length", 7, 0xFFFF))
WRITE_12 = _cdb("WRITE(12)", 12,  # SBC-3 §5.34
    *_rw_flags("wrprotect"),
    Field("lba", 2, 0xFFFFFFFF), Field("transfer_length", 6, 0xFFFFFFFF), Field("group_number", 10, 0x1F))
WRITE_16 = _cdb("WRITE(16)", 16,  # SBC-3 §5.35
    *_rw_flags("wrprotect"),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("transfer_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
ORWRITE_16 = _cdb("ORWRITE(16)", 16,  # SBC-3 §5.6
    *_rw_flags("orprotect"),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("transfer_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
COMPARE_AND_WRITE = _cdb("COMPARE AND WRITE", 16,  # SBC-3 §5.2
    *_rw_flags("wrprotect"),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("number_of_logical_blocks", 13, 0xFF),
    Field("group_number", 14, 0x1F))

_VERIFY_FLAGS = (Field("vrprotect", 1, 0xE0), Field("dpo", 1, 0x10), Field("bytchk", 1, 0x06))
VERIFY_10 = _cdb("VERIFY(10)", 10,  # SBC-3 §5.24
    *_VERIFY_FLAGS, Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F),
    Field("transfer_length", 7, 0xFFFF))
VERIFY_12 = _cdb("VERIFY(12)", 12,  # SBC-3 §5.25
    *_VERIFY_FLAGS, Field("lba", 2, 0xFFFFFFFF), Field("transfer_length", 6, 0xFFFFFFFF),
    Field("group_number", 10, 0x1F))
VERIFY_16 = _cdb("VERIFY(16)", 16,  # SBC-3 §5.26
    *_VERIFY_FLAGS, Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("transfer_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))

_WV_FLAGS = (Field("wrprotect", 1, 0xE0), Field("dpo", 1, 0x10), Field("bytchk", 1, 0x02))
WRITE_AND_VERIFY_10 = _cdb("WRITE AND VERIFY(10)", 10,  # SBC-3 §5.37
    *_WV_FLAGS, Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F),
    Field("transfer_length", 7, 0xFFFF))
WRITE_AND_VERIFY_12 = _cdb("WRITE AND VERIFY(12)", 12,  # SBC-3 §5.38
    *_WV_FLAGS, Field("lba", 2, 0xFFFFFFFF), Field("transfer_length", 6, 0xFFFFFFFF),
    Field("group_number", 10, 0x1F))
WRITE_AND_VERIFY_16 = _cdb("WRITE AND VERIFY(16)", 16,  # SBC-3 §5.39
    *_WV_FLAGS, Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("transfer_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))

SYNCHRONIZE_CACHE_10 = _cdb("SYNCHRONIZE CACHE(10)", 10,  # SBC-3 §5.22
    Field("sync_nv", 1, 0x04), Field("immed", 1, 0x02),
    Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F), Field("number_of_blocks", 7, 0xFFFF))
SYNCHRONIZE_CACHE_16 = _cdb("SYNCHRONIZE CACHE(16)", 16,  # SBC-3 §5.23
    Field("sync_nv", 1, 0x04), Field("immed", 1, 0x02),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("number_of_blocks", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
PRE_FETCH_10 = _cdb("PRE-FETCH(10)", 10,  # SBC-3 §5.3
    Field("immed", 1, 0x02),
    Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F), Field("prefetch_length", 7, 0xFFFF))
PRE_FETCH_16 = _cdb("PRE-FETCH(16)", 16,  # SBC-3 §5.4
    Field("immed", 1, 0x02),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("prefetch_length", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
UNMAP = _cdb("UNMAP", 10,  # SBC-3 §5.28
    Field("anchor", 1, 0x01), Field("group_number", 6, 0x1F), Field("parameter_list_length", 7, 0xFFFF))
WRITE_SAME_10 = _cdb("WRITE SAME(10)", 10,  # SBC-3 §5.41
    Field("wrprotect", 1, 0xE0), Field("anchor", 1, 0x10), Field("unmap", 1, 0x08),
    Field("pbdata", 1, 0x04), Field("lbdata", 1, 0x02),
    Field("lba", 2, 0xFFFFFFFF), Field("group_number", 6, 0x1F), Field("number_of_blocks", 7, 0xFFFF))
WRITE_SAME_16 = _cdb("WRITE SAME(16)", 16,  # SBC-3 §5.42
    Field("wrprotect", 1, 0xE0), Field("anchor", 1, 0x10), Field("unmap", 1, 0x08),
    Field("pbdata", 1, 0x04), Field("lbdata", 1, 0x02), Field("ndob", 1, 0x01),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("number_of_blocks", 10, 0xFFFFFFFF),
    Field("group_number", 14, 0x1F))
READ_CAPACITY_10 = _cdb("READ CAPACITY(10)", 10,  # SBC-3 §5.15
    Field("lba", 2, 0xFFFFFFFF), Field("pmi", 8, 0x01))
READ_CAPACITY_16 = _cdb("READ CAPACITY(16)", 16,  # SBC-3 §5.16
    _sa(), Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("allocation_length", 10, 0xFFFFFFFF),
    Field("pmi", 14, 0x01))
GET_LBA_STATUS = _cdb("GET LBA STATUS", 16,  # SBC-3 §5.5
    _sa(), Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("allocation_length", 10, 0xFFFFFFFF))
START_STOP_UNIT = _cdb("START STOP UNIT", 6,  # SBC-3 §5.20
    Field("immed", 1, 0x01), Field("power_condition_modifier", 3, 0x0F),
    Field("power_condition", 4, 0xF0), Field("no_flush", 4, 0x04), Field("loej", 4, 0x02),
    Field("start", 4, 0x01))

WRITE_ATOMIC_16 = _cdb("WRITE ATOMIC(16)", 16,  # SBC-4 §5.48
    Field("wrprotect", 1, 0xE0), Field("dpo", 1, 0x10), Field("fua", 1, 0x08),
    Field("lba", 2, 0xFFFFFFFFFFFFFFFF), Field("atomic_boundary", 10, 0xFFFF),
    Field("transfer_length", 12, 0xFFFF), Field("group_number", 14, 0x1F))


SANITIZE = _cdb("SANITIZE", 10,  # SBC-4 §5.30
    Field("immed", 1, 0x80), Field("ause", 1, 0x20), _sa(), Field("parameter_list_length", 7, 0xFFFF))
EXTENDED_COPY = _cdb("EXTENDED COPY(LID1)", 16,  # SPC-4 §6.4 (THIRD-PARTY COPY OUT, service action 00h)
    _sa(), Field("parameter_list_length", 10, 0xFFFFFFFF))
RECEIVE_COPY_RESULTS = _cdb("RECEIVE COPY RESULTS", 16,  # SPC-4 §6.18 (THIRD-PARTY COPY IN)
    _sa(), Field("list_identifier", 2, 0xFF), Field("allocation_length", 10, 0xFFFFFFFF))


def _defect_flags(offset: int) -> tuple[Field, ...]:
    """REQ_PLIST, REQ_GLIST and DEFECT LIST FORMAT of READ DEFECT DATA (SBC-3 §5.13)."""
    return (Field("req_plist", offset, 0x10), Field("req_glist", offset, 0x08),
            Field("defect_list_format", offset, 0x07))


READ_DEFECT_DATA_10 = _cdb("READ DEFECT DATA(10)", 10,  # SBC-3 §5.13
    *_defect_flags(2),
    Field("allocation_length", 7, 0xFFFF))
READ_DEFECT_DATA_12 = _cdb("READ DEFECT DATA(12)", 12,  # SBC-3 §5.14 (SBC-4: ADDRESS DESCRIPTOR INDEX)
    *_defect_flags(1),
    Field("address_descriptor_index", 2, 0xFFFFFFFF),
    Field("allocation_length", 6, 0xFFFFFFFF))

# -- parameter data -------------------------------------------------------------
UNMAP_PARAMETER_LIST_HEADER = Layout("UNMAP parameter list header", 8, (  # SBC-3 §5.28.2 table 95
    Field("unmap_data_length", 0, 0xFFFF),
    Field("block_descriptor_data_length", 2, 0xFFFF),
))
UNMAP_BLOCK_DESCRIPTOR = Layout("UNMAP block descriptor", 16, (  # SBC-3 §5.28.2 table 96
    Field("lba", 0, 0xFFFFFFFFFFFFFFFF),
    Field("number_of_blocks", 8, 0xFFFFFFFF),
))
READ_CAPACITY_10_DATA = Layout("READ CAPACITY(10) parameter data", 8, (  # SBC-3 table 66
    Field("returned_lba", 0, 0xFFFFFFFF),
    Field("block_length", 4, 0xFFFFFFFF),
))
READ_CAPACITY_16_DATA = Layout("READ CAPACITY(16) parameter data", 32, (  # SBC-3 table 69
    Field("returned_lba", 0, 0xFFFFFFFFFFFFFFFF),
    Field("block_length", 8, 0xFFFFFFFF),
    Field("rc_basis", 12, 0x30),
    Field("p_type", 12, 0x0E),
    Field("prot_en", 12, 0x01),
    Field("p_i_exponent", 13, 0xF0),
    Field("lbppbe", 13, 0x0F),
    Field("lbpme", 14, 0x80),
    Field("lbprz", 14, 0x40),
    Field("lowest_aligned_lba", 14, 0x3FFF),
))
LBA_STATUS_HEADER = Layout("GET LBA STATUS parameter data header", 8, (  # SBC-3 table 37
    Field("parameter_data_length", 0, 0xFFFFFFFF),
))
LBA_STATUS_DESCRIPTOR = Layout("LBA status descriptor", 16, (  # SBC-3 table 38
    Field("lba", 0, 0xFFFFFFFFFFFFFFFF),
    Field("number_of_blocks", 8, 0xFFFFFFFF),
    Field("provisioning_status", 12, 0x0F),
))
REPORT_LUNS_HEADER = Layout("REPORT LUNS parameter data header", 8, (  # SPC-4 table 170
    Field("lun_list_length", 0, 0xFFFFFFFF),
))
DEFECT_DATA_10_HEADER = Layout("READ DEFECT DATA(10) parameter data header", 4, (  # SBC-3 table 60
    Field("plistv", 1, 0x10),
    Field("glistv", 1, 0x08),
    Field("defect_list_format", 1, 0x07),
    Field("defect_list_length", 2, 0xFFFF),
))
DEFECT_DATA_12_HEADER = Layout("READ DEFECT DATA(12) parameter data header", 8, (  # SBC-3 table 62
    Field("plistv", 1, 0x10),
    Field("glistv", 1, 0x08),
    Field("defect_list_format", 1, 0x07),
    Field("defect_list_length", 4, 0xFFFFFFFF),
))
