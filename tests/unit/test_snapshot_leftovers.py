"""What a crash, a repaired filesystem or a hand edit leaves on an agent's disks, and what the agent makes of it.

* A snapshot whose record ``ID.json`` cannot be read is that one snapshot in
  state "error" (its message naming the file), as a volume's damaged record
  is: the agent starts, GetState answers, the other snapshots are served, and
  the damaged one can be deleted.
* At start the temporary files of atomic writes a stop cut (``*.tmp``) are
  removed; a volume record without its image is a volume in "error" (its data
  is not there: never dropped silently), made afresh by a create of its id; an
  image without its record, a volume's or a snapshot's, is reported in the log
  and left as it is.  The controller reports a volume listed without its
  image as missing on its node (reconcile), and does not try to grow it.

Real VolumeManager and SnapshotManager on temporary directories; a restart is
a new manager over the same directories.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.copies import FAILED, READY
from node_agent.agent.errors import FailedPrecondition
from node_agent.agent.records import write_json
from node_agent.agent.servicer import AgentServicer
from node_agent.agent.settings import DiskSpec
from node_agent.agent.snapshots import SnapshotManager
from node_agent.agent.volumes import DISK_MARKER, DISKS_FILE, VolumeManager
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc
from tests.unit.test_agent_volume_review import CHAP, X, Exports

MiB = 1 << 20


def start(tmp_path, **kwargs) -> tuple[VolumeManager, SnapshotManager]:
    """An agent's managers over disk ``d0`` (a restart: again over the same directories)."""
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))], use_reflink=False, **kwargs)
    return volumes, SnapshotManager(volumes)


def snapshot_dir(tmp_path):
    return tmp_path / "d0" / "snapshots"


def volume_dir(tmp_path):
    return tmp_path / "d0" / "volumes"


# ----------------------------------------------------------------------------- a damaged snapshot record


CORRUPT = [b"", b'{"volume_id": "v1", "si', b"null", b"[1]", b"\xff\xfe\x00", b'{"size": "1048576"}',
           b'{"created_at": "yesterday"}', b'{"volume_id": 7}', b'{"state": null}', b'{"size": -1}']


@pytest.mark.parametrize("content", CORRUPT, ids=["empty", "torn", "null", "array", "binary", "size-str",
                                                 "time-str", "volume-int", "state-null", "size-negative"])
def test_a_corrupt_snapshot_record_puts_that_snapshot_in_error_and_leaves_the_others_alone(tmp_path, content):
    volumes, snapshots = start(tmp_path)
    volumes.create("v1", MiB)
    snapshots.create("s1", "v1")
    snapshots.create("s2", "v1")
    meta = str(snapshot_dir(tmp_path) / "s1.json")
    with open(meta, "wb") as handle:
        handle.write(content)
    for agent in (snapshots, start(tmp_path)[1]):  # as it runs, and once restarted over it
        listed = {s.snapshot_id: s for s in agent.list()}
        assert sorted(listed) == ["s1", "s2"]
        assert listed["s1"].state == FAILED and meta in listed["s1"].message
        assert listed["s2"].state == READY
        assert agent.require("s1").state == FAILED
        with pytest.raises(FailedPrecondition, match=meta):
            agent.source("s1")  # never cloned from
        with pytest.raises(FailedPrecondition, match=meta):
            agent.create("s1", "v1")  # of which volume, when: unknown; not taken again over it
    assert os.path.exists(snapshot_dir(tmp_path) / "s1.img")  # its data stays until it is deleted
    assert snapshots.delete("s1")  # the way out
    assert sorted(os.listdir(snapshot_dir(tmp_path))) == ["s2.img", "s2.json"]
    assert [s.snapshot_id for s in snapshots.list()] == ["s2"]


def test_a_corrupt_record_of_a_copy_a_stop_interrupted_does_not_stop_the_start(tmp_path):
    volumes, snapshots = start(tmp_path)
    volumes.create("v1", MiB)
    snapshots.create("s1", "v1")
    (snapshot_dir(tmp_path) / ".s2.img.creating").write_bytes(b"\0" * 512)  # the stop's half-made copy
    (snapshot_dir(tmp_path) / "s2.json").write_text('{"volume_id": "v1", "state": "copy')
    _, snapshots = start(tmp_path)
    assert [(s.snapshot_id, s.state) for s in snapshots.list()] == [("s1", READY), ("s2", FAILED)]
    assert not os.path.exists(snapshot_dir(tmp_path) / ".s2.img.creating")


