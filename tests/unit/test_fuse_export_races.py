"""Ordering of overlapping writes in the FUSE export (node_agent/host/fuse_export.py, ``BlockFile``).

A write that is not whole blocks is a read-modify-write (RMW) of its covering
blocks: read the edge blocks, merge, write them all back.  Any other write to
those blocks that lands between that read and that write is undone by the
stale copy: a lost write, which no disk does (SBC-3 4.2: a block holds what the
last write of it wrote).  Aligned writes, discards (fallocate PUNCH_HOLE) and
written zeros (ZERO_RANGE, or a punch where the discard does not zero) are
such writes.

The devices here are ``FileBlockDevice`` — our own implementation of the
``BlockDevice`` protocol ``SyncLun`` implements — with hooks that stall a
chosen call, to open the window deterministically; no peer is mocked.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from node_agent.host.fuse_export import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    BlockFile,
    ExportSettings,
    FileBlockDevice,
)

SIZE = 256 * 1024
BLOCK = 512
WINDOW = 0.25  # how long a stalled call waits for the other one (the fixed export makes it wait that long)
JOIN = 10.0  # a thread still running after this is stuck: a deadlock


class HookedDevice(FileBlockDevice):
    """A FileBlockDevice calling ``before[op]`` / ``after[op]`` (op: pread, pwrite, discard) around each call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.before: dict = {}
        self.after: dict = {}
        self.log: list[tuple[str, str, int]] = []  # (thread name, op, offset), in the order calls ended
        self._log_lock = threading.Lock()

    def _call(self, op, offset, arg, run):
        self.before.get(op, lambda *a: None)(offset, arg)
        result = run()
        with self._log_lock:
            self.log.append((threading.current_thread().name, op, offset))
        self.after.get(op, lambda *a: None)(offset, arg)
        return result

    def pread(self, offset, length):
        return self._call("pread", offset, length, lambda: super(HookedDevice, self).pread(offset, length))

    def pwrite(self, offset, data, fua=False):
        return self._call("pwrite", offset, data, lambda: super(HookedDevice, self).pwrite(offset, data, fua))

    def discard(self, offset, length):
        return self._call("discard", offset, length, lambda: super(HookedDevice, self).discard(offset, length))


def make_device(tmp_path, cls=HookedDevice, block_size=BLOCK):
    path = tmp_path / "backing.img"
    data = random.Random(1).randbytes(SIZE)
    path.write_bytes(data)
    return cls(str(path), block_size=block_size), bytearray(data)


def in_thread(name):
    return threading.current_thread().name == name


def start(name, target, *args):
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def join(*threads):
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive(), f"{thread.name} did not finish: deadlock"


# The other write, on block 1 (bytes 512-1023), and what block 1 holds after it.
OTHERS = {
    "aligned-write": (lambda bf: bf.write(BLOCK, b"A" * BLOCK), b"A" * BLOCK, ExportSettings()),
    "punch-discard": (lambda bf: bf.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLOCK, BLOCK),
                      bytes(BLOCK), ExportSettings()),
    "punch-written-zeros": (lambda bf: bf.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLOCK, BLOCK),
                            bytes(BLOCK), ExportSettings(discard_zeroes=False)),
    "zero-range": (lambda bf: bf.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, BLOCK, BLOCK),
                   bytes(BLOCK), ExportSettings()),
}
RMW_OFFSET, RMW_DATA = BLOCK - 5, b"r" * 10  # bytes 507-516: partial in blocks 0 and 1


def _block1_outcomes(other_result: bytes) -> set[bytes]:
    """Block 1 after both writes, in either order: the other write alone, or it then the RMW's bytes."""
    then_rmw = bytearray(other_result)
    then_rmw[:RMW_OFFSET + len(RMW_DATA) - BLOCK] = RMW_DATA[BLOCK - RMW_OFFSET:]
    return {bytes(other_result), bytes(then_rmw)}


