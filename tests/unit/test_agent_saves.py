"""Attachments whose save fails (disk full, EIO: the agent lives on), and exports kept unserved in the metrics.

A save that fails leaves the attachments in memory as they were before the call, as exports do
(``ExportManager._commit``): the call fails with an error that says to repeat it, and the repeat does the
whole operation again.  A login this call made is undone (the device was never handed out), so the
connector, the memory and the files agree.  Attachments run against the recording ``FakeConnector`` of
tests/unit/test_csi_attachments.py (our own boundary); the disk is failed at ``records.write_json`` (ours).
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from node_agent.agent import attachments as A
from node_agent.agent.attachments import RECORD_FILE, SECRETS_FILE, AttachmentManager
from node_agent.agent.errors import AgentError, grpc_status
from node_agent.agent.metrics import AgentCollector
from tests.unit.test_csi_attachments import EXPORT, SECRET, FakeConnector

OTHER_SECRET = "other-s3cret-43"


class Disk:
    """``write_json`` of the attachments, failing while ``failing`` is set (from the ``after``-th write on)."""

    def __init__(self, monkeypatch):
        self.real, self.writes = A.write_json, []
        self.failing: int | None = None  # errno
        self.after = 0
        monkeypatch.setattr(A, "write_json", self.write)

    def fail(self, code: int = errno.EIO, after: int = 0) -> None:
        self.failing, self.after, self.writes = code, after, []

    def heal(self) -> None:
        self.failing = None

    def write(self, path, data, **kwargs):
        self.writes.append(path)
        if self.failing is not None and len(self.writes) > self.after:
            raise OSError(self.failing, f"[Errno {self.failing}] {errno.errorcode[self.failing]}", path)
        return self.real(path, data, **kwargs)


@pytest.fixture
def env(tmp_path, monkeypatch):
    connector = FakeConnector()
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector, "kernel": lambda: connector})
    return manager, connector, Disk(monkeypatch), tmp_path


def _files(tmp_path) -> tuple[dict, dict]:
    """(volume id -> device path, volume id -> chap secret) as the files say."""
    records = json.loads((tmp_path / RECORD_FILE).read_text())["attachments"] \
        if (tmp_path / RECORD_FILE).exists() else {}
    secrets = json.loads((tmp_path / SECRETS_FILE).read_text())["credentials"] \
        if (tmp_path / SECRETS_FILE).exists() else {}
    return ({vid: r["device_path"] for vid, r in records.items()},
            {vid: s["chap_secret"] for vid, s in secrets.items()})


def _memory(manager) -> dict:
    return {r.volume_id: r.device_path for r in manager.list()}


def _save_failure(call, code=grpc.StatusCode.UNAVAILABLE) -> str:
    with pytest.raises(AgentError) as failed:
        call()
    status = grpc_status(failed.value)
    assert status is not None and status[0] == code
    assert "vol-1" in status[1] and "repeat" in status[1] and SECRET not in status[1]
    return status[1]


def test_a_detach_whose_save_fails_keeps_the_attachment_and_its_repeat_detaches(env):
    """The record used to leave memory before the save: the save failed, the file kept the record, and the
    repeated DetachVolume answered "not attached" (OK) with the record left on disk for the next restart."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    disk.fail()
    _save_failure(lambda: manager.detach("vol-1"))
    assert _memory(manager) == {"vol-1": ""} and _files(tmp_path) == ({"vol-1": ""}, {"vol-1": SECRET})
    disk.heal()
    assert manager.detach("vol-1") is True  # the repeat does it all
    assert _memory(manager) == {} and _files(tmp_path) == ({}, {}) and connector.calls == []


