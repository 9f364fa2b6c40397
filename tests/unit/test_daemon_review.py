"""The daemons' review: ports and CSI sockets another instance holds, ``shoal up``'s signals, flags that used to
be taken silently (bad PEMs, a client CA without a certificate, nan seconds, a listen address without a port, a
mistyped disk capacity) and idle connections to ``/metrics``.

Everything runs on 127.0.0.1 with ports the kernel picks and CSI sockets in short directories under /tmp
(a unix socket path ends at 107 bytes); ``shoal up``'s children are stand-ins that sleep, spawned for real.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from controller import daemon as controller_daemon
from controller import up
from controller.api.server import ServerTls, build_server
from controller.api.standby import build_standby_server
from controller.csi.server import claim_socket_path
from controller.daemon import ControllerDaemon, DaemonSettings
from controller.domain.settings import ControllerSettings
from node_agent import cli, metrics_server
from node_agent.agent.daemon import Agent
from node_agent.agent.settings import AgentSettings, DiskSpec, TlsFiles, check_pems
from node_agent.csi.node import NodeLabels, NodeServicer
from node_agent.csi.server import build_csi_node_server
from node_agent.metrics_server import MetricsServer, new_registry
from protos.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.conftest import REPO, require_tools


@pytest.fixture
def short_dir():
    directory = tempfile.mkdtemp(prefix="shoal-review-", dir="/tmp")
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def controller(tmp_path: Path, name: str, **kw) -> ControllerDaemon:
    fields = dict(db_path=str(tmp_path / f"{name}.db"), listen="127.0.0.1:0", loop_interval=3600)
    fields.update(kw)
    return ControllerDaemon(DaemonSettings(**fields))


def agent_settings(tmp_path: Path, name: str = "a", **kw) -> AgentSettings:
    fields = dict(node_id="n1", data_dir=str(tmp_path / name), listen="127.0.0.1:0", portal_listen="127.0.0.1:0",
                  controller="")
    fields.update(kw)
    return AgentSettings(**fields)


def plugin_name(path: Path) -> str:
    with grpc.insecure_channel(f"unix://{path}") as channel:
        return csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5).name


def replace_with_listener(path: Path) -> socket.socket:
    """Another instance's socket at ``path`` (as if it started after this one): a new file, listening."""
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen()
    return other


def certificate(directory: Path, name: str) -> tuple[str, str]:
    require_tools("openssl")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


# ---- 1. a port another process holds ------------------------------------------------------------------------

def test_a_second_controller_on_a_busy_port_is_refused(tmp_path):
    """gRPC binds with SO_REUSEPORT by default: a second controller started on the port and took half the
    connections, with another state file."""
    first = controller(tmp_path, "a")
    first.start()
    try:
        second = controller(tmp_path, "b", listen=first.address)
        try:
            with pytest.raises(OSError, match=f"cannot listen on {first.address}: the port is in use"):
                second.start()
        finally:
            if second.server is not None:  # it started after all
                second.stop()
    finally:
        first.stop()


def test_only_a_leader_taking_over_from_its_standby_shares_the_port():
    """``--store kubernetes``: the leader's server binds the port its standby server holds (both SO_REUSEPORT);
    any other controller server is refused there."""
    standby, port = build_standby_server("127.0.0.1:0", lambda: "")
    try:
        with pytest.raises(OSError, match="the port is in use"):
            build_server(None, f"127.0.0.1:{port}")
        leader, bound = build_server(None, f"127.0.0.1:{port}", reuse_port=True)
        assert bound == port
        leader.stop(None)
    finally:
        standby.stop(None)


def test_a_second_agent_on_a_busy_port_is_refused(tmp_path):
    first = Agent(agent_settings(tmp_path, "a"), connectors={})
    first.start()
    try:
        second = Agent(agent_settings(tmp_path, "b", node_id="n2", listen=first.agent_address), connectors={})
        try:
            with pytest.raises(OSError, match=f"cannot listen on {first.agent_address} for AgentService"):
                second.start()
            assert second.portal is None  # what it started was stopped again
        finally:
            if second.server is not None:  # it started after all
                second.stop()
    finally:
        first.stop()


# ---- 2. CSI sockets: another instance's, a file that is none, and whose to remove ----------------------------

def test_a_live_csi_socket_is_not_taken_over(short_dir):
    endpoint = f"unix://{short_dir}/node.sock"
    first = build_csi_node_server(NodeServicer("n1", NodeLabels(), None, None), endpoint)
    try:
        with pytest.raises(OSError, match="another process serves it"):
            build_csi_node_server(NodeServicer("n2", NodeLabels(), None, None), endpoint)
        assert plugin_name(short_dir / "node.sock") == "csi.shoal.io"  # the first one still answers
    finally:
        first.stop(None).wait(5)


