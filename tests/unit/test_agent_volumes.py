"""VolumeManager on temporary directories: agent.proto's idempotency rules for Create/Delete/ExpandVolume."""

from __future__ import annotations

import os

import pytest

from node_agent.agent.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from node_agent.agent.settings import DiskSpec
from node_agent.agent import volumes as volumes_module
from node_agent.agent.volumes import VolumeManager, copy_sparse, reflink

MiB = 1 << 20


@pytest.fixture
def manager(tmp_path):
    return VolumeManager([DiskSpec("data0", str(tmp_path / "d0")), DiskSpec("data1", str(tmp_path / "d1"))])


def test_create_thin_is_sparse_and_repeat_returns_it(manager):
    info = manager.create("vol-1", 64 * MiB, "data0", thin=True)
    assert (info.size, info.disk, info.thin) == (64 * MiB, "data0", True)
    assert os.path.getsize(info.path) == 64 * MiB
    assert info.allocated < MiB  # a sparse file
    assert manager.create("vol-1", 64 * MiB, "data0") == info
    assert manager.create("vol-1", 64 * MiB, "") == info  # any disk: the one it is on


def test_create_thick_allocates_every_block(manager):
    info = manager.create("vol-thick", 8 * MiB, "data1", thin=False)
    assert info.allocated >= 8 * MiB
    assert info.thin is False


@pytest.mark.parametrize("size, disk", [(32 * MiB, "data0"), (64 * MiB, "data1")])
def test_create_with_other_parameters_is_already_exists(manager, size, disk):
    manager.create("vol-1", 64 * MiB, "data0")
    with pytest.raises(AlreadyExists, match="exists with 67108864 bytes on disk data0"):
        manager.create("vol-1", size, disk)


@pytest.mark.parametrize("volume_id, size, message", [
    ("Vol_1", MiB, "lowercase"),
    ("", MiB, "volume_id"),
    ("a" * 64, MiB, "1-63"),
    ("../x", MiB, "volume_id"),
    ("vol-1", 0, "positive"),
    ("vol-1", 1000, "multiple of the 512-byte block"),
])
def test_create_refuses_bad_arguments_and_changes_nothing(manager, volume_id, size, message):
    with pytest.raises(InvalidArgument, match=message):
        manager.create(volume_id, size, "data0")
    assert manager.list() == []


def test_create_on_an_unknown_disk_is_not_found(manager):
    with pytest.raises(NotFound, match="no disk 'nope'.*data0, data1"):
        manager.create("vol-1", MiB, "nope")


def test_thick_volume_larger_than_the_free_space_is_resource_exhausted(tmp_path):
    manager = VolumeManager([DiskSpec("small", str(tmp_path / "s"), capacity=4 * MiB)])
    with pytest.raises(ResourceExhausted, match="disk small has"):
        manager.create("vol-1", 8 * MiB, "small", thin=False)
    assert manager.list() == []
    assert manager.create("vol-1", 8 * MiB, "small", thin=True).size == 8 * MiB  # thin: overcommit is allowed


def test_configured_capacity_counts_allocated_blocks(tmp_path):
    manager = VolumeManager([DiskSpec("small", str(tmp_path / "s"), capacity=64 * MiB)])
    manager.create("vol-1", 16 * MiB, thin=False)
    disk = manager.disks()[0]
    assert disk.capacity == 64 * MiB
    assert 47 * MiB <= disk.free <= 48 * MiB


def test_expand_grows_and_never_shrinks(manager):
    manager.create("vol-1", 8 * MiB, "data0")
    assert manager.expand("vol-1", 16 * MiB).size == 16 * MiB
    assert manager.expand("vol-1", 4 * MiB).size == 16 * MiB  # a smaller size: the volume as it is
    assert manager.expand("vol-1", 16 * MiB).size == 16 * MiB
    with pytest.raises(NotFound):
        manager.expand("vol-2", 16 * MiB)


