"""Registration and heartbeat against a RegistrationService served over real gRPC on 127.0.0.1.

The controller side is a small recording servicer in this file (the real one
is tested with the controller); the agent's client, retries and timing are real.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node_agent.agent.registration import NodeAnnouncement, Registrar
from node_agent.agent.volumes import Disk
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc

NODE = NodeAnnouncement("n1", "iqn.2026-11.io.shoal:node:n1", "127.0.0.1:7071", ("127.0.0.1:3260",),
                        {"zone": "a"})


class Controller(agent_pb2_grpc.RegistrationServiceServicer):
    def __init__(self, interval: float):
        self.interval = interval
        self.registers: list[agent_pb2.RegisterRequest] = []
        self.heartbeats: list[agent_pb2.HeartbeatRequest] = []
        self.forget = threading.Event()

    def Register(self, request, context):
        self.registers.append(request)
        self.forget.clear()
        return agent_pb2.RegisterResponse(heartbeat_interval_seconds=self.interval)

    def Heartbeat(self, request, context):
        if self.forget.is_set():
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown node")
        self.heartbeats.append(request)
        return agent_pb2.HeartbeatResponse()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(controller: Controller, port: int) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_RegistrationServiceServicer_to_server(controller, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def disks():
    return [Disk("data0", "/srv/d0", 100, 60)]


def test_registers_once_the_controller_appears_then_heartbeats_and_reregisters_when_forgotten():
    port = free_port()
    registrar = Registrar(NODE, disks, grpc.insecure_channel(f"127.0.0.1:{port}"), timeout=1, max_backoff=0.2)
    registrar.start()
    controller = Controller(interval=0.05)
    try:
        time.sleep(0.5)  # the controller is not there yet: attempts fail and are retried
        assert not registrar.registered.is_set()
        server = serve(controller, port)
        try:
            wait_for(registrar.registered.is_set)
            first = controller.registers[0]
            assert (first.node_id, first.initiator_iqn, first.agent_address) == (NODE.node_id, NODE.initiator_iqn,
                                                                                 NODE.agent_address)
            assert list(first.portals) == ["127.0.0.1:3260"] and dict(first.labels) == {"zone": "a"}
            assert [(d.name, d.capacity_bytes, d.free_bytes) for d in first.disks] == [("data0", 100, 60)]
            wait_for(lambda: len(controller.heartbeats) >= 3)
            assert controller.heartbeats[0].disks[0].free_bytes == 60
            controller.forget.set()  # the controller lost its state: NOT_FOUND -> register again
            wait_for(lambda: len(controller.registers) >= 2)
        finally:
            server.stop(None)
    finally:
        registrar.stop()


def test_stop_ends_the_retry_loop_promptly():
    registrar = Registrar(NODE, disks, grpc.insecure_channel(f"127.0.0.1:{free_port()}"), timeout=1,
                          max_backoff=30)
    registrar.start()
    time.sleep(0.3)
    started = time.monotonic()
    registrar.stop()
    assert time.monotonic() - started < 3
    assert not registrar._thread.is_alive()


@pytest.mark.parametrize("interval", [0.0])
def test_zero_interval_falls_back_to_the_default(interval):
    port = free_port()
    controller = Controller(interval=interval)
    server = serve(controller, port)
    registrar = Registrar(NODE, disks, grpc.insecure_channel(f"127.0.0.1:{port}"), default_interval=0.05)
    try:
        assert registrar.register_until_done() == 0.05
    finally:
        registrar.channel.close()
        server.stop(None)
