"""The controller's gRPC surface: servicers, the error table, TLS, the agent client, the daemon process.

Three layers, each over real gRPC on 127.0.0.1:

* AdminService and RegistrationService (controller/api) served in this
  process over ``ControllerService`` with ``MemoryStore`` and ``FakeAgents``
  (the domain's boundary fake for agents, controller/domain/agents.py):
  status codes from the one table, required fields, idempotency as
  admin.proto writes it, bugs answered INTERNAL without details, TLS and
  mutual TLS with certificates made by ``openssl``.
* ``GrpcAgentClient`` (controller/agents_grpc.py) against ``FlakyAgent``, a
  boundary fake of AgentService that fails on demand: retries on
  UNAVAILABLE, statuses turned back into domain errors, secrets scrubbed.
  The real agents answer it in tests/integration/test_pool_e2e.py.
* ``shoal controller`` as a process: agents register, a restart keeps the
  state, a busy port is a clear error; ``shoal up`` (a controller and an
  agent as its children) serves shoalctl through the context file, stops
  both on Ctrl-C and finds its volumes again when restarted.
"""

from __future__ import annotations

import json
from pathlib import Path
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from controller.agents_grpc import AgentCallSettings, AgentTls, GrpcAgentDirectory
from controller.api.errors import GRPC_CODES, Unimplemented, domain_error, grpc_status
from controller.api.server import ServerTls, build_server
from controller.domain import errors
from controller.domain.agents import FakeAgents
from controller.domain.model import Node
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.store import MemoryStore
from controller.store.base import StoreConflict
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2
from tests.support.controller_process import running, start_controller
from tests.support.shoal_target import REPO, stop_process

GiB = 1 << 30
SECRET_MARK = "TOPSECRET-0123456789"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Secrets:
    """Known CHAP secrets (each contains SECRET_MARK) and volume ids."""

    def __init__(self):
        self.n = 0

    def token_urlsafe(self, nbytes: int) -> str:
        self.n += 1
        return f"{SECRET_MARK}-{self.n}"

    def token_hex(self, nbytes: int) -> str:
        self.n += 1
        return f"{self.n:0{2 * nbytes}x}"


class Served:
    def __init__(self, tls: ServerTls | None = None, settings: ControllerSettings | None = None):
        self.clock = Clock()
        self.agents = FakeAgents()
        self.service = ControllerService(MemoryStore(), self.agents, settings=settings or ControllerSettings(),
                                         clock=self.clock, secrets=Secrets())
        self.server, port = build_server(self.service, "127.0.0.1:0", tls=tls, workers=4)
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
def served():
    s = Served()
    yield s
    s.server.stop(None)


@pytest.fixture
def stubs(served):
    with grpc.insecure_channel(served.address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel), agent_pb2_grpc.RegistrationServiceStub(channel)


def register(registration, node_id: str, port: int = 7451):
    return registration.Register(agent_pb2.RegisterRequest(
        node_id=node_id, initiator_iqn=f"iqn.2026-11.io.shoal:node:{node_id}", agent_address=f"127.0.0.1:{port}",
        portals=[f"127.0.0.1:{port + 1000}"], labels={"zone": "a"},
        disks=[common_pb2.Disk(name="data0", path="/srv/d0", capacity_bytes=100 * GiB, free_bytes=100 * GiB)]))


