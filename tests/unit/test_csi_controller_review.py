"""CSI Controller service, from a review: clones and the request they answer, publish repeats and writers,
pagination tokens.

Driven as tests/unit/test_csi_controller.py drives it (a real gRPC server on a unix socket over
``ControllerService``, ``MemoryStore`` and ``FakeAgents``; nodes node-a/b/c in zones a/b/c, one 100 GiB disk
each).  Section numbers are the CSI spec's (v1.9, spec.md).
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from controller.domain.errors import FailedPrecondition, NotFound, ResourceExhausted
from controller.domain.model import Volume
from protos.csi.v1 import csi_pb2
from tests.unit.test_controller_service import GiB
from tests.unit.test_csi_controller import Code, Mode, block, code_of, csi, publish  # noqa: F401 (csi: the fixture)

Range = csi_pb2.CapacityRange
Source = csi_pb2.VolumeContentSource
Topology = csi_pb2.Topology


def of_volume(volume_id: str) -> csi_pb2.VolumeContentSource:
    return Source(volume=Source.VolumeSource(volume_id=volume_id))


def of_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return Source(snapshot=Source.SnapshotSource(snapshot_id=snapshot_id))


def in_zone(zone: str) -> csi_pb2.TopologyRequirement:
    return csi_pb2.TopologyRequirement(requisite=[Topology(segments={"zone": zone})])


def snapshot_of(csi, volume_id: str, name: str = "snapshot-1") -> csi_pb2.Snapshot:
    return csi.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name=name)).snapshot


def names(csi) -> list[str]:
    return sorted(v.name for v in csi.env.store.list_volumes())


# ---- 1: a clone lives beside its source: outside the requisite topology it is not made -----------


def test_a_clone_whose_source_is_outside_the_requisite_topology_is_refused(csi):
    """CreateVolume (4.3.2): "If the SP is unable to make the volume available from any of the requisite
    topologies it MUST fail the CreateVolume call" -- RESOURCE_EXHAUSTED, "Unable to provision in
    accessible_topology".  A clone lives on its source's node, so its source's zone decides; nothing is made,
    and the identical repeat answers the same (it used to succeed, then ALREADY_EXISTS)."""
    source = csi.create("pvc-src", GiB, None, accessibility_requirements=in_zone("a"))
    before = names(csi)
    for _ in range(2):
        assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=of_volume(source.volume_id),
                       accessibility_requirements=in_zone("b")) == Code.RESOURCE_EXHAUSTED
        assert names(csi) == before
    assert csi.env.agents.count("clone_volume") == 0
    clone = csi.create("pvc-clone", GiB, None, volume_content_source=of_volume(source.volume_id),
                       accessibility_requirements=in_zone("a"))
    assert [dict(t.segments) for t in clone.accessible_topology] == [{"zone": "a"}]
    assert csi.create("pvc-clone", GiB, None, volume_content_source=of_volume(source.volume_id),
                      accessibility_requirements=in_zone("a")) == clone


# ---- 2: a clone the capacity range cannot be is not made, or not left behind ---------------------


@pytest.mark.parametrize("rng, code", [
    (Range(required_bytes=GiB + 1, limit_bytes=GiB + 1), Code.OUT_OF_RANGE),  # rounds past its limit
    (Range(required_bytes=(1 << 50) + 512), Code.OUT_OF_RANGE),  # larger than the largest volume
    (Range(required_bytes=500 * GiB), Code.RESOURCE_EXHAUSTED),  # the source's 100 GiB disk cannot hold it
])
def test_a_clone_the_capacity_range_cannot_be_is_not_made(csi, rng, code):
    """CreateVolume (4.3.2): OUT_OF_RANGE "Unsupported capacity_range", RESOURCE_EXHAUSTED "Not enough
    capacity": a failed call leaves no volume (the CO never got its id, so it never deletes it), and its
    identical repeat answers the same."""
    source = csi.create("pvc-src", GiB)
    before = names(csi)
    for _ in range(2):
        assert code_of(csi.create, "pvc-clone", None, None, volume_content_source=of_volume(source.volume_id),
                       capacity_range=rng) == code
        assert names(csi) == before
    assert csi.env.agents.count("clone_volume") == 0


@pytest.mark.parametrize("method, error, code", [
    ("expand_volume", ResourceExhausted("fake agent: disk full"), Code.RESOURCE_EXHAUSTED),
    ("clone_volume", NotFound("fake agent: no such source"), Code.NOT_FOUND),
])
def test_a_clone_that_fails_for_good_once_made_is_deleted(csi, method, error, code):
    """A permanent failure after the clone was made (its room taken meanwhile, the agent refusing the copy)
    deletes it: nothing half made is left for a CO that got no volume id."""
    source = csi.create("pvc-src", GiB)
    csi.env.agents.fail_next(method, error)
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, volume_content_source=of_volume(source.volume_id)) \
        == code
    assert csi.env.store.get_volume("pvc-clone") is None
    owner = csi.env.store.get_volume("pvc-src").owner_node
    assert list(csi.env.agents.agent(owner).volumes) == [source.volume_id]
    clone = csi.create("pvc-clone", 2 * GiB, None, volume_content_source=of_volume(source.volume_id))
    assert clone.capacity_bytes == 2 * GiB


def test_a_copied_clone_whose_grow_fails_for_good_is_deleted_by_the_repeat(csi):
    """A clone copied in the background is grown by the repeat that finds it copied; if that grow fails for
    good, no call answered the clone: it is deleted, and a later repeat starts it again."""
    csi.env.agents.copy_steps = 2
    source = csi.create("pvc-src", GiB)
    request = dict(volume_content_source=of_volume(source.volume_id))
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, **request) == Code.ABORTED
    csi.env.agents.fail_next("expand_volume", ResourceExhausted("fake agent: disk full"))
    codes = [code_of(csi.create, "pvc-clone", 2 * GiB, None, **request) for _ in range(2)]
    assert codes == [Code.ABORTED, Code.RESOURCE_EXHAUSTED]
    assert csi.env.store.get_volume("pvc-clone") is None


def test_a_clone_that_fails_for_a_while_is_kept_for_the_repeat(csi):
    """A temporary failure (UNAVAILABLE) keeps the clone: the CO repeats, and the repeat finishes it."""
    source = csi.create("pvc-src", GiB)
    csi.env.agents.fail_next("clone_volume")
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, volume_content_source=of_volume(source.volume_id)) \
        == Code.UNAVAILABLE
    assert csi.env.store.get_volume("pvc-clone").state == "creating"  # temporary: not an error
    clone = csi.create("pvc-clone", 2 * GiB, None, volume_content_source=of_volume(source.volume_id))
    assert clone.capacity_bytes == 2 * GiB and clone.volume_id == csi.env.store.get_volume("pvc-clone").id


# ---- 3: a clone's repeat is judged against the size the first call asked for -------------------


def test_a_clone_repeat_asking_another_size_is_already_exists(csi):
    """CreateVolume (4.3.2): a volume of that name that is not compatible with the capacity_range asked ->
    ALREADY_EXISTS, for a clone as for any volume: it is not grown to the repeat's size."""
    source = csi.create("pvc-src", GiB)
    request = dict(volume_content_source=of_volume(source.volume_id))
    clone = csi.create("pvc-clone", 2 * GiB, None, **request)
    assert code_of(csi.create, "pvc-clone", 5 * GiB, None, **request) == Code.ALREADY_EXISTS
    assert csi.env.store.get_volume("pvc-clone").size_bytes == 2 * GiB
    assert csi.create("pvc-clone", 2 * GiB, None, **request) == clone
    assert csi.create("pvc-clone", GiB, None, **request) == clone  # 2 GiB is at least 1 GiB, as for any volume


