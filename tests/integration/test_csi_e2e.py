"""The CSI driver end to end, driven over its unix sockets the way kubelet and the sidecars call it.

One real ``shoal controller --csi-endpoint`` and two real ``shoal agent --csi-endpoint`` processes
(nodes A and B, userspace connector: Shoal's initiator, FUSE, a loop device; this machine has no
``iscsi_tcp``) serve the whole module.  The walks: create -> ControllerPublish(A) -> NodeStage
(login, mkfs, mount) -> NodePublish -> files -> NodeUnpublish -> NodeUnstage (logout) ->
ControllerUnpublish -> the same on B -> files intact (SHA-256), with ext4 and with xfs; raw block
the same with raw I/O on the published device file; expansion (ControllerExpand, then NodeExpand
grows the filesystem, df before/after); snapshot -> CreateVolume from it -> contents as at the
snapshot, and a clone of the volume; MULTI_NODE_MULTI_WRITER block on both nodes at once; every
RPC repeated answers the same; the spec's codes for missing fields, unknown ids and unsupported
capabilities (CSI spec v1.9, "Error Scheme" of each RPC); ListVolumes/ListSnapshots pages.

Real peers: the kernel's loop driver, FUSE, e2fsprogs, xfsprogs, mount.  Every mount is
unmounted, every loop device detached and every process stopped by PID in the fixtures'
``finally``.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import sqlite3
import shutil
import stat
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import grpc
import pytest

from node_agent.csi.mounts import parse_mountinfo
from node_agent.iscsi.chap import initiator_secret
from protos.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.conftest import require_tools
from tests.integration.conftest import closed_port
from tests.support.controller_process import shoalctl, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB, GiB = 1 << 20, 1 << 30
SIZE = 320 * MiB  # xfs's smallest filesystem is 300 MiB; volumes are thin, so this costs nothing
DRIVER = "csi.e2e.shoal.io"
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode
CAP_SYS_RESOURCE = 24


def mount_cap(fs_type="ext4", mode=Mode.SINGLE_NODE_WRITER, flags=()):
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER):
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        return bool(int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16) >> bit & 1)


def code_of(call, request) -> Code:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value.code()


def mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [m.mount_point for m in parse_mountinfo(f.read()) if m.mount_point.startswith(root + "/")]


def loops_under(root: str) -> list[str]:
    """Loop devices whose backing file is under ``root`` (an agent's FUSE file)."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().strip().startswith(root + "/"):
                    found.append(f"/dev/{name}")
    return found


def aligned(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    return buffer


def raw_write(path: str, offset: int, data: bytes) -> None:
    """O_DIRECT: straight to the LUN, no page cache of this node in between."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [aligned(data)], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, length)
        assert os.preadv(fd, [buffer], offset) == length
        return bytes(buffer)
    finally:
        os.close(fd)


def retry(call, done=lambda answer: True, timeout: float = 60.0):
    """Repeat ``call`` as a CSI sidecar does: while it is ABORTED (an operation under way) or not ``done``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = call()
            if done(answer):
                return answer
        except grpc.RpcError as exc:
            if exc.code() != Code.ABORTED:
                raise
        assert time.monotonic() < deadline, "not done in time"
        time.sleep(0.2)


def device_size(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lost+found"}


class Node:
    """One node's CSI socket and the paths kubelet would use on it."""

    def __init__(self, node_id: str, endpoint: str, root: Path):
        self.id = node_id
        self.channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.root = root

    def staging(self, volume_id: str) -> str:
        return str(self.root / "staging" / volume_id)

    def target(self, volume_id: str) -> str:
        return str(self.root / "pods" / volume_id / "mount")

    def stage(self, volume_id, cap, context):
        return self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=self.staging(volume_id), volume_capability=cap,
            publish_context=context), timeout=120)

    def publish(self, volume_id, cap, context, readonly=False):
        return self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=self.staging(volume_id), target_path=self.target(volume_id),
            volume_capability=cap, publish_context=context, readonly=readonly), timeout=60)

    def unpublish(self, volume_id):
        return self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=self.target(volume_id)), timeout=60)

    def unstage(self, volume_id):
        return self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=self.staging(volume_id)), timeout=120)

    def expand(self, volume_id, required, cap=None):
        request = csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=self.target(volume_id),
                                                  capacity_range=csi_pb2.CapacityRange(required_bytes=required))
        if cap is not None:
            request.volume_capability.CopyFrom(cap)
        return self.node.NodeExpandVolume(request, timeout=120)

    def stats(self, volume_id):
        return self.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=self.target(volume_id)), timeout=60)


