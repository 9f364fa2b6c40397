"""``shoal up``: a one-machine Shoal for trying it out (``make up``).

Starts two child processes — ``shoal controller`` (state in
``<data-dir>/controller.db``) and ``shoal agent`` (records and one disk under
``<data-dir>/agent``) — waits until the agent has registered, writes the
context file shoalctl reads its controller address from, prints how to use it,
and stops both by PID on Ctrl-C / SIGTERM / SIGHUP / SIGQUIT (agent first, so
its exports close while the controller still answers); should it die without
that chance (SIGKILL), the kernel sends both SIGTERM (PR_SET_PDEATHSIG).  The
controller creates the pool ``default`` over every disk, i.e. this agent's
disk.  Everything lives under the data directory, so running it again picks up
the same volumes.  Both serve Prometheus ``/metrics`` on loopback
(``--controller-metrics``, ``--agent-metrics``; '' turns one off).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from controller.cli.context import context_path, write_context
from controller.daemon import DEFAULT_LISTEN
from node_agent.agent.settings import DAY, check_address, default_node_id
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc

STOP_TIMEOUT = 20.0  # seconds a child gets to exit after SIGTERM before SIGKILL (the agent syncs and logs out)
# What stops ``shoal up``: Ctrl-C, kill, a closed terminal (SIGHUP), Ctrl-\ (SIGQUIT)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1
# Looked up here, so the child after fork only calls it; Linux only (elsewhere children outlive a killed parent)
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


class _Stopped(Exception):
    """A stop signal arrived while starting."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def add_parser(sub) -> None:
    parser = sub.add_parser("up", help="run a controller and one agent on this machine (try Shoal out)",
                            description="Start a controller and a node agent as child processes, state under "
                                        "--data-dir, and point shoalctl at them. Ctrl-C stops both.")
    parser.add_argument("--data-dir", default=".shoal", help="state of both daemons (default ./%(default)s)")
    parser.add_argument("--node-id", default="", help="the agent's node id (default: the host name)")
    parser.add_argument("--controller", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="controller address (default %(default)s)")
    parser.add_argument("--agent", default="127.0.0.1:7451", metavar="HOST:PORT",
                        help="AgentService address (default %(default)s)")
    parser.add_argument("--portal", default="127.0.0.1:3260", metavar="HOST:PORT",
                        help="the agent's iSCSI portal (default %(default)s)")
    parser.add_argument("--controller-metrics", default="127.0.0.1:9450", metavar="HOST:PORT",
                        help="the controller's Prometheus /metrics (default %(default)s; '' turns it off)")
    parser.add_argument("--agent-metrics", default="127.0.0.1:9451", metavar="HOST:PORT",
                        help="the agent's Prometheus /metrics (default %(default)s; '' turns it off)")
    parser.add_argument("--csi-dir", default=None, metavar="DIR",
                        help="where the CSI sockets go: controller.sock and node.sock (default DATA_DIR/csi; "
                             "'' turns CSI off)")
    parser.add_argument("--csi-driver-name", default="csi.shoal.io", metavar="NAME",
                        help="the CSI driver name both sockets report (default %(default)s)")
    parser.add_argument("--disk-size", default="", metavar="SIZE",
                        help="capacity the agent offers (e.g. 20G; default: its filesystem's size)")
    parser.add_argument("--context", default="", help="context file for shoalctl (default $SHOAL_CONTEXT or "
                                                      "~/.config/shoal/context.json)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemons to be ready")


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when ``parent`` (the thread that forked it) ends, as it does if it dies
    without stopping its children (SIGKILL, a crash).  Two system calls and nothing else: a fork of a process with
    threads may only do little before exec."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: nobody would send the signal
        os._exit(1)


def _spawn(name: str, argv: list[str], log_path: Path) -> Child:
    log_file = open(log_path, "ab")
    parent = os.getpid()
    die_with_us = (lambda: _die_with(parent)) if _prctl else None
    try:
        # Their own session: a terminal's Ctrl-C reaches us only, and we stop them in order.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True, preexec_fn=die_with_us)
    finally:
        log_file.close()
    return Child(name, process, log_path)


def _stop(child: Child) -> None:
    if child.process.poll() is not None:
        return
    os.kill(child.process.pid, signal.SIGTERM)
    try:
        child.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.wait()


def _wait_file(path: Path, child: Child, deadline: float, stop: threading.Event) -> dict:
    while time.monotonic() < deadline:
        if stop.is_set():
            raise _Stopped
        if path.exists():
            return json.loads(path.read_text())
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.process.returncode}:\n{child.tail()}")
        stop.wait(0.1)
    raise RuntimeError(f"{child.name} was not ready in time; its log ({child.log_path}):\n{child.tail()}")


def _wait_registered(address: str, node_id: str, agent: Child, deadline: float, stop: threading.Event) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        while time.monotonic() < deadline:
            if stop.is_set():
                raise _Stopped
            if agent.process.poll() is not None:
                raise RuntimeError(f"the agent exited with status {agent.process.returncode}:\n{agent.tail()}")
            try:
                node = stub.GetNode(admin_pb2.GetNodeRequest(id=node_id), timeout=2)
                if node.health == "healthy":
                    return
            except grpc.RpcError:
                pass
            stop.wait(0.2)
    raise RuntimeError(f"node {node_id} did not register with the controller in time; see {agent.log_path}")


