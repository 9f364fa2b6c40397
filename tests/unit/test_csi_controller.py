"""CSI Identity and Controller services, driven through a real gRPC server on a unix socket.

The domain underneath is ``ControllerService`` over ``MemoryStore`` with ``FakeAgents`` (three nodes in
zones a, b, c; see tests/unit/test_controller_service.py).  What is checked: the spec's required fields
and error codes, idempotency per RPC, pagination tokens, publish/unpublish repeats.
"""

from __future__ import annotations

import shutil
import tempfile

import grpc
import pytest

from controller.csi.controller import ControllerServicer, CsiSettings, domain_name
from controller.csi.identity import PLUGIN_NAME
from controller.csi.server import build_csi_controller_server, socket_path
from controller.store import MemoryStore
from protos.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.unit.test_controller_service import GiB, Env

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode


def mount(mode=Mode.SINGLE_NODE_WRITER, fs_type="ext4"):
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block(mode=Mode.SINGLE_NODE_WRITER):
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


class Csi:
    def __init__(self, env: Env, endpoint: str):
        self.env = env
        self.servicer = ControllerServicer(env.svc, CsiSettings(topology_keys=("zone",)))
        self.server = build_csi_controller_server(env.svc, endpoint, servicer=self.servicer)
        self.channel = grpc.insecure_channel(endpoint)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)

    def create(self, name="pvc-1", size=GiB, caps=None, **fields):
        request = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=caps or [mount()], **fields)
        if size is not None and "capacity_range" not in fields:
            request.capacity_range.required_bytes = size
        return self.ctl.CreateVolume(request).volume

    def close(self):
        self.channel.close()
        self.server.stop(None).wait(5)


@pytest.fixture
def csi():
    directory = tempfile.mkdtemp(prefix="csi", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    env = Env(MemoryStore(), directory)
    csi = Csi(env, f"unix://{directory}/controller.sock")
    yield csi
    csi.close()
    shutil.rmtree(directory, ignore_errors=True)


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


# ---- identity ----------------------------------------------------------------------------------


def test_identity(csi):
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == PLUGIN_NAME and info.vendor_version
    caps = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    Service = csi_pb2.PluginCapability.Service
    assert {c.service.type for c in caps if c.HasField("service")} == {
        Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_controller_capabilities(csi):
    RPC = csi_pb2.ControllerServiceCapability.RPC
    caps = {c.rpc.type for c in csi.ctl.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()).capabilities}
    assert {RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
            RPC.LIST_VOLUMES_PUBLISHED_NODES, RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
            RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER} <= caps


def test_socket_path():
    assert socket_path("unix:///run/csi/csi.sock") == "/run/csi/csi.sock"
    assert socket_path("/run/csi.sock") == "/run/csi.sock"
    with pytest.raises(ValueError):
        socket_path("unix://relative.sock")


# ---- CreateVolume / DeleteVolume -------------------------------------------------------------


def test_create_is_idempotent_by_name(csi):
    volume = csi.create("pvc-1", GiB)
    assert volume.capacity_bytes == GiB and volume.volume_id == csi.env.store.get_volume("pvc-1").id
    owner = csi.env.store.get_node(csi.env.store.get_volume("pvc-1").owner_node)
    assert [dict(t.segments) for t in volume.accessible_topology] == [{"zone": owner.labels["zone"]}]
    assert csi.create("pvc-1", GiB) == volume
    assert csi.env.agents.count("create_volume") == 1
    assert code_of(csi.create, "pvc-1", 2 * GiB) == Code.ALREADY_EXISTS
    assert code_of(csi.create, "pvc-1", GiB, None, parameters={"thin": "false"}) == Code.ALREADY_EXISTS


def test_create_required_fields_and_capabilities(csi):
    assert code_of(csi.ctl.CreateVolume, csi_pb2.CreateVolumeRequest(volume_capabilities=[mount()])) \
        == Code.INVALID_ARGUMENT
    assert code_of(csi.ctl.CreateVolume, csi_pb2.CreateVolumeRequest(name="x")) == Code.INVALID_ARGUMENT
    bad = [mount(fs_type="btrfs"), mount(Mode.MULTI_NODE_MULTI_WRITER), mount(Mode.MULTI_NODE_READER_ONLY),
           block(Mode.MULTI_NODE_SINGLE_WRITER), csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),
           csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))]
    for capability in bad:
        assert code_of(csi.create, "pvc-bad", GiB, [capability]) == Code.INVALID_ARGUMENT, capability
    assert csi.create("pvc-rwx", GiB, [block(Mode.MULTI_NODE_MULTI_WRITER)]).volume_id
    assert csi.create("pvc-xfs", GiB, [mount(fs_type="xfs"), mount(Mode.SINGLE_NODE_READER_ONLY)]).volume_id
    assert code_of(csi.create, "pvc-p", GiB, None, parameters={"colour": "red"}) == Code.INVALID_ARGUMENT
    assert csi.create("pvc-k8s", GiB, None, parameters={"csi.storage.k8s.io/pvc/name": "data"}).volume_id


