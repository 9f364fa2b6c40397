"""Register with the controller and heartbeat, from a background thread, until stopped.

``Register`` is retried with tenacity (randomised exponential backoff, capped
by ``max_register_backoff``) for as long as the agent runs: an agent started
before its controller simply waits for it, and serves AgentService meanwhile.
Then a ``Heartbeat`` (liveness and free space) every interval the controller
asked for (each answer says the interval again: a controller restarted with
other settings is followed); a ``NOT_FOUND`` answer (the controller forgot us,
e.g. a new state store) registers again, other failures are logged and the
next beat tries again.  Nothing ends the loop but ``stop()``: a disk that
cannot be read (unmounted for a moment) sends a beat without disks (the
controller keeps those it knows), and an unexpected error is logged and retried,
so a live agent never falls silent and gets fenced.

Every successful Register answers the labels the controller recorded for the
node (with ``--store kubernetes``, the Kubernetes Node's topology labels merged
in): they are kept in ``labels`` and handed to ``on_registered`` (the CSI Node
service's ``NodeLabels.set``), so a re-registration refreshes them.  A
controller that answers none (one from before RegisterResponse.labels) recorded
the labels as sent: those are taken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import tenacity

from node_agent.agent.volumes import Disk
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("shoal.agent.registration")

#: Codes after which trying again later can succeed; the others are logged as errors but retried too
#: (slowly): an operator may fix the controller's side while the agent waits.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class NodeAnnouncement:
    """What Register says about this node (the disks are read fresh for every call)."""

    node_id: str
    initiator_iqn: str
    agent_address: str
    portals: tuple[str, ...]
    labels: dict[str, str]


def _disks_proto(disks: list[Disk]) -> list[common_pb2.Disk]:
    return [common_pb2.Disk(name=d.name, path=d.path, capacity_bytes=d.capacity, free_bytes=d.free) for d in disks]


class Registrar:
    """The registration/heartbeat loop; ``start()`` runs it in a daemon thread, ``stop()`` ends it."""

    def __init__(self, announcement: NodeAnnouncement, disks: Callable[[], list[Disk]],
                 channel: grpc.Channel, *, timeout: float = 10.0, max_backoff: float = 30.0,
                 default_interval: float = 10.0, on_drop: Callable[[list[str]], None] | None = None,
                 on_registered: Callable[[dict[str, str]], None] | None = None,
                 renew: Callable[[], grpc.Channel | None] | None = None):
        """``renew``: asked before each call; a new channel to use from then on (the TLS files changed), or
        None for the same."""
        self.announcement = announcement
        self.disks = disks
        self.channel = channel
        self.stub = agent_pb2_grpc.RegistrationServiceStub(channel)
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.default_interval = default_interval
        # The node is fenced: forget these volumes' attachments (HeartbeatResponse).  Called on the heartbeat
        # thread, so it must return at once: a detach may wait long on a session its owner cut off.
        self.on_drop = on_drop
        self.on_registered = on_registered  # gets the labels the controller recorded, after every Register
        self.renew = renew
        self.labels: dict[str, str] | None = None  # those labels; None until the first Register succeeded
        self.fenced = False
        self.registered = threading.Event()
        self.heartbeats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="registration", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        self.channel.close()

    def run(self) -> None:
        while not self._stop.is_set():
            interval = self.register_until_done()
            if interval is None:
                return
            self.beat_until_forgotten(interval)

    def register_until_done(self) -> float | None:
        """Register, retrying until it works; the heartbeat interval, or None once stopped."""
        retrying = tenacity.Retrying(
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=self.max_backoff),
            stop=tenacity.stop_when_event_set(self._stop),
            sleep=self._stop.wait,
            retry=tenacity.retry_if_exception_type(Exception),  # an unreadable disk too: try again later
            before_sleep=self._log_failure,
            reraise=True,
        )
        try:
            answer = retrying(self._register)
        except Exception:  # noqa: BLE001 - only once stopped (the retry stops for nothing else)
            return None
        self.labels = dict(answer.labels) or dict(self.announcement.labels)
        if self.on_registered is not None:
            self.on_registered(dict(self.labels))
        self.registered.set()
        interval = answer.heartbeat_interval_seconds or self.default_interval
        log.info("registered node %s with the controller; heartbeat every %.1fs", self.announcement.node_id,
                 interval)
        return interval

    def _renewed(self) -> None:
        """Take a new channel when ``renew`` has one (only this thread calls through the channel)."""
        channel = self.renew() if self.renew is not None else None
        if channel is not None:
            old, self.channel = self.channel, channel
            self.stub = agent_pb2_grpc.RegistrationServiceStub(channel)
            old.close()

    def beat_until_forgotten(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._renewed()
                answer = self.stub.Heartbeat(agent_pb2.HeartbeatRequest(
                    node_id=self.announcement.node_id, disks=self._disks_or_none()), timeout=self.timeout)
                self.heartbeats += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("the controller does not know node %s: registering again",
                                self.announcement.node_id)
                    self.registered.clear()
                    return
                log.warning("heartbeat failed (%s): %s", exc.code().name, exc.details())
                continue
            except Exception:  # noqa: BLE001 - a bug must not silence the node: the next beat tries again
                log.exception("heartbeat failed")
                continue
            if answer.heartbeat_interval_seconds and answer.heartbeat_interval_seconds != interval:
                log.info("the controller asks for a heartbeat every %.1fs (was %.1fs)",
                         answer.heartbeat_interval_seconds, interval)
                interval = answer.heartbeat_interval_seconds
            if answer.fenced != self.fenced:
                self.fenced = answer.fenced
                (log.warning if answer.fenced else log.info)("the controller %s node %s", "fenced" if answer.fenced
                                                             else "unfenced", self.announcement.node_id)
            if answer.drop_volume_ids and self.on_drop is not None:
                self.on_drop(list(answer.drop_volume_ids))

    def _disks_or_none(self) -> list[common_pb2.Disk]:
        """The disks for a heartbeat; none (the controller keeps what it knows) when they cannot be read now."""
        try:
            return _disks_proto(self.disks())
        except Exception as exc:  # noqa: BLE001 - a disk unmounted for a moment, say: the beat still goes
            log.warning("reading the disks for the heartbeat failed (%s): sending it without them", exc)
            return []

    def _register(self) -> agent_pb2.RegisterResponse:
        self._renewed()
        a = self.announcement
        return self.stub.Register(agent_pb2.RegisterRequest(
            node_id=a.node_id, initiator_iqn=a.initiator_iqn, agent_address=a.agent_address,
            portals=list(a.portals), labels=dict(a.labels), disks=_disks_proto(self.disks())), timeout=self.timeout)

    def _log_failure(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        level = logging.INFO if code in _TRANSIENT else logging.ERROR
        if state.attempt_number == 1 or state.attempt_number % 10 == 0 or level == logging.ERROR:
            log.log(level, "registration attempt %d failed (%s): %s; retrying", state.attempt_number,
                    code.name if code else type(exc).__name__, exc.details() if code else exc)