def code_of(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value.code(), caught.value.details()


# ---- the one table

@pytest.mark.parametrize("cls, code", GRPC_CODES)
def test_error_table_both_ways(cls, code):
    assert grpc_status(cls("what to do")) == (code, "what to do")
    if cls is StoreConflict:
        # one way only: an agent keeps no state store, so an ABORTED from one is worth a retry, not a conflict
        assert type(domain_error(code, "x")) is errors.Unavailable
    else:
        assert type(domain_error(code, "x")) is cls


def test_every_domain_error_class_has_a_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DomainError)]
    assert all(grpc_status(c("m")) for c in classes if c is not errors.DomainError)
    assert grpc_status(RuntimeError("bug")) is None
    assert isinstance(domain_error(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"), errors.Unavailable)
    assert isinstance(domain_error(grpc.StatusCode.INTERNAL, "bug"), errors.Unavailable)


# ---- servicers over MemoryStore + FakeAgents

def test_registration_and_heartbeat(served, stubs):
    admin, registration = stubs
    answer = register(registration, "node-a")
    assert answer.heartbeat_interval_seconds == ControllerSettings().heartbeat_interval
    register(registration, "node-a")  # a repeat updates the record
    node = admin.GetNode(admin_pb2.GetNodeRequest(id="node-a"))
    assert (node.health, dict(node.labels), node.disks[0].capacity_bytes) == ("healthy", {"zone": "a"}, 100 * GiB)
    beat = registration.Heartbeat(agent_pb2.HeartbeatRequest(node_id="node-a", disks=[
        common_pb2.Disk(name="data0", path="/srv/d0", capacity_bytes=100 * GiB, free_bytes=40 * GiB)]))
    assert beat.heartbeat_interval_seconds == ControllerSettings().heartbeat_interval  # agents follow it
    assert admin.GetNode(admin_pb2.GetNodeRequest(id="node-a")).disks[0].free_bytes == 40 * GiB
    registration.Heartbeat(agent_pb2.HeartbeatRequest(node_id="node-a"))  # no disks: keeps them
    assert admin.GetNode(admin_pb2.GetNodeRequest(id="node-a")).disks[0].free_bytes == 40 * GiB
    code, details = code_of(registration.Heartbeat, agent_pb2.HeartbeatRequest(node_id="node-z"))
    assert code == grpc.StatusCode.NOT_FOUND and "node-z" in details
    code, details = code_of(registration.Register, agent_pb2.RegisterRequest(initiator_iqn="iqn.2026-11.x:y"))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
    code, details = code_of(registration.Register, agent_pb2.RegisterRequest(
        node_id="node-b", initiator_iqn="iqn.2026-11.io.shoal:node:node-a", agent_address="127.0.0.1:1",
        portals=["127.0.0.1:2"]))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already used by node node-a" in details


def test_volume_life_and_idempotency(served, stubs, caplog):
    admin, registration = stubs
    register(registration, "node-a")
    register(registration, "node-b", 7461)
    create = admin_pb2.CreateVolumeRequest(name="vol1", size_bytes=GiB)
    volume = admin.CreateVolume(create)
    assert (volume.pool, volume.thin, volume.state, volume.size_bytes) == ("default", True, "available", GiB)
    assert admin.CreateVolume(create).id == volume.id  # a repeat: the same volume
    code, details = code_of(admin.CreateVolume, admin_pb2.CreateVolumeRequest(name="vol1", size_bytes=2 * GiB))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already exists with other parameters" in details

    with caplog.at_level(logging.DEBUG):
        attachment = admin.AttachVolume(admin_pb2.AttachVolumeRequest(name="vol1", node="node-b"))
        assert admin.AttachVolume(admin_pb2.AttachVolumeRequest(name="vol1", node="node-b")) == attachment
    assert attachment.state == "attached" and attachment.device_path
    assert list(admin.GetVolume(admin_pb2.GetVolumeRequest(name="vol1")).attached_nodes) == ["node-b"]
    assert [list(v.attached_nodes) for v in admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes] == [["node-b"]]
    code, details = code_of(admin.DeleteVolume, admin_pb2.DeleteVolumeRequest(name="vol1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "detach it first" in details
    status = admin.GetStatus(admin_pb2.GetStatusRequest())
    assert (status.nodes, status.volumes, status.attachments, status.provisioned_bytes) == (2, 1, 1, GiB)
    pool = admin.GetPool(admin_pb2.GetPoolRequest(name="default"))
    assert (pool.capacity_bytes, pool.provisioned_bytes) == (200 * GiB, GiB)

    admin.DetachVolume(admin_pb2.DetachVolumeRequest(name="vol1", node="node-b"))
    admin.DetachVolume(admin_pb2.DetachVolumeRequest(name="vol1", node="node-b"))  # a repeat: OK
    admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="vol1"))
    admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="vol1"))  # deleting what is gone: OK
    assert not admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes
    assert SECRET_MARK not in caplog.text


def test_an_unset_pool_is_the_controllers_configured_default_pool():
    """CreateVolume used to turn an unset pool into the literal "default", ignoring
    ``ControllerSettings.default_pool``: with another default configured, it answered NOT_FOUND."""
    served = Served(settings=ControllerSettings(default_pool="fast"))
    try:
        with grpc.insecure_channel(served.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            register(agent_pb2_grpc.RegistrationServiceStub(channel), "node-a")
            volume = admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="vol1", size_bytes=GiB))
            assert volume.pool == "fast"
            assert [p.name for p in served.service.list_pools()] == ["fast"]
    finally:
        served.server.stop(None)


@pytest.mark.parametrize("request_, field", [
    (admin_pb2.CreateVolumeRequest(size_bytes=GiB), "name"),
    (admin_pb2.CreateVolumeRequest(name="v"), "size_bytes"),
    (admin_pb2.AttachVolumeRequest(name="v"), "node"),
])
def test_required_fields(served, stubs, request_, field):
    admin, _ = stubs
    method = {"CreateVolumeRequest": admin.CreateVolume, "AttachVolumeRequest": admin.AttachVolume}
    code, details = code_of(method[type(request_).__name__], request_)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required")
    assert not served.service.list_volumes()


