"""Volume lifecycle on the node agent: the findings of the volumes review, one regression test or more each.

Volumes and snapshots live on temporary directories, except where running out of space must be real: there
a small ext4 is made with ``mkfs.ext4`` and mounted through a loop device (root needed, skipped otherwise).
A stop in the middle of a step is an exception (``Stop``, which no code catches as an error) raised by the
module's own file helper after the write it stands for, as a kill -9 would leave the files.  The RPC tests
go over real gRPC (``test_agent_servicer``'s agent), the export test through a real portal and Shoal's
initiator (``test_agent_exports``'s node).  Each docstring names the finding and the rule it checks.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import grpc
import pytest

from controller.domain.agents import FakeAgentClient, FakeAgents
from controller.domain.errors import NotFound as DomainNotFound
from node_agent.agent import snapshots as snapshots_module
from node_agent.agent import volumes as volumes_module
from node_agent.agent.copies import COPYING, READY
from node_agent.agent.errors import AlreadyExists, NotFound, ResourceExhausted
from node_agent.agent.settings import DiskSpec
from node_agent.agent.snapshots import SnapshotManager
from node_agent.agent.volumes import VolumeManager
from node_agent.scsi.ptpl import PtplStore
from node_agent.scsi.sidecar import SANITIZE_SUFFIX, SanitizeMark
from protos.shoal.v1 import agent_pb2 as pb
from test_agent_exports import CHAP, X, Node
from test_agent_servicer import agent  # noqa: F401
from test_agent_snapshots import Gate, fake_reflink

MiB = 1 << 20


class Stop(BaseException):
    """The agent killed at this point (not an error any code handles)."""


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def fill(path: str, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@pytest.fixture
def small_ext4(tmp_path):
    """A mounted 64 MiB ext4 (an image file on a loop device): a filesystem that really runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted ext4 needs root")
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing or not os.path.exists("/dev/loop-control"):
        pytest.skip(f"loop devices unavailable (no /dev/loop-control, or missing {', '.join(missing) or '-'})")
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"loop devices unavailable: mount -o loop failed: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)  # the loop device goes with it


# -- 1: a thick expand that runs out of space changes nothing ---------------------------------------------------

def test_thick_expand_beyond_the_free_space_is_refused_before_allocating(small_ext4):
    """A thick expand is refused (RESOURCE_EXHAUSTED) when the disk's free space cannot hold the new part,
    as a thick create is, before anything is allocated: the volume and the disk's free space unchanged
    (posix_fallocate used to grow the file until ext4 was full, and leave it so)."""
    volumes = VolumeManager([DiskSpec("data0", str(small_ext4 / "d0"))])
    before = volumes.create("vol-1", 8 * MiB, "data0", thin=False)
    free = volumes.disks()[0].free
    with pytest.raises(ResourceExhausted, match="disk data0 has .* bytes free"):
        volumes.expand("vol-1", 200 * MiB)
    after = volumes.get("vol-1")
    assert (after.size, after.allocated) == (before.size, before.allocated)
    assert volumes.disks()[0].free == free


def test_thick_expand_that_runs_out_of_space_meanwhile_gives_back_what_it_allocated(small_ext4):
    """The free space is enough when looked at, and taken by another writer before the allocation (here, right
    after ``statvfs``): posix_fallocate fails ENOSPC part of the way; the expand is RESOURCE_EXHAUSTED and
    changes nothing (the file truncated back to its size, the blocks it got released; ext4 may keep the one
    block its extent tree grew by)."""
    filler = small_ext4 / "other-writer"

    def free_bytes():
        st = os.statvfs(small_ext4)
        return st.f_bavail * st.f_frsize

    def statvfs_then_space_taken(path):
        st = os.statvfs(path)
        if armed:
            fd = os.open(filler, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 16 * MiB)
            finally:
                os.close(fd)
        return st

    armed = False
    volumes = VolumeManager([DiskSpec("data0", str(small_ext4 / "d0"))], statvfs=statvfs_then_space_taken)
    before = volumes.create("vol-1", 8 * MiB, "data0", thin=False)
    free = free_bytes()
    armed = True
    with pytest.raises(ResourceExhausted, match="no room to grow volume vol-1"):
        volumes.expand("vol-1", 40 * MiB)
    after = volumes.get("vol-1")
    assert after.size == before.size
    assert after.allocated - before.allocated <= 64 << 10
    os.unlink(filler)
    assert free_bytes() >= free - (64 << 10)


