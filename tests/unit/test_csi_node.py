"""CSI Node service (``shoal agent``), driven through a real gRPC server on a unix socket.

The agent's attachments are a fake at our own boundary (``FakeAttachments``, the
``AttachedVolumes`` protocol of node_agent/csi/devices.py): a published record whose login hands
out a loop device over a temp file, so stage/publish/expand run real mkfs, mount, bind mounts,
resize2fs and xfs_growfs (root needed for those tests; they are skipped otherwise).  The real
agent, connector and iSCSI login are driven by tests/integration/test_csi_e2e.py.  Checked:
required fields and codes, login at stage and logout at unstage, the device check, mkfs only on a
blank device, idempotency of every RPC, block publish giving a usable device file, read-only
publish, expansion, stats with the volume condition, ABORTED for a concurrent operation on the
same volume.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field, replace

import grpc
import pytest

from controller.csi.controller import CsiSettings
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter, parse_mountinfo
from node_agent.csi.node import DEFAULT_TOPOLOGY_KEYS, NodeServicer
from node_agent.csi.server import build_csi_node_server
from node_agent.host.runner import CommandFailed, SubprocessRunner
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode
VOL = "vol-0001"
NAA = "600140512345678901234567890abcde"
SERIAL = "SHOAL0001"
SIZE = 64 << 20

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None
                                or shutil.which("mkfs.ext4") is None,
                                reason="loop devices, mkfs and mount need root and util-linux/e2fsprogs")


CAP_SYS_RESOURCE = 24


def has_capability(bit: int) -> bool:
    """Whether this process has the Linux capability ``bit`` in its effective set."""
    with open("/proc/self/status") as f:
        effective = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(effective, 16) >> bit & 1)


def mount_cap(mode=Mode.SINGLE_NODE_WRITER, fs_type="ext4", flags=()):
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER):
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


TARGET = "iqn.2026-11.io.shoal:target:node-b:vol-0001"


@dataclass(frozen=True)
class Export:
    naa: str
    serial: str
    target_iqn: str = TARGET
    lun: int = 0


@dataclass(frozen=True)
class Record:
    volume_id: str
    device_path: str
    """"" until logged in, as the agent's records."""
    export: Export


@dataclass
class FakeAttachments:
    """Published records; ``login`` hands out the device given at ``publish`` (the connector's part)."""

    records: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    broken: str = ""
    foreign: str = ""
    locks: dict = field(default_factory=dict)

    def hold(self, volume_id):
        """The agent's per-volume lock (``AttachmentManager.hold``)."""
        return self.locks.setdefault(volume_id, threading.RLock())

    def publish(self, volume_id, device, export=None):
        self.records[volume_id] = Record(volume_id, "", export or Export(NAA, SERIAL))
        self.devices[volume_id] = device

    def get(self, volume_id):
        return self.records.get(volume_id)

    def login(self, volume_id):
        self.calls.append(("login", volume_id))
        record = self.records[volume_id]
        if not record.device_path:
            record = self.records[volume_id] = replace(record, device_path=self.devices[volume_id])
        return record.device_path

    def logout(self, volume_id):
        self.calls.append(("logout", volume_id))
        record = self.records.get(volume_id)
        if record is None or not record.device_path:
            return False
        self.records[volume_id] = replace(record, device_path="")
        return True

    def rescan(self, volume_id):
        device = self.records[volume_id].device_path
        subprocess.run(["losetup", "--set-capacity", device], check=True, capture_output=True)
        with open(device, "rb") as f:
            return f.seek(0, os.SEEK_END)

    def condition(self, volume_id):
        return self.broken

    def foreign_device(self, volume_id, path):
        """The userspace connector's answer for a loop device (it compares the kernel's backing file)."""
        return self.foreign


class CountingRunner(SubprocessRunner):
    def __init__(self):
        super().__init__(timeout=60)
        self.calls: list[list[str]] = []

    def run(self, argv, *, check=True, input=None):
        self.calls.append([str(a) for a in argv])
        return super().run(argv, check=check, input=input)

    def ran(self, program):
        return [c for c in self.calls if c[0] == program]


