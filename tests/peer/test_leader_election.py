"""``controller.leader``: Lease leader election against a real kube-apiserver (1.20.2), client-go's semantics.

Each test steps ``LeaderElector.try_acquire_or_renew`` with an injected clock (``FakeClock``: the monotonic
time the elector judges expiry by, and the wall time it writes), so expiry is reached by advancing a number,
not by sleeping; the Lease itself is the real API server's, read and written over HTTPS with a token user
that has exactly the Lease verbs the controller's Role grants (get, create, update in one namespace).

The two races (two candidates creating the absent Lease, two updating the same version) are ordered with
``Interleave``: a wrapper of our own around the real ``CoordinationV1Api`` that runs the other candidate's
step just before this one's write goes out.  The write is still sent to the API server, which answers 409
(AlreadyExists / Conflict) by itself; nothing is faked.

The ``run`` loop tests use the real clock with sub-second periods.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kubernetes.client import CoordinationV1Api, CoreV1Api, RbacAuthorizationV1Api
from kubernetes.client.rest import ApiException

from controller.leader import LeaderElector, LeaderSettings
from tests.support.kube_apiserver import BUILD_TEST_TIMEOUT, kube_apiserver  # noqa: F401 - the fixture

pytestmark = [pytest.mark.peer, pytest.mark.timeout(BUILD_TEST_TIMEOUT)]

NAMESPACE = "shoal-lease-test"
USER = "controller"
LEASE_VERBS = ["get", "create", "update"]


class FakeClock:
    """``monotonic`` and ``now`` move only when the test says so."""

    def __init__(self, wall: datetime | None = None):
        self.mono = 1000.0
        self.wall = wall or datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


class Interleave:
    """The real CoordinationV1Api, with ``before_write`` run once just before the next create or replace."""

    def __init__(self, api: CoordinationV1Api):
        self.api = api
        self.before_write = None

    def _hook(self):
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()

    def read_namespaced_lease(self, *args, **kwargs):
        return self.api.read_namespaced_lease(*args, **kwargs)

    def create_namespaced_lease(self, *args, **kwargs):
        self._hook()
        return self.api.create_namespaced_lease(*args, **kwargs)

    def replace_namespaced_lease(self, *args, **kwargs):
        self._hook()
        return self.api.replace_namespaced_lease(*args, **kwargs)


@pytest.fixture(scope="module")
def lease_api(kube_apiserver):  # noqa: F811 - the imported fixture
    """A CoordinationV1Api for the ``controller`` user, allowed only the Lease verbs in NAMESPACE."""
    admin = kube_apiserver.client()
    core, rbac = CoreV1Api(admin), RbacAuthorizationV1Api(admin)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    rbac.create_namespaced_role(NAMESPACE, {
        "metadata": {"name": "lease-test"},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": LEASE_VERBS}]})
    rbac.create_namespaced_role_binding(NAMESPACE, {
        "metadata": {"name": "lease-test"},
        "subjects": [{"kind": "User", "name": USER, "apiGroup": "rbac.authorization.k8s.io"}],
        "roleRef": {"kind": "Role", "name": "lease-test", "apiGroup": "rbac.authorization.k8s.io"}})
    client = kube_apiserver.client(USER)
    api = CoordinationV1Api(client)
    deadline = time.monotonic() + 10  # RBAC caches: wait until the grant is visible
    while True:
        try:
            api.read_namespaced_lease("probe", NAMESPACE)
        except ApiException as exc:
            if exc.status == 404:  # allowed to look, and nothing there
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield api
    client.close()
    admin.close()


@pytest.fixture
def lease_name():
    return f"lease-{uuid.uuid4().hex[:8]}"


def candidate(api, lease_name: str, identity: str, clock=None, **timing) -> LeaderElector:
    settings = LeaderSettings(lease_name=lease_name, namespace=NAMESPACE, identity=identity,
                              **({"lease_duration": 4, "renew_deadline": 3.0, "retry_period": 0.5} | timing))
    return LeaderElector(api, settings, clock=clock or FakeClock())


def read(api, lease_name: str):
    return api.read_namespaced_lease(lease_name, NAMESPACE)


def test_acquire_creates_the_lease(lease_api, lease_name):
    a = candidate(lease_api, lease_name, "a")
    assert a.try_acquire_or_renew()
    lease = read(lease_api, lease_name)
    assert lease.spec.holder_identity == "a"
    assert lease.spec.lease_duration_seconds == 4
    assert lease.spec.lease_transitions == 0
    assert lease.spec.acquire_time == lease.spec.renew_time
    assert a.is_leader() and a.leader() == "a"


def test_the_lease_is_held_only_until_the_renew_deadline_by_the_holders_own_clock(lease_api, lease_name):
    """``holds_lease`` (what the daemon's store asks before every write) turns False by itself once no
    renewal succeeded for renew_deadline (3 s here), before another candidate may see the lease expire
    (lease_duration, 4 s), although ``is_leader`` still says what was last read."""
    clock = FakeClock()
    a = candidate(lease_api, lease_name, "a", clock)
    assert not a.holds_lease()
    assert a.try_acquire_or_renew() and a.holds_lease()
    clock.advance(2.9)
    assert a.holds_lease()
    clock.advance(0.2)
    assert a.is_leader() and not a.holds_lease()
    assert a.try_acquire_or_renew() and a.holds_lease()


def test_one_api_call_is_one_attempt():
    """The daemon's clients make one attempt per call (urllib3 retried a timed-out request 3 more times, each
    with the whole timeout: a partitioned leader noticed its lost lease long after a standby took over)."""
    from controller.daemon import kubernetes_client

    kubeconfig = Path(os.environ.get("TMPDIR", "/tmp")) / f"kubeconfig-{uuid.uuid4().hex[:8]}"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: "
                          "'https://127.0.0.1:9'}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
                          "current-context: c\nusers: [{name: u, user: {token: t}}]\n")
    try:
        api = kubernetes_client(str(kubeconfig))
        assert api.configuration.retries is False
        retries = api.rest_client.pool_manager.connection_pool_kw["retries"]
        assert retries is False or retries.total is False  # urllib3: no retry, the first error is raised
        api.close()
    finally:
        kubeconfig.unlink()


def test_renew_keeps_acquire_time_and_moves_renew_time(lease_api, lease_name):
    clock = FakeClock()
    a = candidate(lease_api, lease_name, "a", clock)
    assert a.try_acquire_or_renew()
    first = read(lease_api, lease_name)
    clock.advance(0.5)
    assert a.try_acquire_or_renew()
    second = read(lease_api, lease_name)
    assert second.spec.holder_identity == "a"
    assert second.spec.acquire_time == first.spec.acquire_time
    assert second.spec.renew_time - first.spec.renew_time == timedelta(seconds=0.5)
    assert second.spec.lease_transitions == 0
    assert second.metadata.resource_version != first.metadata.resource_version


def test_a_second_candidate_waits_while_the_leader_renews(lease_api, lease_name):
    a_clock, b_clock = FakeClock(), FakeClock()
    a = candidate(lease_api, lease_name, "a", a_clock)
    b = candidate(lease_api, lease_name, "b", b_clock)
    assert a.try_acquire_or_renew()
    for _ in range(12):  # 12 x 0.5 s: three lease durations, renewed all along
        a_clock.advance(0.5)
        b_clock.advance(0.5)
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
        assert b.leader() == "a" and not b.is_leader()
    assert read(lease_api, lease_name).spec.holder_identity == "a"


def test_expiry_is_judged_on_the_observers_clock_then_it_takes_over(lease_api, lease_name):
    # The leader's wall clock is far in the past: a candidate comparing renewTime with its own wall clock would
    # take over at once.  client-go's rule: wait a full lease duration after *seeing* the record change.
    a = candidate(lease_api, lease_name, "a", FakeClock(datetime(2001, 1, 1, tzinfo=timezone.utc)))
    b_clock = FakeClock()
    b = candidate(lease_api, lease_name, "b", b_clock)
    assert a.try_acquire_or_renew()  # and then "a" dies: no more renewals
    assert not b.try_acquire_or_renew()  # first sight of the record
    b_clock.advance(3.9)
    assert not b.try_acquire_or_renew()
    b_clock.advance(0.1)  # 4 s (the lease duration) after it last saw a change
    assert b.try_acquire_or_renew()
    lease = read(lease_api, lease_name)
    assert lease.spec.holder_identity == "b"
    assert lease.spec.lease_transitions == 1
    assert lease.spec.acquire_time == lease.spec.renew_time
    # The old leader, back from a pause, sees the new holder and does not take the lease back.
    assert not a.try_acquire_or_renew()
    assert a.leader() == "b" and not a.is_leader()


def test_release_on_stop_lets_a_standby_take_over_at_once(lease_api, lease_name):
    a = candidate(lease_api, lease_name, "a")
    b = candidate(lease_api, lease_name, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert a.release()
    lease = read(lease_api, lease_name)
    assert lease.spec.holder_identity == ""
    assert lease.spec.lease_duration_seconds == 1
    assert not a.is_leader()
    assert b.try_acquire_or_renew()  # no waiting: nobody holds it
    assert read(lease_api, lease_name).spec.lease_transitions == 1
    assert a.release()  # not ours any more: nothing to do
    assert read(lease_api, lease_name).spec.holder_identity == "b"


def test_two_candidates_creating_the_lease_one_wins(lease_api, lease_name):
    b = candidate(lease_api, lease_name, "b")
    racing = Interleave(lease_api)
    a = candidate(racing, lease_name, "a")
    racing.before_write = lambda: b.try_acquire_or_renew()  # b creates it between a's read (404) and a's create
    assert not a.try_acquire_or_renew()  # 409 AlreadyExists from the API server
    assert b.is_leader()
    assert read(lease_api, lease_name).spec.holder_identity == "b"
    assert not a.try_acquire_or_renew()  # and now a sees a valid lease held by b


def test_an_update_with_a_stale_resource_version_loses(lease_api, lease_name):
    a_clock = FakeClock()
    racing = Interleave(lease_api)
    a = candidate(racing, lease_name, "a", a_clock)
    b_clock = FakeClock()
    b = candidate(lease_api, lease_name, "b", b_clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    b_clock.advance(4)  # a's lease has expired as b sees it; a is about to renew, late
    a_clock.advance(2.5)
    racing.before_write = lambda: b.try_acquire_or_renew()  # b takes over between a's read and a's update
    assert not a.try_acquire_or_renew()  # a's update carries the version it read: 409 Conflict
    assert read(lease_api, lease_name).spec.holder_identity == "b"
    assert b.is_leader()


def test_run_leads_then_releases_on_stop(lease_api, lease_name):
    events = []
    started = threading.Event()
    settings = LeaderSettings(lease_name=lease_name, namespace=NAMESPACE, identity="runner", lease_duration=2,
                              renew_deadline=1.5, retry_period=0.2)
    elector = LeaderElector(lease_api, settings, on_started_leading=lambda: (events.append("started"),
                                                                             started.set()),
                            on_stopped_leading=lambda: events.append(
                                ("stopped", read(lease_api, lease_name).spec.holder_identity)))
    stop = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: result.append(elector.run(stop)))
    thread.start()
    try:
        assert started.wait(10)
        time.sleep(0.5)  # a few renewals
        assert read(lease_api, lease_name).spec.holder_identity == "runner"
    finally:
        stop.set()
        thread.join(10)
    assert result == [False]  # stopped, not lost
    # on_stopped_leading ran while the lease was still held (stop acting first), then it was released
    assert events == ["started", ("stopped", "runner")]
    assert read(lease_api, lease_name).spec.holder_identity == ""


def test_run_stops_leading_when_someone_else_holds_the_lease(lease_api, lease_name):
    started, stopped = threading.Event(), threading.Event()
    settings = LeaderSettings(lease_name=lease_name, namespace=NAMESPACE, identity="victim", lease_duration=4,
                              renew_deadline=3.0, retry_period=0.2)
    elector = LeaderElector(lease_api, settings, on_started_leading=started.set, on_stopped_leading=stopped.set)
    stop = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: result.append(elector.run(stop)))
    thread.start()
    try:
        assert started.wait(10)
        lease = read(lease_api, lease_name)  # an intruder overwrites the record (as a new leader would)
        lease.spec.holder_identity = "intruder"
        lease_api.replace_namespaced_lease(lease_name, NAMESPACE, lease)
        assert stopped.wait(5)
        thread.join(5)
        assert result == [True]  # lost
        assert read(lease_api, lease_name).spec.holder_identity == "intruder"  # and no release of a lost lease
    finally:
        stop.set()
        thread.join(10)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="renew deadline must be shorter"):
        LeaderSettings(lease_duration=4, renew_deadline=4, retry_period=1)
    with pytest.raises(ValueError, match="longer than 1.2 x"):
        LeaderSettings(lease_duration=4, renew_deadline=1, retry_period=1)
    with pytest.raises(ValueError, match="whole number"):
        LeaderSettings(lease_duration=0)
    scaled = LeaderSettings.for_duration(15)
    assert (scaled.renew_deadline, scaled.retry_period) == (10, 2)  # client-go's defaults
