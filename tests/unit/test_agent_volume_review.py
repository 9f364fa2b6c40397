"""Regressions of the node agent volume review (F1-F5): disk identity, thick space, failed creates, corrupt
records, disks on one directory.

Real VolumeManager, ExportManager and portal on temporary directories.  A disk
"not mounted" is simulated by moving its directory away and leaving a fresh
empty one at its path, which is what the agent sees of a mount point whose
disk is not mounted (the mount itself changes nothing the agent looks at
beyond that: the directory's device and inode, and what is in it).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node_agent.agent import volumes as volumes_module
from node_agent.agent.daemon import Agent
from node_agent.agent.errors import FailedPrecondition, ResourceExhausted, Unavailable
from node_agent.agent.exports import RECORD_FILE, SECRETS_FILE, ExportManager, ExportSettings
from node_agent.agent.portal import PortalThread
from node_agent.agent.records import CorruptRecord, read_json
from node_agent.agent.settings import AgentSettings, DiskSpec
from node_agent.agent.volumes import DISK_MARKER, DISKS_FILE, VolumeManager
from node_agent.iscsi.target import Credentials
from node_agent.target_service import PortalConfig
from protos.shoal.v1 import agent_pb2, agent_pb2_grpc

MiB = 1 << 20
PREFIX = "iqn.2026-11.io.shoal.test:target:n1"
X = "iqn.2026-11.io.shoal.test:node-x"
CHAP = Credentials("vol-user", "s3cret-s3cret-1")


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


def unmount(path) -> str:
    """The disk goes away from ``path`` (moved aside), leaving the empty mount point; returns where it is."""
    aside = f"{path}.aside"
    os.rename(path, aside)
    os.mkdir(path)
    return aside


def mount(path, aside: str) -> None:
    """The disk comes back at ``path`` (the empty mount point replaced by it)."""
    os.rmdir(path)
    os.rename(aside, path)


class Exports:
    """An ExportManager over ``volumes`` with a real portal; ``stop()`` it."""

    def __init__(self, tmp_path, volumes: VolumeManager):
        self.portal = PortalThread(PortalConfig("127.0.0.1", 0))
        _, port = self.portal.start()
        self.manager = ExportManager(ExportSettings(str(tmp_path / "data"), PREFIX, (f"127.0.0.1:{port}",)),
                                     volumes, self.portal)

    def stop(self) -> None:
        self.portal.stop()


# ----------------------------------------------------------------------------- F1: a disk mounted late


def test_a_disk_not_mounted_at_start_is_unavailable_and_nothing_lands_on_its_mount_point(tmp_path):
    disk0, disk1, state = str(tmp_path / "d0"), str(tmp_path / "d1"), str(tmp_path / "data")
    specs = [DiskSpec("data0", disk0, capacity=64 * MiB), DiskSpec("data1", disk1, capacity=64 * MiB)]
    first = VolumeManager(specs, state_dir=state)
    first.create("v1", 8 * MiB, "data0")
    first.create("w1", 8 * MiB, "data1")
    exports = Exports(tmp_path, first)
    exports.manager.export("v1", X, CHAP)
    exports.manager.export("w1", X, CHAP)
    exports.stop()
    marker = read_json(os.path.join(disk0, DISK_MARKER), None)
    assert marker["disk"] == "data0"
    assert read_json(os.path.join(state, DISKS_FILE), None)["disks"]["data0"]["uuid"] == marker["uuid"]

    aside = unmount(disk0)  # the node restarts; data0 is not mounted yet
    later = VolumeManager(specs, state_dir=state)
    assert "data0" in later.unavailable and disk0 in later.unavailable["data0"]
    assert [(d.name, d.capacity, d.free) for d in later.disks()][0] == ("data0", 0, 0)
    assert later.disks()[1].capacity == 64 * MiB  # the other disk goes on
    with pytest.raises(Unavailable, match="data0"):
        later.create("v2", 8 * MiB, "data0")
    assert later.create("v3", 8 * MiB).disk == "data1"  # "any disk": never the unavailable one
    assert [v.volume_id for v in later.list()] == ["v3", "w1"]
    exports = Exports(tmp_path, later)
    try:
        assert exports.manager.restore() == ["w1"]
        assert "data0" in exports.manager.unserved()["v1"]
    finally:
        exports.stop()
    assert names(disk0) == []  # nothing was made on the mount point

    mount(disk0, aside)  # mounted at last; the next start serves it again
    again = VolumeManager(specs, state_dir=state)
    assert again.unavailable == {}
    assert [v.volume_id for v in again.list()] == ["v1", "v3", "w1"]
    exports = Exports(tmp_path, again)
    try:
        assert exports.manager.restore() == ["v1", "w1"]
    finally:
        exports.stop()


def test_a_disk_that_goes_away_while_running_refuses_creates_until_it_is_back(tmp_path):
    disk = str(tmp_path / "d0")
    volumes = VolumeManager([DiskSpec("data0", disk)], state_dir=str(tmp_path / "data"))
    volumes.create("v1", MiB, thin=False)
    aside = unmount(disk)
    with pytest.raises(Unavailable, match="data0"):
        volumes.create("v2", MiB)
    with pytest.raises(Unavailable, match="data0"):
        volumes.create("v2", MiB, "data0")
    assert (volumes.disks()[0].capacity, volumes.disks()[0].free) == (0, 0)
    assert volumes.list() == [] and volumes.get("v1") is None  # what is under the mount point is not its volumes
    assert names(disk) == []
    mount(disk, aside)
    assert volumes.create("v2", MiB).disk == "data0"
    assert [v.volume_id for v in volumes.list()] == ["v1", "v2"]
    assert volumes.disks()[0].capacity > 0


def test_another_disk_at_a_disks_path_is_refused(tmp_path):
    disk0, disk1, state = str(tmp_path / "d0"), str(tmp_path / "d1"), str(tmp_path / "data")
    specs = [DiskSpec("data0", disk0), DiskSpec("data1", disk1)]
    VolumeManager(specs, state_dir=state).create("v1", MiB, "data0")
    os.rename(disk0, str(tmp_path / "swap"))  # the two disks come back on each other's mount points
    os.rename(disk1, disk0)
    os.rename(str(tmp_path / "swap"), disk1)
    volumes = VolumeManager(specs, state_dir=state)
    assert sorted(volumes.unavailable) == ["data0", "data1"]
    assert "says it is disk 'data1'" in volumes.unavailable["data0"]
    assert volumes.list() == []


def test_an_agent_from_before_the_markers_adopts_its_disks_and_volumes(tmp_path):
    disk, state = str(tmp_path / "d0"), str(tmp_path / "data")
    VolumeManager([DiskSpec("data0", disk)]).create("v1", MiB, thin=False)  # no state_dir: no marker
    assert not os.path.exists(os.path.join(disk, DISK_MARKER))
    volumes = VolumeManager([DiskSpec("data0", disk)], state_dir=state)
    assert volumes.unavailable == {}
    assert [(v.volume_id, v.thin) for v in volumes.list()] == [("v1", False)]
    uuid = read_json(os.path.join(disk, DISK_MARKER), None)["uuid"]
    assert read_json(os.path.join(state, DISKS_FILE), None)["disks"]["data0"]["uuid"] == uuid
    # A lost data directory: the marker names the disk, so it is adopted again, with the same uuid.
    volumes = VolumeManager([DiskSpec("data0", disk)], state_dir=str(tmp_path / "new-data"))
    assert volumes.unavailable == {} and [v.volume_id for v in volumes.list()] == ["v1"]
    assert read_json(str(tmp_path / "new-data" / DISKS_FILE), None)["disks"]["data0"]["uuid"] == uuid


def test_the_agent_reports_a_disk_not_mounted_with_no_capacity_and_serves_nothing_from_it(tmp_path):
    disk = str(tmp_path / "d0")
    settings = AgentSettings(node_id="n1", data_dir=str(tmp_path / "data"), listen="127.0.0.1:0",
                             portal_listen="127.0.0.1:0", controller="", disks=(DiskSpec("data0", disk),))

    def started() -> tuple[Agent, agent_pb2.AgentState]:
        agent = Agent(settings, connectors={})
        agent.start()
        with grpc.insecure_channel(agent.agent_address) as channel:
            return agent, agent_pb2_grpc.AgentServiceStub(channel).GetState(agent_pb2.GetStateRequest(), timeout=10)

    agent, _ = started()
    try:
        agent.volumes.create("v1", MiB)
    finally:
        agent.stop()
    aside = unmount(disk)
    agent, state = started()
    try:
        assert [(d.name, d.capacity_bytes, d.free_bytes) for d in state.disks] == [("data0", 0, 0)]
        assert list(state.volumes) == []
        assert "data0" in agent.volumes.unavailable
    finally:
        agent.stop()
    assert names(disk) == []  # no volumes/ nor snapshots/ on the mount point
    mount(disk, aside)
    agent, state = started()
    try:
        assert [v.volume_id for v in state.volumes] == ["v1"] and state.disks[0].capacity_bytes > 0
    finally:
        agent.stop()


def test_a_corrupt_disks_record_refuses_to_start_naming_it(tmp_path):
    state = tmp_path / "data"
    state.mkdir()
    (state / DISKS_FILE).write_text("")
    with pytest.raises(CorruptRecord, match=str(state / DISKS_FILE)):
        VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))], state_dir=str(state))


# ----------------------------------------------------------------------------- F2: thick space


@pytest.fixture
def slow_accounting(monkeypatch):
    """Every count of a disk's used space takes a while, so that creates running at once all count before any
    of them allocates, unless something keeps them apart."""
    real = volumes_module._allocated

    def slow(directory):
        used = real(directory)
        time.sleep(0.15)
        return used
    monkeypatch.setattr(volumes_module, "_allocated", slow)


def run_at_once(fn, args) -> list[str]:
    start = threading.Barrier(len(args))

    def one(arg):
        start.wait()
        try:
            fn(arg)
            return "ok"
        except ResourceExhausted:
            return "full"
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(one, args))


def used(volumes: VolumeManager) -> int:
    return sum(v.allocated for v in volumes.list())


def test_parallel_thick_creates_do_not_overcommit_a_disk(tmp_path, slow_accounting):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=100 * MiB)])
    out = run_at_once(lambda vid: volumes.create(vid, 40 * MiB, thin=False), ["v1", "v2", "v3", "v4"])
    assert sorted(out) == ["full", "full", "ok", "ok"]
    assert used(volumes) <= 100 * MiB


def test_parallel_thick_expands_do_not_overcommit_a_disk(tmp_path, monkeypatch):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=100 * MiB)])
    volumes.create("v1", 30 * MiB, thin=False)
    volumes.create("v2", 30 * MiB, thin=False)
    real = volumes_module._allocated
    monkeypatch.setattr(volumes_module, "_allocated", lambda d: (real(d), time.sleep(0.15))[0])
    out = run_at_once(lambda vid: volumes.expand(vid, 60 * MiB), ["v1", "v2"])
    assert sorted(out) == ["full", "ok"]
    assert used(volumes) <= 100 * MiB


def test_parallel_thick_clones_do_not_overcommit_a_disk(tmp_path, slow_accounting):
    # Copies in the background, as the agent runs them: each clone is allocated when its copy is done.
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"), capacity=100 * MiB)], use_reflink=False,
                            background_copies=True)
    volumes.create("src", 30 * MiB)  # thin and empty: its clones' copies hold nothing until allocated
    clones = ["c1", "c2", "c3", "c4"]
    assert run_at_once(lambda vid: volumes.create(vid, 30 * MiB, thin=False, source="src"), clones) == ["ok"] * 4
    deadline = time.monotonic() + 30
    while any(volumes.lookup(vid).state == "copying" for vid in clones):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    states = sorted((volumes.lookup(vid).state, volumes.lookup(vid).message) for vid in clones)
    assert [state for state, _ in states] == ["error", "ready", "ready", "ready"]
    assert "ran out of space" in states[0][1]
    assert used(volumes) <= 100 * MiB
    assert not [n for n in names(tmp_path / "d0" / "volumes") if n.startswith(".")]  # no copy left behind
    volumes.close()


# ----------------------------------------------------------------------------- F3: an error after the rename


@pytest.mark.parametrize("clone", [False, True], ids=["new", "reflinked-clone"])
def test_an_error_after_the_rename_leaves_no_volume(tmp_path, monkeypatch, clone):
    # A "reflink" that shares nothing: enough for create to take the reflinked clone's path.
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))], reflink_fn=lambda src, dst: True)
    if clone:
        volumes.create("src", 4 * MiB)
    before = names(tmp_path / "d0" / "volumes")
    real = volumes_module.fsync_dir

    def dying_disk(directory):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(volumes_module, "fsync_dir", dying_disk)
    with pytest.raises(OSError, match="Input/output error"):
        volumes.create("v", 4 * MiB, thin=False, source="src" if clone else "")
    monkeypatch.setattr(volumes_module, "fsync_dir", real)
    assert names(tmp_path / "d0" / "volumes") == before
    assert volumes.get("v") is None
    info = volumes.create("v", 4 * MiB, thin=False, source="src" if clone else "")  # the repeat makes it
    assert info.thin is False and info.allocated >= 4 * MiB


# ----------------------------------------------------------------------------- F4: corrupt records


CORRUPT = [b"", b"{\"thin\": fal", b"null", b"[true]", b"\xff\xfe\x00", b'{"thin": "no"}', b'{"source": 3}']


@pytest.mark.parametrize("content", CORRUPT, ids=["empty", "torn", "null", "array", "binary", "thin-str",
                                                 "source-int"])
def test_a_corrupt_volume_record_puts_that_volume_in_error_and_leaves_the_others_alone(tmp_path, content):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("v1", MiB, thin=False)
    volumes.create("v2", MiB)
    meta = str(tmp_path / "d0" / "volumes" / "v1.json")
    with open(meta, "wb") as handle:
        handle.write(content)
    listed = {v.volume_id: v for v in volumes.list()}
    assert listed["v1"].state == "error" and meta in listed["v1"].message
    assert listed["v2"].state == "ready"
    for refused in (lambda: volumes.require("v1"), lambda: volumes.expand("v1", 2 * MiB),
                    lambda: volumes.create("c1", MiB, source="v1"), lambda: volumes.create("v1", MiB, thin=False)):
        with pytest.raises(FailedPrecondition, match=meta):
            refused()
    assert os.path.getsize(str(tmp_path / "d0" / "volumes" / "v1.img")) == MiB  # never made again over it
    assert volumes.delete("v1")  # the way out
    assert [v.volume_id for v in volumes.list()] == ["v2"]


def test_restore_serves_the_other_exports_and_export_of_the_corrupt_one_names_the_file(tmp_path):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    exports = Exports(tmp_path, volumes)
    for volume_id in ("v1", "v2"):
        volumes.create(volume_id, MiB)
        exports.manager.export(volume_id, X, CHAP)
    exports.stop()
    meta = str(tmp_path / "d0" / "volumes" / "v1.json")
    open(meta, "w").close()  # an empty file, as a filesystem may leave one after a crash
    exports = Exports(tmp_path, volumes)
    try:
        assert exports.manager.restore() == ["v2"]
        assert meta in exports.manager.unserved()["v1"]
        assert [r.volume_id for r in exports.manager.records()] == ["v2"]
        with pytest.raises(FailedPrecondition, match=meta):
            exports.manager.export("v1", X, CHAP)
    finally:
        exports.stop()


@pytest.mark.parametrize("name, content", [
    (RECORD_FILE, ""), (RECORD_FILE, "null"), (RECORD_FILE, '{"exports": []}'),
    (RECORD_FILE, '{"exports": {"v1": {"chap_user": "u"}}}'), (RECORD_FILE, '{"exports": {"v1": null}}'),
    (SECRETS_FILE, ""), (SECRETS_FILE, "[]"), (SECRETS_FILE, '{"secrets": {"v1": "s3cret"}}'),
])
def test_corrupt_export_records_refuse_the_start_naming_the_file(tmp_path, name, content):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("v1", MiB)
    data = tmp_path / "data"
    data.mkdir()
    (data / RECORD_FILE).write_text(json.dumps({"exports": {"v1": {"initiators": [X], "chap_user": "u"}}}))
    (data / SECRETS_FILE).write_text(json.dumps({"secrets": {"v1": {"chap": "s3cret-s3cret-1"}}}))
    (data / name).write_text(content)
    exports = Exports(tmp_path, volumes)
    try:
        with pytest.raises(CorruptRecord, match=str(data / name)):
            exports.manager.restore()
    finally:
        exports.stop()


def test_the_service_answers_get_state_and_refuses_a_corrupt_volume(tmp_path):
    from node_agent.agent.attachments import AttachmentManager
    from node_agent.agent.servicer import AgentServicer

    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])
    volumes.create("v1", MiB)
    volumes.create("v2", MiB)
    meta = str(tmp_path / "d0" / "volumes" / "v1.json")
    with open(meta, "w") as handle:
        handle.write("null")
    exports = Exports(tmp_path, volumes)
    server = grpc.server(ThreadPoolExecutor(2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServicer("n1", volumes, exports.manager, AttachmentManager(str(tmp_path / "data"), {})), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        state = stub.GetState(agent_pb2.GetStateRequest(), timeout=10)
        assert [(v.volume_id, v.state) for v in state.volumes] == [("v1", "error"), ("v2", "ready")]
        for call, request in (
                (stub.ExportVolume, agent_pb2.ExportVolumeRequest(volume_id="v1", initiator_iqn=X, chap_user="u",
                                                                  chap_secret="s3cret-s3cret-1")),
                (stub.ExpandVolume, agent_pb2.ExpandVolumeRequest(volume_id="v1", size_bytes=2 * MiB)),
                (stub.CreateVolume, agent_pb2.CreateVolumeRequest(volume_id="c1", source_volume_id="v1", thin=True))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert meta in caught.value.details()
    finally:
        channel.close()
        server.stop(None)
        exports.stop()


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{")
    with pytest.raises(CorruptRecord, match=str(path)):
        read_json(str(path), {})
    path.write_text("null")
    with pytest.raises(CorruptRecord, match=f"{path}: corrupt record \\(expected a JSON object, found null\\)"):
        read_json(str(path), {}, dict)
    assert read_json(str(tmp_path / "missing.json"), {"default": 1}, dict) == {"default": 1}


# ----------------------------------------------------------------------------- F5: disks on one directory


@pytest.mark.parametrize("second", ["{d}", "{d}/", "{d}/./", "{link}", "{d}/inner", "{parent}"],
                         ids=["same", "slash", "dot", "symlink", "inside", "outside"])
def test_disks_on_one_directory_or_nested_are_refused(tmp_path, second):
    d = tmp_path / "disks" / "d0"
    d.mkdir(parents=True)
    (tmp_path / "link").symlink_to(d)
    other = second.format(d=d, link=tmp_path / "link", parent=tmp_path / "disks")
    specs = (DiskSpec("data0", str(d)), DiskSpec("data1", other))
    with pytest.raises(ValueError, match="data0.*data1|data1.*data0"):
        AgentSettings(node_id="n1", disks=specs)
    with pytest.raises(ValueError, match="own directory"):
        VolumeManager(specs)
    assert not os.path.exists(d / "volumes")


def test_sibling_disks_with_a_common_prefix_are_fine(tmp_path):
    specs = (DiskSpec("data0", str(tmp_path / "d1")), DiskSpec("data1", str(tmp_path / "d10")))
    AgentSettings(node_id="n1", disks=specs)
    assert [d.name for d in VolumeManager(specs).disks()] == ["data0", "data1"]
