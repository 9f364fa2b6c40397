"""What the controller does, reported as Kubernetes Events (``--store kubernetes``).

Two parts:

* ``EventRecorder`` posts core/v1 Events from a background thread with a bounded queue, like client-go's
  broadcaster: recording never blocks an RPC and never fails one (a full queue or a refused post is logged and
  dropped; Events are a report, not state).  ``involvedObject`` is the Shoal CustomResource (``Volume``,
  ``Snapshot`` of the chart's API group) with its uid when it still exists, so ``kubectl describe`` finds them.
  The same Event again (object, type, reason and message: a repair that fails the same way on every reconcile
  pass) raises the ``count`` and ``lastTimestamp`` of the one posted before, as client-go's correlator does,
  instead of posting another: one stuck volume made 720 Events an hour.
* ``OperationEvents`` wraps the ``StateStore`` and turns the operations log into Events: every outcome written
  with ``finish_operation`` (or an operation recorded already finished, as the snapshot and clone copies and
  the reconcile loop do) becomes one Event, sent only once the store transaction holding it has committed, so
  an Event never reports what the store rolled back.  Wrapping the store rather than hooking
  ``ControllerService`` sees every writer of the log (service, snapshots, reconcile) and keeps the SQLite path
  untouched: the daemon only wraps the Kubernetes store.

Where the Events go: the Shoal CRs are cluster-scoped, and the API server accepts a core/v1 Event about a
cluster-scoped object only in namespace ``default`` (``legacyValidateEvent``: the Event's namespace must match
the object's, "" or ``default``), which is also where client-go's recorder puts them and where ``kubectl
describe`` looks.  Hence ``EventSettings.namespace`` defaults to ``default``.

Secrets: messages are the operations log's details (which never hold a CHAP secret: the service cuts them out of
errors); as a second line of defence any CHAP secret this store wrapper has seen is replaced by ``<secret>``
before a message leaves the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import urllib3
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException

from controller.domain.model import OP_DONE, OP_FAILED, ChapCredential

log = logging.getLogger("shoal.controller.events")

NORMAL, WARNING = "Normal", "Warning"

#: operation kind -> (the CR kind it is about, reason when done, reason when failed)
REASONS: dict[str, tuple[str, str, str]] = {
    "create_volume": ("Volume", "VolumeCreated", "CreateVolumeFailed"),
    "delete_volume": ("Volume", "VolumeDeleted", "DeleteVolumeFailed"),
    "expand_volume": ("Volume", "VolumeExpanded", "ExpandVolumeFailed"),
    "attach_volume": ("Volume", "VolumeAttached", "AttachVolumeFailed"),
    "detach_volume": ("Volume", "VolumeDetached", "DetachVolumeFailed"),
    "publish_volume": ("Volume", "VolumePublished", "PublishVolumeFailed"),
    "clone_volume": ("Volume", "VolumeCloned", "CloneVolumeFailed"),
    "create_snapshot": ("Snapshot", "SnapshotCreated", "CreateSnapshotFailed"),
    "delete_snapshot": ("Snapshot", "SnapshotDeleted", "DeleteSnapshotFailed"),
    # fencing (controller.domain.fencing): about the node; one event per owner's step
    "fence_requested": ("ShoalNode", "FenceRequested", "FenceRequestFailed"),
    "fence_node": ("ShoalNode", "NodeFenced", "FenceNodeFailed"),
    "fence_initiator": ("ShoalNode", "NodeFencedAtOwner", "FenceAtOwnerFailed"),
    "unfence_node": ("ShoalNode", "NodeUnfenced", "UnfenceNodeFailed"),
}

PLURALS = {"Volume": "volumes", "Snapshot": "snapshots", "Pool": "pools", "ShoalNode": "shoalnodes",
           "Attachment": "attachments"}

MESSAGE_LIMIT = 1024
"""Characters of an Event's message (events.k8s.io's ``note`` limit; core/v1 has none, kubectl shows one line)."""
SIMILAR_KEPT = 4096  # Events remembered to count a repeat on (client-go's correlator keeps as many)


@dataclass(frozen=True)
class EventSettings:
    """Where Events go and how they are signed."""

    namespace: str = "default"
    """Namespace of the Events: ``default``, the only one the API server accepts for Events about cluster-scoped
    objects (see the module docstring)."""
    api_group: str = "shoal.io"
    """API group of the CRs the Events are about (the chart's ``apiGroup``)."""
    component: str = "shoal-controller"
    """``source.component`` / ``reportingComponent``: what ``kubectl get events`` shows as FROM."""
    instance: str = ""
    """``source.host`` / ``reportingInstance``: this replica (the leader election identity)."""
    queue_size: int = 1000
    """Events waiting to be posted; beyond it new ones are dropped (and logged), as client-go does."""
    timeout: float = 5.0
    """Seconds one API call may take."""


@dataclass(frozen=True)
class Event:
    """One thing that happened, about one CR."""

    kind: str
    name: str
    type: str
    reason: str
    message: str
    time: float


class EventRecorder:
    """Posts Events in the background; ``record`` returns at once.  ``start()``, then ``stop()``."""

    def __init__(self, api: ApiClient, settings: EventSettings, *,
                 object_name: Callable[[str, str], str] = lambda kind, key: key):
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)
        self.settings = settings
        self.object_name = object_name
        self._queue: queue.Queue[Event | None] = queue.Queue(settings.queue_size)
        self._posted: OrderedDict[tuple, tuple[str, int]] = OrderedDict()  # Event's kind..message -> (name, count)
        self._posted_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.posted = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="k8s-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Post what is queued (for up to ``timeout`` seconds), then stop."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def record(self, kind: str, name: str, type_: str, reason: str, message: str) -> None:
        event = Event(kind, name, type_, reason, message[:MESSAGE_LIMIT], time.time())
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("event queue full: dropped %s %s/%s", reason, kind, name)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self.post(event)
                self.posted += 1
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                self.dropped += 1
                status = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else repr(exc)
                log.warning("cannot post event %s about %s/%s: %s", event.reason, event.kind, event.name, status)

    def post(self, event: Event) -> None:
        """Create the Event now, or count it again on the same one posted before (the background thread's job;
        tests call it directly too)."""
        s = self.settings
        stamp = datetime.fromtimestamp(event.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = (event.kind, event.name, event.type, event.reason, event.message)
        with self._posted_lock:
            known = self._posted.get(key)
        if known is not None:
            posted, count = known
            try:
                self.core.patch_namespaced_event(posted, s.namespace, {"count": count + 1, "lastTimestamp": stamp},
                                                 _request_timeout=s.timeout)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                # gone (Events expire, an hour by default): post it anew below
            else:
                with self._posted_lock:
                    self._posted[key] = (posted, count + 1)
                    self._posted.move_to_end(key)
                return
        name = self.object_name(event.kind, event.name)
        involved = {"apiVersion": f"{s.api_group}/v1", "kind": event.kind, "name": name}
        uid = self._uid(event.kind, name)
        if uid:
            involved["uid"] = uid
        event_name = f"{name}.{uuid.uuid4().hex[:16]}"  # client-go's naming: the object's name, a unique suffix
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name, "namespace": s.namespace},
            "involvedObject": involved,
            "type": event.type, "reason": event.reason, "message": event.message,
            "source": {"component": s.component, **({"host": s.instance} if s.instance else {})},
            "reportingComponent": s.component, "reportingInstance": s.instance,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        self.core.create_namespaced_event(s.namespace, body, _request_timeout=s.timeout)
        with self._posted_lock:
            self._posted[key] = (event_name, 1)
            while len(self._posted) > SIMILAR_KEPT:
                self._posted.popitem(last=False)

    def _uid(self, kind: str, name: str) -> str:
        """The CR's uid, or "" when it is gone (a deleted volume's Event) or cannot be read."""
        plural = PLURALS.get(kind)
        if plural is None:
            return ""
        try:
            obj = self.custom.get_cluster_custom_object(self.settings.api_group, "v1", plural, name,
                                                        _request_timeout=self.settings.timeout)
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return ""
        return str((obj.get("metadata") or {}).get("uid") or "")


