"""Three hosts for the VM tests: network namespaces on one bridge, a controller and one agent each.

Issue 8's hosts A, B and C are network namespaces joined by a Linux bridge
that lives in a namespace of its own (``…-br``), each host on a veth pair
(``eth0``, 10.98.0.1/.2/.3 on a /24); nothing is added to the root namespace.
The controller runs in A's namespace on 10.98.0.1:7450; each host runs one
``shoal agent`` on its own address (AgentService :7451, iSCSI portal :3260).
``shoalctl`` runs inside A's namespace too. Every gRPC connection is mutual TLS
with certificates ``openssl`` makes for the run (:func:`make_pki`: a CA, the
controller's, one node certificate the agents share, as the chart does, and
shoalctl's); iSCSI logins use each volume's CHAP secret (the product default). QEMU processes started by the test
run in a host's namespace through :meth:`Host.exec_argv`.

Every process is started from an argument list with ``ip netns exec`` (which
execs in place, so the PID held is the daemon's own), stopped by PID on exit,
and the namespaces are deleted at the end, also when the test fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.controller_process import SHOAL, SHOALCTL, Daemon, _env, _start
from tests.support.shoal_target import REPO

SUBNET = "10.98.0"
PREFIX_LEN = 24
CONTROLLER_PORT = 7450
AGENT_PORT = 7451
ISCSI_PORT = 3260
HEARTBEAT_INTERVAL = 0.5
#: Seconds without a heartbeat before the controller calls a node unhealthy.
HEARTBEAT_TIMEOUT = 3.0
HOST_NAMES = ("a", "b", "c")


@dataclasses.dataclass(frozen=True)
class Host:
    """One host: a network namespace with ``eth0`` at ``ip``."""

    name: str
    netns: str
    ip: str

    @property
    def node_id(self) -> str:
        return f"node-{self.name}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (same PID: ``ip netns exec`` execs in place)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclasses.dataclass
class Cluster:
    """The hosts, the controller (in A's namespace) and one agent per host."""

    workdir: Path
    hosts: dict[str, Host]
    pki: Path
    controller: Daemon | None = None
    agents: dict[str, Daemon] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)
    """Every shoalctl stdout and stderr, to check for secrets."""

    @property
    def controller_address(self) -> str:
        return f"{self.hosts['a'].ip}:{CONTROLLER_PORT}"

    def ctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``shoalctl --controller A:7450 ARGS`` run in A's namespace."""
        env = _env()
        env.pop("SHOAL_CONTROLLER", None)
        env["SHOAL_CONTEXT"] = os.devnull
        tls = ["--tls-ca", str(self.pki / "ca.pem"), "--tls-cert", str(self.pki / "admin.pem"),
               "--tls-key", str(self.pki / "admin.key")]
        argv = self.hosts["a"].exec_argv([*SHOALCTL, "--controller", self.controller_address, *tls, *args])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        self.outputs += [result.stdout, result.stderr]
        if check and result.returncode != 0:
            raise AssertionError(f"shoalctl {' '.join(args)}: rc {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def ctl_json(self, *args: str, timeout: float = 120.0):
        return json.loads(self.ctl(*args, "-o", "json", timeout=timeout).stdout)

    def disk_dir(self, host: str) -> Path:
        """Where host's agent keeps its disk ``data0`` (the pool's volumes live there)."""
        return self.workdir / host / "disk0"

    def logs(self) -> dict[str, str]:
        """Every daemon's log by name."""
        logs = {"controller": self.controller.log() if self.controller else ""}
        logs.update({f"agent-{name}": agent.log() for name, agent in self.agents.items()})
        return logs

    def wait_healthy(self, timeout: float = 60.0, since: float = 0.0) -> None:
        """Wait until every host's node is healthy with a heartbeat after ``since`` (Unix time)."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.ctl_json("node", "list")["nodes"]
            healthy = {n["id"] for n in nodes if n["health"] == "healthy" and n["last_heartbeat_unix"] > since}
            if healthy >= {h.node_id for h in self.hosts.values()}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not healthy after {timeout}s: {nodes}")
            time.sleep(0.3)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespaces(prefix: str | None = None) -> Iterator[dict[str, Host]]:
    """Namespaces ``PREFIX-a/-b/-c`` on a bridge in ``PREFIX-br``; deleted on exit."""
    prefix = prefix or f"shoal-vm-{os.getpid()}-{secrets.token_hex(2)}"
    bridge_ns = f"{prefix}-br"
    created: list[str] = []
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        hosts = {}
        for index, name in enumerate(HOST_NAMES, start=1):
            host = Host(name, f"{prefix}-{name}", f"{SUBNET}.{index}")
            _ip("netns", "add", host.netns)
            created.append(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", bridge_ns, "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            _ip("-n", bridge_ns, "link", "set", f"v{name}", "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            hosts[name] = host
        yield hosts
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, hosts: dict[str, Host]) -> Path:
    """``ca.pem``, and ``controller``/``node``/``admin`` ``.pem`` + ``.key`` signed by it (P-256 keys: fast).

    The controller's certificate names A's address, the node certificate every host's (the controller dials
    agents by address); each is both server and client certificate (mutual TLS both ways)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(directory, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=shoal-vm-test-ca")
    sans = {"controller": f"IP:{hosts['a'].ip}", "node": ",".join(f"IP:{h.ip}" for h in hosts.values()),
            "admin": ""}
    for name, san in sans.items():
        _openssl(directory, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=shoal-{name}")
        ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
        (directory / f"{name}.ext").write_text(ext + (f"subjectAltName={san}\n" if san else ""))
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return directory


def start_controller(cluster: Cluster, extra_args: Sequence[str] = (), timeout: float = 60.0) -> Daemon:
    host, pki = cluster.hosts["a"], cluster.pki
    workdir = cluster.workdir / "controller"
    workdir.mkdir(parents=True, exist_ok=True)
    args = host.exec_argv([*SHOAL, "-v", "controller", "--db", str(workdir / "controller.db"),
                           "--listen", cluster.controller_address, "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
                           "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--loop-interval", "0.5",
                           "--tls-cert", str(pki / "controller.pem"), "--tls-key", str(pki / "controller.key"),
                           "--tls-client-ca", str(pki / "ca.pem"), "--agent-ca", str(pki / "ca.pem"),
                           "--agent-cert", str(pki / "controller.pem"), "--agent-key", str(pki / "controller.key"),
                           *extra_args])
    log_path = workdir / "controller.log"
    process, ready = _start("shoal controller", args, workdir / "controller.ready", log_path, timeout)
    return Daemon(ready["controller"], process, log_path)


def start_agent(cluster: Cluster, name: str, timeout: float = 60.0) -> Daemon:
    host, pki = cluster.hosts[name], cluster.pki
    workdir = cluster.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    args = host.exec_argv([*SHOAL, "-v", "agent", "--node-id", host.node_id, "--data-dir", str(workdir / "data"),
                           "--disk", f"data0={cluster.disk_dir(name)}", "--listen", f"{host.ip}:{AGENT_PORT}",
                           "--portal", f"{host.ip}:{ISCSI_PORT}", "--controller", cluster.controller_address,
                           "--label", f"host={name}",
                           "--tls-cert", str(pki / "node.pem"), "--tls-key", str(pki / "node.key"),
                           "--tls-client-ca", str(pki / "ca.pem"), "--controller-ca", str(pki / "ca.pem"),
                           "--controller-cert", str(pki / "node.pem"), "--controller-key", str(pki / "node.key")])
    log_path = workdir / "agent.log"
    process, ready = _start(f"shoal agent {host.node_id}", args, workdir / "agent.ready", log_path, timeout)
    return Daemon(ready["agent"], process, log_path, {"portal": ready["portal"], "node_id": host.node_id})


@contextlib.contextmanager
def vm_cluster(workdir: Path, controller_args: Sequence[str] = ()) -> Iterator[Cluster]:
    """Hosts A, B, C with the controller in A and an agent on each, all healthy; torn down on exit."""
    with namespaces() as hosts:
        cluster = Cluster(workdir, hosts, make_pki(workdir / "pki", hosts))
        try:
            cluster.controller = start_controller(cluster, controller_args)
            # The agents start side by side: each is a Python process taking seconds to import on a busy machine.
            with concurrent.futures.ThreadPoolExecutor(len(HOST_NAMES)) as pool:
                futures = {name: pool.submit(start_agent, cluster, name) for name in HOST_NAMES}
                for name, future in futures.items():
                    with contextlib.suppress(Exception):
                        cluster.agents[name] = future.result()
            for future in futures.values():
                future.result()  # raises the first start failure, once every started agent is known
            cluster.wait_healthy()
            yield cluster
        finally:
            for agent in cluster.agents.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent.process.pid, signal.SIGCONT)  # a stopped agent cannot act on SIGTERM
                agent.stop()
            if cluster.controller:
                cluster.controller.stop()

