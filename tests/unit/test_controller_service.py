"""The controller's lifecycle (controller/domain/service.py) against both stores.

Agents are ``FakeAgents`` (controller/domain/agents.py): our own boundary,
in memory, failing on demand; the gRPC agents are tested by the integration
tests.  Clock and secrets are injected, so times and secrets are known.
"""

from __future__ import annotations

import logging
import threading

import pytest

from controller.domain.agents import FakeAgents
from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted, Unavailable)
from controller.domain.model import (ATTACHED, ATTACHING, AVAILABLE, CREATING, DELETING, ERROR, HEALTHY, UNHEALTHY,
                                     Disk)
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.store import MemoryStore, SqliteStore
from node_agent.iscsi.chap import initiator_secret

GiB = 1 << 30
SECRET_MARK = "TOPSECRET"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Secrets:
    """Deterministic stand-in for the ``secrets`` module; every CHAP secret contains SECRET_MARK."""

    def __init__(self):
        self.n = 0

    def token_hex(self, nbytes: int) -> str:
        self.n += 1
        return f"{self.n:0{2 * nbytes}x}"

    def token_urlsafe(self, nbytes: int) -> str:
        self.n += 1
        return f"{SECRET_MARK}{self.n:06d}-abcdefghij"


class Env:
    def __init__(self, store, tmp_path):
        self.store = store
        self.tmp_path = tmp_path
        self.agents = FakeAgents()
        self.clock = Clock()
        self.secrets = Secrets()
        self.settings = ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20)
        self.svc = self.new_service()
        for name, zone in (("node-a", "a"), ("node-b", "b"), ("node-c", "c")):
            self.svc.register_node(name, iqn(name), "127.0.0.1:7000", ["127.0.0.1:3260"], {"zone": zone},
                                   [Disk("data0", "/srv/data0", 100 * GiB, 90 * GiB)])

    def new_service(self, store=None):
        return ControllerService(store or self.store, self.agents, settings=self.settings, clock=self.clock,
                                 secrets=self.secrets)

    def snapshot(self):
        s = self.store
        return (s.list_nodes(), s.list_pools(), s.list_volumes(), s.list_attachments(), s.list_exports(),
                s.list_operations(limit=10_000), [s.get_chap(v.name) for v in s.list_volumes()])


def iqn(node_id: str) -> str:
    return f"iqn.2024-01.io.shoal:{node_id}"


@pytest.fixture(params=["memory", "sqlite"])
def env(request, tmp_path):
    store = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "state.db"))
    yield Env(store, tmp_path)
    if request.param == "sqlite":
        store.close()


def chap_secret(env, name):
    return env.store.get_chap(name).secret


# ---- nodes -----------------------------------------------------------------------------------

def test_register_and_heartbeat(env):
    node = env.svc.get_node("node-a")
    assert node.health == HEALTHY and node.labels == {"zone": "a"} and node.last_heartbeat == 1000.0
    env.clock.now += 3
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 100 * GiB, 50 * GiB)])
    node = env.svc.get_node("node-a")
    assert node.last_heartbeat == 1003.0 and node.disks[0].free_bytes == 50 * GiB
    with pytest.raises(NotFound, match="node node-z is not registered"):
        env.svc.heartbeat("node-z")


@pytest.mark.parametrize("args, match", [
    (("bad id!", iqn("x"), "127.0.0.1:1", ["127.0.0.1:3260"]), "node id"),
    (("node-x", "not-an-iqn", "127.0.0.1:1", ["127.0.0.1:3260"]), "IQN"),
    (("node-x", iqn("x"), "127.0.0.1", ["127.0.0.1:3260"]), "agent address"),
    (("node-x", iqn("x"), "127.0.0.1:1", []), "portal"),
    (("node-x", iqn("x"), "127.0.0.1:1", ["h:70000"]), "portal"),
    (("node-x", iqn("x"), "127.0.0.1:1", ["h:1"], {"zone": "a b"}), "label"),
    (("node-x", iqn("x"), "127.0.0.1:1", ["h:1"], {}, [Disk("d", "/d", 10, 11)]), "free bytes"),
    (("node-x", iqn("x"), "127.0.0.1:1", ["h:1"], {}, [Disk("d", "/d", -1, 0)]), "capacity"),
])
def test_register_rejects_bad_input_and_changes_nothing(env, args, match):
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match=match):
        env.svc.register_node(*args)
    assert env.snapshot() == before


