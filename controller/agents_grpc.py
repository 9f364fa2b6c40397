"""``AgentClient`` over gRPC: the controller drives node agents through their ``AgentService``.

``GrpcAgentDirectory`` keeps one channel per node, to its agent's address (a
node that registers with a new address, such as a pod's new IP, gets a new
channel and the old one is closed); ``GrpcAgentClient`` turns
each ``controller.domain.agents.AgentClient`` call into one RPC with a
deadline, retried with tenacity (exponential backoff with jitter) while the
agent answers ``UNAVAILABLE`` or an attempt's deadline passes, all attempts
within the call's one deadline: every AgentService RPC is idempotent
(agent.proto says what a repeat does), so a repeat is safe.  The
final status becomes a domain error through ``controller.api.errors`` (the
one table, read backwards), the message naming the node.  CHAP secrets go
into requests only: never into a log line, a repr or an error message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import tenacity

from controller.api.errors import domain_error
from controller.domain.errors import Unavailable
from controller.domain.model import Node
from node_agent.tls_reload import ChangedFiles, client_files_problem
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("shoal.controller.agents")

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class AgentTls:
    """PEM files for the controller's side of AgentService TLS."""

    ca: str = ""
    """CA that signed the agents' certificates (empty: the system's roots)."""
    cert: str = ""
    """The controller's client certificate, for agents that require mutual TLS."""
    key: str = ""
    """Its private key."""
    server_name: str = ""
    """Name the agents' certificates carry, checked instead of the address dialled (empty: the address).
    A cluster whose nodes share one certificate (the Helm chart's generated ``shoal-node``) sets it: the
    controller dials agents by IP, and a per-IP certificate would have to be made for every node."""

    pems: tuple[bytes | None, bytes | None, bytes | None] | None = field(default=None, repr=False, compare=False)
    """The files' contents as last found loading (CA, key, certificate): what channels are opened with, so that a
    renewal half written, which is not taken, is not used by a channel opened meanwhile either."""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("an agent client certificate needs its key (and the key its certificate)")

    def loaded(self) -> "AgentTls":
        """These paths with their contents now (after ``client_files_problem`` found them loading)."""
        try:
            return replace(self, pems=(_read(self.ca), _read(self.key), _read(self.cert)))
        except OSError:  # gone meanwhile: read when a channel is opened, as without this
            return replace(self, pems=None)


