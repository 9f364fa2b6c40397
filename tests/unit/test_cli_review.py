"""shoalctl and the health/metrics HTTP endpoints: regressions found by a review of the admin CLI.

A closed stdout pipe, an argument that is not UTF-8, a secret file that cannot be written, a detach that
found nothing to detach, ``-o json`` on delete/detach, and slow clients holding the HTTP endpoints.

Boundary fake: ``FakeAdmin`` is an ``AdminService`` servicer served over real gRPC on 127.0.0.1:0 (as in
tests/unit/test_shoalctl.py), answering from a few canned records and recording each request, so these
tests check what shoalctl sends and prints without a controller.  The HTTP tests run the real
``HealthServer`` / ``MetricsServer`` on 127.0.0.1 with real sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
import yaml

from controller.cli import main
from controller.health import HealthServer
from node_agent import metrics_server
from node_agent.metrics_server import MetricsServer, new_registry
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests.support.controller_process import SHOALCTL
from tests.support.shoal_target import REPO
from tests.unit.test_shoalctl import serving, shoalctl_against

SECRET = "Zx9-chap-secret-never-printed"


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """vol1 is attached to node-a; nothing else exists.  ``requests`` records (method, request) in order."""

    def __init__(self):
        self.requests: list[tuple[str, object]] = []
        self.on_secret = None  # called when GetPublishSecret is asked (a test's hook)

    def _seen(self, method, request):
        self.requests.append((method, request))

    def ListVolumes(self, request, context):
        self._seen("ListVolumes", request)
        return admin_pb2.ListVolumesResponse(volumes=[admin_pb2.Volume(name=f"v{i}", size_bytes=1 << 20)
                                                      for i in range(5)])

    def GetVolume(self, request, context):
        self._seen("GetVolume", request)
        if request.name != "vol1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"volume {request.name} does not exist")
        return admin_pb2.Volume(name="vol1", size_bytes=1 << 20, state="attached", attached_nodes=["node-a"])

    def DeleteVolume(self, request, context):
        self._seen("DeleteVolume", request)
        return admin_pb2.DeleteVolumeResponse()

    def DetachVolume(self, request, context):
        self._seen("DetachVolume", request)  # idempotent, as the controller's: success whatever it finds
        return admin_pb2.DetachVolumeResponse()

    def AttachVolume(self, request, context):
        self._seen("AttachVolume", request)
        return admin_pb2.Attachment(
            volume=request.name, node=request.node, state="published", initiator_iqn="iqn.2024-01.io.shoal:b",
            export=common_pb2.ExportInfo(target_iqn="iqn.2024-01.io.shoal:a:vol1", portals=["127.0.0.1:3260"],
                                         chap_user="shoal-vol1"))

    def GetPublishSecret(self, request, context):
        self._seen("GetPublishSecret", request)
        if self.on_secret is not None:
            self.on_secret()
        return admin_pb2.PublishSecret(chap_user="shoal-vol1", chap_secret=SECRET)

    def GetPool(self, request, context):
        self._seen("GetPool", request)
        context.abort(grpc.StatusCode.NOT_FOUND, f"pool {request.name} does not exist")

    def DeletePool(self, request, context):
        self._seen("DeletePool", request)
        return admin_pb2.DeletePoolResponse()

    def GetSnapshot(self, request, context):
        self._seen("GetSnapshot", request)
        if request.name != "snap1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.name} does not exist")
        return admin_pb2.Snapshot(name="snap1", volume="vol1", state="ready")

    def DeleteSnapshot(self, request, context):
        self._seen("DeleteSnapshot", request)
        return admin_pb2.DeleteSnapshotResponse()


@pytest.fixture(scope="module")
def fake():
    with serving(FakeAdmin()) as servicer:
        yield servicer


@pytest.fixture
def ctl(fake, capsys, monkeypatch, tmp_path):
    """Run shoalctl in this process against the fake; returns (exit code, stdout, stderr)."""
    fake.requests.clear()
    fake.on_secret = None
    return shoalctl_against(fake.address, capsys, monkeypatch, tmp_path)


def sent(fake) -> list[str]:
    return [method for method, _ in fake.requests]


def run_shoalctl(fake, *args, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """shoalctl as a process (``args`` may be bytes: argv as the shell passes it)."""
    env = dict(os.environ, SHOAL_CONTEXT=os.devnull, PYTHONPATH=str(REPO))
    env.pop("SHOAL_CONTROLLER", None)
    return subprocess.run([*SHOALCTL, "--controller", fake.address, *args], stdout=stdout,
                          stderr=subprocess.PIPE, env=env, cwd=REPO, timeout=60)


# ---- a closed stdout pipe: `shoalctl volume list | head -1`

def test_a_closed_stdout_pipe_exits_141_without_a_traceback(fake):
    """It printed a BrokenPipeError traceback and exited 1 (or 120 when the write failed at exit)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as `head -1` after its line
    try:
        result = run_shoalctl(fake, "volume", "list", stdout=write_end)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, b"")


