"""The ``StateStore`` contract (controller/store/base.py), run against every implementation.

Here: memory and SQLite. tests/peer/test_store_kubernetes.py imports every test of this module and runs it with
its own ``store`` fixture: ``KubernetesStore`` against a real kube-apiserver.
"""

from __future__ import annotations

import threading

import pytest

from controller.domain.model import (ATTACHED, ATTACHMENT_STATES, AVAILABLE, CREATING, FENCE_STATES, HEALTHY, MODES,
                                     OP_DONE,
                                     OP_STARTED, VOLUME_STATES, Attachment, ChapCredential, Disk, Export, Node, Pool,
                                     Volume)
from controller.store import MemoryStore, SqliteStore

SECRET = "Zx9-not-a-real-secret-Qw7"


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore()
    else:
        s = SqliteStore(str(tmp_path / "state.db"))
        yield s
        s.close()


def node(node_id="node-a", **kw):
    fields = dict(id=node_id, initiator_iqn=f"iqn.2024-01.io.shoal:{node_id}", agent_address="127.0.0.1:7000",
                  portals=("127.0.0.1:3260",), labels={"zone": "a"},
                  disks=(Disk("data0", "/srv/data0", 10 << 30, 8 << 30),), health=HEALTHY, last_heartbeat=1000.5)
    fields.update(kw)
    return Node(**fields)


def volume(name="vol-1", vol_id=None, **kw):
    fields = dict(name=name, id=vol_id or f"id-{name}", size_bytes=1 << 30, pool="default", owner_node="node-a",
                  disk="data0", state=CREATING, thin=True, created_at=1000.0)
    fields.update(kw)
    return Volume(**fields)


def export(vol="vol-1", iqn="iqn.2024-01.io.shoal:node-b"):
    return Export(vol, iqn, "iqn.2024-01.io.shoal:node-a", ("127.0.0.1:3260",), 0, "6" + "0" * 31, "id-vol-1",
                  "shoal-id-vol-1")


def test_nodes_round_trip(store):
    a, b = node("node-b"), node("node-a", labels={}, disks=())
    store.put_node(a)
    store.put_node(b)
    assert store.get_node("node-b") == a
    assert store.list_nodes() == [b, a]
    store.put_node(a.__class__(**{**a.__dict__, "health": "unhealthy"}))
    assert store.get_node("node-b").health == "unhealthy"
    store.delete_node("node-b")
    store.delete_node("node-b")  # missing: no-op
    assert store.get_node("node-b") is None and store.list_nodes() == [b]


def test_a_node_read_is_a_copy_its_reader_cannot_change_the_store_through(store):
    store.put_node(node("node-a", labels={"zone": "a"}))
    store.get_node("node-a").labels["zone"] = "changed"
    store.list_nodes()[0].labels["zone"] = "changed"
    assert store.get_node("node-a").labels == {"zone": "a"}


def test_pools_round_trip(store):
    p = Pool("fast", (("node-a", "data0"), ("node-b", "data1")), 2.5)
    store.put_pool(p)
    store.put_pool(Pool("all", ()))
    assert store.get_pool("fast") == p
    assert [x.name for x in store.list_pools()] == ["all", "fast"]
    store.delete_pool("fast")
    store.delete_pool("fast")
    assert store.get_pool("fast") is None


def test_volumes_round_trip_and_filter(store):
    # requested_bytes: the size a clone was asked to have (a CSI repeat asking another size is ALREADY_EXISTS)
    v1, v2 = volume("vol-1"), volume("vol-2", pool="fast", thin=False, state=AVAILABLE, source="vol-1",
                                     requested_bytes=3 << 30)
    store.put_volume(v2)
    store.put_volume(v1)
    assert store.get_volume("vol-2") == v2
    assert store.list_volumes() == [v1, v2]
    assert store.list_volumes(pool="fast") == [v2]
    store.put_volume(volume("vol-1", state=AVAILABLE, size_bytes=2 << 30))
    assert store.get_volume("vol-1").size_bytes == 2 << 30
    store.delete_volume("vol-1")
    store.delete_volume("vol-1")
    assert store.get_volume("vol-1") is None


def test_volume_ids_are_unique(store):
    store.put_volume(volume("vol-1", vol_id="same"))
    with pytest.raises(ValueError):
        store.put_volume(volume("vol-2", vol_id="same"))
    assert [v.name for v in store.list_volumes()] == ["vol-1"]


def test_attachments_and_exports(store):
    a1 = Attachment("vol-1", "node-b", "userspace", ATTACHED, "/dev/loop3")
    a2 = Attachment("vol-2", "node-b", "kernel", "attaching")
    store.put_attachment(a1)
    store.put_attachment(a2)
    assert store.get_attachment("vol-1", "node-b") == a1
    assert store.list_attachments(node="node-b") == [a1, a2]
    assert store.list_attachments(volume="vol-2") == [a2]
    assert store.list_attachments(volume="vol-2", node="node-c") == []
    store.delete_attachment("vol-1", "node-b")
    store.delete_attachment("vol-1", "node-b")
    assert store.list_attachments() == [a2]
    e = export()
    store.put_export(e)
    assert store.get_export("vol-1", e.initiator_iqn) == e
    assert store.list_exports("vol-1") == [e] and store.list_exports("vol-9") == []
    store.delete_export("vol-1", e.initiator_iqn)
    assert store.list_exports() == []


