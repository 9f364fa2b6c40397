"""Using both cores: two client processes' aggregate with one target process, two loops, two workers.

Issue 7 asks that the target can use both cores when clients are elsewhere,
shown with two client processes whose aggregate rises with a second loop or
process.  This starts ``shoal target`` serving two targets (one LUN each, on
its own 512 MiB file, filled, fsynced and read once so it sits in the page
cache) three ways — one process and one loop (``--workers 1``, the default),
one process with two event loops (``--loops 2``), two worker processes
(``--workers 2``: each target served by its own process) — and runs two
``qemu-img bench`` processes at once, one per target, in alternating runs
(each configuration once per round; a first round warms up).  It prints per
configuration the medians of the aggregate IOPS and of the target's CPU per
I/O (``/proc`` utime+stime of the target's whole process tree), the clients' CPU
per I/O, and how many cores the target kept busy (its CPU time over the run's).

Client and target share this machine's cores: with both clients on the same
two cores, what a second process can add to the aggregate is bounded by what
the clients leave free; ``target busy`` shows whether the target itself gets
past the one core a process is held to by the GIL.  Run it on an idle machine.

Run: ``.venv/bin/python tests/perf/bench_workers.py [--workload 4k-read] [--runs 3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.perf.bench_targets import prefill, process_tree_cpu_seconds  # noqa: E402
from tests.support.shoal_target import running_shoal_target  # noqa: E402

SIZES = {"4k-read": (4096, 32, False), "4k-write": (4096, 32, True), "1m-read": (1 << 20, 8, False),
         "1m-write": (1 << 20, 8, True)}
CONFIGS = {"1 process": [], "2 loops": ["--loops", "2"], "2 workers": ["--workers", "2"]}
IQNS = ("iqn.2026-11.io.shoal.bench:a", "iqn.2026-11.io.shoal.bench:b")
FILE_SIZE = 512 << 20


def one_run(urls: list[str], pid: int, size: int, depth: int, write: bool, count: int) -> dict:
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size)]
    if write:
        args += ["-w", "--pattern", "0x5a"]
    cpu0, start = process_tree_cpu_seconds(pid), time.perf_counter()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [subprocess.Popen(args + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for url in urls]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(out)
    elapsed = time.perf_counter() - start
    target_cpu = process_tree_cpu_seconds(pid) - cpu0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = children.ru_utime + children.ru_stime - children0.ru_utime - children0.ru_stime
    total = count * len(urls)
    return {"iops": total / elapsed, "mb_per_s": total * size / elapsed / 1e6,
            "target_cpu_us_per_io": target_cpu / total * 1e6, "client_cpu_us_per_io": client_cpu / total * 1e6,
            "target_cores": target_cpu / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="4k-read", choices=sorted(SIZES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS),
                        help="configurations to compare (default: all three)")
    parser.add_argument("--count", type=int, default=0, help="requests per client and run (default by size)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    configs = args.config or list(CONFIGS)
    size, depth, write = SIZES[args.workload]
    count = args.count or (100000 if size == 4096 else 3000)
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="shoal-workers-") as tmp, contextlib.ExitStack() as stack:
        images = [Path(tmp) / f"disk{i}.img" for i in range(2)]
        for image in images:
            prefill(image, FILE_SIZE)
            with open(image, "rb") as handle:  # into the page cache
                while handle.read(1 << 20):
                    pass
        targets = {}
        for name in configs:
            extra = CONFIGS[name] + ["--iqn", IQNS[1], "--lun", str(images[1])]
            targets[name] = stack.enter_context(running_shoal_target(
                Path(tmp) / name.replace(" ", "-"), luns=((str(images[0]), 0),), iqn=IQNS[0], extra_args=extra))
        for run in range(args.runs + 1):  # the first round warms up
            for name, target in targets.items():
                urls = [target.url(0), target.url(0).replace(IQNS[0], IQNS[1])]
                measured = one_run(urls, target.pid, size, depth, write, count)
                if run:
                    results[name].append(measured)
                    print(f"{name:10s} {measured['iops']:9.0f} IOPS {measured['mb_per_s']:8.0f} MB/s "
                          f"{measured['target_cpu_us_per_io']:7.2f} target µs/IO "
                          f"{measured['client_cpu_us_per_io']:7.2f} client µs/IO "
                          f"target busy {measured['target_cores']:.2f} cores", flush=True)
    medians = {name: {key: round(statistics.median(r[key] for r in runs), 2)
                      for key in ("iops", "mb_per_s", "target_cpu_us_per_io", "client_cpu_us_per_io",
                                  "target_cores")} for name, runs in results.items()}
    base = medians.get("1 process")
    report = {"workload": args.workload, "clients": 2, "runs": args.runs, "loadavg": os.getloadavg(),
              "medians": medians,
              "aggregate_vs_1_process": {name: round(m["iops"] / base["iops"], 3) for name, m in medians.items()}
              if base else {}, "results": results}
    print(json.dumps({k: report[k] for k in ("workload", "loadavg", "medians", "aggregate_vs_1_process")},
                     indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
