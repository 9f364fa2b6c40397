"""``/metrics`` of a real ``shoal controller`` and real ``shoal agent`` processes, scraped over HTTP.

The controller's gauges follow what the admin API does (volumes by pool and
state, provisioned bytes, nodes by health); a refused AttachVolume lands in
the attach-latency histogram with its status code; an agent that stops makes
the controller's next call to it fail, counted by node, method and code.  On
the agent: a volume exported (AgentService, as the controller does it) and
written and read by Shoal's initiator over CHAP moves the LUN's I/O counters
by the bytes moved.  The reconcile loop is slowed down so that it does not
remove the export the test makes behind the controller's back.  Mocks: none.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.initiator.blockdev import SyncLun
from node_agent.iscsi.initiator.client import ClientSettings
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.support.controller_process import running, start_agent, start_controller

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20
METRICS = ["--metrics-listen", "127.0.0.1:0"]
CONSUMER = "iqn.2026-11.io.shoal.test:metrics-consumer"
USER, SECRET = "metrics-user", "metrics-secret-0123456789"


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_of_a_controller_and_its_agents(tmp_path):
    controller = start_controller(tmp_path / "controller", heartbeat_timeout=10.0, loop_interval=3600,
                                  extra_args=METRICS)
    with running(controller), \
            running(start_agent(tmp_path / "a", "node-a", controller.address, extra_args=METRICS)) as agent_a, \
            running(start_agent(tmp_path / "b", "node-b", controller.address, extra_args=METRICS)) as agent_b, \
            grpc.insecure_channel(controller.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        cm = controller.extra["metrics"]
        assert cm.startswith("127.0.0.1:") and agent_a.extra["metrics"].startswith("127.0.0.1:")
        wait_for(lambda: value(scrape(cm), "shoal_controller_nodes", health="healthy") == 2, 20, "two nodes")

        admin.CreatePool(admin_pb2.CreatePoolRequest(name="on-a", members=[
            admin_pb2.PoolMember(node_id="node-a", disk="data0")]))
        admin.CreatePool(admin_pb2.CreatePoolRequest(name="on-b", members=[
            admin_pb2.PoolMember(node_id="node-b", disk="data0")]))
        volume = admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="vol-m", size_bytes=64 * MiB, pool="on-a"))
        samples = scrape(cm)
        assert value(samples, "shoal_controller_volumes", pool="on-a", state="available") == 1
        assert value(samples, "shoal_controller_volumes", pool="on-b", state="available") == 0
        assert value(samples, "shoal_controller_pool_provisioned_bytes", pool="on-a") == 64 * MiB
        assert value(samples, "shoal_controller_pool_capacity_bytes", pool="on-a") > 0
        assert value(samples, "process_resident_memory_bytes") > 0

        # A refused attach is timed, labelled with its code.
        with pytest.raises(grpc.RpcError) as caught:
            admin.AttachVolume(admin_pb2.AttachVolumeRequest(name="vol-m", node="node-z"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert value(scrape(cm), "shoal_controller_attach_duration_seconds_count",
                     mode="userspace", outcome="NOT_FOUND") == 1

        # The agent: export the volume (as the controller does), then I/O from Shoal's initiator.
        am = agent_a.extra["metrics"]
        assert value(scrape(am), "shoal_agent_exports") == 0
        with grpc.insecure_channel(agent_a.address) as agent_channel:
            agent = agent_pb2_grpc.AgentServiceStub(agent_channel)
            info = agent.ExportVolume(agent_pb2.ExportVolumeRequest(
                volume_id=volume.id, initiator_iqn=CONSUMER, chap_user=USER, chap_secret=SECRET))
            samples = scrape(am)
            assert value(samples, "shoal_agent_exports") == 1
            assert value(samples, "shoal_agent_lun_write_bytes_total", volume=volume.id) == 0
            host, _, port = info.portals[0].rpartition(":")
            lun = SyncLun(host, int(port), info.target_iqn, 0, chap=(USER, initiator_secret(SECRET, CONSUMER)),
                          settings=ClientSettings(initiator_iqn=CONSUMER, login_timeout=5.0))
            try:
                before = scrape(am)
                lun.pwrite(MiB, b"m" * (256 * 1024))
                assert lun.pread(MiB, 64 * 1024) == b"m" * (64 * 1024)
                after = scrape(am)
                assert value(after, "shoal_agent_iscsi_sessions") == 1
            finally:
                lun.close()
            moved = {name: value(after, f"shoal_agent_lun_{name}_total", volume=volume.id)
                     - value(before, f"shoal_agent_lun_{name}_total", volume=volume.id)
                     for name in ("read_commands", "read_bytes", "write_commands", "write_bytes")}
            assert moved["write_bytes"] == 256 * 1024 and moved["write_commands"] >= 1
            assert moved["read_bytes"] == 64 * 1024 and moved["read_commands"] >= 1
            agent.UnexportVolume(agent_pb2.UnexportVolumeRequest(volume_id=volume.id, initiator_iqn=CONSUMER))
        assert value(scrape(am), "shoal_agent_exports") == 0

        # An agent that is gone: the controller's call to it fails (before the node turns unhealthy).
        agent_b.stop()
        with pytest.raises(grpc.RpcError) as caught:
            admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="vol-b", size_bytes=64 * MiB, pool="on-b"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        samples = scrape(cm)
        assert value(samples, "shoal_controller_agent_rpc_errors_total", node="node-b", method="CreateVolume",
                     code="UNAVAILABLE") == 1
        assert value(samples, "shoal_controller_volumes", pool="on-b", state="error") == 1
