"""The target's memory stays bounded under a burst of large writes and comes back after it (issue 7).

A real ``shoal target`` process; 64 sessions of Shoal's own initiator each keep
32 WRITEs of 1 MiB in flight (2 GiB of data at once).  The target's RSS may
grow by at most what the sessions negotiated to have in flight: a 1 MiB write
buffer per outstanding command, a receive buffer per connection able to hold
one PDU of MaxRecvDataSegmentLength (256 KiB, doubled on growth), the write
buffer pool's limit, and a small allowance for the Python objects of 2048
commands.  Once the burst is over and the sessions are gone, the RSS must come
back near its idle figure: the pool trims itself, receive buffers shrink, and
the freed heap goes back to the kernel (``buffers.release_memory``).
Figures come from ``/proc/PID/status`` (VmRSS, VmHWM).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient
from tests.support.shoal_target import running_shoal_target

pytestmark = pytest.mark.peer
MiB = 1 << 20
SESSIONS, DEPTH = 64, 32
POOL_LIMIT = 64 * MiB  # BufferPool's default limit
RECEIVE_BUFFER = 512 * 1024  # one 256 KiB PDU plus what it grows by
OBJECTS = 64 * MiB  # tasks, PDUs, futures of 2048 commands; interpreter noise


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


async def burst(host: str, port: int, iqn: str) -> None:
    clients = []
    try:
        for i in range(SESSIONS):
            settings = ClientSettings(initiator_iqn=f"iqn.2026-11.io.shoal.test:mem{i}", queue_depth=DEPTH)
            clients.append(await IscsiClient(host, port, iqn, settings=settings).connect())
        payload = os.urandom(MiB)

        async def session(index: int, client: IscsiClient) -> None:
            device = LunDevice(client, 0)
            await asyncio.gather(*(device.write_blocks(((index * DEPTH + k) % 128) * 2048, payload)
                                   for k in range(DEPTH)))

        await asyncio.gather(*(session(i, c) for i, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.close()


def test_rss_is_bounded_by_the_buffers_in_flight_and_returns_after(tmp_path):
    with running_shoal_target(tmp_path, luns=(("disk", 128 * MiB),)) as target:
        time.sleep(0.5)
        idle = memory(target.pid)["VmRSS"]
        asyncio.run(burst(target.host, target.port, target.iqn))
        peak = memory(target.pid)["VmHWM"]
        deadline = time.monotonic() + 10
        after = memory(target.pid)["VmRSS"]
        while after > idle + 16 * MiB and time.monotonic() < deadline:
            time.sleep(0.5)
            after = memory(target.pid)["VmRSS"]
    bound = SESSIONS * (DEPTH * MiB + RECEIVE_BUFFER) + POOL_LIMIT + OBJECTS
    print(f"idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (bound {(idle + bound) / MiB:.0f}), "
          f"after {after / MiB:.0f} MiB")
    assert peak - idle <= bound
    assert after <= idle + 16 * MiB, f"RSS stayed at {after / MiB:.0f} MiB after the burst (idle {idle / MiB:.0f})"
