"""The agent's records across restarts and crashes (``exports.restore``, ``AttachmentManager._save``).

* An export whose volume is missing when the agent starts (its disk mounted
  late, its backing file moved away) keeps its record — ACL and CHAP — and is
  not served until the volume is there again; then the controller's repeat of
  the export (or the next restart) serves it as it was.
* Attachments save their CHAP credentials before the record that needs them:
  a crash between two writes leaves no record that cannot log in, and restore
  drops secrets no record names.

Exports run against a real portal (``Node`` of tests/unit/test_agent_exports.py); attachments
against the recording ``FakeConnector`` of tests/unit/test_csi_attachments.py (our own boundary).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

import pytest

from node_agent.agent.attachments import RECORD_FILE as ATTACH_RECORD, SECRETS_FILE as ATTACH_SECRETS
from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.errors import FailedPrecondition, NotFound
from node_agent.agent.exports import RECORD_FILE, SECRETS_FILE, refuse_if_exported
from node_agent.iscsi.initiator.core import LoginError
from tests.unit.test_agent_exports import CHAP, MiB, OTHER, PREFIX, X, Y, Node
from tests.unit.test_csi_attachments import EXPORT, SECRET, FakeConnector

# ---- exports: a volume missing at restart


def _move_away(tmp_path, volume_id: str) -> None:
    """The volume's files out of the disk (a disk not mounted yet, from the agent's point of view)."""
    (tmp_path / "away").mkdir(exist_ok=True)
    for name in os.listdir(tmp_path / "disk" / "volumes"):
        if name.startswith(volume_id + "."):
            os.rename(tmp_path / "disk" / "volumes" / name, tmp_path / "away" / name)


def _bring_back(tmp_path) -> None:
    for name in os.listdir(tmp_path / "away"):
        os.rename(tmp_path / "away" / name, tmp_path / "disk" / "volumes" / name)


def _recorded(tmp_path) -> tuple[dict, dict]:
    data = tmp_path / "data"
    return (json.loads((data / RECORD_FILE).read_text())["exports"],
            json.loads((data / SECRETS_FILE).read_text())["secrets"])


@pytest.fixture
def exported(tmp_path):
    """vol-1 exported to X and Y (data written), vol-2 to X; the agent stopped; returns the portal's port."""
    node = Node(tmp_path)
    for volume_id in ("vol-1", "vol-2"):
        node.volumes.create(volume_id, 8 * MiB)
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)
    node.exports.export("vol-2", X, CHAP)
    lun = node.login("vol-1", X)
    lun.pwrite(4096, b"kept" * 128)
    lun.close()
    node.stop()
    return node.port


def _check_served_as_before(node: Node) -> None:
    """vol-1 with its data, to both initiators of its kept ACL, with its kept CHAP only."""
    for initiator in (X, Y):
        lun = node.login("vol-1", initiator)
        try:
            assert lun.pread(4096, 512) == b"kept" * 128
        finally:
            lun.close()
    with pytest.raises(LoginError):
        node.login("vol-1", X, OTHER).close()


def test_an_export_whose_volume_is_missing_at_restart_keeps_its_record_and_is_served_once_it_is_back(
        tmp_path, exported, caplog):
    """restore() used to drop the record of an export whose volume it did not find: a disk mounted after the
    agent started came back with its ACL and CHAP lost for good."""
    before = _recorded(tmp_path)
    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, exported)
    try:
        with caplog.at_level(logging.WARNING, logger="shoal.agent.exports"):
            assert node.exports.restore() == ["vol-2"]
        assert "vol-1" in caplog.text and "missing" in caplog.text  # said clearly
        assert _recorded(tmp_path) == before  # the record and its secret are kept
        assert node.portal.served() == {f"{PREFIX}:vol-2"}  # ... but not served
        assert [e.volume_id for e in node.exports.list()] == ["vol-2"]  # GetState: not an export being served
        assert "missing" in node.exports.unserved()["vol-1"]
        with pytest.raises(FailedPrecondition):
            refuse_if_exported(node.exports, "vol-1")  # its ACL stays until an unexport (the controller's delete)
        with pytest.raises(NotFound):
            node.exports.export("vol-1", X, CHAP)  # the controller's reconcile: the volume is still missing
        assert _recorded(tmp_path) == before

        _bring_back(tmp_path)  # the disk is mounted
        info = node.exports.export("vol-1", X, CHAP)  # the reconcile's repeat, GetState lacking it
        assert info.target_iqn in node.portal.served() and node.exports.unserved() == {}
        assert [e.volume_id for e in node.exports.list()] == ["vol-1", "vol-2"]
        _check_served_as_before(node)
        assert _recorded(tmp_path) == before
    finally:
        node.stop()


def test_a_kept_export_is_served_by_the_next_restart_once_its_volume_is_back(tmp_path, exported):
    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, exported)
    try:
        assert node.exports.restore() == ["vol-2"]
    finally:
        node.stop()
    _bring_back(tmp_path)
    node = Node(tmp_path, exported)
    try:
        assert node.exports.restore() == ["vol-1", "vol-2"]
        _check_served_as_before(node)
    finally:
        node.stop()


def test_an_export_that_fails_to_serve_at_restart_is_kept_too(tmp_path, exported, monkeypatch):
    before = _recorded(tmp_path)
    node = Node(tmp_path, exported)
    real = node.portal.add_target

    def failing(iqn, spec, **kwargs):
        if iqn.endswith(":vol-1"):
            raise OSError("I/O error opening the backing file")
        return real(iqn, spec, **kwargs)
    monkeypatch.setattr(node.portal, "add_target", failing)
    try:
        assert node.exports.restore() == ["vol-2"]
        assert "I/O error" in node.exports.unserved()["vol-1"] and _recorded(tmp_path) == before
        monkeypatch.setattr(node.portal, "add_target", real)
        node.exports.export("vol-1", Y, CHAP)
        _check_served_as_before(node)
    finally:
        node.stop()