def test_a_stale_socket_is_replaced_and_another_file_kept(short_dir):
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # bound, then closed: nobody listens
        dead.bind(str(stale))
    claim_socket_path(str(stale), f"unix://{stale}")
    assert not stale.exists()
    notes = short_dir / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket"):
        claim_socket_path(str(notes), f"unix://{notes}")
    assert notes.read_text() == "precious"


def test_a_controller_leaves_another_instances_csi_socket(tmp_path, short_dir):
    """A second controller on the endpoint unlinked the first one's socket (and again when it failed and
    stopped); a stopping controller unlinked whatever was at the path by then."""
    endpoint = f"unix://{short_dir}/controller.sock"
    path = short_dir / "controller.sock"
    first = controller(tmp_path, "a", csi_endpoint=endpoint)
    first.start()
    try:
        second = controller(tmp_path, "b", csi_endpoint=endpoint)
        try:
            with pytest.raises(OSError, match="another process serves it"):
                second.start()
        finally:
            if second.server is not None:  # it started after all
                second.stop()
        assert plugin_name(path) == "csi.shoal.io"  # still the first one's
        other = replace_with_listener(path)
    finally:
        first.stop()
    other.close()
    assert path.exists()  # first removed only the socket file it bound itself
    third = controller(tmp_path, "c", csi_endpoint=endpoint)
    third.start()  # over the stale file the closed listener left
    third.stop()
    assert not path.exists()


def test_an_agent_leaves_another_instances_csi_socket(tmp_path, short_dir):
    path = short_dir / "node.sock"
    agent = Agent(agent_settings(tmp_path, csi_endpoint=f"unix://{path}"), connectors={})
    agent.start()
    try:
        assert plugin_name(path) == "csi.shoal.io"
        other = replace_with_listener(path)
    finally:
        agent.stop()
    with other:
        assert path.exists()


# ---- 3 and 4. shoal up: every stop signal, a signal at a spawn, a killed parent -------------------------------

