"""``KubernetesStore`` against a real kube-apiserver (1.20.2 + etcd, tests/support/kube_apiserver.py).

- the whole ``StateStore`` contract (every test of tests/unit/test_store_contract.py, imported here) with this
  module's ``store`` fixture, so the same suite passes on memory, SQLite and the API server;
- optimistic concurrency: a store writing or deleting from a stale read gets ``StoreConflict``;
- what the embedded stores do not have: keys that are no Kubernetes name (capitals, two-part keys), a CHAP secret
  that is in a Secret and in no CustomResource, an object whose name another key maps onto.

The CRDs and the controller's RBAC come from the chart (``helm template``), under their own API group, release and
namespace, so a ``helm install`` of the chart on the same session API server does not collide with them; the store
runs as the user ``store`` bound to exactly the chart's controller ClusterRole and Role, so these tests also show
that the chart grants the store enough. Each test starts from an empty store (every object of the kinds and the
CHAP Secrets deleted).
"""

from __future__ import annotations

import json

import pytest

from controller.domain.model import AVAILABLE, CREATING, ChapCredential
from controller.store import KubernetesStore, KubernetesStoreSettings, StoreConflict, StoreUnavailable
from controller.store.kubernetes import KINDS, NODES, object_name
from tests.support.chart_access import controller_access
from tests.support.kube_apiserver import BUILD_TEST_TIMEOUT, kube_apiserver  # noqa: F401 - the session fixture
from tests.unit.test_store_contract import *  # noqa: F401,F403 - every contract test, run with this module's store
from tests.unit.test_store_contract import SECRET, node, volume

pytestmark = [pytest.mark.peer, pytest.mark.timeout(BUILD_TEST_TIMEOUT)]

GROUP = "store-test.shoal.io"
RELEASE = "shoal-store-test"
NAMESPACE = "shoal-store-test"
USER = "store"


@pytest.fixture(scope="module")
def cluster(kube_apiserver, tmp_path_factory):  # noqa: F811 - the imported fixture, used by name
    """The chart's CRDs (Established) and the controller's RBAC bound to ``USER``; removed at the end."""
    admin = kube_apiserver.client()
    with controller_access(admin, tmp_path_factory.mktemp("helm-home"), release=RELEASE, namespace=NAMESPACE,
                           group=GROUP, users=[USER]):
        yield kube_apiserver
    admin.close()


def _erase(admin) -> None:
    """Delete every object of the store's kinds and every CHAP Secret: each test starts from an empty store."""
    from kubernetes import client

    custom = client.CustomObjectsApi(admin)
    for kind in KINDS:
        custom.delete_collection_cluster_custom_object(GROUP, "v1", kind.plural)
    client.CoreV1Api(admin).delete_collection_namespaced_secret(NAMESPACE, label_selector=f"{GROUP}/chap=true")


SETTINGS = KubernetesStoreSettings(namespace=NAMESPACE, api_group=GROUP)


@pytest.fixture
def admin(cluster):
    api = cluster.client()
    yield api
    api.close()


@pytest.fixture
def store(cluster, admin):
    """The contract suite's store: a KubernetesStore as ``USER``, over an empty state."""
    _erase(admin)
    api = cluster.client(USER)
    yield KubernetesStore(api, SETTINGS)
    api.close()


@pytest.fixture
def second_store(cluster):
    """Another controller's store on the same API server (the one a deposed leader races with)."""
    api = cluster.client(USER)
    yield KubernetesStore(api, SETTINGS)
    api.close()


def _objects(admin, plural: str) -> list[dict]:
    from kubernetes import client

    return client.CustomObjectsApi(admin).list_cluster_custom_object(GROUP, "v1", plural)["items"]


# --- optimistic concurrency ----------------------------------------------------------------------------------------

def test_a_write_from_a_stale_read_is_a_conflict(store, second_store):
    store.put_volume(volume("vol-1"))
    assert second_store.get_volume("vol-1").state == CREATING  # the second store reads version 1
    store.put_volume(volume("vol-1", state=AVAILABLE))  # the first one writes version 2
    with pytest.raises(StoreConflict, match="changed since this controller read it"):
        second_store.put_volume(volume("vol-1", size_bytes=5 << 30))  # based on version 1
    assert store.get_volume("vol-1") == volume("vol-1", state=AVAILABLE)  # nothing was overwritten
    # after reading again, the write goes through
    assert second_store.get_volume("vol-1").state == AVAILABLE
    second_store.put_volume(volume("vol-1", state=AVAILABLE, size_bytes=5 << 30))
    assert store.get_volume("vol-1").size_bytes == 5 << 30