def test_capacity_range_rules(csi):
    Range = csi_pb2.CapacityRange
    assert csi.create("pvc-d", None).capacity_bytes == GiB  # no range: the default size
    assert csi.create("pvc-r", None, capacity_range=Range(required_bytes=1000)).capacity_bytes == 1024
    assert csi.create("pvc-l", None, capacity_range=Range(limit_bytes=1000)).capacity_bytes == 512
    assert code_of(csi.create, "pvc-o", None, None, capacity_range=Range(required_bytes=1000, limit_bytes=1000)) \
        == Code.OUT_OF_RANGE
    assert code_of(csi.create, "pvc-i", None, None, capacity_range=Range(required_bytes=2000, limit_bytes=1000)) \
        == Code.INVALID_ARGUMENT
    assert code_of(csi.create, "pvc-n", None, None, capacity_range=Range(required_bytes=-1)) == Code.INVALID_ARGUMENT
    assert code_of(csi.create, "pvc-big", 1 << 62) == Code.OUT_OF_RANGE
    # a repeat is compatible when the existing size is within the range
    assert csi.create("pvc-r", None, capacity_range=Range(required_bytes=1024, limit_bytes=4096)).capacity_bytes \
        == 1024


def test_names_that_are_not_domain_names_map_to_stable_ones(csi):
    volume = csi.create("Weird_Name/with spaces", GiB)
    assert csi.create("Weird_Name/with spaces", GiB) == volume
    assert csi.env.store.get_volume(domain_name("Weird_Name/with spaces")).id == volume.volume_id


def test_topology_requirements_place_the_volume(csi):
    Topology = csi_pb2.Topology
    requirement = csi_pb2.TopologyRequirement(requisite=[Topology(segments={"zone": "b"})])
    volume = csi.create("pvc-b", GiB, None, accessibility_requirements=requirement)
    assert csi.env.store.get_volume("pvc-b").owner_node == "node-b"
    assert [dict(t.segments) for t in volume.accessible_topology] == [{"zone": "b"}]
    preferred = csi_pb2.TopologyRequirement(requisite=[Topology(segments={"zone": "nowhere"}),
                                                       Topology(segments={"zone": "c"})],
                                            preferred=[Topology(segments={"zone": "nowhere"})])
    csi.create("pvc-c", GiB, None, accessibility_requirements=preferred)
    assert csi.env.store.get_volume("pvc-c").owner_node == "node-c"
    csi.create("pvc-c", GiB, None, accessibility_requirements=preferred)  # the repeat is compatible
    assert code_of(csi.create, "pvc-b", GiB, None, accessibility_requirements=csi_pb2.TopologyRequirement(
        requisite=[Topology(segments={"zone": "a"})])) == Code.ALREADY_EXISTS
    assert code_of(csi.create, "pvc-x", GiB, None, accessibility_requirements=csi_pb2.TopologyRequirement(
        requisite=[Topology(segments={"zone": "nowhere"})])) == Code.RESOURCE_EXHAUSTED


