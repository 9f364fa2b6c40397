"""The userspace connector takes an ``InitiatorError`` from its LUN as the I/O failure it is.

Shoal's initiator fails a command the target answered against the protocol (a Reject, an impossible
residual) with ``InitiatorError``, not an ``OSError``.  A detach whose final SYNCHRONIZE CACHE failed that
way used to raise it raw (no ``ConnectorError``), and a rescan likewise; the connector must report a
``TemporaryConnectorError`` (a retry may find the target sane again), as it does for ``OSError``.  The LUN
and the FUSE export are stand-ins: the steps tested fail before either is otherwise touched.
"""

from __future__ import annotations

import pytest

from node_agent.host.connector import AttachedDevice, TemporaryConnectorError, VolumeTarget
from node_agent.host.userspace import UserspaceConnector, UserspaceSettings, _Attachment
from node_agent.iscsi.initiator.core import InitiatorError

TARGET = VolumeTarget(portals=("127.0.0.1:3260",), target_iqn="iqn.2026-11.io.shoal.test:t", lun=0,
                      volume_id="vol1", expected_naa="6" + "0" * 31, expected_serial="s")


class FailingLun:
    """A LUN whose commands the target answers against the protocol; the session itself is up."""

    session_state = "up"

    def flush(self) -> None:
        raise InitiatorError("the target reported a residual of 8 bytes, more than the 0 expected")

    def refresh_capacity(self) -> int:
        raise InitiatorError("target rejected the command (reason 0x04)")


class UnusedExport:
    path = "/nonexistent/fuse-file"
    running = True


@pytest.fixture
def connector(tmp_path):
    connector = UserspaceConnector(UserspaceSettings(state_dir=str(tmp_path)))
    device = AttachedDevice(path="/dev/loop999", volume_id="vol1", target=TARGET, handle=UnusedExport.path)
    connector._attached["vol1"] = _Attachment(device, FailingLun(), UnusedExport(), loop_released=True)
    return connector


def test_detach_whose_synchronize_cache_fails_with_an_initiator_error_is_a_temporary_error(connector):
    for _ in range(2):  # the attachment stays for the retry, which fails the same way
        with pytest.raises(TemporaryConnectorError, match="SYNCHRONIZE CACHE of vol1 failed: the target reported"):
            connector.detach(TARGET)
        assert "vol1" in connector._attached


def test_rescan_whose_read_capacity_fails_with_an_initiator_error_is_a_temporary_error(connector):
    with pytest.raises(TemporaryConnectorError, match="cannot read the capacity of vol1: target rejected"):
        connector.rescan(TARGET)
