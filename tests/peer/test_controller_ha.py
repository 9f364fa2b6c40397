"""Two (then three) ``shoal controller --store kubernetes`` processes against one real kube-apiserver (1.20.2).

Issue 5's judging line: "two controllers against one API server: only the Lease holder acts, and the other
takes over within the lease duration when the first is killed".  The walk:

1. two candidates start; exactly one becomes ready (``/readyz`` 200), the other answers ``/readyz`` 503, every
   gRPC call ``UNAVAILABLE`` naming the leader, and has no CSI socket; sampled for a while, never both ready;
2. a ``shoal agent`` registers with the leader as ``ha-node-1``, a Kubernetes Node of that name exists: the
   node's labels are the agent's plus the Node's topology labels (the Node wins on the zone; a role label of the
   Node is not taken); a volume is created through the leader and a ``VolumeCreated`` Event about the
   ``Volume`` CustomResource (with its uid) appears;
3. the leader is SIGKILLed (by PID): the standby takes over — the time from the kill to its ``/readyz`` 200 is
   measured and printed — and serves the volume from the API server, with its CSI socket;
4. a third candidate starts; the leader gets SIGTERM: it stops acting, releases the Lease and exits 0, and the
   third takes over well within one lease duration (the release, not the expiry);
5. someone else writes the Lease (as a new leader would): the leader stops at once and exits 1, removing its
   CSI socket.

The CRDs and the controller's RBAC come from the chart (``helm template`` with this module's API group and
release), bound to the token users ``controller`` and ``controller-2``: the controllers run with exactly the
chart's rights.  Lease: 4 s (renew deadline 2.7 s, retry 0.53 s) to keep it quick.  Every process is stopped by
PID in ``finally``.  Mocks: none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from kubernetes import client as k8s

from controller.leader import JITTER
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc
from tests.support.controller_process import Daemon, start_agent, start_controller
from tests.support.chart_access import controller_access
from tests.support.kube_apiserver import BUILD_TEST_TIMEOUT, kube_apiserver  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(BUILD_TEST_TIMEOUT)]

GROUP = "ha-test.shoal.io"
RELEASE = "shoal-ha"  # contains "shoal": the chart names the controller role <release>-controller
NAMESPACE = "shoal-ha-test"
LEASE = "ha-test-controller"
USERS = ("controller", "controller-2")
DURATION = 4
RETRY = DURATION * 2 / 15  # the daemon's default proportion (client-go's 2 s of 15 s)
NODE = "ha-node-1"
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(kube_apiserver, tmp_path_factory):  # noqa: F811 - the imported fixture, used by name
    """CRDs (Established), the namespace, the chart's controller RBAC bound to USERS, a Node ``ha-node-1``."""
    admin = kube_apiserver.client()
    core = k8s.CoreV1Api(admin)
    with controller_access(admin, tmp_path_factory.mktemp("helm-home"), release=RELEASE, namespace=NAMESPACE,
                           group=GROUP, users=USERS):
        core.create_node({"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a",
                                                                "node-role.kubernetes.io/worker": ""}}})
        try:
            yield kube_apiserver
        finally:
            core.delete_node(NODE)
    admin.close()


# ---------------------------------------------------------------------------------------------- helpers

class Candidate:
    """One ``shoal controller --store kubernetes`` process and what its ready file says."""

    def __init__(self, daemon: Daemon, workdir: Path, socket: Path):
        self.daemon = daemon
        self.workdir = workdir
        ready = yaml.safe_load((workdir / "controller.ready").read_text())
        self.health = ready["health"]
        self.identity = ready["identity"]
        self.socket = socket

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.health}/readyz", timeout=2) as response:
                return response.status, response.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()
        except OSError as exc:  # the process is gone (it exits when it loses the lease)
            return 0, f"unreachable: {exc}"

    def ready(self) -> bool:
        return self.readyz()[0] == 200

    def call(self, method: str, request, timeout: float = 10.0):
        with grpc.insecure_channel(self.daemon.address) as channel:
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=timeout)


def start_candidate(kube, tmp_path: Path, sockets: Path, name: str, user: str) -> Candidate:
    workdir = tmp_path / name
    workdir.mkdir(parents=True)
    kubeconfig = kube.kubeconfig(workdir / "kubeconfig", user)
    socket = sockets / f"{name}.sock"  # a short path: unix socket paths end at 107 bytes
    daemon = start_controller(workdir, extra_args=[
        "--store", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE, "--api-group", GROUP,
        "--lease-name", LEASE, "--lease-duration", str(DURATION), "--health-listen", "127.0.0.1:0",
        "--csi-endpoint", f"unix://{socket}"])
    return Candidate(daemon, workdir, socket)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(interval)


def the_leader(candidates: list[Candidate], timeout: float) -> Candidate:
    def one():
        ready = [c for c in candidates if c.ready()]
        assert len(ready) <= 1, f"two replicas ready at once: {[c.identity for c in ready]}"
        return ready[0] if ready else None
    return wait_for(one, timeout, "a leader")


def lease(admin):
    return k8s.CoordinationV1Api(admin).read_namespaced_lease(LEASE, NAMESPACE)


def events_about(admin, name: str) -> list:
    return k8s.CoreV1Api(admin).list_namespaced_event("default", field_selector=f"involvedObject.name={name}").items


# ---------------------------------------------------------------------------------------------- the walk