def test_each_node_needs_its_own_iqn(env):
    with pytest.raises(AlreadyExists, match="already used by node node-a"):
        env.svc.register_node("node-d", iqn("node-a"), "127.0.0.1:1", ["127.0.0.1:3260"])


def test_silent_nodes_become_unhealthy(env):
    env.clock.now += 10
    env.svc.heartbeat("node-b")
    env.clock.now += 15  # node-a silent for 25 s, node-b for 15 s
    assert env.svc.get_node("node-a").health == UNHEALTHY  # as seen now, before mark_unhealthy runs
    assert env.svc.mark_unhealthy() == ["node-a", "node-c"]
    assert env.store.get_node("node-a").health == UNHEALTHY
    assert env.svc.mark_unhealthy() == []
    env.svc.heartbeat("node-a")
    assert env.svc.get_node("node-a").health == HEALTHY


# ---- pools -----------------------------------------------------------------------------------

def test_pools_are_idempotent_by_name(env):
    assert env.svc.get_pool("default").members == ()
    pool = env.svc.create_pool("fast", [("node-b", "data0"), ("node-a", "data0")], 2.0)
    assert pool.members == (("node-a", "data0"), ("node-b", "data0"))
    assert env.svc.create_pool("fast", [("node-a", "data0"), ("node-b", "data0")], 2) == pool
    before = env.snapshot()
    with pytest.raises(AlreadyExists, match="pool fast already exists"):
        env.svc.create_pool("fast", [("node-a", "data0")], 2.0)
    with pytest.raises(NotFound, match="node node-a has no disk data9"):
        env.svc.create_pool("other", [("node-a", "data9")])
    with pytest.raises(NotFound, match="node node-q is not registered"):
        env.svc.create_pool("other", [("node-q", "data0")])
    for ratio in (0.5, 0, -1, float("nan"), float("inf"), 1e9, "2", True):
        with pytest.raises(InvalidArgument, match="overcommit ratio"):
            env.svc.create_pool("other", [], ratio)
    assert env.snapshot() == before


def test_delete_pool_refused_while_it_has_volumes(env):
    env.svc.create_pool("fast")
    env.svc.create_volume("vol-1", GiB, pool="fast")
    with pytest.raises(FailedPrecondition, match="pool fast still has 1 volume.*vol-1"):
        env.svc.delete_pool("fast")
    env.svc.delete_volume("vol-1")
    env.svc.delete_pool("fast")
    env.svc.delete_pool("fast")  # gone: OK
    with pytest.raises(NotFound, match="pool fast does not exist"):
        env.svc.get_pool("fast")


def test_pool_usage(env):
    env.svc.create_volume("vol-1", 3 * GiB)
    usage = env.svc.pool_usage("default")
    assert (usage.capacity_bytes, usage.free_bytes, usage.provisioned_bytes) == (300 * GiB, 270 * GiB, 3 * GiB)


# ---- create ----------------------------------------------------------------------------------

def test_create_places_records_then_calls_the_agent(env):
    seen = []

    def before(node, method, volume_id):
        if method == "create_volume":
            row = env.store.get_volume("vol-1")
            seen.append((row.state, env.store.list_operations("vol-1")[-1].state))

    env.agents.before_call = before
    volume = env.svc.create_volume("vol-1", GiB)
    assert seen == [(CREATING, "started")]  # recorded before the agent was called
    assert (volume.state, volume.owner_node, volume.disk, volume.size_bytes) == (AVAILABLE, "node-a", "data0", GiB)
    assert env.agents.agent("node-a").volumes[volume.id]["size_bytes"] == GiB
    assert [(o.kind, o.state) for o in env.store.list_operations("vol-1")] == [("create_volume", "done")]
    # Spreading: the next volumes go to the other nodes.
    assert [env.svc.create_volume(f"vol-{i}", GiB).owner_node for i in (2, 3)] == ["node-b", "node-c"]


def test_create_is_idempotent_by_name(env):
    volume = env.svc.create_volume("vol-1", GiB)
    assert env.svc.create_volume("vol-1", GiB) == volume
    assert env.agents.count("create_volume") == 1
    for kwargs, match in (({"size_bytes": 2 * GiB}, "size 1.0 GiB"), ({"thin": False}, "thin, asked thick"),
                          ({"constraints": {"zone": "b"}}, "labels")):
        with pytest.raises(AlreadyExists, match=match):
            env.svc.create_volume("vol-1", **{"size_bytes": GiB, **kwargs})
    assert env.store.list_volumes() == [volume]
    env.svc.create_pool("fast")
    before = env.snapshot()
    with pytest.raises(AlreadyExists, match="pool default, asked fast"):
        env.svc.create_volume("vol-1", GiB, pool="fast")
    assert env.snapshot() == before