def test_delete_unknown_is_ok_and_attached_is_refused(csi):
    csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="no-such-volume"))
    assert code_of(csi.ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == Code.INVALID_ARGUMENT
    volume = csi.create()
    csi.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id="node-a", volume_capability=mount()))
    assert code_of(csi.ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)) \
        == Code.FAILED_PRECONDITION
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id))
    csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert csi.env.store.get_volume("pvc-1") is None


# ---- publish / unpublish -----------------------------------------------------------------------


def publish(csi, volume_id, node="node-a", capability=None):
    return csi.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node, volume_capability=capability or mount())).publish_context


def test_publish_and_unpublish_repeat(csi):
    volume = csi.create()
    context = publish(csi, volume.volume_id)
    assert context["target_iqn"] and context["portals"] and context["chap_user"] and context["naa"]
    assert "device_path" not in context  # the node logs in at NodeStageVolume: no device exists yet
    assert not any("secret" in key for key in context)
    secret = csi.env.store.get_chap("pvc-1").secret
    assert secret and all(secret not in value for value in context.values())
    # Publish authorizes: the owner exports to node-a's IQN, node-a's agent records the target unlogged.
    [attachment] = csi.env.store.list_attachments()
    assert (attachment.node, attachment.state, attachment.device_path) == ("node-a", "published", "")
    assert csi.env.agents.agent("node-a").attachments[volume.volume_id]["device_path"] == ""
    assert csi.env.agents.secret_for("node-a", volume.volume_id, csi.env.store.get_node("node-a").initiator_iqn) \
        == secret
    assert publish(csi, volume.volume_id) == context
    assert csi.env.agents.count("attach_volume") == 1
    assert code_of(publish, csi, volume.volume_id, "node-b") == Code.FAILED_PRECONDITION
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a")
    csi.ctl.ControllerUnpublishVolume(unpublish)
    csi.ctl.ControllerUnpublishVolume(unpublish)
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id="gone", node_id="node-a"))
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                                               node_id="no-such-node"))
    assert csi.env.store.list_attachments() == []
    assert publish(csi, volume.volume_id, "node-b")["target_iqn"]


def test_publish_errors(csi):
    volume = csi.create()
    Request = csi_pb2.ControllerPublishVolumeRequest
    assert code_of(csi.ctl.ControllerPublishVolume, Request(node_id="node-a", volume_capability=mount())) \
        == Code.INVALID_ARGUMENT
    assert code_of(csi.ctl.ControllerPublishVolume, Request(volume_id=volume.volume_id, volume_capability=mount())) \
        == Code.INVALID_ARGUMENT
    assert code_of(csi.ctl.ControllerPublishVolume, Request(volume_id=volume.volume_id, node_id="node-a")) \
        == Code.INVALID_ARGUMENT
    assert code_of(publish, csi, "no-such-volume") == Code.NOT_FOUND
    assert code_of(publish, csi, volume.volume_id, "no-such-node") == Code.NOT_FOUND
    assert code_of(publish, csi, volume.volume_id, "node-a", mount(Mode.MULTI_NODE_MULTI_WRITER)) \
        == Code.INVALID_ARGUMENT
    assert code_of(csi.ctl.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest()) \
        == Code.INVALID_ARGUMENT


def test_block_multi_node_multi_writer_publishes_to_two_nodes(csi):
    rwx = block(Mode.MULTI_NODE_MULTI_WRITER)
    volume = csi.create("pvc-vm", GiB, [rwx])
    publish(csi, volume.volume_id, "node-a", rwx)
    publish(csi, volume.volume_id, "node-b", rwx)
    got = csi.ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert sorted(got.status.published_node_ids) == ["node-a", "node-b"]
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id))
    assert csi.env.store.list_attachments() == []