def test_a_clone_repeat_while_copying_is_judged_against_the_first_size(csi):
    """Still copying, a clone is at its source's size; the size its first call asked for is recorded, so the
    same request waits (ABORTED) and is grown to it once copied, while another size is ALREADY_EXISTS."""
    csi.env.agents.copy_steps = 2
    source = csi.create("pvc-src", GiB)
    request = dict(volume_content_source=of_volume(source.volume_id))
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, **request) == Code.ABORTED
    assert csi.env.store.get_volume("pvc-clone").requested_bytes == 2 * GiB
    assert code_of(csi.create, "pvc-clone", 5 * GiB, None, **request) == Code.ALREADY_EXISTS
    answers = []
    for _ in range(3):
        try:
            answers.append(csi.create("pvc-clone", 2 * GiB, None, **request).capacity_bytes)
            break
        except grpc.RpcError as exc:
            answers.append(exc.code())
    assert answers[-1] == 2 * GiB and set(answers[:-1]) <= {Code.ABORTED}


def test_a_clone_that_failed_for_a_while_keeps_its_first_size(csi):
    """The size is recorded also when the first call failed for a while: its repeat is told from another
    request."""
    source = csi.create("pvc-src", GiB)
    request = dict(volume_content_source=of_volume(source.volume_id))
    csi.env.agents.fail_next("clone_volume")
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, **request) == Code.UNAVAILABLE
    assert code_of(csi.create, "pvc-clone", 5 * GiB, None, **request) == Code.ALREADY_EXISTS
    assert csi.create("pvc-clone", 2 * GiB, None, **request).capacity_bytes == 2 * GiB


