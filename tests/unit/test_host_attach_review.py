"""Host attach after review: each defect the review reproduced, checked fixed.

The kernel connector runs against ``FakeKernel`` (tests/unit/test_host_kernel.py: open-iscsi and the SCSI
layer at the connector's own boundaries); where a real block device matters (a disk held with ``O_EXCL``) the
fake ``/dev/sdX`` is a link to a real loop device.  The userspace connector runs for real: FUSE mounts and
loop devices over ``FileBlockDevice`` (our own ``BlockDevice``), with the helpers of
tests/integration/test_agent_restart_attach.py.  The CSI Node service's unstage is driven directly; where the
host's mounts would have to show another volume's mount of a fake disk, ``Mounts`` answers as ``Mounter``.
Tests needing root, loop devices, FUSE or mount are skipped without them.  Every loop device, mount and
process a test makes is removed or stopped, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from node_agent.agent.attachments import KERNEL, AttachmentManager
from node_agent.agent.errors import FailedPrecondition
from node_agent.agent.exports import ExportInfo
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter
from node_agent.csi.node import NodeServicer
from node_agent.host.connector import PermanentConnectorError, TemporaryConnectorError, parse_vpd_identity
from node_agent.host.fuse_export import is_mountpoint
from node_agent.host.runner import SubprocessRunner
from node_agent.host.userspace import _loops_backed_by
from node_agent.scsi.vpd import naa_for
from protos.csi.v1 import csi_pb2
from tests.conftest import require_loop_and_fuse, require_tools
from tests.integration.test_agent_restart_attach import (
    BLOCK,
    cleaned,
    export_of,
    first_block,
    fuse_file,
    image,
    make_manager,
    previous_agent,
)
from tests.support.shoal_target import stop_process
from tests.unit.test_host_kernel import IQN, PORTAL, FakeKernel, any_node, identity_pages, volume


def export(volume_id: str, lun: int) -> ExportInfo:
    return ExportInfo(volume_id=volume_id, target_iqn=IQN, portals=(PORTAL,), lun=lun,
                      naa=naa_for(volume_id).hex(), serial=volume_id, chap_user="")


def fake_kernel(tmp_path, luns) -> FakeKernel:
    (tmp_path / "k").mkdir()
    return FakeKernel(tmp_path / "k", luns)


def kernel_manager(tmp_path, kernel: FakeKernel, in_use=lambda device: []) -> AttachmentManager:
    (tmp_path / "data").mkdir(exist_ok=True)
    connector = kernel.connector()
    return AttachmentManager(str(tmp_path / "data"), {KERNEL: lambda: connector}, in_use=in_use)


def serial_of(kernel: FakeKernel, path: str) -> str | None:
    device = kernel.sysfs / "block" / os.path.basename(path) / "device"
    return parse_vpd_identity((device / "vpd_pg83").read_bytes(), (device / "vpd_pg80").read_bytes()).serial


def reboot(kernel: FakeKernel) -> None:
    """What a host reboot leaves: no session, no disk, device names handed out afresh."""
    for session in list(kernel.sessions.values()):
        for disk in list(session.luns.values()):
            kernel.delete(disk)
    kernel.sessions.clear()
    kernel.next_disk = 0


class Ctx:
    """A gRPC servicer context as far as ``csi_rpc`` uses it."""

    def abort(self, code, message):
        raise RuntimeError(f"{code.name}: {message}")


class Mounts:
    """``Mounter``'s answers for a host whose mounts are ``by_device`` (device path -> mount points)."""

    def __init__(self, by_device: dict[str, list[str]]):
        self.by_device = by_device
        self.unmounted: list[str] = []

    def mounted_at(self, path):
        return None

    def users(self, device):
        return list(self.by_device.get(device, []))

    def loops_over(self, device):
        return []

    def umount(self, path):
        self.unmounted.append(path)


def unstage(node: NodeServicer, volume_id: str, staging) -> None:
    node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)),
                           Ctx())


@contextlib.contextmanager
def loop_over(tmp_path):
    """A real loop device over a 4 MiB file, detached afterwards."""
    require_tools("losetup")
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)


# --------------------------------------------------------------------------- 1: a failed kernel attach logs out

