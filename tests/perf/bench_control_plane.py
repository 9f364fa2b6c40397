"""Control-plane benchmark: how fast one ``shoal controller`` creates and publishes volumes.

Starts a controller and ``--agents`` (3) real agents on 127.0.0.1 (temporary
data directories, default settings: SQLite state with WAL, a reconcile pass
every 5 s), plus a *stub consumer node* in this process: a node registered
through RegistrationService (heartbeating like an agent) whose AgentService
answers AttachVolume / DetachVolume at once and owns no disk.  Then, through
AdminService from ``--clients`` (8) threads, each with its own gRPC channel:

* **create**: ``CreateVolume`` of ``--volumes`` (1,000) thin volumes in pool
  ``default``: placement, the SQLite rows recorded before and after, and the
  owner agent's ``CreateVolume`` (a sparse file);
* **publish**: ``AttachVolume`` of each to the stub consumer: the controller's
  whole publish path (per-volume lock, CHAP secret, operations log, the owner
  agent's real ``ExportVolume``: a new iSCSI target with ACL and CHAP and its
  record written to disk), with the consumer's host attach (an iSCSI login,
  FUSE, a loop device: the consumer node's own cost, seconds each) replaced
  by the stub;
* **unpublish** and **delete** (``DetachVolume``, ``DeleteVolume``), the way back.

Reported: volumes per second and per-call latency (median, p95, max) of each
phase, the controller's resident memory (VmRSS from /proc) at each step, the
agents' total, and the time of one scrape of the controller's ``/metrics``
with every volume published.  Writes ``tests/perf/results/control_plane.json``.

Run: ``.venv/bin/python tests/perf/bench_control_plane.py [--volumes N] [--clients N]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc  # noqa: E402
from tests.support.shoal_target import stop_process  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHOAL = [sys.executable, "-m", "node_agent.cli"]
CONSUMER = "bench-consumer"
CONSUMER_IQN = "iqn.2026-11.io.shoal:node:bench-consumer"
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- processes

def start(name: str, args: list[str], workdir: Path, timeout: float = 30.0) -> tuple[subprocess.Popen, dict]:
    """Start a daemon from an argument list; wait for its ready file; return (process, ready JSON)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}.ready"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(workdir / f"{name}.log", "ab") as log_file:
        process = subprocess.Popen(args + ["--ready-file", str(ready)], stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"{name} did not start:\n{(workdir / f'{name}.log').read_text(errors='replace')}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class StubConsumer(agent_pb2_grpc.AgentServiceServicer):
    """A consumer node whose host attach costs nothing: the control plane is what is measured."""

    def __init__(self):
        self.attached: dict[str, str] = {}
        self.lock = threading.Lock()

    def AttachVolume(self, request, context):
        path = f"/dev/bench/{request.export.volume_id}"
        with self.lock:
            self.attached[request.export.volume_id] = request.mode or "userspace"
        return agent_pb2.AttachVolumeResponse(device_path=path)

    def DetachVolume(self, request, context):
        with self.lock:
            self.attached.pop(request.volume_id, None)
        return agent_pb2.DetachVolumeResponse()

    def GetState(self, request, context):
        with self.lock:
            attached = sorted(self.attached.items())
        return agent_pb2.AgentState(node_id=CONSUMER, attachments=[
            agent_pb2.Attachment(volume_id=v, device_path=f"/dev/bench/{v}", mode=m) for v, m in attached])


class Consumer:
    """The stub's gRPC server, its registration and its heartbeats."""

    def __init__(self, controller: str):
        self.controller = controller
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        agent_pb2_grpc.add_AgentServiceServicer_to_server(StubConsumer(), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.start()
        channel = grpc.insecure_channel(self.controller)
        registration = agent_pb2_grpc.RegistrationServiceStub(channel)
        answer = registration.Register(agent_pb2.RegisterRequest(
            node_id=CONSUMER, initiator_iqn=CONSUMER_IQN, agent_address=self.address,
            portals=["127.0.0.1:3260"]), timeout=10)
        interval = answer.heartbeat_interval_seconds or 5.0

        def beat():
            with channel:
                while not self.stop_event.wait(interval):
                    try:
                        registration.Heartbeat(agent_pb2.HeartbeatRequest(node_id=CONSUMER), timeout=10)
                    except grpc.RpcError as exc:
                        print(f"stub consumer: heartbeat failed: {exc.code().name}", file=sys.stderr)

        self.thread = threading.Thread(target=beat, name="stub-heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(15)
        self.server.stop(grace=1).wait(5)


# ----------------------------------------------------------------------------- the phases

class Clients:
    """One AdminService channel per worker thread."""

    def __init__(self, address: str):
        self.address = address
        self.local = threading.local()
        self.channels: list[grpc.Channel] = []
        self.lock = threading.Lock()

    def stub(self) -> admin_pb2_grpc.AdminServiceStub:
        stub = getattr(self.local, "stub", None)
        if stub is None:
            channel = grpc.insecure_channel(self.address)
            with self.lock:
                self.channels.append(channel)
            stub = self.local.stub = admin_pb2_grpc.AdminServiceStub(channel)
        return stub

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def run_phase(name: str, clients: Clients, workers: int, names: list[str], call, pids: dict[str, list[int]]) -> dict:
    """``call(stub, volume name)`` for every name from ``workers`` threads; rate, latencies, errors, and the
    CPU time the ``pids`` ({"controller": [pid], "agents": [...]}) spent per volume."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def one(volume: str) -> None:
        started = time.perf_counter()
        try:
            call(clients.stub(), volume)
        except grpc.RpcError as exc:
            with lock:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                if sum(errors.values()) <= 3:
                    print(f"  {name} {volume}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    cpu_before = {role: sum(cpu_seconds(p) for p in group) for role, group in pids.items()}
    started = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bench-{name}") as pool:
        list(pool.map(one, names))
    wall = time.perf_counter() - started
    cpu = {role: sum(cpu_seconds(p) for p in group) - cpu_before[role] for role, group in pids.items()}
    latencies.sort()
    done = len(latencies)
    result = {"volumes": len(names), "ok": done, "errors": errors, "seconds": round(wall, 3),
              "volumes_per_second": round(done / wall, 1) if wall else 0.0,
              "cpu_ms_per_volume": {role: round(seconds / len(names) * 1e3, 2) for role, seconds in cpu.items()}}
    if latencies:
        result["latency_ms"] = {"median": round(statistics.median(latencies) * 1e3, 2),
                                "p95": round(latencies[min(done - 1, int(done * 0.95))] * 1e3, 2),
                                "max": round(latencies[-1] * 1e3, 2)}
    print(f"{name:>9}: {done}/{len(names)} in {wall:.2f} s = {result['volumes_per_second']:.1f} volumes/s"
          + (f"  (latency median {result['latency_ms']['median']} ms, p95 {result['latency_ms']['p95']} ms)"
             if latencies else "") + (f"  errors {errors}" if errors else "")
          + "  CPU ms/volume " + ", ".join(f"{k} {v}" for k, v in result["cpu_ms_per_volume"].items()), flush=True)
    return result


def scrape_seconds(address: str) -> tuple[float, str]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as response:
        text = response.read().decode()
    return time.perf_counter() - started, text


def wait_healthy(admin: admin_pb2_grpc.AdminServiceStub, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=10).nodes
        if sum(n.health == "healthy" for n in nodes) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{count} healthy nodes did not show up in {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=1000, help="volumes to create and publish (default 1000)")
    parser.add_argument("--clients", type=int, default=8, help="client threads, one channel each (default 8)")
    parser.add_argument("--agents", type=int, default=3, help="node agents owning the volumes (default 3)")
    parser.add_argument("--size", type=int, default=64, help="volume size in MiB, thin (default 64)")
    parser.add_argument("--keep", action="store_true", help="skip unpublish and delete")
    parser.add_argument("--output", default=str(RESULTS / "control_plane.json"), help="JSON results file")
    args = parser.parse_args(argv)

    processes: list[subprocess.Popen] = []
    consumer: Consumer | None = None
    clients: Clients | None = None
    with tempfile.TemporaryDirectory(prefix="shoal-bench-cp-") as tmp:
        work = Path(tmp)
        try:
            controller, ready = start("controller", SHOAL + [
                "controller", "--db", str(work / "controller" / "controller.db"), "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0"], work / "controller")
            processes.append(controller)
            address, metrics = ready["controller"], ready["metrics"]
            agents = []
            for i in range(args.agents):
                node = f"node-{chr(ord('a') + i)}"
                agent, _ = start("agent", SHOAL + [
                    "agent", "--node-id", node, "--data-dir", str(work / node / "data"),
                    "--disk", f"data0={work / node / 'disk0'}", "--listen", "127.0.0.1:0",
                    "--portal", "127.0.0.1:0", "--controller", address], work / node)
                processes.append(agent)
                agents.append(agent)
            consumer = Consumer(address)
            consumer.start()
            clients = Clients(address)
            admin = clients.stub()
            wait_healthy(admin, args.agents + 1)

            names = [f"bench-{i:05d}" for i in range(args.volumes)]
            pids = {"controller": [controller.pid], "agents": [a.pid for a in agents]}
            load_before = os.getloadavg()
            size = args.size * MiB
            rss = {"start": rss_bytes(controller.pid)}
            print(f"controller {address} (pid {controller.pid}), {args.agents} agents, stub consumer "
                  f"{consumer.address}; {args.volumes} volumes of {args.size} MiB, {args.clients} clients; "
                  f"controller RSS {rss['start'] / MiB:.1f} MiB", flush=True)
            phases = {}
            phases["create"] = run_phase("create", clients, args.clients, names, lambda stub, name: stub.CreateVolume(
                admin_pb2.CreateVolumeRequest(name=name, size_bytes=size), timeout=120), pids)
            rss["after_create"] = rss_bytes(controller.pid)
            phases["publish"] = run_phase("publish", clients, args.clients, names, lambda stub, name: stub.AttachVolume(
                admin_pb2.AttachVolumeRequest(name=name, node=CONSUMER, mode="userspace"), timeout=120), pids)
            rss["after_publish"] = rss_bytes(controller.pid)
            status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=30)
            scrape, page = scrape_seconds(metrics)
            scrape_info = {"seconds": round(scrape, 4), "bytes": len(page)}
            print(f"  status: {status.volumes} volumes, {status.attachments} attachments; one /metrics scrape "
                  f"{scrape * 1e3:.1f} ms ({len(page)} bytes)", flush=True)
            agents_rss = sum(rss_bytes(a.pid) for a in agents)
            if not args.keep:
                phases["unpublish"] = run_phase("unpublish", clients, args.clients, names,
                                                lambda stub, name: stub.DetachVolume(admin_pb2.DetachVolumeRequest(
                                                    name=name, node=CONSUMER), timeout=120), pids)
                phases["delete"] = run_phase("delete", clients, args.clients, names,
                                             lambda stub, name: stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(
                                                 name=name), timeout=120), pids)
                rss["end"] = rss_bytes(controller.pid)
            load_after = os.getloadavg()
            print("controller RSS: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in rss.items())
                  + f"; agents' RSS with every volume exported: {agents_rss / MiB:.1f} MiB", flush=True)
        finally:
            if clients is not None:
                clients.close()
            if consumer is not None:
                consumer.stop()
            for process in reversed(processes):
                stop_process(process)

    result = {
        "benchmark": "control_plane",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                 "load_average_before": [round(x, 2) for x in load_before],
                 "load_average_after": [round(x, 2) for x in load_after]},
        "config": {"volumes": args.volumes, "clients": args.clients, "agents": args.agents,
                   "volume_size_bytes": size, "thin": True,
                   "publish": "AdminService.AttachVolume to a stub consumer node: the controller's path and the "
                              "owner agent's real ExportVolume; the consumer's host attach is not included"},
        "phases": phases,
        "controller_rss_bytes": rss,
        "agents_rss_bytes_published": agents_rss,
        "metrics_scrape_published": scrape_info,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    failed = sum(sum(p["errors"].values()) for p in phases.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