# -- 2: a delete stopped half-way; a new volume of the same id ---------------------------------------------------

def test_a_delete_stopped_after_its_first_unlink_is_finished_by_its_repeat(tmp_path, monkeypatch):
    """A stop inside DeleteVolume after its first unlink: after the restart the volume is still there (the
    image goes last) and the repeat removes every file (it used to find no image, answer False and leave the
    reservations, sanitize mark and record behind)."""
    spec = DiskSpec("data0", str(tmp_path / "d0"))
    info = VolumeManager([spec]).create("vol-1", MiB, "data0")
    for suffix in (".pr", SANITIZE_SUFFIX):
        with open(info.path + suffix, "w") as fh:
            fh.write("{}")
    unlink = volumes_module._unlink

    def unlink_then_stop(path):
        unlink(path)
        raise Stop()

    monkeypatch.setattr(volumes_module, "_unlink", unlink_then_stop)
    with pytest.raises(Stop):
        VolumeManager([spec]).delete("vol-1")
    monkeypatch.undo()
    restarted = VolumeManager([spec])
    assert restarted.get("vol-1") is not None
    assert restarted.delete("vol-1") is True
    assert os.listdir(tmp_path / "d0" / "volumes") == []


@pytest.mark.parametrize("source", ["", "vol-src"])
def test_a_new_volume_never_inherits_the_sidecars_of_an_old_one_of_its_id(tmp_path, source):
    """Reservations (``.pr``) and a failed-sanitize mark an older agent's interrupted delete left beside a gone
    image are removed by the create (a plain one, or a clone) before its image is in place: its LUN would
    have loaded the old registrations, and its snapshots and clones been refused as half-erased."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("vol-src", MiB, "data0")
    image = os.path.join(tmp_path, "d0", "volumes", "vol-1.img")
    with open(image + ".pr", "w") as fh:
        fh.write('{"registrations": [{"key": 1234, "initiator": "iqn.2026-11.io.shoal.test:old"}]}')
    with open(image + SANITIZE_SUFFIX, "w") as fh:
        fh.write('{"kind": "overwrite", "by": "iqn.2026-11.io.shoal.test:old", "ause": false, "started": "x"}')
    info = volumes.create("vol-1", MiB, "data0", source=source)
    assert info.path == image
    assert PtplStore(image + ".pr").load() is None
    assert not SanitizeMark(image + SANITIZE_SUFFIX).present()
    assert SnapshotManager(volumes).create("snap-1", "vol-1").state == READY


# -- 3: a configured capacity counts snapshots and copies under way ----------------------------------------------

def test_configured_capacity_counts_the_snapshots_on_the_disk(tmp_path):
    """A snapshot copied in full takes the disk's space as a volume does: the free space of a disk with a
    configured capacity drops by it, and a thick volume that no longer fits is RESOURCE_EXHAUSTED (only
    volumes used to be counted: 12 MiB were admitted on a 20 MiB disk holding 16)."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=20 * MiB)], use_reflink=False)
    snapshots = SnapshotManager(volumes)
    volume = volumes.create("vol-1", 8 * MiB, "data0", thin=False)
    fill(volume.path, os.urandom(8 * MiB))
    free = volumes.disks()[0].free
    assert snapshots.create("snap-1", "vol-1").allocated >= 8 * MiB
    assert volumes.disks()[0].free <= free - 8 * MiB
    with pytest.raises(ResourceExhausted, match="disk data0 has"):
        volumes.create("vol-2", 12 * MiB, "data0", thin=False)


def test_configured_capacity_counts_a_copy_under_way(tmp_path):
    """A background copy's temporary file takes space as it is written: a copy held after its first chunk has
    lowered the disk's free space by that chunk already."""
    gate = Gate()
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=64 * MiB)], use_reflink=False,
                            background_copies=True, copy_pace=gate)
    snapshots = SnapshotManager(volumes)
    try:
        volume = volumes.create("vol-1", 4 * MiB, "data0")
        fill(volume.path, os.urandom(4 * MiB))
        free = volumes.disks()[0].free
        assert snapshots.create("snap-1", "vol-1").state == COPYING
        deadline = time.monotonic() + 5
        while max(gate.calls.values(), default=0) < 2:  # the first chunk is written, the copy held
            assert time.monotonic() < deadline, "the copy never reached its second chunk"
            time.sleep(0.01)
        assert volumes.disks()[0].free <= free - MiB
    finally:
        gate.set()
        snapshots.close()