@pytest.mark.parametrize("other", sorted(OTHERS))
def test_a_write_landing_inside_a_read_modify_write_is_not_undone(tmp_path, other):
    """The RMW has read its edge blocks; another write to block 1 comes while it is stalled there."""
    do_other, other_result, settings = OTHERS[other]
    device, _ = make_device(tmp_path)
    bf = BlockFile(device, settings)
    rmw_read, other_done = threading.Event(), threading.Event()

    def after_read(offset, length):
        if in_thread("rmw") and offset + length > BLOCK:  # the read of block 1 (the last edge block)
            rmw_read.set()
            other_done.wait(WINDOW)  # unfixed: the other write lands here, then is overwritten

    def after_other(offset, arg):
        if in_thread("other"):
            other_done.set()

    device.after.update(pread=after_read, pwrite=after_other, discard=after_other)
    rmw = start("rmw", bf.write, RMW_OFFSET, RMW_DATA)
    assert rmw_read.wait(JOIN)
    join(start("other", do_other, bf), rmw)
    assert bytes(bf.read(BLOCK, BLOCK)) in _block1_outcomes(other_result), "lost write: stale block 1"
    device.close()


@pytest.mark.parametrize("other", sorted(OTHERS))
def test_a_read_modify_write_does_not_read_under_a_write_in_flight(tmp_path, other):
    """Another write to block 1 is in flight at the device when the RMW starts."""
    do_other, other_result, settings = OTHERS[other]
    device, _ = make_device(tmp_path)
    bf = BlockFile(device, settings)
    other_started, rmw_read, other_done = threading.Event(), threading.Event(), threading.Event()

    def before_other(offset, arg):
        if in_thread("other"):
            other_started.set()
            rmw_read.wait(WINDOW)  # unfixed: the RMW reads the old block 1 meanwhile

    def after_other(offset, arg):
        if in_thread("other"):
            other_done.set()

    def after_read(offset, length):
        if in_thread("rmw"):
            rmw_read.set()

    def before_rmw_write(offset, data):
        if in_thread("rmw"):
            other_done.wait(WINDOW)  # unfixed: writes its stale block 1 after the other write landed
        else:
            before_other(offset, data)

    device.before.update(pwrite=before_rmw_write, discard=before_other)
    device.after.update(pread=after_read, pwrite=after_other, discard=after_other)
    other_thread = start("other", do_other, bf)
    assert other_started.wait(JOIN)
    join(start("rmw", bf.write, RMW_OFFSET, RMW_DATA), other_thread)
    assert bytes(bf.read(BLOCK, BLOCK)) in _block1_outcomes(other_result), "lost write: stale block 1"
    device.close()


def test_aligned_writes_and_discards_to_one_block_run_at_once(tmp_path):
    """Writes that need no RMW are not serialised against each other: the device sees them together."""
    device, _ = make_device(tmp_path)
    bf = BlockFile(device, ExportSettings())
    together = threading.Barrier(3, timeout=JOIN)
    device.before.update(pwrite=lambda *a: together.wait(), discard=lambda *a: together.wait())
    join(start("w1", bf.write, 0, b"1" * 2 * BLOCK), start("w2", bf.write, BLOCK, b"2" * BLOCK),
         start("d", bf.fallocate, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 * BLOCK))
    assert not together.broken
    device.close()


def waiting(bf) -> int | None:
    """Requests of ``bf`` queued behind a conflicting one (the export's own count; None if it keeps none)."""
    return getattr(getattr(bf, "_ranges", None), "_waiting", None)


