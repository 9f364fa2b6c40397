"""CSI Node service: the findings of the Node-service review (F01-F18), one regression test or more each.

The same environment as tests/unit/test_csi_node.py (its ``env`` fixture: a real gRPC server on a unix
socket, ``FakeAttachments`` at our own ``AttachedVolumes`` boundary, real mkfs/mount/losetup through the
command runner; root needed for the tests with devices, skipped otherwise).  F17 drives the real
``AttachmentManager`` over a loop-device connector (the connector faked at our ``Connector`` boundary).
Each docstring names the finding and the CSI spec rule (spec.md, "RPC Interactions" and each RPC's error
table) it checks.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading

import grpc
import pytest

from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.exports import ExportInfo
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import BLANK_PROBE, Mounter, reads_blank
from node_agent.csi.node import NodeServicer
from node_agent.host.connector import AttachedDevice, Connector
from node_agent.host.runner import SubprocessRunner
from protos.csi.v1 import csi_pb2
from test_csi_node import SIZE, VOL, Code, Mode, block_cap, env, mount_cap, needs_root  # noqa: F401

PAYLOAD = b"customer data, not a filesystem"


def outcome(call, *args, **kw):
    """The gRPC code a call answers (OK when it returns)."""
    try:
        call(*args, **kw)
        return Code.OK
    except grpc.RpcError as exc:
        return exc.code()


def write_at(path, offset, data):
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def read_at(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# -- F04: mkfs only on a blank device nothing uses --------------------------------------------------------------
@needs_root
def test_f04_data_in_the_middle_of_the_volume_is_never_formatted(env):
    """F04a: blkid finds no signature, both ends read zeros, data at 32 MiB of 64 MiB: not blank (a device up
    to ``BLANK_READ_BUDGET`` is read whole), FAILED_PRECONDITION, no mkfs."""
    loop = env.attach_loop()
    write_at(loop, SIZE // 2, PAYLOAD)
    assert outcome(env.stage, loop) == Code.FAILED_PRECONDITION
    assert env.runner.ran("mkfs.ext4") == []
    assert read_at(loop, SIZE // 2, len(PAYLOAD)) == PAYLOAD


def test_f04_reads_blank_reads_a_small_device_whole_and_a_large_one_in_spread_windows(tmp_path):
    """The rule of ``reads_blank``: whole up to the budget; beyond, ``budget // BLANK_PROBE`` windows from the
    first byte to the last, evenly spread (data between windows is not seen: said in its docstring)."""
    from node_agent.csi.mounts import _windows
    image = tmp_path / "v.img"
    with open(image, "wb") as f:
        f.truncate(8 * BLANK_PROBE)
    write_at(str(image), 5 * BLANK_PROBE + 12345, b"x")
    assert reads_blank(str(image)) is False
    assert reads_blank(str(image), budget=8 * BLANK_PROBE) is False  # the budget covers it: read whole
    size = 100 * BLANK_PROBE + 512
    windows = _windows(size, 10 * BLANK_PROBE)
    assert len(windows) == 10 and windows[0][0] == 0 and windows[-1] == (size - BLANK_PROBE, BLANK_PROBE)
    gaps = [b[0] - a[0] for a, b in zip(windows, windows[1:])]
    assert max(gaps) - min(gaps) <= 4096 + BLANK_PROBE // 2  # evenly spread
    assert _windows(3 * BLANK_PROBE + 1, 10 * BLANK_PROBE)[-1] == (3 * BLANK_PROBE, 1)  # whole, the tail too


@needs_root
def test_f04_a_device_published_for_raw_block_is_never_formatted_or_mounted(env):
    """F04b: the device is published for raw block access (a workload writes it) when a stage with mount access
    comes for another staging path: FAILED_PRECONDITION, no mkfs, nothing mounted."""
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    env.publish(loop, block_cap())
    write_at(env.target, SIZE // 2, PAYLOAD)
    second = os.path.join(env.dir, "staging", "second-pv")
    assert outcome(env.stage, loop, mount_cap(), staging_target_path=second) == Code.FAILED_PRECONDITION
    assert env.runner.ran("mkfs.ext4") == [] and env.servicer.mounter.mounted_at(second) is None
    assert read_at(loop, SIZE // 2, len(PAYLOAD)) == PAYLOAD
    env.unpublish()
    env.unstage()


@needs_root
def test_f04_a_blank_device_in_use_is_never_formatted(env, monkeypatch):
    """F04: even blank, a device with users (here: its device file bound somewhere) or an exclusive opener
    (``O_EXCL`` fails: a mount, a running mkfs) is never formatted."""
    from node_agent.csi.mounts import Use
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    elsewhere = os.path.join(env.dir, "bound-elsewhere")
    open(elsewhere, "w").close()
    subprocess.run(["mount", "--bind", loop, elsewhere], check=True)
    # seen as a mount of it (not as a block publish, which the stage refuses before it looks at the contents)
    monkeypatch.setattr(env.servicer.mounter, "uses", lambda device: [Use(elsewhere, block=False)])
    try:
        assert outcome(env.stage, loop, mount_cap(), staging_target_path=os.path.join(env.dir, "s2")) == \
            Code.FAILED_PRECONDITION
    finally:
        subprocess.run(["umount", elsewhere], check=True)
        monkeypatch.undo()
    fd = os.open(loop, os.O_RDONLY | os.O_EXCL)  # as a mounted filesystem or mkfs holds it
    try:
        assert outcome(env.stage, loop, mount_cap(), staging_target_path=os.path.join(env.dir, "s3")) == \
            Code.FAILED_PRECONDITION
    finally:
        os.close(fd)
    assert env.runner.ran("mkfs.ext4") == []


# -- F03: a read-only block publish refuses writes ------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("how", ["readonly-flag", "reader-only-mode"])
def test_f03_read_only_block_publish_refuses_a_real_write(env, how):
    """F03: the kernel ignores a read-only bind mount for writes through a device node; the publish binds a
    read-only loop device over the volume's, so a pwrite fails and the volume is unchanged.  Unpublish detaches
    that loop device; a repeat of the read-only publish is OK, a writable one ALREADY_EXISTS."""
    loop = env.attach_loop()
    cap = block_cap(Mode.SINGLE_NODE_READER_ONLY) if how == "reader-only-mode" else block_cap()
    readonly = how == "readonly-flag"
    env.stage(loop, cap)
    env.publish(loop, cap, readonly=readonly)
    assert "ro" in env.servicer.mounter.mounted_at(env.target).options
    with pytest.raises(OSError) as refused:
        fd = os.open(env.target, os.O_RDWR)
        try:
            os.pwrite(fd, PAYLOAD, SIZE // 2)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert read_at(loop, SIZE // 2, len(PAYLOAD)) == bytes(len(PAYLOAD))
    write_at(loop, 4096, b"written by the volume's writer")
    assert read_at(env.target, 4096, 30) == b"written by the volume's writer"  # reads the volume
    env.publish(loop, cap, readonly=readonly)  # a repeat
    if how == "readonly-flag":
        assert outcome(env.publish, loop, cap, readonly=False) == Code.ALREADY_EXISTS
    assert len(env.servicer.mounter.loops_over(loop)) == 1
    assert outcome(env.unstage) == Code.FAILED_PRECONDITION  # still published (the loop device counts)
    env.unpublish()
    assert env.servicer.mounter.loops_over(loop) == []
    env.unstage()


@needs_root
def test_f03_a_failed_read_only_block_publish_leaves_no_loop_device(env, monkeypatch):
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    real = env.runner.run

    def failing_bind(argv, *, check=True, input=None):
        if argv[:2] == ["mount", "--bind"]:
            raise OSError(errno.EPERM, "no")
        return real(argv, check=check, input=input)
    monkeypatch.setattr(env.runner, "run", failing_bind)
    assert outcome(env.publish, loop, block_cap(), readonly=True) != Code.OK
    monkeypatch.undo()
    assert env.servicer.mounter.loops_over(loop) == []
    env.unpublish()
    env.unstage()


# -- F17: a detach never interleaves with a stage -------------------------------------------------------------------
class LoopConnector(Connector):
    """Our ``Connector`` boundary: a loop device over ``<volume>.img`` (no iSCSI)."""

    def __init__(self, directory):
        self.dir, self.loops = directory, {}

    def attach(self, target):
        if target.volume_id not in self.loops:
            image = os.path.join(self.dir, f"{target.volume_id}.img")
            self.loops[target.volume_id] = subprocess.run(["losetup", "-f", "--show", image], check=True,
                                                          capture_output=True, text=True).stdout.strip()
        return AttachedDevice(path=self.loops[target.volume_id], volume_id=target.volume_id, target=target)

    def detach(self, target):
        loop = self.loops.pop(target.volume_id, None)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=True)


def _export(volume_id):
    return ExportInfo(volume_id=volume_id, target_iqn=f"iqn.2026-11.io.shoal:target:a:{volume_id}",
                      portals=("127.0.0.1:3260",), lun=0, naa="6" + "1" * 31, serial=volume_id, chap_user="u")


class _Context:
    def abort(self, code, details):
        raise grpc.RpcError(f"{code}: {details}")


def _agent_with_two_volumes(tmp_path):
    for name in ("vol-a", "vol-b"):
        with open(tmp_path / f"{name}.img", "wb") as f:
            f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(tmp_path / "vol-b.img")], check=True, capture_output=True)
    connector = LoopConnector(str(tmp_path))
    mounter = Mounter(SubprocessRunner())
    os.makedirs(tmp_path / "agent")
    manager = AttachmentManager(str(tmp_path / "agent"), {"userspace": lambda: connector}, in_use=mounter.users)
    manager.attach(_export("vol-a"), chap_secret="s" * 12, defer_login=True)  # ControllerPublish of A
    return connector, mounter, manager, NodeServicer("n", {}, DeviceResolver(manager), mounter)


def _cleanup(connector, *mount_points):
    for point in mount_points:
        subprocess.run(["umount", str(point)], capture_output=True)
    for loop in connector.loops.values():
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@needs_root
def test_f17_a_device_that_changed_during_stage_is_never_mounted(tmp_path):
    """F17: A is detached in the middle of its stage (here on the stage's own thread, where the agent's lock
    is reentrant) and its loop device name is reused by B: the device is checked again right before mount,
    and B's filesystem never appears at A's staging path."""
    connector, mounter, manager, servicer = _agent_with_two_volumes(tmp_path)
    staging = tmp_path / "staging-a"
    real_fs_type = mounter.fs_type

    def detach_then_reuse(device):
        mounter.fs_type = real_fs_type
        manager.detach("vol-a")
        subprocess.run(["losetup", device, str(tmp_path / "vol-b.img")], check=True)
        connector.loops["vol-b"] = device
        return real_fs_type(device)
    mounter.fs_type = detach_then_reuse
    request = csi_pb2.NodeStageVolumeRequest(volume_id="vol-a", staging_target_path=str(staging),
                                             volume_capability=mount_cap())
    try:
        with pytest.raises(grpc.RpcError) as refused:
            servicer.NodeStageVolume(request, _Context())
        assert "NOT_FOUND" in str(refused.value)  # A is not published here any more
        assert mounter.mounted_at(str(staging)) is None
    finally:
        _cleanup(connector, staging)


@needs_root
def test_f17_a_detach_from_another_thread_waits_for_the_stage_and_finds_it_in_use(tmp_path):
    """F17: the stage holds the agent's lock of the volume; ControllerUnpublishVolume's detach (another
    thread) waits until the stage is done, and then refuses to log out a device in use."""
    connector, mounter, manager, servicer = _agent_with_two_volumes(tmp_path)
    staging = tmp_path / "staging-a"
    real_fs_type = mounter.fs_type
    in_stage, detach_done, result = threading.Event(), threading.Event(), {}

    def detach():
        in_stage.wait(10)
        try:
            manager.detach("vol-a")
            result["detach"] = "OK"
        except Exception as exc:
            result["detach"] = type(exc).__name__
        detach_done.set()
    thread = threading.Thread(target=detach)
    thread.start()

    def slow_fs_type(device):
        in_stage.set()
        result["waited"] = not detach_done.wait(1.0)  # the detach does not get through meanwhile
        return real_fs_type(device)
    mounter.fs_type = slow_fs_type
    request = csi_pb2.NodeStageVolumeRequest(volume_id="vol-a", staging_target_path=str(staging),
                                             volume_capability=mount_cap())
    try:
        servicer.NodeStageVolume(request, _Context())
        thread.join(10)
        assert result == {"waited": True, "detach": "FailedPrecondition"}
        assert mounter.mounted_at(str(staging)).dev == os.stat(connector.loops["vol-a"]).st_rdev
    finally:
        thread.join(10)
        _cleanup(connector, staging)


# -- F05 / F06: the capability a publish asks for against what is there ---------------------------------------------
@needs_root
def test_f05_block_publish_onto_a_filesystem_target_is_already_exists(env):
    """F05a, CSI NodePublishVolume: published at target_path with another volume_capability: ALREADY_EXISTS."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    assert outcome(env.publish, loop, block_cap()) == Code.ALREADY_EXISTS
    env.unpublish()
    env.unstage()