# ---- arguments that are not UTF-8

@pytest.mark.parametrize("args, message", [
    (["volume", "show", "bad\udcff"], "argument name: 'bad\\xff' is not valid UTF-8"),
    (["volume", "detach", "vol1", "--node", "n\udcff"], "argument --node: 'n\\xff' is not valid UTF-8"),
    (["volume", "create", "v", "--size", "1MiB", "--constraint", "zone=\udcff"],
     "argument --constraint: '\\xff' is not valid UTF-8"),
    (["--controller", "127.0.0.1:1\udcff", "status"], "argument --controller: '127.0.0.1:1\\xff' is not valid UTF-8"),
])
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(ctl, fake, args, message):
    """Bytes that are not UTF-8 reach argv as lone surrogates; encoding them for gRPC raised
    UnicodeEncodeError out of main."""
    code, out, err = ctl(*args)
    assert (code, out) == (2, "")
    assert err == f"shoalctl: {message}\n"
    assert fake.requests == []


def test_a_controller_address_from_the_environment_that_is_not_utf8(fake, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_CONTEXT", str(tmp_path / "none.json"))
    monkeypatch.setenv("SHOAL_CONTROLLER", "127.0.0.1:1\udcff")
    assert main(["status"]) == 2
    assert capsys.readouterr().err == "shoalctl: the controller address from SHOAL_CONTROLLER is not valid UTF-8\n"


def test_a_non_utf8_argument_from_the_shell(fake):
    result = run_shoalctl(fake, b"volume", b"show", b"bad\xff")
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == b"shoalctl: argument name: 'bad\\xff' is not valid UTF-8\n"


# ---- volume connect: a secret file that cannot be written

def test_connect_to_a_directory_where_no_file_can_be_created_publishes_nothing(ctl, fake):
    """/proc passes the "directory exists" check but no file can be made there: the volume was published,
    then mkstemp's FileNotFoundError came out as a traceback."""
    code, out, err = ctl("volume", "connect", "vol1", "--node", "node-b", "--format", "qemu",
                         "--secret-file", "/proc/shoal-secret")
    assert (code, out) == (2, "")
    assert err.startswith("shoalctl: --secret-file /proc/shoal-secret: cannot create a file in /proc: ")
    assert err.count("\n") == 1
    assert fake.requests == []


def test_connect_undoes_its_publish_when_the_secret_cannot_be_written_after_all(ctl, fake, tmp_path):
    """The directory vanishes between the check and the write (after AttachVolume): a one-line error, and the
    publish this command made is undone, so nothing is left half done."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    fake.on_secret = lambda: shutil.rmtree(directory)
    code, out, err = ctl("volume", "connect", "vol1", "--node", "node-b", "--format", "qemu",
                         "--secret-file", str(directory / "s"))
    assert (code, out) == (1, "")
    assert err.startswith(f"shoalctl: cannot write --secret-file {directory / 's'}: ")
    assert err.endswith("; the publish to node-b was undone\n") and err.count("\n") == 1
    assert SECRET not in err
    assert sent(fake) == ["GetVolume", "AttachVolume", "GetPublishSecret", "DetachVolume"]
    detach = fake.requests[-1][1]
    assert (detach.name, detach.node) == ("vol1", "node-b")


def test_connect_keeps_a_publish_that_was_there_before(ctl, fake, tmp_path):
    """A repeated connect (node-a has vol1 already, maybe a running VM): a failure must not detach it."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    fake.on_secret = lambda: shutil.rmtree(directory)
    code, _, err = ctl("volume", "connect", "vol1", "--node", "node-a", "--format", "libvirt",
                       "--secret-file", str(directory / "s"))
    assert code == 1 and err.endswith("; volume vol1 stays published to node-a as it was before\n")
    assert "DetachVolume" not in sent(fake)


# ---- detach / disconnect: say what happened

@pytest.mark.parametrize("verb, done", [("detach", "detached"), ("disconnect", "disconnected")])
def test_detach_says_when_the_node_did_not_have_the_volume(ctl, fake, verb, done):
    """DetachVolume is idempotent: "volume vol1 detached from node-typo" hid a mistyped node."""
    code, out, err = ctl("volume", verb, "vol1", "--node", "node-typo")
    participle = "attached" if verb == "detach" else "connected"
    assert (code, out, err) == (0, f"volume vol1 was not {participle} to node-typo: nothing {done}\n", "")
    code, out, err = ctl("volume", verb, "vol1", "--node", "node-a")
    assert (code, out, err) == (0, f"volume vol1 {done} from node-a\n", "")
    assert sent(fake) == ["GetVolume", "DetachVolume"] * 2


@pytest.mark.parametrize("verb", ["detach", "disconnect"])
def test_detaching_a_volume_that_does_not_exist_is_not_found(ctl, fake, verb):
    code, out, err = ctl("volume", verb, "nosuch", "--node", "node-a")
    assert (code, out, err) == (1, "", "shoalctl: volume nosuch does not exist (NOT_FOUND)\n")
    assert sent(fake) == ["GetVolume"]


# ---- -o json|yaml on delete, detach and disconnect

@pytest.mark.parametrize("args, expected", [
    (["volume", "delete", "nosuch"], {"name": "nosuch", "deleted": False}),
    (["volume", "delete", "vol1"], {"name": "vol1", "deleted": True}),
    (["pool", "delete", "nope"], {"name": "nope", "deleted": False}),
    (["snapshot", "delete", "snap1"], {"name": "snap1", "deleted": True}),
    (["volume", "detach", "vol1", "--node", "node-a"], {"name": "vol1", "node": "node-a", "detached": True}),
    (["volume", "disconnect", "vol1", "--node", "node-b"], {"name": "vol1", "node": "node-b", "detached": False}),
])
def test_delete_and_detach_print_an_object_for_scripts(ctl, args, expected):
    """``shoalctl -o json volume delete v`` printed "volume v deleted" (exit 0); ``-o`` after the verb was a
    usage error."""
    code, out, _ = ctl("-o", "json", *args)
    assert code == 0 and json.loads(out) == expected
    code, out, _ = ctl(*args, "-o", "json")
    assert code == 0 and json.loads(out) == expected
    code, out, _ = ctl(*args, "-o", "yaml")
    assert code == 0 and not out.lstrip().startswith("{") and yaml.safe_load(out) == expected


# ---- the health and metrics endpoints: a deadline per connection

def _cut_after(sock: socket.socket, limit: float) -> float | None:
    """Drip a byte every 0.1 s on ``sock`` (a request never finished); seconds until the server cut it, or None
    when it was still open after ``limit``."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            sock.sendall(b"a")
            if sock.recv(1024) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:  # reset
            return time.monotonic() - start
    return None


@pytest.fixture
def short_timeout(monkeypatch):
    """The connection timeout (10 s) shortened to 1 s, to keep the tests quick."""
    assert metrics_server._QuietHandler.timeout == 10.0
    monkeypatch.setattr(metrics_server._QuietHandler, "timeout", 1.0)
    return 1.0


def test_a_client_dripping_bytes_is_cut_at_the_connection_deadline(short_timeout):
    """The timeout was per read: a byte every few seconds kept a connection (and its slot) forever."""
    server = HealthServer("127.0.0.1:0", lambda: (True, "leader"))
    host, port = server.start().rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            cut = _cut_after(slow, limit=4 * short_timeout)
        assert cut is not None and 0.7 * short_timeout < cut < 2 * short_timeout, cut
    finally:
        server.stop()


def test_probes_get_in_again_once_slow_clients_reach_their_deadline(short_timeout):
    """16 clients dripping a byte at a time held every slot for as long as they liked: each probe was closed
    unanswered.  Now they are cut at the deadline and the slots come back."""
    server = MetricsServer("127.0.0.1:0", new_registry())
    address = server.start()
    host, port = address.rsplit(":", 1)
    slow: list[socket.socket] = []
    stop = threading.Event()

    def drip():  # a byte every 0.1 s on every slow connection, from its first moment on
        while not stop.wait(0.1):
            for sock in list(slow):
                try:
                    sock.sendall(b"a")
                except OSError:  # cut
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        for _ in range(16):  # README: at most 16 at once
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            slow.append(sock)
        time.sleep(2 * short_timeout)  # past their deadline, still dripping
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as answer:
            assert answer.status == 200 and b"process_cpu_seconds_total" in answer.read()
    finally:
        stop.set()
        dripper.join(5)
        for sock in slow:
            sock.close()
        server.stop()