def test_bad_input_changes_nothing(served, stubs):
    admin, registration = stubs
    register(registration, "node-a")
    for request, code in [
        (admin_pb2.CreateVolumeRequest(name="Bad_Name", size_bytes=GiB), grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.CreateVolumeRequest(name="v", size_bytes=1000), grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.CreateVolumeRequest(name="v", size_bytes=(1 << 64) - 512), grpc.StatusCode.INVALID_ARGUMENT),
        (admin_pb2.CreateVolumeRequest(name="v", size_bytes=GiB, pool="nope"), grpc.StatusCode.NOT_FOUND),
        (admin_pb2.CreateVolumeRequest(name="v", size_bytes=1 << 40), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]:
        assert code_of(admin.CreateVolume, request)[0] == code, request
    code, _ = code_of(admin.CreatePool, admin_pb2.CreatePoolRequest(name="p", overcommit_ratio=0.5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not served.service.list_volumes() and [p.name for p in served.service.list_pools()] == ["default"]


def test_attach_to_an_unhealthy_node_is_refused(served, stubs):
    admin, registration = stubs
    register(registration, "node-a")
    register(registration, "node-b", 7461)
    admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="vol1", size_bytes=GiB))
    served.clock.now += ControllerSettings().heartbeat_timeout + 1
    registration.Heartbeat(agent_pb2.HeartbeatRequest(node_id="node-a"))
    code, details = code_of(admin.AttachVolume, admin_pb2.AttachVolumeRequest(name="vol1", node="node-b"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "node node-b is unhealthy" in details
    assert admin.GetNode(admin_pb2.GetNodeRequest(id="node-b")).health == "unhealthy"


def test_snapshots_and_clones_over_grpc(served, stubs):
    """CreateSnapshot/GetSnapshot/ListSnapshots/CloneVolume/DeleteSnapshot: answers, progress, codes."""
    admin, registration = stubs
    register(registration, "node-a")
    admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="vol1", size_bytes=GiB))
    served.agents.copy_steps = 2  # background copies, done after two looks
    snap = admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(name="snap1", volume="vol1"))
    assert (snap.volume, snap.size_bytes, snap.state, snap.owner_node, snap.disk) == (
        "vol1", GiB, "creating", "node-a", "data0")
    assert admin.GetSnapshot(admin_pb2.GetSnapshotRequest(name="snap1")).progress == 0.5
    listed = admin.ListSnapshots(admin_pb2.ListSnapshotsRequest(volume="vol1")).snapshots
    assert [(s.name, s.state, s.progress) for s in listed] == [("snap1", "ready", 1.0)]
    assert admin.ListSnapshots(admin_pb2.ListSnapshotsRequest(volume="vol9")).snapshots == []
    code, details = code_of(admin.CreateSnapshot, admin_pb2.CreateSnapshotRequest(name="snap1", volume="vol2"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "of volume vol1" in details
    code, details = code_of(admin.CreateSnapshot, admin_pb2.CreateSnapshotRequest(name="snap2"))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "volume is required")

    clone = admin.CloneVolume(admin_pb2.CloneVolumeRequest(name="vol2", source="snap1"))
    assert (clone.state, clone.source, clone.owner_node, clone.progress) == (
        "creating", "snapshot/snap1", "node-a", 0.0)
    assert admin.GetVolume(admin_pb2.GetVolumeRequest(name="vol2")).progress == 0.5
    listed = admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes
    assert [(v.name, v.progress) for v in listed] == [("vol1", 0.0), ("vol2", 0.5)]
    code, details = code_of(admin.DeleteSnapshot, admin_pb2.DeleteSnapshotRequest(name="snap1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "being cloned to vol2" in details
    assert admin.GetVolume(admin_pb2.GetVolumeRequest(name="vol2")).state == "available"
    code, details = code_of(admin.DeleteVolume, admin_pb2.DeleteVolumeRequest(name="vol1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has snapshots (snap1)" in details
    admin.DeleteSnapshot(admin_pb2.DeleteSnapshotRequest(name="snap1"))
    admin.DeleteSnapshot(admin_pb2.DeleteSnapshotRequest(name="snap1"))  # repeat: OK
    code, _ = code_of(admin.GetSnapshot, admin_pb2.GetSnapshotRequest(name="snap1"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unimplemented_and_bugs_internal(served, stubs, monkeypatch, caplog):
    admin, _ = stubs
    assert grpc_status(Unimplemented("x"))[0] == grpc.StatusCode.UNIMPLEMENTED

    def broken(*_):
        raise RuntimeError("internal detail /etc/shoal")
    monkeypatch.setattr(served.service, "list_nodes", broken)
    code, details = code_of(admin.ListNodes, admin_pb2.ListNodesRequest())
    assert code == grpc.StatusCode.INTERNAL and "/etc/shoal" not in details and "see its log" in details
    assert "internal detail /etc/shoal" in caplog.text  # the traceback is in the controller's log


# ---- TLS

def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and client certificates (an admin's, a node's), made by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=shoal-test-ca", cwd=d)
    for name, cn, extra in (("server", "shoal-server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "shoal-admin", ""), ("node", "shoal-node", ""), ("other", "other", ""),
                            ("uri", "node-7", "subjectAltName=URI:shoal-admin"),
                            ("email", "node-7", "subjectAltName=email:shoal-admin"),
                            ("upper", "node-7", "subjectAltName=DNS:SHOAL-ADMIN"),
                            ("node-a", "shoal-node", "subjectAltName=DNS:Node-A")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return d


def _creds(pki, client: bool) -> grpc.ChannelCredentials:
    read = lambda name: (pki / name).read_bytes()  # noqa: E731
    if client:
        return grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    return grpc.ssl_channel_credentials(read("ca.pem"))


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(pki, mutual):
    tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem") if mutual else "")
    s = Served(tls)
    try:
        with grpc.secure_channel(s.address, _creds(pki, client=True)) as channel:
            assert admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        with grpc.insecure_channel(s.address) as channel:  # plaintext to a TLS port fails
            assert code_of(lambda r: admin_pb2_grpc.AdminServiceStub(channel).GetStatus(r, timeout=5),
                           admin_pb2.GetStatusRequest())[0] == grpc.StatusCode.UNAVAILABLE
        if mutual:  # no client certificate: refused
            with grpc.secure_channel(s.address, _creds(pki, client=False)) as channel:
                assert code_of(lambda r: admin_pb2_grpc.AdminServiceStub(channel).GetStatus(r, timeout=5),
                               admin_pb2.GetStatusRequest())[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        s.server.stop(None)


def test_a_renewed_certificate_is_served_without_a_restart(pki, tmp_path, caplog):
    """The server's TLS files are read again when they change (a Secret volume swapped, cert-manager's renewal):
    the next connection gets the new certificate.  A change that does not load (the new certificate written
    before its key) is not taken: the old pair goes on being served, and a warning says why, once."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca2.key", "-out", "ca2.pem", "-days", "1",
             "-subj", "/CN=shoal-test-ca-2", cwd=tmp_path)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server2.key", "-out", "server2.csr",
             "-subj", "/CN=shoal-server", cwd=tmp_path)
    (tmp_path / "server2.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server2.csr", "-CA", "ca2.pem", "-CAkey", "ca2.key", "-CAcreateserial",
             "-out", "server2.pem", "-days", "1", "-extfile", "server2.ext", cwd=tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes((pki / "server.pem").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    s = Served(ServerTls(str(cert), str(key)))

    def trusted_by(ca) -> bool:  # a new channel: a new connection and handshake
        with grpc.secure_channel(s.address, grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
            try:
                admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
            return True

    try:
        assert trusted_by(pki / "ca.pem") and not trusted_by(tmp_path / "ca2.pem")
        caplog.set_level(logging.INFO, logger="shoal.tls")
        cert.write_bytes((tmp_path / "server2.pem").read_bytes())  # half of the renewal
        assert trusted_by(pki / "ca.pem") and trusted_by(pki / "ca.pem")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "still serving the previous certificate" in warnings[0], warnings
        assert "PRIVATE KEY" not in caplog.text
        key.write_bytes((tmp_path / "server2.key").read_bytes())  # ... and the rest
        assert trusted_by(tmp_path / "ca2.pem") and not trusted_by(pki / "ca.pem")
        assert f"TLS certificate {cert} reloaded" in caplog.text
    finally:
        s.server.stop(None)


def _creds_of(pki, name: str) -> grpc.ChannelCredentials:
    read = lambda file: (pki / file).read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(read("ca.pem"), read(f"{name}.key"), read(f"{name}.pem"))


@pytest.mark.parametrize("newkey, refused", [
    (["rsa:2048"], ""), (["rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048"], "an RSA-PSS key"),
    (["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], ""), (["ec", "-pkeyopt", "ec_paramgen_curve:secp384r1"], ""),
    (["ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"], "an ECDSA key on another curve"),
    (["ec", "-pkeyopt", "ec_paramgen_curve:secp224r1"], "an ECDSA key on another curve"),
    (["ed25519"], ""), (["ed448"], "an Ed448 key")], ids=lambda v: v if isinstance(v, str) else v[-1])
def test_a_tls_key_grpc_cannot_use_is_refused_by_name_before_binding(tmp_path, newkey, refused):
    """Python's OpenSSL loads keys gRPC's BoringSSL does not: gRPC then only failed to bind ("the port is in
    use"), or, at a renewal, kept the old certificate while the new one was logged as loaded.  The check at
    start (and at each renewal) now refuses them by name: exactly those gRPC itself refuses (asked here)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    _openssl("req", "-x509", "-newkey", *newkey, "-nodes", "-keyout", "k.key", "-out", "k.pem", "-days", "1",
             "-subj", "/CN=shoal-server", cwd=tmp_path)
    probe = grpc.server(ThreadPoolExecutor(1))
    try:
        pair = ((tmp_path / "k.key").read_bytes(), (tmp_path / "k.pem").read_bytes())
        credentials = grpc.ssl_server_credentials([pair])
        try:
            grpc_takes = bool(probe.add_secure_port("127.0.0.1:0", credentials))
        except RuntimeError:
            grpc_takes = False
    finally:
        probe.stop(None)
    assert grpc_takes == (not refused)
    if refused:
        with pytest.raises(ValueError, match=f"TLS key {tmp_path / 'k.key'}: {refused}, which gRPC cannot use"):
            Served(ServerTls(str(tmp_path / "k.pem"), str(tmp_path / "k.key")))
    else:
        Served(ServerTls(str(tmp_path / "k.pem"), str(tmp_path / "k.key"))).server.stop(None)


@pytest.mark.parametrize("name, admitted", [("uri", False), ("email", False), ("upper", True)])
def test_only_the_common_name_and_dns_names_of_a_certificate_count(pki, name, admitted):
    """The names a service admits are a certificate's CN or a DNS SAN (README): a URI or e-mail SAN
    ``shoal-admin`` passed as the admin's name too.  DNS names compare without case."""
    s = Served(ServerTls(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")))
    try:
        with grpc.secure_channel(s.address, _creds_of(pki, name)) as channel:
            call = lambda r: admin_pb2_grpc.AdminServiceStub(channel).ListVolumes(r, timeout=10)  # noqa: E731
            if admitted:
                call(admin_pb2.ListVolumesRequest())
            else:
                assert code_of(call, admin_pb2.ListVolumesRequest())[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        s.server.stop(None)


def test_mutual_tls_admits_each_service_only_its_callers_certificates(pki):
    """One CA signs the controller's, the nodes' and the admins' certificates (the chart, the test PKI): a node's
    certificate must not pass as an admin's (GetPublishSecret, DeleteVolume), nor an admin's as a node's."""
    tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    s = Served(tls)
    try:
        s.service.create_pool("default")
        admin_call = lambda channel: admin_pb2_grpc.AdminServiceStub(channel).ListVolumes(  # noqa: E731
            admin_pb2.ListVolumesRequest(), timeout=10)
        register = lambda channel: agent_pb2_grpc.RegistrationServiceStub(channel).Register(  # noqa: E731
            agent_pb2.RegisterRequest(node_id="node-a", initiator_iqn="iqn.2026-11.io.shoal:node:node-a",
                                      agent_address="127.0.0.1:1", portals=["127.0.0.1:3260"]), timeout=10)
        for name, call, allowed in (("client", admin_call, True), ("node", admin_call, False),
                                    ("other", admin_call, False), ("node", register, True),
                                    ("client", register, False), ("other", register, False)):
            with grpc.secure_channel(s.address, _creds_of(pki, name)) as channel:
                if allowed:
                    call(channel)
                    continue
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, refused.value)
        assert [n.id for n in s.service.list_nodes()] == ["node-a"]  # only the node's own call registered
    finally:
        s.server.stop(None)


@pytest.mark.parametrize("bound", [False, True], ids=["shared-certificates", "node-id-in-certificate"])
def test_a_node_registers_only_as_the_node_its_certificate_names(pki, bound):
    """With ``node_id_in_certificate`` (``--tls-node-id-in-certificate``) Register and Heartbeat take a node id
    only from a certificate that names it (CN or DNS SAN, without case) beside the nodes' name: node-a's
    certificate cannot register node-b or heartbeat for it, and the shared node certificate registers no one.
    Without it, any node certificate acts for any node (one certificate for all agents, as the chart makes)."""
    s = Served(ServerTls(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"),
                         node_id_in_certificate=bound))

    def outcome(cert: str, rpc: str, node_id: str) -> tuple[grpc.StatusCode, str] | None:
        with grpc.secure_channel(s.address, _creds_of(pki, cert)) as channel:
            stub = agent_pb2_grpc.RegistrationServiceStub(channel)
            try:
                if rpc == "register":
                    stub.Register(agent_pb2.RegisterRequest(
                        node_id=node_id, initiator_iqn=f"iqn.2026-11.io.shoal:node:{node_id}",
                        agent_address="127.0.0.1:1", portals=["127.0.0.1:3260"]), timeout=10)
                else:
                    stub.Heartbeat(agent_pb2.HeartbeatRequest(node_id=node_id), timeout=10)
            except grpc.RpcError as error:
                return error.code(), error.details()
        return None

    try:
        s.service.create_pool("default")
        assert outcome("node-a", "register", "node-a") is None
        assert outcome("node-a", "heartbeat", "node-a") is None
        denied = grpc.StatusCode.PERMISSION_DENIED
        refused = outcome("node-a", "heartbeat", "node-b")
        if bound:
            assert refused[0] == denied and "does not name node_id 'node-b'" in refused[1], refused
        else:
            assert refused[0] == grpc.StatusCode.NOT_FOUND  # taken: node-b never registered
        refused = outcome("node-a", "register", "node-b")
        assert (refused[0] == denied) if bound else refused is None, refused
        refused = outcome("node", "register", "node-c")  # the shared certificate: shoal-node, no node id
        assert (refused[0] == denied) if bound else refused is None, refused
        assert outcome("client", "register", "shoal-admin")[0] == denied  # an admin's certificate: never a node
        assert sorted(n.id for n in s.service.list_nodes()) == (["node-a"] if bound else ["node-a", "node-b",
                                                                                            "node-c"])
    finally:
        s.server.stop(None)


def test_node_id_in_certificate_needs_mutual_tls(tmp_path):
    with pytest.raises(ValueError, match="--tls-client-ca"):
        ServerTls("c.pem", "k.pem", node_id_in_certificate=True)


def test_the_names_each_service_admits_can_be_set():
    import argparse
    from controller.daemon import add_parser, settings_from_args
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())

    def parse(*argv):
        return settings_from_args(parser.parse_args(["controller", *argv]))[0].tls

    tls = parse("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                "--tls-admin-names", "ops, shoal-controller", "--tls-node-names", "node")
    assert tls.admin_names == ("ops", "shoal-controller") and tls.node_names == ("node",)
    with pytest.raises(ValueError, match="at least one"):
        parse("--tls-cert", "c", "--tls-key", "k", "--tls-admin-names", ",")
    assert not tls.node_id_in_certificate
    assert parse("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                 "--tls-node-id-in-certificate").node_id_in_certificate
    for without in ((), ("--tls-cert", "c.pem", "--tls-key", "k.pem")):  # no client certificates: nothing to check
        with pytest.raises(ValueError, match="--tls-node-id-in-certificate needs"):
            parse(*without, "--tls-node-id-in-certificate")


def test_tls_needs_cert_and_key():
    with pytest.raises(ValueError, match="certificate"):
        ServerTls("", "key.pem")
    with pytest.raises(ValueError, match="needs its key"):
        AgentTls(cert="c.pem")


# ---- the agent client against a boundary fake of AgentService

class FlakyAgent(agent_pb2_grpc.AgentServiceServicer):
    """Fails the next ``failures`` calls with ``code``, then answers; echoes a secret into one error."""

    def __init__(self):
        self.failures: list[grpc.StatusCode] = []
        self.calls: list[str] = []
        self.secrets: list[str] = []
        self.stall = 0.0  # seconds each call takes before it answers
        self.deadlines: list[float] = []  # the time each call had left when it arrived

    def _enter(self, name, context):
        self.calls.append(name)
        self.deadlines.append(context.time_remaining())
        time.sleep(self.stall)
        if self.failures:
            context.abort(self.failures.pop(0), f"{name} failed on purpose")

    def CreateVolume(self, request, context):
        self._enter("CreateVolume", context)
        return agent_pb2.VolumeInfo(volume_id=request.volume_id, size_bytes=request.size_bytes, disk=request.disk)

    def ExportVolume(self, request, context):
        self.calls.append("ExportVolume")
        self.secrets.append(request.chap_secret)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad secret {request.chap_secret}")

    def AttachVolume(self, request, context):
        self._enter("AttachVolume", context)
        self.secrets.append(request.chap_secret)
        assert request.export.target_iqn and request.mode == "userspace"
        return agent_pb2.AttachVolumeResponse(device_path="/dev/loop9")

    def GetState(self, request, context):
        self._enter("GetState", context)
        return agent_pb2.AgentState(node_id="node-a", volumes=[agent_pb2.VolumeInfo(volume_id="v", size_bytes=512)],
                                    exports=[common_pb2.ExportInfo(volume_id="v", target_iqn="iqn.2026-11.x:t",
                                                                   initiators=["iqn.2026-11.x:i"])])


@pytest.fixture
def flaky():
    servicer = FlakyAgent()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    node = Node("node-a", "iqn.2026-11.x:a", f"127.0.0.1:{port}", ("127.0.0.1:3260",), {}, (), "healthy", 0.0)
    directory = GrpcAgentDirectory(AgentCallSettings(timeout=5, attempts=3, initial_backoff=0.01, max_backoff=0.02))
    yield servicer, directory.client(node)
    directory.close()
    server.stop(None)


def test_agent_client_retries_unavailable_then_succeeds(flaky):
    agent, client = flaky
    agent.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    client.create_volume("v", GiB, "data0", True)
    assert agent.calls == ["CreateVolume"] * 3


def test_agent_client_gives_up_with_a_domain_error_naming_the_node(flaky):
    agent, client = flaky
    agent.failures = [grpc.StatusCode.UNAVAILABLE] * 3
    with pytest.raises(errors.Unavailable, match="agent of node node-a .* is unreachable"):
        client.create_volume("v", GiB, "data0", True)
    agent.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with pytest.raises(errors.ResourceExhausted, match="agent of node node-a: CreateVolume"):
        client.create_volume("v", GiB, "data0", True)
    assert agent.calls.count("CreateVolume") == 4  # permanent errors are not retried


def test_agent_client_retries_share_one_deadline(flaky):
    """A call's deadline covers its retries: an agent that is slow to answer is not asked again after the
    deadline (nor given a fresh one per attempt), so the controller never goes on with a call its caller (a
    CSI sidecar with the same timeout) has given up on and is about to send again."""
    agent, client = flaky
    client._settings = AgentCallSettings(timeout=1.5, attempts=3, initial_backoff=0.01, max_backoff=0.02)
    agent.stall = 0.6
    agent.failures = [grpc.StatusCode.UNAVAILABLE] * 3  # each after 0.6 s: a third attempt would end at 1.8 s
    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match="node-a"):
        client.create_volume("v", GiB, "data0", True)
    assert time.monotonic() - started < 1.5 + 0.5
    assert agent.calls == ["CreateVolume"] * 3 and 0.8 < agent.deadlines[0] <= 1.6
    assert agent.deadlines[1] < 0.95 and agent.deadlines[2] < 0.35  # what was left, not 1.5 s each time
    agent.calls.clear()
    agent.stall, agent.failures = 2.0, []  # the first attempt uses up the deadline: no second one
    with pytest.raises(errors.Unavailable, match="did not answer CreateVolume in time"):
        client.create_volume("v", GiB, "data0", True)
    assert agent.calls == ["CreateVolume"]


def test_agent_calls_only_while_the_directory_may_call(flaky):
    """A replica elected by a Lease calls agents only while the Lease is surely its own (``may_call``, set to
    ``LeaderElector.holds_lease`` by the daemon), as it writes the store: after renewals stop, no call of it
    starts (nor its next retry) that could cross a new leader's."""
    agent, client = flaky
    allowed = [True]
    client._may_call = lambda: allowed[0]
    client.create_volume("v", GiB, "data0", True)
    allowed[0] = False
    with pytest.raises(errors.Unavailable, match="not surely the leader any more"):
        client.create_volume("v", GiB, "data0", True)
    assert agent.calls == ["CreateVolume"]
    allowed[0] = True
    agent.failures = [grpc.StatusCode.UNAVAILABLE]  # the first attempt fails; before the retry, the Lease is gone

    def lost_after_first_attempt():
        ok = allowed[0]
        allowed[0] = False
        return ok

    client._may_call = lost_after_first_attempt
    with pytest.raises(errors.Unavailable, match="not surely the leader any more"):
        client.create_volume("v", GiB, "data0", True)
    assert agent.calls == ["CreateVolume"] * 2


def test_agent_client_keeps_secrets_out_of_errors(flaky):
    agent, client = flaky
    with pytest.raises(errors.InvalidArgument) as caught:
        client.export_volume("v", "iqn.2026-11.x:i", "user", SECRET_MARK)
    assert agent.secrets == [SECRET_MARK] and SECRET_MARK not in str(caught.value)
    assert "<secret>" in str(caught.value) and SECRET_MARK not in repr(client)


def test_agent_client_attach_and_state(flaky):
    agent, client = flaky
    export = {"volume_id": "v", "target_iqn": "iqn.2026-11.x:t", "portals": ["127.0.0.1:3260"], "lun": 0,
              "naa": "6abc", "serial": "v", "chap_user": "u"}
    assert client.attach_volume(export, SECRET_MARK, "userspace") == "/dev/loop9"
    state = client.get_state()
    assert state["volumes"][0]["size_bytes"] == 512 and state["exports"][0]["initiators"] == ["iqn.2026-11.x:i"]


def test_agent_client_unreachable_agent(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        node = Node("node-z", "iqn.2026-11.x:z", f"127.0.0.1:{port}", ("127.0.0.1:1",), {}, (), "healthy", 0.0)
        directory = GrpcAgentDirectory(AgentCallSettings(timeout=2, attempts=2, initial_backoff=0.01))
        try:
            with pytest.raises(errors.Unavailable, match="node-z"):
                directory.client(node).get_state()
        finally:
            directory.close()


# ---- shoal controller as a process

@pytest.mark.slow
def test_controller_process_keeps_state_across_a_restart(tmp_path):
    with running(start_controller(tmp_path)) as controller:
        with grpc.insecure_channel(controller.address) as channel:
            register(agent_pb2_grpc.RegistrationServiceStub(channel), "node-a")
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.CreatePool(admin_pb2.CreatePoolRequest(name="fast", members=[
                admin_pb2.PoolMember(node_id="node-a", disk="data0")], overcommit_ratio=2))
    assert controller.process.returncode == 0 and "controller stopped" in controller.log()
    with running(start_controller(tmp_path)) as controller:
        with grpc.insecure_channel(controller.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            assert [n.id for n in admin.ListNodes(admin_pb2.ListNodesRequest()).nodes] == ["node-a"]
            assert admin.GetPool(admin_pb2.GetPoolRequest(name="fast")).overcommit_ratio == 2


def test_controller_busy_port_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "node_agent.cli", "controller", "--db",
                                 str(tmp_path / "c.db"), "--listen", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# ---- shoal up

def _start_up(tmp_path, context, csi_dir=""):
    env = dict(os.environ, SHOAL_CONTEXT=str(context), PYTHONPATH=str(REPO))
    env.pop("SHOAL_CONTROLLER", None)
    args = [sys.executable, "-m", "node_agent.cli", "up", "--data-dir", str(tmp_path / "state"), "--node-id", "solo",
            "--controller", "127.0.0.1:0", "--agent", "127.0.0.1:0", "--portal", "127.0.0.1:0",
            "--controller-metrics", "127.0.0.1:0", "--agent-metrics", "127.0.0.1:0", "--csi-dir", csi_dir]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not context.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise AssertionError(f"shoal up did not start:\n{process.stderr.read()}")
        time.sleep(0.1)
    return process, env


def _ctl(env, *args):
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shoal_up_runs_a_pool_and_a_restart_keeps_it(tmp_path):
    context = tmp_path / "context.json"
    process, env = _start_up(tmp_path, context)
    try:
        status = json.loads(_ctl(env, "status", "-o", "json").stdout)  # found through the context file
        assert (status["nodes"], status["healthy_nodes"]) == (1, 1)
        assert [p["name"] for p in json.loads(_ctl(env, "pool", "list", "-o", "json").stdout)["pools"]] == ["default"]
        created = _ctl(env, "volume", "create", "demo", "--size", "64MiB")
        assert created.returncode == 0 and "on solo/data0" in created.stdout
        controller_pid = json.loads((tmp_path / "state" / "controller.ready").read_text())["pid"]
        os.kill(process.pid, signal.SIGINT)  # Ctrl-C
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "shoalctl status" in out and "stopping" in err
        assert re.search(r"Prometheus metrics: controller http://127\.0\.0\.1:\d+/metrics, "
                         r"agent http://127\.0\.0\.1:\d+/metrics", out), out
        with pytest.raises(ProcessLookupError):
            os.kill(controller_pid, 0)  # the children went with it
    finally:
        stop_process(process)
    context.unlink()
    process, env = _start_up(tmp_path, context)
    try:
        volumes = json.loads(_ctl(env, "volume", "list", "-o", "json").stdout)["volumes"]
        assert [(v["name"], v["size_bytes"], v["owner_node"]) for v in volumes] == [("demo", 64 << 20, "solo")]
        os.kill(process.pid, signal.SIGTERM)
        process.communicate(timeout=60)
        assert process.returncode == 0
    finally:
        stop_process(process)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shoal_up_serves_both_csi_sockets(tmp_path):
    """`shoal up` serves the CSI Controller and Node services on unix sockets (issue 5), removed on stop."""
    import tempfile

    import grpc

    from protos.csi.v1 import csi_pb2, csi_pb2_grpc

    with tempfile.TemporaryDirectory(prefix="shoal-csi-", dir="/tmp") as short:  # sun_path is 108 bytes
        process, _ = _start_up(tmp_path, tmp_path / "context.json", csi_dir=short)
        try:
            sockets = {name: Path(short) / f"{name}.sock" for name in ("controller", "node")}
            for name, path in sockets.items():
                with grpc.insecure_channel(f"unix://{path}") as channel:
                    info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
                    assert info.name == "csi.shoal.io", name
            with grpc.insecure_channel(f"unix://{sockets['node']}") as channel:
                assert csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id \
                    == "solo"
            os.kill(process.pid, signal.SIGINT)
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0 and f"CSI: controller {sockets['controller']}" in out
            assert not any(p.exists() for p in sockets.values())
        finally:
            stop_process(process)