@needs_root
def test_f05_block_publish_of_a_mounted_filesystem_is_refused(env):
    """F05b: a block publish at another target while the filesystem is staged: FAILED_PRECONDITION (the raw
    device of a mounted ext4 is never handed out); and the other way round at stage (F04b)."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    raw = os.path.join(env.dir, "pods", "pod-2", "raw")
    assert outcome(env.publish, loop, block_cap(), target_path=raw) == Code.FAILED_PRECONDITION
    assert not os.path.exists(raw) or not stat.S_ISBLK(os.stat(raw).st_mode)
    env.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=raw))
    env.unpublish()
    env.unstage()


@needs_root
@pytest.mark.parametrize("cap", [mount_cap(mode=Mode.SINGLE_NODE_SINGLE_WRITER),
                                 block_cap(Mode.SINGLE_NODE_SINGLE_WRITER)], ids=["mount", "block"])
def test_f06_single_node_single_writer_is_published_at_one_target_only(env, cap):
    """F06, CSI NodePublishVolume (SINGLE_NODE_SINGLE_WRITER, T1 != T2): FAILED_PRECONDITION; the first
    target's repeat stays OK; SINGLE_NODE_MULTI_WRITER publishes at both."""
    loop = env.attach_loop()
    env.stage(loop, cap)
    env.publish(loop, cap)
    second = os.path.join(env.dir, "pods", "pod-2", VOL)
    assert outcome(env.publish, loop, cap, target_path=second) == Code.FAILED_PRECONDITION
    env.publish(loop, cap)
    multi = csi_pb2.VolumeCapability()
    multi.CopyFrom(cap)
    multi.access_mode.mode = Mode.SINGLE_NODE_MULTI_WRITER
    env.publish(loop, multi, target_path=second)
    env.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=second))
    env.unpublish()
    env.unstage()


