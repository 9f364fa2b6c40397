"""Prometheus metrics: the controller's and the agent's collectors, the attach timer, the agent-error hook,
and the I/O counters of ``LogicalUnit`` (controller/metrics.py, node_agent/agent/metrics.py).

The controller runs over ``MemoryStore`` and ``FakeAgents`` (our own boundaries); the agent collector reads
stand-ins for the agent's managers and portal (``FakeAgent``), over real ``LogicalUnit`` objects.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controller.agents_grpc import AgentCallSettings, GrpcAgentClient
from controller.api.admin import AdminServicer
from controller.domain.agents import FakeAgents
from controller.domain.errors import Unavailable
from controller.domain.model import Disk
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.metrics import ControllerMetrics
from controller.store import MemoryStore
from node_agent.agent.metrics import AgentCollector
from node_agent.scsi.device import GOOD, LogicalUnit, LunIdentity
from node_agent.storage.backing import MemoryBackingStore
from protos.shoal.v1 import admin_pb2

GiB = 1 << 30


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def iqn(node_id: str) -> str:
    return f"iqn.2024-01.io.shoal:{node_id}"


@pytest.fixture
def controller():
    clock = Clock()
    service = ControllerService(MemoryStore(), FakeAgents(), clock=clock,
                                settings=ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20))
    for name, free in (("node-a", 90), ("node-b", 40)):
        service.register_node(name, iqn(name), "127.0.0.1:7000", ["127.0.0.1:3260"], {},
                              [Disk("data0", "/srv/data0", 100 * GiB, free * GiB)])
    metrics = ControllerMetrics()
    metrics.watch(service)
    return SimpleNamespace(service=service, metrics=metrics, clock=clock, agents=service.agents,
                           value=lambda name, **labels: metrics.registry.get_sample_value(name, labels))


def test_controller_gauges_follow_the_store(controller):
    value, svc = controller.value, controller.service
    assert value("shoal_controller_volumes", pool="default", state="available") == 0
    assert value("shoal_controller_pool_capacity_bytes", pool="default") == 200 * GiB
    assert value("shoal_controller_pool_free_bytes", pool="default") == 130 * GiB
    assert value("shoal_controller_nodes", health="healthy") == 2
    assert value("shoal_controller_nodes", health="unhealthy") == 0

    svc.create_volume("vol-1", GiB)
    svc.create_volume("vol-2", 2 * GiB)
    controller.agents.fail_next("create_volume", Unavailable("down"))
    with pytest.raises(Unavailable):
        svc.create_volume("vol-3", GiB)
    svc.attach_volume("vol-1", "node-b")
    svc.create_pool("fast", [("node-a", "data0")])

    assert value("shoal_controller_volumes", pool="default", state="available") == 1
    assert value("shoal_controller_volumes", pool="default", state="attached") == 1
    assert value("shoal_controller_volumes", pool="default", state="error") == 1
    assert value("shoal_controller_volumes", pool="fast", state="available") == 0
    assert value("shoal_controller_pool_provisioned_bytes", pool="default") == 4 * GiB
    assert value("shoal_controller_pool_capacity_bytes", pool="fast") == 100 * GiB
    assert value("shoal_controller_attachments", state="attached", mode="userspace") == 1
    assert value("shoal_controller_exports") == 1

    controller.clock.now += 21  # node-b falls silent; node-a heartbeats
    svc.heartbeat("node-a")
    assert value("shoal_controller_nodes", health="healthy") == 1
    assert value("shoal_controller_nodes", health="unhealthy") == 1


def test_controller_page_is_valid_text_format(controller):
    controller.service.create_volume("vol-1", GiB)
    page = generate_latest(controller.metrics.registry).decode()
    assert '# TYPE shoal_controller_volumes gauge' in page
    assert 'shoal_controller_volumes{pool="default",state="available"} 1.0' in page


class Context:
    """The bits of ``grpc.ServicerContext`` the ``rpc`` decorator uses."""

    def abort(self, code, details):
        raise RuntimeError(code, details)


def test_attach_duration_is_observed_with_its_outcome(controller):
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    servicer = AdminServicer(controller.service, controller.metrics)
    controller.service.create_volume("vol-1", GiB)
    metrics = controller.metrics

    real = metrics.time_attach
    metrics.time_attach = lambda mode: real(mode, clock=lambda: next(ticks))
    servicer.AttachVolume(admin_pb2.AttachVolumeRequest(name="vol-1", node="node-b"), Context())
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        servicer.AttachVolume(admin_pb2.AttachVolumeRequest(name="vol-9", node="node-b", mode="kernel"), Context())

    value = controller.value
    assert value("shoal_controller_attach_duration_seconds_count", mode="userspace", outcome="ok") == 1
    assert value("shoal_controller_attach_duration_seconds_sum", mode="userspace", outcome="ok") == 0.25
    assert value("shoal_controller_attach_duration_seconds_bucket", mode="userspace", outcome="ok", le="0.25") == 1
    assert value("shoal_controller_attach_duration_seconds_count", mode="kernel", outcome="NOT_FOUND") == 1


def test_attach_timer_bounds_the_mode_label():
    metrics = ControllerMetrics()
    with metrics.time_attach("telepathy"):
        pass
    assert metrics.registry.get_sample_value("shoal_controller_attach_duration_seconds_count",
                                             {"mode": "other", "outcome": "ok"}) == 1


class RpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "refused"


def test_agent_errors_are_counted_by_node_method_and_code():
    metrics = ControllerMetrics()

    def refuse(request, timeout):
        raise RpcError(grpc.StatusCode.UNAVAILABLE)

    stub = SimpleNamespace(CreateVolume=refuse)
    client = GrpcAgentClient("node-a", "127.0.0.1:1", stub, AgentCallSettings(attempts=2, initial_backoff=0.001),
                             sleep=lambda _: None, on_error=metrics.agent_error)
    with pytest.raises(Unavailable, match="node-a"):
        client.create_volume("v1", GiB, "data0", True)
    assert metrics.registry.get_sample_value("shoal_controller_agent_rpc_errors_total", {
        "node": "node-a", "method": "CreateVolume", "code": "UNAVAILABLE"}) == 1  # once per call, not per attempt


# ---- the agent ------------------------------------------------------------------------------------

def rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def new_unit(volume_id: str) -> LogicalUnit:
    return LogicalUnit(MemoryBackingStore(1 << 20), LunIdentity(volume_id=volume_id),
                       target_name=f"iqn.2024-01.io.shoal:target:{volume_id}")


def test_logical_unit_counts_reads_and_writes_that_reach_the_medium():
    unit = new_unit("vol-1")
    assert unit.io_counters() == (0, 0, 0, 0)
    assert unit.execute(None, rw10(0x2A, 0, 8), bytearray(4096), 4096).status == GOOD
    assert unit.execute(None, rw10(0x28, 0, 2), None, 1024).status == GOOD
    assert unit.execute(None, rw10(0x28, 0, 1), None, 512).status == GOOD
    # A short Data-Out writes the whole blocks it got; an out-of-range READ never reaches the medium.
    assert unit.execute(None, rw10(0x2A, 8, 4), bytearray(1100), 2048).status == GOOD
    assert unit.execute(None, rw10(0x28, 4096, 1), None, 512).status != GOOD
    assert unit.io_counters() == (2, 1536, 2, 4096 + 1024)


class FakePortal:
    def __init__(self, units, sessions: int = 0):
        self.service = SimpleNamespace(units=units, registry=SimpleNamespace(sessions=dict.fromkeys(range(sessions))))

    def call_within(self, timeout, fn, *args):
        return fn(*args)


class DeadPortal(FakePortal):
    def call_within(self, timeout, fn, *args):
        raise TimeoutError()


def fake_agent(portal):
    records = [SimpleNamespace(volume_id="vol-1", initiators=("iqn.a", "iqn.b")),
               SimpleNamespace(volume_id="vol-2", initiators=("iqn.a",))]
    return SimpleNamespace(
        portal=portal,
        exports=SimpleNamespace(records=lambda: records, unserved=lambda: {"vol-3": "its volume is missing"}),
        attachments=SimpleNamespace(list=lambda: [SimpleNamespace(mode="userspace")]),
        volumes=SimpleNamespace(list=lambda: [object()] * 3,
                                disks=lambda: [SimpleNamespace(name="data0", capacity=100, free=60)]))


def agent_registry(agent) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    return registry


def test_agent_collector_reads_lun_counters_and_state():
    vol1, vol2 = new_unit("vol-1"), new_unit("vol-2")
    registry = agent_registry(fake_agent(FakePortal([vol1, vol2], sessions=2)))
    value = registry.get_sample_value
    assert value("shoal_agent_lun_write_bytes_total", {"volume": "vol-1"}) == 0

    vol1.execute(None, rw10(0x2A, 0, 8), bytearray(4096), 4096)
    vol2.execute(None, rw10(0x28, 0, 4), None, 2048)
    assert value("shoal_agent_lun_write_commands_total", {"volume": "vol-1"}) == 1
    assert value("shoal_agent_lun_write_bytes_total", {"volume": "vol-1"}) == 4096
    assert value("shoal_agent_lun_read_bytes_total", {"volume": "vol-1"}) == 0
    assert value("shoal_agent_lun_read_commands_total", {"volume": "vol-2"}) == 1
    assert value("shoal_agent_lun_read_bytes_total", {"volume": "vol-2"}) == 2048
    assert value("shoal_agent_iscsi_sessions") == 2
    assert value("shoal_agent_exports") == 2
    assert value("shoal_agent_export_initiators") == 3
    assert value("shoal_agent_exports_unserved", {"volume": "vol-3"}) == 1
    assert value("shoal_agent_attachments", {"mode": "userspace"}) == 1
    assert value("shoal_agent_attachments", {"mode": "kernel"}) == 0
    assert value("shoal_agent_volumes") == 3
    assert value("shoal_agent_disk_capacity_bytes", {"disk": "data0"}) == 100
    assert value("shoal_agent_disk_free_bytes", {"disk": "data0"}) == 60


def test_agent_collector_reports_a_failed_or_running_sanitize(tmp_path):
    """``lun_sanitize{state}``: a LUN in the failed-sanitize state (here: opened on a file whose sanitize never
    finished) says so, so an operator can alert on it; the others say 0 for both states."""
    from node_agent.scsi.device import LogicalUnit
    from node_agent.scsi.vpd import LunIdentity
    from node_agent.storage.backing import FileBackingStore

    (tmp_path / "f.img.sanitize").write_text("{}")
    failed = LogicalUnit(FileBackingStore(tmp_path / "f.img", 1 << 20), LunIdentity(volume_id="vol-3"),
                         target_name="iqn.2026-01.io.shoal:t")
    try:
        registry = agent_registry(fake_agent(FakePortal([new_unit("vol-1"), failed])))
        value = registry.get_sample_value
        assert value("shoal_agent_lun_sanitize", {"volume": "vol-3", "state": "failed"}) == 1
        assert value("shoal_agent_lun_sanitize", {"volume": "vol-3", "state": "running"}) == 0
        assert value("shoal_agent_lun_sanitize", {"volume": "vol-1", "state": "failed"}) == 0
        failed._sanitize = [False]  # as ``LogicalUnit.sanitize`` marks a pass on its worker
        assert value("shoal_agent_lun_sanitize", {"volume": "vol-3", "state": "running"}) == 1
        assert value("shoal_agent_lun_sanitize", {"volume": "vol-3", "state": "failed"}) == 0
    finally:
        failed.close()


def test_agent_collector_reports_what_it_can_when_the_portal_does_not_answer():
    registry = agent_registry(fake_agent(DeadPortal([new_unit("vol-1")])))
    assert registry.get_sample_value("shoal_agent_lun_read_bytes_total", {"volume": "vol-1"}) is None
    assert registry.get_sample_value("shoal_agent_exports") == 2


def test_agent_collector_of_an_agent_not_started_is_empty():
    agent = SimpleNamespace(portal=None, exports=None, attachments=None, volumes=None)
    assert generate_latest(agent_registry(agent)) == b""


def test_provisioned_bytes_count_snapshots_as_the_pool_figures_do(controller):
    svc, value = controller.service, controller.value
    svc.create_volume("vol-1", 3 * GiB)
    svc.create_snapshot("snap-1", "vol-1")
    assert value("shoal_controller_pool_provisioned_bytes", pool="default") == 6 * GiB \
        == svc.pool_usage("default").provisioned_bytes