class Driver:
    def __init__(self, controller_endpoint: str, nodes: dict[str, Node]):
        self.channel = grpc.insecure_channel(controller_endpoint)
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.nodes = nodes

    def create(self, name, cap, size=SIZE, **fields):
        return self.ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap], capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            **fields), timeout=120)

    def publish(self, volume_id, node_id, cap):
        return self.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap), timeout=120)

    def unpublish(self, volume_id, node_id):
        return self.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=node_id), timeout=120)

    def delete(self, volume_id):
        return self.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)

    @contextlib.contextmanager
    def used_on(self, node: Node, volume_id: str, cap, *, repeat: bool = False):
        """ControllerPublish -> NodeStage -> NodePublish; undone in reverse on exit.  ``repeat``: every
        call twice, the second answering as the first."""
        context = self.publish(volume_id, node.id, cap).publish_context
        if repeat:
            assert self.publish(volume_id, node.id, cap).publish_context == context
        try:
            assert node.stage(volume_id, cap, context) == csi_pb2.NodeStageVolumeResponse()
            if repeat:
                assert node.stage(volume_id, cap, context) == csi_pb2.NodeStageVolumeResponse()
            try:
                node.publish(volume_id, cap, context)
                if repeat:
                    node.publish(volume_id, cap, context)
                try:
                    yield node.target(volume_id)
                finally:
                    node.unpublish(volume_id)
                    if repeat:
                        node.unpublish(volume_id)
            finally:
                node.unstage(volume_id)
                if repeat:
                    node.unstage(volume_id)
        finally:
            self.unpublish(volume_id, node.id)
            if repeat:
                self.unpublish(volume_id, node.id)