def test_a_repeat_publish_with_another_capability_or_readonly_is_refused(csi):
    """ALREADY_EXISTS for a repeat that is incompatible with the publish (CSI ControllerPublishVolume): a
    single-writer publish repeated as multi-writer must not make room for a second writer beside a mounted
    filesystem. readonly is refused: Shoal has no PUBLISH_READONLY capability, so a CO must not set it."""
    volume = csi.create("pvc-x", GiB, [mount(), block(Mode.MULTI_NODE_MULTI_WRITER)])
    publish(csi, volume.volume_id, "node-a")
    rwx = block(Mode.MULTI_NODE_MULTI_WRITER)
    before = csi.env.snapshot()
    assert code_of(publish, csi, volume.volume_id, "node-a", rwx) == Code.ALREADY_EXISTS
    assert code_of(publish, csi, volume.volume_id, "node-b", rwx) == Code.FAILED_PRECONDITION
    assert csi.env.snapshot() == before
    readonly = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a",
                                                      volume_capability=mount(), readonly=True)
    assert code_of(csi.ctl.ControllerPublishVolume, readonly) == Code.INVALID_ARGUMENT
    capabilities = csi.ctl.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    assert csi_pb2.ControllerServiceCapability.RPC.PUBLISH_READONLY not in {c.rpc.type for c in capabilities}
    # the other way round: published multi-writer, repeated single-writer
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id))
    publish(csi, volume.volume_id, "node-a", rwx)
    assert code_of(publish, csi, volume.volume_id, "node-a", block()) == Code.ALREADY_EXISTS
    assert publish(csi, volume.volume_id, "node-a", rwx)["target_iqn"]


# ---- validate, list, get, capacity, expand -----------------------------------------------------


def test_validate_volume_capabilities(csi):
    volume = csi.create()
    Request = csi_pb2.ValidateVolumeCapabilitiesRequest
    ok = csi.ctl.ValidateVolumeCapabilities(Request(volume_id=volume.volume_id, volume_capabilities=[mount()],
                                                    volume_context=volume.volume_context))
    assert list(ok.confirmed.volume_capabilities) == [mount()]
    refused = csi.ctl.ValidateVolumeCapabilities(Request(volume_id=volume.volume_id,
                                                         volume_capabilities=[mount(fs_type="zfs")]))
    assert not refused.HasField("confirmed") and "zfs" in refused.message
    assert code_of(csi.ctl.ValidateVolumeCapabilities, Request(volume_id="nope", volume_capabilities=[mount()])) \
        == Code.NOT_FOUND
    assert code_of(csi.ctl.ValidateVolumeCapabilities, Request(volume_id=volume.volume_id)) == Code.INVALID_ARGUMENT


def test_list_volumes_pagination(csi):
    ids = sorted(csi.create(f"pvc-{i}", GiB).volume_id for i in range(5))
    publish(csi, ids[0])
    seen, token, pages = [], "", 0
    while True:
        page = csi.ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        seen += [e.volume.volume_id for e in page.entries]
        pages += 1
        token = page.next_token
        if not token:
            break
    assert seen == ids and pages == 3
    everything = csi.ctl.ListVolumes(csi_pb2.ListVolumesRequest())
    assert len(everything.entries) == 5 and not everything.next_token
    assert list(everything.entries[0].status.published_node_ids) == ["node-a"]
    assert code_of(csi.ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="bogus")) == Code.ABORTED
    assert code_of(csi.ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="99")) == Code.ABORTED
    assert code_of(csi.ctl.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)) == Code.INVALID_ARGUMENT


def test_get_volume(csi):
    volume = csi.create()
    got = csi.ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert got.volume == volume and not got.status.volume_condition.abnormal
    assert code_of(csi.ctl.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id="nope")) \
        == Code.NOT_FOUND


