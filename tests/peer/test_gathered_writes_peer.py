"""Many 4 KiB writes in flight from QEMU land on disk exactly (gathered writes, issue 7).

``shoal target`` writes the adjacent small WRITEs of one receive with one
``pwritev`` (``tests/protocol/test_gathered_writes.py`` checks how, with a
scripted initiator).  Here a real peer keeps them in flight: ``qemu-io``
(QEMU's libiscsi driver) submits 4 KiB ``aio_write``s with a distinct pattern
per block, in runs of adjacent blocks separated by gaps and by reads, all
before waiting for any; the backing file must then hold every block's own
pattern and nothing in the gaps.  ``-t none`` (write-back cache, as
``qemu-img bench`` uses): with qemu-io's default write-through mode every
write carries FUA and goes to a worker one by one, never gathered (strace of
this run: 255 writes in 16 ``pwritev`` calls of up to 25 blocks).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target, shoal_command

pytestmark = pytest.mark.peer
MiB = 1 << 20
BLOCK = 4096


def test_adjacent_writes_in_flight_land_on_disk_block_by_block(tmp_path):
    require_tools("qemu-io")
    blocks = [*range(0, 96), *range(100, 160), *range(300, 399)]  # three runs of adjacent blocks
    commands = []
    for number, block in enumerate(blocks):
        commands += ["-c", f"aio_write -P {number % 255 + 1} {block * BLOCK} {BLOCK}"]
        if number % 50 == 49:
            commands += ["-c", f"aio_read 0 {BLOCK}"]  # another command amid the writes
    commands += ["-c", "aio_flush"]
    with running_shoal_target(tmp_path, luns=(("disk", 8 * MiB),)) as target:
        result = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", *commands, target.url(0)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "error" not in (result.stdout + result.stderr).lower()
        with open(target.lun_paths[0], "rb") as handle:
            disk = handle.read()
    for number, block in enumerate(blocks):
        assert disk[block * BLOCK:(block + 1) * BLOCK] == bytes([number % 255 + 1]) * BLOCK, block
    written = set(blocks)
    assert all(disk[b * BLOCK:(b + 1) * BLOCK] == bytes(BLOCK) for b in range(400) if b not in written)


def test_a_paced_stream_of_writes_lands_whole(tmp_path):
    """A long sequential stream at depth 32 from ``qemu-img bench``: the connection is alone on the
    target's loop, so receive pacing (``server._Pacer``) runs its trials (one window waiting after each
    gathered receive, one not) and decides; every block of the LUN, written over and over, holds the
    stream's pattern at the end."""
    require_tools("qemu-img")
    size = 16 * MiB
    with running_shoal_target(tmp_path, luns=(("disk", size),), command=shoal_command() + ["-v"]) as target:
        result = subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "--pattern", "0x5a",
                                 "-c", "60000", "-d", "32", "-s", str(BLOCK), target.url(0)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        log = target.log()
        with open(target.lun_paths[0], "rb") as handle:
            disk = handle.read()
    assert "receive pacing " in log, log[-3000:]  # both trial windows ran and a decision was taken
    assert disk == b"\x5a" * size
