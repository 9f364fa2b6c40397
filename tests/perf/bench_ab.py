"""A/B runs of ``shoal target`` from several source trees: target CPU per I/O in alternating runs.

For finding and checking changes of the target's own cost on a shared machine,
where raw IOPS are noise: each tree (this checkout, or a ``git worktree`` of an
older commit) runs its own ``shoal target`` on the same prefilled file (in the
page cache), and ``qemu-img bench -f raw -t none`` runs against them in turn
(A, B, C, A, B, C, ...), after one warm-up run each.  Per tree it prints the
medians of the target's CPU per I/O (utime+stime of the target process from
``/proc/PID/stat``, all its threads) and of IOPS.  CPU per I/O is the figure to
compare: it stays meaningful when the client or other load limits the rate.

Each tree's target is ``python -P -m node_agent.cli target`` with ``PYTHONPATH``
set to that tree (``-P``: the working directory is not put on ``sys.path``), so
the interpreter and installed packages are the same for all.

``--workload hd-4k-read`` / ``hd-4k-write``: qemu-img with a header digest (CRC32C).
``--workload hdd-4k-read`` / ``hdd-4k-write``: header and data digests instead.  libiscsi has no
data digest, so each run is a pair of ``digest_client.py`` runs of ``--seconds`` (Shoal's initiator,
from the same tree as the target), digests off then on; per tree it prints the medians of both
sides and of the on/off IOPS ratio of each pair (issue 7: within 15 %).

Run: ``.venv/bin/python tests/perf/bench_ab.py --tree new=. --tree old=/tmp/wt-3f33269
[--workload 4k-read] [--runs 5] [--count 40000] [--env old:SHOAL_EVENT_LOOP=asyncio]``.
"""

from __future__ import annotations

import argparse
import contextlib
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

WORKLOADS = {"4k-read": (4096, 32, False, 40000), "4k-write": (4096, 32, True, 40000),
             "1m-read": (1 << 20, 8, False, 3000), "1m-write": (1 << 20, 8, True, 2000),
             "hd-4k-read": (4096, 32, False, 40000), "hd-4k-write": (4096, 32, True, 40000)}
DIGEST_WORKLOADS = {"hdd-4k-read": False, "hdd-4k-write": True}  # name -> write


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def one_run(url: str, pid: int, workload: str, count: int) -> tuple[float, float, float]:
    """(IOPS, target µs CPU per I/O, of which system) of one ``qemu-img bench`` run."""
    size, depth, write, _ = WORKLOADS[workload]
    args = ["qemu-img", "bench", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size)]
    if workload.startswith("hd-"):  # QEMU asks for HeaderDigest=CRC32C (as bench_targets.py's HD rows)
        portal, iqn, lun = url.removeprefix("iscsi://").split("/")
        url = f"driver=iscsi,transport=tcp,portal={portal},target={iqn},lun={lun},header-digest=crc32c"
        args.append("--image-opts")
    else:
        args += ["-f", "raw"]
    if write:
        args += ["-w", "--pattern", "0x5a"]
    cpu0, start = cpu_seconds(pid), time.perf_counter()
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(out.stdout + out.stderr)
    user, system = (b - a for a, b in zip(cpu0, cpu_seconds(pid)))
    for line in out.stdout.splitlines():
        if line.startswith("Run completed in"):
            elapsed = float(line.split()[3])
    return count / elapsed, (user + system) / count * 1e6, system / count * 1e6