@pytest.mark.parametrize("size", [0, -1, -GiB, 513, GiB + 1, (1 << 50) + 512, 1 << 64, True, 1.5, "1G", None])
def test_create_rejects_bad_sizes_and_changes_nothing(env, size):
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="size") as info:
        env.svc.create_volume("vol-1", size)
    assert env.snapshot() == before
    assert env.agents.calls == []
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("name", ["", "A", "-vol", "vol-", "vol_1", "vol.1", "v" * 64, "völ", None, 7])
def test_create_rejects_bad_names_and_changes_nothing(env, name):
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="name"):
        env.svc.create_volume(name, GiB)
    assert env.snapshot() == before


def test_create_rejects_unknown_pool_and_bad_constraints(env):
    before = env.snapshot()
    with pytest.raises(NotFound, match="pool nope does not exist"):
        env.svc.create_volume("vol-1", GiB, pool="nope")
    with pytest.raises(InvalidArgument, match="constraints"):
        env.svc.create_volume("vol-1", GiB, constraints={"zone": ["a"]})
    with pytest.raises(InvalidArgument, match="thin"):
        env.svc.create_volume("vol-1", GiB, thin="yes")
    assert env.snapshot() == before


def test_create_honours_constraints_and_capacity(env):
    assert env.svc.create_volume("vol-1", GiB, constraints={"zone": "c"}).owner_node == "node-c"
    before = env.snapshot()
    with pytest.raises(ResourceExhausted, match=r"pool default: no healthy node with 200.0 GiB free "
                                                r"\(largest: node-a/data0 100.0 GiB"):
        env.svc.create_volume("vol-2", 200 * GiB)
    with pytest.raises(ResourceExhausted, match="no healthy node has labels zone=d"):
        env.svc.create_volume("vol-2", GiB, constraints={"zone": "d"})
    with pytest.raises(ResourceExhausted, match="thick"):
        env.svc.create_volume("vol-2", 95 * GiB, thin=False)
    assert env.snapshot() == before


def test_create_skips_unhealthy_nodes(env):
    env.clock.now += 30
    env.svc.heartbeat("node-c")
    assert env.svc.create_volume("vol-1", GiB).owner_node == "node-c"


def test_agent_failure_mid_create_leaves_error_row_that_a_retry_completes(env):
    env.agents.fail_next("create_volume", Unavailable("agent of node node-a: connection refused"))
    with pytest.raises(Unavailable, match="connection refused"):
        env.svc.create_volume("vol-1", GiB)
    row = env.store.get_volume("vol-1")
    assert row.state == ERROR and row.owner_node == "node-a"
    assert env.store.list_operations("vol-1")[-1].state == "failed"
    again = env.svc.create_volume("vol-1", GiB)
    assert again.state == AVAILABLE and again.id == row.id
    assert row.id in env.agents.agent("node-a").volumes


def test_error_row_is_cleaned_by_delete(env):
    env.agents.fail_next("create_volume", ResourceExhausted("disk data0 is full"))
    with pytest.raises(ResourceExhausted):
        env.svc.create_volume("vol-1", GiB)
    env.svc.delete_volume("vol-1")
    assert env.store.get_volume("vol-1") is None


def test_unexpected_agent_exception_becomes_unavailable(env):
    env.agents.fail_next("create_volume", OSError("broken pipe"))  # not a DomainError
    with pytest.raises(Unavailable, match="node-a failed on create_volume: OSError: broken pipe"):
        env.svc.create_volume("vol-1", GiB)


def test_concurrent_creates_of_one_name_make_one_volume(env):
    results, errors = [], []

    def create():
        try:
            results.append(env.svc.create_volume("vol-1", GiB))
        except DomainError as exc:  # pragma: no cover - would fail the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({v.id for v in results}) == 1
    assert env.agents.count("create_volume") == 1


# ---- delete ----------------------------------------------------------------------------------

