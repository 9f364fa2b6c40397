"""The agent's half of the CSI publish/stage split (``node_agent.agent.attachments``).

ControllerPublishVolume records a target and its CHAP credentials without logging in
(``attach(..., defer_login=True)``); NodeStageVolume logs in (``login``), NodeUnstageVolume logs
out (``logout``, the record stays), ControllerUnpublishVolume forgets it (``detach``).  The host
connector is a recording fake at our own ``Connector`` boundary (attaching for real needs FUSE,
loop devices and a target: tests/integration/test_csi_e2e.py does that).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import replace

import pytest

from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.errors import FailedPrecondition, NotFound
from node_agent.agent.exports import ExportInfo
from node_agent.host.connector import AttachedDevice, Connector, TemporaryConnectorError

SECRET = "s3cret-s3cret-42"
EXPORT = ExportInfo(volume_id="vol-1", target_iqn="iqn.2026-11.io.shoal:target:node-a:vol-1",
                    portals=("127.0.0.1:3260",), lun=0, naa="6" + "1" * 31, serial="vol-1", chap_user="shoal-vol-1")


class FakeConnector(Connector):
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.chap: list = []
        self.fail: Exception | None = None
        self.size = 1 << 30

    def attach(self, target):
        self.calls.append(("attach", target.volume_id))
        self.chap.append(target.chap)
        if self.fail:
            raise self.fail
        return AttachedDevice(path=f"/dev/fake-{target.volume_id}", volume_id=target.volume_id, target=target)

    def detach(self, target):
        assert target.chap is None  # tearing down needs no secret
        self.calls.append(("detach", target.volume_id))

    def rescan(self, target):
        self.calls.append(("rescan", target.volume_id))
        return self.size


@pytest.fixture
def env(tmp_path):
    connector = FakeConnector()
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector})
    return manager, connector, tmp_path


def test_publish_records_without_login_and_stage_logs_in(env):
    manager, connector, tmp_path = env
    assert manager.attach(EXPORT, SECRET, defer_login=True) == ""
    assert manager.attach(EXPORT, SECRET, defer_login=True) == ""  # repeated: the same, still no login
    assert connector.calls == []
    [record] = manager.list()
    assert not record.logged_in and manager.condition("vol-1").endswith("not logged in on this node (not staged)")
    assert manager.login("vol-1") == "/dev/fake-vol-1"
    assert manager.login("vol-1") == "/dev/fake-vol-1"  # repeated: no second login
    assert connector.calls == [("attach", "vol-1")] and connector.chap == [("shoal-vol-1", SECRET)]
    assert manager.attach(EXPORT, SECRET, defer_login=True) == "/dev/fake-vol-1"  # publish again: the device
    assert manager.rescan("vol-1") == 1 << 30

    assert manager.logout("vol-1") and not manager.logout("vol-1")  # unstage, repeated
    assert connector.calls == [("attach", "vol-1"), ("rescan", "vol-1"), ("detach", "vol-1")]
    assert [r.logged_in for r in manager.list()] == [False]  # the record stays until unpublish
    with pytest.raises(FailedPrecondition):
        manager.rescan("vol-1")
    assert manager.login("vol-1") == "/dev/fake-vol-1"  # staged again: the kept credentials log in

    assert manager.detach("vol-1") and not manager.detach("vol-1")  # unpublish logs out first, repeated: OK
    assert connector.calls[-1] == ("detach", "vol-1") and manager.list() == []
    with pytest.raises(FailedPrecondition):
        manager.login("vol-1")
    with pytest.raises(NotFound):
        manager.rescan("vol-1")


def test_secrets_are_kept_apart_in_a_0600_file(env):
    manager, _, tmp_path = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    assert SECRET not in (tmp_path / "attachments.json").read_text()
    secrets = tmp_path / "attachment-secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert json.loads(secrets.read_text())["credentials"]["vol-1"]["chap_secret"] == SECRET
    assert SECRET not in repr(manager._credentials)
    manager.detach("vol-1")
    assert SECRET not in secrets.read_text()


def test_a_plain_attach_logs_in_and_a_failed_one_leaves_nothing(env):
    manager, connector, _ = env
    connector.fail = TemporaryConnectorError("portal unreachable")
    with pytest.raises(TemporaryConnectorError):
        manager.attach(EXPORT, SECRET)  # shoalctl volume attach: authorize + login in one go
    assert manager.list() == []
    manager.attach(EXPORT, SECRET, defer_login=True)
    with pytest.raises(TemporaryConnectorError):
        manager.attach(EXPORT, SECRET)
    assert [r.logged_in for r in manager.list()] == [False]  # the published record stays
    connector.fail = None
    assert manager.attach(EXPORT, SECRET) == "/dev/fake-vol-1"  # a plain attach of a published record logs in
    with pytest.raises(FailedPrecondition):
        manager.attach(EXPORT, SECRET, mode="kernel")  # another mode: detach first


def test_after_a_restart_userspace_records_stay_published_not_logged_in(env):
    manager, connector, tmp_path = env
    manager.attach(EXPORT, SECRET)
    other = FakeConnector()
    restarted = AttachmentManager(str(tmp_path), {"userspace": lambda: other})
    restarted.restore()
    assert other.calls == [("detach", "vol-1")]  # the dead FUSE device of the previous process is cleaned
    assert [(r.volume_id, r.logged_in) for r in restarted.list()] == [("vol-1", False)]
    assert restarted.login("vol-1") == "/dev/fake-vol-1" and other.chap == [("shoal-vol-1", SECRET)]


def test_shutdown_logs_userspace_devices_out_and_keeps_the_records(env):
    manager, connector, tmp_path = env
    manager.attach(EXPORT, SECRET)
    manager.close()
    assert connector.calls == [("attach", "vol-1"), ("detach", "vol-1")]
    data = json.loads((tmp_path / "attachments.json").read_text())["attachments"]
    assert data["vol-1"]["device_path"] == "" and os.path.exists(tmp_path / "attachment-secrets.json")


def test_the_kernel_connector_rescans_and_reports_the_disks_condition(tmp_path):
    """NodeExpandVolume's rescan and NodeGetVolumeStats' condition through the kernel connector, at its
    runner/sysfs boundary (``FakeKernel`` of tests/unit/test_host_kernel.py plays open-iscsi and sysfs)."""
    from tests.unit.test_host_kernel import FakeKernel, volume

    kernel = FakeKernel(tmp_path, {0: "vol-a"})
    connector = kernel.connector()
    device = connector.attach(volume(0))
    disk = kernel.sysfs / "block" / device.handle
    (disk / "size").write_text("4194304\n")  # the kernel's size after the rescan, in 512-byte sectors
    kernel.take()
    assert connector.rescan(volume(0)) == 4194304 * 512
    assert kernel.take()[1] == [(f"block/{device.handle}/device/rescan", "1")]
    assert connector.condition(volume(0)) == ""
    (disk / "device" / "ioerr_cnt").write_text("0x3\n")
    assert "3 I/O errors" in connector.condition(volume(0))
    (disk / "device" / "ioerr_cnt").write_text("0x0\n")
    (disk / "device" / "state").write_text("offline\n")
    assert "state offline" in connector.condition(volume(0))
    connector.detach(volume(0))
    assert "has no disk on this host" in connector.condition(volume(0))


def test_a_device_in_use_is_never_logged_out(tmp_path):
    """A bind-mounted device file (a CSI block publish) or a mounted filesystem keeps its login: logging out
    would leave a path that the next attach may reuse for another volume."""
    connector = FakeConnector()
    users: list[str] = ["/var/lib/kubelet/pods/p/volumeDevices/v"]
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector}, in_use=lambda device: users)
    manager.attach(EXPORT, SECRET)
    for call in (manager.logout, manager.detach):
        with pytest.raises(FailedPrecondition, match="in use at /var/lib/kubelet"):
            call("vol-1")
    assert connector.calls == [("attach", "vol-1")] and manager.list()[0].logged_in
    users.clear()
    assert manager.detach("vol-1") and connector.calls[-1] == ("detach", "vol-1")


def test_hold_keeps_the_volumes_detach_and_logout_waiting_and_lets_the_holder_log_in(env):
    """``hold`` (the CSI Node service's NodeStage, NodePublish, NodeUnstage, NodeExpand): the agent's own
    lock of the volume, so a detach from another thread (ControllerUnpublishVolume) waits for the Node RPC
    instead of logging the device out under it; reentrant, so the holder's login goes ahead."""
    manager, connector, _ = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    done = threading.Event()
    with manager.hold("vol-1"):
        assert manager.login("vol-1") == "/dev/fake-vol-1"
        worker = threading.Thread(target=lambda: (manager.detach("vol-1"), done.set()))
        worker.start()
        assert not done.wait(0.5)  # waits while held
        assert manager.get("vol-1").logged_in
    worker.join(10)
    assert done.is_set() and manager.get("vol-1") is None and connector.calls[-1] == ("detach", "vol-1")


def test_a_kernel_device_path_from_before_a_restart_is_confirmed_by_the_connector_at_the_next_login(tmp_path):
    """Kernel sessions usually outlive an agent restart, but not a host reboot, and ``/dev/sdX`` may name
    another disk by then.  The restored record's path is not handed out on trust: the next login (NodeStage)
    asks the connector, whose attach is idempotent and checks the LUN's identity, and takes the path it
    gives; later logins need no second call."""
    before = FakeConnector()
    manager = AttachmentManager(str(tmp_path), {"kernel": lambda: before})
    manager.attach(EXPORT, SECRET, mode="kernel", defer_login=True)
    assert manager.login("vol-1") == "/dev/fake-vol-1"

    class Rebooted(FakeConnector):  # the disk came back under another name
        def attach(self, target):
            device = super().attach(target)
            return replace(device, path="/dev/sdz")

    after = Rebooted()
    restarted = AttachmentManager(str(tmp_path), {"kernel": lambda: after})
    restarted.restore()
    assert restarted.login("vol-1") == "/dev/sdz" and after.calls == [("attach", "vol-1")]
    assert restarted.login("vol-1") == "/dev/sdz" and after.calls == [("attach", "vol-1")]