@pytest.fixture(scope="module")
def driver():
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse and /dev/loop-control")
    require_tools("losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs", "resize2fs", "blkid", "mount", "umount")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"mfusepy/libfuse3 unavailable: {exc}")
    root = tempfile.mkdtemp(prefix="csie", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    daemons = []
    try:
        controller = start_controller(Path(root) / "ctl", extra_args=[
            "--csi-endpoint", f"unix://{root}/controller.sock", f"--csi-driver-name={DRIVER}"])
        daemons.append(controller)
        nodes, agents = {}, {}
        for node_id, zone in (("node-a", "a"), ("node-b", "b")):
            # fixed ports: an agent restarted by a test comes back where its consumers expect it
            agents[node_id] = partial(
                start_agent, Path(root) / node_id, node_id, controller.address,
                listen=f"127.0.0.1:{closed_port()}", portal=f"127.0.0.1:{closed_port()}",
                extra_args=["--csi-endpoint", f"unix://{root}/{node_id}.sock", f"--csi-driver-name={DRIVER}",
                            "--label", f"zone={zone}",
                            # the userspace connector, also on a host with iscsi_tcp (this one has none)
                            "--label", "shoal.io/connector=userspace"])
            daemons.append(agents[node_id]())
            nodes[node_id] = Node(node_id, f"unix://{root}/{node_id}.sock", Path(root) / node_id / "kubelet")
        deadline = time.monotonic() + 20
        while True:
            listed = json.loads(shoalctl(controller.address, "node", "list", "-o", "json").stdout or "{}")
            if sum(n["health"] == "healthy" for n in listed.get("nodes", [])) == 2:
                break
            assert time.monotonic() < deadline, "the two agents did not register"
            time.sleep(0.2)
        csi = Driver(f"unix://{root}/controller.sock", nodes)
        csi.root, csi.daemons, csi.start_agent = root, daemons, agents
        yield csi
        for channel in [csi.channel] + [n.channel for n in csi.nodes.values()]:
            channel.close()
    finally:
        for path in reversed(mounts_under(root)):  # what a failed test left mounted
            subprocess.run(["umount", path], capture_output=True, timeout=60)
        for daemon in reversed(daemons):  # agents first: they log out their userspace devices
            daemon.stop()
        for loop in loops_under(root):
            subprocess.run(["losetup", "--detach", loop], capture_output=True, timeout=60)
        for path in reversed(mounts_under(root)):  # a FUSE export of a killed agent
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def node_loops(csi: Driver, node_id: str) -> list[str]:
    return loops_under(os.path.join(csi.root, node_id))


# ---- identity ----------------------------------------------------------------------------------------------

def test_identity_and_capabilities_on_every_socket(driver):
    for identity in [driver.identity] + [n.identity for n in driver.nodes.values()]:
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        assert info.name == DRIVER and info.vendor_version  # --csi-driver-name reached every process
        assert identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    NodeRPC = csi_pb2.NodeServiceCapability.RPC
    for node in driver.nodes.values():
        caps = {c.rpc.type for c in node.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
        assert {NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.EXPAND_VOLUME, NodeRPC.GET_VOLUME_STATS,
                NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER} <= caps
        assert node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == node.id


# ---- mount: ext4 and xfs, from node A to node B, with expansion --------------------------------------------

@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_a_filesystem_moves_between_nodes_and_grows(driver, fs_type, tmp_path):
    a, b = driver.nodes["node-a"], driver.nodes["node-b"]
    cap = mount_cap(fs_type, flags=["noatime"])
    volume = driver.create(f"pvc-{fs_type}", cap).volume
    assert driver.create(f"pvc-{fs_type}", cap).volume == volume  # CreateVolume repeated: the same answer
    vid = volume.volume_id
    files = {f"dir/file-{i}.bin": os.urandom(200_000 + i) for i in range(4)}

    context = driver.publish(vid, "node-a", cap).publish_context
    # The running controller holds the file (one store per file): read it, read-only, beside it.
    db_path = os.path.join(driver.root, "ctl", "controller.db")
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        [(secret,)] = db.execute("SELECT secret FROM chap_secrets WHERE volume = ?", (f"pvc-{fs_type}",)).fetchall()
        [(node_a_iqn,)] = db.execute("SELECT initiator_iqn FROM nodes WHERE id = 'node-a'").fetchall()
    assert {"target_iqn", "portals", "lun", "naa", "serial"} <= set(context)
    assert "device_path" not in context and not any("secret" in k for k in context)
    assert context["mode"] == "userspace"  # as the node announced (shoal.io/connector)
    assert node_loops(driver, "node-a") == []  # ControllerPublish authorizes only: no login, no device yet
    driver.unpublish(vid, "node-a")

    with driver.used_on(a, vid, cap, repeat=True) as target:
        assert len(node_loops(driver, "node-a")) == 1  # NodeStage logged in
        agent_data = Path(driver.root) / "node-a" / "data"  # the CHAP secret the agent keeps for its logins
        own = initiator_secret(secret, node_a_iqn)  # node-a's own secret for the volume (chap.py)
        assert secret not in (agent_data / "attachments.json").read_text()
        assert own not in (agent_data / "attachments.json").read_text()
        assert own in (agent_data / "attachment-secrets.json").read_text()
        assert secret not in (agent_data / "attachment-secrets.json").read_text()  # never the volume's
        assert stat.S_IMODE((agent_data / "attachment-secrets.json").stat().st_mode) == 0o600
        mounted = {m.mount_point: m for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())}
        staged = mounted[a.staging(vid)]
        assert staged.fs_type == fs_type and "noatime" in staged.options
        for name, data in files.items():
            (Path(target) / name).parent.mkdir(exist_ok=True)
            (Path(target) / name).write_bytes(data)
        stats = a.stats(vid)
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        total_before = stats.usage[0].total

        # Expansion: the controller grows the volume on its owner, then the node grows its view and the filesystem.
        grown = driver.ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE), volume_capability=cap))
        assert grown.capacity_bytes == 2 * SIZE and grown.node_expansion_required
        online = fs_type == "xfs" or has_capability(CAP_SYS_RESOURCE)
        if online:
            assert a.expand(vid, 2 * SIZE).capacity_bytes == 2 * SIZE
            assert a.expand(vid, 2 * SIZE).capacity_bytes == 2 * SIZE  # repeated: the same answer
            total_after = a.stats(vid).usage[0].total
            assert total_after > total_before + SIZE * 9 // 10, (total_before, total_after)
        else:
            # Online ext4 growth is the kernel's EXT4_IOC_RESIZE_FS, refused without CAP_SYS_RESOURCE (as here):
            # the driver says so, the device itself did grow, and the next NodeStage grows the filesystem.
            assert code_of(a.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid, volume_path=target, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE))) \
                == Code.FAILED_PRECONDITION
            [loop] = node_loops(driver, "node-a")
            assert device_size(loop) == 2 * SIZE
        expected = tree_digest(Path(target))
    assert node_loops(driver, "node-a") == [] and mounts_under(str(a.root)) == []  # unstaged: logged out

    with driver.used_on(b, vid, cap) as target:
        assert tree_digest(Path(target)) == expected  # the files, intact, on the other node
        assert b.stats(vid).usage[0].total > total_before + SIZE * 9 // 10  # grown (ext4 here: at NodeStage)
        assert b.expand(vid, 2 * SIZE).capacity_bytes == 2 * SIZE  # kubelet's NodeExpand after it: nothing left
    assert not any(secret in daemon.log() or own in daemon.log() for daemon in driver.daemons)  # never logged
    driver.delete(vid)
    driver.delete(vid)  # repeated: OK
    assert code_of(driver.ctl.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id=vid)) \
        == Code.NOT_FOUND