class Env:
    def __init__(self, directory: str):
        self.dir = directory
        self.attachments = FakeAttachments()
        self.runner = CountingRunner()
        self.servicer = NodeServicer("node-a", {"zone": "a", "rack": "r1"}, DeviceResolver(self.attachments),
                                     Mounter(self.runner))
        endpoint = f"unix://{directory}/node.sock"
        self.server = build_csi_node_server(self.servicer, endpoint)
        self.channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.loops: list[str] = []
        self.staging = os.path.join(directory, "staging", VOL)
        self.target = os.path.join(directory, "pods", "pod-1", VOL)

    def attach_loop(self, volume_id=VOL, size=SIZE) -> str:
        backing = os.path.join(self.dir, f"{volume_id}.img")
        with open(backing, "wb") as f:
            f.truncate(size)
        loop = subprocess.run(["losetup", "-f", "--show", backing], check=True, capture_output=True,
                              text=True).stdout.strip()
        self.loops.append(loop)
        self.backing = backing
        self.attachments.publish(volume_id, loop)
        return loop

    def context(self, device: str) -> dict:
        """What ControllerPublishVolume sends (``device`` is only the fake's: no device exists at publish)."""
        return {"target_iqn": TARGET, "lun": "0", "naa": NAA, "serial": SERIAL, "mode": "userspace"}

    def expand(self, path, required=0, cap=None):
        request = csi_pb2.NodeExpandVolumeRequest(volume_id=VOL, volume_path=path)
        if required:
            request.capacity_range.required_bytes = required
        if cap is not None:
            request.volume_capability.CopyFrom(cap)
        return self.node.NodeExpandVolume(request)

    def stage(self, device, cap=None, **fields):
        fields.setdefault("volume_id", VOL)
        fields.setdefault("staging_target_path", self.staging)
        return self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_capability=cap or mount_cap(), publish_context=self.context(device), **fields))

    def publish(self, device, cap=None, **fields):
        fields.setdefault("volume_id", VOL)
        fields.setdefault("staging_target_path", self.staging)
        fields.setdefault("target_path", self.target)
        return self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_capability=cap or mount_cap(), publish_context=self.context(device), **fields))

    def unpublish(self):
        return self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL,
                                                                                target_path=self.target))

    def unstage(self):
        return self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL,
                                                                            staging_target_path=self.staging))

    def stats(self, path):
        return self.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=path))

    def close(self):
        self.channel.close()
        self.server.stop(None).wait(5)
        with open("/proc/self/mountinfo") as f:  # anything a failed test left mounted under our directory
            left = [m.mount_point for m in parse_mountinfo(f.read()) if m.mount_point.startswith(self.dir + "/")]
        for path in reversed(left):
            subprocess.run(["umount", path], check=False, capture_output=True)
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


@pytest.fixture
def env():
    directory = tempfile.mkdtemp(prefix="csin", dir="/tmp")  # short: unix socket paths are limited
    env = Env(directory)
    yield env
    env.close()
    shutil.rmtree(directory, ignore_errors=True)