# -- F12: a read-only stage writes nothing -----------------------------------------------------------------------------
@needs_root
def test_f12_a_read_only_stage_never_writes_the_device(env):
    """F12: an ext4 smaller than its device is not checked or grown at a read-only stage (e2fsck -p repairs,
    resize2fs writes), and it is mounted ``ro,noload`` (no journal replay either)."""
    loop = env.attach_loop()
    env.stage(loop)
    env.unstage()
    with open(env.backing, "r+b") as f:
        f.truncate(2 * SIZE)
    subprocess.run(["losetup", "--set-capacity", loop], check=True)
    env.runner.calls.clear()
    env.stage(loop, mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY))
    writers = [c for c in env.runner.calls if c[0] in ("e2fsck", "resize2fs", "mkfs.ext4", "xfs_growfs")]
    mount = env.servicer.mounter.mounted_at(env.staging)
    env.stage(loop, mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY))  # a repeat
    env.unstage()
    assert writers == []
    assert "ro" in mount.options and "norecovery" in mount.super_options  # how the kernel shows noload


# -- F01 / F16: mount flags ------------------------------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("flag", ["ro", "rw", "loop", "offset=1048576", "sizelimit=4096", "X-mount.mkdir",
                                  "X-mount.subdir=x", "x-systemd.automount", "helper=ext4", "rshared"])