def test_get_capacity(csi):
    everything = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest())
    zone_a = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(
        accessible_topology=csi_pb2.Topology(segments={"zone": "a"})))
    assert everything.available_capacity > zone_a.available_capacity > 0
    assert zone_a.maximum_volume_size.value <= zone_a.available_capacity
    assert code_of(csi.ctl.GetCapacity, csi_pb2.GetCapacityRequest(parameters={"pool": "nope"})) == Code.NOT_FOUND


def test_expand(csi):
    volume = csi.create()
    Request = csi_pb2.ControllerExpandVolumeRequest
    grown = csi.ctl.ControllerExpandVolume(Request(volume_id=volume.volume_id,
                                                   capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)))
    assert grown.capacity_bytes == 2 * GiB and grown.node_expansion_required
    again = csi.ctl.ControllerExpandVolume(Request(volume_id=volume.volume_id, volume_capability=block(),
                                                   capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)))
    assert again.capacity_bytes == 2 * GiB and again.node_expansion_required  # block too: the node rescans
    assert csi.env.agents.count("expand_volume") == 2  # a size reached is asked again: the agent answers at once
    owner = csi.env.store.get_volume("pvc-1").owner_node
    assert csi.env.agents.agent(owner).volumes[volume.volume_id]["size_bytes"] == 2 * GiB
    assert code_of(csi.ctl.ControllerExpandVolume, Request(volume_id=volume.volume_id)) == Code.INVALID_ARGUMENT
    assert code_of(csi.ctl.ControllerExpandVolume, Request(
        volume_id="nope", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))) == Code.NOT_FOUND
    assert code_of(csi.ctl.ControllerExpandVolume, Request(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(limit_bytes=GiB))) == Code.OUT_OF_RANGE


# ---- snapshots and clones ------------------------------------------------------------------------


def test_snapshots_and_clones(csi):
    volume = csi.create()
    Request = csi_pb2.CreateSnapshotRequest
    snap = csi.ctl.CreateSnapshot(Request(source_volume_id=volume.volume_id, name="snapshot-1")).snapshot
    assert snap.ready_to_use and snap.source_volume_id == volume.volume_id and snap.size_bytes == GiB
    assert snap.creation_time.seconds > 0
    assert csi.ctl.CreateSnapshot(Request(source_volume_id=volume.volume_id, name="snapshot-1")).snapshot == snap
    other = csi.create("pvc-2")
    assert code_of(csi.ctl.CreateSnapshot, Request(source_volume_id=other.volume_id, name="snapshot-1")) \
        == Code.ALREADY_EXISTS
    assert code_of(csi.ctl.CreateSnapshot, Request(source_volume_id="nope", name="s")) == Code.NOT_FOUND
    assert code_of(csi.ctl.CreateSnapshot, Request(name="s")) == Code.INVALID_ARGUMENT

    Source = csi_pb2.VolumeContentSource
    source = Source(snapshot=Source.SnapshotSource(snapshot_id=snap.snapshot_id))
    clone = csi.create("pvc-clone", 2 * GiB, None, volume_content_source=source)
    assert clone.content_source == source and clone.capacity_bytes == 2 * GiB
    assert csi.create("pvc-clone", 2 * GiB, None, volume_content_source=source) == clone
    assert code_of(csi.create, "pvc-clone", 2 * GiB) == Code.ALREADY_EXISTS  # same name, no source
    missing = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="nope"))
    assert code_of(csi.create, "pvc-c2", GiB, None, volume_content_source=missing) == Code.NOT_FOUND
    by_volume = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=other.volume_id))
    assert csi.create("pvc-c3", GiB, None, volume_content_source=by_volume).content_source == by_volume

    listed = csi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id))
    assert [e.snapshot for e in listed.entries] == [snap]
    assert not csi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id="nope")).entries
    assert code_of(csi.ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token="x")) == Code.ABORTED
    assert code_of(csi.ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)) \
        == Code.FAILED_PRECONDITION  # it has a snapshot
    csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert code_of(csi.ctl.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) == Code.INVALID_ARGUMENT


