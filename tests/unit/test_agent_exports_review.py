"""Review of the agent's exports, attachments and portal fence: iSCSI names compared as the target compares them
(RFC 7143 §4.2.7.2, case-blind), the records' temporary files and damaged records at start, and a start whose
rewrite of the records fails.  A real portal on 127.0.0.1 (``test_agent_exports.Node``), stopped by each test."""

from __future__ import annotations

import errno
import json
import os

import pytest

from node_agent.agent import attachments as attachments_module
from node_agent.agent import exports as exports_module
from node_agent.agent.attachments import AttachmentManager
from node_agent.agent.exports import RECORD_FILE, SECRETS_FILE
from node_agent.agent.portal import PortalThread
from node_agent.agent.records import CorruptRecord
from node_agent.scsi.result import Nexus
from node_agent.target_service import LunSpec, PortalConfig
from tests.unit.test_agent_exports import CHAP, MiB, Node, X, Y
from tests.unit.test_scsi_reservations import K1, K2, REGISTER, keys, prout
from tests.unit.test_scsi_support import run

X_CASE = X.replace("node-x", "NODE-X")  # X's own name, its unique part in upper case: the same iSCSI name


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path)
    node.volumes.create("vol-1", 8 * MiB)
    yield node
    node.stop()


def _registered(unit, name: str, isid: int, key: int) -> Nexus:
    nexus = Nexus(f"{name},i,0x{isid:012x}", "iqn.2026-11.io.shoal.test:t,t,0x0001")
    unit.add_nexus(nexus)
    run(unit, bytes(6), nexus=nexus)  # past POWER ON RESET
    prout(unit, REGISTER, sark=key, nexus=nexus)
    return nexus


def test_a_fence_removes_the_registrations_made_under_the_name_in_another_case(tmp_path):
    """A registration records the name as the login spelled it; a fence of the same name in another case left
    it (and the reservation key of a fenced node) in place.  Another initiator's registration stays."""
    path = tmp_path / "lun.img"
    path.write_bytes(bytes(MiB))
    iqn = "iqn.2026-11.io.shoal.test:target:fence-case"
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    portal.start()
    try:
        portal.add_target(iqn, LunSpec(str(path)), chap=None, mutual_chap=None, allowed_initiators=[X_CASE, Y])
        unit = portal.service.registry.targets[iqn].luns.luns[0]
        portal.call(lambda: (_registered(unit, X_CASE, 1, K1), _registered(unit, Y, 2, K2)))
        assert portal.call(lambda: keys(unit))[1] == [K1, K2]
        result = portal.fence_initiator(X, timeout=5)
        assert result.targets == (iqn,) and result.registrations_removed == 1
        assert portal.call(lambda: keys(unit))[1] == [K2]
        assert portal.call(lambda: portal.service.registry.targets[iqn].allowed_initiators) == frozenset({Y})
    finally:
        portal.stop()


class _Running:
    """A closed connection whose commands still run on a worker (``in_flight``: what ``PortalThread`` asks)."""

    def __init__(self, commands: int):
        self.commands = commands

    def in_flight(self) -> int:
        return self.commands


def test_a_repeated_fence_in_another_spelling_waits_for_what_the_first_left_running(tmp_path):
    """The connections a timed-out wait left were kept under the name as spelled: a repeat of the fence (or an
    unexport) spelling it in another case found nothing to wait for and answered at once, writes still to land."""
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    portal.start()
    try:
        running = _Running(2)
        with pytest.raises(TimeoutError):
            portal._drain(X, [running], 0.05)
        with pytest.raises(TimeoutError):
            portal.drain(X_CASE, timeout=0.05)
        running.commands = 0
        assert portal.drain(X_CASE, timeout=5) == 0 and portal._draining == {}
    finally:
        portal.stop()


def _admits(node, name: str) -> bool:
    target = node.portal.call(lambda: node.portal.service.registry.targets.get(node.exports.target_iqn("vol-1")))
    return target is not None and node.portal.call(target.admits, name)


def test_an_export_unexport_or_fence_names_the_initiator_in_any_case(node):
    """The ACL admits a name in any case; the record compared names exactly: a repeat export in another case
    added a second entry, and an unexport in another case found nothing (answered False, the node still
    admitted)."""
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", X_CASE, CHAP)  # a repeat: nothing to add
    assert [r.initiators for r in node.exports.records()] == [(X,)]
    assert node.exports.unexport("vol-1", X_CASE) is True
    assert not node.exports.is_exported("vol-1") and not _admits(node, X)