def test_only_the_lease_holder_acts_and_a_standby_takes_over(cluster, tmp_path):
    admin = cluster.client()
    started: list[Daemon] = []
    sockets = Path(tempfile.mkdtemp(prefix="shoal-ha-"))
    try:
        a = start_candidate(cluster, tmp_path, sockets, "a", USERS[0])
        started.append(a.daemon)
        b = start_candidate(cluster, tmp_path, sockets, "b", USERS[1])
        started.append(b.daemon)

        # 1. exactly one acts
        leader = the_leader([a, b], timeout=3 * DURATION)
        standby = b if leader is a else a
        assert lease(admin).spec.holder_identity == leader.identity
        for _ in range(20):  # 2 s of samples: never two, never none
            assert [c.ready() for c in (leader, standby)] == [True, False]
            time.sleep(0.1)
        code, text = standby.readyz()
        assert (code, text) == (503, f"standby; the leader is {leader.identity}")
        assert leader.socket.exists() and not standby.socket.exists()
        with pytest.raises(grpc.RpcError) as refused:
            standby.call("GetStatus", admin_pb2.GetStatusRequest())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert leader.identity in refused.value.details()
        assert leader.call("GetStatus", admin_pb2.GetStatusRequest()).nodes == 0

        # 2. an agent registers with the leader: Node labels merged; a volume; its Event
        agent = start_agent(tmp_path / "agent", NODE, leader.daemon.address,
                            extra_args=["--label", "topology.kubernetes.io/zone=agent-zone", "--label", "rack=r1"])
        started.append(agent)
        node = wait_for(lambda: _get_node(leader), 20, "the agent's registration")
        labels = dict(node.labels)
        assert (labels["topology.kubernetes.io/zone"], labels["rack"]) == ("zone-a", "r1")  # the Node wins the zone
        assert not any(key.startswith("node-role.") for key in labels)  # not a topology label: not taken
        created = leader.call("CreateVolume", admin_pb2.CreateVolumeRequest(name="ha-vol", size_bytes=16 * MiB))
        assert created.state == "available" and created.owner_node == NODE
        uid = k8s.CustomObjectsApi(admin).get_cluster_custom_object(GROUP, "v1", "volumes", "ha-vol")["metadata"]["uid"]
        event = wait_for(lambda: next((e for e in events_about(admin, "ha-vol") if e.reason == "VolumeCreated"), None),
                         10, "a VolumeCreated event")
        assert (event.type, event.involved_object.kind, event.involved_object.api_version) == \
            ("Normal", "Volume", f"{GROUP}/v1")
        assert event.involved_object.uid == uid
        assert "ha-vol" in event.message and event.source.host == leader.identity

        # 3. SIGKILL the leader: the standby takes over from the Lease
        before = lease(admin).spec.lease_transitions
        killed_at = time.monotonic()
        leader.daemon.kill()
        wait_for(standby.ready, DURATION + 10, "the standby taking over")
        takeover = time.monotonic() - killed_at
        print(f"\ntakeover after SIGKILL of the leader: {takeover:.2f} s (lease duration {DURATION} s, "
              f"retry period {RETRY:.2f} s)")
        # Bound: the lease duration counted from the standby's last sight of a renewal, which is up to one
        # jittered poll after the renewal was written (the standby wakes at the expiry itself, not a poll later),
        # minus the time from that renewal to the kill, plus starting to serve (a second is generous).
        assert takeover <= DURATION + RETRY * (1 + JITTER) + 1.0
        holder = lease(admin).spec
        assert holder.holder_identity == standby.identity and holder.lease_transitions == before + 1
        got = standby.call("GetVolume", admin_pb2.GetVolumeRequest(name="ha-vol"))
        assert (got.id, got.size_bytes, got.owner_node) == (created.id, created.size_bytes, NODE)
        assert [v.name for v in standby.call("ListVolumes", admin_pb2.ListVolumesRequest()).volumes] == ["ha-vol"]
        assert standby.socket.exists()
        new_leader = standby

        # 4. a third candidate; SIGTERM the leader: it releases, the third takes over without waiting for expiry
        c = start_candidate(cluster, tmp_path, sockets, "c", USERS[0])
        started.append(c.daemon)
        assert c.readyz()[0] == 503
        stopped_at = time.monotonic()
        os.kill(new_leader.pid, signal.SIGTERM)
        assert new_leader.daemon.process.wait(20) == 0
        assert not new_leader.socket.exists()
        wait_for(c.ready, DURATION, "the third candidate taking over a released lease")
        handover = time.monotonic() - stopped_at
        print(f"takeover after SIGTERM (lease released): {handover:.2f} s")
        assert c.call("GetVolume", admin_pb2.GetVolumeRequest(name="ha-vol")).id == created.id

        # 5. the Lease is taken from under the leader: it stops acting at once and exits non-zero
        record = lease(admin)
        record.spec.holder_identity = "intruder"
        k8s.CoordinationV1Api(admin).replace_namespaced_lease(LEASE, NAMESPACE, record)
        assert c.daemon.process.wait(3 * DURATION) == 1
        assert not c.socket.exists()
        assert "lost" in c.daemon.log()
    finally:
        for daemon in reversed(started):
            daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        _erase(admin)
        admin.close()


def _get_node(leader: Candidate):
    with contextlib.suppress(grpc.RpcError):
        return leader.call("GetNode", admin_pb2.GetNodeRequest(id=NODE))
    return None


def _erase(admin) -> None:
    custom = k8s.CustomObjectsApi(admin)
    for plural in ("shoalnodes", "pools", "volumes", "snapshots", "attachments", "exports", "operations"):
        with contextlib.suppress(k8s.exceptions.ApiException):
            custom.delete_collection_cluster_custom_object(GROUP, "v1", plural)
    with contextlib.suppress(k8s.exceptions.ApiException):
        k8s.CoordinationV1Api(admin).delete_namespaced_lease(LEASE, NAMESPACE)
