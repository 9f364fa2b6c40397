"""Side-by-side benchmark of ``shoal target``, tuned tgtd and istgt (issue 2 "Performance", issue 7).

All targets serve an equal backing store (a 1 GiB file each on the same file
system, prefilled so that reads hit real data and flushed before measuring) on
127.0.0.1 with the same negotiation limits. Rows:

- ``4k-read`` ``4k-write`` ``1m-read`` ``1m-write``: QEMU's libiscsi driver,
  ``qemu-img bench -f raw -t none``, 4 KiB at queue depth 32 and 1 MiB at
  depth 8 (sequential, wrapping). Each row gets a warm-up per target (which
  also calibrates the request count so a run lasts about ``--seconds``).
- ``perf-4k-randread``: libiscsi's ``iscsi-perf``, random 4 KiB reads, 32 in
  flight, for ``--seconds`` (rounded to whole seconds, its unit).
- ``hd-4k-read`` ``hd-4k-write``: Shoal only, qemu-img (``--image-opts``) with
  ``header-digest=none`` against ``crc32c``: header digests off and on.
- ``hdd-4k-read`` ``hdd-4k-write``: Shoal only, header AND data digests
  (CRC32C) off and on, from Shoal's own initiator (``digest_client.py``):
  libiscsi cannot offer data digests.
- ``tcp-loopback``: the baseline: ``iperf3`` over 127.0.0.1, one stream,
  counted in 1 MiB units so its CPU per "I/O" compares with the 1 MiB rows.

Every row then gets ``--runs`` alternating runs (shoal, tgtd, istgt, shoal,
...). Reported per side: median IOPS and MB/s, the target's CPU time per I/O
(utime+stime of the target's process tree from ``/proc/PID/stat``,
before/after), the client's CPU per I/O, and the target's RSS; per row the
ratios, whether other processes disturbed it, and a one-line verdict against
issue 7's goals (``GOALS`` in bench_report.py, which also draws the tables
and the plot). Results: ``results/latest.json`` (schema 2: the
schema-1 keys are kept), ``results/latest.png`` (grouped bars per row),
``results/latest.md`` (the table for a note or the README), and one line
appended to ``results/history.jsonl`` per full run.

Run: ``.venv/bin/python tests/perf/bench_targets.py [--quick] [--only shoal|tgtd|istgt ...]
[--workload NAME ...]``. See tests/perf/README.md.
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
import shutil
import signal
import socket
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

from tests.perf.bench_report import (  # noqa: E402
    DIGEST_SIDES, DIGEST_TOLERANCE, GOALS, SCHEMA, TARGETS, history_line, markdown_table, plot, print_table, verdict,
)
from tests.support.tgtd import TUNED_PARAMS, running_tgtd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DIGEST_CLIENT = Path(__file__).resolve().parent / "digest_client.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DISTURBED_CORES = 0.15  # median CPU busy outside target and client above which a row is marked disturbed


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    depth: int
    write: bool
    client: str  # qemu-img | iscsi-perf | qemu-img-hd | digest-client | iperf3
    warmup_count: int = 0  # qemu-img rows: requests of the warm-up run, which also measures the rate
    title: str = ""

    @property
    def label(self) -> str:
        if self.client == "iperf3":
            return "TCP loopback 1 stream"
        unit = f"{self.size // MiB} MiB" if self.size >= MiB else f"{self.size // KiB} KiB"
        kind = ("write" if self.write else "read") if self.client != "iscsi-perf" else "randread"
        prefix = {"qemu-img": "", "iscsi-perf": "perf ", "qemu-img-hd": "HD ", "digest-client": "HD+DD "}
        return f"{prefix[self.client]}{unit} {kind} QD{self.depth}"

    @property
    def digest_row(self) -> bool:
        return self.client in ("qemu-img-hd", "digest-client")


WORKLOADS = (
    Workload("4k-read", 4 * KiB, 32, False, "qemu-img", 30000),
    Workload("4k-write", 4 * KiB, 32, True, "qemu-img", 30000),
    Workload("1m-read", 1 * MiB, 8, False, "qemu-img", 2000),
    Workload("1m-write", 1 * MiB, 8, True, "qemu-img", 2000),
    Workload("perf-4k-randread", 4 * KiB, 32, False, "iscsi-perf"),
    Workload("hd-4k-read", 4 * KiB, 32, False, "qemu-img-hd", 30000),
    Workload("hd-4k-write", 4 * KiB, 32, True, "qemu-img-hd", 30000),
    Workload("hdd-4k-read", 4 * KiB, 32, False, "digest-client"),
    Workload("hdd-4k-write", 4 * KiB, 32, True, "digest-client"),
    Workload("tcp-loopback", 1 * MiB, 1, False, "iperf3"),
)


@dataclass
class Run:
    count: int
    seconds: float
    iops: float
    mb_per_s: float  # 10**6 bytes per second
    target_cpu_us_per_io: float
    client_cpu_us_per_io: float
    other_cpu_cores: float  # CPU busy outside target and client during the run, in cores: interference
    target_rss_mib: float = 0.0  # the target's VmRSS right after the run


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(run, key) for run in self.runs)

    def summary(self) -> dict:
        keys = ("iops", "mb_per_s", "target_cpu_us_per_io", "client_cpu_us_per_io", "other_cpu_cores",
                "target_rss_mib")
        return {"median": {k: round(self.median(k), 2) for k in keys},
                "runs": [asdict(run) for run in self.runs]}


@dataclass
class Endpoint:
    """A running target (or the iperf3 server) the clients measure against."""

    url: str
    pid: int
    portal: str = ""
    iqn: str = ""
    lun: int = 0
    block_size: int = 512


# ---------------------------------------------------------------- measuring


def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, utime+stime+cutime+cstime in ticks)} of every process."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{entry}/stat").read_text()
                fields = raw.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces
                stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return stats


def process_tree(pid: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """``pid`` and its live descendants."""
    table = _proc_table() if table is None else table
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier += children
    return {p for p in tree if p in table}


def process_tree_cpu_seconds(pid: int) -> float:
    """utime+stime (all threads) of ``pid`` and its live descendants, plus what they reaped (cutime+cstime)."""
    table = _proc_table()
    return sum(table[p][1] for p in process_tree(pid, table)) / CLK_TCK


def parse_status_memory(text: str) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB from a ``/proc/PID/status`` text; 0 for a missing line (a kernel thread, a zombie)."""
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB$", text, re.MULTILINE))
    return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