def test_a_fence_drops_every_spelling_so_the_next_acl_change_or_restart_does_not_admit_it_again(tmp_path):
    """A record holding the initiator under two spellings (written before names compared case-blind): the
    portal's fence cut both from the ACL, the record kept the other one, and the next export to another node,
    or the next restart, set the ACL from the record: the fenced node admitted again."""
    data = tmp_path / "data"
    data.mkdir()
    (data / SECRETS_FILE).write_text(json.dumps({"secrets": {"vol-1": {"chap": CHAP.secret, "mutual_chap": ""}}}))
    (data / RECORD_FILE).write_text(json.dumps({"exports": {"vol-1": {
        "initiators": [X, X_CASE], "chap_user": CHAP.user, "mutual_chap_user": ""}}}))
    node = Node(tmp_path)
    try:
        node.volumes.create("vol-1", 8 * MiB)
        assert node.exports.restore() == ["vol-1"] and _admits(node, X)
        assert node.exports.fence(X)[0] == ["vol-1"]
        node.exports.export("vol-1", Y, CHAP)
        assert _admits(node, Y) and not _admits(node, X)
        assert [r.initiators for r in node.exports.records()] == [(Y,)]
    finally:
        node.stop()
    node = Node(tmp_path)
    try:
        assert node.exports.restore() == ["vol-1"]
        assert _admits(node, Y) and not _admits(node, X)
    finally:
        node.stop()


def test_restore_removes_the_temporary_files_of_its_records_and_nothing_else(node):
    """A crash during a record write leaves ``<record>.tmp``; the start removed none of them (a secrets file's,
    with CHAP secrets in it, stayed for good).  The records themselves, and other files, are left alone."""
    node.exports.export("vol-1", X, CHAP)
    data = node.tmp_path / "data"
    records = {name: (data / name).read_bytes() for name in (RECORD_FILE, SECRETS_FILE)}
    ours = [RECORD_FILE, SECRETS_FILE, attachments_module.RECORD_FILE, attachments_module.SECRETS_FILE]
    for name in ours:
        (data / f"{name}.tmp").write_text('{"cut": ')
    (data / "unrelated.tmp").write_text("not ours")
    node.stop()
    again = Node(node.tmp_path)
    try:
        assert again.exports.restore() == ["vol-1"]
        AttachmentManager(str(data), {}).restore()
        assert not [name for name in ours if os.path.exists(data / f"{name}.tmp")]
        assert (data / "unrelated.tmp").read_text() == "not ours"
        assert {name: (data / name).read_bytes() for name in records} == records
    finally:
        again.stop()


def test_a_start_on_a_full_data_directory_serves_the_exports_and_keeps_the_attachments(node, monkeypatch):
    """Restore writes its records again at the end (to drop what it dropped); on a full (or read-only) data
    directory that write failed and the agent did not start: every export served, then torn down."""
    node.exports.export("vol-1", X, CHAP)
    data = node.tmp_path / "data"
    (data / attachments_module.RECORD_FILE).write_text(json.dumps({"attachments": {"vol-2": {
        "device_path": "/dev/sdq", "mode": "kernel", "export": dict(node.exports.info("vol-1", "u").__dict__,
                                                                    volume_id="vol-2", portals=["127.0.0.1:3260"])}}}))
    node.stop()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exports_module, "write_json", full)
    monkeypatch.setattr(attachments_module, "write_json", full)
    again = Node(node.tmp_path)
    try:
        assert again.exports.restore() == ["vol-1"]
        assert again.exports.target_iqn("vol-1") in again.portal.served()
        manager = AttachmentManager(str(data), {})
        manager.restore()
        assert [(r.volume_id, r.device_path) for r in manager.list()] == [("vol-2", "/dev/sdq")]
    finally:
        again.stop()


_EXPORT = {"volume_id": "vol-1", "target_iqn": "iqn.2026-11.io.shoal.test:t:vol-1", "portals": ["127.0.0.1:3260"],
           "lun": 0, "naa": "6" + "0" * 31, "serial": "vol-1", "chap_user": "u"}


@pytest.mark.parametrize("name, content", [
    (attachments_module.RECORD_FILE, []),
    (attachments_module.RECORD_FILE, {"attachments": []}),
    (attachments_module.RECORD_FILE, {"attachments": {"vol-1": {"mode": "kernel"}}}),
    (attachments_module.RECORD_FILE, {"attachments": {"vol-1": {"device_path": "", "mode": "kernel",
                                                                "export": dict(_EXPORT, lun="zero")}}}),
    (attachments_module.SECRETS_FILE, {"credentials": {"vol-1": {"chap": "x"}}}),
])
def test_a_damaged_attachment_record_is_named_at_start(tmp_path, name, content):
    """A record that is not what the agent writes stopped the start with a bare KeyError, AttributeError or
    TypeError naming no file; now ``CorruptRecord`` (a ValueError: the CLI says it without a traceback)."""
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(CorruptRecord) as caught:
        AttachmentManager(str(tmp_path), {}).restore()
    assert caught.value.path == str(tmp_path / name) and "repair the file" in str(caught.value)