# -- 4: a thick expand within the configured capacity -------------------------------------------------------------

def test_thick_expand_beyond_the_configured_capacity_is_resource_exhausted(tmp_path):
    """A thick expand needs the new part within the disk's free space, a configured capacity included, as a
    thick create does (it used to allocate 100 MiB on a disk of 20); a thin one may overcommit."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=20 * MiB)])
    before = volumes.create("vol-1", 8 * MiB, "data0", thin=False)
    with pytest.raises(ResourceExhausted, match="growing volume vol-1 to 33554432 bytes needs 25165824"):
        volumes.expand("vol-1", 32 * MiB)
    after = volumes.get("vol-1")
    assert (after.size, after.allocated) == (before.size, before.allocated)
    assert volumes.expand("vol-1", 16 * MiB).allocated >= 16 * MiB
    volumes.create("vol-2", MiB, "data0")
    assert volumes.expand("vol-2", 64 * MiB).size == 64 * MiB


# -- 5: a repeat of a clone made before ----------------------------------------------------------------------------

def test_a_repeated_clone_is_the_clone_after_its_source_grew_or_was_deleted(tmp_path):
    """agent.proto: a repeat returns the existing volume.  The clone is looked up before its source, so a
    repeat (size 0: "as large as the source") answers it after the source grew (it used to be ALREADY_EXISTS)
    or was deleted (NOT_FOUND)."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("vol-src", 4 * MiB, "data0")
    clone = volumes.create("vol-clone", 0, source="vol-src")
    volumes.expand("vol-src", 8 * MiB)
    assert volumes.create("vol-clone", 0, source="vol-src") == clone
    volumes.delete("vol-src")
    assert volumes.create("vol-clone", 0, source="vol-src") == clone
    assert volumes.create("vol-clone", 4 * MiB, "data0", source="vol-src") == clone
    with pytest.raises(AlreadyExists):
        volumes.create("vol-clone", 0, source="vol-other")
    with pytest.raises(NotFound):
        volumes.create("vol-new", 0, source="vol-src")


def test_a_repeated_clone_of_a_deleted_snapshot_is_the_clone_over_grpc(agent):  # noqa: F811
    """CreateVolume repeated after its source snapshot was deleted: the clone (it used to be NOT_FOUND, the
    snapshot resolved first); a new clone of the gone snapshot is still NOT_FOUND."""
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=4 * MiB, thin=True))
    agent.CreateSnapshot(pb.CreateSnapshotRequest(snapshot_id="snap-1", volume_id="vol-1"))
    request = pb.CreateVolumeRequest(volume_id="vol-2", source_snapshot_id="snap-1", thin=True)
    clone = agent.CreateVolume(request)
    agent.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="snap-1"))
    assert agent.CreateVolume(request) == clone
    with pytest.raises(grpc.RpcError) as caught:
        agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-3", source_snapshot_id="snap-1", thin=True))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_fake_agent_answers_a_repeated_clone_as_the_agent_does():
    """The controller's fake agent follows the same rule: a repeat of a clone made before is the clone once its
    snapshot or volume is gone; a clone whose copy failed needs its source to start again."""
    agents = FakeAgents()
    client = FakeAgentClient(agents, agents.agent("n1"))
    client.create_volume("src", 4 * MiB, "data0", True)
    client.create_snapshot("snap", "src")
    client.clone_volume("c1", 4 * MiB, "data0", True, source_snapshot_id="snap")
    client.clone_volume("c2", 4 * MiB, "data0", True, source_volume_id="src")
    client.delete_snapshot("snap")
    client.delete_volume("src")
    again = client.clone_volume("c1", 4 * MiB, "data0", True, source_snapshot_id="snap")
    assert (again["volume_id"], again["source"], again["state"]) == ("c1", "snapshot:snap", "ready")
    again = client.clone_volume("c2", 4 * MiB, "data0", True, source_volume_id="src")
    assert (again["volume_id"], again["source"], again["state"]) == ("c2", "src", "ready")
    agents.fail_copy("n1", "c2")
    with pytest.raises(DomainNotFound):
        client.clone_volume("c2", 4 * MiB, "data0", True, source_volume_id="src")


