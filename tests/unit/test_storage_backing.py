"""Backing stores: sparse creation, size rules, FUA path, hole punching, SEEK_DATA extents."""

from __future__ import annotations

import os

import pytest

from node_agent.storage.backing import ALLOCATION_UNIT, FileBackingStore, MemoryBackingStore, StorageError

MiB = 1 << 20


def test_creates_sparse_file(tmp_path):
    store = FileBackingStore(tmp_path / "a.img", 64 * MiB)
    st = os.stat(tmp_path / "a.img")
    assert st.st_size == 64 * MiB and st.st_blocks * 512 < MiB
    assert store.size == 64 * MiB and store.fd is not None and store.block_size == 512
    store.close()


def test_refuses_to_shrink_and_reopens_without_size(tmp_path):
    FileBackingStore(tmp_path / "a.img", 8 * MiB).close()
    with pytest.raises(StorageError):
        FileBackingStore(tmp_path / "a.img", 4 * MiB)
    store = FileBackingStore(tmp_path / "a.img")
    assert store.size == 8 * MiB
    store.close()
    grown = FileBackingStore(tmp_path / "a.img", 16 * MiB)
    assert grown.size == 16 * MiB
    grown.close()
    with pytest.raises(StorageError):
        FileBackingStore(tmp_path / "b.img", 1000)  # not a multiple of the block size


def test_missing_file_without_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        FileBackingStore(tmp_path / "none.img", MiB, create=False)


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_write_read_fua_flush(tmp_path, kind):
    store = FileBackingStore(tmp_path / "a.img", 4 * MiB) if kind == "file" else MemoryBackingStore(4 * MiB)
    store.write(4096, memoryview(b"x" * 4096))
    store.write(8192, b"y" * 512, fua=True)
    assert store.read(4096, 4096) == b"x" * 4096 and store.read(8192, 512) == b"y" * 512
    assert store.fua_writes == 1
    store.flush()
    assert store.flushes == 1
    store.close()
    if kind == "file":
        with open(tmp_path / "a.img", "rb") as f:
            f.seek(8192)
            assert f.read(512) == b"y" * 512  # the FUA write went through pwritev(RWF_DSYNC)


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_punch_and_extents(tmp_path, kind):
    store = FileBackingStore(tmp_path / "a.img", 4 * MiB) if kind == "file" else MemoryBackingStore(4 * MiB)
    store.write(0, b"d" * (4 * ALLOCATION_UNIT))
    assert store.extent(0, MiB) == (True, 4 * ALLOCATION_UNIT)
    store.punch(ALLOCATION_UNIT, ALLOCATION_UNIT)
    assert store.read(ALLOCATION_UNIT, ALLOCATION_UNIT) == bytes(ALLOCATION_UNIT)
    assert store.extent(0, MiB) == (True, ALLOCATION_UNIT)
    assert store.extent(ALLOCATION_UNIT, MiB) == (False, ALLOCATION_UNIT)
    assert store.extent(2 * ALLOCATION_UNIT, MiB) == (True, 2 * ALLOCATION_UNIT)
    store.punch(2 * ALLOCATION_UNIT + 100, 50)  # partial: zeroed, stays mapped
    assert store.read(2 * ALLOCATION_UNIT + 100, 50) == bytes(50)
    assert store.read(2 * ALLOCATION_UNIT + 99, 1) == b"d"
    assert store.is_mapped(2 * ALLOCATION_UNIT, 512)
    assert not store.is_mapped(3 * MiB, 512)
    store.close()


def test_punch_falls_back_to_zeros(tmp_path):
    store = FileBackingStore(tmp_path / "a.img", MiB)
    store.write(0, b"q" * 8192)
    store._punch_supported = False
    store.punch(0, 8192)
    assert store.read(0, 8192) == bytes(8192)
    store.close()


def test_resize(tmp_path):
    store = FileBackingStore(tmp_path / "a.img", MiB)
    store.resize(2 * MiB)
    assert store.size == 2 * MiB == os.path.getsize(tmp_path / "a.img")
    with pytest.raises(StorageError):
        store.resize(MiB)
    store.close()