def test_expand_of_a_thick_volume_allocates_the_new_part(manager):
    manager.create("vol-1", 4 * MiB, "data0", thin=False)
    assert manager.expand("vol-1", 8 * MiB).allocated >= 8 * MiB


def test_delete_removes_every_file_and_repeats_succeed(manager):
    info = manager.create("vol-1", MiB, "data0")
    for sidecar in (".pr", ".sanitize"):  # what persistent reservations and a failed sanitize leave beside it
        with open(info.path + sidecar, "w") as fh:
            fh.write("{}")
    assert manager.delete("vol-1") is True
    assert os.listdir(os.path.dirname(info.path)) == []
    assert manager.delete("vol-1") is False


def test_clone_copies_the_data_and_may_grow(manager):
    src = manager.create("vol-src", 4 * MiB, "data0")
    with open(src.path, "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"shoal" * 100)
    clone = manager.create("vol-clone", 8 * MiB, "data1", source="vol-src")
    assert (clone.size, clone.source) == (8 * MiB, "vol-src")
    with open(clone.path, "rb") as fh:
        fh.seek(MiB)
        assert fh.read(500) == b"shoal" * 100
    assert manager.create("vol-clone", 8 * MiB, "data1", source="vol-src") == clone  # repeat
    assert manager.create("vol-same", 0, source="vol-src").size == 4 * MiB  # size 0: the source's


def test_clone_errors(manager):
    manager.create("vol-src", 4 * MiB, "data0")
    with pytest.raises(InvalidArgument, match="at least its 4194304 bytes"):
        manager.create("vol-clone", 2 * MiB, "data0", source="vol-src")
    with pytest.raises(NotFound, match="vol-nope"):
        manager.create("vol-clone", 4 * MiB, "data0", source="vol-nope")


def test_a_clone_whose_source_is_deleted_meanwhile_is_not_found_and_leaves_nothing(manager, monkeypatch):
    """The source goes between the clone's lookup of it and the copy's start: NOT_FOUND (what a retry will
    answer too), not INTERNAL, and no half-made clone."""
    manager.create("vol-src", 4 * MiB, "data0")
    real_flush = volumes_module.flush_ahead

    def deleted_meanwhile(src):
        real_flush(src)
        assert manager.delete("vol-src")

    monkeypatch.setattr(volumes_module, "flush_ahead", deleted_meanwhile)
    with pytest.raises(NotFound, match="vol-src, the source of clone vol-clone, was deleted meanwhile"):
        manager.create("vol-clone", 4 * MiB, "data0", source="vol-src")
    assert manager.list() == []
    assert [n for n in os.listdir(manager.specs["data0"].path + "/volumes") if not n.startswith(".")] == []


def test_copy_sparse_keeps_holes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as fh:
        fh.truncate(16 * MiB)
        fh.seek(8 * MiB)
        fh.write(b"x" * 4096)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(dfd, 16 * MiB)
        copy_sparse(sfd, dfd, 16 * MiB)
    finally:
        os.close(sfd), os.close(dfd)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < MiB


def test_reflink_reports_whether_the_filesystem_shares_extents(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"y" * 8192)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        shared = reflink(sfd, dfd)  # ext4/tmpfs: False (copy instead); btrfs/XFS: True
    finally:
        os.close(sfd), os.close(dfd)
    assert shared is False or dst.read_bytes() == src.read_bytes()


def test_a_restarted_manager_finds_its_volumes_and_drops_interrupted_creates(tmp_path):
    disks = [DiskSpec("data0", str(tmp_path / "d0"))]
    first = VolumeManager(disks)
    info = first.create("vol-1", MiB, thin=False)
    partial = os.path.join(os.path.dirname(info.path), ".vol-2.img.creating")
    open(partial, "wb").close()
    again = VolumeManager(disks)
    assert [v.volume_id for v in again.list()] == ["vol-1"]
    assert again.get("vol-1").thin is False
    assert not os.path.exists(partial)