def test_a_detach_whose_second_save_fails_keeps_the_record_logged_out_and_its_repeat_forgets_it(env):
    """Logged in: the logout is saved, the record's removal is not; the repeat does what is left."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET)
    disk.fail(after=1)
    _save_failure(lambda: manager.detach("vol-1"))
    assert connector.calls == [("attach", "vol-1"), ("detach", "vol-1")]
    assert _memory(manager) == {"vol-1": ""} and _files(tmp_path) == ({"vol-1": ""}, {"vol-1": SECRET})
    disk.heal()
    assert manager.detach("vol-1") is True and len(connector.calls) == 2  # nothing left to log out
    assert _memory(manager) == {} and _files(tmp_path) == ({}, {})


def test_a_publish_whose_save_fails_records_nothing_and_its_repeat_records(env):
    manager, connector, disk, tmp_path = env
    disk.fail(errno.ENOSPC)
    _save_failure(lambda: manager.attach(EXPORT, SECRET, defer_login=True), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _memory(manager) == {} and manager.get("vol-1") is None
    assert manager.detach("vol-1") is False and connector.calls == []
    disk.heal()
    assert manager.attach(EXPORT, SECRET, defer_login=True) == ""
    assert _memory(manager) == {"vol-1": ""} and _files(tmp_path) == ({"vol-1": ""}, {"vol-1": SECRET})


def test_an_attach_whose_save_fails_undoes_its_login_and_its_repeat_attaches(env):
    """The record (logged in) used to stay in memory, the files not naming it: the repeat answered the device
    at once, and a restart forgot an attachment whose session lived on."""
    manager, connector, disk, tmp_path = env
    disk.fail()
    _save_failure(lambda: manager.attach(EXPORT, SECRET))
    assert connector.calls == [("attach", "vol-1"), ("detach", "vol-1")]  # the login made here is undone
    assert _memory(manager) == {} and _files(tmp_path) == ({}, {})
    disk.heal()
    assert manager.attach(EXPORT, SECRET) == "/dev/fake-vol-1"
    assert connector.calls[-1] == ("attach", "vol-1")
    assert _memory(manager) == {"vol-1": "/dev/fake-vol-1"}
    assert _files(tmp_path) == ({"vol-1": "/dev/fake-vol-1"}, {"vol-1": SECRET})


def test_a_login_whose_save_fails_is_undone_and_its_repeat_logs_in(env):
    """NodeStageVolume: the record stays published, not logged in, in memory as in the file."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    disk.fail()
    _save_failure(lambda: manager.login("vol-1"))
    assert connector.calls == [("attach", "vol-1"), ("detach", "vol-1")]
    assert _memory(manager) == {"vol-1": ""} and _files(tmp_path)[0] == {"vol-1": ""}
    disk.heal()
    assert manager.login("vol-1") == "/dev/fake-vol-1" and _files(tmp_path)[0] == {"vol-1": "/dev/fake-vol-1"}


def test_a_login_whose_save_fails_keeps_a_device_in_use(tmp_path, monkeypatch):
    """The undo never pulls a device from under a mount: it was there before this call (the connector's
    attach reused it), so it stays as it was."""
    connector, disk = FakeConnector(), Disk(monkeypatch)
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector}, in_use=lambda device: ["/mnt"])
    manager.attach(EXPORT, SECRET, defer_login=True)
    disk.fail()
    _save_failure(lambda: manager.login("vol-1"))
    assert connector.calls == [("attach", "vol-1")] and _memory(manager) == {"vol-1": ""}


def test_a_logout_whose_save_fails_keeps_the_login_recorded_and_its_repeat_logs_out(env):
    """The connector has logged out (that cannot be taken back); the record still says logged in, in memory as
    in the file, so the repeat (NodeUnstageVolume again) logs out again, which is idempotent, and saves."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET)
    disk.fail()
    _save_failure(lambda: manager.logout("vol-1"))
    assert connector.calls == [("attach", "vol-1"), ("detach", "vol-1")]
    assert _memory(manager) == {"vol-1": "/dev/fake-vol-1"} and _files(tmp_path)[0] == {"vol-1": "/dev/fake-vol-1"}
    disk.heal()
    assert manager.logout("vol-1") is True and connector.calls[-1] == ("detach", "vol-1")
    assert _memory(manager) == {"vol-1": ""} and _files(tmp_path)[0] == {"vol-1": ""}


def test_a_publish_with_new_credentials_whose_save_fails_keeps_the_old_ones(env):
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    disk.fail()
    _save_failure(lambda: manager.attach(EXPORT, OTHER_SECRET, defer_login=True))
    disk.heal()
    manager.login("vol-1")
    assert connector.chap == [("shoal-vol-1", SECRET)]  # memory kept what the file has
    assert _files(tmp_path)[1] == {"vol-1": SECRET}


def test_a_kernel_login_from_before_a_restart_whose_save_fails_is_not_undone(env):
    """A restored kernel record's session predates this call: the undo is only for a login the call made."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET, mode="kernel")
    restarted = AttachmentManager(str(tmp_path), {"kernel": lambda: connector})
    restarted.restore()
    connector.calls.clear()
    disk.fail()
    _save_failure(lambda: restarted.login("vol-1"))
    assert connector.calls == [("attach", "vol-1")]  # asked, not torn down
    disk.heal()
    assert restarted.login("vol-1") == "/dev/fake-vol-1" and connector.calls == [("attach", "vol-1")] * 2
    assert restarted.login("vol-1") == "/dev/fake-vol-1" and len(connector.calls) == 2  # confirmed: no more