def test_a_clone_still_copying_is_aborted_until_ready(csi):
    csi.env.agents.copy_steps = 3
    volume = csi.create()
    source = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id))
    codes = []
    for _ in range(5):
        try:
            clone = csi.create("pvc-copy", GiB, None, volume_content_source=source)
            break
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert codes and set(codes) == {Code.ABORTED}
    assert clone.capacity_bytes == GiB and clone.content_source == source


def test_a_clone_asked_larger_than_its_source_is_grown_once_copied(csi):
    csi.env.agents.copy_steps = 2
    source_volume = csi.create("pvc-src", GiB)
    source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source_volume.volume_id))
    answers = []
    for _ in range(5):
        try:
            answers.append(csi.create("pvc-big", 2 * GiB, None, volume_content_source=source).capacity_bytes)
            break
        except grpc.RpcError as exc:
            answers.append(exc.code())  # still copying, at its source's size: that is no difference
    assert answers == [Code.ABORTED, Code.ABORTED, 2 * GiB]
    clone = csi.env.store.get_volume("pvc-big")
    assert csi.env.agents.agent(clone.owner_node).volumes[clone.id]["size_bytes"] == 2 * GiB
    assert code_of(csi.create, "pvc-big", GiB, None, volume_content_source=source,
                   capacity_range=csi_pb2.CapacityRange(limit_bytes=GiB)) == Code.ALREADY_EXISTS


def test_a_larger_clone_whose_grow_failed_for_a_while_is_grown_by_the_repeat(csi):
    source_volume = csi.create("pvc-src", GiB)
    source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source_volume.volume_id))
    csi.env.agents.fail_next("expand_volume")
    assert code_of(csi.create, "pvc-big", 2 * GiB, None, volume_content_source=source) == Code.UNAVAILABLE
    clone = csi.env.store.get_volume("pvc-big")
    assert clone.size_bytes == 2 * GiB  # recorded, so reconcile finishes it; the LUN is not grown yet
    assert csi.env.agents.agent(clone.owner_node).volumes[clone.id]["size_bytes"] == GiB
    assert csi.create("pvc-big", 2 * GiB, None, volume_content_source=source).capacity_bytes == 2 * GiB
    assert csi.env.agents.agent(clone.owner_node).volumes[clone.id]["size_bytes"] == 2 * GiB


def test_expand_repeated_after_a_temporary_failure_grows_the_volume(csi):
    volume = csi.create("pvc-1", GiB)
    owner = csi.env.store.get_volume("pvc-1").owner_node
    request = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id,
                                                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB))
    csi.env.agents.fail_next("expand_volume")
    assert code_of(csi.ctl.ControllerExpandVolume, request) == Code.UNAVAILABLE
    assert csi.env.agents.agent(owner).volumes[volume.volume_id]["size_bytes"] == GiB
    # The CO's retry: OK (and the node then grows its filesystem) only once the LUN is that large.
    assert csi.ctl.ControllerExpandVolume(request).capacity_bytes == 2 * GiB
    assert csi.env.agents.agent(owner).volumes[volume.volume_id]["size_bytes"] == 2 * GiB