def test_a_login_whose_lun_never_shows_a_disk_is_logged_out_again(tmp_path):
    """The login of NodeStageVolume succeeded but the LUN showed no disk within device_timeout: the session
    and its node record used to stay, and no logout or detach of the (not logged in) record ever ended them.
    Now the attach that logged in logs out again; a repeat logs in afresh once the LUN is there."""
    kernel = fake_kernel(tmp_path, {})  # the scan of LUN 0 brings no disk
    manager = kernel_manager(tmp_path, kernel)
    manager.attach(export("vol-a", 0), mode=KERNEL, defer_login=True)  # ControllerPublishVolume
    kernel.take()
    with pytest.raises(TemporaryConnectorError, match="no block device"):
        manager.login("vol-a")  # NodeStageVolume
    calls, _ = kernel.take()
    assert calls[-2:] == [any_node("--logout"), any_node("-o", "delete")]
    assert not kernel.sessions and not kernel.records
    assert not manager.get("vol-a").logged_in

    kernel.target_luns = {0: "vol-a"}
    device = manager.login("vol-a")  # the retried NodeStageVolume
    assert serial_of(kernel, device) == "vol-a"
    assert manager.detach("vol-a") is True
    assert not kernel.sessions and not kernel.records


def test_a_lun_with_several_disks_is_deleted_and_logged_out(tmp_path):
    kernel = fake_kernel(tmp_path, {0: "vol-a"})
    scan = kernel.scan

    def scan_two(host, text):  # a second disk at the LUN's address
        scan(host, text)
        session = next(s for s in kernel.sessions.values() if s.host == host)
        (kernel.sysfs / "class" / "iscsi_session" / f"session{session.sid}" / "device" / f"target{host}:0:0" /
         f"{host}:0:0:0" / "block" / "sdz").mkdir(parents=True)

    kernel.scan = scan_two
    with pytest.raises(PermanentConnectorError, match="several disks"):
        kernel.connector().attach(volume(0))
    assert ("block/sda/device/delete", "1") in kernel.writes
    assert not kernel.sessions and not kernel.records


def test_a_failed_attach_beside_an_attached_lun_keeps_the_session(tmp_path):
    """Only a login the failed attach made itself is undone: another LUN's session stays."""
    kernel = fake_kernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    connector = kernel.connector()
    connector.attach(volume(1, "vol-b"))
    with pytest.raises(TemporaryConnectorError, match="no block device"):
        connector.attach(volume(5, "vol-x"))
    assert kernel.sessions[PORTAL].luns == {1: "sda"} and PORTAL in kernel.records


# --------------------------------------------------------------------------- 3: kernel foreign_device

def test_a_repeated_kernel_attach_never_answers_another_volumes_disk(tmp_path):
    """The session ended behind the agent's back (``iscsiadm --logoutall``) and vol-b's LUN got vol-a's old
    /dev/sda: a repeated attach of vol-a used to answer /dev/sda as recorded.  Now the connector is asked
    whether the recorded disk is still the LUN's, and vol-a is logged in again on a disk of its own."""
    kernel = fake_kernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    manager = kernel_manager(tmp_path, kernel)
    first = manager.attach(export("vol-a", 0), mode=KERNEL)
    reboot(kernel)
    dev_b = manager.attach(export("vol-b", 1), mode=KERNEL)
    assert dev_b == first  # the name was handed out again
    again = manager.attach(export("vol-a", 0), mode=KERNEL)
    assert again != dev_b and serial_of(kernel, again) == "vol-a"
    assert manager.get("vol-a").device_path == again
    assert serial_of(kernel, dev_b) == "vol-b" and kernel.sessions[PORTAL].luns == {1: "sda", 0: "sdb"}


def test_kernel_foreign_device_asks_the_session_and_the_vpd_pages(tmp_path):
    kernel = fake_kernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    connector = kernel.connector()
    dev_a = connector.attach(volume(0)).path
    dev_b = connector.attach(volume(1, "vol-b")).path
    assert connector.foreign_device(volume(0), dev_a) == ""
    assert "shows" in connector.foreign_device(volume(0), dev_b)  # LUN 1's disk, not LUN 0's
    assert connector.foreign_device(volume(0), "/elsewhere/sda")
    pg83, _ = identity_pages("vol-other")
    (kernel.sysfs / "block" / "sda" / "device" / "vpd_pg83").write_bytes(pg83)  # the LUN was replaced
    assert "not volume vol-a" in connector.foreign_device(volume(0), dev_a)
    reboot(kernel)
    assert "no disk" in connector.foreign_device(volume(0), dev_a)