def run(args: argparse.Namespace) -> int:
    from controller.csi.identity import check_driver_name
    from node_agent.target_service import parse_size

    try:
        check_driver_name(args.csi_driver_name)
        # Every argument the children would refuse is refused here, before the controller starts and creates
        # its state file (a bad --disk-size was the agent's error about a --disk the user never gave).
        for flag, value in (("--controller", args.controller), ("--agent", args.agent), ("--portal", args.portal),
                            ("--controller-metrics", args.controller_metrics), ("--agent-metrics", args.agent_metrics)):
            if value or not flag.endswith("-metrics"):  # '' turns metrics off
                check_address(value, flag, bind=True)  # without a port the controller would bind 443
        if args.disk_size:
            try:
                parse_size(args.disk_size)
            except ValueError as exc:
                raise ValueError(f"--disk-size: {exc}") from None
        if not 0 < args.timeout <= DAY:  # also nan and inf
            raise ValueError(f"--timeout {args.timeout}: expected seconds from more than 0 to {DAY:g}")
    except ValueError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data_dir).resolve()
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    node_id = args.node_id or default_node_id()
    shoal = [sys.executable, "-m", "node_agent.cli"]
    ready = {"controller": data / "controller.ready", "agent": data / "agent.ready"}
    for path in ready.values():
        path.unlink(missing_ok=True)
    # The handler only sets ``stop``: an exception raised from it could land between a child's fork and
    # ``children.append`` and leave that child running.  The waits below check ``stop``.
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in STOP_SIGNALS}
    children: list[Child] = []
    try:
        deadline = time.monotonic() + args.timeout
        csi = _csi_sockets(data, args.csi_dir)
        controller = _spawn("controller", shoal + [
            "controller", "--db", str(data / "controller.db"), "--listen", args.controller,
            "--metrics-listen", args.controller_metrics, "--ready-file", str(ready["controller"])]
            + (["--csi-endpoint", f"unix://{csi['controller']}", f"--csi-driver-name={args.csi_driver_name}"]
               if csi else []),
            data / "controller.log")
        children.append(controller)
        controller_ready = _wait_file(ready["controller"], controller, deadline, stop)
        address = controller_ready["controller"]
        disk = str(data / "agent" / "disks" / "data0") + (f":{args.disk_size}" if args.disk_size else "")
        agent = _spawn("agent", shoal + [
            "agent", "--node-id", node_id, "--data-dir", str(data / "agent"), "--disk", f"data0={disk}",
            "--listen", args.agent, "--portal", args.portal, "--controller", address,
            "--metrics-listen", args.agent_metrics, "--ready-file", str(ready["agent"])]
            + (["--csi-endpoint", f"unix://{csi['node']}", f"--csi-driver-name={args.csi_driver_name}"]
               if csi else []), data / "agent.log")
        children.append(agent)
        agent_ready = _wait_file(ready["agent"], agent, deadline, stop)
        _wait_registered(address, node_id, agent, deadline, stop)
        context = Path(args.context) if args.context else context_path()
        write_context(context, {"controller": address, "node": node_id, "data_dir": str(data)})
        _print_usage(address, node_id, data, context,
                     {"controller": controller_ready.get("metrics", ""), "agent": agent_ready.get("metrics", "")})
        if csi:
            print(f"CSI: controller {csi['controller']}, node {csi['node']}.", flush=True)
        while not stop.wait(0.5):
            dead = next((c for c in children if c.process.poll() is not None), None)
            if dead is not None:
                print(f"shoal up: the {dead.name} exited with status {dead.process.returncode}; stopping.\n"
                      f"{dead.tail()}", file=sys.stderr)
                return 1
        print("\nshoal up: stopping the agent and the controller…", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 1
    except _Stopped:
        print("\nshoal up: interrupted while starting; stopping what started.", file=sys.stderr)
        return 130
    finally:
        for child in reversed(children):  # the agent first: it closes exports while the controller answers
            _stop(child)  # a second signal only sets ``stop`` again: it does not cut this short
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_SUN_PATH_MAX = 107  # bytes of a unix socket path (sockaddr_un.sun_path, less the NUL)


def _csi_sockets(data: Path, csi_dir: str | None) -> dict[str, Path]:
    """The CSI socket paths (controller, node), or {} when CSI is off or the paths would be too long."""
    if csi_dir == "":
        return {}
    root = (Path(csi_dir) if csi_dir else data / "csi").resolve()
    sockets = {"controller": root / "controller.sock", "node": root / "node.sock"}
    if any(len(str(p).encode()) > _SUN_PATH_MAX for p in sockets.values()):
        print(f"shoal up: {root} is too long for unix socket paths; CSI stays off (use --csi-dir)", file=sys.stderr)
        return {}
    root.mkdir(parents=True, exist_ok=True)
    return sockets


def _print_usage(address: str, node_id: str, data: Path, context: Path, metrics: dict[str, str]) -> None:
    urls = [f"{name} http://{where}/metrics" for name, where in metrics.items() if where]
    print(f"""Shoal is up: controller on {address}, node {node_id} (its disk and pool "default"), state in {data}.
shoalctl talks to it through {context}. Try:

  shoalctl status
  shoalctl volume create demo --size 1GiB
  shoalctl volume attach demo --node {node_id}      # prints the device, e.g. /dev/loop0
  mkfs.ext4 /dev/loopN && mount /dev/loopN /mnt     # (as root)
  umount /mnt && shoalctl volume detach demo --node {node_id}

Logs: {data / 'controller.log'}, {data / 'agent.log'}.  Ctrl-C stops both; run it again to pick up the same state."""
          + (f"\nPrometheus metrics: {', '.join(urls)}." if urls else ""), flush=True)