def wait_until(condition):
    deadline = time.monotonic() + JOIN
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_waiting_read_modify_write_is_not_overtaken_by_later_aligned_writes(tmp_path):
    """Overlapping requests are served in the order they came: a stream of aligned writes cannot starve an RMW."""
    device, _ = make_device(tmp_path)
    bf = BlockFile(device, ExportSettings())
    first_in_flight, release_first = threading.Event(), threading.Event()

    def stall_first(offset, data):
        if in_thread("first"):
            first_in_flight.set()
            release_first.wait(JOIN)

    device.before["pwrite"] = stall_first
    first = start("first", bf.write, 0, b"1" * BLOCK)
    assert first_in_flight.wait(JOIN)
    rmw = start("rmw", bf.write, 10, b"r" * 4)
    wait_until(lambda: waiting(bf) == 1 or not rmw.is_alive())  # queued behind the first write (unfixed: done)
    later = start("later", bf.write, 0, b"3" * BLOCK)
    wait_until(lambda: waiting(bf) == 2 or not later.is_alive())
    release_first.set()
    join(first, rmw, later)
    writes = [name for name, op, _ in device.log if op == "pwrite"]
    assert writes == ["first", "rmw", "later"]
    assert bytes(bf.read(0, BLOCK)) == b"3" * BLOCK
    device.close()


class OrderCheckingDevice(FileBlockDevice):
    """Flags any write or discard of a block between a thread's read of it and that thread's next write.

    Used only with writes (no plain reads), so every read is an RMW's read of an edge block.  Calls
    sleep a little, to widen the windows in which an unordered write would land.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._version: dict[int, int] = {}
        self._in_flight: dict[int, int] = {}
        self._read_at: dict[int, dict[int, int]] = {}  # thread id -> block -> version when read

    def _blocks(self, offset, length):
        return range(offset // self.block_size, (offset + length) // self.block_size)

    def pread(self, offset, length):
        me = threading.get_ident()
        with self._lock:
            for b in self._blocks(offset, length):
                if self._in_flight.get(b):
                    self.violations.append(f"RMW read of block {b} while a write of it was in flight")
                self._read_at.setdefault(me, {})[b] = self._version.get(b, 0)
        time.sleep(0.001)
        return super().pread(offset, length)

    def _writing(self, offset, length, run):
        me, blocks = threading.get_ident(), self._blocks(offset, length)
        with self._lock:
            read_at = self._read_at.pop(me, {})
            for b in blocks:
                if b in read_at and read_at[b] != self._version.get(b, 0):
                    self.violations.append(f"RMW wrote back block {b} after another write changed it")
                self._in_flight[b] = self._in_flight.get(b, 0) + 1
                self._version[b] = self._version.get(b, 0) + 1
        try:
            time.sleep(0.0005)
            run()
        finally:
            with self._lock:
                for b in blocks:
                    self._in_flight[b] -= 1
                    self._version[b] += 1

    def pwrite(self, offset, data, fua=False):
        self._writing(offset, len(data), lambda: super(OrderCheckingDevice, self).pwrite(offset, data, fua))

    def discard(self, offset, length):
        self._writing(offset, length, lambda: super(OrderCheckingDevice, self).discard(offset, length))


@pytest.mark.parametrize("discard_zeroes", [True, False])
def test_mixed_overlapping_writes_keep_rmw_atomic_and_never_deadlock(tmp_path, discard_zeroes):
    """Eight threads of aligned and unaligned writes, punches and zeroing over 24 blocks, spanning up to 6."""
    device, _ = make_device(tmp_path, OrderCheckingDevice)
    bf = BlockFile(device, ExportSettings(discard_zeroes=discard_zeroes))
    region = 24 * BLOCK

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(60):
            kind = rng.random()
            if kind < 0.4:
                start_block, blocks = rng.randrange(24), rng.randint(1, 6)
                bf.write(start_block * BLOCK, bytes([seed]) * min(blocks * BLOCK, region - start_block * BLOCK))
            elif kind < 0.85:
                offset = rng.randrange(region - 1)
                bf.write(offset, bytes([seed]) * min(rng.randint(1, 6 * BLOCK), region - offset))
            else:
                offset = rng.randrange(region - 1)
                mode = rng.choice([FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE]) | FALLOC_FL_KEEP_SIZE
                bf.fallocate(mode, offset, min(rng.randint(1, 6 * BLOCK), region - offset))

    join(*[start(f"worker-{k}", worker, k + 1) for k in range(8)])
    assert device.violations == []
    device.close()
