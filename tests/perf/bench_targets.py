"""Side-by-side benchmark of ``shoal target`` and tuned tgtd (issue 2, "Performance").

Both targets serve an equal backing store (a 1 GiB file on the same file
system, prefilled so that reads hit real data and flushed before measuring) on
127.0.0.1, and QEMU's libiscsi driver drives them with ``qemu-img bench -f raw
-t none``: 4 KiB at queue depth 32 and 1 MiB at depth 8, read and write. Each
row gets a warm-up per target (which also calibrates the request count so a
run lasts about ``--seconds``), then ``--runs`` alternating runs (shoal, tgtd,
shoal, tgtd, ...). Reported per target: median IOPS and MB/s, the target's
CPU time per I/O (utime+stime of the target's processes from
``/proc/PID/stat``, before/after, divided by the request count) and
qemu-img's own CPU per I/O (to see when the initiator is the limit). The
Shoal/tgtd ratio is of median IOPS.

Run: ``.venv/bin/python tests/perf/bench_targets.py [--quick] [--only shoal|tgtd]``.
Writes ``tests/perf/results/latest.json``. See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.tgtd import TUNED_PARAMS, running_tgtd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TARGETS = ("shoal", "tgtd")
DISTURBED_CORES = 0.15  # median CPU busy outside target and qemu-img above which a row is marked disturbed


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    depth: int
    write: bool
    warmup_count: int  # requests of the warm-up run, which also measures the rate

    @property
    def label(self) -> str:
        unit = f"{self.size // MiB} MiB" if self.size >= MiB else f"{self.size // KiB} KiB"
        return f"{unit} {'write' if self.write else 'read'} QD{self.depth}"


WORKLOADS = (
    Workload("4k-read", 4 * KiB, 32, False, 30000),
    Workload("4k-write", 4 * KiB, 32, True, 30000),
    Workload("1m-read", 1 * MiB, 8, False, 2000),
    Workload("1m-write", 1 * MiB, 8, True, 2000),
)


@dataclass
class Run:
    count: int
    seconds: float
    iops: float
    mb_per_s: float  # 10**6 bytes per second
    target_cpu_us_per_io: float
    client_cpu_us_per_io: float
    other_cpu_cores: float  # CPU busy outside target and qemu-img during the run, in cores: interference


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(run, key) for run in self.runs)

    def summary(self) -> dict:
        keys = ("iops", "mb_per_s", "target_cpu_us_per_io", "client_cpu_us_per_io", "other_cpu_cores")
        return {"median": {k: round(self.median(k), 2) for k in keys},
                "runs": [asdict(run) for run in self.runs]}


# ---------------------------------------------------------------- measuring


def process_tree_cpu_seconds(pid: int) -> float:
    """utime+stime (all threads) of ``pid`` and its live descendants, plus what they reaped (cutime+cstime)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{entry}/stat").read_text()
                fields = raw.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces
                stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(stats[p][1] for p in tree if p in stats) / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time all CPUs spent busy since boot (/proc/stat: user nice system irq softirq steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(limit: float) -> None:
    """Wait (up to ``limit`` seconds) until the machine is idle: under DISTURBED_CORES busy over 0.5 s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = system_busy_seconds()
        time.sleep(0.5)
        if (system_busy_seconds() - before) / 0.5 < DISTURBED_CORES:
            return


def run_qemu_img_bench(url: str, wl: Workload, count: int, target_pid: int, extra_env=None) -> Run:
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(wl.depth),
            "-s", str(wl.size)] + (["-w"] if wl.write else []) + [url]
    cpu_before = process_tree_cpu_seconds(target_pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, wall_before = system_busy_seconds(), time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **(extra_env or {})))
    busy_after, wall_after = system_busy_seconds(), time.monotonic()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = process_tree_cpu_seconds(target_pid)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    match = re.search(r"Run completed in ([0-9.]+) seconds", result.stdout)
    if not match:
        raise RuntimeError(f"cannot parse qemu-img bench output:\n{result.stdout}")
    seconds = float(match.group(1))
    target_cpu = cpu_after - cpu_before
    client_cpu = (children_after.ru_utime + children_after.ru_stime
                  - children_before.ru_utime - children_before.ru_stime)
    other = max(0.0, busy_after - busy_before - target_cpu - client_cpu) / (wall_after - wall_before)
    return Run(count=count, seconds=seconds, iops=count / seconds, mb_per_s=count * wl.size / seconds / 1e6,
               target_cpu_us_per_io=target_cpu / count * 1e6, client_cpu_us_per_io=client_cpu / count * 1e6,
               other_cpu_cores=round(other, 3))


def negotiated_keys(url: str) -> dict[str, str]:
    """The login's operational keys as the target answered them (RFC 7143 §13), from libiscsi's debug log."""
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "1", "-d", "1", "-s", "4096", url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, LIBISCSI_DEBUG="6"))
    return dict(re.findall(r"TargetLoginReply: (\w+)=(\S+)", result.stderr))


def request_count(wl: Workload, rates: list[float], seconds: float) -> int:
    """Requests for a run of about ``seconds`` at the geometric mean of the targets' warm-up rates."""
    rate = math.exp(sum(math.log(r) for r in rates) / len(rates))
    count = max(wl.depth * 8, round(rate * seconds / wl.depth) * wl.depth)
    return int(count)


# ---------------------------------------------------------------- set-up


def prefill(path: Path, size: int) -> None:
    """Create ``path`` sparse, then write real (non-zero) data over all of it and flush it to disk."""
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, size, MiB):
            os.pwrite(fd, chunk[: min(MiB, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def started_targets(workdir: Path, which: tuple[str, ...], size: int):
    """Yield {name: (url, pid)} for the requested targets, each on its own prefilled file."""
    with contextlib.ExitStack() as stack:
        targets = {}
        for name in which:
            backing = workdir / f"{name}.img"
            prefill(backing, size)
            if name == "tgtd":
                tgtd = stack.enter_context(running_tgtd(workdir / "tgtd", luns=[(str(backing), size)],
                                                        tuned=True))
                targets[name] = (tgtd.url(1), tgtd.pid)
            else:
                from tests.support.shoal_target import running_shoal_target
                shoal = stack.enter_context(running_shoal_target(workdir / "shoal", luns=[(str(backing), None)]))
                targets[name] = (shoal.url(0), shoal.pid)
        yield targets


# ---------------------------------------------------------------- reporting


def fmt_side(side: dict | None) -> str:
    if side is None:
        return f"{'-':>9} {'-':>8} {'-':>7} {'-':>7}"
    m = side["median"]
    return (f"{m['iops']:>9.0f} {m['mb_per_s']:>8.0f} {m['target_cpu_us_per_io']:>7.1f} "
            f"{m['client_cpu_us_per_io']:>7.1f}")


def print_table(rows: list[dict]) -> None:
    head = f"{'IOPS':>9} {'MB/s':>8} {'tgt µs':>7} {'cli µs':>7}"
    print()
    print(f"{'workload':<20} | {'shoal':^34} | {'tgtd':^34} | shoal/tgtd")
    print(f"{'':<20} | {head} | {head} | {'IOPS':>5} {'CPU/io':>6}")
    print("-" * 112)
    for row in rows:
        ratio = f"{row['ratio_iops']:>5.2f}" if row.get("ratio_iops") else f"{'-':>5}"
        cpu_ratio = f"{row['ratio_cpu_per_io']:>6.2f}" if row.get("ratio_cpu_per_io") else f"{'-':>6}"
        label = row["label"] + (" !" if row["disturbed"] else "")
        print(f"{label:<20} | {fmt_side(row.get('shoal'))} | {fmt_side(row.get('tgtd'))} | "
              f"{ratio} {cpu_ratio}")
    print("MB/s = 10^6 bytes/s; tgt µs / cli µs = CPU time of the target / of qemu-img per I/O;")
    print("shoal/tgtd: ratio of median IOPS (>1: Shoal faster) and of target CPU per I/O (<1: Shoal cheaper).")


# ---------------------------------------------------------------- main


def benchmark(args) -> dict:
    which = tuple(t for t in TARGETS if args.only in (None, t))
    workloads = [wl for wl in WORKLOADS if not args.workload or wl.name in args.workload]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-", dir=args.dir) as tmp, \
            started_targets(Path(tmp), which, args.size) as targets:
        negotiated = {name: negotiated_keys(url) for name, (url, _) in targets.items()}
        for name, keys in negotiated.items():
            print(f"{name}: negotiated " + ", ".join(f"{k}={keys.get(k, '?')}" for k in (
                "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "InitialR2T",
                "ImmediateData", "MaxOutstandingR2T")), flush=True)
        for wl in workloads:
            warm = {name: run_qemu_img_bench(url, wl, wl.warmup_count, pid)
                    for name, (url, pid) in targets.items()}
            count = request_count(wl, [w.iops for w in warm.values()], args.seconds)
            sides = {name: Side() for name in targets}
            for round_no in range(args.runs):
                for name, (url, pid) in targets.items():
                    wait_quiet(args.wait_quiet)
                    run = run_qemu_img_bench(url, wl, count, pid)
                    sides[name].runs.append(run)
                    print(f"  {wl.label:<18} run {round_no + 1}/{args.runs} {name:<5} {run.iops:>9.0f} IOPS "
                          f"{run.mb_per_s:>7.0f} MB/s {run.target_cpu_us_per_io:>6.1f} µs/io target "
                          f"({run.seconds:.2f} s, others {run.other_cpu_cores:.2f} cores)", flush=True)
            row = {"workload": wl.name, "label": wl.label, "size": wl.size, "depth": wl.depth,
                   "write": wl.write, "count": count,
                   "warmup": {name: asdict(w) for name, w in warm.items()}}
            row.update({name: side.summary() for name, side in sides.items()})
            if len(sides) == 2:
                row["ratio_iops"] = round(sides["shoal"].median("iops") / sides["tgtd"].median("iops"), 3)
                tgtd_cpu = sides["tgtd"].median("target_cpu_us_per_io")
                if tgtd_cpu > 0:
                    row["ratio_cpu_per_io"] = round(sides["shoal"].median("target_cpu_us_per_io") / tgtd_cpu, 3)
            others = [run.other_cpu_cores for side in sides.values() for run in side.runs]
            row["other_cpu_cores_median"] = round(statistics.median(others), 3)
            row["disturbed"] = row["other_cpu_cores_median"] > DISTURBED_CORES
            rows.append(row)
    print_table(rows)
    disturbed = [row["label"] for row in rows if row["disturbed"]]
    if disturbed:
        print(f"WARNING (rows marked !): other processes kept more than {DISTURBED_CORES} of this machine's "
              f"{os.cpu_count()} CPUs busy during {', '.join(disturbed)}; rerun on a quiet machine.")
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "qemu_img": _version(["qemu-img", "--version"]), "tgtd": _version(["tgtd", "-V"])},
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
        "config": {"backing_size": args.size, "runs": args.runs, "seconds_per_run": args.seconds,
                   "wait_quiet": args.wait_quiet,
                   "tgtd_params": TUNED_PARAMS, "qemu_img_bench": "-f raw -t none", "targets": list(which)},
        "negotiated": negotiated,
        "rows": rows,
    }


def _version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run of ~1 s per target and row, 256 MiB store")
    p.add_argument("--only", choices=TARGETS, help="measure one target alone")
    p.add_argument("--workload", action="append", choices=[wl.name for wl in WORKLOADS],
                   help="limit to these rows (repeatable)")
    p.add_argument("--runs", type=int, default=3, help="alternating measured runs per target and row (3)")
    p.add_argument("--seconds", type=float, default=4.0, help="aimed length of one run (4)")
    p.add_argument("--size", type=int, default=GiB, help="backing store bytes per target (1 GiB)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to go idle (0)")
    p.add_argument("--dir", help="where the backing files go (default: the system temp dir)")
    p.add_argument("--output", type=Path, help="JSON results file (results/latest.json; --quick: results/quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.size = 1, 1.0, min(args.size, 256 * MiB)
    args.output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = benchmark(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