def code_of(call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code()


# -- information ---------------------------------------------------------------------------------------------
def test_capabilities_and_identity(env):
    caps = {c.rpc.type for c in env.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    RPC = csi_pb2.NodeServiceCapability.RPC
    assert caps == {RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME, RPC.VOLUME_CONDITION,
                    RPC.SINGLE_NODE_MULTI_WRITER}
    assert env.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == "csi.shoal.io"
    plugin = env.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE not in services


def test_node_info_reports_the_controllers_topology_keys(env):
    assert DEFAULT_TOPOLOGY_KEYS == CsiSettings().topology_keys
    info = env.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert dict(info.accessible_topology.segments) == {"zone": "a"}  # "rack" is not a topology key


# -- required fields and codes ----------------------------------------------------------------------------------
def test_required_fields(env):
    N = csi_pb2
    cap = mount_cap()
    for request in (N.NodeStageVolumeRequest(staging_target_path="/x", volume_capability=cap),
                    N.NodeStageVolumeRequest(volume_id=VOL, volume_capability=cap),
                    N.NodeStageVolumeRequest(volume_id=VOL, staging_target_path="/x")):
        assert code_of(env.node.NodeStageVolume, request) == Code.INVALID_ARGUMENT
    for request in (N.NodePublishVolumeRequest(staging_target_path="/s", target_path="/t", volume_capability=cap),
                    N.NodePublishVolumeRequest(volume_id=VOL, staging_target_path="/s", volume_capability=cap),
                    N.NodePublishVolumeRequest(volume_id=VOL, staging_target_path="/s", target_path="/t")):
        assert code_of(env.node.NodePublishVolume, request) == Code.INVALID_ARGUMENT
    assert code_of(env.node.NodeUnstageVolume, N.NodeUnstageVolumeRequest(volume_id=VOL)) == Code.INVALID_ARGUMENT
    assert code_of(env.node.NodeUnstageVolume,
                   N.NodeUnstageVolumeRequest(staging_target_path="/s")) == Code.INVALID_ARGUMENT
    assert code_of(env.node.NodeUnpublishVolume, N.NodeUnpublishVolumeRequest(volume_id=VOL)) == \
        Code.INVALID_ARGUMENT
    assert code_of(env.node.NodeGetVolumeStats, N.NodeGetVolumeStatsRequest(volume_id=VOL)) == \
        Code.INVALID_ARGUMENT


def test_capabilities_malformed_are_invalid_and_unsupported_exceed(env):
    """CSI spec, NodeStageVolume/NodePublishVolume errors: "Exceeds capabilities" is FAILED_PRECONDITION;
    a capability without access type or mode, or a mount flag that is no filesystem option, is invalid."""
    assert code_of(env.stage, "/dev/null", mount_cap(fs_type="btrfs")) == Code.FAILED_PRECONDITION
    assert code_of(env.stage, "/dev/null", mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)) == Code.FAILED_PRECONDITION
    assert code_of(env.stage, "/dev/null", block_cap(Mode.MULTI_NODE_READER_ONLY)) == Code.FAILED_PRECONDITION
    no_mode = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())
    assert code_of(env.stage, "/dev/null", no_mode) == Code.INVALID_ARGUMENT
    for flags in (["bind"], ["noatime,remount"], [""]):
        assert code_of(env.stage, "/dev/null", mount_cap(flags=flags)) == Code.INVALID_ARGUMENT


def test_stage_needs_the_agents_published_record(env):
    assert code_of(env.stage, "/dev/loop99") == Code.NOT_FOUND  # not published here (the spec's "does not exist")
    assert env.runner.calls == [] and env.attachments.calls == []  # nothing touched, no login


def test_a_publish_context_for_another_lun_is_refused_before_login(env):
    env.attachments.publish(VOL, "/dev/null")
    for key, value in (("naa", "6001405" + "0" * 25), ("serial", "OTHER"), ("lun", "3"),
                       ("target_iqn", "iqn.2026-11.io.shoal:target:elsewhere")):
        ctx = dict(env.context("/dev/null"), **{key: value})
        request = csi_pb2.NodeStageVolumeRequest(volume_id=VOL, staging_target_path=env.staging,
                                                 volume_capability=mount_cap(), publish_context=ctx)
        assert code_of(env.node.NodeStageVolume, request) == Code.FAILED_PRECONDITION, key
    assert env.attachments.calls == []
    assert code_of(env.stage, "/dev/null") == Code.FAILED_PRECONDITION  # /dev/null is not a block device
    assert env.runner.calls == []


def test_concurrent_operation_on_a_volume_is_aborted(env):
    with env.servicer.busy.hold(VOL, "test"):
        assert code_of(env.stage, "/dev/loop99") == Code.ABORTED
        assert code_of(env.unpublish) == Code.ABORTED