def test_a_snapshot_whose_copy_failed_after_its_cut_was_answered_is_a_final_error(csi):
    """The first answer gave the CO the snapshot's creation_time (the cut), and the CO let the application write
    on.  Taken again later (as this test once pinned), the snapshot would hold those later writes under the
    time first answered.  The CSI spec: an error after the cut is answered with an error code; a final one
    (FAILED_PRECONDITION), so the CO stops repeating and the user deletes it and takes a new one."""
    csi.env.agents.copy_steps = 2
    volume = csi.create("pvc-1", GiB)
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snapshot-1")
    snap = csi.ctl.CreateSnapshot(request).snapshot
    assert not snap.ready_to_use
    csi.env.agents.fail_copy(csi.env.store.get_volume("pvc-1").owner_node, snap.snapshot_id)
    csi.env.clock.now += 10
    calls = csi.env.agents.count("create_snapshot")
    for _ in range(2):  # the CO's repeats: the same final error, never a new cut
        assert code_of(csi.ctl.CreateSnapshot, request) == Code.FAILED_PRECONDITION
    assert csi.env.agents.count("create_snapshot") == calls
    listed = csi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
    assert [(e.snapshot.ready_to_use, e.snapshot.creation_time) for e in listed] == [(False, snap.creation_time)]
    csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    again = csi.ctl.CreateSnapshot(request).snapshot  # a new one, cut now
    assert again.snapshot_id != snap.snapshot_id and again.creation_time.seconds == int(csi.env.clock.now)


# ---- shoal controller --csi-endpoint -------------------------------------------------------------


def test_controller_daemon_serves_csi_on_its_unix_socket():
    import argparse
    import os

    from controller import daemon as controller_daemon

    directory = tempfile.mkdtemp(prefix="csid", dir="/tmp")
    parser = argparse.ArgumentParser()
    controller_daemon.add_parser(parser.add_subparsers())
    args = parser.parse_args(["controller", "--db", f"{directory}/state.db", "--listen", "127.0.0.1:0",
                              "--csi-endpoint", f"unix://{directory}/controller.sock"])
    settings, controller_settings = controller_daemon.settings_from_args(args)
    daemon = controller_daemon.ControllerDaemon(settings, controller_settings)
    daemon.start()
    try:
        with grpc.insecure_channel(f"unix://{directory}/controller.sock") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            assert identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10).name == PLUGIN_NAME
            ctl = csi_pb2_grpc.ControllerStub(channel)
            assert not ctl.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10).entries
        daemon.stop()
        assert not os.path.exists(f"{directory}/controller.sock")  # the socket goes with the daemon
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)
    with pytest.raises(ValueError):
        controller_daemon.settings_from_args(parser.parse_args(["controller", "--csi-endpoint", "relative.sock"]))


@pytest.mark.parametrize("name,valid", [("csi.shoal.io", True), ("shoal", True), ("a" * 63, True),
                                        ("a" * 64, False), ("-shoal.io", False), ("shoal.io.", False),
                                        ("shoal_io", False), ("", False)])
def test_the_driver_name_flag_on_every_command(name, valid):
    """``--csi-driver-name`` (the Helm chart passes ``--csi-driver-name=NAME``) on shoal controller, agent
    and up; a name the spec refuses (more than 63 characters, not domain-name style) is a usage error."""
    import argparse

    from controller import daemon as controller_daemon
    from controller import up
    from node_agent import cli

    parser = argparse.ArgumentParser()
    controller_daemon.add_parser(parser.add_subparsers())
    controller_args = parser.parse_args(["controller", f"--csi-driver-name={name}"])
    agent_args = cli.build_parser().parse_args(["agent", "--node-id", "n1", f"--csi-driver-name={name}"])
    up_parser = argparse.ArgumentParser()
    up.add_parser(up_parser.add_subparsers())
    up_args = up_parser.parse_args(["up", f"--csi-driver-name={name}"])
    assert up_args.csi_driver_name == name
    if valid:
        assert controller_daemon.settings_from_args(controller_args)[0].csi_driver_name == name
        assert cli._agent_settings(agent_args).csi_driver_name == name
    else:
        with pytest.raises(ValueError):
            controller_daemon.settings_from_args(controller_args)
        with pytest.raises(ValueError):
            cli._agent_settings(agent_args)
        assert up.run(up_args) == 2  # refused before anything starts


def test_the_helm_chart_passes_the_flag_as_the_commands_take_it():
    from pathlib import Path

    templates = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "shoal" / "templates"
    for template in ("controller.yaml", "node.yaml"):
        assert "- --csi-driver-name={{ .Values.driverName }}" in (templates / template).read_text()


