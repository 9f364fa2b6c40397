"""What the Kubernetes-only pieces of the controller decide, without an API server.

* ``OperationEvents`` (controller/k8s_events.py): which operation outcomes become Events, that an Event is sent
  only once the store transaction holding it committed (none for a rolled-back one), and that a CHAP secret never
  reaches a message.  The service runs for real over a ``MemoryStore`` with ``FakeAgents``; the recorder is
  ``Recorded``, a stand-in for ``EventRecorder.record`` (our own boundary: posting the Events to a real API server
  is tested in tests/peer/test_controller_ha.py).
* ``merge_labels`` (controller/k8s_nodes.py): the rule for Node topology labels.
* ``HealthServer`` and the standby gRPC server: real HTTP and gRPC on 127.0.0.1;
* ``shoal controller``'s ``--store kubernetes`` flags.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest

from controller.api.standby import build_standby_server
from controller.domain.agents import FakeAgents
from controller.domain.errors import Unavailable
from controller.domain.model import OP_DONE, OP_FAILED, OP_STARTED, ChapCredential, Disk
from controller.domain.service import ControllerService
from controller.health import HealthServer
from controller.k8s_events import OperationEvents, describe
from controller.k8s_nodes import merge_labels
from controller.store import MemoryStore
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

GiB = 1 << 30


class Recorded:
    """Keeps what ``EventRecorder.record`` would post."""

    def __init__(self):
        self.events: list[tuple[str, str, str, str, str]] = []

    def record(self, kind, name, type_, reason, message):
        self.events.append((kind, name, type_, reason, message))


@pytest.fixture
def env():
    recorder = Recorded()
    store = OperationEvents(MemoryStore(), recorder)
    agents = FakeAgents()
    service = ControllerService(store, agents, clock=lambda: 1000.0)
    for name in ("node-a", "node-b"):
        service.register_node(name, f"iqn.2024-01.io.shoal:{name}", "127.0.0.1:7000", ["127.0.0.1:3260"], {},
                              [Disk("data0", "/srv/data0", 100 * GiB, 90 * GiB)])
    return store, recorder, agents, service


def test_volume_lifecycle_becomes_events(env):
    store, recorder, agents, service = env
    service.create_volume("v1", GiB)
    service.attach_volume("v1", "node-b")
    service.detach_volume("v1", "node-b")
    service.delete_volume("v1")
    assert [(kind, name, type_, reason) for kind, name, type_, reason, _ in recorder.events] == [
        ("Volume", "v1", "Normal", "VolumeCreated"),
        ("Volume", "v1", "Normal", "VolumeAttached"),
        ("Volume", "v1", "Normal", "VolumeDetached"),
        ("Volume", "v1", "Normal", "VolumeDeleted"),
    ]
    assert recorder.events[0][4].startswith("create volume v1 (1.0 GiB on node-")


def test_a_failure_is_a_warning(env):
    store, recorder, agents, service = env
    agents.fail_next("create_volume", Unavailable("disk on fire"))
    with pytest.raises(Unavailable):
        service.create_volume("v1", GiB)
    (kind, name, type_, reason, message), = recorder.events
    assert (kind, name, type_, reason) == ("Volume", "v1", "Warning", "CreateVolumeFailed")
    assert "disk on fire" in message


def test_events_wait_for_the_commit_and_vanish_with_a_rollback(env):
    store, recorder, _, _ = env
    with store.transaction():
        op = store.record_operation(1.0, "expand_volume", "v9", OP_STARTED, "1 GiB -> 2 GiB")
        store.finish_operation(op, OP_DONE)
        assert recorder.events == []  # not committed yet
    assert [e[3] for e in recorder.events] == ["VolumeExpanded"]
    with pytest.raises(RuntimeError):
        with store.transaction():
            op = store.record_operation(2.0, "delete_volume", "v9", OP_STARTED)
            store.finish_operation(op, OP_DONE)
            raise RuntimeError("the store write failed")
    assert [e[3] for e in recorder.events] == ["VolumeExpanded"]  # the rolled-back delete reported nothing


def test_operations_recorded_finished_are_reported_and_started_ones_are_not(env):
    store, recorder, _, _ = env
    store.record_operation(1.0, "create_snapshot", "s1", OP_DONE, "background copy done")
    store.record_operation(1.0, "clone_volume", "c1", OP_FAILED, "the copy failed")
    store.record_operation(1.0, "delete_volume", "v1", OP_STARTED, "reconcile")
    assert [(e[0], e[1], e[2], e[3]) for e in recorder.events] == [
        ("Snapshot", "s1", "Normal", "SnapshotCreated"), ("Volume", "c1", "Warning", "CloneVolumeFailed")]


def test_no_chap_secret_reaches_an_event(env):
    store, recorder, _, service = env
    service.create_volume("v1", GiB)
    service.attach_volume("v1", "node-b")
    secret = store.get_chap("v1").secret
    op = store.record_operation(1.0, "attach_volume", "v1", OP_STARTED)
    store.finish_operation(op, OP_FAILED, f"agent said: login with {secret} refused")
    assert recorder.events[-1][4].endswith("agent said: login with <secret> refused")
    assert not any(secret in e[4] for e in recorder.events)
    store.put_chap("v2", ChapCredential("u", "another-secret-value"))
    store.record_operation(1.0, "create_volume", "v2", OP_FAILED, "another-secret-value leaked")
    assert recorder.events[-1][4].endswith("<secret> leaked")


def test_describe_table():
    assert describe("delete_snapshot", "s1", OP_FAILED, "from a/d", "busy") == \
        ("Snapshot", "Warning", "DeleteSnapshotFailed", "delete snapshot s1 (from a/d) failed: busy")
    assert describe("something_new", "x", OP_DONE, "", "") == ("Volume", "Normal", "OperationDone",
                                                               "something new x done")


def test_the_wrapper_is_the_store_otherwise(env):
    store, _, _, service = env
    assert [n.id for n in store.list_nodes()] == ["node-a", "node-b"]
    assert isinstance(store.store, MemoryStore)


# ---- Node labels ---------------------------------------------------------------------------------------

def test_node_topology_labels_win_and_others_stay_out():
    agent = {"topology.kubernetes.io/zone": "agent-zone", "rack": "r1", "topology.shoal.io/row": "2"}
    node = {"topology.kubernetes.io/zone": "zone-a", "topology.kubernetes.io/region": "eu",
            "kubernetes.io/hostname": "h1", "kubernetes.io/os": "linux", "node-role.kubernetes.io/worker": "",
            "topology.shoal.io/row": "3"}
    assert merge_labels(agent, node) == {"topology.kubernetes.io/zone": "zone-a", "rack": "r1",
                                         "topology.kubernetes.io/region": "eu", "kubernetes.io/hostname": "h1",
                                         "topology.shoal.io/row": "3"}
    assert merge_labels(agent, {}) == agent


# ---- /readyz and the standby server ----------------------------------------------------------------------

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def test_health_server_answers_readiness():
    state = {"ready": False}
    server = HealthServer("127.0.0.1:0", lambda: (state["ready"], "leader" if state["ready"] else "standby"))
    address = server.start()
    try:
        assert _get(f"http://{address}/healthz") == (200, "ok")
        assert _get(f"http://{address}/readyz") == (503, "standby")
        state["ready"] = True
        assert _get(f"http://{address}/readyz") == (200, "leader")
        assert _get(f"http://{address}/metrics")[0] == 404
    finally:
        server.stop()


def test_standby_server_refuses_every_call_naming_the_leader():
    leader = {"name": ""}
    server, port = build_standby_server("127.0.0.1:0", lambda: leader["name"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="v", size_bytes=GiB), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no leader is elected yet" in refused.value.details()
            leader["name"] = "ctl-a_123"
            registration = agent_pb2_grpc.RegistrationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                registration.Heartbeat(agent_pb2.HeartbeatRequest(node_id="n"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the leader is ctl-a_123" in refused.value.details()
    finally:
        server.stop(0)


# ---- shoal controller --store kubernetes: flags ------------------------------------------------------------

def _settings(*argv: str):
    import argparse

    from controller import daemon
    parser = argparse.ArgumentParser()
    daemon.add_parser(parser.add_subparsers())
    return daemon.settings_from_args(parser.parse_args(["controller", *argv]))[0]


def test_kubernetes_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    settings = _settings("--store", "kubernetes", "--kubeconfig", "/k", "--lease-name", "l", "--lease-duration", "6",
                         "--health-listen", "127.0.0.1:0", "--api-group", "example.org")
    k = settings.kubernetes
    assert (settings.store, k.kubeconfig, k.namespace, k.api_group) == ("kubernetes", "/k", "default", "example.org")
    assert (k.leader.lease_name, k.leader.namespace, k.leader.lease_duration) == ("l", "default", 6)
    assert (k.leader.renew_deadline, k.leader.retry_period) == (4.0, 0.8)
    assert settings.health_listen == "127.0.0.1:0"
    monkeypatch.setenv("POD_NAMESPACE", "shoal-system")
    assert _settings("--store", "kubernetes").kubernetes.namespace == "shoal-system"
    assert _settings("--store", "kubernetes", "--namespace", "ns").kubernetes.leader.namespace == "ns"
    assert _settings().store == "sqlite" and _settings().kubernetes is None


def test_bad_kubernetes_flags_are_refused():
    with pytest.raises(ValueError, match="whole number of seconds"):
        _settings("--store", "kubernetes", "--lease-duration", "0")
    with pytest.raises(ValueError, match="renew deadline must be shorter"):
        _settings("--store", "kubernetes", "--lease-duration", "4", "--lease-renew-deadline", "5")
    with pytest.raises(ValueError, match="HOST:PORT"):
        _settings("--health-listen", "nowhere")


def test_pod_namespace_comes_from_the_service_account(tmp_path, monkeypatch):
    from controller.daemon import pod_namespace
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    path = tmp_path / "namespace"
    assert pod_namespace(str(path)) == "from-env"
    path.write_text("from-file\n")
    assert pod_namespace(str(path)) == "from-file"


def test_an_operation_begun_in_a_rolled_back_transaction_is_forgotten(env):
    store, recorder, _, _ = env
    with pytest.raises(RuntimeError):
        with store.transaction():
            op = store.record_operation(1.0, "create_volume", "gone", OP_STARTED)
            raise RuntimeError("the store write failed")
    store.finish_operation(op, OP_DONE)  # whatever now has that id, the rolled-back begin is not reported
    assert recorder.events == []


def test_agent_client_tls_files_that_do_not_load_stop_the_start():
    """The controller's files for its calls to agents used to be read at the first call: a missing CA file
    came back to API clients as a retryable UNAVAILABLE naming the file, and a wrong pair as every agent
    'unreachable'."""
    import certifi

    with pytest.raises(ValueError, match="--agent-ca/--agent-cert/--agent-key: TLS CA .* cannot be read"):
        _settings("--agent-ca", "/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="--agent-ca/--agent-cert/--agent-key: .*not a PEM certificate chain"):
        _settings("--agent-ca", certifi.where(), "--agent-cert", certifi.where(), "--agent-key", certifi.where())
    _settings("--agent-ca", certifi.where())  # a CA bundle that loads