def test_unpublish_and_unstage_of_unknown_paths_succeed(env):
    env.unpublish()
    env.unstage()
    assert env.runner.calls == []


def test_expand_needs_a_path_and_a_staged_volume(env):
    assert code_of(env.expand, os.path.join(env.dir, "nothing")) == Code.NOT_FOUND
    assert code_of(env.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id=VOL)) == \
        Code.INVALID_ARGUMENT
    env.attachments.publish(VOL, "/dev/loop99")
    assert code_of(env.expand, env.dir) == Code.FAILED_PRECONDITION  # published, not staged: no device


def test_stats_of_a_path_not_ours_is_not_found(env):
    assert code_of(env.stats, os.path.join(env.dir, "nothing")) == Code.NOT_FOUND
    os.makedirs(env.target)
    assert code_of(env.stats, env.target) == Code.NOT_FOUND  # exists, but nothing is mounted there


# -- real devices ------------------------------------------------------------------------------------------------
@needs_root
def test_mount_lifecycle_is_idempotent_and_formats_once(env):
    loop = env.attach_loop()
    env.stage(loop)
    env.stage(loop)
    assert env.attachments.calls == [("login", VOL), ("login", VOL)]  # the agent's login is idempotent
    assert len(env.runner.ran("mkfs.ext4")) == 1
    assert env.servicer.mounter.mounted_at(env.staging).fs_type == "ext4"
    env.publish(loop)
    env.publish(loop)
    with open(os.path.join(env.target, "hello.txt"), "w") as f:
        f.write("shoal")
    stats = env.stats(env.target)
    units = {u.unit: u for u in stats.usage}
    assert units[csi_pb2.VolumeUsage.BYTES].total > 0 and units[csi_pb2.VolumeUsage.INODES].total > 0
    assert not stats.volume_condition.abnormal
    env.attachments.broken = "the FUSE export of vol-0001 stopped"
    condition = env.stats(env.target).volume_condition
    assert condition.abnormal and condition.message == env.attachments.broken
    env.attachments.broken = ""
    env.unpublish()
    env.unpublish()
    assert not os.path.exists(env.target)
    env.unstage()
    env.unstage()
    assert env.servicer.mounter.mounted_at(env.staging) is None
    assert env.attachments.records[VOL].device_path == ""  # logged out; the record stays
    # staged again: the filesystem is there, so no mkfs, and the file survived
    env.stage(loop)
    assert len(env.runner.ran("mkfs.ext4")) == 1
    with open(os.path.join(env.staging, "hello.txt")) as f:
        assert f.read() == "shoal"
    env.unstage()


@needs_root
def test_a_loop_device_the_connector_did_not_make_is_refused(env):
    """A loop device shows no VPD pages: the connector (by the kernel's backing file) says whether it is the
    device it made for the volume; a reused or stale one never reaches mkfs or mount."""
    loop = env.attach_loop()
    env.attachments.foreign = f"{loop} is backed by /tmp/other.img, not by the FUSE file of {VOL}"
    assert code_of(env.stage, loop) == Code.FAILED_PRECONDITION
    assert env.runner.ran("mkfs.ext4") == [] and env.servicer.mounter.mounted_at(env.staging) is None
    env.attachments.foreign = ""
    env.stage(loop)
    env.publish(loop)
    env.attachments.foreign = f"volume {VOL} is not attached (its userspace session ended)"
    env.unpublish()
    assert code_of(env.publish, loop) == Code.FAILED_PRECONDITION
    assert not os.path.ismount(env.target)
    env.attachments.foreign = ""
    env.unstage()


