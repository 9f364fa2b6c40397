"""The initiator packs SCSI Command headers with its own precompiled struct; it must agree with the definition.

``core._COMMAND`` skips ``pdu.pack_scsi_command``'s bytearray (kept for the PDU hook) on the
per-I/O path; ``pdu.LAYOUTS`` stays the definition of every field (RFC 7143 §11.3).
"""

from __future__ import annotations

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C

LUN = bytes([0, 5, 0, 0, 0, 0, 0, 0])
CDB = bytes([0x88, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 8, 0, 0])


def test_command_struct_matches_the_layout_and_the_generic_packer():
    raw = C._COMMAND.pack(C._OP_COMMAND, 0xC1, 0, 512, LUN, 9, 4096, 0xFFFFFFFE, 77, CDB)
    assert raw == bytes(P.pack_scsi_command(0xC1, 512, LUN, 9, 4096, 0xFFFFFFFE, 77, CDB))
    assert raw == bytes(P.encode_header(P.Opcode.SCSI_COMMAND, final=1, read=1, attr=1, data_segment_length=512,
                                        lun=LUN, itt=9, expected_data_transfer_length=4096, cmdsn=0xFFFFFFFE,
                                        expstatsn=77, cdb=CDB))
