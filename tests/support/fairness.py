"""The "fair under a slow disk" measurement (issue 7), shared by the target's and the agent portal's tests.

One session keeps 16 commands in flight on a slow LUN (every I/O blocks
``DELAY`` seconds: ``tests/support/slow_target.DelayedBackingStore``) while a
second session, one command at a time, measures its latency on a LUN on an
ordinary file, in alternating idle/loaded rounds so that machine noise hits
both alike.  Were the slow I/O run on the portal's event loop, every command of
the second session would wait behind the sleeps; handed to the worker pool it
must not.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from node_agent.iscsi.initiator.blockdev import LunDevice

DELAY = 0.05
ROUNDS = 7  # alternating idle/loaded rounds
PER_PHASE = 200  # commands of the fast session per phase


async def _latencies(device: LunDevice, count: int, payload: bytes) -> list[float]:
    """``count`` commands one at a time (4 KiB reads and writes alternating), each one's seconds."""
    out = []
    for i in range(count):
        start = time.perf_counter()
        if i % 2:
            await device.write_blocks(8 * (i % 64), payload)
        else:
            await device.read_blocks(8 * (i % 64), 8)
        out.append(time.perf_counter() - start)
    return out


async def measure(slow: LunDevice, fast: LunDevice) -> dict:
    """Latency of ``fast`` idle and while 16 commands keep ``slow`` busy (``slow`` must allow 16 in flight);
    checks on the way that ``slow`` reads back what it wrote."""
    payload = bytes(range(256)) * 16

    # The slow LUN is correct through the worker pool: what was written reads back.
    marker = b"slow-disk-block!" * 256
    await slow.write_blocks(100, marker)
    assert bytes(await slow.read_blocks(100, 8)) == marker
    await slow.flush()

    await _latencies(fast, 50, payload)  # warm-up (page cache, both code paths)
    stop = asyncio.Event()
    completed = 0
    in_flight = 0
    peak = 0

    async def load(worker: int) -> None:
        nonlocal completed, in_flight, peak
        while not stop.is_set():
            in_flight += 1
            peak = max(peak, in_flight)
            if worker % 2:
                await slow.write_blocks(8 * worker, payload)
            else:
                await slow.read_blocks(8 * worker, 8)
            in_flight -= 1
            completed += 1

    idle: list[float] = []
    loaded: list[float] = []
    during_load = 0
    # Seven rounds of 200 commands a phase (each phase ~10 ms): a few milliseconds of unrelated noise on
    # this shared machine (writeback of an earlier test, a timer) land in one phase of one round, and move
    # neither median; with three rounds of 100 they once made a loaded median 2.04x its idle one in CI.
    for _ in range(ROUNDS):
        idle += await _latencies(fast, PER_PHASE, payload)
        stop.clear()
        workers = [asyncio.create_task(load(w)) for w in range(16)]
        await asyncio.sleep(2 * DELAY)  # the slow LUN's queue is full before measuring
        before = completed
        loaded += await _latencies(fast, PER_PHASE, payload)
        during_load += completed - before
        stop.set()
        await asyncio.gather(*workers)
    return {"idle": statistics.median(idle), "loaded": statistics.median(loaded),
            "loaded_max": max(loaded), "slow_completed": during_load, "peak_in_flight": peak}