def test_a_clone_recorded_without_its_size_is_grown_by_the_repeat_as_before(csi):
    """Records from before ``requested_bytes`` (and stores that do not keep it) load with 0: the repeat's own
    size is taken, as it was."""
    old = Volume("vol-old", "id-old", GiB, "default", "node-a", "data0", "available", True, 0.0, "volume/pvc-src")
    assert old.requested_bytes == 0
    csi.env.agents.copy_steps = 2
    source = csi.create("pvc-src", GiB)
    request = dict(volume_content_source=of_volume(source.volume_id))
    assert code_of(csi.create, "pvc-clone", 2 * GiB, None, **request) == Code.ABORTED
    store = csi.env.store
    store.put_volume(replace(store.get_volume("pvc-clone"), requested_bytes=0))
    answers = []
    for _ in range(3):
        try:
            answers.append(csi.create("pvc-clone", 3 * GiB, None, **request).capacity_bytes)
            break
        except grpc.RpcError as exc:
            answers.append(exc.code())
    assert answers[-1] == 3 * GiB


# ---- 4: a multi-writer publish is not a way around a single writer ------------------------------


def test_a_multi_writer_publish_is_refused_while_another_node_is_the_single_writer(csi):
    """ControllerPublishVolume (4.3.5): a volume published to another node with a single-node access mode
    -> FAILED_PRECONDITION, also when this publish asks MULTI_NODE_MULTI_WRITER: node-a was promised the
    volume alone.  And the reverse: a single-writer publish beside multi-writer ones is refused too."""
    single = csi.create("pvc-1", GiB, [block(Mode.SINGLE_NODE_WRITER)])
    publish(csi, single.volume_id, "node-a", block(Mode.SINGLE_NODE_WRITER))
    assert code_of(publish, csi, single.volume_id, "node-b", block(Mode.MULTI_NODE_MULTI_WRITER)) \
        == Code.FAILED_PRECONDITION
    assert [a.node for a in csi.env.store.list_attachments(volume="pvc-1")] == ["node-a"]

    rwx = block(Mode.MULTI_NODE_MULTI_WRITER)
    shared = csi.create("pvc-2", GiB, [rwx])
    publish(csi, shared.volume_id, "node-a", rwx)
    assert code_of(publish, csi, shared.volume_id, "node-b", block(Mode.SINGLE_NODE_WRITER)) \
        == Code.FAILED_PRECONDITION
    publish(csi, shared.volume_id, "node-b", rwx)
    assert sorted(a.node for a in csi.env.store.list_attachments(volume="pvc-2")) == ["node-a", "node-b"]


def test_the_domain_refuses_a_multi_writer_publish_beside_a_single_writer_under_its_lock(csi):
    """The rule holds where the volume's lock is held (``attach_volume``), not only in the servicer's check
    before it: a single-writer publish landing in between is seen.  ``shared`` alone (live migration,
    shoalctl --shared) still goes beside a single writer, on purpose."""
    svc = csi.env.svc
    csi.create("pvc-1", GiB, [block()])
    svc.attach_volume("pvc-1", "node-a", login=False)
    with pytest.raises(FailedPrecondition, match="single writer"):
        svc.attach_volume("pvc-1", "node-b", login=False, multi_writer=True)
    assert svc.attach_volume("pvc-1", "node-c", login=False, shared=True).shared


