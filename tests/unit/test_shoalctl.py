"""shoalctl: argument parsing, sizes, output formats, exit codes, where it finds the controller.

Boundary fake: ``FakeAdmin`` is an ``AdminService`` servicer served over real
gRPC on 127.0.0.1:0 — the boundary between shoalctl and the controller —
answering from canned records and recording each request, so these tests
check what shoalctl sends and how it prints what it gets, without a
controller.  The real controller answers shoalctl in
tests/integration/test_pool_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from controller.cli import main
from controller.cli.context import DEFAULT_CONTROLLER, controller_address, write_context
from controller.cli.sizes import parse_size
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, common_pb2

GiB = 1 << 30

NODE = admin_pb2.Node(id="node-a", initiator_iqn="iqn.2026-11.io.shoal:node:node-a", agent_address="127.0.0.1:7451",
                      portals=["127.0.0.1:3260"], labels={"zone": "a"}, health="healthy",
                      disks=[common_pb2.Disk(name="data0", path="/srv/d0", capacity_bytes=100 * GiB,
                                             free_bytes=60 * GiB)], last_heartbeat_unix=time.time())
POOL = admin_pb2.Pool(name="default", overcommit_ratio=1.0, capacity_bytes=100 * GiB, provisioned_bytes=GiB)
VOLUME = admin_pb2.Volume(name="vol1", id="0b4c-id", size_bytes=GiB, pool="default", owner_node="node-a",
                          disk="data0", state="attached", thin=True, attached_nodes=["node-b"])


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """Canned answers; ``requests`` records (method, request) in order."""

    def __init__(self):
        self.requests: list[tuple[str, object]] = []

    def _seen(self, method, request):
        self.requests.append((method, request))

    def ListNodes(self, request, context):
        self._seen("ListNodes", request)
        return admin_pb2.ListNodesResponse(nodes=[NODE])

    def GetNode(self, request, context):
        self._seen("GetNode", request)
        if request.id != NODE.id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.id} is not registered")
        return NODE

    def ListPools(self, request, context):
        self._seen("ListPools", request)
        return admin_pb2.ListPoolsResponse(pools=[POOL])

    def CreatePool(self, request, context):
        self._seen("CreatePool", request)
        return admin_pb2.Pool(name=request.name, members=request.members, overcommit_ratio=request.overcommit_ratio)

    def DeletePool(self, request, context):
        self._seen("DeletePool", request)
        return admin_pb2.DeletePoolResponse()

    def ListVolumes(self, request, context):
        self._seen("ListVolumes", request)
        return admin_pb2.ListVolumesResponse(volumes=[VOLUME])

    def GetVolume(self, request, context):
        self._seen("GetVolume", request)
        if request.name == "nosuch":
            context.abort(grpc.StatusCode.NOT_FOUND, "volume nosuch does not exist")
        return VOLUME

    def CreateVolume(self, request, context):
        self._seen("CreateVolume", request)
        if request.name == VOLUME.name and request.size_bytes != VOLUME.size_bytes:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "volume vol1 already exists with other parameters")
        return admin_pb2.Volume(name=request.name, size_bytes=request.size_bytes, pool=request.pool,
                                thin=not request.thick, owner_node="node-a", disk="data0", state="available")

    def DeleteVolume(self, request, context):
        self._seen("DeleteVolume", request)
        if request.name == "nosuch":  # deleting what is gone succeeds (idempotent, as CSI needs)
            return admin_pb2.DeleteVolumeResponse()
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "volume vol1 is attached to node-b: detach it first")

    def AttachVolume(self, request, context):
        self._seen("AttachVolume", request)
        return admin_pb2.Attachment(volume=request.name, node=request.node, device_path="/dev/loop7",
                                    state="attached")

    def ListSnapshots(self, request, context):
        self._seen("ListSnapshots", request)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "snapshots are not implemented by this controller yet")

    def GetStatus(self, request, context):
        self._seen("GetStatus", request)
        return admin_pb2.Status(nodes=3, healthy_nodes=2, volumes=1, attachments=1, capacity_bytes=300 * GiB,
                                free_bytes=200 * GiB, provisioned_bytes=GiB)


@contextlib.contextmanager
def serving(servicer):
    """``servicer`` (an AdminService fake) served on 127.0.0.1, its ``address`` set, until the block ends."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    try:
        yield servicer
    finally:
        server.stop(None)


