"""The agent assembled in-process (``Agent``): TLS on AgentService, registration with advertised addresses.

Certificates are made by ``openssl`` for the test (skipped without it); the
controller is a recording RegistrationService over real gRPC on 127.0.0.1;
connectors are never built (no attach happens here).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from controller.agents_grpc import AgentTls, open_channel
from node_agent.agent.daemon import Agent
from node_agent.agent.settings import AgentSettings, TlsFiles
from node_agent.host.connector import preferred_connector
from node_agent.tls_reload import ReloadingServerTls
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import require_tools


def make_certificates(tmp_path, san: str = "IP:127.0.0.1"):
    require_tools("openssl")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"),
            "-days", "1", "-subj", "/CN=shoal-test-ca")
    (tmp_path / "san.ext").write_text(f"subjectAltName={san}\n")
    # the client certificates' names: the controller's, and a node's (the chart's shared node.crt)
    for name, cn in (("server", "server"), ("client", "shoal-controller"), ("node", "shoal-node")):
        openssl("req", *ec, "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.csr"),
                "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", str(tmp_path / f"{name}.csr"), "-CA", str(tmp_path / "ca.pem"),
                "-CAkey", str(tmp_path / "ca.key"), "-CAcreateserial", "-out", str(tmp_path / f"{name}.pem"),
                "-days", "1", "-extfile", str(tmp_path / "san.ext"))
    return {name: (tmp_path / name).read_bytes() for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "node.pem", "node.key")}


def settings(tmp_path, **kw) -> AgentSettings:
    fields = dict(node_id="n1", data_dir=str(tmp_path / "data"), listen="127.0.0.1:0",
                  portal_listen="127.0.0.1:0", controller="")
    fields.update(kw)
    return AgentSettings(**fields)


def test_agent_service_with_mutual_tls(tmp_path):
    pem = make_certificates(tmp_path)
    tls = TlsFiles(str(tmp_path / "server.pem"), str(tmp_path / "server.key"), str(tmp_path / "ca.pem"))
    agent = Agent(settings(tmp_path, server_tls=tls), connectors={})
    agent.start()
    try:
        good = grpc.ssl_channel_credentials(pem["ca.pem"], pem["client.key"], pem["client.pem"])
        with grpc.secure_channel(agent.agent_address, good) as channel:
            state = agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=10)
            assert state.node_id == "n1" and [d.name for d in state.disks] == ["data0"]
        # a certificate of the same CA with another name (a node's) may not call AgentService: it could export
        # any volume on this node to itself and read it
        node = grpc.ssl_channel_credentials(pem["ca.pem"], pem["node.key"], pem["node.pem"])
        with grpc.secure_channel(agent.agent_address, node) as channel, pytest.raises(grpc.RpcError) as refused:
            agent_pb2_grpc.AgentServiceStub(channel).ExportVolume(
                agent_pb2.ExportVolumeRequest(volume_id="v1", initiator_iqn="iqn.2026-11.io.x:evil"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "shoal-node" in refused.value.details() and "AgentService" in refused.value.details()
        no_client_cert = grpc.ssl_channel_credentials(pem["ca.pem"])
        for channel in (grpc.secure_channel(agent.agent_address, no_client_cert),
                        grpc.insecure_channel(agent.agent_address)):
            with channel, pytest.raises(grpc.RpcError):
                agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=5)
    finally:
        agent.stop()


def test_controller_checks_a_shared_node_certificate_by_name(tmp_path):
    """The chart gives every node one certificate named ``shoal-node``; the controller dials agents by IP."""
    make_certificates(tmp_path, san="DNS:shoal-node")
    tls = TlsFiles(str(tmp_path / "server.pem"), str(tmp_path / "server.key"), str(tmp_path / "ca.pem"))
    agent = Agent(settings(tmp_path, server_tls=tls), connectors={})
    agent.start()
    try:
        files = dict(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "client.pem"), key=str(tmp_path / "client.key"))
        with open_channel(agent.agent_address, AgentTls(**files, server_name="shoal-node")) as channel:
            state = agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=10)
            assert state.node_id == "n1"
        for wrong in (AgentTls(**files), AgentTls(**files, server_name="other-node")):
            with open_channel(agent.agent_address, wrong) as channel, pytest.raises(grpc.RpcError) as failed:
                agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        agent.stop()


class Controller(agent_pb2_grpc.RegistrationServiceServicer):
    def __init__(self):
        self.registers = []

    def Register(self, request, context):
        self.registers.append(request)
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=60)

    def Heartbeat(self, request, context):
        return agent_pb2.HeartbeatResponse()


def test_agent_registers_its_advertised_addresses(tmp_path):
    controller = Controller()
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(controller, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    agent = Agent(settings(tmp_path, controller=f"127.0.0.1:{port}", labels={"zone": "b"}), connectors={})
    agent.start()
    try:
        assert agent.registrar.registered.wait(10)
        request = controller.registers[0]
        assert request.agent_address == agent.agent_address
        assert list(request.portals) == [agent.portal_address]
        assert request.initiator_iqn == "iqn.2026-11.io.shoal:node:n1"
        # the agent adds the connector its CSI NodeStageVolume logs in with (node_agent.host.connector)
        assert dict(request.labels) == {"zone": "b", "shoal.io/connector": preferred_connector()}
        assert request.disks[0].name == "data0"
    finally:
        agent.stop()
        server.stop(None)


def test_a_wildcard_portal_needs_an_advertised_address(tmp_path):
    agent = Agent(settings(tmp_path, portal_listen="0.0.0.0:0"), connectors={})
    with pytest.raises(ValueError, match="advertise"):
        agent.start()
    assert agent.portal is None  # what started was stopped again
    started = time.monotonic()
    agent = Agent(settings(tmp_path, portal_listen="0.0.0.0:0", advertise_portals=("192.0.2.7:3260",)),
                  connectors={})
    agent.start()
    try:
        assert agent.exports.settings.portals == ("192.0.2.7:3260",)
    finally:
        agent.stop()
    assert time.monotonic() - started < 20


class PeerRecordingController(agent_pb2_grpc.RegistrationServiceServicer):
    """Registers and heartbeats answered every 0.1 s; records the client certificate of each call."""

    def __init__(self):
        self.peers: list[bytes] = []

    def _peer(self, context) -> None:
        self.peers.append(b"".join(context.auth_context().get("x509_pem_cert", [b""])))

    def Register(self, request, context):
        self._peer(context)
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=0.1)

    def Heartbeat(self, request, context):
        self._peer(context)
        return agent_pb2.HeartbeatResponse(heartbeat_interval_seconds=0.1)


def test_renewed_certificates_are_used_without_a_restart(tmp_path):
    """Every certificate and CA of a mutual-TLS pair of agent and controller is replaced on disk by one of
    another CA (a renewal with a new issuer: the hardest case).  The agent's AgentService serves its new
    certificate to new connections, and its heartbeats go out on a new channel with its new client
    certificate, without a restart; clients of the old CA are refused from then on."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = make_certificates(tmp_path / "old"), make_certificates(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()

    def install(pem) -> None:  # as a renewal does: every file replaced
        for name in ("ca.pem", "server.pem", "server.key", "node.pem", "node.key"):
            (live / name).write_bytes(pem[name])

    install(old)
    controller = PeerRecordingController()
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(controller, server)
    port = server.add_secure_port("127.0.0.1:0", ReloadingServerTls(
        str(live / "server.pem"), str(live / "server.key"), str(live / "ca.pem")).credentials())
    server.start()
    agent = Agent(settings(
        tmp_path, controller=f"127.0.0.1:{port}",
        server_tls=TlsFiles(str(live / "server.pem"), str(live / "server.key"), str(live / "ca.pem")),
        controller_tls=TlsFiles(str(live / "node.pem"), str(live / "node.key"), str(live / "ca.pem"))),
        connectors={})
    agent.start()

    def get_state(pem) -> bool:  # a new channel: a new connection and handshake
        creds = grpc.ssl_channel_credentials(pem["ca.pem"], pem["client.key"], pem["client.pem"])
        with grpc.secure_channel(agent.agent_address, creds) as channel:
            try:
                return agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(),
                                                                          timeout=5).node_id == "n1"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False

    try:
        assert agent.registrar.registered.wait(10)
        assert controller.peers[-1] == old["node.pem"]
        assert get_state(old) and not get_state(new)
        install(new)
        deadline = time.monotonic() + 10
        while controller.peers[-1] != new["node.pem"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert controller.peers[-1] == new["node.pem"]  # heartbeats carry the new client certificate
        assert get_state(new) and not get_state(old)
        assert agent.registrar.registered.is_set()  # never lost: no registration again
    finally:
        agent.stop()
        server.stop(None)