def process_tree_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over ``pid``'s process tree, KiB. The sum of peaks bounds the tree's peak."""
    rss = hwm = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            r, h = parse_status_memory(Path(f"/proc/{p}/status").read_text())
            rss, hwm = rss + r, hwm + h
    return rss, hwm


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


# Parsers of the clients' output: each returns (requests, seconds, client CPU µs per request or None).


def parse_qemu_img_bench(stdout: str, count: int) -> tuple[float, float, None]:
    match = re.search(r"Run completed in ([0-9.]+) seconds", stdout)
    if not match:
        raise ValueError(f"cannot parse qemu-img bench output:\n{stdout}")
    return count, float(match.group(1)), None


def parse_iscsi_perf(stdout: str, seconds: float) -> tuple[float, float, None]:
    """iscsi-perf's closing ``iops average N (M MB/s)`` line (M is MiB/s); progress lines end in ``\\r``."""
    matches = re.findall(r"(?:^|\r|\n)iops average (\d+) \((\d+) MB/s\)", stdout)
    if not matches or "finished." not in stdout:
        raise ValueError(f"cannot parse iscsi-perf output (no closing 'iops average'):\n{stdout[-2000:]}")
    iops = int(matches[-1][0])
    return iops * seconds, seconds, None


def parse_iperf3(stdout: str) -> tuple[float, float, None]:
    """``iperf3 -J``: bytes the receiver got and over how long, as 1 MiB 'requests'."""
    try:
        received = json.loads(stdout)["end"]["sum_received"]
        return received["bytes"] / MiB, float(received["seconds"]), None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot parse iperf3 -J output ({exc}):\n{stdout[-2000:]}") from None


