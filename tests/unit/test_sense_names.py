"""``sense.describe``: the names a message gives a SCSI status and its sense code (SAM-5, SPC-4)."""

from __future__ import annotations

import pytest

from node_agent.iscsi.initiator.client import CommandFailed
from node_agent.iscsi.initiator.core import TaskDone
from node_agent.scsi import sense as S


@pytest.mark.parametrize("args, text", [
    ((S.CHECK_CONDITION, *S.LBA_OUT_OF_RANGE),
     "CHECK CONDITION (0x02): ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (sense key 0x5, ASC/ASCQ 0x21/0x00)"),
    ((S.CHECK_CONDITION, *S.CAPACITY_DATA_HAS_CHANGED),
     "CHECK CONDITION (0x02): UNIT ATTENTION, CAPACITY DATA HAS CHANGED (sense key 0x6, ASC/ASCQ 0x2a/0x09)"),
    # The ASC/ASCQ names the condition whatever the key: a name known under another key still applies.
    ((S.CHECK_CONDITION, S.MEDIUM_ERROR, 0x21, 0x00),
     "CHECK CONDITION (0x02): MEDIUM ERROR, LOGICAL BLOCK ADDRESS OUT OF RANGE (sense key 0x3, ASC/ASCQ 0x21/0x00)"),
    ((S.CHECK_CONDITION, S.ILLEGAL_REQUEST, 0x99, 0x01),
     "CHECK CONDITION (0x02): ILLEGAL REQUEST (sense key 0x5, ASC/ASCQ 0x99/0x01)"),
    ((S.CHECK_CONDITION, S.COPY_ABORTED, 0, 0), "CHECK CONDITION (0x02): COPY ABORTED (sense key 0xa, ASC/ASCQ 0x00/0x00)"),
    ((S.CHECK_CONDITION,), "CHECK CONDITION (0x02): NO SENSE (sense key 0x0, ASC/ASCQ 0x00/0x00)"),
    ((S.RESERVATION_CONFLICT,), "RESERVATION CONFLICT (0x18)"),
    ((S.TASK_SET_FULL,), "TASK SET FULL (0x28)"),
    ((0x77,), "unknown status (0x77)"),
])
def test_describe(args, text):
    assert S.describe(*args) == text


def test_command_failed_names_fixed_and_descriptor_sense():
    for descriptor in (False, True):
        sense = S.build_sense(S.WRITE_PROTECTED, descriptor=descriptor)
        error = CommandFailed(TaskDone(itt=1, status=S.CHECK_CONDITION, sense=sense))
        assert str(error) == ("SCSI status CHECK CONDITION (0x02): DATA PROTECT, WRITE PROTECTED "
                              "(sense key 0x7, ASC/ASCQ 0x27/0x00)")
        assert (error.sense_key, error.asc, error.ascq) == tuple(S.WRITE_PROTECTED)