def test_a_delete_from_a_stale_read_is_a_conflict(store, second_store):
    store.put_node(node("node-a"))
    assert second_store.get_node("node-a") is not None
    store.put_node(node("node-a", health="unhealthy"))
    with pytest.raises(StoreConflict):
        second_store.delete_node("node-a")
    assert store.get_node("node-a").health == "unhealthy"


def test_creating_what_another_store_created_is_a_conflict(store, second_store):
    from controller.domain.model import Pool

    assert second_store.get_pool("fast") is None  # the second store saw no pool...
    store.put_pool(Pool("fast", (), 2.0))  # ...then the first one made it
    with pytest.raises(StoreConflict):
        second_store.put_pool(Pool("fast", ()))
    assert store.get_pool("fast") == Pool("fast", (), 2.0)


def test_a_conflict_in_a_transaction_flush_raises(store, second_store):
    store.put_volume(volume("vol-1"))
    second_store.get_volume("vol-1")
    store.put_volume(volume("vol-1", state=AVAILABLE))
    with pytest.raises(StoreConflict):
        with second_store.transaction():
            second_store.put_volume(volume("vol-1", size_bytes=3 << 30))
            assert second_store.get_volume("vol-1").size_bytes == 3 << 30  # reads see the buffered write
    assert store.get_volume("vol-1").state == AVAILABLE


def test_a_list_on_another_thread_does_not_refresh_the_version_a_write_is_based_on(store, second_store):
    """A metrics scrape or a status call lists records on its own thread in the middle of a read-modify-write:
    what it read must not become the version that write is based on, or a deposed leader's stale write (here:
    an attachment "attached" over the successor's "fenced") silently goes through."""
    import threading

    store.put_volume(volume("vol-1"))
    assert store.get_volume("vol-1").state == CREATING  # the old leader's read
    second_store.put_volume(volume("vol-1", state=AVAILABLE))  # the successor's write
    scrape = threading.Thread(target=store.list_volumes)  # the old leader's /metrics, meanwhile
    scrape.start()
    scrape.join()
    with pytest.raises(StoreConflict):
        store.put_volume(volume("vol-1", size_bytes=5 << 30))
    assert second_store.get_volume("vol-1") == volume("vol-1", state=AVAILABLE)


def test_a_store_whose_leader_lost_the_lease_writes_nothing(store):
    """``may_write`` (the daemon: the Lease renewed within renew_deadline) says no: every create, replace and
    delete is refused with StoreUnavailable, before it reaches the API server; reads go on."""
    store.put_volume(volume("vol-1"))
    store.may_write = lambda: False
    with pytest.raises(StoreUnavailable, match="no longer the leader"):
        store.put_volume(volume("vol-1", state=AVAILABLE))
    with pytest.raises(StoreUnavailable, match="no longer the leader"):
        store.delete_volume("vol-1")
    assert store.get_volume("vol-1") == volume("vol-1")
    store.may_write = lambda: True
    store.put_volume(volume("vol-1", state=AVAILABLE))
    assert store.get_volume("vol-1").state == AVAILABLE


# --- names, Secrets ------------------------------------------------------------------------------------------------

def test_keys_that_are_no_kubernetes_names(store, admin):
    upper = node("Node-A.Example.org")
    store.put_node(upper)
    store.put_node(node("node-a.example.org"))
    assert store.get_node("Node-A.Example.org") == upper
    assert [n.id for n in store.list_nodes()] == ["Node-A.Example.org", "node-a.example.org"]
    names = sorted(o["metadata"]["name"] for o in _objects(admin, "shoalnodes"))
    assert names == sorted([object_name("Node-A.Example.org"), "node-a.example.org"])
    # two-part keys whose parts contain the separator stay apart
    from controller.domain.model import Attachment

    store.put_attachment(Attachment("vol-1", "a.b", "kernel", "attached"))
    store.put_attachment(Attachment("vol-1.a", "b", "kernel", "attached"))
    assert len(_objects(admin, "attachments")) == 2
    assert store.get_attachment("vol-1", "a.b").node == "a.b"