def parse_digest_client(stdout: str) -> tuple[float, float, float]:
    result = json.loads(stdout)
    return result["count"], result["seconds"], result["initiator_cpu_us_per_io"]


def measure(argv: list[str], parse, wl: Workload, target_pid: int, timeout: float = 600,
            env: dict | None = None) -> Run:
    """Run one client process against ``target_pid``; CPU of target, client and everything else around it."""
    cpu_before = process_tree_cpu_seconds(target_pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, wall_before = system_busy_seconds(), time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                            env=dict(os.environ, **(env or {})), cwd=REPO)
    busy_after, wall_after = system_busy_seconds(), time.monotonic()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = process_tree_cpu_seconds(target_pid)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    count, seconds, client_us = parse(result.stdout)
    target_cpu = cpu_after - cpu_before
    client_cpu = (children_after.ru_utime + children_after.ru_stime
                  - children_before.ru_utime - children_before.ru_stime)
    other = max(0.0, busy_after - busy_before - target_cpu - client_cpu) / (wall_after - wall_before)
    count = max(count, 1)
    return Run(count=round(count), seconds=round(seconds, 4), iops=count / seconds,
               mb_per_s=count * wl.size / seconds / 1e6,
               target_cpu_us_per_io=target_cpu / count * 1e6,
               client_cpu_us_per_io=client_us if client_us is not None else client_cpu / count * 1e6,
               other_cpu_cores=round(other, 3),
               target_rss_mib=round(process_tree_memory_kib(target_pid)[0] / 1024, 1))


def image_opts(ep: Endpoint, header_digest: str) -> str:
    """``--image-opts`` for QEMU's iscsi driver (QAPI ``BlockdevOptionsIscsi``): how a header digest is asked."""
    return (f"driver=iscsi,transport=tcp,portal={ep.portal},target={ep.iqn},lun={ep.lun},"
            f"header-digest={header_digest}")


def run_side(wl: Workload, ep: Endpoint, side: str, count: int, seconds: float) -> Run:
    """One measured run of ``wl`` on one side (a target, or digests off/on); ``count`` for qemu-img rows."""
    if wl.client in ("qemu-img", "qemu-img-hd"):
        args = ["qemu-img", "bench", "-t", "none", "-c", str(count), "-d", str(wl.depth), "-s", str(wl.size)]
        args += ["-w"] if wl.write else []
        if wl.client == "qemu-img":
            args += ["-f", "raw", ep.url]
        else:
            args += ["--image-opts", image_opts(ep, "crc32c" if side == "on" else "none")]
        return measure(args, lambda out: parse_qemu_img_bench(out, count), wl, ep.pid)
    if wl.client == "iscsi-perf":
        whole = max(1, round(seconds))
        args = ["iscsi-perf", "-m", str(wl.depth), "-b", str(wl.size // ep.block_size), "-r", "-t", str(whole),
                ep.url]
        return measure(args, lambda out: parse_iscsi_perf(out, whole), wl, ep.pid, timeout=whole + 60)
    if wl.client == "digest-client":
        args = [sys.executable, str(DIGEST_CLIENT), ep.url, "--size", str(wl.size), "--depth", str(wl.depth),
                "--seconds", str(seconds)] + (["--write"] if wl.write else []) + (
                ["--digests"] if side == "on" else [])
        return measure(args, parse_digest_client, wl, ep.pid, timeout=seconds + 120)
    if wl.client == "iperf3":
        host, _, port = ep.portal.rpartition(":")
        args = ["iperf3", "-c", host, "-p", port, "-P", "1", "-t", str(max(1, round(seconds))), "-J"]
        return measure(args, parse_iperf3, wl, ep.pid, timeout=seconds + 60)
    raise ValueError(f"unknown client {wl.client!r}")


def negotiated_keys(url: str) -> dict[str, str]:
    """The login's operational keys as the target answered them (RFC 7143 §13), from libiscsi's debug log."""
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "1", "-d", "1", "-s", "4096", url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, LIBISCSI_DEBUG="6"))
    return dict(re.findall(r"TargetLoginReply: (\w+)=(\S+)", result.stderr))