def test_a_kept_export_follows_fence_and_unexport_while_its_volume_is_missing(tmp_path, exported):
    """A fenced initiator must not come back with the disk; an export the controller removed must not either."""
    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, exported)
    try:
        node.exports.restore()
        volume_ids, _ = node.exports.fence(Y)
        assert sorted(volume_ids) == ["vol-1"]  # vol-2 admits X only
        assert _recorded(tmp_path)[0]["vol-1"]["initiators"] == [X]
        _bring_back(tmp_path)
        node.exports.export("vol-1", X, CHAP)
        with pytest.raises(LoginError):
            node.login("vol-1", Y).close()
        node.login("vol-1", X).close()
    finally:
        node.stop()

    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, exported)
    try:
        node.exports.restore()
        assert node.exports.unexport("vol-1", X) is True  # its last initiator: the record goes
        assert "vol-1" not in _recorded(tmp_path)[0] and "vol-1" not in _recorded(tmp_path)[1]
        assert not node.exports.is_exported("vol-1") and node.exports.unserved() == {}
    finally:
        node.stop()
    _bring_back(tmp_path)
    node = Node(tmp_path, exported)
    try:
        assert node.exports.restore() == ["vol-2"]
    finally:
        node.stop()


def test_a_kept_export_may_be_unexported_from_one_of_its_initiators(tmp_path, exported):
    _move_away(tmp_path, "vol-1")
    node = Node(tmp_path, exported)
    try:
        node.exports.restore()
        assert node.exports.unexport("vol-1", Y) is True  # no target to change: the record only
        assert _recorded(tmp_path)[0]["vol-1"]["initiators"] == [X]
        node.exports.capacity_changed("vol-1", 16 * MiB)  # not served: nothing to resize, no error
        assert node.exports.quiesced("vol-1", lambda: "ran") == "ran"
    finally:
        node.stop()


# ---- attachments: a crash between the writes of the record and of its secrets


class Crash(BaseException):
    """The process dies here: this write and every later one never happen."""


def _crash_at_write(monkeypatch, n: int) -> None:
    from node_agent.agent import attachments as A

    real, calls = A.write_json, []

    def writes(path, data, **kwargs):
        calls.append(path)
        if len(calls) >= n:
            raise Crash(f"crashed at write {n} ({os.path.basename(path)})")
        return real(path, data, **kwargs)
    monkeypatch.setattr(A, "write_json", writes)


def _restart(tmp_path) -> tuple[AttachmentManager, FakeConnector]:
    connector = FakeConnector()
    manager = AttachmentManager(str(tmp_path), {"userspace": lambda: connector})
    manager.restore()
    return manager, connector


def _check_nothing_or_usable(tmp_path) -> list[str]:
    """After the restart: every record logs in with its secret, and no secret is kept without a record."""
    manager, connector = _restart(tmp_path)
    volume_ids = [r.volume_id for r in manager.list()]
    for volume_id in volume_ids:
        assert manager.login(volume_id) == f"/dev/fake-{volume_id}"
    assert connector.chap == [("shoal-vol-1", SECRET)] * len(volume_ids)
    path = tmp_path / ATTACH_SECRETS
    secrets = json.loads(path.read_text())["credentials"] if path.exists() else {}
    assert sorted(secrets) == sorted(volume_ids)
    return volume_ids


def _publish(manager):
    manager.attach(EXPORT, SECRET, defer_login=True)


def _attach(manager):
    manager.attach(EXPORT, SECRET)


def _detach(manager):
    manager.detach("vol-1")


@pytest.mark.parametrize("action, before", [(_publish, False), (_attach, False), (_detach, True)])
@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_between_the_writes_leaves_no_record_without_its_credentials(tmp_path, monkeypatch, action,
                                                                             before, crash_at):
    """The record used to be written before its secrets: a crash in between left a published volume that the
    restarted agent could not log in to ("its CHAP credentials are not known here any more")."""
    if before:
        manager, _ = _restart(tmp_path)
        manager.attach(EXPORT, SECRET, defer_login=True)
    manager, _ = _restart(tmp_path)
    _crash_at_write(monkeypatch, crash_at)
    try:
        action(manager)
    except Crash:
        pass
    monkeypatch.undo()
    assert _check_nothing_or_usable(tmp_path) in ([], ["vol-1"])


def test_restore_drops_secrets_no_record_names_and_keeps_a_record_without_them(tmp_path, caplog):
    """Files from before the order was fixed: a record without its secret stays (a kernel session may be live
    and detach needs it) and says what repairs it; a repeated publish with the credentials does."""
    (tmp_path / ATTACH_RECORD).write_text(json.dumps({"attachments": {"vol-1": {
        "device_path": "", "mode": "userspace",
        "export": {**asdict(EXPORT), "portals": list(EXPORT.portals)}}}}))
    (tmp_path / ATTACH_SECRETS).write_text(json.dumps({"credentials": {"vol-9": {
        "chap_secret": "orphan-secret-1", "mutual_chap_user": "", "mutual_chap_secret": ""}}}))
    with caplog.at_level(logging.WARNING, logger="shoal.agent.attachments"):
        manager, _ = _restart(tmp_path)
    assert "orphan-secret-1" not in (tmp_path / ATTACH_SECRETS).read_text()
    assert "vol-1" in caplog.text and "publish it again" in caplog.text
    with pytest.raises(FailedPrecondition):
        manager.login("vol-1")
    manager.attach(EXPORT, SECRET, defer_login=True)  # the controller's repeat of the publish
    assert manager.login("vol-1") == "/dev/fake-vol-1"