def test_f01_f16_flags_that_change_what_is_mounted_are_invalid(env, flag):
    """F01/F16: ``ro`` with a writer access mode made a stage whose identical repeat answered ALREADY_EXISTS
    and a "writable" publish that was read-only; ``loop``/``offset=``/``sizelimit=`` mounted a new loop device
    instead of the volume.  Read-only is the access mode's (and publish's ``readonly``) to say, and mount flags
    are filesystem options: INVALID_ARGUMENT, at every repeat, nothing logged in or mounted.  (The repro
    expected the first ``ro`` stage to answer OK: see the report; refusing it is the rule written down.)"""
    loop = env.attach_loop()
    for _ in range(2):
        assert outcome(env.stage, loop, mount_cap(flags=[flag])) == Code.INVALID_ARGUMENT
        assert outcome(env.publish, loop, mount_cap(flags=[flag])) == Code.INVALID_ARGUMENT
    assert env.attachments.calls == [] and env.runner.calls == []


@needs_root
def test_f01_a_repeated_stage_compares_the_mount_flags(env):
    """F01: a repeated stage answers OK for the same flags and ALREADY_EXISTS for others (those mountinfo
    shows: noatime, nodev, sync, key=value options of the filesystem)."""
    loop = env.attach_loop()
    env.stage(loop, mount_cap(flags=["noatime", "nodev", "commit=30"]))
    env.stage(loop, mount_cap(flags=["noatime", "nodev", "commit=30"]))
    for other in (["nodev", "commit=30"], ["noatime", "nodev", "commit=30", "sync"],
                  ["noatime", "nodev", "commit=20"]):
        assert outcome(env.stage, loop, mount_cap(flags=other)) == Code.ALREADY_EXISTS, other
    env.unstage()