# --------------------------------------------------------------------------- 4: a stale path's users

def test_a_stale_path_after_a_reboot_blocks_neither_logout_nor_detach(tmp_path):
    """After a host reboot vol-a's record keeps its old /dev/sda (unverified), which vol-b got since and
    is mounted from: the logout and the detach of vol-a used to refuse (FailedPrecondition, vol-b's mount)
    for good.  Now the connector says that path is not vol-a's any more, and vol-b's disk is left alone."""
    kernel = fake_kernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    mounted: dict[str, list[str]] = {}
    kernel_manager(tmp_path, kernel).attach(export("vol-a", 0), mode=KERNEL)
    reboot(kernel)
    manager = kernel_manager(tmp_path, kernel, in_use=lambda device: mounted.get(device, []))
    manager.restore()
    dev_b = manager.attach(export("vol-b", 1), mode=KERNEL)
    assert manager.get("vol-a").device_path == dev_b
    mounted[dev_b] = ["/var/lib/kubelet/plugins/kubernetes.io/csi/shoal/vol-b/globalmount"]
    kernel.take()
    assert manager.logout("vol-a") is True
    assert manager.detach("vol-a") is True
    _, writes = kernel.take()
    assert writes == []
    assert kernel.sessions[PORTAL].luns == {1: "sda"} and serial_of(kernel, dev_b) == "vol-b"
    assert manager.get("vol-b").device_path == dev_b


def test_an_unverified_disk_that_is_still_the_volumes_is_refused_while_in_use(tmp_path):
    """The agent restarted, the host did not: the session and vol-a's disk are still there and mounted, so the
    logout refuses as before."""
    kernel = fake_kernel(tmp_path, {0: "vol-a"})
    dev_a = kernel_manager(tmp_path, kernel).attach(export("vol-a", 0), mode=KERNEL)
    manager = kernel_manager(tmp_path, kernel, in_use=lambda device: ["/mnt/a"] if device == dev_a else [])
    manager.restore()
    with pytest.raises(FailedPrecondition, match="in use"):
        manager.logout("vol-a")
    assert kernel.sessions[PORTAL].luns == {0: "sda"}


def test_node_unstage_is_not_blocked_by_the_volume_at_a_stale_path(tmp_path):
    """NodeUnstageVolume of vol-a took vol-b's mounts of /dev/sda (vol-a's recorded, stale path) for vol-a's
    and refused ("still published").  Now the volume's devices are the agent's answer."""
    kernel = fake_kernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    kernel_manager(tmp_path, kernel).attach(export("vol-a", 0), mode=KERNEL)
    reboot(kernel)
    manager = kernel_manager(tmp_path, kernel)
    manager.restore()
    dev_b = manager.attach(export("vol-b", 1), mode=KERNEL)
    mounts = Mounts({dev_b: ["/var/lib/kubelet/plugins/kubernetes.io/csi/shoal/vol-b/globalmount"]})
    node = NodeServicer("n", {}, DeviceResolver(manager), mounts)
    (tmp_path / "staging-a").mkdir()
    unstage(node, "vol-a", tmp_path / "staging-a")
    assert manager.get("vol-a").device_path == "" and mounts.unmounted == []
    assert kernel.sessions[PORTAL].luns == {1: "sda"} and (kernel.dev / "sda").exists()


# --------------------------------------------------------------------------- 6: kernel detach of a held disk