def digest_pair(tree: str, url: str, pid: int, write: bool, seconds: float) -> tuple[float, ...]:
    """(IOPS off, IOPS on, target µs CPU per I/O off, on) of ``digest_client.py`` from ``tree``,
    header and data digests off, then on."""
    out = []
    for digests in (False, True):
        command = [sys.executable, str(Path(tree).resolve() / "tests/perf/digest_client.py"), url,
                   "--seconds", str(seconds)] + (["--digests"] if digests else []) + (["--write"] if write else [])
        cpu0 = sum(cpu_seconds(pid))
        run = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
        if run.returncode:
            raise RuntimeError(run.stdout + run.stderr)
        result = json.loads(run.stdout)
        out.append((result["count"] / result["seconds"], (sum(cpu_seconds(pid)) - cpu0) / result["count"] * 1e6))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def prefill(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, 1 << 20):
            os.pwrite(fd, chunk, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS) + sorted(DIGEST_WORKLOADS))
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one digest run (3)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=0, help="requests per run (default: per workload)")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--env", action="append", default=[], help="NAME:VAR=VALUE for one tree's target")
    parser.add_argument("--extra", action="append", default=[], help="NAME:ARG, an extra target argument")
    args = parser.parse_args(argv)
    trees = dict(item.split("=", 1) for item in args.tree)
    envs: dict[str, list[str]] = {name: [] for name in trees}
    for item in args.env:
        name, assignment = item.split(":", 1)
        envs[name].append(assignment)
    extras: dict[str, list[str]] = {name: [] for name in trees}
    for item in args.extra:
        name, arg = item.split(":", 1)
        extras[name].append(arg)
    workloads = args.workload or ["4k-read", "4k-write"]
    with tempfile.TemporaryDirectory(prefix="shoal-ab-") as tmp, contextlib.ExitStack() as stack:
        backing = Path(tmp) / "disk.img"
        prefill(backing, args.size_mib << 20)
        targets = {}
        for name, path in trees.items():
            command = ["env", f"PYTHONPATH={Path(path).resolve()}", *envs[name], sys.executable, "-P",
                       "-m", "node_agent.cli"]
            target = stack.enter_context(running_shoal_target(Path(tmp) / name, luns=[(str(backing), None)],
                                                              command=command, extra_args=extras[name]))
            targets[name] = target
        for workload in workloads:
            if workload in DIGEST_WORKLOADS:
                digest_rows(workload, trees, targets, args.runs, args.seconds)
                continue
            count = args.count or WORKLOADS[workload][3]
            results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            for name, target in targets.items():
                one_run(target.url(0), target.pid, workload, count // 4)  # warm-up
            for _ in range(args.runs):
                for name, target in targets.items():
                    results[name].append(one_run(target.url(0), target.pid, workload, count))
            print(f"{workload} (count {count}, {args.runs} alternating runs)")
            for name, runs in results.items():
                iops = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                system = statistics.median(r[2] for r in runs)
                each = " ".join(f"{r[1]:.1f}" for r in runs)
                rates = " ".join(f"{r[0]:.0f}" for r in runs)
                print(f"  {name:>12}: {cpu:6.2f} µs CPU/IO (system {system:5.2f})  {iops:9.0f} IOPS   (runs: {each};"
                      f" IOPS: {rates})", flush=True)
    return 0


def digest_rows(workload: str, trees: dict[str, str], targets: dict, runs: int, seconds: float) -> None:
    write = DIGEST_WORKLOADS[workload]
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in trees}
    for name, target in targets.items():
        digest_pair(trees[name], target.url(0), target.pid, write, seconds / 3)  # warm-up
    for _ in range(runs):
        for name, target in targets.items():
            results[name].append(digest_pair(trees[name], target.url(0), target.pid, write, seconds))
    print(f"{workload} (digests off, on: {seconds:g} s each, {runs} alternating pairs)")
    for name, pairs in results.items():
        off, on, cpu_off, cpu_on = (statistics.median(p[i] for p in pairs) for i in range(4))
        ratios = " ".join(f"{p[1] / p[0]:.3f}" for p in pairs)
        print(f"  {name:>12}: on/off {statistics.median(p[1] / p[0] for p in pairs):.3f}  {off:9.0f} -> {on:9.0f} IOPS"
              f"  target {cpu_off:5.2f} -> {cpu_on:5.2f} µs CPU/IO   (pairs: {ratios})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
