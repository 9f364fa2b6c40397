"""``shoal agent`` as a real process: AgentService over gRPC, exports reached with real initiators.

The walk of agent.proto's volume life: create → export to one initiator with
CHAP (RFC 7143 §12.1.3) → its identity in VPD 0x80/0x83 (SPC-4 §7.8.6,
§7.8.15) → another initiator refused → expand (CAPACITY DATA HAS CHANGED,
SBC-3 §4.6) → the agent killed and restarted: the export serves again before
any RPC, and a session held across the restart resumes → unexport → delete.
Bad arguments get INVALID_ARGUMENT and change nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import grpc
import pytest

from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.initiator.blockdev import SyncLun
from node_agent.iscsi.initiator.client import ClientSettings
from node_agent.scsi.vpd import LunIdentity
from node_agent.iscsi.initiator.core import LoginError
from protos.shoal.v1 import agent_pb2 as pb
from tests.integration.conftest import running_agent, stub_for

MiB = 1 << 20
X = "iqn.2026-11.io.shoal.test:consumer-x"
Y = "iqn.2026-11.io.shoal.test:consumer-y"
USER, SECRET = "vol-int-user", "int-secret-0123456789"
VOLUME = "vol-int"


def login(portal: str, target_iqn: str, initiator: str, secret: str | None = None, **settings) -> SyncLun:
    """A login as ``initiator`` with ``secret``, by default the one the controller would give it (chap.py)."""
    secret = initiator_secret(SECRET, initiator) if secret is None else secret
    host, _, port = portal.rpartition(":")
    options = dict(initiator_iqn=initiator, login_timeout=5.0)
    options.update(settings)
    return SyncLun(host, int(port), target_iqn, 0, settings=ClientSettings(**options), chap=(USER, secret))


def iscsi_inq(portal: str, target_iqn: str, initiator: str, *args: str) -> subprocess.CompletedProcess:
    url = f"iscsi://{USER}%{initiator_secret(SECRET, initiator)}@{portal}/{target_iqn}/0"
    result = subprocess.run(["iscsi-inq", "-i", initiator, *args, url], capture_output=True, timeout=30)
    result.stdout = result.stdout.decode(errors="replace")
    result.stderr = result.stderr.decode(errors="replace")
    return result


def invalid(call, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


@pytest.mark.timeout(180)
def test_agent_process_volume_life_across_a_restart(tmp_path):
    have_inq = shutil.which("iscsi-inq") is not None
    identity = LunIdentity(volume_id=VOLUME)
    with running_agent(tmp_path) as (process, agent_address, portal):
        channel, stub = stub_for(agent_address)
        with channel:
            created = stub.CreateVolume(pb.CreateVolumeRequest(volume_id=VOLUME, size_bytes=64 * MiB, thin=True))
            assert created.size_bytes == 64 * MiB and created.disk == "data0"
            info = stub.ExportVolume(pb.ExportVolumeRequest(volume_id=VOLUME, initiator_iqn=X, chap_user=USER,
                                                            chap_secret=SECRET))
            assert (info.naa, info.serial, info.lun, list(info.portals)) == (identity.naa.hex(), VOLUME, 0, [portal])

            if have_inq:  # a real third-party initiator: the serial, the designators, the ACL
                seen = iscsi_inq(portal, info.target_iqn, X, "-e", "1", "-c", "128")
                assert seen.returncode == 0, seen.stderr
                assert f"Unit Serial Number:[{VOLUME}]" in seen.stdout
                refused = iscsi_inq(portal, info.target_iqn, Y)
                assert refused.returncode != 0 and "Authorization failure" in refused.stderr

            lun = login(portal, info.target_iqn, X)
            assert lun.identity() == (info.naa, VOLUME)
            lun.pwrite(MiB, b"before restart" * 64)
            lun.flush()
            with pytest.raises(LoginError):
                login(portal, info.target_iqn, Y).close()

            grown = stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=VOLUME, size_bytes=128 * MiB))
            assert grown.size_bytes == 128 * MiB
            assert lun.pread(MiB, 64) == (b"before restart" * 64)[:64]
            assert (0x6, 0x2A, 0x09) in lun.client.unit_attentions  # CAPACITY DATA HAS CHANGED
            capacity = lun._call(lun.device.read_capacity())
            assert capacity.bytes == 128 * MiB

            bad = [
                (stub.CreateVolume, pb.CreateVolumeRequest(volume_id="Bad Id", size_bytes=MiB)),
                (stub.CreateVolume, pb.CreateVolumeRequest(volume_id="vol-x", size_bytes=1)),
                (stub.ExpandVolume, pb.ExpandVolumeRequest(volume_id=VOLUME, size_bytes=0)),
                (stub.ExportVolume, pb.ExportVolumeRequest(volume_id=VOLUME, initiator_iqn="nope",
                                                           chap_user=USER, chap_secret=SECRET)),
                (stub.ExportVolume, pb.ExportVolumeRequest(volume_id=VOLUME, initiator_iqn=Y)),
                (stub.UnexportVolume, pb.UnexportVolumeRequest(volume_id=VOLUME, initiator_iqn="")),
                (stub.DeleteVolume, pb.DeleteVolumeRequest(volume_id="")),
                (stub.DetachVolume, pb.DetachVolumeRequest(volume_id=VOLUME, mode="floppy")),
            ]
            before = stub.GetState(pb.GetStateRequest())
            for call, request in bad:
                details = invalid(call, request)
                assert SECRET not in details
            after = stub.GetState(pb.GetStateRequest())
            assert list(after.volumes) == list(before.volumes) and list(after.exports) == list(before.exports)

        # SIGKILL: no clean shutdown, the record on disk is all the next process has.
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        log_text = process.log_path.read_text()
        assert SECRET not in log_text

    with running_agent(tmp_path, listen=agent_address, portal=portal) as (process, agent_address, portal2):
        assert portal2 == portal
        # Before any RPC: the export is back, a new login works and the held session resumes.
        fresh = login(portal, info.target_iqn, X)
        try:
            assert fresh.identity() == (info.naa, VOLUME)
            assert fresh.size == 128 * MiB
            assert fresh.pread(MiB, 14 * 64) == b"before restart" * 64
        finally:
            fresh.close()
        assert lun.pread(MiB, 14) == b"before restart"  # reconnected by the initiator
        lun.pwrite(2 * MiB, b"after restart" * 40, fua=True)
        lun.close()
        with pytest.raises(LoginError):
            login(portal, info.target_iqn, Y).close()

        channel, stub = stub_for(agent_address)
        with channel:
            state = stub.GetState(pb.GetStateRequest())
            assert [e.target_iqn for e in state.exports] == [info.target_iqn]
            stub.UnexportVolume(pb.UnexportVolumeRequest(volume_id=VOLUME, initiator_iqn=X))
            stub.UnexportVolume(pb.UnexportVolumeRequest(volume_id=VOLUME, initiator_iqn=X))
            with pytest.raises(LoginError):
                login(portal, info.target_iqn, X).close()
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=VOLUME))
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=VOLUME))
            state = stub.GetState(pb.GetStateRequest())
            assert list(state.volumes) == [] and list(state.exports) == []
            assert not (tmp_path / "disk0" / "volumes" / f"{VOLUME}.img").exists()
        assert SECRET not in process.log_path.read_text()