def header_digest_answer(ep: Endpoint) -> str:
    """What the target answered to ``HeaderDigest=CRC32C`` from QEMU (must be CRC32C for the HD rows to count)."""
    args = ["qemu-img", "bench", "-t", "none", "-c", "1", "-d", "1", "-s", "4096", "--image-opts",
            image_opts(ep, "crc32c")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, LIBISCSI_DEBUG="6"))
    keys = dict(re.findall(r"TargetLoginReply: (\w+)=(\S+)", result.stderr))
    return keys.get("HeaderDigest", "?")


def block_size(url: str) -> int:
    """The LUN's logical block size (READ CAPACITY 16), for iscsi-perf's blocks-per-request."""
    result = subprocess.run(["iscsi-readcapacity16", url], capture_output=True, text=True, timeout=60)
    match = re.search(r"LOGICAL BLOCK LENGTH IN BYTES:(\d+)", result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"iscsi-readcapacity16 {url} failed:\n{result.stdout}{result.stderr}")
    return int(match.group(1))


def request_count(wl: Workload, rates: list[float], seconds: float) -> int:
    """Requests for a run of about ``seconds`` at the geometric mean of the sides' warm-up rates."""
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
    """Yield {name: Endpoint} for the requested targets, each on its own prefilled file."""
    with contextlib.ExitStack() as stack:
        targets = {}
        for name in which:
            backing = workdir / f"{name}.img"
            prefill(backing, size)
            if name == "tgtd":
                tgtd = stack.enter_context(running_tgtd(workdir / "tgtd", luns=[(str(backing), size)],
                                                        tuned=True))
                targets[name] = Endpoint(tgtd.url(1), tgtd.pid, tgtd.portal, tgtd.iqn, 1)
            elif name == "istgt":
                from tests.support.istgt import running_istgt
                istgt = stack.enter_context(running_istgt(workdir / "istgt", luns=[(str(backing), size)]))
                targets[name] = Endpoint(istgt.url(0), istgt.pid, istgt.portal, istgt.iqn, 0)
            else:
                from tests.support.shoal_target import running_shoal_target
                shoal = stack.enter_context(running_shoal_target(workdir / "shoal", luns=[(str(backing), None)]))
                targets[name] = Endpoint(shoal.url(0), shoal.pid, shoal.portal, shoal.iqn, 0)
        for endpoint in targets.values():
            endpoint.block_size = block_size(endpoint.url)
        yield targets