def test_delete_removes_the_volume_and_repeats_succeed(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.delete_volume("vol-1")
    assert env.store.get_volume("vol-1") is None and volume.id not in env.agents.agent("node-a").volumes
    env.svc.delete_volume("vol-1")
    env.svc.delete_volume("never-was")
    with pytest.raises(InvalidArgument):
        env.svc.delete_volume("Bad_Name")


def test_delete_refused_while_attached(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.svc.attach_volume("vol-1", "node-c", shared=True)
    before = env.snapshot()
    with pytest.raises(FailedPrecondition, match="vol-1 is attached to node-b, node-c: detach it first"):
        env.svc.delete_volume("vol-1")
    assert env.snapshot() == before


def test_delete_with_agent_down_stays_deleting_and_a_retry_finishes(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("delete_volume")
    with pytest.raises(Unavailable):
        env.svc.delete_volume("vol-1")
    assert env.store.get_volume("vol-1").state == DELETING
    with pytest.raises(FailedPrecondition, match="being deleted"):
        env.svc.create_volume("vol-1", GiB)
    env.svc.delete_volume("vol-1")
    assert env.store.get_volume("vol-1") is None and volume.id not in env.agents.agent("node-a").volumes


# ---- expand ----------------------------------------------------------------------------------

def test_expand_grows_only(env):
    volume = env.svc.create_volume("vol-1", GiB)
    assert env.svc.expand_volume("vol-1", 2 * GiB).size_bytes == 2 * GiB
    assert env.agents.agent("node-a").volumes[volume.id]["size_bytes"] == 2 * GiB
    assert env.svc.expand_volume("vol-1", 2 * GiB).size_bytes == 2 * GiB  # repeat
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="volumes only grow"):
        env.svc.expand_volume("vol-1", GiB)
    with pytest.raises(InvalidArgument, match="multiple of 512"):
        env.svc.expand_volume("vol-1", 3 * GiB + 1)
    with pytest.raises(ResourceExhausted, match="node-a/data0, which holds volume vol-1, has room for 98.0 GiB"):
        env.svc.expand_volume("vol-1", 101 * GiB)
    with pytest.raises(NotFound):
        env.svc.expand_volume("vol-9", 2 * GiB)
    assert env.snapshot() == before


def test_expand_online_while_attached(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    assert env.svc.expand_volume("vol-1", 4 * GiB).state == ATTACHED


def test_expand_failure_temporary_keeps_desired_size_permanent_rolls_back(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("expand_volume", FailedPrecondition("backing file is busy"))
    with pytest.raises(FailedPrecondition):
        env.svc.expand_volume("vol-1", 2 * GiB)
    assert env.store.get_volume("vol-1").size_bytes == GiB
    env.agents.fail_next("expand_volume")
    with pytest.raises(Unavailable):
        env.svc.expand_volume("vol-1", 2 * GiB)
    assert env.store.get_volume("vol-1").size_bytes == 2 * GiB
    assert env.svc.reconcile_once() == ["expanded volume vol-1 to 2147483648 bytes"]
    assert env.agents.agent("node-a").volumes[volume.id]["size_bytes"] == 2 * GiB


# ---- attach / detach -------------------------------------------------------------------------

def test_attach_exports_to_the_consumer_with_chap_then_attaches(env):
    volume = env.svc.create_volume("vol-1", GiB)
    attachment = env.svc.attach_volume("vol-1", "node-b")
    assert (attachment.state, attachment.mode, attachment.device_path) == (ATTACHED, "userspace",
                                                                           f"/dev/fake/{volume.id}")
    owner = env.agents.agent("node-a")
    assert list(owner.exports) == [(volume.id, iqn("node-b"))]  # the ACL admits only node-b
    secret = chap_secret(env, "vol-1")
    assert secret.startswith(SECRET_MARK)
    assert env.agents.secret_for("node-a", volume.id, iqn("node-b")) == secret
    assert env.store.get_chap("vol-1").user == f"shoal-{volume.id}"
    assert env.store.get_volume("vol-1").state == ATTACHED
    export = env.store.get_export("vol-1", iqn("node-b"))
    assert export.target_iqn == "iqn.2024-01.io.shoal:node-a" and export.chap_user == f"shoal-{volume.id}"
    assert env.svc.attach_volume("vol-1", "node-b") == attachment  # repeat: the same answer
    assert env.agents.calls[-1] == ("node-b", "attach_volume", volume.id)  # from the node, asked again


def test_a_repeated_attach_answers_the_device_the_node_has_now(env):
    """The node's agent restarted meanwhile and attached the volume again on another device: the repeat used to
    answer the recorded /dev/loopN, gone or, its number reused, another volume's."""
    volume = env.svc.create_volume("vol-1", GiB)
    assert env.svc.attach_volume("vol-1", "node-b").device_path == f"/dev/fake/{volume.id}"
    env.agents.agent("node-b").attachments[volume.id]["device_path"] = "/dev/loop7"  # what the agent has now
    again = env.svc.attach_volume("vol-1", "node-b")
    assert (again.state, again.device_path) == (ATTACHED, "/dev/loop7")
    assert env.store.get_attachment("vol-1", "node-b").device_path == "/dev/loop7"


def test_attach_to_an_unhealthy_node_fails_clearly(env):
    env.svc.create_volume("vol-1", GiB)
    env.clock.now += 42
    env.svc.heartbeat("node-a")
    before = env.snapshot()
    with pytest.raises(FailedPrecondition, match=r"^node node-b is unhealthy \(no heartbeat for 42 s\)"):
        env.svc.attach_volume("vol-1", "node-b")
    assert env.snapshot() == before


def test_attach_when_the_owner_is_unhealthy_is_temporary(env):
    env.svc.create_volume("vol-1", GiB)
    env.clock.now += 42
    env.svc.heartbeat("node-b")
    with pytest.raises(Unavailable, match="node node-a is unhealthy .*owning volume vol-1"):
        env.svc.attach_volume("vol-1", "node-b")


def test_attach_rejects_bad_input(env):
    env.svc.create_volume("vol-1", GiB)
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="mode"):
        env.svc.attach_volume("vol-1", "node-b", mode="nfs")
    with pytest.raises(NotFound, match="node node-q"):
        env.svc.attach_volume("vol-1", "node-q")
    with pytest.raises(NotFound, match="volume vol-9"):
        env.svc.attach_volume("vol-9", "node-b")
    with pytest.raises(InvalidArgument):
        env.svc.attach_volume("vol-1", "node b")
    assert env.snapshot() == before
    env.svc.attach_volume("vol-1", "node-b")
    with pytest.raises(AlreadyExists, match="userspace mode"):
        env.svc.attach_volume("vol-1", "node-b", mode="kernel")


@pytest.mark.parametrize("failing", [("export_volume", "node-a"), ("attach_volume", "node-b")])
def test_agent_failure_mid_attach_then_a_retry_converges(env, failing):
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next(failing[0], node=failing[1])
    with pytest.raises(Unavailable):
        env.svc.attach_volume("vol-1", "node-b")
    assert env.store.get_attachment("vol-1", "node-b").state == ATTACHING
    with pytest.raises(FailedPrecondition, match="attached to node-b"):
        env.svc.delete_volume("vol-1")
    attachment = env.svc.attach_volume("vol-1", "node-b")
    assert attachment.state == ATTACHED and volume.id in env.agents.agent("node-b").attachments
    assert env.store.list_operations("vol-1")[-1].state == "done"


def test_failed_attach_can_be_detached(env):
    env.svc.create_volume("vol-1", GiB)
    env.agents.fail_next("attach_volume")
    with pytest.raises(Unavailable):
        env.svc.attach_volume("vol-1", "node-b")
    env.svc.detach_volume("vol-1", "node-b")
    assert env.store.list_attachments() == [] and env.store.list_exports() == []
    assert env.agents.agent("node-a").exports == {}
    env.svc.delete_volume("vol-1")


def test_detach_reverses_attach_and_repeats_succeed(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.svc.attach_volume("vol-1", "node-c", mode="kernel", shared=True)
    env.svc.detach_volume("vol-1", "node-b")
    assert list(env.agents.agent("node-a").exports) == [(volume.id, iqn("node-c"))]
    assert env.agents.agent("node-b").attachments == {}
    assert env.store.get_volume("vol-1").state == ATTACHED
    env.svc.detach_volume("vol-1", "node-c")
    assert env.store.get_volume("vol-1").state == AVAILABLE
    calls = len(env.agents.calls)
    env.svc.detach_volume("vol-1", "node-c")
    env.svc.detach_volume("vol-9", "node-c")
    assert len(env.agents.calls) == calls
    env.svc.delete_volume("vol-1")


def test_detach_from_a_dead_node(env):
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.clock.now += 60
    env.svc.heartbeat("node-a")
    with pytest.raises(Unavailable, match="node node-b is unhealthy.*force"):
        env.svc.detach_volume("vol-1", "node-b")
    env.svc.detach_volume("vol-1", "node-b", force=True)
    assert env.store.list_attachments() == [] and env.agents.agent("node-a").exports == {}
    assert env.store.get_volume("vol-1").state == AVAILABLE
    assert volume.id in env.agents.agent("node-b").attachments  # nobody could tell node-b


# ---- secrets ---------------------------------------------------------------------------------

def test_secrets_never_in_errors_reprs_logs_or_the_operations_log(env, caplog):
    caplog.set_level(logging.DEBUG)
    errors = []
    env.svc.create_volume("vol-1", GiB)
    for method in ("export_volume", "attach_volume"):
        env.agents.fail_next(method, OSError(f"request was {env.agents!r}"))
        try:
            env.svc.attach_volume("vol-1", "node-b")
        except DomainError as exc:
            errors.append(exc)
    secret = chap_secret(env, "vol-1")

    env.agents.fail_next("attach_volume", Unavailable(f"login failed with secret {secret}"))
    with pytest.raises(Unavailable) as info:
        env.svc.attach_volume("vol-1", "node-b")
    errors.append(info.value)
    own = initiator_secret(secret, iqn("node-b"))  # the one node-b is given (and so could echo)
    env.agents.fail_next("attach_volume", Unavailable(f"login failed with secret {own}"))
    with pytest.raises(Unavailable) as info:
        env.svc.attach_volume("vol-1", "node-b")
    assert own not in str(info.value)
    errors.append(info.value)
    env.svc.attach_volume("vol-1", "node-b")
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [repr(x) for x in env.snapshot()] + [repr(env.svc), repr(env.store), caplog.text]
    texts += [str(env.svc.status()), repr(env.svc.list_attachments()), repr(env.store.get_chap("vol-1"))]
    assert secret.startswith(SECRET_MARK)
    for text in texts:
        assert SECRET_MARK not in text
    assert "<secret>" in str(errors[-1])


# ---- status and restart ----------------------------------------------------------------------

def test_status(env):
    env.svc.create_volume("vol-1", 2 * GiB)
    env.svc.attach_volume("vol-1", "node-c")
    env.clock.now += 30
    env.svc.heartbeat("node-a")
    assert env.svc.status() == {"nodes": 3, "healthy_nodes": 1, "volumes": 1, "attachments": 1,
                                "capacity_bytes": 300 * GiB, "free_bytes": 270 * GiB,
                                "provisioned_bytes": 2 * GiB}


def test_restart_on_the_same_sqlite_file_sees_the_same_state(tmp_path):
    path = str(tmp_path / "state.db")
    env = Env(SqliteStore(path), tmp_path)
    volume = env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.fail_next("create_volume")
    with pytest.raises(Unavailable):
        env.svc.create_volume("vol-2", GiB)
    before = env.snapshot()
    env.store.close()

    store = SqliteStore(path)
    svc = env.new_service(store)  # same agents, clock and secrets: only the controller restarted
    env.store = store
    assert env.snapshot() == before
    assert svc.get_volume("vol-1").id == volume.id
    assert svc.list_attachments() == [before[3][0]]
    assert svc.create_volume("vol-2", GiB).state == AVAILABLE  # the failed create completes
    svc.detach_volume("vol-1", "node-b")
    svc.delete_volume("vol-1")
    assert [v.name for v in svc.list_volumes()] == ["vol-2"]
    store.close()


def test_a_node_registered_from_another_address_while_its_agent_is_heard_is_warned_of(env, caplog):
    """Two hosts with the same host name (the default node id) took the node from each other at every
    registration, silently; the move of a live node is now logged as a warning."""
    import logging

    node = env.svc.get_node("node-a")
    caplog.set_level(logging.WARNING, logger="shoal.controller")
    env.clock.now += 1
    env.svc.register_node("node-a", node.initiator_iqn, "127.0.0.1:7999", node.portals, node.labels, node.disks)
    assert any("two agents with one node id" in r.getMessage() for r in caplog.records)
    caplog.clear()
    env.clock.now += 1
    env.svc.register_node("node-a", node.initiator_iqn, "127.0.0.1:7999", node.portals, node.labels, node.disks)
    assert caplog.records == []  # the same address again: a restart, nothing to say
