"""Controller fixes found in a review of the domain logic and the admin API (both stores).

What each test pins down: a repeat attach on a live migration's source is not a second writer; an expand refused
for good goes back to the size the agent has, not to an earlier expand's pending one; a thick volume's growth is
not promised the same free bytes twice between two heartbeats; a long invalid value is answered
INVALID_ARGUMENT (not RESOURCE_EXHAUSTED: a status message travels in a size-limited trailer); a refused clone
request changes nothing; byte sums past 2**64 - 1 do not break the admin API; ports and IQN dates take ASCII
digits only; a fence reason has no control characters.  Agents are ``FakeAgents``, as in
tests/unit/test_controller_service.py; the API tests run the real gRPC server on 127.0.0.1.
"""

from __future__ import annotations

import grpc
import pytest

from controller.api.decorators import MAX_DETAILS_BYTES, rpc
from controller.api.server import build_server
from controller.domain import validation as check
from controller.domain.agents import FakeAgents
from controller.domain.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted,
                                      Unavailable)
from controller.domain.model import ATTACHED, PUBLISHED, Disk
from controller.domain.service import ControllerService
from controller.domain.settings import ControllerSettings
from controller.store import MemoryStore
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2
from tests.unit import test_controller_service as service_tests
from tests.unit.test_controller_service import GiB, Clock, Secrets, iqn

env = service_tests.env  # the fixture: both stores, three nodes, FakeAgents

# ---- 1: a repeat attach on a live migration's source -------------------------------------------------------


def test_a_repeat_attach_on_the_migration_source_is_not_a_second_writer(env):
    volume = env.svc.create_volume("vm", GiB)
    env.svc.attach_volume("vm", "node-b")                       # the source host: the single writer
    env.svc.attach_volume("vm", "node-c", shared=True)          # the migration's target
    env.agents.restart("node-b")                                # the source's agent forgot its session
    again = env.svc.attach_volume("vm", "node-b")               # the same attach, to log in again
    assert (again.state, again.shared, again.device_path) == (ATTACHED, False, "/dev/fake/" + volume.id)
    assert env.agents.count("attach_volume", "node-b") == 2
    # a third node is still a second writer, and a multi-writer publish beside the single writer is refused
    with pytest.raises(FailedPrecondition, match="a second node is refused"):
        env.svc.attach_volume("vm", "node-a")
    with pytest.raises(FailedPrecondition, match="node-b as its single writer"):
        env.svc.attach_volume("vm", "node-c", multi_writer=True)


def test_a_published_migration_source_logs_in(env):
    """CSI: ControllerPublish on the source, a shared publish on the target, then the source's NodeStage."""
    env.svc.create_volume("vm", GiB)
    assert env.svc.attach_volume("vm", "node-b", login=False).state == PUBLISHED
    env.svc.attach_volume("vm", "node-c", login=False, shared=True)
    assert env.svc.attach_volume("vm", "node-b").state == ATTACHED
    assert {a.node: a.state for a in env.store.list_attachments(volume="vm")} == {"node-b": ATTACHED,
                                                                                   "node-c": PUBLISHED}


# ---- 2: an expand refused for good after a temporary failure --------------------------------------------------


def test_an_expand_refused_for_good_after_a_temporary_failure_goes_back_to_the_agents_size(env):
    volume = env.svc.create_volume("v", GiB)
    env.agents.fail_next("expand_volume", Unavailable("agent restarting"))
    with pytest.raises(Unavailable):
        env.svc.expand_volume("v", 50 * GiB)
    assert env.store.get_volume("v").size_bytes == 50 * GiB   # kept: reconcile retries it
    env.agents.fail_next("expand_volume", ResourceExhausted("disk data0 has no room to grow"))
    with pytest.raises(ResourceExhausted):
        env.svc.expand_volume("v", 50 * GiB)                  # the retry is refused for good
    assert env.store.get_volume("v").size_bytes == GiB == env.agents.agent("node-a").volumes[volume.id]["size_bytes"]
    assert env.svc.reconcile_once() == []                     # nothing left to finish
    assert env.svc.expand_volume("v", 2 * GiB).size_bytes == 2 * GiB  # a smaller growth is not refused


def test_reconcile_finishing_an_expand_the_agent_now_refuses_goes_back_to_the_agents_size(env):
    """The same when reconcile, not a caller, makes the retry: it used to ask again on every pass."""
    volume = env.svc.create_volume("v", GiB)
    env.agents.fail_next("expand_volume", Unavailable("agent restarting"))
    with pytest.raises(Unavailable):
        env.svc.expand_volume("v", 50 * GiB)
    env.agents.fail_next("expand_volume", ResourceExhausted("disk data0 has no room to grow"))
    assert not any("expanded" in what for what in env.svc.reconcile_once())
    assert env.store.get_volume("v").size_bytes == GiB == env.agents.agent("node-a").volumes[volume.id]["size_bytes"]
    calls = len(env.agents.calls)
    assert env.svc.reconcile_once() == []  # nothing asked again
    assert not any(c[1] == "expand_volume" for c in env.agents.calls[calls:])