# -- F02: absolute paths only; "--" before positional arguments ------------------------------------------------------
@needs_root
def test_f02_relative_paths_are_invalid_everywhere(env, monkeypatch):
    """F02, CSI: staging_target_path, target_path and volume_path MUST be absolute: INVALID_ARGUMENT before
    anything is logged in, made or mounted (NodeUnpublishVolume already refused a relative target_path, so a
    relative publish could never be undone)."""
    monkeypatch.chdir(env.dir)
    loop = env.attach_loop()
    assert outcome(env.stage, loop, staging_target_path="rel-staging") == Code.INVALID_ARGUMENT
    assert env.attachments.calls == [] and not os.path.exists(os.path.join(env.dir, "rel-staging"))
    env.stage(loop)
    assert outcome(env.publish, loop, target_path="pods/rel-target") == Code.INVALID_ARGUMENT
    assert outcome(env.publish, loop, staging_target_path="staging/" + VOL) == Code.INVALID_ARGUMENT
    assert not os.path.exists(os.path.join(env.dir, "pods"))
    N = csi_pb2
    for call, request in (
            (env.node.NodeUnstageVolume, N.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path="staging")),
            (env.node.NodeUnpublishVolume, N.NodeUnpublishVolumeRequest(volume_id=VOL, target_path="pods")),
            (env.node.NodeExpandVolume, N.NodeExpandVolumeRequest(volume_id=VOL, volume_path="staging/" + VOL)),
            (env.node.NodeGetVolumeStats, N.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path="staging/" + VOL))):
        assert outcome(call, request) == Code.INVALID_ARGUMENT, call
    assert env.servicer.mounter.mounted_at(env.staging) is not None
    env.unstage()


@needs_root
def test_f02_mount_and_umount_end_their_options_before_paths(env):
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    env.unpublish()
    env.unstage()
    commands = [c for c in env.runner.calls if c[0] in ("mount", "umount")]
    assert commands and all("--" in c and c.index("--") == len(c) - (3 if "--bind" in c or "-t" in c else 2)
                            for c in commands), commands


