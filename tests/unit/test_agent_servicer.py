"""AgentService over real gRPC on 127.0.0.1: validation, the error table, idempotency per RPC.

The managers are real (temporary directories, a real portal); the host
connector is a recording fake (``FakeConnector``, our own ``Connector``
boundary) because attaching for real needs FUSE and loop devices — the
integration and peer tests do that.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.errors import GRPC_CODES, AgentError, grpc_status
from node_agent.agent.exports import ExportManager, ExportSettings
from node_agent.agent.portal import PortalThread
from node_agent.agent.servicer import AgentServicer
from node_agent.agent.settings import DiskSpec
from node_agent.agent.volumes import VolumeManager
from node_agent.host.connector import AttachedDevice, Connector, IdentityMismatch, TemporaryConnectorError
from node_agent.target_service import PortalConfig
from protos.shoal.v1 import agent_pb2 as pb
from protos.shoal.v1 import agent_pb2_grpc, common_pb2

MiB = 1 << 20
X = "iqn.2026-11.io.shoal.test:node-x"
SECRET = "s3cret-s3cret-1"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class FakeConnector(Connector):
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.fail: Exception | None = None

    def attach(self, target):
        self.calls.append(("attach", target.volume_id))
        if self.fail:
            raise self.fail
        return AttachedDevice(path=f"/dev/fake-{target.volume_id}", volume_id=target.volume_id, target=target)

    def detach(self, target):
        self.calls.append(("detach", target.volume_id))


@pytest.fixture
def agent(tmp_path):
    volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "disk"))])
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    _, port = portal.start()
    exports = ExportManager(ExportSettings(str(tmp_path / "data"), "iqn.2026-11.io.shoal.test:t",
                                           (f"127.0.0.1:{port}",)), volumes, portal)
    connector = FakeConnector()
    attachments = AttachmentManager(str(tmp_path / "data"), {"userspace": lambda: connector})
    server = grpc.server(ThreadPoolExecutor(4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer("n1", volumes, exports, attachments), server)
    bound = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{bound}")
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    stub.connector = connector
    yield stub
    channel.close()
    server.stop(None)
    portal.stop()


def code_of(call, request):
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value.code(), caught.value.details()


def state(stub):
    return stub.GetState(pb.GetStateRequest())


def export_request(**kw):
    fields = dict(volume_id="vol-1", initiator_iqn=X, chap_user="u", chap_secret=SECRET)
    fields.update(kw)
    return pb.ExportVolumeRequest(**fields)


def attach_request(volume_id="vol-9", **kw):
    export = common_pb2.ExportInfo(volume_id=volume_id, target_iqn="iqn.2026-11.io.shoal.test:t:" + volume_id,
                                   portals=["127.0.0.1:3260"], lun=0, naa="6" + "0" * 31, serial=volume_id,
                                   chap_user="u")
    fields = dict(export=export, chap_secret=SECRET)
    fields.update(kw)
    return pb.AttachVolumeRequest(**fields)


def test_create_repeat_conflict_and_delete(agent):
    created = agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=4 * MiB, thin=True))
    assert (created.size_bytes, created.disk) == (4 * MiB, "data0")
    assert agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=4 * MiB, thin=True)) == created
    code, _ = code_of(agent.CreateVolume, pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=8 * MiB))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    agent.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vol-1"))
    agent.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vol-1"))  # repeat / unknown: OK
    assert list(state(agent).volumes) == []


@pytest.mark.parametrize("request_, field", [
    (pb.CreateVolumeRequest(size_bytes=MiB), "volume_id is required"),
    (pb.CreateVolumeRequest(volume_id="VOL", size_bytes=MiB), "volume_id 'VOL'"),
    (pb.CreateVolumeRequest(volume_id="vol-2"), "size_bytes must be positive"),
    (pb.CreateVolumeRequest(volume_id="vol-2", size_bytes=MiB + 1), "multiple of the 512-byte block"),
    (pb.CreateVolumeRequest(volume_id="vol-2", size_bytes=MiB, disk="Disk/0"), "disk 'Disk/0'"),
    (pb.CreateVolumeRequest(volume_id="vol-2", size_bytes=MiB, source_volume_id="vol-2"), "another volume"),
    (pb.CreateVolumeRequest(volume_id="vol-2", size_bytes=MiB, source_volume_id="Bad"), "source_volume_id 'Bad'"),
])
def test_bad_create_arguments_are_invalid_and_change_nothing(agent, request_, field):
    code, details = code_of(agent.CreateVolume, request_)
    assert code == INVALID and field in details
    assert list(state(agent).volumes) == []


@pytest.mark.parametrize("kw, field", [
    (dict(initiator_iqn=""), "initiator_iqn is required"),
    (dict(initiator_iqn="node-x"), "initiator_iqn"),
    (dict(chap_user="", chap_secret=""), "chap_user and chap_secret are required"),
    (dict(chap_secret=""), "go together"),
    (dict(chap_secret="short"), "12-255 bytes"),
    (dict(chap_user="u\nx"), "control characters"),
    (dict(mutual_chap_user="t"), "go together"),
    (dict(mutual_chap_user="t", mutual_chap_secret=SECRET), "must differ"),
    (dict(volume_id=""), "volume_id is required"),
])
def test_bad_export_arguments_are_invalid_change_nothing_and_never_echo_secrets(agent, kw, field):
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=MiB, thin=True))
    code, details = code_of(agent.ExportVolume, export_request(**kw))
    assert code == INVALID and field in details
    assert SECRET not in details
    assert list(state(agent).exports) == []


def test_export_repeat_unexport_and_delete_refused_while_exported(agent):
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=MiB, thin=True))
    info = agent.ExportVolume(export_request())
    assert agent.ExportVolume(export_request()) == info
    assert info.serial == "vol-1" and len(info.naa) == 32
    code, details = code_of(agent.ExportVolume, export_request(chap_secret="another-secret-9"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "another-secret-9" not in details
    assert code_of(agent.DeleteVolume, pb.DeleteVolumeRequest(volume_id="vol-1"))[0] == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(agent.ExportVolume, export_request(volume_id="vol-2"))[0] == grpc.StatusCode.NOT_FOUND
    grown = agent.ExpandVolume(pb.ExpandVolumeRequest(volume_id="vol-1", size_bytes=2 * MiB))
    assert grown.size_bytes == 2 * MiB
    assert agent.ExpandVolume(pb.ExpandVolumeRequest(volume_id="vol-1", size_bytes=MiB)).size_bytes == 2 * MiB
    agent.UnexportVolume(pb.UnexportVolumeRequest(volume_id="vol-1", initiator_iqn=X))
    agent.UnexportVolume(pb.UnexportVolumeRequest(volume_id="vol-1", initiator_iqn=X))  # repeat: OK
    agent.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vol-1"))
    assert list(state(agent).volumes) == [] and list(state(agent).exports) == []


def test_attach_is_idempotent_and_detach_of_nothing_succeeds(agent):
    first = agent.AttachVolume(attach_request())
    assert first.device_path == "/dev/fake-vol-9"
    assert agent.AttachVolume(attach_request()) == first  # repeat: same device, no second connector call
    assert agent.connector.calls == [("attach", "vol-9")]
    attached = state(agent).attachments
    assert [(a.volume_id, a.device_path, a.mode) for a in attached] == [("vol-9", "/dev/fake-vol-9", "userspace")]
    code, _ = code_of(agent.AttachVolume, attach_request(mode="kernel"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # attached in another mode: detach first
    agent.DetachVolume(pb.DetachVolumeRequest(volume_id="vol-9"))
    agent.DetachVolume(pb.DetachVolumeRequest(volume_id="vol-9"))
    assert agent.connector.calls == [("attach", "vol-9"), ("detach", "vol-9")]
    assert list(state(agent).attachments) == []


@pytest.mark.parametrize("request_, field", [
    (pb.AttachVolumeRequest(), "export is required"),
    (attach_request(mode="nbd"), "mode 'nbd'"),
    (attach_request(chap_secret=""), "chap_user"),
    (attach_request(volume_id="Vol"), "export.volume_id"),
])
def test_bad_attach_arguments_are_invalid(agent, request_, field):
    code, details = code_of(agent.AttachVolume, request_)
    assert code == INVALID and field in details
    assert agent.connector.calls == []


def test_bad_portal_in_export_is_invalid(agent):
    request = attach_request()
    request.export.portals[:] = ["storage.example:3260"]
    code, details = code_of(agent.AttachVolume, request)
    assert code == INVALID and "portal" in details


@pytest.mark.parametrize("error, code", [
    (IdentityMismatch("LUN 0 is not volume vol-9"), grpc.StatusCode.FAILED_PRECONDITION),
    (TemporaryConnectorError("cannot reach"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
])
def test_connector_errors_map_through_the_one_table(agent, error, code):
    agent.connector.fail = error
    got, details = code_of(agent.AttachVolume, attach_request())
    assert got == code
    if code == grpc.StatusCode.INTERNAL:
        assert "a bug" not in details  # bugs are logged, not sent
    assert list(state(agent).attachments) == []


def test_every_agent_error_has_a_code():
    for cls in AgentError.__subclasses__():
        assert grpc_status(cls("x")) is not None, cls
    assert {code for _, code in GRPC_CODES} >= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}
    assert grpc_status(OSError(28, "No space left on device"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(KeyError("x")) is None


# ---------------------------------------------------------------------------- snapshots and clones


def test_snapshot_clone_and_their_rpcs(agent, tmp_path):
    """CreateSnapshot of an exported volume (its LUN held still on the portal's loop), GetSnapshot, a clone
    of the snapshot (CreateVolume with source_snapshot_id), GetVolume, GetState, DeleteSnapshot repeats."""
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=MiB, thin=True))
    agent.ExportVolume(pb.ExportVolumeRequest(volume_id="vol-1", initiator_iqn=X, chap_user="u", chap_secret=SECRET))
    snap = agent.CreateSnapshot(pb.CreateSnapshotRequest(snapshot_id="snap-1", volume_id="vol-1"))
    assert (snap.volume_id, snap.size_bytes, snap.state, snap.progress) == ("vol-1", MiB, "ready", 1.0)
    assert agent.CreateSnapshot(pb.CreateSnapshotRequest(snapshot_id="snap-1", volume_id="vol-1")) == snap
    assert agent.GetSnapshot(pb.GetSnapshotRequest(snapshot_id="snap-1")) == snap
    clone = agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-2", source_snapshot_id="snap-1", thin=True))
    assert (clone.size_bytes, clone.state) == (MiB, "ready")
    assert agent.GetVolume(pb.GetVolumeRequest(volume_id="vol-2")) == clone
    got = state(agent)
    assert [s.snapshot_id for s in got.snapshots] == ["snap-1"]
    assert [v.volume_id for v in got.volumes] == ["vol-1", "vol-2"]
    agent.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="snap-1"))
    agent.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="snap-1"))  # repeat: OK
    assert code_of(agent.GetSnapshot, pb.GetSnapshotRequest(snapshot_id="snap-1"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(agent.GetVolume, pb.GetVolumeRequest(volume_id="vol-9"))[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("request_, message", [
    (pb.CreateSnapshotRequest(volume_id="vol-1"), "snapshot_id is required"),
    (pb.CreateSnapshotRequest(snapshot_id="snap-1"), "volume_id is required"),
    (pb.CreateSnapshotRequest(snapshot_id="Snap", volume_id="vol-1"), "snapshot_id 'Snap'"),
])
def test_create_snapshot_validation(agent, request_, message):
    code, details = code_of(agent.CreateSnapshot, request_)
    assert code == INVALID and message in details


def test_snapshot_errors(agent):
    assert code_of(agent.CreateSnapshot, pb.CreateSnapshotRequest(snapshot_id="s", volume_id="vol-9"))[0] == \
        grpc.StatusCode.NOT_FOUND
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-1", size_bytes=MiB, thin=True))
    agent.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-3", size_bytes=MiB, thin=True))
    agent.CreateSnapshot(pb.CreateSnapshotRequest(snapshot_id="s", volume_id="vol-1"))
    assert code_of(agent.CreateSnapshot, pb.CreateSnapshotRequest(snapshot_id="s", volume_id="vol-3"))[0] == \
        grpc.StatusCode.ALREADY_EXISTS
    code, details = code_of(agent.CreateVolume, pb.CreateVolumeRequest(
        volume_id="vol-2", source_volume_id="vol-1", source_snapshot_id="s"))
    assert code == INVALID and "not both" in details
    assert code_of(agent.CreateVolume, pb.CreateVolumeRequest(volume_id="vol-2", source_snapshot_id="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND
