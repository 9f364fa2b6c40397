"""AttachVolume/DetachVolume between two ``shoal agent`` processes on 127.0.0.1.

Agent A owns a volume and exports it to agent B's initiator IQN; B attaches it
through the userspace connector (Shoal's initiator, FUSE, a loop device),
which checks the LUN's VPD 0x83 NAA and 0x80 serial before handing the device
out (SPC-4 §7.8.6, §7.8.15).  What B writes to ``/dev/loopN`` lands in A's
backing file.  Needs root, /dev/fuse and loop devices (skipped otherwise).
"""

from __future__ import annotations

import os

import grpc
import pytest

from node_agent.agent.settings import IQN_PREFIX
from node_agent.iscsi.chap import initiator_secret
from protos.shoal.v1 import agent_pb2 as pb
from tests.conftest import require_loop_and_fuse
from tests.integration.conftest import running_agent, stub_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20
USER, SECRET = "attach-user", "attach-secret-0123"


def own(node: str) -> str:
    """The secret the controller gives ``node`` for an export made with SECRET (its own, chap.py)."""
    return initiator_secret(SECRET, f"{IQN_PREFIX}:node:{node}")


@pytest.fixture(autouse=True)
def _requirements():
    require_loop_and_fuse("losetup", "blockdev")


def test_a_volume_of_agent_a_attached_on_agent_b(tmp_path):
    with running_agent(tmp_path / "a", node_id="node-a") as (_, a_address, _), \
            running_agent(tmp_path / "b", node_id="node-b") as (b_process, b_address, _):
        a_channel, a = stub_for(a_address)
        b_channel, b = stub_for(b_address)
        with a_channel, b_channel:
            volume = a.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-shared", size_bytes=32 * MiB, thin=True))
            export = a.ExportVolume(pb.ExportVolumeRequest(
                volume_id="vol-shared", initiator_iqn=f"{IQN_PREFIX}:node:node-b", chap_user=USER,
                chap_secret=SECRET))

            # The wrong secret never yields a device.
            with pytest.raises(grpc.RpcError) as caught:
                b.AttachVolume(pb.AttachVolumeRequest(export=export, chap_secret="wrong-secret-0123"))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "wrong-secret" not in caught.value.details()

            # An export that claims another identity is refused before any device exists.
            forged = pb.AttachVolumeRequest(export=export, chap_secret=own("node-b"))
            forged.export.serial = "vol-other"
            with pytest.raises(grpc.RpcError) as caught:
                b.AttachVolume(forged)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "is not volume" in caught.value.details()
            assert list(b.GetState(pb.GetStateRequest()).attachments) == []

            device = b.AttachVolume(pb.AttachVolumeRequest(export=export, chap_secret=own("node-b"))).device_path
            try:
                assert device.startswith("/dev/loop")
                assert b.AttachVolume(pb.AttachVolumeRequest(export=export, chap_secret=own("node-b"))).device_path \
                    == device  # repeat: the same device
                state = b.GetState(pb.GetStateRequest())
                assert [(x.volume_id, x.device_path, x.mode) for x in state.attachments] == \
                    [("vol-shared", device, "userspace")]
                payload = b"written on node b".ljust(4096, b".")
                fd = os.open(device, os.O_WRONLY)
                try:
                    os.pwrite(fd, payload, 3 * MiB)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                b.DetachVolume(pb.DetachVolumeRequest(volume_id="vol-shared"))
            b.DetachVolume(pb.DetachVolumeRequest(volume_id="vol-shared"))  # repeat: OK
            assert list(b.GetState(pb.GetStateRequest()).attachments) == []
            with open(volume.path, "rb") as backing:
                backing.seek(3 * MiB)
                assert backing.read(4096) == payload
        assert SECRET not in b_process.log_path.read_text() and own("node-b") not in b_process.log_path.read_text()


def test_digests_between_agents(tmp_path):
    """``shoal agent --iscsi-header-digest CRC32C --iscsi-data-digest CRC32C`` on the owner: its export requires
    both digests. An agent with the default (None,CRC32C) attaches with them on (the owner's login line says
    so) and its data lands; an agent that allows no data digest (``--iscsi-data-digest None``) is refused
    with FAILED_PRECONDITION (the owner's log names the key), and no device is left behind."""
    required = ["--iscsi-header-digest", "CRC32C", "--iscsi-data-digest", "CRC32C"]
    with running_agent(tmp_path / "a", node_id="node-a", extra_args=required) as (a_process, a_address, _), \
            running_agent(tmp_path / "b", node_id="node-b") as (_, b_address, _), \
            running_agent(tmp_path / "c", node_id="node-c", extra_args=["--iscsi-data-digest", "None"]) \
            as (_, c_address, _):
        a_channel, a = stub_for(a_address)
        b_channel, b = stub_for(b_address)
        c_channel, c = stub_for(c_address)
        with a_channel, b_channel, c_channel:
            volume = a.CreateVolume(pb.CreateVolumeRequest(volume_id="vol-dd", size_bytes=32 * MiB, thin=True))
            for node in ("node-b", "node-c"):
                export = a.ExportVolume(pb.ExportVolumeRequest(
                    volume_id="vol-dd", initiator_iqn=f"{IQN_PREFIX}:node:{node}", chap_user=USER,
                    chap_secret=SECRET))

            with pytest.raises(grpc.RpcError) as caught:
                c.AttachVolume(pb.AttachVolumeRequest(export=export, chap_secret=own("node-c")))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
            assert list(c.GetState(pb.GetStateRequest()).attachments) == []

            device = b.AttachVolume(pb.AttachVolumeRequest(export=export, chap_secret=own("node-b"))).device_path
            try:
                payload = b"digested".ljust(4096, b"!")
                fd = os.open(device, os.O_WRONLY)
                try:
                    os.pwrite(fd, payload, MiB)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                b.DetachVolume(pb.DetachVolumeRequest(volume_id="vol-dd"))
            with open(volume.path, "rb") as backing:
                backing.seek(MiB)
                assert backing.read(4096) == payload
        log_text = a_process.log_path.read_text()
        assert "HeaderDigest=CRC32C DataDigest=CRC32C" in log_text, log_text
        assert "refused: DataDigest: none of 'None' is acceptable to us (CRC32C)" in log_text, log_text