@contextlib.contextmanager
def running_iperf3_server(host: str = "127.0.0.1", timeout: float = 10.0):
    """``iperf3 -s`` on a free port of ``host``; yields an Endpoint; stopped by PID (SIGTERM, then SIGKILL)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(["iperf3", "-s", "-B", host, "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"iperf3 -s exited with {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                break  # iperf3 takes a bare connect-and-close as an aborted test and keeps serving
            if time.monotonic() > deadline:
                raise TimeoutError("iperf3 -s did not listen")
            time.sleep(0.05)
        yield Endpoint(f"tcp://{host}:{port}", process.pid, f"{host}:{port}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# ---------------------------------------------------------------- main


def sides_for(wl: Workload, targets: dict[str, Endpoint], tcp: Endpoint | None) -> dict[str, Endpoint]:
    if wl.client == "iperf3":
        return {"tcp": tcp} if tcp else {}
    if wl.digest_row:
        return {side: targets["shoal"] for side in DIGEST_SIDES} if "shoal" in targets else {}
    return dict(targets)


def benchmark_row(wl: Workload, sides: dict[str, Endpoint], args) -> dict:
    count_based = wl.client in ("qemu-img", "qemu-img-hd")
    warm_seconds = 1.0
    warm = {name: run_side(wl, ep, name, wl.warmup_count, warm_seconds) for name, ep in sides.items()}
    count = request_count(wl, [w.iops for w in warm.values()], args.seconds) if count_based else 0
    results = {name: Side() for name in sides}
    for round_no in range(args.runs):
        for name, ep in sides.items():
            os.sync()  # the run before leaves no dirty data to be written back during this one
            wait_quiet(args.wait_quiet)
            run = run_side(wl, ep, name, count, args.seconds)
            results[name].runs.append(run)
            print(f"  {wl.label:<22} run {round_no + 1}/{args.runs} {name:<5} {run.iops:>9.0f} IOPS "
                  f"{run.mb_per_s:>7.0f} MB/s {run.target_cpu_us_per_io:>6.1f} µs/io target "
                  f"({run.seconds:.2f} s, others {run.other_cpu_cores:.2f} cores)", flush=True)
    row = {"workload": wl.name, "label": wl.label, "client": wl.client, "size": wl.size, "depth": wl.depth,
           "write": wl.write, "count": count, "warmup": {name: asdict(w) for name, w in warm.items()}}
    row.update({name: side.summary() for name, side in results.items()})

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[b].median(key) > 0:
            return round(results[a].median(key) / results[b].median(key), 3)
        return None

    for key, value in (("ratio_iops", ratio("shoal", "tgtd", "iops")),
                       ("ratio_cpu_per_io", ratio("shoal", "tgtd", "target_cpu_us_per_io")),
                       ("ratio_iops_istgt", ratio("shoal", "istgt", "iops")),
                       ("ratio_cpu_per_io_istgt", ratio("shoal", "istgt", "target_cpu_us_per_io")),
                       ("ratio_on_off_iops", ratio("on", "off", "iops")),
                       ("ratio_on_off_cpu_per_io", ratio("on", "off", "target_cpu_us_per_io"))):
        if value is not None:
            row[key] = value
    others = [run.other_cpu_cores for side in results.values() for run in side.runs]
    row["other_cpu_cores_median"] = round(statistics.median(others), 3)
    row["disturbed"] = row["other_cpu_cores_median"] > DISTURBED_CORES
    return row


def check_tools(which: tuple[str, ...], workloads: list[Workload]) -> None:
    needed = {"qemu-img": "qemu-utils", "iscsi-readcapacity16": "libiscsi-bin"}
    needed.update({"tgtd": "tgt", "tgtadm": "tgt"} if "tgtd" in which else {})
    needed.update({"istgt": "istgt"} if "istgt" in which else {})
    clients = {wl.client for wl in workloads}
    needed.update({"iscsi-perf": "libiscsi-bin"} if "iscsi-perf" in clients else {})
    needed.update({"iperf3": "iperf3"} if "iperf3" in clients else {})
    missing = sorted({pkg for tool, pkg in needed.items() if not shutil.which(tool)})
    if missing:
        raise SystemExit(f"missing Debian packages: {' '.join(missing)} (`make deps` installs them; "
                         "or leave targets/rows out with --only/--workload)")


def benchmark(args) -> dict:
    which = tuple(t for t in TARGETS if not args.only or t in args.only)
    workloads = [wl for wl in WORKLOADS if not args.workload or wl.name in args.workload]
    check_tools(which, workloads)
    rows = []
    memory: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-", dir=args.dir) as tmp, \
            started_targets(Path(tmp), which, args.size) as targets, contextlib.ExitStack() as stack:
        tcp = (stack.enter_context(running_iperf3_server())
               if any(wl.client == "iperf3" for wl in workloads) else None)
        for name, ep in targets.items():
            memory[name] = {"idle_rss_mib": round(process_tree_memory_kib(ep.pid)[0] / 1024, 1)}
        negotiated = {name: negotiated_keys(ep.url) for name, ep in targets.items()}
        for name, keys in negotiated.items():
            print(f"{name}: negotiated " + ", ".join(f"{k}={keys.get(k, '?')}" for k in (
                "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "InitialR2T",
                "ImmediateData", "MaxOutstandingR2T")) + f"; block size {targets[name].block_size}", flush=True)
        if "shoal" in targets and any(wl.client == "qemu-img-hd" for wl in workloads):
            answer = header_digest_answer(targets["shoal"])
            negotiated["shoal_header_digest"] = {"HeaderDigest": answer}
            if answer != "CRC32C":
                raise RuntimeError(f"shoal target answered HeaderDigest={answer} to CRC32C: the HD rows would "
                                   "measure no digests")
        for wl in workloads:
            sides = sides_for(wl, targets, tcp)
            if not sides:
                print(f"  {wl.label}: skipped (needs {'shoal' if wl.digest_row else 'a target'})")
                continue
            rows.append(benchmark_row(wl, sides, args))
        for name, ep in targets.items():
            rss, hwm = process_tree_memory_kib(ep.pid)
            memory[name].update(after_rss_mib=round(rss / 1024, 1), peak_hwm_mib=round(hwm / 1024, 1))
    read_1m = next((r["shoal"]["median"]["mb_per_s"] for r in rows if r["workload"] == "1m-read" and "shoal" in r),
                   None)
    tcp_mb_s = next((r["tcp"]["median"]["mb_per_s"] for r in rows if "tcp" in r), None)
    for row in rows:
        row["verdict"] = verdict(row, read_1m, tcp_mb_s)
    print_table(rows)
    print("target RSS MiB (idle / after / peak): " + ", ".join(
        f"{name} {m['idle_rss_mib']:.0f} / {m['after_rss_mib']:.0f} / {m['peak_hwm_mib']:.0f}"
        for name, m in memory.items()))
    disturbed = [row["label"] for row in rows if row["disturbed"]]
    if disturbed:
        print(f"WARNING (rows marked !): other processes kept more than {DISTURBED_CORES} of this machine's "
              f"{os.cpu_count()} CPUs busy during {', '.join(disturbed)}; rerun on a quiet machine.")
    return {
        "schema": SCHEMA,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "qemu_img": _version(["qemu-img", "--version"]), "tgtd": _version(["tgtd", "-V"]),
                    "istgt": _version(["istgt", "-V"]), "iperf3": _version(["iperf3", "--version"])},
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
        "config": {"backing_size": args.size, "runs": args.runs, "seconds_per_run": args.seconds,
                   "wait_quiet": args.wait_quiet, "tgtd_params": TUNED_PARAMS,
                   "istgt_params": {k: v for k, v in TUNED_PARAMS.items() if k != "MaxXmitDataSegmentLength"},
                   "qemu_img_bench": "-f raw -t none", "targets": list(which),
                   "goals": {k: asdict(g) for k, g in GOALS.items()}, "digest_tolerance": DIGEST_TOLERANCE},
        "negotiated": negotiated,
        "memory": memory,
        "rows": rows,
    }


def _version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run of ~1 s per side and row, 256 MiB store")
    p.add_argument("--only", action="append", choices=TARGETS, help="measure only these targets (repeatable)")
    p.add_argument("--workload", action="append", choices=[wl.name for wl in WORKLOADS],
                   help="limit to these rows (repeatable)")
    p.add_argument("--runs", type=int, default=5, help="alternating measured runs per side and row (5)")
    p.add_argument("--seconds", type=float, default=4.0, help="aimed length of one run (4)")
    p.add_argument("--size", type=int, default=GiB, help="backing store bytes per target, a multiple of 1 MiB (1 GiB)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to go idle (0)")
    p.add_argument("--dir", help="where the backing files go (default: the system temp dir)")
    p.add_argument("--output", type=Path,
                   help="JSON results file (results/latest.json; --quick: results/quick.json); "
                        "the PNG and Markdown table go beside it")
    p.add_argument("--no-history", action="store_true", help="do not append to results/history.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.size = 1, 1.0, min(args.size, 256 * MiB)
    if args.size <= 0 or args.size % MiB:
        p.error("--size must be a positive multiple of 1 MiB (istgt sizes LUNs in MB)")
    if args.runs < 1 or args.seconds <= 0:
        p.error("--runs and --seconds must be positive")
    args.output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = benchmark(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")
    table = args.output.with_suffix(".md")
    table.write_text(markdown_table(results))
    print(f"table: {table}")
    if plot(results, args.output.with_suffix(".png")):
        print(f"plot: {args.output.with_suffix('.png')}")
    if not args.quick and not args.no_history:
        with open(RESULTS / "history.jsonl", "a") as history:
            history.write(json.dumps(history_line(results)) + "\n")
        print(f"history: {RESULTS / 'history.jsonl'} (+1 line)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