def test_the_service_answers_get_state_with_a_corrupt_snapshot_in_error(tmp_path):
    volumes, snapshots = start(tmp_path)
    volumes.create("v1", MiB)
    snapshots.create("s1", "v1")
    snapshots.create("s2", "v1")
    meta = str(snapshot_dir(tmp_path) / "s1.json")
    with open(meta, "w") as handle:
        handle.write("{")
    exports = Exports(tmp_path, volumes)
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServicer("n1", volumes, exports.manager, AttachmentManager(str(tmp_path / "data"), {}), snapshots),
        server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        state = stub.GetState(agent_pb2.GetStateRequest(), timeout=10)
        assert [(s.snapshot_id, s.state) for s in state.snapshots] == [("s1", "error"), ("s2", "ready")]
        assert meta in state.snapshots[0].message
        assert [v.volume_id for v in state.volumes] == ["v1"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateVolume(agent_pb2.CreateVolumeRequest(volume_id="c1", source_snapshot_id="s1", thin=True),
                              timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and meta in caught.value.details()
        stub.DeleteSnapshot(agent_pb2.DeleteSnapshotRequest(snapshot_id="s1"), timeout=10)
        assert [s.snapshot_id for s in stub.GetState(agent_pb2.GetStateRequest(), timeout=10).snapshots] == ["s2"]
    finally:
        channel.close()
        server.stop(None)
        exports.stop()


# ----------------------------------------------------------------------------- leftovers at start


def test_temporary_files_of_interrupted_writes_are_removed_at_start_and_the_records_kept(tmp_path, caplog):
    state = tmp_path / "state"
    volumes, snapshots = start(tmp_path, state_dir=str(state))
    volumes.create("v1", MiB)
    snapshots.create("s1", "v1")
    records = {path: path.read_bytes() for path in (volume_dir(tmp_path) / "v1.json", snapshot_dir(tmp_path) /
                                                      "s1.json", state / DISKS_FILE, tmp_path / "d0" / DISK_MARKER)}
    leftovers = [volume_dir(tmp_path) / "v1.json.tmp", volume_dir(tmp_path) / "v1.img.pr.tmp",
                 volume_dir(tmp_path) / "v1.img.sanitize.tmp", snapshot_dir(tmp_path) / "s1.json.tmp",
                 state / f"{DISKS_FILE}.tmp", tmp_path / "d0" / f"{DISK_MARKER}.tmp"]
    for path in leftovers:
        path.write_text('{"half": ')  # a write cut before its rename
    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        volumes, snapshots = start(tmp_path, state_dir=str(state))
    assert [str(p) for p in leftovers if p.exists()] == []
    assert {path: path.read_bytes() for path in records} == records
    assert [(v.volume_id, v.state) for v in volumes.list()] == [("v1", READY)]
    assert [(s.snapshot_id, s.state) for s in snapshots.list()] == [("s1", READY)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for path in leftovers:
        assert path.name in logged


def test_a_volume_record_without_its_image_is_an_error_volume_not_dropped(tmp_path, caplog):
    volumes, _ = start(tmp_path)
    volumes.create("v1", MiB)
    volumes.create("v2", MiB, thin=False)
    image = str(volume_dir(tmp_path) / "v2.img")
    os.unlink(image)  # lost
    with caplog.at_level(logging.ERROR, logger="shoal.agent.volumes"):
        volumes, _ = start(tmp_path)
    assert any(image in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    listed = {v.volume_id: v for v in volumes.list()}
    assert listed["v1"].state == READY
    assert listed["v2"].state == FAILED and image in listed["v2"].message and listed["v2"].thin is False
    assert volumes.lookup("v2") == listed["v2"]
    for refused in (lambda: volumes.require("v2"), lambda: volumes.expand("v2", 2 * MiB),
                    lambda: volumes.create("c1", MiB, source="v2")):
        with pytest.raises(FailedPrecondition, match=image):
            refused()
    assert os.path.exists(volume_dir(tmp_path) / "v2.json")  # kept: it says what was there
    assert volumes.delete("v2")  # the way out
    assert not os.path.exists(volume_dir(tmp_path) / "v2.json")
    assert [v.volume_id for v in volumes.list()] == ["v1"]
    assert volumes.lookup("v2") is None


def test_an_error_volume_without_its_image_is_not_served_at_restart(tmp_path):
    volumes, _ = start(tmp_path)
    exports = Exports(tmp_path, volumes)
    for volume_id in ("v1", "v2"):
        volumes.create(volume_id, MiB)
        exports.manager.export(volume_id, X, CHAP)
    exports.stop()
    os.unlink(volume_dir(tmp_path) / "v2.img")
    volumes, _ = start(tmp_path)
    exports = Exports(tmp_path, volumes)
    try:
        assert exports.manager.restore() == ["v1"]
        assert str(volume_dir(tmp_path) / "v2.img") in exports.manager.unserved()["v2"]
    finally:
        exports.stop()


def test_a_create_stopped_between_its_record_and_its_image_is_made_by_its_repeat(tmp_path):
    volumes, _ = start(tmp_path)
    write_json(str(volume_dir(tmp_path) / "v1.json"), {"thin": True, "source": "", "created_at": 0.0}, mode=0o600)
    volumes, _ = start(tmp_path)
    assert volumes.lookup("v1").state == FAILED
    info = volumes.create("v1", 2 * MiB, thin=False)  # the controller's repeat: no image to write over
    assert (info.state, info.size, info.thin) == (READY, 2 * MiB, False)
    assert json.loads((volume_dir(tmp_path) / "v1.json").read_text())["thin"] is False
    assert [(v.volume_id, v.state) for v in start(tmp_path)[0].list()] == [("v1", READY)]


def test_an_image_without_its_record_is_reported_and_served(tmp_path, caplog):
    volumes, _ = start(tmp_path)
    volumes.create("v1", MiB)
    os.unlink(volume_dir(tmp_path) / "v1.json")  # a delete stopped between its record and its image
    with caplog.at_level(logging.WARNING, logger="shoal.agent.volumes"):
        volumes, _ = start(tmp_path)
    assert any(str(volume_dir(tmp_path) / "v1.img") in r.getMessage() and "no record" in r.getMessage()
               for r in caplog.records)
    info = volumes.require("v1")
    assert (info.state, info.thin, info.source) == (READY, True, "")
    assert volumes.delete("v1")  # the repeat of the delete finishes it
    assert os.listdir(volume_dir(tmp_path)) == []


def test_a_snapshot_image_without_its_record_is_reported_and_left_alone(tmp_path, caplog):
    volumes, snapshots = start(tmp_path)
    volumes.create("v1", MiB)
    snapshots.create("s1", "v1")
    snapshots.create("s2", "v1")
    os.unlink(snapshot_dir(tmp_path) / "s1.json")
    os.unlink(snapshot_dir(tmp_path) / "s2.img")
    with caplog.at_level(logging.WARNING, logger="shoal.agent.snapshots"):
        volumes, snapshots = start(tmp_path)
    assert any(str(snapshot_dir(tmp_path) / "s1.img") in r.getMessage() and "left alone" in r.getMessage()
               for r in caplog.records)
    assert os.path.exists(snapshot_dir(tmp_path) / "s1.img")  # a snapshot's data: never removed on a guess
    listed = {s.snapshot_id: s for s in snapshots.list()}
    assert sorted(listed) == ["s2"]  # its volume and time are unknown: not offered as a snapshot
    assert listed["s2"].state == FAILED and str(snapshot_dir(tmp_path) / "s2.img") in listed["s2"].message


def test_the_controller_reports_a_volume_its_agent_lists_without_an_image_as_missing(tmp_path, caplog):
    """Its agent lists it (state "error", size 0: nothing of it is there); reconcile says it is missing on its
    node, as for a volume the agent does not list, and does not try to grow it to its size."""
    from controller.store import MemoryStore
    from tests.unit.test_controller_service import GiB, Env

    env = Env(MemoryStore(), tmp_path)
    volume = env.svc.create_volume("vol-1", GiB)
    env.agents.agent(volume.owner_node).volumes[volume.id].update(size_bytes=0, state="error")
    with caplog.at_level(logging.ERROR, logger="shoal.controller.reconcile"):
        assert env.svc.reconcile_once() == []
    assert [r.getMessage() for r in caplog.records] == [
        f"reconcile: volume vol-1 ({volume.id}) is missing on its node {volume.owner_node}"]
    assert env.agents.count("expand_volume") == 0
    assert env.store.get_volume("vol-1") == volume  # reported, not changed


def test_a_create_of_an_id_whose_record_lies_without_image_on_another_disk_leaves_one_volume(tmp_path):
    disks = [DiskSpec("data0", str(tmp_path / "d0")), DiskSpec("data1", str(tmp_path / "d1"))]
    VolumeManager(disks)
    write_json(str(tmp_path / "d0" / "volumes" / "v1.json"), {"thin": True, "source": ""}, mode=0o600)
    volumes = VolumeManager(disks)
    assert volumes.create("v1", MiB).disk == "data0"  # no disk asked: where its record is
    os.unlink(tmp_path / "d0" / "volumes" / "v1.img")
    volumes = VolumeManager(disks)
    info = volumes.create("v1", MiB, disk="data1")  # asked elsewhere: the record without data goes
    assert (info.disk, info.state) == ("data1", READY)
    assert not os.path.exists(tmp_path / "d0" / "volumes" / "v1.json")
    assert [(v.volume_id, v.disk, v.state) for v in VolumeManager(disks).list()] == [("v1", "data1", READY)]