def test_kernel_detach_refuses_a_disk_held_exclusively(tmp_path):
    """device-mapper, LVM, md or a running mkfs hold the disk with O_EXCL (no mount shows it): the detach used
    to flush and delete it from under them.  Now it refuses, the record stays logged in, and a repeat after
    the holder let go detaches."""
    with loop_over(tmp_path) as loop:
        kernel = fake_kernel(tmp_path, {0: "vol-a"})
        manager = kernel_manager(tmp_path, kernel, in_use=Mounter(SubprocessRunner()).users)
        device = manager.attach(export("vol-a", 0), mode=KERNEL)
        os.unlink(device)
        os.symlink(loop, device)  # the fake /dev/sda is a real block device now
        holder = os.open(loop, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        try:
            kernel.take()
            with pytest.raises(TemporaryConnectorError, match="in use"):
                manager.logout("vol-a")
            calls, writes = kernel.take()
            assert writes == [] and not [c for c in calls if c[0] == "blockdev"]
            assert kernel.sessions[PORTAL].luns == {0: "sda"} and manager.get("vol-a").device_path == device
        finally:
            os.close(holder)
        assert manager.logout("vol-a") is True
        assert ("block/sda/device/delete", "1") in kernel.writes and not kernel.sessions


# --------------------------------------------------------------------------- 7: is_mountpoint and UTF-8

def test_is_mountpoint_reads_non_ascii_and_escaped_paths(tmp_path):
    require_tools("mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    path = tmp_path / "données été"  # UTF-8 as it is, the space as \040
    path.mkdir()
    (tmp_path / "données").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    try:
        assert is_mountpoint(str(path))
        assert not is_mountpoint(str(tmp_path / "données"))
    finally:
        subprocess.run(["umount", str(path)], check=True)
    assert not is_mountpoint(str(path))


# --------------------------------------------------------------------------- 2 and 5: userspace, for real

def test_a_userspace_attach_whose_note_cannot_be_written_is_undone(tmp_path):
    """Writing the attachment note failed after the loop device was made: the device stayed attached (one
    user), the login failed with a bare OSError, its repeat counted a second user, and the one logout never
    tore it down (loop device, FUSE mount and session leaked).  Now the attach is undone, the error is a
    connector error, and the repeat attaches afresh."""
    require_loop_and_fuse("losetup", "blockdev")
    image(tmp_path, "vol-u", b"U")
    manager, made = make_manager(tmp_path)
    held = fuse_file(tmp_path, "vol-u")
    with cleaned(tmp_path):
        manager.attach(export_of("vol-u"), defer_login=True)
        obstacle = tmp_path / "data" / "userspace" / "volumes" / "vol-u" / "attachment.json.tmp"
        obstacle.mkdir(parents=True)  # stands in for ENOSPC or EIO writing the note
        with pytest.raises(TemporaryConnectorError, match="attachment note"):
            manager.login("vol-u")
        connector = made[0]
        assert connector.users("vol-u") == 0 and manager.get("vol-u").device_path == ""
        assert _loops_backed_by(held) == [] and not is_mountpoint(os.path.dirname(held))
        obstacle.rmdir()

        device = manager.login("vol-u")
        assert connector.users("vol-u") == 1 and first_block(device) == b"U" * BLOCK
        assert manager.logout("vol-u") is True
        assert connector.users("vol-u") == 0
        assert _loops_backed_by(held) == [] and not is_mountpoint(os.path.dirname(held))
        assert manager.detach("vol-u") is True


def test_node_unstage_after_a_restart_unmounts_the_dead_device_and_cleans_it(tmp_path):
    """The agent stopped while the userspace volume was staged: its loop device died mounted, and the restarted
    agent keeps the record as not logged in.  NodeUnstageVolume used to leave the staging mount (not taken
    for the volume's: no device recorded) and its logout then refused the mounted dead device, every retry
    alike.  Now the staging mount of the volume's leftover is unmounted and the leftover removed."""
    require_loop_and_fuse("losetup", "blockdev", "mkfs.ext4", "mount", "umount")
    image(tmp_path, "vol-held", b"H")
    image(tmp_path, "vol-free", b"F")
    staging = tmp_path / "staging"
    staging.mkdir()
    with cleaned(tmp_path):
        child = previous_agent(tmp_path)
        try:
            dead = json.loads(child.stdout.readline())["vol-held"]
            subprocess.run(["mkfs.ext4", "-q", "-F", dead], check=True, capture_output=True)
            subprocess.run(["mount", dead, str(staging)], check=True)  # NodeStageVolume's mount
            child.stdin.close()
            assert child.wait(60) == 0  # the agent stops; its FUSE server dies under the mounted device
        finally:
            stop_process(child)
        manager, _ = make_manager(tmp_path)
        manager.restore()
        assert manager.get("vol-held").device_path == ""
        mounter = Mounter(SubprocessRunner())
        node = NodeServicer("n", {}, DeviceResolver(manager), mounter)

        unstage(node, "vol-held", staging)
        assert mounter.mounted_at(str(staging)) is None
        held = fuse_file(tmp_path, "vol-held")
        assert _loops_backed_by(held) == [] and not is_mountpoint(os.path.dirname(held))
        unstage(node, "vol-held", staging)  # a repeat: nothing left to do
        assert manager.detach("vol-held") is True and manager.detach("vol-free") is True
        assert manager.list() == []