# ---- 5: a publish repeat keeps the mode it was published in ------------------------------------


def test_an_identical_publish_repeat_keeps_its_mode_after_the_node_announced_another(csi):
    """ControllerPublishVolume (4.3.5) is idempotent: the same request for a volume published to the node
    answers OK with the same publish context, even after the node's agent re-registered announcing another
    connector; a new publish takes the new one."""
    volume = csi.create("pvc-1", GiB)
    context = publish(csi, volume.volume_id, "node-a")
    assert context["mode"] == "userspace"
    node = csi.env.store.get_node("node-a")
    csi.env.svc.register_node(node.id, node.initiator_iqn, node.agent_address, node.portals,
                              dict(node.labels, **{"shoal.io/connector": "kernel"}), node.disks)
    assert publish(csi, volume.volume_id, "node-a") == context
    csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                                               node_id="node-a"))
    assert publish(csi, volume.volume_id, "node-a")["mode"] == "kernel"


# ---- 6: a clone's repeat needs no source that still exists --------------------------------------


def test_a_clone_repeat_succeeds_after_its_source_snapshot_is_deleted(csi):
    """CreateVolume (4.3.2): the same name and a compatible request -> OK with the existing volume; the
    source it was made from being deleted since is no difference (NOT_FOUND is for a source of a volume still
    to be made).  The answer still names the content source (external-provisioner deletes a clone answered
    without it).  Another snapshot, or a new one under the old name, is another source: ALREADY_EXISTS."""
    volume = csi.create("pvc-1", GiB)
    snapshot = snapshot_of(csi, volume.volume_id)
    source = of_snapshot(snapshot.snapshot_id)
    clone = csi.create("pvc-clone", GiB, None, volume_content_source=source)
    csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    again = csi.create("pvc-clone", GiB, None, volume_content_source=source)
    assert again.volume_id == clone.volume_id and again.content_source == source
    csi.env.clock.now += 10
    newer = snapshot_of(csi, volume.volume_id)  # the same name, another snapshot
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=of_snapshot(newer.snapshot_id)) \
        == Code.ALREADY_EXISTS
    other = snapshot_of(csi, volume.volume_id, "snapshot-2")
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=of_snapshot(other.snapshot_id)) \
        == Code.ALREADY_EXISTS
    assert code_of(csi.create, "pvc-clone", GiB, None, volume_content_source=of_volume(volume.volume_id)) \
        == Code.ALREADY_EXISTS


def test_a_clone_repeat_succeeds_after_its_source_volume_is_deleted(csi):
    source = csi.create("pvc-src", GiB)
    clone = csi.create("pvc-clone", GiB, None, volume_content_source=of_volume(source.volume_id))
    csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id))
    again = csi.create("pvc-clone", GiB, None, volume_content_source=of_volume(source.volume_id))
    assert again.volume_id == clone.volume_id and again.content_source == of_volume(source.volume_id)
    assert code_of(csi.create, "pvc-new", GiB, None, volume_content_source=of_volume(source.volume_id)) \
        == Code.NOT_FOUND  # a new volume still needs its source


# ---- 7: pagination tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["\u00b2", "\u2460", "\u0661", "\uff11"])
def test_a_starting_token_of_other_digits_is_aborted(csi, token):
    """ListVolumes (4.3.8) / ListSnapshots (4.3.12): a starting_token the plugin did not give (ours are ASCII
    decimal offsets) -> ABORTED, not INTERNAL ("²" passed ``isdigit`` and broke ``int``) nor a page
    ("١" and "１" are digits ``int`` reads as 1)."""
    csi.create("pvc-1", GiB)
    csi.create("pvc-2", GiB)
    assert code_of(csi.ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token=token)) == Code.ABORTED
    assert code_of(csi.ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token=token)) == Code.ABORTED
