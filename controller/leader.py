"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection`` package does it.

Two or more ``shoal controller --store kubernetes`` replicas campaign for one
Lease; the holder acts (reconcile loop, CSI Controller socket, gRPC), the others
wait.  The rules, taken from client-go (``tools/leaderelection/leaderelection.go``):

* **Acquire** when the Lease is absent (create it), released (``holderIdentity``
  empty), or expired.  Expiry is judged with the *observer's own clock*: a
  candidate notes the monotonic time at which it last saw the record change,
  and the lease is expired when ``leaseDurationSeconds`` have passed since then
  without a change.  Wall clocks of different hosts are never compared.  A
  candidate polls every ``retry_period`` (jittered), but wakes exactly at the
  expiry it computed when that comes sooner, so a takeover is not a poll late.
* **Renew** every ``retry_period``; the holder keeps ``acquireTime`` and
  ``leaseTransitions``, a new holder takes ``acquireTime = now`` and
  ``leaseTransitions + 1``.
* **Every write** is a create (409: someone else created it first) or an
  update carrying the ``resourceVersion`` just read (409: someone else wrote in
  between).  Either way the race is lost and the next attempt reads again.
* **Losing**: when no renewal succeeded for ``renew_deadline`` (shorter than
  the lease duration, so the leader stops before anyone may take over), or
  another holder is seen, ``on_stopped_leading`` runs at once.
* **Release** on a clean stop: holder empty and ``leaseDurationSeconds: 1``, so
  a standby takes over at its next retry instead of waiting a full lease.
  Unlike client-go (release, then the callback), ``on_stopped_leading`` runs
  *before* the release: the old leader has stopped acting by the time anyone
  may take over.

``LeaderElector.try_acquire_or_renew`` is one step (read, decide, write) and
``run`` the loop around it; the clock is injectable so tests can step a real
API server's Lease through expiry without sleeping.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable, Protocol

import urllib3
from kubernetes.client import ApiClient, CoordinationV1Api
from kubernetes.client.rest import ApiException

log = logging.getLogger("shoal.controller.leader")

JITTER = 1.2
"""client-go's ``JitterFactor``: a candidate waits ``retry_period * (1 + random * JITTER)`` between attempts,
so candidates that started together do not keep colliding."""


def default_identity() -> str:
    """``<pod name or host name>_<random>``: unique even when a restarted pod keeps its name (client-go does the
    same), so a new process never mistakes its predecessor's lease for its own."""
    base = os.environ.get("POD_NAME") or socket.gethostname() or "shoal-controller"
    return f"{base}_{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class LeaderSettings:
    """Which Lease the replicas compete for, who this one is, and the timing (client-go's defaults)."""

    lease_name: str = "shoal-controller"
    """Name of the Lease object; every replica of one Shoal installation uses the same one."""
    namespace: str = "default"
    """Namespace of the Lease (the controller's own, read from its service account by the daemon)."""
    identity: str = field(default_factory=default_identity)
    """This candidate's ``holderIdentity``: pod (or host) name plus a random suffix."""
    lease_duration: int = 15
    """Seconds a standby waits, after it last saw the record change, before it takes an unrenewed lease
    (``leaseDurationSeconds``, a whole number in the API).  15: client-go's and kube-controller-manager's
    default; a failed-over controller is back within about that."""
    renew_deadline: float = 10.0
    """Seconds the leader keeps trying to renew before it gives up and stops acting; shorter than the lease
    duration, so it has stopped before a standby may take over (client-go: 10)."""
    retry_period: float = 2.0
    """Seconds between attempts to acquire, and between renewals (client-go: 2)."""
    release_on_stop: bool = True
    """Release the lease on a clean stop, so a standby takes over at its next retry."""

    def __post_init__(self) -> None:
        if not self.lease_name or not self.namespace or not self.identity:
            raise ValueError("leader election needs a lease name, a namespace and an identity")
        if not isinstance(self.lease_duration, int) or self.lease_duration < 1:
            raise ValueError("the lease duration is a whole number of seconds, at least 1")
        if not self.renew_deadline < self.lease_duration:
            raise ValueError("the renew deadline must be shorter than the lease duration")
        if not self.renew_deadline > JITTER * self.retry_period > 0:
            raise ValueError(f"the renew deadline must be longer than {JITTER} x the (positive) retry period")

    @classmethod
    def for_duration(cls, lease_duration: int, **overrides) -> "LeaderSettings":
        """Settings with client-go's proportions (15 / 10 / 2) scaled to ``lease_duration``."""
        timing = {"renew_deadline": lease_duration * 2 / 3, "retry_period": lease_duration * 2 / 15}
        timing.update({k: v for k, v in overrides.items() if v is not None})
        return cls(lease_duration=lease_duration, **timing)