# ---- raw block -------------------------------------------------------------------------------------------------

def test_a_block_volume_moves_between_nodes_and_grows(driver):
    a, b = driver.nodes["node-a"], driver.nodes["node-b"]
    cap = block_cap()
    vid = driver.create("pvc-block", cap, 64 * MiB).volume.volume_id
    pattern = os.urandom(1 * MiB)
    with driver.used_on(a, vid, cap, repeat=True) as device:
        assert stat.S_ISBLK(os.stat(device).st_mode)  # the device file, bind-mounted at the target
        raw_write(device, 8 * MiB, pattern)
        assert device_size(device) == 64 * MiB
        expand = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB), volume_capability=cap)
        grown = driver.ctl.ControllerExpandVolume(expand)
        # Required for a block volume too: until the CO's NodeExpandVolume rescans it, the node's device keeps
        # its old size (and the CO makes that call only when told to).
        assert grown.capacity_bytes == 128 * MiB and grown.node_expansion_required
        assert driver.ctl.ControllerExpandVolume(expand) == grown  # repeated: the same answer
        assert device_size(device) == 64 * MiB
        assert a.expand(vid, 128 * MiB, cap).capacity_bytes == 128 * MiB  # a rescan, nothing more
        assert device_size(device) == 128 * MiB
        raw_write(device, 100 * MiB, pattern)  # the new space is usable
        stats = a.stats(vid)
        assert stats.usage[0].total == 128 * MiB and not stats.volume_condition.abnormal
    with driver.used_on(b, vid, cap) as device:
        assert device_size(device) == 128 * MiB
        assert raw_read(device, 8 * MiB, len(pattern)) == pattern
        assert raw_read(device, 100 * MiB, len(pattern)) == pattern
    driver.delete(vid)