def test_an_object_another_key_maps_onto_is_refused(store, admin):
    from kubernetes import client

    impostor = node("node-x")
    body = {"apiVersion": f"{GROUP}/v1", "kind": "ShoalNode", "metadata": {"name": "node-x"},
            "spec": {**NODES.to_spec(impostor), "id": "Node-X"}}
    client.CustomObjectsApi(admin).create_cluster_custom_object(GROUP, "v1", "shoalnodes", body)
    assert store.get_node("node-x") is None  # the object holds another key
    with pytest.raises(ValueError, match="two keys map to one object name"):
        store.put_node(impostor)


def test_chap_secret_is_in_a_secret_and_in_no_custom_resource(store, admin):
    from kubernetes import client

    store.put_volume(volume("vol-1"))
    store.put_chap("vol-1", ChapCredential("shoal-vol-1", SECRET))
    secrets = client.CoreV1Api(admin).list_namespaced_secret(NAMESPACE, label_selector=f"{GROUP}/chap=true").items
    assert [s.metadata.name for s in secrets] == ["shoal-chap-vol-1"]
    for kind in KINDS:
        assert SECRET not in json.dumps(_objects(admin, kind.plural))
    store.put_chap("vol-1", ChapCredential("shoal-vol-1", SECRET + "-2"))  # an update, with resourceVersion
    assert store.get_chap("vol-1").secret == SECRET + "-2"


def test_a_delete_after_this_store_saw_it_missing_deletes_what_another_made_since(store, second_store):
    """What a thread last saw missing is not known to be missing: a delete read again and did nothing, so
    a volume's CHAP Secret outlived the volume, and a new volume of the same name got the old secret."""
    from tests.unit.test_store_contract import export

    assert store.get_export("vol-1", export().initiator_iqn) is None
    assert store.get_chap("vol-1") is None
    second_store.put_export(export())
    second_store.put_chap("vol-1", ChapCredential("u", SECRET))
    store.delete_export("vol-1", export().initiator_iqn)
    store.delete_chap("vol-1")
    assert second_store.get_export("vol-1", export().initiator_iqn) is None
    assert second_store.get_chap("vol-1") is None


def test_after_a_conflict_the_next_call_reads_again(store, second_store):
    """A write that conflicted left this thread's stale version in place: every retry of a delete that does
    not read first (the service's ``delete_chap``) conflicted again, for ever, on that thread."""
    store.put_chap("vol-1", ChapCredential("u", SECRET))
    second_store.get_chap("vol-1")
    store.put_chap("vol-1", ChapCredential("u", SECRET + "-2"))  # another writer's change
    with pytest.raises(StoreConflict):
        second_store.delete_chap("vol-1")
    second_store.delete_chap("vol-1")  # the retry reads again, and deletes what is there now
    assert store.get_chap("vol-1") is None


def test_ended_operations_are_not_remembered_by_each_thread(store):
    """``_seen`` kept an entry per operation ever recorded, in every thread that wrote one: memory growing
    with the operations log's whole history, not with what is kept."""
    from controller.domain.model import OP_DONE
    from controller.store.kubernetes import OPERATIONS

    for i in range(30):
        store.finish_operation(store.record_operation(1000.0 + i, "create_volume", f"vol-{i}", "started"), OP_DONE)
    assert not [key for key in store._seen if key[0] == OPERATIONS.plural]
    assert [op.state for op in store.list_operations()][-30:] == [OP_DONE] * 30


def test_the_same_event_again_counts_on_the_one_posted_before(cluster, admin):
    """A repair that fails the same way on every reconcile pass posted a new Event each time (720 an hour for
    one stuck volume); now, as client-go's correlator, the repeat raises the first Event's count.  As the
    controller's user, so the chart's RBAC (create, patch) is what allows it."""
    import time as _time

    from kubernetes import client

    from controller.k8s_events import Event, EventRecorder, EventSettings

    api = cluster.client(USER)
    try:
        recorder = EventRecorder(api, EventSettings(api_group=GROUP))
        subject = f"stuck-{_time.monotonic_ns()}"
        for i in range(3):
            recorder.post(Event("Volume", subject, "Warning", "DeleteVolumeFailed", "node-a is unreachable",
                                1_800_000_000.0 + i))
        recorder.post(Event("Volume", subject, "Warning", "DeleteVolumeFailed", "another message", 1_800_000_010.0))
    finally:
        api.close()
    events = client.CoreV1Api(admin).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={subject}").items
    counted = sorted((e.message, e.count) for e in events)
    assert counted == [("another message", 1), ("node-a is unreachable", 3)]
    repeated = next(e for e in events if e.count == 3)
    assert repeated.last_timestamp > repeated.first_timestamp