def shoalctl_against(address: str, capsys, monkeypatch, tmp_path):
    """shoalctl run in this process against ``address``, with no context file; returns (exit code, stdout,
    stderr) per call."""
    monkeypatch.delenv("SHOAL_CONTROLLER", raising=False)
    monkeypatch.setenv("SHOAL_CONTEXT", str(tmp_path / "no-context.json"))

    def run(*args: str):
        try:
            code = main(["--controller", address, *args])
        except SystemExit as exc:  # argparse: usage errors
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture(scope="module")
def fake():
    with serving(FakeAdmin()) as servicer:
        yield servicer


@pytest.fixture
def ctl(fake, capsys, monkeypatch, tmp_path):
    """Run shoalctl against the fake; returns (exit code, stdout, stderr)."""
    fake.requests.clear()
    return shoalctl_against(fake.address, capsys, monkeypatch, tmp_path)


# ---- sizes

@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("512B", 512), ("64MiB", 64 << 20), ("64M", 64 << 20), ("1GiB", GiB), ("1G", GiB),
    ("1g", GiB), (" 2 GiB ", 2 * GiB), ("1.5GiB", 3 * GiB // 2), ("1TiB", 1 << 40), ("1PiB", 1 << 50),
])
def test_sizes_with_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1GB", "could mean powers of 10"), ("-1", "must be positive"), ("0", "must be positive"),
    ("0.5", "whole number"), ("lots", "bad size"), ("1e9", "bad size"), ("", "bad size"),
    ("16EiB", "larger than any volume"), ("99999999999999999999999", "larger than any volume"),
])
def test_bad_sizes_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


# ---- usage errors: exit 2, nothing sent

