"""CSI Node service: the Node findings (4-9) of the CSI driver review, one regression test or more each.

The same environment as tests/unit/test_csi_node.py (its ``env`` fixture: a real gRPC server on a unix socket,
``FakeAttachments`` at our own ``AttachedVolumes`` boundary, real mkfs/mount/losetup through the command runner;
root needed for the tests with devices, skipped otherwise).  Each docstring names the finding and the rule it
checks (the CSI spec's RPC error tables where there is one).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import grpc
import pytest

from node_agent.csi.devices import DeviceResolver
from node_agent.csi.mounts import Mounter
from node_agent.csi.node import BLOCK_STAGE_MARKER, NodeServicer
from node_agent.csi.server import build_csi_node_server
from node_agent.host.runner import SubprocessRunner
from protos.csi.v1 import csi_pb2, csi_pb2_grpc
import test_csi_node
from test_csi_node import VOL, Code, Mode, block_cap, mount_cap, needs_root

env = test_csi_node.env  # the fixture


def answer(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """The gRPC code a call answers (OK when it returns) and its details."""
    try:
        call(*args, **kw)
        return Code.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def mounted_under(env) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(env.dir + "/")]


# -- 4: no journal-less writable mount ------------------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("flag", ["noload", "norecovery"])
def test_4_a_stage_never_takes_the_journal_replay_flags(env, flag):
    """Finding 4: ``noload``/``norecovery`` as a mount flag mounted ext4 writable without its journal (mountinfo:
    ``rw,norecovery``).  They are the plugin's own for a read-only stage: INVALID_ARGUMENT, nothing logged in or
    mounted; a read-only stage still gets ``noload`` from the plugin."""
    loop = env.attach_loop()
    code, details = answer(env.stage, loop, mount_cap(flags=[flag]))
    assert code == Code.INVALID_ARGUMENT and "journal" in details
    assert env.attachments.calls == [] and env.runner.calls == [] and mounted_under(env) == []
    env.stage(loop)  # formats; then the read-only stage of it, with the plugin's own noload
    env.unstage()
    env.stage(loop, mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY))
    assert "norecovery" in env.servicer.mounter.mounted_at(env.staging).super_options  # how ext4 shows noload
    env.unstage()


# -- 5: mount(8)'s user options ---------------------------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("flag", ["user", "users", "owner", "group"])
def test_5_user_mount_options_are_refused_and_their_flags_repeat_ok(env, flag):
    """Finding 5: ``user`` (and ``users``, ``owner``, ``group``) made mount(8) add nosuid,nodev(,noexec), so the
    identical repeat of an OK stage answered ALREADY_EXISTS (CSI: NodeStageVolume MUST be idempotent).  They
    are refused (INVALID_ARGUMENT, at every repeat); the flags they stood for, asked for themselves, stage and
    repeat OK."""
    loop = env.attach_loop()
    for _ in range(2):
        code, details = answer(env.stage, loop, mount_cap(flags=[flag]))
        assert code == Code.INVALID_ARGUMENT and "mount(8)" in details
    assert env.attachments.calls == [] and mounted_under(env) == []
    implied = ["nosuid", "nodev", "noexec"]
    env.stage(loop, mount_cap(flags=implied))
    env.stage(loop, mount_cap(flags=implied))
    env.unstage()


# -- 6: a mount stage where a block stage is ------------------------------------------------------------------------
def restarted(env):
    """A new NodeServicer (as after an agent restart) over the same attachments, served on its own socket: the
    stub and a function that stops it."""
    servicer = NodeServicer("node-a", {"zone": "a"}, DeviceResolver(env.attachments), Mounter(SubprocessRunner()))
    endpoint = f"unix://{env.dir}/restarted.sock"
    server = build_csi_node_server(servicer, endpoint)
    channel = grpc.insecure_channel(endpoint)

    def stop():
        channel.close()
        server.stop(None).wait(5)
    return csi_pb2_grpc.NodeStub(channel), stop


@needs_root
def test_6_a_mount_stage_at_a_block_staging_path_is_already_exists(env):
    """Finding 6, CSI NodeStageVolume: "Volume published but is incompatible: 6 ALREADY_EXISTS".  A block stage
    mounted nothing and left no trace, so a mount stage at the same staging path formatted and mounted the
    device.  Now the block stage leaves a marker: the mount stage is ALREADY_EXISTS (nothing formatted or
    mounted), also for a NodeServicer started afresh (an agent restart); the block repeat is OK; NodeUnstage
    removes the marker, after which the path can be staged with mount access."""
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    env.stage(loop, block_cap())
    marker = os.path.join(env.staging, BLOCK_STAGE_MARKER)
    with open(marker) as f:
        assert f.read() == VOL
    code, details = answer(env.stage, loop, mount_cap())
    assert code == Code.ALREADY_EXISTS and "block access" in details
    node, stop = restarted(env)
    try:
        request = csi_pb2.NodeStageVolumeRequest(volume_id=VOL, staging_target_path=env.staging,
                                                 volume_capability=mount_cap(), publish_context=env.context(loop))
        assert answer(node.NodeStageVolume, request)[0] == Code.ALREADY_EXISTS
    finally:
        stop()
    assert env.runner.ran("mkfs.ext4") == [] and mounted_under(env) == []
    assert env.servicer.mounter.fs_type(loop) == ""  # still blank: never formatted
    env.unstage()
    assert not os.path.exists(marker)
    env.unstage()
    env.stage(loop, mount_cap())  # unstaged: a stage with mount access is the first there
    code, details = answer(env.stage, loop, block_cap())
    assert code == Code.ALREADY_EXISTS  # the reverse order, as before
    env.unstage()
    assert mounted_under(env) == []


@needs_root
def test_6_unstage_of_another_volume_leaves_the_marker(env):
    """The marker names its volume: an unstage of another volume at that path leaves it (as it leaves another
    volume's staging mount), and a block stage of another volume there is ALREADY_EXISTS."""
    loop = env.attach_loop()
    env.stage(loop, block_cap())
    other = env.attach_loop("vol-other")
    marker = os.path.join(env.staging, BLOCK_STAGE_MARKER)
    assert answer(env.stage, other, block_cap(), volume_id="vol-other")[0] == Code.ALREADY_EXISTS
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="vol-other",
                                                                staging_target_path=env.staging))
    assert os.path.exists(marker)
    env.unstage()
    assert not os.path.exists(marker)