def describe(kind: str, subject: str, state: str, started: str, finished: str) -> tuple[str, str, str, str]:
    """(CR kind, event type, reason, message) for an operation's outcome."""
    cr_kind, done, failed = REASONS.get(kind, ("Volume", "", ""))
    words = kind.replace("_", " ")
    if state == OP_DONE:
        type_, reason = NORMAL, done or "OperationDone"
    else:
        type_, reason = WARNING, failed or "OperationFailed"
    parts = [f"{words} {subject}"]
    if started:
        parts.append(f"({started})")
    parts.append("done" if state == OP_DONE else "failed")
    message = " ".join(parts) + (f": {finished}" if finished else "")
    return cr_kind, type_, reason, message


class OperationEvents:
    """A ``StateStore`` that is ``store``, plus an Event for each operation outcome once it is committed.

    Every ``StateStore`` method not defined here is the wrapped store's (``__getattr__``).
    """

    def __init__(self, store, recorder: EventRecorder):
        self._store = store
        self.recorder = recorder
        self._ops: dict[int, tuple[str, str, str]] = {}  # op id -> (kind, subject, detail), until finished
        self._ops_lock = threading.Lock()
        self._secrets: set[str] = set()
        self._local = threading.local()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def __repr__(self) -> str:
        return f"OperationEvents({self._store!r})"

    @property
    def store(self):
        """The wrapped store."""
        return self._store

    @contextmanager
    def transaction(self) -> Iterator[None]:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth == 0:
            local.pending, local.begun = [], []
        local.depth = depth + 1
        try:
            with self._store.transaction():
                yield
        except BaseException:
            if depth == 0:  # rolled back: neither its outcomes nor the operations it began happened
                local.pending = []
                with self._ops_lock:
                    for op in local.begun:
                        self._ops.pop(op, None)
            raise
        finally:
            local.depth = depth
        if depth == 0:
            pending, local.pending = local.pending, []
            for event in pending:
                self._send(*event)

    def _emit(self, kind: str, subject: str, state: str, started: str, finished: str) -> None:
        if state not in (OP_DONE, OP_FAILED):
            return
        if getattr(self._local, "depth", 0):
            self._local.pending.append((kind, subject, state, started, finished))
        else:
            self._send(kind, subject, state, started, finished)

    def _send(self, kind: str, subject: str, state: str, started: str, finished: str) -> None:
        cr_kind, type_, reason, message = describe(kind, subject, state, started, finished)
        for secret in list(self._secrets):
            message = message.replace(secret, "<secret>")
        self.recorder.record(cr_kind, subject, type_, reason, message)

    # The operations log.
    def record_operation(self, time: float, kind: str, subject: str, state: str, detail: str = "") -> int:
        op = self._store.record_operation(time, kind, subject, state, detail)
        if state in (OP_DONE, OP_FAILED):
            self._emit(kind, subject, state, "", detail)
        else:
            with self._ops_lock:
                self._ops[op] = (kind, subject, detail)
            if getattr(self._local, "depth", 0):
                self._local.begun.append(op)
        return op

    def finish_operation(self, op_id: int, state: str, detail: str = "") -> None:
        self._store.finish_operation(op_id, state, detail)
        with self._ops_lock:
            begun = self._ops.pop(op_id, None)
        if begun is not None:
            self._emit(begun[0], begun[1], state, begun[2], detail)

    # CHAP credentials: remembered only to keep them out of Event messages.
    def put_chap(self, volume: str, credential: ChapCredential) -> None:
        self._store.put_chap(volume, credential)
        self._secrets.add(credential.secret)

    def get_chap(self, volume: str) -> ChapCredential | None:
        credential = self._store.get_chap(volume)
        if credential is not None:
            self._secrets.add(credential.secret)
        return credential