def test_a_failed_cleanup_of_old_secrets_does_not_fail_a_saved_change(env, caplog):
    """The record is the commit point: once it is written the change is done; the secrets file then keeps a
    secret no record names, which the next save (or restore) drops."""
    manager, connector, disk, tmp_path = env
    manager.attach(EXPORT, SECRET, defer_login=True)
    manager.attach(replace(EXPORT, volume_id="vol-2"), OTHER_SECRET, defer_login=True)
    disk.fail(after=1)  # the record, then the cleanup of vol-1's secret fails
    with caplog.at_level(logging.WARNING, logger="shoal.agent.attachments"):
        assert manager.detach("vol-1") is True
    assert "vol-1" in caplog.text and SECRET not in caplog.text
    assert _memory(manager) == {"vol-2": ""} and _files(tmp_path) == ({"vol-2": ""}, {"vol-1": SECRET,
                                                                                        "vol-2": OTHER_SECRET})
    disk.heal()
    manager.logout("vol-2")  # nothing to log out: no save
    manager.attach(replace(EXPORT, volume_id="vol-2"), OTHER_SECRET, defer_login=True)
    assert _files(tmp_path) == ({"vol-2": ""}, {"vol-2": OTHER_SECRET})


def test_the_attach_rpc_answers_unavailable_when_the_save_fails(env):
    """Through AgentService: the controller retries UNAVAILABLE (controller/agents_grpc.py RETRY_CODES)."""
    from node_agent.agent.servicer import AgentServicer
    from protos.shoal.v1 import agent_pb2, common_pb2

    manager, connector, disk, tmp_path = env
    servicer = AgentServicer("node-a", None, None, manager, snapshots=object())  # attachments only

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code, details):
            self.code, self.details = code, details
            raise Aborted()

    request = agent_pb2.AttachVolumeRequest(
        export=common_pb2.ExportInfo(volume_id=EXPORT.volume_id, target_iqn=EXPORT.target_iqn,
                                     portals=list(EXPORT.portals), lun=EXPORT.lun, naa=EXPORT.naa,
                                     serial=EXPORT.serial, chap_user=EXPORT.chap_user),
        chap_secret=SECRET, mode="userspace")
    disk.fail()
    context = Context()
    with pytest.raises(Aborted):
        servicer.AttachVolume(request, context)
    assert context.code == grpc.StatusCode.UNAVAILABLE and "saving" in context.details
    disk.heal()
    assert servicer.AttachVolume(request, Context()).device_path == "/dev/fake-vol-1"


# ---- exports kept unserved: the metric


def test_the_metrics_show_an_export_kept_unserved(tmp_path):
    """``exports.unserved()`` used to be seen only in a log line: a disk mounted late left its exports
    unserved and nothing to alert on.  ``shoal_agent_exports_unserved{volume}`` is 1 for each."""
    from tests.unit.test_agent_exports import CHAP, MiB, X, Node
    from tests.unit.test_agent_records_review import _bring_back, _move_away

    node = Node(tmp_path)
    for volume_id in ("vol-1", "vol-2"):
        node.volumes.create(volume_id, 8 * MiB)
        node.exports.export(volume_id, X, CHAP)
    node.stop()
    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, node.port)
    try:
        node.exports.restore()
        registry = CollectorRegistry()
        agent = SimpleNamespace(portal=None, exports=node.exports, attachments=None, volumes=None)
        registry.register(AgentCollector(agent))
        value = registry.get_sample_value
        assert value("shoal_agent_exports") == 1
        assert value("shoal_agent_exports_unserved", {"volume": "vol-1"}) == 1
        assert value("shoal_agent_exports_unserved", {"volume": "vol-2"}) is None
        _bring_back(tmp_path)
        node.exports.export("vol-1", X, CHAP)  # the controller's repeat serves it
        assert value("shoal_agent_exports_unserved", {"volume": "vol-1"}) is None
        assert value("shoal_agent_exports") == 2
    finally:
        node.stop()