# -- F09: a failed stage leaves no login behind ----------------------------------------------------------------------
@needs_root
def test_f09_a_refused_stage_logs_out_what_it_logged_in(env):
    loop = env.attach_loop()
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
    assert outcome(env.stage, loop, mount_cap(fs_type="xfs")) == Code.FAILED_PRECONDITION  # holds ext4
    assert env.attachments.records[VOL].device_path == ""
    assert env.attachments.calls == [("login", VOL), ("logout", VOL)]


@needs_root
def test_f09_a_failed_mount_logs_out_and_answers_a_csi_code(env):
    """F09: mount(8) refusing a flag: FAILED_PRECONDITION with its message (not INTERNAL), logged out."""
    loop = env.attach_loop()
    with pytest.raises(grpc.RpcError) as failed:
        env.stage(loop, mount_cap(flags=["no_such_ext4_option"]))
    assert failed.value.code() == Code.FAILED_PRECONDITION and "mount" in failed.value.details()
    assert env.servicer.mounter.mounted_at(env.staging) is None
    assert env.attachments.records[VOL].device_path == ""


@needs_root
def test_f09_a_failed_repeat_keeps_the_login_it_did_not_make(env):
    loop = env.attach_loop()
    env.stage(loop)
    assert outcome(env.stage, loop, mount_cap(fs_type="xfs")) == Code.ALREADY_EXISTS
    assert env.attachments.records[VOL].device_path == loop
    env.unstage()


# -- F11: unstage undoes only this volume's staging ------------------------------------------------------------------
@needs_root
def test_f11_unstage_never_unmounts_another_volumes_staging(env):
    """F11: NodeUnstageVolume(A, a staging path where B is staged): A is not staged there (OK, A logged out),
    and B's staging mount stays."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    env.attach_loop("vol-a")
    env.attachments.login("vol-a")  # A logged in too (its own device), staged nowhere
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="vol-a", staging_target_path=env.staging))
    assert env.servicer.mounter.mounted_at(env.staging) is not None
    assert env.attachments.records["vol-a"].device_path == ""
    env.unpublish()
    env.unstage()
    assert env.servicer.mounter.mounted_at(env.staging) is None


# -- F14: symbolic links are never followed --------------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("cap", [block_cap(), mount_cap()], ids=["block", "mount"])
def test_f14_a_symlink_target_is_refused_and_never_followed(env, cap):
    loop = env.attach_loop()
    env.stage(loop, cap)
    outside = os.path.join(env.dir, "outside-kubelet", "dir" if cap.HasField("mount") else "file")
    if cap.HasField("mount"):
        os.makedirs(outside)
    else:
        os.makedirs(os.path.dirname(outside))
    os.makedirs(os.path.dirname(env.target))
    os.symlink(outside, env.target)
    assert outcome(env.publish, loop, cap) == Code.FAILED_PRECONDITION
    assert env.servicer.mounter.mounted_at(outside) is None
    assert cap.HasField("mount") or not os.path.exists(outside)
    env.unpublish()  # OK, and the link is left alone
    assert os.path.islink(env.target)
    env.unstage()


@needs_root
def test_f14_a_symlink_staging_path_is_refused(env):
    loop = env.attach_loop()
    outside = os.path.join(env.dir, "outside-kubelet")
    os.makedirs(outside)
    os.makedirs(os.path.dirname(env.staging))
    os.symlink(outside, env.staging)
    assert outcome(env.stage, loop) == Code.FAILED_PRECONDITION
    assert env.servicer.mounter.mounted_at(outside) is None
    assert env.attachments.records[VOL].device_path == ""  # F09: the login undone


# -- lower ----------------------------------------------------------------------------------------------------------
def test_f07_an_unsupported_capability_is_invalid_argument_for_expand(env):
    """F07, CSI NodeExpandVolume errors: "Exceeds capabilities" is INVALID_ARGUMENT for this RPC."""
    os.makedirs(env.target)
    assert outcome(env.expand, env.target, 0, mount_cap(fs_type="btrfs")) == Code.INVALID_ARGUMENT


@needs_root
def test_f07_a_size_not_seen_yet_is_retried_not_in_use(env):
    """F07: required_bytes larger than the device shows (yet): UNAVAILABLE, not FAILED_PRECONDITION (which for
    NodeExpandVolume means "volume in use, caller MUST NOT retry")."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    assert outcome(env.expand, env.target, 2 * SIZE) == Code.UNAVAILABLE
    env.unpublish()
    env.unstage()