@needs_root
@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_expand_grows_the_filesystem_and_repeats_are_no_ops(env, fs_type):
    if shutil.which(f"mkfs.{fs_type}") is None:
        pytest.skip(f"mkfs.{fs_type} is not installed")
    if fs_type == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        pytest.skip("online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which this process lacks")
    size = 320 << 20  # xfs's smallest filesystem is 300 MiB
    loop = env.attach_loop(size=size)
    env.stage(loop, mount_cap(fs_type=fs_type))
    env.publish(loop, mount_cap(fs_type=fs_type))
    before = os.statvfs(env.target)
    with open(env.backing, "r+b") as f:  # the volume grew on its owner
        f.truncate(2 * size)
    # not that large (yet): UNAVAILABLE, retried -- FAILED_PRECONDITION is this RPC's "in use, MUST NOT retry"
    assert code_of(env.expand, env.target, 4 * size) == Code.UNAVAILABLE
    assert env.expand(env.target, 2 * size).capacity_bytes == 2 * size
    after = os.statvfs(env.target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + size // 2
    assert env.expand(env.target, 2 * size).capacity_bytes == 2 * size  # a repeat
    assert os.statvfs(env.target).f_blocks == after.f_blocks
    env.unpublish()
    env.unstage()


@needs_root
@pytest.mark.parametrize("cap", [mount_cap(), block_cap()], ids=["mount", "block"])
def test_unstage_refuses_while_the_volume_is_still_published(env, cap):
    loop = env.attach_loop()
    env.stage(loop, cap)
    env.publish(loop, cap)
    assert code_of(env.unstage) == Code.FAILED_PRECONDITION
    assert ("logout", VOL) not in env.attachments.calls and env.attachments.records[VOL].device_path == loop
    env.unpublish()
    env.unstage()
    assert env.attachments.records[VOL].device_path == ""


@needs_root
def test_an_ext4_that_grew_while_unstaged_is_grown_at_stage(env):
    """Offline growth needs no CAP_SYS_RESOURCE (resize2fs writes the device); only a smaller filesystem is
    touched, and only before it is mounted."""
    loop = env.attach_loop()
    env.stage(loop)
    env.unstage()
    with open(env.backing, "r+b") as f:
        f.truncate(2 * SIZE)
    subprocess.run(["losetup", "--set-capacity", loop], check=True)
    env.stage(loop)
    assert [c[0] for c in env.runner.calls if c[0] in ("e2fsck", "resize2fs")] == ["e2fsck", "resize2fs"]
    st = os.statvfs(env.staging)
    assert st.f_blocks * st.f_frsize > SIZE * 3 // 2
    env.stage(loop)  # repeated: mounted already, nothing grown again
    env.unstage()
    env.stage(loop)  # staged again: the filesystem fills the device, nothing to grow
    assert len(env.runner.ran("resize2fs")) == 1
    env.unstage()


@needs_root
def test_a_formatted_device_is_never_reformatted(env):
    loop = env.attach_loop()
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
    assert code_of(env.stage, loop, mount_cap(fs_type="xfs")) == Code.FAILED_PRECONDITION
    assert env.runner.ran("mkfs.xfs") == [] and env.runner.ran("mount") == []


@needs_root
def test_mount_flags_and_readonly_publish(env):
    loop = env.attach_loop()
    env.stage(loop, mount_cap(flags=["noatime"]))
    assert "noatime" in env.servicer.mounter.mounted_at(env.staging).options
    env.publish(loop, mount_cap(flags=["noatime"]), readonly=True)  # the stage's capability, as kubelet gives it
    with pytest.raises(OSError) as info:
        open(os.path.join(env.target, "x"), "w")
    assert info.value.errno == errno.EROFS
    env.unpublish()
    env.unstage()


@needs_root
def test_publish_needs_a_staged_volume(env):
    loop = env.attach_loop()
    assert code_of(env.publish, loop) == Code.FAILED_PRECONDITION


@needs_root
def test_block_lifecycle(env):
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    env.stage(loop, block_cap())
    assert env.runner.calls == []  # block: nothing to format or mount at stage
    env.publish(loop, block_cap())
    env.publish(loop, block_cap())
    st = os.stat(env.target)
    assert st.st_rdev == os.stat(loop).st_rdev
    with open(env.target, "r+b", buffering=0) as f:
        f.seek(4096)
        f.write(b"raw block")
        os.fsync(f.fileno())
    with open(loop, "rb", buffering=0) as f:
        f.seek(4096)
        assert f.read(9) == b"raw block"
    usage = env.stats(env.target).usage
    assert usage[0].unit == csi_pb2.VolumeUsage.BYTES and usage[0].total == SIZE
    with open(env.backing, "r+b") as f:
        f.truncate(2 * SIZE)
    assert env.expand(env.target, 0, block_cap()).capacity_bytes == 2 * SIZE  # block: the device only
    assert env.stats(env.target).usage[0].total == 2 * SIZE
    env.unpublish()
    env.unpublish()
    assert not os.path.exists(env.target)
    env.unstage()
    env.unstage()


@needs_root
def test_block_readonly_publish(env):
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    env.publish(loop, block_cap(), readonly=True)
    # a read-only bind mount of a read-only loop device over the volume's (a read-only bind mount of the
    # device node itself would not stop writes: tests/unit/test_csi_node_review.py checks with a real write)
    assert "ro" in env.servicer.mounter.mounted_at(env.target).options
    with open(env.target, "rb") as f:
        assert len(f.read(512)) == 512
    env.unpublish()


# -- shoal agent --csi-endpoint ------------------------------------------------------------------------------------
def test_agent_serves_csi_node_on_its_unix_socket():
    from node_agent import cli
    from node_agent.agent.daemon import Agent

    directory = tempfile.mkdtemp(prefix="csia", dir="/tmp")
    endpoint = f"unix://{directory}/node.sock"
    args = cli.build_parser().parse_args([
        "agent", "--node-id", "n1", "--data-dir", f"{directory}/data", "--listen", "127.0.0.1:0",
        "--portal", "127.0.0.1:0", "--controller", "", "--label", "zone=b", "--csi-endpoint", endpoint])
    agent = Agent(cli._agent_settings(args), connectors={})
    agent.start()
    try:
        with grpc.insecure_channel(endpoint) as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            plugin = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
            services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
            assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE not in services
            info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.node_id == "n1" and dict(info.accessible_topology.segments) == {"zone": "b"}
            with pytest.raises(grpc.RpcError) as err:  # nothing published to this agent
                csi_pb2_grpc.NodeStub(channel).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=VOL, staging_target_path=f"{directory}/s", volume_capability=mount_cap()), timeout=10)
            assert err.value.code() == Code.NOT_FOUND
        agent.stop()
        assert not os.path.exists(f"{directory}/node.sock")  # the socket goes with the agent
    finally:
        agent.stop()
        shutil.rmtree(directory, ignore_errors=True)
    with pytest.raises(ValueError):
        cli._agent_settings(cli.build_parser().parse_args(["agent", "--node-id", "n1", "--csi-endpoint", "rel.sock"]))