class Sleeper(subprocess.Popen):
    """``shoal up``'s child, but a process that sleeps (SIGTERM ends it at once); ``spawned`` lists them."""

    spawned: list[subprocess.Popen] = []
    on_spawn = staticmethod(lambda: None)

    def __init__(self, argv, **kwargs):
        super().__init__([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        Sleeper.spawned.append(self)
        Sleeper.on_spawn()


@pytest.fixture
def sleepers(monkeypatch):
    Sleeper.spawned = []
    monkeypatch.setattr(up.subprocess, "Popen", Sleeper)
    yield Sleeper
    for child in Sleeper.spawned:
        if child.poll() is None:
            child.kill()
            child.wait()
    Sleeper.on_spawn = staticmethod(lambda: None)


def up_args(tmp_path: Path) -> argparse.Namespace:
    return cli.build_parser("up").parse_args(
        ["up", "--data-dir", str(tmp_path / "data"), "--controller", "127.0.0.1:7450", "--csi-dir", "",
         "--context", str(tmp_path / "ctx.json"), "--node-id", "n1", "--timeout", "20"])


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_shoal_up_stops_its_children_on_sighup_and_sigquit(tmp_path, sleepers, monkeypatch, signum):
    """A closed terminal (SIGHUP) or Ctrl-\\ ended ``shoal up`` and left the controller and agent running."""
    monkeypatch.setattr(up, "_wait_file", lambda *_: {"controller": "127.0.0.1:7450"})
    monkeypatch.setattr(up, "_wait_registered", lambda *_: None)
    seen_by_the_test = []

    def test_handler(*_):
        seen_by_the_test.append(signum)

    previous = signal.signal(signum, test_handler)
    up_started = threading.Event()
    monkeypatch.setattr(up, "_print_usage", lambda *_: up_started.set())

    def send():
        up_started.wait(10)
        os.kill(os.getpid(), signum)
        time.sleep(5)
        if not done.is_set():  # not stopped by it: end the test's run of shoal up
            os.kill(os.getpid(), signal.SIGTERM)

    done = threading.Event()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert up.run(up_args(tmp_path)) == 0
        done.set()
        assert seen_by_the_test == []  # shoal up handled it
        assert len(sleepers.spawned) == 2 and all(c.returncode is not None for c in sleepers.spawned)
        assert signal.getsignal(signum) is test_handler  # shoal up put the handler it found back
    finally:
        done.set()
        signal.signal(signum, previous)


def test_a_signal_right_after_a_spawn_leaves_no_child(tmp_path, sleepers):
    """SIGTERM between a child's fork and ``children.append``: the handler's KeyboardInterrupt unwound the spawn,
    and the child was never stopped."""
    def signal_inside_the_spawn():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs in here, before Popen returns

    sleepers.on_spawn = staticmethod(signal_inside_the_spawn)
    assert up.run(up_args(tmp_path)) == 130
    assert len(sleepers.spawned) == 1 and sleepers.spawned[0].returncode is not None


def test_children_get_sigterm_when_shoal_up_is_killed(tmp_path):
    """``shoal up`` killed without the chance to stop its children (SIGKILL): the kernel sends them SIGTERM."""
    script = ("import os, sys\nfrom pathlib import Path\nfrom controller import up\n"
              "child = up._spawn('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], "
              f"Path({str(tmp_path / 'child.log')!r}))\n"
              "print(child.process.pid, flush=True)\nos._exit(0)\n")
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    pid = int(parent.stdout.split()[0])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- 5. bind failures and bad PEMs are errors the CLIs print ------------------------------------------------

def test_an_agent_port_held_by_a_plain_listener_is_an_oserror(tmp_path):
    """grpcio raised RuntimeError, which ``shoal agent`` printed as a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {listen} for AgentService"):
            Agent(agent_settings(tmp_path, listen=listen), connectors={}).start()


def test_bad_pems_are_refused_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    with pytest.raises(ValueError, match="not a PEM certificate chain"):
        Agent(agent_settings(tmp_path, server_tls=TlsFiles(str(garbage), str(garbage))), connectors={}).start()
    daemon = controller(tmp_path, "c", tls=ServerTls(str(garbage), str(garbage)))
    with pytest.raises(ValueError, match="not a PEM certificate chain"):  # was "cannot listen on"
        daemon.start()
    cert, key = certificate(tmp_path, "server")
    _, other_key = certificate(tmp_path, "other")
    check_pems(cert, key, cert)
    with pytest.raises(ValueError, match="key values mismatch"):
        check_pems(cert, other_key)
    with pytest.raises(ValueError, match=f"TLS CA {garbage}: no PEM certificate"):
        check_pems(cert, key, str(garbage))
    with pytest.raises(ValueError, match=f"cannot read the TLS file {tmp_path}/none.key: No such file"):
        check_pems(cert, str(tmp_path / "none.key"))


# ---- 6. TLS flags that would be ignored -------------------------------------------------------------------

def agent_flags(*argv):
    return cli._agent_settings(cli.build_parser("agent").parse_args(["agent", "--node-id", "n1", *argv]))


def controller_flags(*argv):
    parser = argparse.ArgumentParser()
    controller_daemon.add_parser(parser.add_subparsers())
    return controller_daemon.settings_from_args(parser.parse_args(["controller", *argv]))


def test_tls_flags_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        agent_flags("--tls-client-ca", "/ca.pem")  # AgentService served plaintext
    with pytest.raises(ValueError, match="--tls-controller-names needs --tls-client-ca"):
        agent_flags("--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-controller-names", "ctl")
    assert agent_flags("--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-client-ca", "/ca.pem",
                       "--tls-controller-names", "ctl").controller_names == ("ctl",)
    assert agent_flags().controller_names == ("shoal-controller",)
    for flag in ("--tls-admin-names", "--tls-node-names"):
        with pytest.raises(ValueError, match=f"{flag} needs --tls-client-ca"):
            controller_flags("--tls-cert", "/c.pem", "--tls-key", "/k.pem", flag, "x")
    tls = controller_flags("--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--tls-client-ca", "/ca.pem")[0].tls
    assert (tls.admin_names, tls.node_names) == (("shoal-admin", "shoal-controller"), ("shoal-node",))


# ---- 7. seconds: finite, in a sane range ---------------------------------------------------------------------

SECONDS_FLAGS = ("--loop-interval", "--heartbeat-interval", "--heartbeat-timeout", "--fence-grace",
                 "--lease-renew-deadline", "--lease-retry-period")


@pytest.mark.parametrize("flag,value", [(flag, value) for flag in SECONDS_FLAGS
                                        for value in ("nan", "inf", "-1", "1e-300", "1e9", "soon")
                                        if (flag, value) != ("--fence-grace", "1e-300")])  # 0 to 86400: a number
def test_controller_seconds_flags_are_finite_and_sane(flag, value, capsys):
    """nan passed "<= 0": --loop-interval nan spun a core, inf ended the loops, --heartbeat-interval nan made
    agents heartbeat without a pause; a tiny interval spins as well."""
    with pytest.raises(SystemExit):
        controller_flags(flag, value)
    assert f"argument {flag}: '{value}': expected seconds from" in capsys.readouterr().err


def test_nan_seconds_are_refused_by_the_settings_too():
    for name in ("heartbeat_interval", "heartbeat_timeout", "fence_grace"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            ControllerSettings(**{name: math.nan})
    with pytest.raises(ValueError, match="loop_interval"):
        DaemonSettings(loop_interval=math.nan)
    with pytest.raises(ValueError, match="--lease-duration 100000: at most 86400"):
        controller_flags("--store", "kubernetes", "--lease-duration", "100000")
    daemon, settings = controller_flags("--loop-interval", "0.5", "--heartbeat-interval", "0.5",
                                        "--heartbeat-timeout", "2", "--fence-grace", "3")
    assert (daemon.loop_interval, settings.heartbeat_interval, settings.fence_grace) == (0.5, 0.5, 3)


# ---- 8. a listen address without a port ----------------------------------------------------------------------

def test_a_controller_address_without_a_port_is_refused(tmp_path, capsys):
    """gRPC took the missing port for 443."""
    for listen in ("127.0.0.1", "localhost", ":7450"):
        with pytest.raises(ValueError, match=f"--listen '{listen}': expected HOST:PORT"):
            controller_flags("--listen", listen)
    args = up_args(tmp_path)
    args.controller = "127.0.0.1"
    assert up.run(args) == 2
    assert "shoal up: --controller '127.0.0.1': expected HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything started


# ---- 9. a mistyped disk capacity ---------------------------------------------------------------------------

def test_a_mistyped_disk_capacity_is_refused_not_taken_into_the_path():
    assert DiskSpec.parse("data0=/srv/shoal:1.5G") == DiskSpec("data0", "/srv/shoal", 3 << 29)
    assert DiskSpec.parse("data0=/srv/shoal:100GiB") == DiskSpec("data0", "/srv/shoal", 100 << 30)
    for text in ("data0=/srv/shoal:100GG", "data0=/srv/shoal:10 G", "data0=/srv/shoal:1.5B", "data0=/srv/x:0"):
        with pytest.raises(ValueError, match=f"disk '{text}': bad size"):
            DiskSpec.parse(text)
    # a path's own colons, followed by what is no size, stay in the path
    assert DiskSpec.parse("data0=/srv/a:b") == DiskSpec("data0", "/srv/a:b")
    assert DiskSpec.parse("d=/dev/disk/by-path/pci-0000:00:1f.2") == DiskSpec("d", "/dev/disk/by-path/pci-0000:00:1f.2")


# ---- 10. /metrics: idle connections time out, and only so many at once ---------------------------------------

def half_requests(address: tuple[str, int], count: int) -> list[socket.socket]:
    """Connections that send the start of a request and never finish it."""
    sockets = []
    for _ in range(count):
        sockets.append(socket.create_connection(address, timeout=5))
        sockets[-1].sendall(b"GET /metrics HTTP/1.1\r\n")
    return sockets


def test_an_idle_metrics_connection_times_out(monkeypatch, capsys):
    """Each connection held a thread for as long as the client kept it open."""
    assert 0 < metrics_server._QuietHandler.timeout <= 30  # seconds; shortened here to keep the test quick
    monkeypatch.setattr(metrics_server._QuietHandler, "timeout", 0.5)
    server = MetricsServer("127.0.0.1:0", new_registry())
    idle = half_requests(metrics_server.split_listen(server.start()), 2)
    try:
        started = time.monotonic()
        assert [s.recv(100) for s in idle] == [b"", b""]  # the server gave up on them
        assert time.monotonic() - started < 3
    finally:
        for s in idle:
            s.close()
        server.stop()
    assert "Traceback" not in capsys.readouterr().err  # a timeout is not worth one


def test_metrics_connections_are_capped(monkeypatch):
    """However many connections wait, at most ``max_connections`` threads serve them; the slots come back."""
    monkeypatch.setattr(metrics_server._Server, "max_connections", 2)
    server = MetricsServer("127.0.0.1:0", new_registry())
    host, port = metrics_server.split_listen(server.start())
    try:
        idle = half_requests((host, port), 2)
        with socket.create_connection((host, port), timeout=1) as third:  # over the cap: closed unanswered
            assert third.recv(100) == b""
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while True:  # the idle ones' threads end on the EOF, soon
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
                    assert b"process_cpu_seconds_total" in answer.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "no slot came back"
                time.sleep(0.05)
    finally:
        server.stop()


def test_shoal_agent_reports_a_busy_port_in_one_line(tmp_path):
    """``shoal agent`` end to end: a busy AgentService port is one line on stderr and exit status 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "node_agent.cli", "agent", "--node-id", "n1", "--data-dir",
                                 str(tmp_path / "a"), "--listen", f"127.0.0.1:{port}", "--portal", "127.0.0.1:0",
                                 "--controller", ""], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"shoal agent: cannot listen on 127.0.0.1:{port} for AgentService" in result.stderr