def test_multi_node_multi_writer_block_on_two_nodes_at_once(driver):
    a, b = driver.nodes["node-a"], driver.nodes["node-b"]
    rwx = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
    vid = driver.create("pvc-rwx", rwx, 64 * MiB).volume.volume_id
    with driver.used_on(a, vid, rwx) as on_a, driver.used_on(b, vid, rwx) as on_b:
        got = driver.ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
        assert sorted(got.status.published_node_ids) == ["node-a", "node-b"]
        assert not got.status.volume_condition.abnormal
        [entry] = [e for e in driver.ctl.ListVolumes(csi_pb2.ListVolumesRequest()).entries
                   if e.volume.volume_id == vid]
        assert sorted(entry.status.published_node_ids) == ["node-a", "node-b"]
        raw_write(on_a, 0, b"A" * 4096)
        assert raw_read(on_b, 0, 4096) == b"A" * 4096  # what A wrote, B reads (no cache between)
        raw_write(on_b, 4096, b"B" * 4096)
        assert raw_read(on_a, 4096, 4096) == b"B" * 4096
    assert code_of(driver.ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="pvc-rwx-fs", volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)])) \
        == Code.INVALID_ARGUMENT  # a filesystem is never mounted on two nodes
    driver.delete(vid)


# ---- snapshots and clones ----------------------------------------------------------------------------------------

def test_snapshot_restore_and_clone(driver):
    a, b = driver.nodes["node-a"], driver.nodes["node-b"]
    cap = block_cap()
    source = driver.create("pvc-origin", cap, 64 * MiB).volume
    before, after = os.urandom(64 * 1024), os.urandom(64 * 1024)
    with driver.used_on(a, source.volume_id, cap) as device:
        raw_write(device, 0, before)
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=source.volume_id, name="snapshot-1")
    # Without reflinks (this /tmp) the snapshot is copied in the background: ready_to_use turns true, and the
    # CO (external-snapshotter) repeats CreateSnapshot until it does.
    snapshot = retry(lambda: driver.ctl.CreateSnapshot(request, timeout=60).snapshot, lambda s: s.ready_to_use)
    assert snapshot.source_volume_id == source.volume_id and snapshot.size_bytes == 64 * MiB
    assert driver.ctl.CreateSnapshot(request, timeout=60).snapshot == snapshot  # repeated: the same answer
    with driver.used_on(a, source.volume_id, cap) as device:
        raw_write(device, 0, after)  # the source moves on after the snapshot

    content = csi_pb2.VolumeContentSource
    # A clone still being copied is ABORTED: the provisioner repeats CreateVolume with the same name.
    restored = retry(lambda: driver.create("pvc-restored", cap, 64 * MiB, volume_content_source=content(
        snapshot=content.SnapshotSource(snapshot_id=snapshot.snapshot_id))).volume)
    cloned = retry(lambda: driver.create("pvc-clone", cap, 64 * MiB, volume_content_source=content(
        volume=content.VolumeSource(volume_id=source.volume_id))).volume)
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert cloned.content_source.volume.volume_id == source.volume_id
    with driver.used_on(b, restored.volume_id, cap) as device:
        assert raw_read(device, 0, len(before)) == before  # as at the snapshot
    with driver.used_on(b, cloned.volume_id, cap) as device:
        assert raw_read(device, 0, len(after)) == after  # as the volume was when cloned

    assert code_of(driver.ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id)) \
        == Code.FAILED_PRECONDITION  # it has a snapshot
    for vid in (restored.volume_id, cloned.volume_id):
        driver.delete(vid)
    driver.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    driver.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))  # repeated: OK
    driver.delete(source.volume_id)


# ---- pagination ----------------------------------------------------------------------------------------------------

