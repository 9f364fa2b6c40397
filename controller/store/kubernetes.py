"""``KubernetesStore``: the ``StateStore`` in CustomResources of the controller's API group (``--store kubernetes``).

One record is one cluster-scoped object of a CRD from the chart (deploy/helm/shoal/templates/crds.yaml):
``ShoalNode``, ``Pool``, ``Volume``, ``Snapshot``, ``Attachment``, ``Export`` and ``Operation``. The whole record
lives in the object's ``spec``: these objects are the controller's own rows, not a desired state someone else
writes, so one record is written with one request and one ``resourceVersion`` (a status subresource would split
every record into two writes that can be torn apart). CHAP credentials are core/v1 Secrets in the controller's
namespace, never in a CustomResource.

Names. Kubernetes object names are DNS-1123 subdomains; store keys need not be (node ids may have capitals,
attachments and exports have two-part keys). ``object_name`` keeps a valid one-part key as it is (so
``kubectl get volumes`` shows the volume names) and otherwise makes ``<readable part>-<sha256 prefix>``; the real
key is always in ``spec`` and checked on every read and write, so a name that maps onto another key's object is an
error, never a silent mix-up. Filters (a volume's pool, a snapshot's volume, ...) are labels whose value is the key
when it is a valid label value and a hash otherwise; the store filters the listed objects exactly again.

Optimistic concurrency. The store remembers the ``resourceVersion`` of every object it last read or wrote; every
update and delete carries it, so a write based on an older read than the API server's current object fails with
409 and raises ``StoreConflict`` (a deposed leader cannot overwrite its successor's writes). Creating an object
the store last saw missing, which someone created meanwhile, is a conflict too (409 AlreadyExists); so is updating
one that was deleted meanwhile (404). A key the store has not seen at all is read first, and so is one a delete
last saw missing (another writer may have made it since: a delete must not skip it). After a conflict the store
forgets what it saw of that object, so the next call reads it again; the caller re-reads and decides again.

Transactions. The API server has no multi-object transactions. The outermost ``transaction()`` buffers its writes
(reads inside it see them) and applies them, one request per changed key, when it ends; an exception inside it
discards them. Honestly: a crash or a conflict in the middle of that flush leaves the first writes applied and the
rest not; this store is not all-or-nothing across objects. Why that is acceptable: (1) only the Lease holder
writes, so nothing else interleaves with a flush; (2) a torn flush leaves the same kind of state as a crash
between an agent call and the store write that records it, which the controller must already survive with SQLite:
records and agents disagree and the reconciler brings them back together; (3) a conflict means this controller
lost the Lease, and the new leader reconciles from what is there. Threads of one process are serialised by a lock,
as in the other stores.

Why ``Export`` and ``Operation`` are kinds of their own: an export has its own key (volume, initiator IQN), is
written on publish/unpublish apart from the volume's record and may exist without one; inside the Volume object
every publish would rewrite, and conflict with, the volume record. The operations log as one object per entry
(rather than a ConfigMap) needs no read-modify-write of a shared object on every entry, is listed and filtered like
the other kinds (``kubectl get sop``), and is covered by the same RBAC rule.

The operations log: one ``Operation`` object per entry, named ``op-<zero-padded id>``. Ids come from the highest
existing one (listed once) plus one; creating the object is what claims the id (a second writer gets
AlreadyExists, i.e. a conflict). Only the newest ``operations_kept`` entries are kept: the log is a record of
recent decisions, and etcd is no place for an unbounded one.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from controller.domain.model import (OP_STARTED, Attachment, ChapCredential, Disk, Export, Node, Operation, Pool,
                                     Snapshot, Volume)
from controller.store.base import StoreConflict, StoreUnavailable

VERSION = "v1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "shoal"}
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_MAX_NAME = 253


@dataclass(frozen=True)
class KubernetesStoreSettings:
    """Where the state lives in the cluster."""

    namespace: str = "shoal-system"
    """The controller's own namespace: the CHAP Secrets go there (the chart's Role grants Secrets only there)."""

    api_group: str = "shoal.io"
    """The CRDs' group (the chart's ``apiGroup`` value); every record is a cluster-scoped object of it."""

    operations_kept: int = 1000
    """Newest operations-log entries kept; older ones are deleted (checked every 100 entries)."""

    request_timeout: float = 30.0
    """Seconds one API request may take before the store gives up (``StoreUnavailable``)."""


# ------------------------------------------------------------------------------------------------ names

def _digest(*key: str) -> str:
    return hashlib.sha256("\0".join(key).encode()).hexdigest()[:20]


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "x"


def object_name(*key: str, prefix: str = "") -> str:
    """The Kubernetes object name for a store key (one or more parts), deterministic and DNS-1123 valid."""
    if len(key) == 1 and _SUBDOMAIN.fullmatch(prefix + key[0]) and len(prefix + key[0]) <= _MAX_NAME:
        return prefix + key[0]
    readable = ".".join(_slug(part, 60) for part in key)
    return f"{prefix}{readable}-{_digest(*key)}"


def label_value(value: str) -> str:
    """A label value standing for ``value``: itself when valid, else a hash (filters re-check exactly)."""
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return value
    return "h." + _digest(value)


_WRITES = ("create_", "replace_", "delete_", "patch_")  # the API calls ``may_write`` guards

# ------------------------------------------------------------------------------------------------ the kinds

@dataclass(frozen=True)
class Kind:
    """One record type: its CRD, how its key names an object, how a record becomes ``spec`` and back."""

    kind: str
    plural: str
    key: Callable[[Any], tuple[str, ...]]
    to_spec: Callable[[Any], dict]
    from_spec: Callable[[dict], Any]
    indexes: tuple[str, ...] = ()  # spec fields that are also labels (list filters)
    spec_key: tuple[str, ...] = ()  # spec fields holding the key, in key order

    def name(self, key: tuple[str, ...]) -> str:
        return object_name(*key)

    def key_of(self, spec: dict) -> tuple[str, ...]:
        return tuple(spec[f] for f in self.spec_key)


def _node_spec(n: Node) -> dict:
    return {"id": n.id, "initiatorIQN": n.initiator_iqn, "agentAddress": n.agent_address,
            "portals": list(n.portals), "labels": dict(n.labels),
            "disks": [{"name": d.name, "path": d.path, "capacityBytes": d.capacity_bytes, "freeBytes": d.free_bytes}
                      for d in n.disks],
            "health": n.health, "lastHeartbeat": float(n.last_heartbeat),
            "fence": n.fence, "fenceSince": float(n.fence_since), "fenceReason": n.fence_reason,
            "fenceSteps": list(n.fence_steps)}


def _node(s: dict) -> Node:
    return Node(s["id"], s["initiatorIQN"], s["agentAddress"], tuple(s.get("portals") or ()),
                dict(s.get("labels") or {}),
                tuple(Disk(d["name"], d["path"], int(d["capacityBytes"]), int(d["freeBytes"]))
                      for d in s.get("disks") or ()),
                s["health"], float(s["lastHeartbeat"]), s.get("fence", ""), float(s.get("fenceSince", 0.0)),
                s.get("fenceReason", ""), tuple(s.get("fenceSteps") or ()))


def _pool_spec(p: Pool) -> dict:
    return {"name": p.name, "members": [{"node": n, "disk": d} for n, d in p.members],
            "overcommitRatio": float(p.overcommit_ratio)}


def _pool(s: dict) -> Pool:
    return Pool(s["name"], tuple((m["node"], m["disk"]) for m in s.get("members") or ()),
                float(s["overcommitRatio"]))


def _volume_spec(v: Volume) -> dict:
    return {"name": v.name, "volumeId": v.id, "sizeBytes": v.size_bytes, "pool": v.pool, "ownerNode": v.owner_node,
            "disk": v.disk, "state": v.state, "thin": v.thin, "createdAt": float(v.created_at), "source": v.source,
            "requestedBytes": v.requested_bytes, "sourceId": v.source_id}


def _volume(s: dict) -> Volume:
    return Volume(s["name"], s["volumeId"], int(s["sizeBytes"]), s["pool"], s["ownerNode"], s["disk"], s["state"],
                  bool(s["thin"]), float(s["createdAt"]), s["source"], int(s.get("requestedBytes", 0)),
                  s.get("sourceId", ""))


def _snapshot_spec(s: Snapshot) -> dict:
    return {"name": s.name, "snapshotId": s.id, "volume": s.volume, "volumeId": s.volume_id,
            "sizeBytes": s.size_bytes, "ownerNode": s.owner_node, "disk": s.disk, "state": s.state,
            "createdAt": float(s.created_at), "progress": float(s.progress), "message": s.message}


def _snapshot(s: dict) -> Snapshot:
    return Snapshot(s["name"], s["snapshotId"], s["volume"], s["volumeId"], int(s["sizeBytes"]), s["ownerNode"],
                    s["disk"], s["state"], float(s["createdAt"]), float(s["progress"]), s["message"])


def _attachment_spec(a: Attachment) -> dict:
    return {"volume": a.volume, "node": a.node, "mode": a.mode, "state": a.state, "devicePath": a.device_path,
            "shared": a.shared}


def _attachment(s: dict) -> Attachment:
    return Attachment(s["volume"], s["node"], s["mode"], s["state"], s["devicePath"], bool(s.get("shared", False)))


def _export_spec(e: Export) -> dict:
    return {"volume": e.volume, "initiatorIQN": e.initiator_iqn, "targetIQN": e.target_iqn,
            "portals": list(e.portals), "lun": e.lun, "naa": e.naa, "serial": e.serial, "chapUser": e.chap_user}


def _export(s: dict) -> Export:
    return Export(s["volume"], s["initiatorIQN"], s["targetIQN"], tuple(s.get("portals") or ()), int(s["lun"]),
                  s["naa"], s["serial"], s["chapUser"])


def _operation_spec(o: Operation) -> dict:
    return {"id": o.id, "time": float(o.time), "kind": o.kind, "subject": o.subject, "state": o.state,
            "detail": o.detail}


def _operation(s: dict) -> Operation:
    return Operation(int(s["id"]), float(s["time"]), s["kind"], s["subject"], s["state"], s["detail"])


class _OperationKind(Kind):
    def name(self, key: tuple[str, ...]) -> str:
        return f"op-{int(key[0]):012d}"

    def key_of(self, spec: dict) -> tuple[str, ...]:
        return (str(int(spec["id"])),)


NODES = Kind("ShoalNode", "shoalnodes", lambda n: (n.id,), _node_spec, _node, (), ("id",))
POOLS = Kind("Pool", "pools", lambda p: (p.name,), _pool_spec, _pool, (), ("name",))
VOLUMES = Kind("Volume", "volumes", lambda v: (v.name,), _volume_spec, _volume, ("pool", "volumeId"), ("name",))
SNAPSHOTS = Kind("Snapshot", "snapshots", lambda s: (s.name,), _snapshot_spec, _snapshot, ("volume", "snapshotId"),
                 ("name",))
ATTACHMENTS = Kind("Attachment", "attachments", lambda a: (a.volume, a.node), _attachment_spec, _attachment,
                   ("volume", "node"), ("volume", "node"))
EXPORTS = Kind("Export", "exports", lambda e: (e.volume, e.initiator_iqn), _export_spec, _export, ("volume",),
               ("volume", "initiatorIQN"))
OPERATIONS = _OperationKind("Operation", "operations", lambda o: (str(o.id),), _operation_spec, _operation,
                            ("subject",), ("id",))
KINDS = (NODES, POOLS, VOLUMES, SNAPSHOTS, ATTACHMENTS, EXPORTS, OPERATIONS)

_DELETED = object()  # a buffered delete


# ------------------------------------------------------------------------------------------------ the store

class KubernetesStore:
    """The ``StateStore`` Protocol over the Kubernetes API (see the module docstring for the rules it keeps)."""

    def __init__(self, api_client, settings: KubernetesStoreSettings | None = None) -> None:
        from kubernetes import client

        self.settings = settings or KubernetesStoreSettings()
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._lock = threading.RLock()
        self._depth = 0
        self._buffer: dict[tuple[str, tuple[str, ...]], Any] | None = None  # (plural, key) -> record | _DELETED
        # Per thread (``_seen``): (plural or "secrets", object name) -> (resourceVersion, key) as this thread last
        # read or wrote it; (None, None) when it last saw no such object.  Per thread, so that what one thread
        # read (a metrics scrape's lists, a status call) never becomes the version another thread's write is
        # based on: that write must conflict if the object changed since *its* read.
        self._local = threading.local()
        self._next_op_id: int | None = None
        self.may_write: Callable[[], bool] | None = None
        """When set (the leader's daemon: "the Lease is still ours by our own clock"), every create, replace and
        delete asks it first and fails with ``StoreUnavailable`` when it says no: a leader that lost its Lease
        writes nothing, even from a thread still finishing a pass."""

    @classmethod
    def in_cluster(cls, settings: KubernetesStoreSettings | None = None) -> "KubernetesStore":
        """The store of a controller running in a pod: its ServiceAccount's token and the cluster's CA."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        configuration.retries = False  # one attempt per call, bounded by the request timeout
        return cls(client.ApiClient(configuration), settings)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None,
                        settings: KubernetesStoreSettings | None = None) -> "KubernetesStore":
        """The store of a controller outside the cluster, from a kubeconfig file (``None``: $KUBECONFIG/~/.kube)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        configuration.retries = False  # one attempt per call, bounded by the request timeout
        return cls(client.ApiClient(configuration), settings)

    def __repr__(self) -> str:
        return f"KubernetesStore(group={self.settings.api_group!r}, namespace={self.settings.namespace!r})"

    # -------------------------------------------------------------------------------------- transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._buffer = {}
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._buffer = None
                raise
            self._depth -= 1
            if outer:
                buffer, self._buffer = self._buffer, None
                for (plural, key), value in buffer.items():
                    self._apply(plural, key, value)

    def _write(self, plural: str, key: tuple[str, ...], value: Any) -> None:
        with self.transaction():
            self._buffer[(plural, key)] = value

    def _apply(self, plural: str, key: tuple[str, ...], value: Any) -> None:
        if plural == "secrets":
            self._apply_chap(key[0], value)
            return
        kind = _KIND_BY_PLURAL[plural]
        if value is _DELETED:
            self._delete_object(kind, key)
        else:
            self._put_object(kind, value)
            if kind is OPERATIONS and value.state != OP_STARTED:
                # An ended operation is not written again (a prune reads before it deletes): what this thread
                # saw of it need not be kept, or every thread's memory would grow with every operation.
                self._seen.pop((plural, kind.name(key)), None)

    # -------------------------------------------------------------------------------------- generic records

    def _get(self, kind: Kind, key: tuple[str, ...]) -> Any | None:
        with self._lock:
            if self._buffer is not None and (kind.plural, key) in self._buffer:
                value = self._buffer[(kind.plural, key)]
                return None if value is _DELETED else value
            obj = self._read(kind, kind.name(key))
            if obj is None or kind.key_of(obj["spec"]) != key:
                return None
            return kind.from_spec(obj["spec"])

    def _list(self, kind: Kind, *, remember: bool = True, **filters: str | None) -> list[Any]:
        """Records whose spec fields equal ``filters`` (None: any), sorted by key, buffered writes included.

        ``remember``: the caller's read, so later writes are based on it. The store's own checks (is an id taken?)
        pass False: they must not turn a write from a stale read into one from a fresh read.
        """
        wanted = {field: value for field, value in filters.items() if value is not None}
        selector = ",".join(f"{self._label(field)}={label_value(value)}" for field, value in wanted.items())
        with self._lock:
            records = {}
            for obj in self._call(self._custom.list_cluster_custom_object, self.settings.api_group, VERSION,
                                  kind.plural, label_selector=selector or None,
                                  what=f"listing {kind.plural}.{self.settings.api_group}")["items"]:
                spec = obj["spec"]
                if remember:
                    self._seen[(kind.plural, obj["metadata"]["name"])] = (obj["metadata"]["resourceVersion"],
                                                                          kind.key_of(spec))
                if kind.name(kind.key_of(spec)) == obj["metadata"]["name"]:
                    records[kind.key_of(spec)] = kind.from_spec(spec)
            for (plural, key), value in (self._buffer or {}).items():
                if plural == kind.plural:
                    records.pop(key, None)
                    if value is not _DELETED:
                        records[key] = value
            chosen = [r for r in records.values()
                      if all(kind.to_spec(r)[field] == value for field, value in wanted.items())]
            return sorted(chosen, key=lambda r: _sort_key(kind, r))

    def _label(self, field: str) -> str:
        return f"{self.settings.api_group}/{field}"

    def _read(self, kind: Kind, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self._custom.get_cluster_custom_object(self.settings.api_group, VERSION, kind.plural, name,
                                                         _request_timeout=self.settings.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                self._seen[(kind.plural, name)] = (None, None)
                return None
            raise _store_error(exc, f"reading {kind.kind} {name}") from None
        except Exception as exc:  # noqa: BLE001 - urllib3/socket errors: the API server is unreachable
            raise StoreUnavailable(f"reading {kind.kind} {name}: the API server is unreachable: {exc}") from None
        self._seen[(kind.plural, name)] = (obj["metadata"]["resourceVersion"], kind.key_of(obj["spec"]))
        return obj

    def _put_object(self, kind: Kind, record: Any) -> None:
        key = kind.key(record)
        name = kind.name(key)
        spec = kind.to_spec(record)
        labels = {**MANAGED_BY, **{self._label(f): label_value(str(spec[f])) for f in kind.indexes}}
        body = {"apiVersion": f"{self.settings.api_group}/{VERSION}", "kind": kind.kind,
                "metadata": {"name": name, "labels": labels}, "spec": spec}
        if (kind.plural, name) not in self._seen:
            self._read(kind, name)
        version, current = self._seen[(kind.plural, name)]
        with self._forgotten_on_conflict(kind.plural, name):
            if version is None:  # last seen missing: if someone created it since, that is a conflict (409)
                obj = self._call(self._custom.create_cluster_custom_object, self.settings.api_group, VERSION,
                                 kind.plural, body, what=f"creating {kind.kind} {name}")
            else:
                if current != key:
                    raise ValueError(f"{kind.kind} object {name} holds another key than {key}: "
                                     "two keys map to one object name")
                body["metadata"]["resourceVersion"] = version
                obj = self._call(self._custom.replace_cluster_custom_object, self.settings.api_group, VERSION,
                                 kind.plural, name, body, what=f"updating {kind.kind} {name}")
        self._seen[(kind.plural, name)] = (obj["metadata"]["resourceVersion"], key)

    def _delete_object(self, kind: Kind, key: tuple[str, ...]) -> None:
        name = kind.name(key)
        if self._seen.get((kind.plural, name), (None, None))[0] is None:
            # Not seen, or last seen missing by this thread: another may have made it since.  A delete must not
            # skip what is there (as a create must not overwrite it): read again.
            self._read(kind, name)
        version, current = self._seen[(kind.plural, name)]
        if version is None or current != key:
            return  # deleting what is gone is a no-op
        with self._forgotten_on_conflict(kind.plural, name):
            self._call(self._custom.delete_cluster_custom_object, self.settings.api_group, VERSION, kind.plural,
                       name, body={"preconditions": {"resourceVersion": version}},
                       what=f"deleting {kind.kind} {name}", missing_ok=True)
        if kind is OPERATIONS:
            self._seen.pop((kind.plural, name), None)  # an id is never used again: nothing to remember
        else:
            self._seen[(kind.plural, name)] = (None, None)

    @contextmanager
    def _forgotten_on_conflict(self, plural: str, name: str):
        """What this thread saw of an object is stale once a write of it conflicted: the next call reads it
        again (else every retry on this thread would send the same stale version and conflict again)."""
        try:
            yield
        except StoreConflict:
            self._seen.pop((plural, name), None)
            raise

    @property
    def _seen(self) -> dict[tuple[str, str], tuple[str | None, tuple[str, ...] | None]]:
        seen = getattr(self._local, "seen", None)
        if seen is None:
            seen = self._local.seen = {}
        return seen

    def _call(self, method, *args, what: str, missing_ok: bool = False, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException

        if self.may_write is not None and method.__name__.startswith(_WRITES) and not self.may_write():
            raise StoreUnavailable(f"{what}: this controller is no longer the leader (its Lease is not "
                                   "renewed): it writes nothing")
        try:
            return method(*args, _request_timeout=self.settings.request_timeout, **kwargs)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise _store_error(exc, what) from None
        except (ValueError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - urllib3/socket errors: the API server is unreachable
            raise StoreUnavailable(f"{what}: the API server is unreachable: {exc}") from None

    # -------------------------------------------------------------------------------------- the Protocol

    def put_node(self, node: Node) -> None:
        self._write(NODES.plural, NODES.key(node), node)

    def get_node(self, node_id: str) -> Node | None:
        return self._get(NODES, (node_id,))

    def list_nodes(self) -> list[Node]:
        return self._list(NODES)

    def delete_node(self, node_id: str) -> None:
        self._write(NODES.plural, (node_id,), _DELETED)

    def put_pool(self, pool: Pool) -> None:
        self._write(POOLS.plural, POOLS.key(pool), pool)

    def get_pool(self, name: str) -> Pool | None:
        return self._get(POOLS, (name,))

    def list_pools(self) -> list[Pool]:
        return self._list(POOLS)

    def delete_pool(self, name: str) -> None:
        self._write(POOLS.plural, (name,), _DELETED)

    def put_volume(self, volume: Volume) -> None:
        with self.transaction():
            clash = next((v for v in self._list(VOLUMES, remember=False, volumeId=volume.id) if v.name != volume.name), None)
            if clash is not None:
                raise ValueError(f"volume id {volume.id} is already used by volume {clash.name}")
            self._write(VOLUMES.plural, VOLUMES.key(volume), volume)

    def get_volume(self, name: str) -> Volume | None:
        return self._get(VOLUMES, (name,))

    def list_volumes(self, pool: str | None = None) -> list[Volume]:
        return self._list(VOLUMES, pool=pool)

    def delete_volume(self, name: str) -> None:
        self._write(VOLUMES.plural, (name,), _DELETED)

    def put_snapshot(self, snapshot: Snapshot) -> None:
        with self.transaction():
            clash = next((s for s in self._list(SNAPSHOTS, remember=False, snapshotId=snapshot.id)
                          if s.name != snapshot.name), None)
            if clash is not None:
                raise ValueError(f"snapshot id {snapshot.id} is already used by snapshot {clash.name}")
            self._write(SNAPSHOTS.plural, SNAPSHOTS.key(snapshot), snapshot)

    def get_snapshot(self, name: str) -> Snapshot | None:
        return self._get(SNAPSHOTS, (name,))

    def list_snapshots(self, volume: str | None = None) -> list[Snapshot]:
        return self._list(SNAPSHOTS, volume=volume)

    def delete_snapshot(self, name: str) -> None:
        self._write(SNAPSHOTS.plural, (name,), _DELETED)

    def put_attachment(self, attachment: Attachment) -> None:
        self._write(ATTACHMENTS.plural, ATTACHMENTS.key(attachment), attachment)

    def get_attachment(self, volume: str, node: str) -> Attachment | None:
        return self._get(ATTACHMENTS, (volume, node))

    def list_attachments(self, volume: str | None = None, node: str | None = None) -> list[Attachment]:
        return self._list(ATTACHMENTS, volume=volume, node=node)

    def delete_attachment(self, volume: str, node: str) -> None:
        self._write(ATTACHMENTS.plural, (volume, node), _DELETED)

    def put_export(self, export: Export) -> None:
        self._write(EXPORTS.plural, EXPORTS.key(export), export)

    def get_export(self, volume: str, initiator_iqn: str) -> Export | None:
        return self._get(EXPORTS, (volume, initiator_iqn))

    def list_exports(self, volume: str | None = None) -> list[Export]:
        return self._list(EXPORTS, volume=volume)

    def delete_export(self, volume: str, initiator_iqn: str) -> None:
        self._write(EXPORTS.plural, (volume, initiator_iqn), _DELETED)

    # -------------------------------------------------------------------------------------- CHAP Secrets

    def _secret_name(self, volume: str) -> str:
        return object_name(volume, prefix="shoal-chap-")

    def put_chap(self, volume: str, credential: ChapCredential) -> None:
        self._write("secrets", (volume,), credential)

    def get_chap(self, volume: str) -> ChapCredential | None:
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            if self._buffer is not None and ("secrets", (volume,)) in self._buffer:
                value = self._buffer[("secrets", (volume,))]
                return None if value is _DELETED else value
            name = self._secret_name(volume)
            try:
                secret = self._core.read_namespaced_secret(name, self.settings.namespace,
                                                           _request_timeout=self.settings.request_timeout)
            except ApiException as exc:
                if exc.status == 404:
                    self._seen[("secrets", name)] = (None, None)
                    return None
                raise _store_error(exc, f"reading Secret {name}") from None
            except Exception as exc:  # noqa: BLE001
                raise StoreUnavailable(f"reading Secret {name}: the API server is unreachable: "
                                       f"{type(exc).__name__}") from None
            owner = (secret.metadata.annotations or {}).get(self._label("volume"), "")
            self._seen[("secrets", name)] = (secret.metadata.resource_version, (owner,))
            if owner != volume:
                return None
            data = secret.data or {}
            return ChapCredential(base64.b64decode(data.get("user", "")).decode(),
                                  base64.b64decode(data.get("secret", "")).decode())

    def delete_chap(self, volume: str) -> None:
        self._write("secrets", (volume,), _DELETED)

    def _apply_chap(self, volume: str, value: Any) -> None:
        name = self._secret_name(volume)
        seen = self._seen.get(("secrets", name))
        if seen is None or (value is _DELETED and seen[0] is None):
            # Not seen, or a delete of what this thread last saw missing (another may have made it since).
            self.get_chap(volume)  # learns the resourceVersion, if the Secret exists
        version, owner = self._seen[("secrets", name)]
        if version is not None and owner != (volume,):
            raise ValueError(f"Secret {name} belongs to another volume: two volume names map to one Secret name")
        if value is _DELETED:
            if version is not None:
                with self._forgotten_on_conflict("secrets", name):
                    self._call(self._core.delete_namespaced_secret, name, self.settings.namespace,
                               body={"preconditions": {"resourceVersion": version}},
                               what=f"deleting Secret {name}", missing_ok=True)
                self._seen[("secrets", name)] = (None, None)
            return
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": {**MANAGED_BY, self._label("chap"): "true"},
                             "annotations": {self._label("volume"): volume}},
                "data": {"user": base64.b64encode(value.user.encode()).decode(),
                         "secret": base64.b64encode(value.secret.encode()).decode()}}
        with self._forgotten_on_conflict("secrets", name):
            if version is None:
                secret = self._call(self._core.create_namespaced_secret, self.settings.namespace, body,
                                    what=f"creating Secret {name}")
            else:
                body["metadata"]["resourceVersion"] = version
                secret = self._call(self._core.replace_namespaced_secret, name, self.settings.namespace, body,
                                    what=f"updating Secret {name}")
        self._seen[("secrets", name)] = (secret.metadata.resource_version, (volume,))

    # -------------------------------------------------------------------------------------- operations log

    def record_operation(self, time: float, kind: str, subject: str, state: str, detail: str = "") -> int:
        with self.transaction():
            if self._next_op_id is None:
                self._next_op_id = max((o.id for o in self._list(OPERATIONS)), default=0) + 1
            op_id = self._next_op_id
            self._next_op_id += 1
            # a fresh id: create without reading first; if another writer took it, that is a conflict
            self._seen[(OPERATIONS.plural, OPERATIONS.name((str(op_id),)))] = (None, None)
            self._write(OPERATIONS.plural, (str(op_id),), Operation(op_id, time, kind, subject, state, detail))
        if op_id % 100 == 0:
            self._prune_operations(op_id)
        return op_id

    def finish_operation(self, op_id: int, state: str, detail: str = "") -> None:
        with self.transaction():
            current = self._get(OPERATIONS, (str(op_id),))
            if current is not None:
                self._write(OPERATIONS.plural, (str(op_id),),
                            Operation(op_id, current.time, current.kind, current.subject, state, detail))

    def list_operations(self, subject: str | None = None, limit: int = 100) -> list[Operation]:
        ops = self._list(OPERATIONS, subject=subject)
        return ops[-limit:] if limit > 0 else []

    def _prune_operations(self, newest: int) -> None:
        with self.transaction():
            for op in self._list(OPERATIONS):
                if op.id <= newest - self.settings.operations_kept:
                    self._write(OPERATIONS.plural, (str(op.id),), _DELETED)


_KIND_BY_PLURAL = {kind.plural: kind for kind in KINDS}


def _sort_key(kind: Kind, record: Any) -> tuple:
    if kind is OPERATIONS:
        return (record.id,)
    return kind.key(record)


def _store_error(exc, what: str) -> Exception:
    """The store's error for an API answer: 409 (and 404 on an update) is a conflict, 422 a refused record."""
    if exc.status == 409 or (exc.status == 404 and what.startswith("updating")):
        return StoreConflict(f"{what}: the object changed since this controller read it ({exc.reason}); "
                             "another writer is active, re-read and retry")
    if exc.status == 404:
        return StoreUnavailable(f"{what}: not found (404): are the CRDs installed (the chart's crds.install) and the "
                                "namespace there?")
    if exc.status == 422:
        return ValueError(f"{what}: the API server refused the record: {_message(exc)}")
    if exc.status in (401, 403):
        return StoreUnavailable(f"{what}: not allowed ({exc.status} {exc.reason}): check the controller's RBAC")
    return StoreUnavailable(f"{what}: the API server answered {exc.status} {exc.reason}")


def _message(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "")[:500]
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