# -- never format what was not read; compatible repeats only; nothing but ours removed ---------------------
def test_reads_blank_reads_both_ends_and_never_answers_blank_for_what_it_could_not_read(tmp_path):
    from node_agent.csi.mounts import BLANK_PROBE, reads_blank

    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(3 * BLANK_PROBE))
    tail = tmp_path / "tail.img"
    tail.write_bytes(bytes(3 * BLANK_PROBE - 1) + b"x")  # data only near the end (a backup superblock, say)
    assert reads_blank(str(blank)) and not reads_blank(str(tail))
    with pytest.raises(OSError):
        reads_blank(str(tmp_path))  # a directory: reading it fails, as a device with an I/O error would


class _BlkidFindsNothing:
    """blkid exiting 2 ("nothing found"), as it also does when it cannot read the device."""

    def __init__(self, runner):
        self.runner, self.real = runner, runner.run

    def __call__(self, argv, *, check=True, input=None):
        if argv[0] == "blkid":
            self.runner.calls.append([str(a) for a in argv])
            return subprocess.CompletedProcess(argv, 2, "", "")
        return self.real(argv, check=check, input=input)


@needs_root
def test_a_device_blkid_could_not_read_is_never_formatted(env, monkeypatch):
    """blkid -p exits 2 for a read error as for a blank device; formatting then (``mkfs.ext4 -F``) wiped a
    filesystem that a passing I/O error hid.  The device is read here too: data on it refuses the format
    (FAILED_PRECONDITION), a read that fails answers UNAVAILABLE (retry), and nothing is formatted."""
    from node_agent.csi import mounts

    loop = env.attach_loop()
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
    monkeypatch.setattr(env.runner, "run", _BlkidFindsNothing(env.runner))
    assert code_of(env.stage, loop) == Code.FAILED_PRECONDITION
    monkeypatch.setattr(mounts, "reads_blank", lambda device: (_ for _ in ()).throw(OSError(5, "I/O error")))
    assert code_of(env.stage, loop) == Code.UNAVAILABLE
    assert env.runner.ran("mkfs.ext4") == [] and env.runner.ran("mount") == []