# -- 7: a publish compares the staged filesystem and mount flags ---------------------------------------------------
@needs_root
def test_7_a_publish_unlike_the_staged_filesystem_is_refused(env):
    """Finding 7, CSI NodePublishVolume: "Volume published but is incompatible: 6 ALREADY_EXISTS".  With ext4
    staged, a repeated publish asking for xfs, or for other mount flags (those mountinfo shows), answered OK.
    Now ALREADY_EXISTS; the identical repeat is OK; and a first publish at another target asking for what is
    not staged is FAILED_PRECONDITION (otherwise its own identical repeat would be ALREADY_EXISTS)."""
    loop = env.attach_loop()
    cap = mount_cap(flags=["noatime"])
    env.stage(loop, cap)
    env.publish(loop, cap)
    env.publish(loop, cap)
    for other in (mount_cap(fs_type="xfs", flags=["noatime"]), mount_cap(flags=["noatime", "noexec"]),
                  mount_cap()):
        code, details = answer(env.publish, loop, other)
        assert code == Code.ALREADY_EXISTS, (other, details)
    second = os.path.join(env.dir, "pods", "pod-2", VOL)
    code, details = answer(env.publish, loop, mount_cap(fs_type="xfs", flags=["noatime"]), target_path=second)
    assert code == Code.FAILED_PRECONDITION and "xfs" in details
    assert env.servicer.mounter.mounted_at(second) is None
    env.unpublish()
    env.unstage()


# -- 8: stats of a volume this node does not know ---------------------------------------------------------------------
@needs_root
def test_8_stats_of_an_unknown_volume_is_not_found(env):
    """Finding 8, CSI NodeGetVolumeStats: "Volume does not exist: 5 NOT_FOUND".  A volume id this node has no
    record of, asked at another volume's target, answered OK with that volume's usage."""
    loop = env.attach_loop()
    env.stage(loop)
    env.publish(loop)
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-unknown", volume_path=env.target)
    assert answer(env.node.NodeGetVolumeStats, request)[0] == Code.NOT_FOUND
    assert not env.stats(env.target).volume_condition.abnormal  # VOL's own answer
    env.unpublish()
    env.unstage()


# -- 9: a damaged ext4 at stage ------------------------------------------------------------------------------------------
@needs_root
@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs) to damage the test's ext4")
def test_9_a_damaged_ext4_is_failed_precondition_not_internal(env):
    """Finding 9: ``dumpe2fs -h`` (the size check before a writable mount) failing on a damaged ext4 answered
    INTERNAL.  Now FAILED_PRECONDITION with its message, as a failed mount is; nothing mounted, and the
    stage's login undone."""
    loop = env.attach_loop()
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
    # the journal inode's checksum no longer matches: blkid still says ext4, dumpe2fs -h fails
    subprocess.run(["debugfs", "-w", "-R", "sif <8> checksum 0x1234", loop], check=True, capture_output=True)
    code, details = answer(env.stage, loop)
    assert code == Code.FAILED_PRECONDITION and "checksum" in details, details
    assert env.runner.ran("dumpe2fs") and mounted_under(env) == []
    assert env.attachments.calls[-1] == ("logout", VOL)
