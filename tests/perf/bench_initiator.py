"""Shoal's initiator (`shoal iscsi bench`) beside `qemu-img bench`, against shoal target and tgtd.

Run: ``.venv/bin/python tests/perf/bench_initiator.py [--seconds 4]``. Prints, per
target and workload, the IOPS and MB/s each client reaches and their ratio
(Shoal's initiator / qemu-img), from alternating runs in the same session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.shoal_target import running_shoal_target  # noqa: E402
from tests.support.tgtd import running_tgtd  # noqa: E402

WORKLOADS = [("4 KiB read QD32", 4096, 32, False), ("4 KiB write QD32", 4096, 32, True),
             ("1 MiB read QD8", 1 << 20, 8, False), ("1 MiB write QD8", 1 << 20, 8, True)]


def shoal_bench(url: str, size: int, depth: int, write: bool, seconds: float) -> float:
    args = [sys.executable, "-m", "node_agent.cli", "iscsi", "bench", url, "--size", str(size), "--depth",
            str(depth), "--seconds", str(seconds), "--sequential", "-o", "json"] + (["--write"] if write else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO, timeout=seconds * 10 + 60)
    return json.loads(out.stdout)["iops"]


def qemu_bench(url: str, size: int, depth: int, write: bool, seconds: float, rate_hint: float) -> float:
    count = max(1000, int(rate_hint * seconds))
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size)]
    args += (["-w"] if write else []) + [url]
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, check=True, timeout=seconds * 20 + 60)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with running_shoal_target(tmp / "s", luns=(("s", 1 << 30),)) as shoal, \
                running_tgtd(tmp / "t", luns=(("t", 1 << 30),)) as tgtd:
            for name, target in (("shoal target", shoal.url(0)), ("tgtd", tgtd.url(1))):
                for label, size, depth, write in WORKLOADS:
                    ours, theirs = [], []
                    for _ in range(args.runs):
                        ours.append(shoal_bench(target, size, depth, write, args.seconds))
                        theirs.append(qemu_bench(target, size, depth, write, args.seconds, ours[-1]))
                    row = {"target": name, "workload": label, "shoal_iops": statistics.median(ours),
                           "qemu_iops": statistics.median(theirs)}
                    row["ratio"] = round(row["shoal_iops"] / row["qemu_iops"], 2)
                    row["shoal_mb_s"] = round(row["shoal_iops"] * size / 1e6, 1)
                    row["qemu_mb_s"] = round(row["qemu_iops"] * size / 1e6, 1)
                    rows.append(row)
                    print(f"{name:<13} {label:<17} shoal iscsi bench {row['shoal_iops']:>8.0f} IOPS "
                          f"{row['shoal_mb_s']:>8.1f} MB/s | qemu-img bench {row['qemu_iops']:>8.0f} IOPS "
                          f"{row['qemu_mb_s']:>8.1f} MB/s | ratio {row['ratio']:.2f}", flush=True)
    out = REPO / "tests" / "perf" / "results" / "initiator.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
