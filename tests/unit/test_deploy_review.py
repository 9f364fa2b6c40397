"""Deployment review: the addresses the Helm chart hands the agent and the controller.

The chart passes the node's and the pod's IP as ``[$(NODE_IP)]:PORT`` / ``[$(POD_IP)]:PORT`` (the kubelet
substitutes the variable): one form for either address family, since an IPv6 address must be bracketed
(``fd00::1:7451`` reads two ways; Go's sidecars refuse it outright) and a bracketed IPv4 address is taken by
``shoal`` and by Go's ``net.SplitHostPort`` alike. These tests give ``shoal agent`` exactly those forms, with both
families on loopback, and check what it binds and what it tells the controller.
(The chart's rendered arguments themselves: tests/peer/test_helm_chart.py.)
"""

from __future__ import annotations

import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node_agent import cli
from node_agent.agent.daemon import Agent
from node_agent.agent.settings import check_address
from node_agent.metrics_server import MetricsServer
from prometheus_client import CollectorRegistry
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc


# -- the parser ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("[10.0.0.5]:7451", ("10.0.0.5", 7451)),   # the chart's form on an IPv4 node
    ("[fd00::5]:7451", ("fd00::5", 7451)),     # ... and on an IPv6 node
    ("10.0.0.5:7451", ("10.0.0.5", 7451)),
    ("fd00::5:7451", ("fd00::5", 7451)),       # unbracketed: the port is what follows the last ':'
])
def test_addresses_the_chart_and_users_write(text, expected):
    assert check_address(text, "--listen", bind=True) == expected
    assert check_address(text, "--advertise-portal", ip=True) == expected


@pytest.mark.parametrize("text, message", [
    ("[nope]:7451", "'nope' in brackets is not an IP address"),
    ("[10.0.0.5:7451", r"expected HOST:PORT \(an IPv6 address as \[ADDR\]:PORT\)"),
    ("10.0.0.5]:7451", r"expected HOST:PORT \(an IPv6 address as \[ADDR\]:PORT\)"),
    ("[fd00::5]", r"expected HOST:PORT \(an IPv6 address as \[ADDR\]:PORT\)"),
    # an IPv6 address ending in '::' cannot be written without brackets: 'fd00:' is no address
    ("fd00::7451", r"expected HOST:PORT \(an IPv6 address as \[ADDR\]:PORT\)"),
    ("::1", r"expected HOST:PORT \(an IPv6 address as \[ADDR\]:PORT\)"),
    ("[]:7451", "'' in brackets is not an IP address"),
])
def test_addresses_refused_with_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        check_address(text, "--listen", bind=True)


# -- the agent, started with the chart's address forms -----------------------------------------------------------
class _Controller(agent_pb2_grpc.RegistrationServiceServicer):
    def __init__(self):
        self.registers = []

    def Register(self, request, context):
        self.registers.append(request)
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=60)

    def Heartbeat(self, request, context):
        return agent_pb2.HeartbeatResponse()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("node_ip, family", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_agent_takes_the_charts_bracketed_node_ip(node_ip, family, tmp_path):
    """``--listen/--portal/--metrics-listen=[$(NODE_IP)]:PORT`` as the kubelet expands them on an IPv4 and an IPv6
    node: the agent starts, binds that family, and registers plain ``IP:PORT`` / bracketed ``[IPv6]:PORT``
    addresses (never ``[10.0.0.5]:PORT``) with the controller. Before the parser took a bracketed IPv4 address,
    the IPv4 case was refused as a usage error."""
    if family == socket.AF_INET6 and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    controller = _Controller()
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(controller, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    args = cli.build_parser("agent").parse_args([
        "agent", "--node-id", "n1", "--data-dir", str(tmp_path / "data"),
        f"--listen=[{node_ip}]:0", f"--portal=[{node_ip}]:0", f"--metrics-listen=[{node_ip}]:0",
        f"--controller=127.0.0.1:{port}"])
    agent = Agent(cli._agent_settings(args), connectors={})
    try:
        agent.start()
        assert agent.registrar.registered.wait(10)
        request = controller.registers[0]
        shown = f"[{node_ip}]" if family == socket.AF_INET6 else node_ip
        assert request.agent_address == agent.agent_address
        assert request.agent_address.rpartition(":")[0] == shown
        assert list(request.portals) == [agent.portal_address]
        assert agent.portal_address.rpartition(":")[0] == shown
        assert agent.metrics_address.rpartition(":")[0] == shown
        for address in (agent.agent_address, agent.portal_address):  # what it registered is what it serves
            host, _, listening = address.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(listening)), timeout=5):
                pass
        with urllib.request.urlopen(f"http://{agent.metrics_address}/metrics", timeout=5) as reply:
            assert reply.status == 200
    finally:
        agent.stop()
        server.stop(None)


@pytest.mark.parametrize("pod_ip", ["127.0.0.1", "::1"])
def test_controller_http_endpoints_take_the_charts_bracketed_pod_ip(pod_ip):
    """``--health-listen/--metrics-listen=[$(POD_IP)]:PORT``: the controller checks them with ``check_address``
    and serves them with ``HttpEndpoint`` (the metrics server here), on the pod IP's own family."""
    if ":" in pod_ip and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    listen = f"[{pod_ip}]:0"
    assert check_address(listen, "--health-listen", bind=True) == (pod_ip, 0)
    server = MetricsServer(listen, CollectorRegistry())
    address = server.start()
    try:
        assert address.rpartition(":")[0] == (f"[{pod_ip}]" if ":" in pod_ip else pod_ip)
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.stop()
