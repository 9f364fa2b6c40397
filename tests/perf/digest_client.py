"""A load generator on Shoal's own initiator that can turn on header AND data digests (CRC32C).

libiscsi, and so ``qemu-img`` and ``iscsi-perf``, offers ``DataDigest=None``
only (its login code has no data digest), so the benchmark's "header + data
digests" rows need another client: this one, run as its own process by
``bench_targets.py`` (so its CPU is measured apart from the target's). It is
``shoal iscsi bench`` with digests: random offsets, ``--depth`` workers on one
session, for ``--seconds``; it prints one JSON object with the count, the
time, the initiator's CPU per I/O and the digests the login negotiated (the
target must have agreed, or the run would fail on the first misframed PDU).
It runs on the event loop Shoal's own tools use (``node_agent.eventloop``:
uvloop where installed), as ``shoal iscsi bench`` does.

Run: ``.venv/bin/python tests/perf/digest_client.py URL [--digests] [--write] [--size 4096] [--depth 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node_agent import eventloop  # noqa: E402
from node_agent.iscsi.initiator.blockdev import LunDevice  # noqa: E402
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient  # noqa: E402
from node_agent.iscsi.initiator.tools import IscsiUrl  # noqa: E402


async def bench(url: IscsiUrl, size: int, depth: int, seconds: float, write: bool, digests: bool) -> dict:
    offer = ("CRC32C",) if digests else ("None",)
    settings = ClientSettings(queue_depth=depth, header_digest=offer, data_digest=offer, reconnect_timeout=5)
    async with IscsiClient(url.host, url.port, url.target, settings=settings) as client:
        device = LunDevice(client, url.lun or 0)
        capacity = await device.read_capacity()
        blocks = size // capacity.block_size
        slots = max(1, (capacity.blocks - blocks) // blocks)
        payload = os.urandom(size)
        rng = random.Random(1)
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                lba = rng.randrange(slots) * blocks
                if write:
                    await device.write_blocks(lba, payload)
                else:
                    await device.read_blocks(lba, blocks)
                count += 1

        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(depth)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        params = client.params
    return {"count": count, "seconds": round(elapsed, 4), "iops": round(count / elapsed, 1),
            "initiator_cpu_us_per_io": round(cpu / max(count, 1) * 1e6, 2),
            "header_digest": bool(getattr(params, "header_digest", False)),
            "data_digest": bool(getattr(params, "data_digest", False))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--write", action="store_true")
    p.add_argument("--digests", action="store_true", help="offer only CRC32C for HeaderDigest and DataDigest")
    args = p.parse_args(argv)
    result = eventloop.run(bench(IscsiUrl.parse(args.url), args.size, args.depth, args.seconds, args.write,
                               args.digests))
    if args.digests and not (result["header_digest"] and result["data_digest"]):
        print(f"digests were not negotiated: {result}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