# -- 6: a repeat with other arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("first, repeat", [
    (dict(thin=True), dict(thin=False)),
    (dict(thin=False), dict(thin=True)),
    (dict(source="vol-src"), dict()),
    (dict(), dict(source="vol-src")),
], ids=["thin-then-thick", "thick-then-thin", "clone-then-plain", "plain-then-clone"])
def test_create_repeated_with_another_thin_or_source_is_already_exists(tmp_path, first, repeat):
    """agent.proto: ALREADY_EXISTS for the same id with incompatible parameters.  A fully allocated volume
    asked for is not a sparse one that exists (it used to be returned, ``thin`` ignored), nor is a plain
    volume a clone (a create without a source used to match any clone)."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("vol-src", 4 * MiB, "data0")
    existing = volumes.create("vol-1", 4 * MiB, "data0", **first)
    with pytest.raises(AlreadyExists, match="exists with 4194304 bytes on disk data0"):
        volumes.create("vol-1", 4 * MiB, "data0", **repeat)
    assert volumes.create("vol-1", 4 * MiB, "data0", **first) == existing


# -- 7: a snapshot stopped between its rename and its record -------------------------------------------------------

def test_a_snapshot_stopped_after_its_rename_is_ready_after_the_restart(tmp_path, monkeypatch):
    """A stop between the rename of the finished (fsynced) image and its READY record: after the restart the
    snapshot is ready, with its data, and clones (it used to be declared interrupted, to be deleted)."""
    spec = DiskSpec("data0", str(tmp_path / "d0"))
    volumes = VolumeManager([spec], reflink_fn=fake_reflink)  # the rename and record on this thread
    volume = volumes.create("vol-1", 4 * MiB, "data0")
    fill(volume.path, b"precious" * 1000)
    write_json = snapshots_module.write_json

    def stop_before_ready(path, data, **kwargs):
        if data.get("state") == READY:
            raise Stop()
        write_json(path, data, **kwargs)

    monkeypatch.setattr(snapshots_module, "write_json", stop_before_ready)
    with pytest.raises(Stop):
        SnapshotManager(volumes).create("snap-1", "vol-1")
    monkeypatch.undo()
    restarted = VolumeManager([spec], use_reflink=False)
    info = SnapshotManager(restarted).require("snap-1")
    assert (info.state, info.message) == (READY, "")
    assert read_at(info.path, 0, 8000) == b"precious" * 1000
    assert read_at(restarted.create("vol-2", 0, source=SnapshotManager(restarted).source("snap-1")).path,
                   0, 8000) == b"precious" * 1000


# -- 8: a thick volume's LUN is not thin-provisioned --------------------------------------------------------------

def test_a_thick_volume_is_exported_without_thin_provisioning(tmp_path):
    """A fully allocated volume is served with LBPME=0: the initiator's discard (UNMAP) is refused and its
    blocks stay allocated (it was served thin, and an UNMAP punched holes in it, its space guarantee lost);
    a thin volume's LUN still takes UNMAP."""
    node = Node(tmp_path)
    try:
        for volume_id, thin in (("vol-thick", False), ("vol-thin", True)):
            volume = node.volumes.create(volume_id, 4 * MiB, "data0", thin=thin)
            fill(volume.path, b"x" * (4 * MiB))
            node.exports.export(volume_id, X, CHAP)
            lun = node.login(volume_id, X)
            try:
                if thin:
                    lun.discard(0, 2 * MiB)
                else:
                    with pytest.raises(OSError) as caught:
                        lun.discard(0, 2 * MiB)
                    assert caught.value.errno == errno.EOPNOTSUPP
            finally:
                lun.close()
        assert node.volumes.get("vol-thick").allocated >= 4 * MiB
        assert node.volumes.get("vol-thin").allocated <= 3 * MiB
    finally:
        node.stop()