def test_every_state_the_domain_uses_is_kept(store):
    """A backend with a schema (the CRDs on the API server) must take every state and mode the domain writes."""
    for i, state in enumerate(VOLUME_STATES):
        store.put_volume(volume(f"vol-{i}", state=state))
    assert [v.state for v in store.list_volumes()] == list(VOLUME_STATES)
    attachments = [Attachment(f"vol-{i}", "node-b", MODES[i % len(MODES)], state, "/dev/loop3" if state == ATTACHED
                              else "") for i, state in enumerate(ATTACHMENT_STATES)]
    for attachment in attachments:
        store.put_attachment(attachment)
    assert store.list_attachments(node="node-b") == attachments
    nodes = [node(f"node-{i}", initiator_iqn=f"iqn.2024-01.io.shoal:fence-{i}", fence=fence,
                  fence_since=2000.5 if fence else 0.0, fence_reason="why" if fence else "",
                  fence_steps=("node-a: fenced: 1 target(s)", "node-c: not yet: unreachable") if fence else ())
             for i, fence in enumerate(FENCE_STATES)]
    for n in nodes:
        store.put_node(n)
    assert [store.get_node(n.id) for n in nodes] == nodes


def test_shared_attachments_round_trip(store):
    shared = Attachment("vol-1", "node-c", "userspace", "published", "", shared=True)
    store.put_attachment(shared)
    store.put_attachment(Attachment("vol-1", "node-b", "kernel", ATTACHED, "/dev/sdb"))
    assert store.get_attachment("vol-1", "node-c") == shared
    assert [a.shared for a in store.list_attachments(volume="vol-1")] == [False, True]


def test_chap_credentials_are_kept_but_never_shown(store):
    store.put_chap("vol-1", ChapCredential("shoal-x", SECRET))
    assert store.get_chap("vol-1").secret == SECRET
    assert SECRET not in repr(store.get_chap("vol-1")) and SECRET not in repr(store)
    store.delete_chap("vol-1")
    assert store.get_chap("vol-1") is None


def test_transaction_is_all_or_nothing(store):
    store.put_volume(volume("vol-1"))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put_volume(volume("vol-1", state=AVAILABLE))
            store.put_volume(volume("vol-2"))
            with store.transaction():  # nested: joins the outer one
                store.put_node(node())
            raise RuntimeError("boom")
    assert store.get_volume("vol-1").state == CREATING
    assert store.get_volume("vol-2") is None and store.get_node("node-a") is None
    with store.transaction():
        store.put_volume(volume("vol-2"))
    assert store.get_volume("vol-2") is not None


def test_operations_log(store):
    first = store.record_operation(1.0, "create_volume", "vol-1", OP_STARTED, "1.0 GiB on node-a/data0")
    second = store.record_operation(2.0, "attach_volume", "vol-1", OP_STARTED)
    store.record_operation(3.0, "create_volume", "vol-2", OP_STARTED)
    store.finish_operation(first, OP_DONE)
    ops = store.list_operations("vol-1")
    assert [(o.id, o.kind, o.state) for o in ops] == [(first, "create_volume", OP_DONE),
                                                      (second, "attach_volume", OP_STARTED)]
    assert ops[0].time == 1.0 and ops[0].detail == ""
    assert [o.subject for o in store.list_operations(limit=2)] == ["vol-1", "vol-2"]
    assert second > first


def test_threads_share_a_store(store):
    def worker(i):
        for j in range(20):
            with store.transaction():
                store.put_volume(volume(f"vol-{i}-{j}"))
                store.record_operation(float(j), "create_volume", f"vol-{i}-{j}", OP_STARTED)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list_volumes()) == 80 and len(store.list_operations(limit=1000)) == 80


def snapshot(name="snap-1", snap_id=None, volume_name="vol-1", **kw):
    from controller.domain.model import Snapshot

    fields = dict(name=name, id=snap_id or f"sid-{name}", volume=volume_name, volume_id=f"id-{volume_name}",
                  size_bytes=1 << 30, owner_node="node-a", disk="data0", state=CREATING, created_at=1000.0)
    fields.update(kw)
    return Snapshot(**fields)


def test_snapshots_round_trip(store):
    a, b = snapshot("snap-b", volume_name="vol-2"), snapshot("snap-a", progress=0.25, message="")
    store.put_snapshot(a)
    store.put_snapshot(b)
    assert store.get_snapshot("snap-b") == a
    assert store.list_snapshots() == [b, a]
    assert store.list_snapshots(volume="vol-1") == [b]
    done = b.__class__(**{**b.__dict__, "state": "error", "progress": 0.5, "message": "copy failed: EIO"})
    store.put_snapshot(done)
    assert store.get_snapshot("snap-a") == done
    with pytest.raises(ValueError):
        store.put_snapshot(snapshot("snap-c", snap_id=a.id))  # ids are unique
    store.delete_snapshot("snap-b")
    store.delete_snapshot("snap-b")  # missing: no-op
    assert store.get_snapshot("snap-b") is None and store.list_snapshots() == [done]


def test_a_failed_transaction_leaves_snapshots_as_they_were(store):
    store.put_snapshot(snapshot())
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.delete_snapshot("snap-1")
            store.put_snapshot(snapshot("snap-2"))
            raise RuntimeError("boom")
    assert [s.name for s in store.list_snapshots()] == ["snap-1"]
