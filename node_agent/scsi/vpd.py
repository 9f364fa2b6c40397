"""INQUIRY data: the standard page (SPC-4 §6.6.2) and the VPD pages (SPC-4 §7.8, SBC-3 §6.6).

Each page is a ``Layout``; ``build_vpd_page`` assembles them from a logical
unit's identity and limits.  The table ``VPD_PAGES`` (page code -> builder) is
the single list of supported pages, and page 00h is generated from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from node_agent.wire import Field, Layout, ascii_field

DIRECT_ACCESS_BLOCK_DEVICE = 0x00
NO_DEVICE_TYPE = 0x1F
PQ_NOT_CONNECTED = 0x3  # peripheral qualifier 011b: no logical unit at this LUN

# Version descriptors (SPC-4 table 143)
VERSION_SAM_5 = 0x00A0
VERSION_ISCSI = 0x0960
VERSION_SPC_4 = 0x0460
VERSION_SBC_3 = 0x04C0

STANDARD_INQUIRY = Layout("standard INQUIRY data", 66, (  # SPC-4 §6.6.2 table 139 (first 66 bytes)
    Field("peripheral_qualifier", 0, 0xE0),
    Field("peripheral_device_type", 0, 0x1F),
    Field("rmb", 1, 0x80),
    Field("version", 2, 0xFF),
    Field("normaca", 3, 0x20),
    Field("hisup", 3, 0x10),
    Field("response_data_format", 3, 0x0F),
    Field("additional_length", 4, 0xFF),
    Field("sccs", 5, 0x80),
    Field("acc", 5, 0x40),
    Field("tpgs", 5, 0x30),
    Field("threepc", 5, 0x08),
    Field("protect", 5, 0x01),
    Field("encserv", 6, 0x40),
    Field("multip", 6, 0x10),
    Field("cmdque", 7, 0x02),
    Field("vendor", 8, (1 << 64) - 1, raw=True),
    Field("product", 16, (1 << 128) - 1, raw=True),
    Field("revision", 32, 0xFFFFFFFF, raw=True),
    Field("version_descriptor_1", 58, 0xFFFF),
    Field("version_descriptor_2", 60, 0xFFFF),
    Field("version_descriptor_3", 62, 0xFFFF),
    Field("version_descriptor_4", 64, 0xFFFF),
))
STANDARD_INQUIRY_LENGTH = 96  # 58 + 8 version descriptors + 22 reserved bytes

VPD_HEADER = Layout("VPD page header", 4, (  # SPC-4 §7.8.1 table 453
    Field("peripheral_qualifier", 0, 0xE0),
    Field("peripheral_device_type", 0, 0x1F),
    Field("page_code", 1, 0xFF),
    Field("page_length", 2, 0xFFFF),
))

DESIGNATION_DESCRIPTOR = Layout("designation descriptor header", 4, (  # SPC-4 §7.8.6.1 table 459
    Field("protocol_identifier", 0, 0xF0),
    Field("code_set", 0, 0x0F),
    Field("piv", 1, 0x80),
    Field("association", 1, 0x30),
    Field("designator_type", 1, 0x0F),
    Field("designator_length", 3, 0xFF),
))
CODE_SET_BINARY, CODE_SET_ASCII, CODE_SET_UTF8 = 1, 2, 3
ASSOC_LOGICAL_UNIT, ASSOC_TARGET_PORT, ASSOC_TARGET_DEVICE = 0, 1, 2
DESIGNATOR_T10_VENDOR_ID, DESIGNATOR_NAA, DESIGNATOR_RELATIVE_TARGET_PORT = 1, 3, 4
DESIGNATOR_SCSI_NAME_STRING = 8
PROTOCOL_ISCSI = 0x5

RELATIVE_TARGET_PORT_DESIGNATOR = Layout("relative target port designator", 4, (  # SPC-4 table 466
    Field("relative_target_port", 2, 0xFFFF),
))

BLOCK_LIMITS = Layout("Block Limits VPD page", 64, (  # SBC-3 §6.6.4 table 176
    Field("peripheral_device_type", 0, 0x1F),
    Field("page_code", 1, 0xFF),
    Field("page_length", 2, 0xFFFF),
    Field("wsnz", 4, 0x01),
    Field("maximum_compare_and_write_length", 5, 0xFF),
    Field("optimal_transfer_length_granularity", 6, 0xFFFF),
    Field("maximum_transfer_length", 8, 0xFFFFFFFF),
    Field("optimal_transfer_length", 12, 0xFFFFFFFF),
    Field("maximum_prefetch_length", 16, 0xFFFFFFFF),
    Field("maximum_unmap_lba_count", 20, 0xFFFFFFFF),
    Field("maximum_unmap_block_descriptor_count", 24, 0xFFFFFFFF),
    Field("optimal_unmap_granularity", 28, 0xFFFFFFFF),
    Field("ugavalid", 32, 0x80),
    Field("unmap_granularity_alignment", 32, 0x7FFFFFFF),
    Field("maximum_write_same_length", 36, 0xFFFFFFFFFFFFFFFF),
    Field("maximum_atomic_transfer_length", 44, 0xFFFFFFFF),  # SBC-4 §6.6.4
    Field("atomic_alignment", 48, 0xFFFFFFFF),
    Field("atomic_transfer_length_granularity", 52, 0xFFFFFFFF),
    Field("maximum_atomic_transfer_length_with_atomic_boundary", 56, 0xFFFFFFFF),
    Field("maximum_atomic_boundary_size", 60, 0xFFFFFFFF),
))
BLOCK_DEVICE_CHARACTERISTICS = Layout("Block Device Characteristics VPD page", 64, (  # SBC-3 §6.6.2 table 173
    Field("peripheral_device_type", 0, 0x1F),
    Field("page_code", 1, 0xFF),
    Field("page_length", 2, 0xFFFF),
    Field("medium_rotation_rate", 4, 0xFFFF),
    Field("product_type", 6, 0xFF),
    Field("wabereq", 7, 0xC0),
    Field("wacereq", 7, 0x30),
    Field("nominal_form_factor", 7, 0x0F),
    Field("fuab", 8, 0x02),
    Field("vbuls", 8, 0x01),
))
NON_ROTATING_MEDIUM = 0x0001
LOGICAL_BLOCK_PROVISIONING = Layout("Logical Block Provisioning VPD page", 8, (  # SBC-3 §6.6.5 table 180
    Field("peripheral_device_type", 0, 0x1F),
    Field("page_code", 1, 0xFF),
    Field("page_length", 2, 0xFFFF),
    Field("threshold_exponent", 4, 0xFF),
    Field("lbpu", 5, 0x80),
    Field("lbpws", 5, 0x40),
    Field("lbpws10", 5, 0x20),
    Field("lbprz", 5, 0x04),
    Field("anc_sup", 5, 0x02),
    Field("dp", 5, 0x01),
    Field("provisioning_type", 6, 0x07),
))
PROVISIONING_THIN = 0x2


@dataclass(frozen=True)
class LunIdentity:
    """Who a logical unit is, stable for the life of the volume (SPC-4 §7.8.6).

    ``naa`` is derived from ``volume_id`` when not given, so a volume keeps its
    NAA designator across restarts and moves between nodes.
    """

    volume_id: str
    serial: str = ""
    naa: bytes = b""
    vendor: str = "SHOAL"
    product: str = "VOLUME"
    revision: str = "0001"

    def __post_init__(self):
        if not self.serial:
            object.__setattr__(self, "serial", self.volume_id[:64])
        if not self.naa:
            object.__setattr__(self, "naa", naa_for(self.volume_id))
        if len(self.naa) not in (8, 16):
            raise ValueError("NAA designator must be 8 or 16 bytes")


def naa_for(volume_id: str) -> bytes:
    """A NAA 6 (IEEE Registered Extended) designator from a hash of the volume id.

    SPC-4 §7.8.6.6.5: NAA=6h, a 24-bit IEEE company id, 36-bit vendor specific
    identifier and a 64-bit extension.  We have no registered OUI; the
    locally-administered-looking 0x5AD0A1 ("shoal") stands in, and the 100
    remaining bits come from SHA-256 of the volume id.
    """
    digest = int.from_bytes(hashlib.sha256(volume_id.encode()).digest()[:13], "big") >> 4  # 100 bits
    value = (0x6 << 124) | (0x5AD0A1 << 100) | digest
    return value.to_bytes(16, "big")


def _designator(code_set: int, association: int, dtype: int, value: bytes, *, protocol: int = 0,
                piv: bool = False) -> bytes:
    head = DESIGNATION_DESCRIPTOR.encode(protocol_identifier=protocol, code_set=code_set, piv=piv,
                                         association=association, designator_type=dtype,
                                         designator_length=len(value))
    return bytes(head) + value


def _scsi_name(name: str) -> bytes:
    raw = name.encode("utf-8") + b"\0"
    return raw + b"\0" * (-len(raw) % 4)  # null-terminated, multiple of 4 (SPC-4 §7.8.6.11)


def device_identification(identity: LunIdentity, target_name: str, target_port: str | None,
                          relative_target_port: int) -> bytes:
    """Designation descriptors of VPD page 83h."""
    out = _designator(CODE_SET_BINARY, ASSOC_LOGICAL_UNIT, DESIGNATOR_NAA, identity.naa)
    t10 = ascii_field(identity.vendor, 8) + identity.volume_id.encode("ascii", "replace")
    out += _designator(CODE_SET_ASCII, ASSOC_LOGICAL_UNIT, DESIGNATOR_T10_VENDOR_ID, t10[:252])
    out += _designator(CODE_SET_BINARY, ASSOC_TARGET_PORT, DESIGNATOR_RELATIVE_TARGET_PORT,
                       bytes(RELATIVE_TARGET_PORT_DESIGNATOR.encode(relative_target_port=relative_target_port)),
                       protocol=PROTOCOL_ISCSI, piv=True)
    if target_port:
        out += _designator(CODE_SET_UTF8, ASSOC_TARGET_PORT, DESIGNATOR_SCSI_NAME_STRING, _scsi_name(target_port),
                           protocol=PROTOCOL_ISCSI, piv=True)
    if target_name:
        out += _designator(CODE_SET_UTF8, ASSOC_TARGET_DEVICE, DESIGNATOR_SCSI_NAME_STRING, _scsi_name(target_name),
                           protocol=PROTOCOL_ISCSI, piv=True)
    return out


def vpd_page(page_code: int, body: bytes, device_type: int = DIRECT_ACCESS_BLOCK_DEVICE) -> bytes:
    return bytes(VPD_HEADER.encode(peripheral_device_type=device_type, page_code=page_code,
                                   page_length=len(body))) + body


def standard_inquiry(identity: LunIdentity, *, qualifier: int = 0,
                     device_type: int = DIRECT_ACCESS_BLOCK_DEVICE, threepc: bool = False,
                     rmb: bool = False) -> bytes:
    """Standard INQUIRY data (SPC-4 §6.6.2): SPC-4, HISUP, CMDQUE, 3PC (copy offload), four version descriptors."""
    head = STANDARD_INQUIRY.encode(
        peripheral_qualifier=qualifier, peripheral_device_type=device_type, rmb=rmb, version=0x06, hisup=True,
        response_data_format=2, additional_length=STANDARD_INQUIRY_LENGTH - 5, cmdque=True, threepc=threepc,
        vendor=ascii_field(identity.vendor, 8), product=ascii_field(identity.product, 16),
        revision=ascii_field(identity.revision, 4),
        version_descriptor_1=VERSION_SAM_5, version_descriptor_2=VERSION_ISCSI,
        version_descriptor_3=VERSION_SPC_4, version_descriptor_4=VERSION_SBC_3)
    return bytes(head) + bytes(STANDARD_INQUIRY_LENGTH - len(head))
