"""CSI Node service (``shoal agent``), driven through a real gRPC server on a unix socket.

The "attached device" is a loop device over a temp file, recorded as the agent's attachment of the
volume (``FakeAttachments``), so stage/publish run real mkfs, mount and bind mounts (root needed for
those tests; they are skipped otherwise).  Checked: required fields and codes, the device check,
mkfs only on a blank device, idempotency of every RPC, block publish giving a usable device file,
read-only publish, stats, ABORTED for a concurrent operation on the same volume.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import grpc
import pytest

from controller.csi.controller import CsiSettings
from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter, parse_mountinfo
from node_agent.csi.node import DEFAULT_TOPOLOGY_KEYS, NodeServicer
from node_agent.csi.server import build_csi_node_server
from node_agent.host.runner import SubprocessRunner
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


def mount_cap(mode=Mode.SINGLE_NODE_WRITER, fs_type="ext4", flags=()):
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER):
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


@dataclass(frozen=True)
class Export:
    naa: str
    serial: str


@dataclass(frozen=True)
class Record:
    volume_id: str
    device_path: str
    export: Export


@dataclass
class FakeAttachments:
    records: list = field(default_factory=list)

    def list(self):
        return list(self.records)


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

    def attach_loop(self, volume_id=VOL) -> str:
        backing = os.path.join(self.dir, f"{volume_id}.img")
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        loop = subprocess.run(["losetup", "-f", "--show", backing], check=True, capture_output=True,
                              text=True).stdout.strip()
        self.loops.append(loop)
        self.attachments.records.append(Record(volume_id, loop, Export(NAA, SERIAL)))
        return loop

    def context(self, device: str) -> dict:
        return {"device_path": device, "naa": NAA, "serial": SERIAL, "mode": "userspace"}

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
    assert {RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS} <= caps
    assert RPC.EXPAND_VOLUME not in caps and RPC.VOLUME_CONDITION not in caps
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


def test_unsupported_capability_is_invalid(env):
    assert code_of(env.stage, "/dev/null", mount_cap(fs_type="btrfs")) == Code.INVALID_ARGUMENT
    assert code_of(env.stage, "/dev/null", mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)) == Code.INVALID_ARGUMENT
    for flags in (["bind"], ["noatime,remount"], [""]):
        assert code_of(env.stage, "/dev/null", mount_cap(flags=flags)) == Code.INVALID_ARGUMENT


def test_stage_needs_the_agents_attachment(env):
    assert code_of(env.stage, "/dev/loop99") == Code.FAILED_PRECONDITION  # not attached here
    env.attachments.records.append(Record(VOL, "/dev/loop98", Export(NAA, SERIAL)))
    assert code_of(env.stage, "/dev/loop99") == Code.FAILED_PRECONDITION  # another device than the agent's
    assert env.runner.calls == []  # nothing touched


def test_identity_mismatch_is_refused(env):
    env.attachments.records.append(Record(VOL, "/dev/null", Export(NAA, SERIAL)))
    ctx = {"device_path": "/dev/null", "naa": "6001405" + "0" * 25, "serial": SERIAL}
    request = csi_pb2.NodeStageVolumeRequest(volume_id=VOL, staging_target_path=env.staging,
                                             volume_capability=mount_cap(), publish_context=ctx)
    assert code_of(env.node.NodeStageVolume, request) == Code.FAILED_PRECONDITION
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
    assert len(env.runner.ran("mkfs.ext4")) == 1
    assert env.servicer.mounter.mounted_at(env.staging).fs_type == "ext4"
    env.publish(loop)
    env.publish(loop)
    with open(os.path.join(env.target, "hello.txt"), "w") as f:
        f.write("shoal")
    stats = env.stats(env.target)
    units = {u.unit: u for u in stats.usage}
    assert units[csi_pb2.VolumeUsage.BYTES].total > 0 and units[csi_pb2.VolumeUsage.INODES].total > 0
    env.unpublish()
    env.unpublish()
    assert not os.path.exists(env.target)
    env.unstage()
    env.unstage()
    assert env.servicer.mounter.mounted_at(env.staging) is None
    # staged again: the filesystem is there, so no mkfs, and the file survived
    env.stage(loop)
    assert len(env.runner.ran("mkfs.ext4")) == 1
    with open(os.path.join(env.staging, "hello.txt")) as f:
        assert f.read() == "shoal"
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
    env.publish(loop, readonly=True)
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
    # as other CSI drivers do: a read-only bind mount of the device file (the kernel does not stop writes
    # through a device node on a read-only mount; see node_agent/csi/node.py)
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
            with pytest.raises(grpc.RpcError) as err:  # nothing attached by this agent
                csi_pb2_grpc.NodeStub(channel).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=VOL, staging_target_path=f"{directory}/s", volume_capability=mount_cap()), timeout=10)
            assert err.value.code() == Code.FAILED_PRECONDITION
        agent.stop()
        assert not os.path.exists(f"{directory}/node.sock")  # the socket goes with the agent
    finally:
        agent.stop()
        shutil.rmtree(directory, ignore_errors=True)
    with pytest.raises(ValueError):
        cli._agent_settings(cli.build_parser().parse_args(["agent", "--node-id", "n1", "--csi-endpoint", "rel.sock"]))