def test_list_volumes_and_snapshots_page_by_page(driver):
    cap = block_cap()
    ids = sorted(driver.create(f"pvc-page-{i}", cap, 8 * MiB).volume.volume_id for i in range(3))
    snaps = [driver.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=ids[0], name=f"snap-{i}"))
             .snapshot.snapshot_id for i in range(3)]

    def pages(call, request_type, **filters):
        seen, token, count = [], "", 0
        while True:
            answer = call(request_type(max_entries=2, starting_token=token, **filters), timeout=30)
            assert len(answer.entries) <= 2
            seen += answer.entries
            count += 1
            token = answer.next_token
            if not token:
                return seen, count

    everything = [e.volume.volume_id for e in driver.ctl.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    volumes, count = pages(driver.ctl.ListVolumes, csi_pb2.ListVolumesRequest)
    assert [e.volume.volume_id for e in volumes] == everything and count == -(-len(everything) // 2)
    assert set(ids) <= set(everything)  # (what another test left behind does not change the paging)
    snapshots, count = pages(driver.ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest, source_volume_id=ids[0])
    assert sorted(e.snapshot.snapshot_id for e in snapshots) == sorted(snaps) and count == 2
    assert code_of(driver.ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="not-a-token")) \
        == Code.ABORTED
    for snapshot_id in snaps:
        driver.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    for vid in ids:
        driver.delete(vid)


# ---- the spec's codes ------------------------------------------------------------------------------------------------

def test_missing_fields_unknown_ids_and_wrong_capabilities_get_the_specs_codes(driver):
    a = driver.nodes["node-a"]
    P = csi_pb2
    cap = mount_cap()
    existing = driver.create("pvc-codes", cap, 8 * MiB).volume.volume_id
    driver.publish(existing, "node-b", cap)  # single-node: published on B
    unknown = "00000000-0000-4000-8000-00000000dead"
    ctl, node = driver.ctl, a.node
    table = [
        # CreateVolume
        (ctl.CreateVolume, P.CreateVolumeRequest(volume_capabilities=[cap]), Code.INVALID_ARGUMENT),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x"), Code.INVALID_ARGUMENT),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x", volume_capabilities=[mount_cap("btrfs")]),
         Code.INVALID_ARGUMENT),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x", volume_capabilities=[
            mount_cap(mode=Mode.MULTI_NODE_READER_ONLY)]), Code.INVALID_ARGUMENT),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x", volume_capabilities=[
            block_cap(Mode.MULTI_NODE_SINGLE_WRITER)]), Code.INVALID_ARGUMENT),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-codes", volume_capabilities=[cap],
                                                 capacity_range=P.CapacityRange(required_bytes=16 * MiB)),
         Code.ALREADY_EXISTS),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x", volume_capabilities=[cap],
                                                 capacity_range=P.CapacityRange(limit_bytes=100)),
         Code.OUT_OF_RANGE),
        (ctl.CreateVolume, P.CreateVolumeRequest(name="pvc-x", volume_capabilities=[cap], volume_content_source=
                                                 P.VolumeContentSource(snapshot=P.VolumeContentSource.SnapshotSource(
                                                     snapshot_id=unknown))), Code.NOT_FOUND),
        # DeleteVolume, publish, unpublish
        (ctl.DeleteVolume, P.DeleteVolumeRequest(), Code.INVALID_ARGUMENT),
        (ctl.DeleteVolume, P.DeleteVolumeRequest(volume_id=existing), Code.FAILED_PRECONDITION),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(node_id="node-a", volume_capability=cap),
         Code.INVALID_ARGUMENT),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(volume_id=existing, volume_capability=cap),
         Code.INVALID_ARGUMENT),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(volume_id=existing, node_id="node-a"),
         Code.INVALID_ARGUMENT),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(volume_id=unknown, node_id="node-a",
                                                                       volume_capability=cap), Code.NOT_FOUND),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(volume_id=existing, node_id="node-z",
                                                                       volume_capability=cap), Code.NOT_FOUND),
        (ctl.ControllerPublishVolume, P.ControllerPublishVolumeRequest(volume_id=existing, node_id="node-a",
                                                                       volume_capability=cap),
         Code.FAILED_PRECONDITION),  # single-node, already on B
        (ctl.ControllerUnpublishVolume, P.ControllerUnpublishVolumeRequest(), Code.INVALID_ARGUMENT),
        # validate, get, expand
        (ctl.ValidateVolumeCapabilities, P.ValidateVolumeCapabilitiesRequest(volume_capabilities=[cap]),
         Code.INVALID_ARGUMENT),
        (ctl.ValidateVolumeCapabilities, P.ValidateVolumeCapabilitiesRequest(volume_id=existing),
         Code.INVALID_ARGUMENT),
        (ctl.ValidateVolumeCapabilities,
         P.ValidateVolumeCapabilitiesRequest(volume_id=unknown, volume_capabilities=[cap]), Code.NOT_FOUND),
        (ctl.ControllerGetVolume, P.ControllerGetVolumeRequest(volume_id=unknown), Code.NOT_FOUND),
        (ctl.ControllerExpandVolume, P.ControllerExpandVolumeRequest(volume_id=existing), Code.INVALID_ARGUMENT),
        (ctl.ControllerExpandVolume, P.ControllerExpandVolumeRequest(
            volume_id=unknown, capacity_range=P.CapacityRange(required_bytes=GiB)), Code.NOT_FOUND),
        (ctl.ControllerExpandVolume, P.ControllerExpandVolumeRequest(
            volume_id=existing, capacity_range=P.CapacityRange(limit_bytes=4 * MiB)), Code.OUT_OF_RANGE),
        # snapshots
        (ctl.CreateSnapshot, P.CreateSnapshotRequest(source_volume_id=existing), Code.INVALID_ARGUMENT),
        (ctl.CreateSnapshot, P.CreateSnapshotRequest(name="snap-x"), Code.INVALID_ARGUMENT),
        (ctl.CreateSnapshot, P.CreateSnapshotRequest(name="snap-x", source_volume_id=unknown), Code.NOT_FOUND),
        (ctl.DeleteSnapshot, P.DeleteSnapshotRequest(), Code.INVALID_ARGUMENT),
        # node
        (node.NodeStageVolume, P.NodeStageVolumeRequest(staging_target_path=a.staging("x"), volume_capability=cap),
         Code.INVALID_ARGUMENT),
        (node.NodeStageVolume, P.NodeStageVolumeRequest(volume_id=unknown, volume_capability=cap),
         Code.INVALID_ARGUMENT),
        (node.NodeStageVolume, P.NodeStageVolumeRequest(volume_id=unknown, staging_target_path=a.staging("x")),
         Code.INVALID_ARGUMENT),
        (node.NodeStageVolume, P.NodeStageVolumeRequest(volume_id=unknown, staging_target_path=a.staging("x"),
                                                        volume_capability=cap), Code.NOT_FOUND),
        (node.NodeStageVolume, P.NodeStageVolumeRequest(volume_id=existing, staging_target_path=a.staging("x"),
                                                        volume_capability=mount_cap("btrfs")),
         Code.FAILED_PRECONDITION),  # the spec's "exceeds capabilities"
        (node.NodeStageVolume, P.NodeStageVolumeRequest(
            volume_id=existing, staging_target_path=a.staging("x"),
            volume_capability=P.VolumeCapability(block=P.VolumeCapability.BlockVolume())), Code.INVALID_ARGUMENT),
        (node.NodeStageVolume, P.NodeStageVolumeRequest(volume_id=existing, staging_target_path=a.staging("x"),
                                                        volume_capability=cap), Code.NOT_FOUND),  # published on B
        (node.NodePublishVolume, P.NodePublishVolumeRequest(volume_id=existing, staging_target_path=a.staging("x"),
                                                            volume_capability=cap), Code.INVALID_ARGUMENT),
        (node.NodePublishVolume, P.NodePublishVolumeRequest(
            volume_id=existing, staging_target_path=a.staging("x"), target_path=a.target("x"),
            volume_capability=mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)), Code.FAILED_PRECONDITION),
        (node.NodeUnstageVolume, P.NodeUnstageVolumeRequest(volume_id=existing), Code.INVALID_ARGUMENT),
        (node.NodeUnpublishVolume, P.NodeUnpublishVolumeRequest(target_path=a.target("x")), Code.INVALID_ARGUMENT),
        (node.NodeGetVolumeStats, P.NodeGetVolumeStatsRequest(volume_id=existing, volume_path=a.target("x")),
         Code.NOT_FOUND),
        (node.NodeExpandVolume, P.NodeExpandVolumeRequest(volume_id=existing), Code.INVALID_ARGUMENT),
        (node.NodeExpandVolume, P.NodeExpandVolumeRequest(volume_id=unknown, volume_path=a.target("x")),
         Code.NOT_FOUND),
    ]
    wrong = [(i, call._method, expected, got) for i, (call, request, expected) in enumerate(table)
             if (got := code_of(call, request)) != expected]
    assert wrong == []

    # Unsupported capabilities are not an error for ValidateVolumeCapabilities: an empty "confirmed".
    answer = ctl.ValidateVolumeCapabilities(P.ValidateVolumeCapabilitiesRequest(
        volume_id=existing, volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]))
    assert not answer.HasField("confirmed") and answer.message
    assert ctl.ValidateVolumeCapabilities(P.ValidateVolumeCapabilitiesRequest(
        volume_id=existing, volume_capabilities=[cap])).confirmed.volume_capabilities == [cap]
    # Unknown ids where the spec asks for idempotent success.
    ctl.DeleteVolume(P.DeleteVolumeRequest(volume_id=unknown))
    ctl.DeleteSnapshot(P.DeleteSnapshotRequest(snapshot_id=unknown))
    ctl.ControllerUnpublishVolume(P.ControllerUnpublishVolumeRequest(volume_id=unknown, node_id="node-a"))
    node.NodeUnstageVolume(P.NodeUnstageVolumeRequest(volume_id=unknown, staging_target_path=a.staging("x")))
    node.NodeUnpublishVolume(P.NodeUnpublishVolumeRequest(volume_id=unknown, target_path=a.target("x")))
    driver.unpublish(existing, "node-b")
    driver.delete(existing)