def test_an_expand_refused_for_good_keeps_the_record_when_the_agent_cannot_say_its_size(env):
    env.svc.create_volume("v", GiB)
    env.agents.fail_next("expand_volume", ResourceExhausted("no room"))
    env.agents.fail_next("get_volume", Unavailable("gone again"))
    with pytest.raises(ResourceExhausted, match="no room"):
        env.svc.expand_volume("v", 50 * GiB)
    assert env.store.get_volume("v").size_bytes == GiB


# ---- 3: thick growth between two heartbeats --------------------------------------------------------------------


def _one_disk(env, free):
    env.svc.register_node("node-a", iqn("node-a"), "127.0.0.1:7000", ["127.0.0.1:3260"], {"zone": "a"},
                          [Disk("data0", "/srv/data0", 200 * GiB, free)])
    env.svc.create_pool("one", [("node-a", "data0")])


def test_thick_growth_between_heartbeats_is_not_promised_the_same_free_space(env):
    _one_disk(env, 60 * GiB)
    env.svc.create_volume("t1", 10 * GiB, pool="one", thin=False)
    env.svc.create_volume("t2", 10 * GiB, pool="one", thin=False)
    env.clock.now += 5
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 200 * GiB, 40 * GiB)])  # both counted in free
    env.clock.now += 1
    env.svc.expand_volume("t1", 50 * GiB)                                             # +40 GiB: all there is
    with pytest.raises(ResourceExhausted, match="has room for 0 B more, not 40.0 GiB"):
        env.svc.expand_volume("t2", 50 * GiB)
    assert env.store.get_volume("t2").size_bytes == 10 * GiB
    with pytest.raises(ResourceExhausted, match=r"thick: real free space"):
        env.svc.create_volume("t3", 20 * GiB, pool="one", thin=False)
    assert env.svc.create_volume("thin", 20 * GiB, pool="one").thin  # thin volumes promise no free space
    # The next heartbeat counts the growth in what is free; nothing is taken off twice.
    env.clock.now += 5
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 200 * GiB, 30 * GiB)])
    assert env.svc.expand_volume("t2", 40 * GiB).size_bytes == 40 * GiB


def test_thick_growth_refused_by_the_agent_is_not_counted(env):
    _one_disk(env, 60 * GiB)
    env.svc.create_volume("t1", 10 * GiB, pool="one", thin=False)
    env.clock.now += 5
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 200 * GiB, 50 * GiB)])
    env.clock.now += 1
    env.agents.fail_next("expand_volume", ResourceExhausted("no room after all"))
    with pytest.raises(ResourceExhausted, match="no room after all"):
        env.svc.expand_volume("t1", 50 * GiB)
    assert env.svc.create_volume("t2", 50 * GiB, pool="one", thin=False).owner_node == "node-a"


# ---- 4: a long invalid value over gRPC ----------------------------------------------------------------------


@pytest.fixture
def api():
    service = ControllerService(MemoryStore(), FakeAgents(), settings=ControllerSettings(), clock=Clock(),
                                secrets=Secrets())
    server, port = build_server(service, "127.0.0.1:0", workers=4)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service, admin_pb2_grpc.AdminServiceStub(channel), agent_pb2_grpc.RegistrationServiceStub(channel)
    server.stop(None)


def status_of(call, request):
    try:
        call(request)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def register(reg, node_id, capacity):
    reg.Register(agent_pb2.RegisterRequest(
        node_id=node_id, initiator_iqn=iqn(node_id), agent_address="127.0.0.1:7000", portals=["127.0.0.1:3260"],
        disks=[common_pb2.Disk(name="d", path="/d", capacity_bytes=capacity, free_bytes=capacity)]))


@pytest.mark.parametrize("length", [1000, 17000, 100000])
def test_a_long_invalid_value_is_invalid_argument_with_a_short_message(api, length):
    service, admin, reg = api
    for call, request, quoted in (
        (admin.CreateVolume, admin_pb2.CreateVolumeRequest(name="A" * length, size_bytes=GiB), "volume name 'AAA"),
        (admin.GetNode, admin_pb2.GetNodeRequest(id="_" * length), "node id '___"),
        (admin.CreateVolume, admin_pb2.CreateVolumeRequest(name="v", size_bytes=GiB,
                                                           constraints={"!" * min(length, 16000): "x"}), "key '!!!"),
        (reg.Register, agent_pb2.RegisterRequest(node_id="n", initiator_iqn="\u00e9" * length,
                                                 agent_address="127.0.0.1:1"), "initiator IQN '\u00e9\u00e9"),
    ):
        code, details = status_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (quoted, code, details[:100])
        assert quoted in details and len(details) < 300
    assert service.store.list_volumes() == [] and service.store.list_nodes() == []


class Context:
    """The bits of ``grpc.ServicerContext`` the ``rpc`` decorator uses."""

    def abort(self, code, details):
        raise RuntimeError(code, details)


