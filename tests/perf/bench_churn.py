"""Latency of one session while other initiators log in and out: ``shoal target`` beside tgtd.

Issue 7 asks that every session stays served whatever the others do.  A cluster's portal sees
logins and logouts all the time (discovery sessions, attachments coming and going), so this
measures what a steady session notices of them: one session of Shoal's own initiator reads 4 KiB
at a time (depth 1) for ``--seconds``, first alone, then while libiscsi's ``iscsi-inq`` logs a
second session in, asks INQUIRY and logs out, every 0.2 s.  Per target and phase it prints the
count, the median, the 99.9th percentile and the worst latency; rounds alternate between the
targets (``--rounds``), and the summary gives the medians over the rounds.

Before the fix this was written for, the worst read during churn on ``shoal target`` took
33–50 ms (a full garbage collection of 74,000 objects on the event loop after each logout); see
``tests/peer/test_target_gc.py``.  Run:

    .venv/bin/python tests/perf/bench_churn.py [--seconds 8] [--rounds 3] [--only shoal]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node_agent.iscsi.initiator.blockdev import LunDevice  # noqa: E402
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient  # noqa: E402
from node_agent.iscsi.initiator.tools import IscsiUrl  # noqa: E402
from tests.support.shoal_target import running_shoal_target  # noqa: E402
from tests.support.tgtd import running_tgtd  # noqa: E402

CHURN_PAUSE = 0.2


async def _phase(url: str, seconds: float, churn: bool) -> dict:
    """Depth-1 4 KiB reads for ``seconds``; with ``churn``, ``iscsi-inq`` sessions come and go meanwhile."""
    parsed = IscsiUrl.parse(url)
    settings = ClientSettings(queue_depth=1, reconnect_timeout=5)
    logins = 0

    async def churner() -> None:
        nonlocal logins
        while True:
            process = await asyncio.create_subprocess_exec("iscsi-inq", url, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL)
            try:
                await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            logins += process.returncode == 0
            await asyncio.sleep(CHURN_PAUSE)

    latencies: list[float] = []
    async with IscsiClient(parsed.host, parsed.port, parsed.target, settings=settings) as client:
        device = LunDevice(client, parsed.lun)
        for i in range(200):  # warm-up
            await device.read_blocks(8 * (i % 512), 8)
        task = asyncio.create_task(churner()) if churn else None
        try:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                start = time.perf_counter()
                await device.read_blocks(8 * (i % 512), 8)
                latencies.append(time.perf_counter() - start)
                i += 1
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    latencies.sort()
    return {"reads": len(latencies), "logins": logins, "median_ms": statistics.median(latencies) * 1e3,
            "p999_ms": latencies[int(len(latencies) * 0.999)] * 1e3, "max_ms": latencies[-1] * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase (8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", choices=("shoal", "tgtd"), help="targets to run (default both)")
    args = parser.parse_args(argv)
    which = args.only or ["shoal", "tgtd"]
    results: dict[tuple[str, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-churn-") as tmp, contextlib.ExitStack() as stack:
        urls = {}
        if "shoal" in which:
            urls["shoal"] = stack.enter_context(running_shoal_target(Path(tmp) / "shoal",
                                                                     luns=[("disk0", 64 << 20)])).url(0)
        if "tgtd" in which:
            urls["tgtd"] = stack.enter_context(running_tgtd(Path(tmp) / "tgtd", luns=[("disk0", 64 << 20)])).url(1)
        for round_no in range(args.rounds):
            for name, url in urls.items():
                for churn in (False, True):
                    result = asyncio.run(_phase(url, args.seconds, churn))
                    results.setdefault((name, churn), []).append(result)
                    print(f"round {round_no + 1} {name:<5} {'churn' if churn else 'alone':<5} "
                          f"{result['reads']:>7} reads  median {result['median_ms']:.3f} ms  "
                          f"p99.9 {result['p999_ms']:.2f} ms  max {result['max_ms']:.2f} ms  "
                          f"({result['logins']} logins)", flush=True)
    print("\nmedians over the rounds (ms):        median   p99.9     max")
    for (name, churn), runs in results.items():
        figures = [statistics.median(r[key] for r in runs) for key in ("median_ms", "p999_ms", "max_ms")]
        print(f"  {name:<5} {'with logins/logouts' if churn else 'alone':<22} "
              + "  ".join(f"{f:7.3f}" for f in figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