@needs_root
def test_f18_expand_through_a_read_only_publish_grows_through_the_staging_mount(env):
    """F18: kubelet's volume_path is the publish target; read-only there (xfs_growfs fails with EROFS), the
    filesystem grows through its writable staging mount."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("needs mkfs.xfs (xfsprogs)")
    size = 320 << 20
    loop = env.attach_loop(size=size)
    cap = mount_cap(fs_type="xfs")
    env.stage(loop, cap)
    env.publish(loop, cap, readonly=True)
    with open(env.backing, "r+b") as f:
        f.truncate(2 * size)
    assert env.expand(env.target, 2 * size).capacity_bytes == 2 * size
    assert env.runner.ran("xfs_growfs")[-1] == ["xfs_growfs", env.staging]
    st = os.statvfs(env.target)
    assert st.f_blocks * st.f_frsize > size * 3 // 2
    env.unpublish()
    env.unstage()


@needs_root
def test_f18_a_filesystem_mounted_read_only_only_is_not_grown(env):
    loop = env.attach_loop()
    env.stage(loop)
    env.unstage()
    cap = mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY)
    env.stage(loop, cap)
    env.publish(loop, cap)
    assert outcome(env.expand, env.target) == Code.FAILED_PRECONDITION
    assert env.runner.ran("resize2fs") == []
    env.unpublish()
    env.unstage()


@needs_root
def test_f08_stats_of_a_path_holding_another_volume_is_not_found(env):
    """F08, CSI NodeGetVolumeStats: "Volume does not exist ... on specified volume_path": NOT_FOUND."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    env.attach_loop("vol-other")
    env.attachments.login("vol-other")
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-other", volume_path=env.target)
    assert outcome(env.node.NodeGetVolumeStats, request) == Code.NOT_FOUND
    assert not env.stats(env.target).volume_condition.abnormal  # VOL's own answer
    env.unpublish()
    env.unstage()


def test_f13_publish_without_staging_path_is_failed_precondition(env):
    """F13, CSI NodePublishVolume errors: "Staging target path not set" (STAGE_UNSTAGE_VOLUME set):
    FAILED_PRECONDITION."""
    request = csi_pb2.NodePublishVolumeRequest(volume_id=VOL, target_path=env.target, volume_capability=mount_cap())
    assert outcome(env.node.NodePublishVolume, request) == Code.FAILED_PRECONDITION


def test_f10_unpublish_of_an_unmounted_non_empty_directory_is_ok_and_leaves_it(env):
    """F10, CSI NodeUnpublishVolume: what is not published there answers OK; what publish did not leave stays."""
    os.makedirs(env.target)
    with open(os.path.join(env.target, "left-by-someone"), "w") as f:
        f.write("x")
    env.unpublish()
    assert os.path.exists(os.path.join(env.target, "left-by-someone"))


@needs_root
def test_f15_stats_of_a_block_publish_whose_device_is_gone_is_abnormal(env):
    """F15: the device node's disk is gone (open() fails, ENXIO): OK with volume_condition.abnormal, not
    INTERNAL.  Modelled by a block node whose major:minor has no disk (sd major 8, minor 240)."""
    node = os.path.join(env.dir, "sd-gone")
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(8, 240))
    env.attachments.publish(VOL, node)
    env.stage(node, block_cap())
    env.publish(node, block_cap())
    answer = env.stats(env.target)
    assert answer.volume_condition.abnormal and "fails" in answer.volume_condition.message
    env.unpublish()
    env.unstage()

