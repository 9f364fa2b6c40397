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
    def __init__(self, interval: float, beat_interval: float = 0.0):
        self.interval = interval
        self.beat_interval = beat_interval  # what each HeartbeatResponse says (0: nothing, as before the field)
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
        return agent_pb2.HeartbeatResponse(heartbeat_interval_seconds=self.beat_interval)


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


def test_a_disk_that_cannot_be_read_does_not_silence_the_heartbeats():
    """``disks()`` failing (a disk's directory gone while it is remounted) used to end the registration thread:
    no heartbeat ever again, and the live node was marked unhealthy and could be fenced.  Now the beat goes
    without disks (the controller keeps those it knows) and the disks come back with the next readable beat."""
    port = free_port()
    controller = Controller(interval=0.05)
    server = serve(controller, port)
    broken = threading.Event()

    def flaky_disks():
        if broken.is_set():
            raise FileNotFoundError(2, "No such file or directory", "/srv/d0/volumes")
        return disks()
    registrar = Registrar(NODE, flaky_disks, grpc.insecure_channel(f"127.0.0.1:{port}"), timeout=1)
    registrar.start()
    try:
        wait_for(lambda: len(controller.heartbeats) >= 1)
        broken.set()
        seen = len(controller.heartbeats)
        wait_for(lambda: len(controller.heartbeats) >= seen + 3)
        assert registrar._thread.is_alive()
        assert not controller.heartbeats[-1].disks  # sent without disks
        broken.clear()
        seen = len(controller.heartbeats)
        wait_for(lambda: len(controller.heartbeats) > seen and controller.heartbeats[-1].disks)
    finally:
        registrar.stop()
        server.stop(None)


def test_register_is_retried_when_the_disks_cannot_be_read():
    port = free_port()
    controller = Controller(interval=0.05)
    server = serve(controller, port)
    calls = []

    def flaky_disks():
        calls.append(1)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", "/srv/d0")
        return disks()
    registrar = Registrar(NODE, flaky_disks, grpc.insecure_channel(f"127.0.0.1:{port}"), timeout=1,
                          max_backoff=0.1)
    registrar.start()
    try:
        wait_for(registrar.registered.is_set)
        assert len(controller.registers) == 1 and len(calls) >= 2
    finally:
        registrar.stop()
        server.stop(None)


def test_the_heartbeat_follows_the_interval_each_answer_gives():
    """A controller restarted with a shorter interval (and timeout) answers heartbeats without a new Register:
    the agent used to keep the interval of its Register for good, so the new controller's timeout judged beats
    it could never get in time, and the node flapped unhealthy (and was fenced)."""
    port = free_port()
    controller = Controller(interval=0.2, beat_interval=0.02)  # registered at 0.2 s; the beats now say 0.02 s
    server = serve(controller, port)
    registrar = Registrar(NODE, disks, grpc.insecure_channel(f"127.0.0.1:{port}"), timeout=1)
    registrar.start()
    try:
        wait_for(lambda: len(controller.heartbeats) >= 1)
        seen, started = len(controller.heartbeats), time.monotonic()
        wait_for(lambda: len(controller.heartbeats) >= seen + 10)
        assert time.monotonic() - started < 10 * 0.2  # at the shorter interval, not the Register's
    finally:
        registrar.stop()
        server.stop(None)