@dataclass(frozen=True)
class AgentCallSettings:
    """Deadlines and retries of calls to node agents."""

    timeout: float = 30.0
    """Deadline of one quick call (create, delete, expand, export, unexport, get state), seconds, its
    retries included. Creating a thick volume writes it out, so this is generous."""
    attach_timeout: float = 120.0
    """Deadline of one attach or detach, its retries included: an iSCSI login, the identity check, FUSE
    and a loop device (or open-iscsi's own timeouts, which reach 120 s when a portal does not answer).
    The chart's csi-attacher gives up on ControllerPublish after the same 120 s (``--timeout``): a
    call of ours must not go on after its caller has stopped waiting and sent the next."""
    attempts: int = 3
    """Calls made at most while the agent answers UNAVAILABLE (or one attempt's deadline passes), all
    within the call's one deadline: each attempt gets what is left of it, none starts after it."""
    initial_backoff: float = 0.2
    """First wait between attempts; it doubles (with jitter) up to ``max_backoff``."""
    max_backoff: float = 2.0
    """Longest wait between attempts: a controller call should fail in seconds, not minutes, when an
    agent is down; the reconcile loop keeps trying after that."""
    tls: AgentTls | None = None
    """TLS towards agents; None: plaintext (loopback, ``shoal up``)."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout <= 0 or self.attach_timeout <= 0:
            raise ValueError("agent calls need at least one attempt and positive deadlines")


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


#: gRPC's own reconnect backoff grows to 120 s while a peer is down, and calls fail at once meanwhile:
#: an agent back from a restart would stay "unreachable" for up to two minutes.  Capped at 1 s, the
#: channel finds it again within about a second of its return (the controller calls only a few agents).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))

#: Seconds a channel replaced after a TLS renewal stays open: longer than any call's deadline and retries.
RETIRE_AFTER = 600.0


def open_channel(address: str, tls: AgentTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = CHANNEL_OPTIONS
    if tls.server_name:
        options += (("grpc.ssl_target_name_override", tls.server_name),)
    ca, key, cert = tls.pems if tls.pems is not None else (_read(tls.ca), _read(tls.key), _read(tls.cert))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert), options=options)


class GrpcAgentDirectory:
    """``AgentDirectory``: a ``GrpcAgentClient`` for a node, on the node's channel (see the module docstring)."""

    def __init__(self, settings: AgentCallSettings | None = None, *,
                 channel_factory: Callable[[str, AgentTls | None], grpc.Channel] = open_channel,
                 sleep: Callable[[float], None] | None = None,
                 on_error: Callable[[str, str, grpc.StatusCode], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings or AgentCallSettings()
        self._channel_factory = channel_factory
        self._sleep = sleep
        self._on_error = on_error  # (node id, method, code) of each call that failed for good: metrics
        self._channels: dict[str, tuple[str, grpc.Channel]] = {}  # node id -> (agent address, channel)
        self._lock = threading.Lock()
        self._closed = False
        tls = self.settings.tls
        self._tls_files = ChangedFiles(tls.ca, tls.cert, tls.key) if tls is not None else None
        self._tls = tls.loaded() if tls is not None else None  # (checked at start: controller.daemon)
        self._retired: list[tuple[float, grpc.Channel]] = []  # (when to close, channel) after a TLS renewal
        self._monotonic = monotonic
        self.may_call: Callable[[], bool] | None = None
        """Asked before every attempt of every call (None: always yes): a replica elected by a Lease calls
        agents only while the Lease is surely its own (``LeaderElector.holds_lease``), as it writes the store,
        so that after renewals stop no call of its starts that could cross a new leader's."""

    def client(self, node: Node) -> "GrpcAgentClient":
        """The node's agent; refused (``Unavailable``) once the directory is closed (the controller stops).

        When the TLS files changed (a renewed client certificate or CA) and load, every agent gets a new channel
        with them; the old channels stay open ``RETIRE_AFTER`` seconds for the calls still on them."""
        stale = None
        with self._lock:
            if self._closed:
                raise Unavailable(f"agent of node {node.id}: the controller is stopping (its agent channels are "
                                  "closed); retry")
            now = self._monotonic()
            if self._tls_files is not None and self._tls_files.changed():
                self._renew_channels(now)
            due = [channel for when, channel in self._retired if when <= now]
            if due:
                self._retired = [(when, channel) for when, channel in self._retired if when > now]
            address, channel = self._channels.get(node.id, ("", None))
            if channel is None or address != node.agent_address:
                stale = channel
                channel = self._channel_factory(node.agent_address, self._tls)
                self._channels[node.id] = (node.agent_address, channel)
        if stale is not None:  # the agent moved: its old address leads nowhere (or to another node's agent)
            stale.close()
        for old in due:
            old.close()
        return GrpcAgentClient(node.id, node.agent_address, agent_pb2_grpc.AgentServiceStub(channel),
                               self.settings, sleep=self._sleep, on_error=self._on_error, may_call=self._may_call)

    def _may_call(self) -> bool:
        return self.may_call is None or self.may_call()

    def _renew_channels(self, now: float) -> None:
        tls = self.settings.tls
        assert tls is not None
        problem = client_files_problem(tls.cert, tls.key, tls.ca)
        if problem:
            log.warning("TLS files towards agents changed but do not load; the channels keep the previous ones: %s",
                        problem)
            return
        self._tls = tls.loaded()
        self._retired += [(now + RETIRE_AFTER, channel) for _, channel in self._channels.values()]
        self._channels = {}
        log.info("TLS files towards agents changed: new channels use them (the old ones close within %.0f s)",
                 RETIRE_AFTER)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = [channel for _, channel in self._channels.values()], {}
            channels += [channel for _, channel in self._retired]
            self._retired = []
        for channel in channels:
            channel.close()


def _export_to_proto(export: dict[str, Any]) -> common_pb2.ExportInfo:
    return common_pb2.ExportInfo(volume_id=export["volume_id"], target_iqn=export["target_iqn"],
                                 portals=list(export.get("portals") or ()), lun=int(export.get("lun", 0)),
                                 naa=export.get("naa", ""), serial=export.get("serial", ""),
                                 chap_user=export.get("chap_user", ""))


def _export_to_dict(export: common_pb2.ExportInfo) -> dict[str, Any]:
    return {"volume_id": export.volume_id, "target_iqn": export.target_iqn, "portals": list(export.portals),
            "lun": export.lun, "naa": export.naa, "serial": export.serial, "chap_user": export.chap_user,
            "initiators": list(export.initiators)}


def _disk_to_dict(disk: common_pb2.Disk) -> dict[str, Any]:
    return {"name": disk.name, "path": disk.path, "capacity_bytes": disk.capacity_bytes,
            "free_bytes": disk.free_bytes}


def _volume_to_dict(volume: agent_pb2.VolumeInfo) -> dict[str, Any]:
    return {"volume_id": volume.volume_id, "size_bytes": volume.size_bytes, "disk": volume.disk,
            "path": volume.path, "allocated_bytes": volume.allocated_bytes, "state": volume.state or "ready",
            "progress": volume.progress, "message": volume.message}


def _snapshot_to_dict(snapshot: agent_pb2.SnapshotInfo) -> dict[str, Any]:
    return {"snapshot_id": snapshot.snapshot_id, "volume_id": snapshot.volume_id, "size_bytes": snapshot.size_bytes,
            "disk": snapshot.disk, "state": snapshot.state or "ready", "progress": snapshot.progress,
            "message": snapshot.message, "method": snapshot.method}


class GrpcAgentClient:
    """One node's agent (see the module docstring)."""

    def __init__(self, node_id: str, address: str, stub: agent_pb2_grpc.AgentServiceStub,
                 settings: AgentCallSettings, *, sleep: Callable[[float], None] | None = None,
                 on_error: Callable[[str, str, grpc.StatusCode], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, may_call: Callable[[], bool] | None = None):
        self.node_id = node_id
        self.address = address
        self._stub = stub
        self._settings = settings
        self._sleep = sleep
        self._on_error = on_error
        self._clock = clock
        self._may_call = may_call

    def __repr__(self) -> str:
        return f"GrpcAgentClient({self.node_id!r}, {self.address!r})"

    # AgentClient.
    def create_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool) -> None:
        self._call("CreateVolume", agent_pb2.CreateVolumeRequest(volume_id=volume_id, size_bytes=size_bytes,
                                                                  disk=disk, thin=thin))

    def delete_volume(self, volume_id: str) -> None:
        self._call("DeleteVolume", agent_pb2.DeleteVolumeRequest(volume_id=volume_id))

    def expand_volume(self, volume_id: str, size_bytes: int) -> None:
        self._call("ExpandVolume", agent_pb2.ExpandVolumeRequest(volume_id=volume_id, size_bytes=size_bytes))

    def export_volume(self, volume_id: str, initiator_iqn: str, chap_user: str, chap_secret: str) -> dict[str, Any]:
        request = agent_pb2.ExportVolumeRequest(volume_id=volume_id, initiator_iqn=initiator_iqn,
                                                chap_user=chap_user, chap_secret=chap_secret)
        return _export_to_dict(self._call("ExportVolume", request, secret=chap_secret))

    def unexport_volume(self, volume_id: str, initiator_iqn: str) -> None:
        self._call("UnexportVolume", agent_pb2.UnexportVolumeRequest(volume_id=volume_id,
                                                                      initiator_iqn=initiator_iqn))

    def attach_volume(self, export: dict[str, Any], chap_secret: str, mode: str, *,
                      defer_login: bool = False) -> str:
        request = agent_pb2.AttachVolumeRequest(export=_export_to_proto(export), chap_secret=chap_secret, mode=mode,
                                                defer_login=defer_login)
        return self._call("AttachVolume", request, secret=chap_secret,
                          timeout=self._settings.attach_timeout).device_path

    def detach_volume(self, volume_id: str, mode: str, *, timeout: float | None = None) -> None:
        self._call("DetachVolume", agent_pb2.DetachVolumeRequest(volume_id=volume_id, mode=mode),
                   timeout=timeout or self._settings.attach_timeout)

    def get_state(self) -> dict[str, Any]:
        state = self._call("GetState", agent_pb2.GetStateRequest())
        # Each volume's state and message too: reconcile names the agent's own error for a volume in "error" (its
        # record damaged, its image missing) rather than guessing at it from the size.
        return {"node_id": state.node_id,
                "volumes": [_volume_to_dict(v) for v in state.volumes],
                "exports": [_export_to_dict(e) for e in state.exports],
                "attachments": [{"volume_id": a.volume_id, "device_path": a.device_path, "mode": a.mode}
                                for a in state.attachments],
                "disks": [_disk_to_dict(d) for d in state.disks],
                "snapshots": [_snapshot_to_dict(s) for s in state.snapshots]}

    def clone_volume(self, volume_id: str, size_bytes: int, disk: str, thin: bool, *, source_volume_id: str = "",
                     source_snapshot_id: str = "") -> dict[str, Any]:
        request = agent_pb2.CreateVolumeRequest(volume_id=volume_id, size_bytes=size_bytes, disk=disk, thin=thin,
                                                source_volume_id=source_volume_id,
                                                source_snapshot_id=source_snapshot_id)
        return _volume_to_dict(self._call("CreateVolume", request))

    def get_volume(self, volume_id: str) -> dict[str, Any]:
        return _volume_to_dict(self._call("GetVolume", agent_pb2.GetVolumeRequest(volume_id=volume_id)))

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> dict[str, Any]:
        request = agent_pb2.CreateSnapshotRequest(snapshot_id=snapshot_id, volume_id=volume_id)
        return _snapshot_to_dict(self._call("CreateSnapshot", request))

    def get_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        return _snapshot_to_dict(self._call("GetSnapshot", agent_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._call("DeleteSnapshot", agent_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    def fence_initiator(self, initiator_iqn: str) -> dict[str, Any]:
        # as long as an attach: the agent waits for the initiator's commands in flight (a slow disk)
        answer = self._call("FenceInitiator", agent_pb2.FenceInitiatorRequest(initiator_iqn=initiator_iqn),
                            timeout=self._settings.attach_timeout)
        return {"volume_ids": list(answer.volume_ids), "sessions_closed": answer.sessions_closed,
                "registrations_removed": answer.registrations_removed, "commands_waited": answer.commands_waited}

    # One RPC, retried.
    def _call(self, method: str, request, *, secret: str = "", timeout: float | None = None):
        settings = self._settings
        deadline = timeout or settings.timeout
        kwargs = {"sleep": self._sleep} if self._sleep is not None else {}
        rpc = getattr(self._stub, method)
        ends = self._clock() + deadline

        def attempt():  # what is left of the call's deadline (the retries share it)
            if self._may_call is not None and not self._may_call():
                raise Unavailable(f"agent of node {self.node_id}: {method} not sent: this controller is not "
                                  "surely the leader any more (its Lease); retry")
            return rpc(request, timeout=max(ends - self._clock(), 0.001))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, grpc.RpcError) and e.code() in RETRY_CODES),
            # no attempt after the deadline, nor one that its backoff would start past it
            stop=tenacity.stop_after_attempt(settings.attempts) | tenacity.stop_before_delay(deadline),
            wait=(tenacity.wait_exponential(multiplier=settings.initial_backoff, max=settings.max_backoff)
                  + tenacity.wait_random(0, settings.initial_backoff)),  # jitter: agents not hit in step
            before_sleep=lambda state: self._log_retry(method, state, secret),
            reraise=True, **kwargs)
        try:
            return retrying(attempt)
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!" (the agent moved, or we stop)
            raise Unavailable(f"agent of node {self.node_id} at {self.address}: {exc}; retry") from None
        except grpc.RpcError as exc:
            if self._on_error is not None:
                self._on_error(self.node_id, method, exc.code())
            raise self._error(method, exc, secret) from None

    def _error(self, method: str, exc: grpc.RpcError, secret: str):
        code, details = exc.code(), _scrub(exc.details() or "", secret)
        if code == grpc.StatusCode.UNAVAILABLE:
            message = (f"agent of node {self.node_id} at {self.address} is unreachable ({details}); "
                       "retry when it is back")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"agent of node {self.node_id} did not answer {method} in time; retry later"
        else:
            message = f"agent of node {self.node_id}: {method}: {details}"
        return domain_error(code, message)

    def _log_retry(self, method: str, state: tenacity.RetryCallState, secret: str) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, grpc.RpcError):
            log.info("agent of node %s: %s attempt %d: %s (%s); retrying", self.node_id, method,
                     state.attempt_number, exc.code().name, _scrub(exc.details() or "", secret))


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<secret>") if secret else text