# ---- volume condition ---------------------------------------------------------------------------------------------

def test_the_volume_condition_follows_the_session(driver):
    """VOLUME_CONDITION: B uses a volume stored on A; A's agent stops (its portal closes the session):
    B reports the volume abnormal; A comes back at the same portal, B's session is reinstated, the volume
    is healthy again and its data intact."""
    b = driver.nodes["node-b"]
    cap = block_cap()
    zone_a = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={"zone": "a"})])
    volume = driver.create("pvc-condition", cap, 8 * MiB, accessibility_requirements=zone_a).volume
    assert [dict(t.segments) for t in volume.accessible_topology] == [{"zone": "a"}]
    data = os.urandom(64 * 1024)
    with driver.used_on(b, volume.volume_id, cap) as device:
        raw_write(device, 0, data)
        assert not b.stats(volume.volume_id).volume_condition.abnormal
        index = next(i for i, d in enumerate(driver.daemons) if d.extra.get("node_id") == "node-a")
        driver.daemons[index].stop()
        condition = retry(lambda: b.stats(volume.volume_id).volume_condition, lambda c: c.abnormal, 20)
        assert "session" in condition.message, condition.message
        driver.daemons[index] = driver.start_agent["node-a"]()
        driver.nodes["node-a"] = Node("node-a", f"unix://{driver.root}/node-a.sock",
                                      Path(driver.root) / "node-a" / "kubelet")
        retry(lambda: b.stats(volume.volume_id).volume_condition, lambda c: not c.abnormal, 40)
        assert raw_read(device, 0, len(data)) == data
    driver.delete(volume.volume_id)
