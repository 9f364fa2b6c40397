"""Several event loops: two client processes' aggregate with ``shoal target --loops 1`` vs ``--loops 2``.

Issue 7 asks whether the target can use both cores when clients are elsewhere.
This starts one ``shoal target`` per loop count on the same 1 GiB file (filled,
fsynced, read once so it sits in the page cache), then runs two
``qemu-img bench`` processes at once (each its own session) against it, in
alternating runs (loops 1, loops 2, loops 1, ...), and prints per loop count
the medians of the aggregate IOPS and of the target's CPU per I/O
(``/proc/PID/stat`` utime+stime of all its threads).  Client and target share
this machine's cores, so the figures say what the loops change on one host;
run it on an idle machine.

Run: ``.venv/bin/python tests/perf/bench_loops.py [--workload 4k-read] [--runs 3] [--loops 1 --loops 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.shoal_target import running_shoal_target  # noqa: E402

SIZES = {"4k-read": (4096, 32, False), "4k-write": (4096, 32, True), "1m-read": (1 << 20, 8, False),
         "1m-write": (1 << 20, 8, True)}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(url: str, pid: int, size: int, depth: int, write: bool, count: int, clients: int) -> dict:
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size)]
    if write:
        args += ["-w", "--pattern", "0x5a"]
    cpu0, start = cpu_seconds(pid), time.perf_counter()
    procs = [subprocess.Popen(args + ["-o", str(i * (256 << 20)), url], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(clients)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(out)
    elapsed = time.perf_counter() - start
    total = count * clients
    return {"iops": total / elapsed, "target_cpu_us_per_io": (cpu_seconds(pid) - cpu0) / total * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="4k-read", choices=sorted(SIZES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loops", type=int, action="append")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--count", type=int, default=0, help="requests per client and run (default by size)")
    args = parser.parse_args(argv)
    loop_counts = args.loops or [1, 2]
    size, depth, write = SIZES[args.workload]
    count = args.count or (100000 if size == 4096 else 3000)
    with tempfile.TemporaryDirectory(prefix="shoal-loops-") as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as handle:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        results: dict[int, list[dict]] = {n: [] for n in loop_counts}
        import contextlib
        with contextlib.ExitStack() as stack:
            targets = {n: stack.enter_context(running_shoal_target(Path(tmp) / f"t{n}", luns=((str(image), 0),),
                                                                   extra_args=["--loops", str(n)]))
                       for n in loop_counts}
            for run in range(args.runs + 1):  # the first round warms up
                for n, target in targets.items():
                    measured = one_run(target.url(), target.pid, size, depth, write, count, args.clients)
                    if run:
                        results[n].append(measured)
                        print(f"loops {n}: {measured['iops']:9.0f} IOPS  {measured['target_cpu_us_per_io']:6.2f} "
                              f"target µs/IO", flush=True)
    summary = {n: {"iops": statistics.median(r["iops"] for r in runs),
                   "target_cpu_us_per_io": statistics.median(r["target_cpu_us_per_io"] for r in runs)}
               for n, runs in results.items()}
    print(json.dumps({"workload": args.workload, "clients": args.clients, "loadavg": os.getloadavg(),
                      "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