def test_shoalctl_attach_after_a_csi_publish_logs_in(csi):
    """The domain keeps both ways: publish (authorize; the node logs in at NodeStage) and attach (both)."""
    volume = csi.create()
    publish(csi, volume.volume_id)
    svc, agents = csi.env.svc, csi.env.agents
    published = svc.attach_volume("pvc-1", "node-a", login=False)  # a repeat of the publish
    assert (published.state, published.device_path) == ("published", "")
    attached = svc.attach_volume("pvc-1", "node-a")  # shoalctl volume attach: now the node logs in
    assert attached.state == "attached" and attached.device_path == f"/dev/fake/{volume.volume_id}"
    assert svc.attach_volume("pvc-1", "node-a", login=False) == attached  # a publish after it: as it is
    assert agents.count("attach_volume") == 2 and agents.count("export_volume") == 2
    svc.detach_volume("pvc-1", "node-a")
    assert csi.env.store.list_attachments() == [] and agents.agent("node-a").attachments == {}


def test_a_call_while_another_runs_on_the_same_volume_is_aborted(csi):
    volume = csi.create()
    servicer_busy = csi.servicer.busy
    with servicer_busy.hold("volume/pvc-1", "volume pvc-1"):
        assert code_of(csi.create, "pvc-1") == Code.ABORTED
        assert code_of(csi.ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)) \
            == Code.ABORTED
        csi.create("pvc-2")  # another volume is not held up
    with servicer_busy.hold("publish/pvc-1/node-a", "volume pvc-1 on node-a"):
        assert code_of(publish, csi, volume.volume_id) == Code.ABORTED
    assert publish(csi, volume.volume_id)["target_iqn"]


def test_publish_uses_the_connector_the_node_announced(csi, tmp_path):
    from controller.csi.controller import CONNECTOR_LABEL
    from node_agent.host.connector import CONNECTOR_LABEL as AGENT_LABEL, preferred_connector

    assert CONNECTOR_LABEL == AGENT_LABEL
    svc = csi.env.svc
    svc.register_node("node-k", "iqn.2026-11.io.shoal:node:node-k", "127.0.0.1:7001", ["127.0.0.1:3261"],
                      {"zone": "a", CONNECTOR_LABEL: "kernel"})
    volume = csi.create()
    assert publish(csi, volume.volume_id, "node-k")["mode"] == "kernel"
    assert svc.store.get_attachment("pvc-1", "node-k").mode == "kernel"
    # where the agent finds iscsi_tcp and iscsiadm it announces "kernel", else "userspace"
    (tmp_path / "iscsi_tcp").mkdir()
    assert preferred_connector(str(tmp_path), iscsiadm="/sbin/iscsiadm", iscsid=lambda: True) == "kernel"
    assert preferred_connector(str(tmp_path), iscsiadm="") == "userspace"
    assert preferred_connector(str(tmp_path / "none"), iscsiadm="/sbin/iscsiadm") == "userspace"


def test_get_capacity_counts_thick_growth_no_heartbeat_has_reported_yet(csi):
    """As placement does: a thick volume grown since the node's last heartbeat took real free space the
    disk's last report still shows as free; GetCapacity for thick volumes must not offer it again."""
    thick = {"thick": "true"}
    topology = csi_pb2.Topology(segments={"zone": "a"})
    csi.env.svc.create_volume("t1", GiB, thin=False, constraints={"zone": "a"})
    csi.env.clock.now += 5
    for node in csi.env.svc.list_nodes():
        csi.env.svc.heartbeat(node.id, list(node.disks))  # t1 counted in what the disks report
    before = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=thick, accessible_topology=topology))
    csi.env.clock.now += 1
    csi.env.svc.expand_volume("t1", 3 * GiB)
    after = csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(parameters=thick, accessible_topology=topology))
    assert after.available_capacity == before.available_capacity - 2 * GiB
