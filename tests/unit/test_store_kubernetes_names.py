"""KubernetesStore's pure parts: store keys → object names and label values, records ↔ ``spec`` (no API server).

Object names must be DNS-1123 subdomains (at most 253 characters, lowercase letters, digits, '-' and '.', starting
and ending alphanumeric; Kubernetes API conventions, "Names"); label values at most 63 characters of letters,
digits, '-', '_' and '.', starting and ending alphanumeric, or empty. The store's keys need not be either.
The same records against the real API server: tests/peer/test_store_kubernetes.py.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from controller.domain.model import Attachment, Disk, Export, Node, Operation, Pool, Snapshot, Volume
from controller.store.kubernetes import KINDS, OPERATIONS, label_value, object_name

SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def valid_name(name: str) -> bool:
    return len(name) <= 253 and bool(SUBDOMAIN.match(name))


def test_valid_keys_keep_their_name():
    assert object_name("vol-1") == "vol-1"
    assert object_name("node-a.example.org") == "node-a.example.org"
    assert object_name("vol-1", prefix="shoal-chap-") == "shoal-chap-vol-1"


def test_other_keys_get_a_readable_name_and_a_hash():
    name = object_name("Node-A.Example.org")
    assert name.startswith("node-a-example-org-") and valid_name(name)
    assert name == object_name("Node-A.Example.org")  # deterministic
    assert name != object_name("node-a.example.org")
    assert object_name("x" * 300) != object_name("x" * 301) and len(object_name("x" * 300)) <= 253


def test_two_part_keys_do_not_run_together():
    assert object_name("a.b", "c") != object_name("a", "b.c")
    assert object_name("vol-1", "node-b") != object_name("vol-1-node-b")
    assert valid_name(object_name("vol-1", "iqn.2024-01.io.shoal:node-b"))


@given(st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=2), st.sampled_from(["", "shoal-chap-"]))
def test_every_key_maps_to_a_valid_name(key, prefix):
    assert valid_name(object_name(*key, prefix=prefix))


@given(st.text(max_size=300))
def test_every_value_maps_to_a_valid_label_value(value):
    mapped = label_value(value)
    assert len(mapped) <= 63 and LABEL_VALUE.match(mapped)
    assert mapped == label_value(value)


def test_label_values_are_kept_when_valid():
    assert label_value("default") == "default" and label_value("") == ""
    assert label_value("pool with spaces").startswith("h.")


RECORDS = [
    Node("Node-A", "iqn.2024-01.io.shoal:a", "127.0.0.1:7000", ("127.0.0.1:3260", "[::1]:3260"), {"zone": "a"},
         (Disk("data0", "/srv/data0", 10 << 30, 8 << 30),), "healthy", 1000.5),
    Pool("fast", (("node-a", "data0"),), 2.5),
    Volume("vol-1", "id-1", 1 << 40, "fast", "node-a", "data0", "available", False, 1764700000.123456, "snap-1"),
    Snapshot("snap-1", "sid-1", "vol-1", "id-1", 1 << 30, "node-a", "data0", "error", 1.5, 0.25, "copy failed"),
    Attachment("vol-1", "node-b", "kernel", "attached", "/dev/sdb"),
    Export("vol-1", "iqn.2024-01.io.shoal:node-b", "iqn.2024-01.io.shoal:node-a", ("127.0.0.1:3260",), 3,
           "6" + "0" * 31, "id-1", "shoal-id-1"),
    Operation(7, 12.5, "create_volume", "vol-1", "done", "1.0 GiB"),
]


def test_records_round_trip_through_spec():
    assert [k.kind for k in KINDS] == ["ShoalNode", "Pool", "Volume", "Snapshot", "Attachment", "Export", "Operation"]
    for kind, record in zip(KINDS, RECORDS):
        spec = kind.to_spec(record)
        assert kind.from_spec(spec) == record
        assert kind.key_of(spec) == kind.key(record)  # the real key is in spec
        assert valid_name(kind.name(kind.key(record)))
        assert all(field in spec for field in kind.indexes)


def test_operation_names_sort_by_id():
    names = [OPERATIONS.name((str(i),)) for i in (9, 10, 100, 1000)]
    assert names == sorted(names) and names[0] == "op-000000000009"



def test_api_answers_map_to_store_errors_and_status_codes():
    """409 (or 404 on an update) is a conflict: ABORTED for gRPC and CSI callers, who re-read and retry."""
    import grpc
    from kubernetes.client.exceptions import ApiException

    from controller.api.errors import domain_error, grpc_status
    from controller.csi.errors import csi_status
    from controller.store import StoreConflict, StoreUnavailable
    from controller.store.kubernetes import _store_error

    conflict = _store_error(ApiException(status=409, reason="Conflict"), "updating Volume vol-1")
    assert isinstance(conflict, StoreConflict) and conflict.temporary
    assert isinstance(_store_error(ApiException(status=404, reason="Not Found"), "updating Volume v"), StoreConflict)
    assert isinstance(_store_error(ApiException(status=404, reason="Not Found"), "listing volumes"), StoreUnavailable)
    assert isinstance(_store_error(ApiException(status=422, reason="Invalid"), "creating Volume v"), ValueError)
    assert isinstance(_store_error(ApiException(status=403, reason="Forbidden"), "creating Volume v"), StoreUnavailable)
    assert grpc_status(conflict)[0] == csi_status(conflict)[0] == grpc.StatusCode.ABORTED
    assert grpc_status(StoreUnavailable("x"))[0] == grpc.StatusCode.UNAVAILABLE
    # an agent's ABORTED is not a store conflict (agents have no store)
    assert not isinstance(domain_error(grpc.StatusCode.ABORTED, "busy"), StoreConflict)