class Clock(Protocol):
    """Where the elector reads time: ``monotonic`` for its own decisions, ``now`` for what it writes."""

    def monotonic(self) -> float: ...
    def now(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


@dataclass(frozen=True)
class LeaderRecord:
    """The election's part of a Lease's spec (client-go's ``LeaderElectionRecord``)."""

    holder: str
    duration: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int

    @classmethod
    def from_lease(cls, lease) -> "LeaderRecord":
        spec = lease.spec
        return cls(spec.holder_identity or "", int(spec.lease_duration_seconds or 0), spec.acquire_time,
                   spec.renew_time, int(spec.lease_transitions or 0))

    def spec(self) -> dict:
        return {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration,
                "acquireTime": self.acquire_time, "renewTime": self.renew_time,
                "leaseTransitions": self.transitions}


def wire_time(value: datetime) -> datetime:
    """``value`` as it survives the trip to the API server.

    A Lease's times are MicroTime, which the API server parses with exactly six fractional digits; the
    ``kubernetes`` client turns every body into its typed model and writes times with ``isoformat()``, which
    leaves the fraction out when the microseconds are zero (a 400 Bad Request once in a million writes).  Such
    a time is moved by one microsecond instead.
    """
    value = value.astimezone(timezone.utc)
    return value.replace(microsecond=1) if value.microsecond == 0 else value


_NETWORK_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)


