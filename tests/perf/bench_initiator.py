"""Shoal's initiator (`shoal iscsi bench`) beside `qemu-img bench`, against shoal target and tgtd.

Run: ``.venv/bin/python tests/perf/bench_initiator.py [--seconds 4] [--runs 3] [--target shoal]
[--workload 4k-read]``.  Both targets serve a 1 GiB file filled with real data first
(``bench_targets.prefill``): on a sparse LUN QEMU's iSCSI driver asks GET LBA STATUS
and fills unallocated ranges with zeros without reading them, which made earlier
1 MiB read "results" of 7-12 GB/s.  Per target and workload it runs one short warm-up pair,
then ``--runs`` alternating pairs (Shoal's initiator, then qemu-img, on the same
target and LUN), and prints the medians: IOPS and MB/s of each client, their
ratio (Shoal / qemu-img; the goal is >= 0.8), and each client's CPU per I/O.

CPU per I/O is the steadier figure on a shared machine, where IOPS follow the
load: for Shoal it is the CPU time of the benchmark loop itself (``shoal iscsi
bench`` reports ``time.process_time`` around its I/O, which leaves out the
interpreter's start-up and the login); for qemu-img it is the process's
utime + stime (``os.wait4``) minus what a one-I/O run of qemu-img costs on the
same target (start-up and login), divided by the I/Os.  qemu-img's IOPS are
likewise its I/Os over its wall time minus the one-I/O run's.  Results go to
tests/perf/results/initiator.json.
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

from tests.perf.bench_targets import prefill  # noqa: E402
from tests.support.shoal_target import running_shoal_target  # noqa: E402
from tests.support.tgtd import running_tgtd  # noqa: E402

LUN_SIZE = 1 << 30
WORKLOADS = {"4k-read": ("4 KiB read QD32", 4096, 32, False), "4k-write": ("4 KiB write QD32", 4096, 32, True),
             "1m-read": ("1 MiB read QD8", 1 << 20, 8, False), "1m-write": ("1 MiB write QD8", 1 << 20, 8, True)}


def shoal_bench(url: str, size: int, depth: int, write: bool, seconds: float) -> tuple[float, float]:
    """(IOPS, CPU µs per I/O) of one ``shoal iscsi bench`` run."""
    args = [sys.executable, "-m", "node_agent.cli", "iscsi", "bench", url, "--size", str(size), "--depth",
            str(depth), "--seconds", str(seconds), "--sequential", "-o", "json"] + (["--write"] if write else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO, timeout=seconds * 10 + 60)
    result = json.loads(out.stdout)
    return result["iops"], result["initiator_cpu_us_per_io"]


def _qemu_run(url: str, size: int, depth: int, write: bool, count: int, timeout: float) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``qemu-img bench`` process."""
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size)]
    args += (["-w"] if write else []) + [url]
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()
        process.wait()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"qemu-img bench failed ({process.returncode}): {process.stderr.read().decode()}")
    process.stderr.close()
    if wall > timeout:
        raise TimeoutError(f"qemu-img bench took {wall:.0f}s")
    return wall, usage.ru_utime + usage.ru_stime


def qemu_bench(url: str, size: int, depth: int, write: bool, seconds: float, rate_hint: float,
               fixed: tuple[float, float]) -> tuple[float, float]:
    """(IOPS, CPU µs per I/O) of one ``qemu-img bench`` run of about ``seconds``, start-up and login taken out."""
    count = max(1000, int(rate_hint * seconds))
    wall, cpu = _qemu_run(url, size, depth, write, count, seconds * 20 + 60)
    return count / max(wall - fixed[0], 1e-3), max(cpu - fixed[1], 0.0) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", action="append", choices=("shoal", "tgtd"),
                        help="only these targets (repeatable; default both)")
    parser.add_argument("--workload", action="append", choices=tuple(WORKLOADS),
                        help="only these rows (repeatable; default all)")
    args = parser.parse_args()
    targets = args.target or ["shoal", "tgtd"]
    workloads = args.workload or list(WORKLOADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("s.img", "t.img"):
            prefill(tmp / name, LUN_SIZE)
        with running_shoal_target(tmp / "s", luns=((str(tmp / "s.img"), None),)) as shoal, \
                running_tgtd(tmp / "t", luns=((str(tmp / "t.img"), LUN_SIZE),)) as tgtd:
            urls = {"shoal": ("shoal target", shoal.url(0)), "tgtd": ("tgtd", tgtd.url(1))}
            for key in targets:
                name, target = urls[key]
                for workload in workloads:
                    label, size, depth, write = WORKLOADS[workload]
                    fixed = _qemu_run(target, size, 1, write, 1, 60)  # qemu-img's start-up and login
                    rate = shoal_bench(target, size, depth, write, min(1.0, args.seconds))[0]  # warm-up pair
                    qemu_bench(target, size, depth, write, min(1.0, args.seconds), rate, fixed)
                    ours, theirs = [], []
                    for _ in range(args.runs):
                        ours.append(shoal_bench(target, size, depth, write, args.seconds))
                        theirs.append(qemu_bench(target, size, depth, write, args.seconds, ours[-1][0], fixed))
                    row = {"target": name, "workload": label,
                           "shoal_iops": statistics.median(r[0] for r in ours),
                           "qemu_iops": round(statistics.median(r[0] for r in theirs)),
                           "shoal_cpu_us_per_io": round(statistics.median(r[1] for r in ours), 1),
                           "qemu_cpu_us_per_io": round(statistics.median(r[1] for r in theirs), 1),
                           "runs": {"shoal": ours, "qemu": [(round(i), round(c, 1)) for i, c in theirs]}}
                    row["ratio"] = round(row["shoal_iops"] / row["qemu_iops"], 2)
                    row["shoal_mb_s"] = round(row["shoal_iops"] * size / 1e6, 1)
                    row["qemu_mb_s"] = round(row["qemu_iops"] * size / 1e6, 1)
                    rows.append(row)
                    print(f"{name:<13} {label:<17} shoal iscsi bench {row['shoal_iops']:>8.0f} IOPS "
                          f"{row['shoal_mb_s']:>7.1f} MB/s {row['shoal_cpu_us_per_io']:>7.1f} µs CPU/IO | "
                          f"qemu-img bench {row['qemu_iops']:>8.0f} IOPS {row['qemu_mb_s']:>7.1f} MB/s "
                          f"{row['qemu_cpu_us_per_io']:>7.1f} µs CPU/IO | ratio {row['ratio']:.2f}", flush=True)
    out = REPO / "tests" / "perf" / "results" / "initiator.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": args.seconds,
                               "runs_per_row": args.runs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