@pytest.mark.parametrize("args, message", [
    (["volume", "create", "v", "--size", "1GB"], "could mean powers of 10"),
    (["volume", "create", "v", "--size", "-5"], "must be positive"),
    (["volume", "create", "v"], "--size"),
    (["volume", "attach", "v"], "--node"),
    (["volume", "attach", "v", "--node", "n", "--mode", "telepathy"], "invalid choice"),
    (["volume", "create", "v", "--size", "1G", "--constraint", "nozone"], "KEY=VALUE"),
    (["pool", "create", "p", "--member", "node-without-disk"], "NODE/DISK"),
    (["pool", "create", "p", "--overcommit", "0.5"], "use 1"),
    (["volume", "list", "-o", "xml"], "invalid choice"),
    (["volume"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_and_send_nothing(ctl, fake, args, message):
    code, out, err = ctl(*args)
    assert code == 2 and message in err and out == ""
    assert fake.requests == []


# ---- what is sent

def test_volume_create_sends_bytes_pool_thickness_and_constraints(ctl, fake):
    code, out, _ = ctl("volume", "create", "data", "--size", "64MiB", "--pool", "fast", "--thick",
                       "--constraint", "zone=a")
    assert code == 0 and "volume data ready: 64.0 MiB thick in pool fast, on node-a/data0" in out
    [(method, request)] = fake.requests
    assert method == "CreateVolume"
    assert (request.name, request.size_bytes, request.pool, request.thick, dict(request.constraints)) == \
        ("data", 64 << 20, "fast", True, {"zone": "a"})


def test_volume_create_defaults_to_thin_in_the_default_pool(ctl, fake):
    """Without --pool the pool is left unset, for the controller's configured default pool (it used to send the
    literal "default", which overrode a controller configured with another one)."""
    assert ctl("volume", "create", "data", "--size", "1G")[0] == 0
    request = fake.requests[0][1]
    assert (request.pool, request.thick) == ("", False)
    code, out, _ = ctl("volume", "create", "--help")
    assert code == 0 and "the controller's default pool" in " ".join(out.split())


def test_pool_create_with_members_and_overcommit(ctl, fake):
    code, out, _ = ctl("pool", "create", "fast", "--member", "node-a/data0", "--member", "node-b/nvme1",
                       "--overcommit", "2", "-o", "json")
    assert code == 0
    assert json.loads(out)["members"] == [{"node_id": "node-a", "disk": "data0"}, {"node_id": "node-b", "disk": "nvme1"}]
    request = fake.requests[0][1]
    assert request.overcommit_ratio == 2.0


def test_attach_prints_the_device_and_json_for_scripts(ctl, fake):
    code, out, _ = ctl("volume", "attach", "vol1", "--node", "node-b")
    assert code == 0 and out.strip() == "volume vol1 attached to node-b at /dev/loop7"
    assert fake.requests[0][1].mode == "userspace"
    code, out, _ = ctl("volume", "attach", "vol1", "--node", "node-b", "--mode", "kernel", "-o", "json")
    assert json.loads(out)["device_path"] == "/dev/loop7" and fake.requests[-1][1].mode == "kernel"


# ---- output formats

@pytest.mark.parametrize("noun, key, first", [("node", "nodes", "id"), ("pool", "pools", "name"),
                                              ("volume", "volumes", "name")])
def test_lists_as_tables_json_and_yaml(ctl, noun, key, first):
    code, table, _ = ctl(noun, "list")
    assert code == 0 and table.splitlines()[0].startswith(first.upper())
    code, text, _ = ctl(noun, "list", "-o", "json")
    as_json = json.loads(text)
    code, text, _ = ctl(noun, "list", "-o", "yaml")
    assert yaml.safe_load(text) == as_json and len(as_json[key]) == 1


def test_volume_table_for_people(ctl):
    _, out, _ = ctl("volume", "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "POOL", "STATE", "NODE", "ATTACHED", "TO", "PROVISIONING"]
    assert row.split() == ["vol1", "1.0", "GiB", "default", "attached", "node-a", "node-b", "thin"]


def test_show_as_key_values_and_json(ctl):
    _, out, _ = ctl("volume", "show", "vol1")
    assert "Size:" in out and "1.0 GiB" in out and "Bytes:        1073741824" in out
    _, out, _ = ctl("node", "show", "node-a", "-o", "json")
    node = json.loads(out)
    assert node["capacity_bytes"] == 100 * GiB and node["disks"][0]["name"] == "data0"
    assert node["labels"] == {"zone": "a"}


def test_status(ctl, fake):
    code, out, _ = ctl("status")
    assert code == 0 and "Healthy nodes: 2" in out and "300.0 GiB" in out
    _, out, _ = ctl("status", "-o", "yaml")
    status = yaml.safe_load(out)
    assert status["controller"] == fake.address and status["provisioned_bytes"] == GiB


# ---- errors

def test_controller_errors_exit_1_with_its_message(ctl):
    code, out, err = ctl("volume", "delete", "vol1")
    assert code == 1 and out == ""
    assert err == "shoalctl: volume vol1 is attached to node-b: detach it first (FAILED_PRECONDITION)\n"
    code, _, err = ctl("volume", "create", "vol1", "--size", "2GiB")
    assert code == 1 and "already exists with other parameters (ALREADY_EXISTS)" in err
    code, _, err = ctl("node", "show", "node-z")
    assert code == 1 and "not registered (NOT_FOUND)" in err


def test_output_format_before_or_after_the_subcommand(ctl):
    """``-o`` used to be taken only after the subcommand: ``shoalctl -o json status`` was a usage error."""
    code, out, _ = ctl("-o", "json", "status")
    assert code == 0 and json.loads(out)["nodes"] == 3
    code, out, _ = ctl("-o", "json", "status", "-o", "yaml")  # the subcommand's own flag wins
    assert code == 0 and not out.lstrip().startswith("{") and yaml.safe_load(out)["nodes"] == 3
    code, out, _ = ctl("status")
    assert code == 0 and not out.lstrip().startswith("{")


def test_deleting_a_volume_that_does_not_exist_says_so(ctl, fake):
    """The delete is idempotent, but "volume nosuch deleted" hid a mistyped name."""
    code, out, err = ctl("volume", "delete", "nosuch")
    assert (code, out, err) == (0, "volume nosuch does not exist: nothing deleted\n", "")
    assert [name for name, _ in fake.requests] == ["GetVolume", "DeleteVolume"]


def test_unimplemented_snapshots_are_a_clean_error(ctl):
    code, out, err = ctl("snapshot", "list")
    assert code == 1 and out == "" and err == "shoalctl: snapshots are not implemented by this controller yet\n"


def test_unreachable_controller_says_what_to_do(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_CONTEXT", str(tmp_path / "none.json"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        code = main(["--controller", f"127.0.0.1:{port}", "--timeout", "1", "status"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"controller unreachable at 127.0.0.1:{port} (from --controller): is `shoal up` running?" in err


def test_a_port_that_answers_but_fails_the_handshake_is_not_called_unreachable(capsys, monkeypatch, tmp_path):
    """A TLS controller asked in plaintext (or with the wrong CA) used to be "unreachable ... is `shoal up`
    running?" after the timeout: the port answers, so the handshake is what failed, and shoalctl says so."""
    monkeypatch.setenv("SHOAL_CONTEXT", str(tmp_path / "none.json"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts, never speaks gRPC (as a TLS port does to a plaintext client)
        port = listener.getsockname()[1]
        code = main(["--controller", f"127.0.0.1:{port}", "--timeout", "1", "status"])
        err = capsys.readouterr().err
        assert code == 1 and "unreachable" not in err
        assert "it does not speak plaintext gRPC: if it serves TLS, give --tls-ca" in err
        ca = tmp_path / "ca.pem"
        ca.write_text("not a certificate\n")
        code = main(["--controller", f"127.0.0.1:{port}", "--timeout", "1", "--tls-ca", str(ca), "status"])
    err = capsys.readouterr().err
    assert code == 2 and f"--tls-ca {ca}: no PEM certificate in it" in err


# ---- where the controller is

def test_controller_address_order(monkeypatch, tmp_path):
    context = tmp_path / "context.json"
    monkeypatch.setenv("SHOAL_CONTEXT", str(context))
    monkeypatch.delenv("SHOAL_CONTROLLER", raising=False)
    assert controller_address(None) == (DEFAULT_CONTROLLER, "the default")
    write_context(context, {"controller": "10.0.0.1:7450"})
    assert controller_address(None) == ("10.0.0.1:7450", str(context))
    monkeypatch.setenv("SHOAL_CONTROLLER", "10.0.0.2:7450")
    assert controller_address(None) == ("10.0.0.2:7450", "SHOAL_CONTROLLER")
    assert controller_address("10.0.0.3:7450") == ("10.0.0.3:7450", "--controller")


def test_context_file_from_shoal_up_is_used(fake, capsys, monkeypatch, tmp_path):
    context = tmp_path / "context.json"
    write_context(context, {"controller": fake.address, "node": "node-a"})
    monkeypatch.setenv("SHOAL_CONTEXT", str(context))
    monkeypatch.delenv("SHOAL_CONTROLLER", raising=False)
    assert main(["status", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["controller"] == fake.address


def test_default_context_path_is_under_the_config_home(monkeypatch, tmp_path):
    from controller.cli.context import context_path

    monkeypatch.delenv("SHOAL_CONTEXT", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert context_path() == tmp_path / "shoal" / "context.json"
