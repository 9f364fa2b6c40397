"""Controller fixes found in review of node health, fencing, reconcile and the agent channels (both stores).

What each test pins down: liveness and the fence grace are measured on a monotonic clock (a step of the wall
clock neither fences heartbeating nodes nor keeps a dead one healthy; a paused controller restarts the grace);
a fenced attachment whose detach failed stays fenced (no writer, its dead node not asked); reconcile after a
loss of the controller's state keeps the exports of volumes it does not know; the agent directory keeps one
channel per node; label maps are capped.  Agents are ``FakeAgents``, as in tests/unit/test_controller_service.py,
except for the channel tests (a real gRPC channel to nowhere).
"""

from __future__ import annotations

import logging

import grpc
import pytest

from controller.agents_grpc import RETIRE_AFTER, AgentCallSettings, AgentTls, GrpcAgentDirectory
from controller.api.errors import grpc_status
from controller.domain import validation
from controller.domain.agents import FakeAgents
from controller.domain.errors import InvalidArgument, Unavailable
from controller.domain.model import FENCE_DONE, FENCED, HEALTHY, UNHEALTHY, Disk, Node
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.store import MemoryStore, SqliteStore
from tests.unit.test_agent_daemon import make_certificates
from tests.unit.test_controller_service import Clock, GiB, env, iqn  # noqa: F401 (env: the fixture)

NODES = ("node-a", "node-b", "node-c")
GRACE = ControllerSettings(heartbeat_interval=5, heartbeat_timeout=20, fence_grace=60)


class Clocks:
    """The wall clock (records) and the monotonic one (liveness), moved apart as a stepped system clock does."""

    def __init__(self):
        self.wall = Clock(1_000_000.0)
        self.mono = Clock(50.0)

    def tick(self, seconds: float) -> None:
        self.wall.now += seconds
        self.mono.now += seconds


def _service(store, agents, clocks, settings=GRACE):
    return ControllerService(store, agents, settings=settings, clock=clocks.wall, monotonic=clocks.mono)


def _register(svc, nodes=NODES):
    for name in nodes:
        svc.register_node(name, iqn(name), "127.0.0.1:7000", ["127.0.0.1:3260"], {},
                          [Disk("data0", "/srv/data0", 100 * GiB, 90 * GiB)])


def _health_pass(svc) -> tuple[list[str], list[str]]:
    """What the daemon's health loop does each interval."""
    return svc.mark_unhealthy(), svc.fence_pass()