@pytest.mark.parametrize("wrapper", ["rpc", "csi_rpc"])
def test_any_long_status_message_is_cut_and_keeps_its_code(wrapper):
    """The admin API's wrapper and the CSI one alike."""
    from controller.csi.errors import csi_rpc

    decorate = {"rpc": rpc, "csi_rpc": csi_rpc}[wrapper]

    class Servicer:
        @decorate()
        def Refuse(self, request, context):
            raise FailedPrecondition("volume v is attached to " + ", ".join(f"n\u00e9ud-{i}" for i in range(5000)))

    with pytest.raises(RuntimeError) as raised:
        Servicer().Refuse(admin_pb2.GetStatusRequest(), Context())
    code, details = raised.value.args
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("volume v is attached to n\u00e9ud-0, ") and "characters)" in details
    assert len(details.encode()) <= MAX_DETAILS_BYTES + 40


# ---- 5: a refused clone request ----------------------------------------------------------------------------


def test_a_refused_clone_request_changes_nothing(env):
    env.svc.create_volume("src", GiB)
    env.svc.create_snapshot("s", "src")
    env.svc.create_pool("other", overcommit_ratio=2.0)
    assert env.svc.clone_volume("c", "s").requested_bytes == 0          # shoalctl's clone: no size asked
    before = env.snapshot()
    with pytest.raises(AlreadyExists, match="pool default, asked other"):
        env.svc.clone_volume("c", "s", "other", requested_bytes=8 * GiB)
    with pytest.raises(AlreadyExists, match="a clone of snapshot/s, asked for a clone of volume/src"):
        env.svc.clone_volume("c", "volume/src", requested_bytes=8 * GiB)
    assert env.snapshot() == before
    # the same clone asked again with a size records it (a CSI repeat is then told from another request)
    assert env.svc.clone_volume("c", "s", requested_bytes=2 * GiB).requested_bytes == 2 * GiB
    assert env.svc.clone_volume("c", "s", requested_bytes=3 * GiB).requested_bytes == 2 * GiB


def test_a_clone_that_failed_half_way_keeps_the_size_it_was_asked(env):
    env.svc.create_volume("src", GiB)
    env.agents.fail_next("clone_volume")
    with pytest.raises(Unavailable):
        env.svc.clone_volume("c", "volume/src", requested_bytes=2 * GiB)
    assert env.store.get_volume("c").requested_bytes == 2 * GiB


# ---- 6: byte sums past a uint64 -------------------------------------------------------------------------------


def test_capacity_sums_past_uint64_are_clamped_not_internal(api):
    service, admin, reg = api
    for i in range(4):
        register(reg, f"n{i}", 1 << 62)                                      # 2**64 bytes in all
    assert admin.GetStatus(admin_pb2.GetStatusRequest()).capacity_bytes == (1 << 64) - 1
    assert admin.GetStatus(admin_pb2.GetStatusRequest()).free_bytes == (1 << 64) - 1
    assert [p.capacity_bytes for p in admin.ListPools(admin_pb2.ListPoolsRequest()).pools] == [(1 << 64) - 1]
    assert admin.GetPool(admin_pb2.GetPoolRequest(name="default")).capacity_bytes == (1 << 64) - 1
    assert admin.CreatePool(admin_pb2.CreatePoolRequest(name="all")).capacity_bytes == (1 << 64) - 1
    assert service.status()["capacity_bytes"] == 1 << 64                 # the domain keeps the exact sum


# ---- 7: ASCII digits, and a fence reason without control characters ---------------------------------------------


@pytest.mark.parametrize("value", ["h:\u0663\u0662\u0666\u0660", "h:\uff13\uff12\uff16\uff10", "h:3\u0662"])
def test_a_port_needs_ascii_digits(value):
    with pytest.raises(InvalidArgument, match="is not host:port"):
        check.address(value, "portal")
    assert check.address("h:3260", "portal") == "h:3260"


def test_an_iqn_date_needs_ascii_digits(env):
    with pytest.raises(InvalidArgument, match="not an iSCSI name"):
        check.iqn("iqn.\u0662\u0660\u0662\u0664-\u0660\u0661.io.shoal:x")
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="agent address"):
        env.svc.register_node("node-x", iqn("node-x"), "127.0.0.1:\uff17\uff10\uff10\uff10", ["127.0.0.1:3260"])
    assert env.snapshot() == before


@pytest.mark.parametrize("reason", ["disk\x1b[2J", "a\nnode node-c unfenced", "tab\there", "del\x7f", "c1\x9b2J"])
def test_a_fence_reason_with_control_characters_is_refused_and_changes_nothing(env, reason):
    env.svc.create_volume("v", GiB)
    env.svc.attach_volume("v", "node-b")
    before = env.snapshot()
    with pytest.raises(InvalidArgument, match="fence reason has a control character"):
        env.svc.fence_node("node-b", reason)
    assert env.snapshot() == before and env.agents.count("fence_initiator") == 0
    assert env.svc.fence_node("node-b", "  suspect host\n").fence_reason == "suspect host"