@needs_root
def test_a_read_only_stage_never_formats(env):
    loop = env.attach_loop()
    assert code_of(env.stage, loop, mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY)) == Code.FAILED_PRECONDITION
    assert env.runner.ran("mkfs.ext4") == []


@needs_root
def test_a_repeated_stage_or_publish_must_ask_for_what_is_there(env):
    """CSI: a repeat answers OK only when compatible with what is staged or published; otherwise
    ALREADY_EXISTS (a read-only publish that came back writable was a write through a "read-only" mount)."""
    loop = env.attach_loop()
    env.stage(loop)
    env.stage(loop)
    assert code_of(env.stage, loop, mount_cap(fs_type="xfs")) == Code.ALREADY_EXISTS
    assert code_of(env.stage, loop, mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY)) == Code.ALREADY_EXISTS
    assert code_of(env.stage, loop, block_cap()) == Code.ALREADY_EXISTS
    env.publish(loop)
    env.publish(loop)
    with pytest.raises(grpc.RpcError) as refused:
        env.publish(loop, readonly=True)
    assert refused.value.code() == Code.ALREADY_EXISTS
    assert "ro" not in env.servicer.mounter.mounted_at(env.target).options
    env.unpublish()
    env.unstage()


@needs_root
def test_a_read_only_publish_whose_remount_fails_leaves_no_writable_mount(env, monkeypatch):
    loop = env.attach_loop()
    env.stage(loop)
    real = env.runner.run

    def failing_remount(argv, *, check=True, input=None):
        if "remount,bind,ro" in argv:
            raise CommandFailed(list(argv), 32, "mount: permission denied")
        return real(argv, check=check, input=input)
    monkeypatch.setattr(env.runner, "run", failing_remount)
    assert code_of(lambda: env.publish(loop, readonly=True)) != Code.OK
    assert env.servicer.mounter.mounted_at(env.target) is None
    monkeypatch.undo()
    env.publish(loop, readonly=True)  # the repeat publishes read-only
    assert "ro" in env.servicer.mounter.mounted_at(env.target).options
    env.unpublish()
    env.unstage()


@needs_root
def test_a_publish_from_another_volumes_staging_path_is_refused(env):
    loop = env.attach_loop()
    env.stage(loop)
    other = env.attach_loop("vol-other")
    with pytest.raises(grpc.RpcError) as refused:
        env.publish(other, volume_id="vol-other")  # this volume's staging path is VOL's
    assert refused.value.code() == Code.FAILED_PRECONDITION
    assert env.servicer.mounter.mounted_at(env.target) is None
    env.unstage()


def test_unpublish_removes_only_what_a_publish_leaves(env, tmp_path):
    """NodeUnpublishVolume unmounts and removes the mount point it made (an empty directory or an empty
    file); a file with content at ``target_path`` is not ours and stays; a relative path is refused."""
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me")
    env.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=str(victim)))
    assert victim.read_text() == "keep me"
    placeholder = tmp_path / "placeholder"
    placeholder.touch()
    env.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=str(placeholder)))
    assert not placeholder.exists()
    assert code_of(env.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=VOL, target_path="relative/path")) == Code.INVALID_ARGUMENT