def _steady(svc, clocks, seconds, alive=NODES):
    """``seconds`` of a steady cluster: every 5 s the ``alive`` nodes heartbeat and the health loop runs."""
    seen = []
    for _ in range(int(seconds // 5)):
        clocks.tick(5)
        for name in alive:
            svc.heartbeat(name)
        seen.append(_health_pass(svc))
    return seen


@pytest.fixture
def clocked():
    clocks, agents = Clocks(), FakeAgents()
    svc = _service(MemoryStore(), agents, clocks)
    _register(svc)
    svc.create_volume("vol-1", GiB)
    svc.attach_volume("vol-1", "node-b")
    _steady(svc, clocks, 15)
    return svc, clocks, agents


# ---- liveness on a monotonic clock (bug 3) ----------------------------------------------------------------

def test_a_wall_clock_step_forward_neither_marks_nor_fences_heartbeating_nodes(clocked):
    svc, clocks, agents = clocked
    clocks.wall.now += 600  # NTP steps the system clock 10 minutes forward
    assert _health_pass(svc) == ([], [])  # before the next heartbeats arrive, too
    assert _steady(svc, clocks, 30) == [([], [])] * 6
    assert [(n.id, n.health, n.fence) for n in svc.list_nodes()] == [(n, HEALTHY, "") for n in NODES]
    assert agents.count("fence_initiator") == 0
    assert svc.get_node("node-a").last_heartbeat == clocks.wall.now  # the stored time stays wall-clock, for display


def test_a_wall_clock_step_backward_does_not_keep_a_dead_node_healthy(clocked):
    svc, clocks, _ = clocked
    clocks.wall.now -= 600
    seen = _steady(svc, clocks, 25, alive=("node-a", "node-c"))  # node-b died at the step
    assert svc.get_node("node-b").health == UNHEALTHY
    assert [marked for marked, _ in seen] == [[], [], [], [], ["node-b"]]
    seen = _steady(svc, clocks, 40, alive=("node-a", "node-c"))  # 65 s of silence: past the grace
    assert [fenced for _, fenced in seen if fenced] == [["node node-b is fenced"]]
    assert svc.get_node("node-b").fence == FENCE_DONE


def test_a_paused_controller_restarts_the_grace_instead_of_fencing_every_node(clocked, caplog):
    svc, clocks, agents = clocked
    clocks.tick(120)  # the controller's VM was frozen two minutes: no heartbeat received, no pass run
    assert _health_pass(svc) == ([], [])
    assert "did not run for 120 s" in caplog.text
    # node-b really is gone: it is fenced once silent a whole grace after the pause, not before.
    seen = _steady(svc, clocks, 60, alive=("node-a", "node-c"))
    assert [fenced for _, fenced in seen if fenced] == []
    assert _steady(svc, clocks, 5, alive=("node-a", "node-c")) == [([], ["node node-b is fenced"])]
    assert [n.id for n in svc.list_nodes() if n.fence] == ["node-b"]
    assert agents.count("fence_initiator") == 1


def test_a_health_loop_slower_than_the_timeout_is_not_taken_for_a_pause():
    """A loop that always waits long (a big --loop-interval) still marks and fences: only a wait much longer
    than its usual one restarts the grace."""
    clocks = Clocks()
    svc = _service(MemoryStore(), FakeAgents(), clocks)
    _register(svc)
    marked, fenced = [], []
    for _ in range(4):  # a pass every 30 s, longer than the 20 s timeout; node-b is silent
        clocks.tick(30)
        for name in ("node-a", "node-c"):
            svc.heartbeat(name)
        m, f = _health_pass(svc)
        marked += m
        fenced += f
    assert (marked, fenced) == (["node-b"], ["node node-b is fenced"])


# ---- a fenced attachment whose detach failed (bug 4) ------------------------------------------------------

def test_a_failed_detach_of_a_fenced_attachment_keeps_it_fenced_and_the_retry_finishes(env):
    env.svc.create_volume("vol-1", GiB)
    env.svc.attach_volume("vol-1", "node-b")
    env.agents.down.add("node-b")  # its host died
    assert env.svc.fence_node("node-b", "host lost").fence == FENCE_DONE
    env.agents.fail_next("unexport_volume", node="node-a")  # the owner blips once
    with pytest.raises(Unavailable):
        env.svc.detach_volume("vol-1", "node-b")
    attachment = env.store.get_attachment("vol-1", "node-b")
    assert (attachment.state, attachment.writer) == (FENCED, False)
    assert env.svc.attach_volume("vol-1", "node-c").node == "node-c"  # the volume still moves
    assert env.svc.reconcile_once() == []
    env.svc.detach_volume("vol-1", "node-b")  # the retry, with the owner back
    assert env.store.get_attachment("vol-1", "node-b") is None
    assert env.agents.count("detach_volume", "node-b") == 0  # the dead node was never asked


# ---- reconcile after the controller lost its state (bug 5) --------------------------------------------------

@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_reconcile_on_lost_state_keeps_the_exports_of_volumes_it_does_not_know(store, tmp_path):
    agents = FakeAgents()
    old = ControllerService(MemoryStore(), agents)
    _register(old)
    volume = old.create_volume("vol-1", GiB)
    old.attach_volume("vol-1", "node-b")
    gone = old.create_volume("vol-2", GiB)
    old.attach_volume("vol-2", "node-c")
    del agents.agent(gone.owner_node).volumes[gone.id]  # its file is gone: the export is meaningless
    new = ControllerService(MemoryStore() if store == "memory" else SqliteStore(str(tmp_path / "new.db")), agents)
    _register(new)  # the agents register again with the controller whose state was lost
    exports = agents.agent(volume.owner_node).exports
    assert new.reconcile_once() == [f"removed export of volume (unknown id {gone.id}, gone from the node) to "
                                    f"{iqn('node-c')}"]
    assert list(exports) == [(volume.id, iqn("node-b"))]  # node-b's session lives on
    assert new.reconcile_once() == []
    assert volume.id in agents.agent(volume.owner_node).volumes


# ---- one channel per node (bug 6) ----------------------------------------------------------------------------

class _Channels:
    """A channel factory that hands out (and remembers) real channels to addresses nobody listens on."""

    def __init__(self):
        self.opened: list[grpc.Channel] = []
        self.closed: list[grpc.Channel] = []
        self.tls: list = []  # the AgentTls each channel was opened with

    def __call__(self, address, tls):
        self.tls.append(tls)
        channel = grpc.insecure_channel(address)
        real_close = channel.close
        channel.close = lambda: (self.closed.append(channel), real_close())
        self.opened.append(channel)
        return channel


def _node(node_id: str, address: str) -> Node:
    return Node(node_id, iqn(node_id), address, ("127.0.0.1:3260",), {}, (), HEALTHY, 0.0)


def test_the_agent_directory_keeps_one_channel_per_node_and_closes_the_old_one():
    channels = _Channels()
    directory = GrpcAgentDirectory(AgentCallSettings(timeout=1, attempts=1), channel_factory=channels)
    try:
        old = directory.client(_node("n1", "127.0.0.1:1"))
        directory.client(_node("n1", "127.0.0.1:1"))
        directory.client(_node("n2", "127.0.0.1:1"))  # another node at the same address: its own channel
        assert (len(channels.opened), channels.closed) == (2, [])
        for port in range(2, 12):  # n1's agent pod restarts with a new address, ten times
            directory.client(_node("n1", f"127.0.0.1:{port}"))
        assert len(channels.opened) == 12
        assert channels.closed == channels.opened[:1] + channels.opened[2:-1]
        assert len(directory._channels) == 2
        with pytest.raises(Unavailable, match="n1 at 127.0.0.1:1: .*closed"):  # a client from before the move
            old.get_state()
    finally:
        directory.close()
    assert sorted(map(id, channels.closed)) == sorted(map(id, channels.opened))
    with pytest.raises(Unavailable, match="stopping"):
        directory.client(_node("n1", "127.0.0.1:11"))
    assert len(channels.opened) == 12


def test_agent_channels_take_renewed_tls_files_and_close_the_old_ones_later(tmp_path, caplog):
    """New client TLS files (a renewed certificate) give every agent a new channel on its next call; the old
    channels stay open ``RETIRE_AFTER`` seconds for the calls still on them.  Files that do not load (a key
    written before its certificate) are not taken, and a warning says so once."""
    pem = make_certificates(tmp_path)
    for name in ("client.pem", "client.key"):
        (tmp_path / f"live-{name}").write_bytes(pem[name])
    tls = AgentTls(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "live-client.pem"),
                   key=str(tmp_path / "live-client.key"))
    channels, now = _Channels(), [0.0]
    directory = GrpcAgentDirectory(AgentCallSettings(timeout=1, attempts=1, tls=tls), channel_factory=channels,
                                   monotonic=lambda: now[0])
    try:
        directory.client(_node("n1", "127.0.0.1:1"))
        directory.client(_node("n2", "127.0.0.1:2"))
        (tmp_path / "live-client.key").write_bytes(pem["node.key"])  # half a renewal: key and certificate differ
        directory.client(_node("n1", "127.0.0.1:1"))
        directory.client(_node("n1", "127.0.0.1:1"))
        assert (len(channels.opened), channels.closed) == (2, [])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "do not load" in warnings[0] and "live-client" in warnings[0], warnings
        (tmp_path / "live-client.pem").write_bytes(pem["node.pem"])  # ... and the rest
        directory.client(_node("n1", "127.0.0.1:1"))
        assert (len(channels.opened), channels.closed) == (3, [])
        now[0] += RETIRE_AFTER - 1
        directory.client(_node("n2", "127.0.0.1:2"))
        assert (len(channels.opened), channels.closed) == (4, [])
        now[0] += 2
        directory.client(_node("n1", "127.0.0.1:1"))
        assert (len(channels.opened), channels.closed) == (4, channels.opened[:2])
    finally:
        directory.close()
    assert sorted(map(id, channels.closed)) == sorted(map(id, channels.opened))


def test_a_channel_opened_while_a_renewal_is_half_written_uses_the_files_that_loaded(tmp_path):
    """The half-written renewal was not taken for the channels there were, but a channel opened meanwhile (a
    new node, an agent back at a new address) read the files as they were then, and could not reach its agent."""
    pem = make_certificates(tmp_path)
    for name in ("client.pem", "client.key"):
        (tmp_path / f"live-{name}").write_bytes(pem[name])
    tls = AgentTls(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "live-client.pem"),
                   key=str(tmp_path / "live-client.key"))
    channels = _Channels()
    directory = GrpcAgentDirectory(AgentCallSettings(timeout=1, attempts=1, tls=tls), channel_factory=channels)
    try:
        directory.client(_node("n1", "127.0.0.1:1"))
        (tmp_path / "live-client.pem").write_bytes(pem["node.pem"])  # half a renewal: no key for it yet
        directory.client(_node("n2", "127.0.0.1:2"))  # a new channel meanwhile
        assert channels.tls[-1].pems == (pem["ca.pem"], pem["client.key"], pem["client.pem"])
        (tmp_path / "live-client.key").write_bytes(pem["node.key"])  # ... and the rest
        directory.client(_node("n3", "127.0.0.1:3"))
        assert channels.tls[-1].pems == (pem["ca.pem"], pem["node.key"], pem["node.pem"])
    finally:
        directory.close()


# ---- label maps are capped (bug 7) -----------------------------------------------------------------------------

def test_label_maps_are_capped_in_number_and_bytes(env):
    many = {f"k{i}": "v" for i in range(validation.MAX_LABELS + 1)}
    big = {f"{'x' * 200}/{'k' * 58}{i:02d}": "v" * 63 for i in range(validation.MAX_LABELS)}  # 324 bytes each
    assert len(validation.labels(dict(list(many.items())[:-1]))) == validation.MAX_LABELS
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="node labels: 65 labels are too many: at most 64") as raised:
        env.svc.register_node("node-x", iqn("node-x"), "127.0.0.1:7000", ["127.0.0.1:3260"], many)
    assert grpc_status(raised.value) == (grpc.StatusCode.INVALID_ARGUMENT, str(raised.value))
    with pytest.raises(InvalidArgument, match=r"node labels: 20.2 KiB .* at most 16.0 KiB \(16384 bytes\)"):
        env.svc.register_node("node-x", iqn("node-x"), "127.0.0.1:7000", ["127.0.0.1:3260"], big)
    with pytest.raises(InvalidArgument, match="constraints: 65 labels are too many"):
        env.svc.create_volume("vol-1", GiB, constraints=many)
    assert env.snapshot() == before