class LeaderElector:
    """One candidate.  ``run(stop)`` campaigns, leads and returns; or step with ``try_acquire_or_renew``."""

    def __init__(self, api: ApiClient | CoordinationV1Api, settings: LeaderSettings, *,
                 on_started_leading: Callable[[], None] = lambda: None,
                 on_stopped_leading: Callable[[], None] = lambda: None,
                 on_new_leader: Callable[[str], None] = lambda identity: None,
                 clock: Clock | None = None, rng: random.Random | None = None):
        self.api = CoordinationV1Api(api) if isinstance(api, ApiClient) else api
        self.settings = settings
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.on_new_leader = on_new_leader
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._observed: LeaderRecord | None = None
        self._observed_at = 0.0  # monotonic time the observed record last changed
        self._last_renew: float | None = None  # monotonic time the last successful write began
        self._reported_leader = ""

    def __repr__(self) -> str:
        s = self.settings
        return f"LeaderElector({s.namespace}/{s.lease_name} as {s.identity})"

    # ---- what this candidate knows -----------------------------------------------------------

    @property
    def identity(self) -> str:
        return self.settings.identity

    def leader(self) -> str:
        """The holder as last observed ("" when none or not yet read)."""
        with self._lock:
            return self._observed.holder if self._observed else ""

    def is_leader(self) -> bool:
        """This candidate held the lease at its last successful read or write."""
        return self.leader() == self.identity

    def holds_lease(self) -> bool:
        """The lease is this candidate's by its own clock: a renewal (begun at ``_last_renew``) succeeded less than
        ``renew_deadline`` ago.  Unlike ``is_leader`` it turns False by itself when renewals stop succeeding,
        before any other candidate may see the lease expire (``lease_duration`` after its last renewal)."""
        last = self._last_renew
        return last is not None and self.is_leader() and self.clock.monotonic() < last + self.settings.renew_deadline

    def observed(self) -> LeaderRecord | None:
        with self._lock:
            return self._observed

    # ---- one step ----------------------------------------------------------------------------

    def try_acquire_or_renew(self, deadline: float | None = None) -> bool:
        """Read the Lease and take or renew it if the rules allow; True when this candidate holds it now.

        ``deadline`` (monotonic) bounds the API calls.  Any failure (network, 409, a valid lease held by someone
        else) is False; the caller tries again later.
        """
        s = self.settings
        started, now = self.clock.monotonic(), wire_time(self.clock.now())
        desired = LeaderRecord(self.identity, s.lease_duration, now, now, 0)
        try:
            lease = self.api.read_namespaced_lease(s.lease_name, s.namespace,
                                                   _request_timeout=self._timeout(deadline))
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read lease %s/%s: %s", s.namespace, s.lease_name, _reason(exc))
                return False
            return self._create(desired, started, deadline)
        except _NETWORK_ERRORS as exc:
            log.warning("cannot read lease %s/%s: %s", s.namespace, s.lease_name, _reason(exc))
            return False

        old = LeaderRecord.from_lease(lease)
        self._observe(old, started, changed_only=True)
        if old.holder and old.holder != self.identity and not self._expired(started):
            return False
        if old.holder == self.identity:
            desired = replace(desired, acquire_time=old.acquire_time, transitions=old.transitions)
        else:
            desired = replace(desired, transitions=old.transitions + 1)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": s.lease_name, "namespace": s.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": desired.spec()}
        try:
            self.api.replace_namespaced_lease(s.lease_name, s.namespace, body,
                                              _request_timeout=self._timeout(deadline))
        except _NETWORK_ERRORS as exc:
            if isinstance(exc, ApiException) and exc.status == 409:
                log.debug("lease %s/%s changed under us: lost the race", s.namespace, s.lease_name)
            else:
                log.warning("cannot update lease %s/%s: %s", s.namespace, s.lease_name, _reason(exc))
            return False
        if old.holder != self.identity:
            log.info("%s acquired lease %s/%s (held by %s before; transition %d)", self.identity, s.namespace,
                     s.lease_name, old.holder or "nobody", desired.transitions)
        self._observe(desired, started)
        self._last_renew = started
        return True

    def _create(self, desired: LeaderRecord, started: float, deadline: float | None) -> bool:
        s = self.settings
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": s.lease_name, "namespace": s.namespace}, "spec": desired.spec()}
        try:
            self.api.create_namespaced_lease(s.namespace, body, _request_timeout=self._timeout(deadline))
        except _NETWORK_ERRORS as exc:
            if isinstance(exc, ApiException) and exc.status == 409:
                log.debug("lease %s/%s created by someone else first", s.namespace, s.lease_name)
            else:
                log.warning("cannot create lease %s/%s: %s", s.namespace, s.lease_name, _reason(exc))
            return False
        log.info("%s acquired lease %s/%s (created it)", self.identity, s.namespace, s.lease_name)
        self._observe(desired, started)
        self._last_renew = started
        return True

    def _observe(self, record: LeaderRecord, at: float, changed_only: bool = False) -> None:
        with self._lock:
            if changed_only and record == self._observed:
                return
            self._observed, self._observed_at = record, at
        if record.holder != self._reported_leader:
            self._reported_leader = record.holder
            self.on_new_leader(record.holder)

    def _expired(self, now: float) -> bool:
        """No change seen for the record's own lease duration (measured on this candidate's clock)."""
        with self._lock:
            return self._observed is None or now >= self._observed_at + self._observed.duration

    def _timeout(self, deadline: float | None) -> float:
        """Seconds an API call may take: what is left before ``deadline`` (at least 0.2), else a retry period
        (at least 1 s)."""
        if deadline is None:
            return max(1.0, self.settings.retry_period)
        return max(0.2, deadline - self.clock.monotonic())

    def release(self) -> bool:
        """Give the lease up (holder empty, duration 1 s) if this candidate holds it; True when it is not held
        by this candidate any more.  A 409 means someone else wrote it: then it is not ours either."""
        s = self.settings
        if not self.is_leader():
            return True
        try:
            lease = self.api.read_namespaced_lease(s.lease_name, s.namespace, _request_timeout=self._timeout(None))
            old = LeaderRecord.from_lease(lease)
            if old.holder != self.identity:
                return True
            now = wire_time(self.clock.now())
            released = LeaderRecord("", 1, now, now, old.transitions)
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": s.lease_name, "namespace": s.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": released.spec()}
            self.api.replace_namespaced_lease(s.lease_name, s.namespace, body, _request_timeout=self._timeout(None))
        except _NETWORK_ERRORS as exc:
            if isinstance(exc, ApiException) and exc.status in (404, 409):
                return True
            log.warning("cannot release lease %s/%s: %s (it expires in %d s)", s.namespace, s.lease_name,
                        _reason(exc), s.lease_duration)
            return False
        self._observe(released, self.clock.monotonic())
        log.info("%s released lease %s/%s", self.identity, s.namespace, s.lease_name)
        return True

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> bool:
        """Campaign until leading, then lead until ``stop`` is set or the lease is lost.

        ``on_started_leading`` runs in a thread of its own (as in client-go: the elector keeps renewing while
        the leader starts up); ``on_stopped_leading`` runs in this thread, then the lease is released on a
        clean stop.  Returns True when leadership was lost, False when stopped (leading or not).
        """
        if not self._acquire(stop):
            return False
        threading.Thread(target=self.on_started_leading, name="leader-start", daemon=True).start()
        lost = self._renew(stop)
        if lost:
            log.error("%s lost lease %s/%s: stopping at once", self.identity, self.settings.namespace,
                      self.settings.lease_name)
        try:
            self.on_stopped_leading()
        finally:
            if not lost and self.settings.release_on_stop:
                self.release()
        return lost

    def _acquire(self, stop: threading.Event) -> bool:
        log.info("%s campaigning for lease %s/%s", self.identity, self.settings.namespace, self.settings.lease_name)
        period = self.settings.retry_period
        while not stop.is_set():
            if self.try_acquire_or_renew():
                return True
            wait = period * (1 + self._rng.random() * JITTER)
            expires_in = self._expires_in()
            if expires_in is not None and 0 < expires_in < wait:
                wait = expires_in  # wake when the lease expires as this candidate sees it, not a poll later
            if stop.wait(wait):
                break
        return False

    def _expires_in(self) -> float | None:
        """Seconds until the observed lease expires by this candidate's clock; None when nobody holds it."""
        with self._lock:
            if self._observed is None or not self._observed.holder:
                return None
            return self._observed_at + self._observed.duration - self.clock.monotonic()

    def _renew(self, stop: threading.Event) -> bool:
        """Renew every retry period; True when no renewal succeeded within the renew deadline (or another
        holder was seen), False when ``stop`` was set."""
        s = self.settings
        while True:
            assert self._last_renew is not None
            left = self._last_renew + s.renew_deadline - self.clock.monotonic()
            if left <= 0:
                return True
            if stop.wait(min(s.retry_period, left)):
                return False
            started = self.clock.monotonic()
            deadline = self._last_renew + s.renew_deadline
            if started >= deadline:
                return True
            if not self.try_acquire_or_renew(deadline=deadline) and self.leader() not in (self.identity, ""):
                return True  # someone else holds it: we lost it already, no point in waiting for the deadline


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
