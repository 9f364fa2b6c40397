"""ExportManager against a real portal (``PortalThread``) and Shoal's initiator on 127.0.0.1.

One target per volume, LUN 0, ACL of the initiators it is exported to, CHAP;
VPD 0x80/0x83 carry the volume id (SPC-4 §7.8.6, §7.8.15); the record survives
a restart and keeps the secrets in a 0600 file, out of the main record.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from node_agent.agent.errors import AlreadyExists, InvalidArgument, NotFound
from node_agent.agent.exports import RECORD_FILE, SECRETS_FILE, ExportManager, ExportSettings
from node_agent.agent.portal import PortalThread
from node_agent.agent.settings import DiskSpec
from node_agent.agent.volumes import VolumeManager
from node_agent.iscsi.initiator.blockdev import SyncLun
from node_agent.iscsi.initiator.client import ClientSettings
from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.target import Credentials
from node_agent.scsi.vpd import LunIdentity
from node_agent.target_service import PortalConfig
from node_agent.iscsi.initiator.core import InitiatorError, LoginError

MiB = 1 << 20
PREFIX = "iqn.2026-11.io.shoal.test:target:n1"
X, Y = "iqn.2026-11.io.shoal.test:node-x", "iqn.2026-11.io.shoal.test:node-y"
CHAP = Credentials("vol-user", "s3cret-s3cret-1")
OTHER = Credentials("vol-user", "another-secret-2")


class Node:
    """A volume manager, a portal and an export manager over one data directory."""

    def __init__(self, tmp_path, port: int = 0):
        self.tmp_path = tmp_path
        self.volumes = VolumeManager([DiskSpec("data0", str(tmp_path / "disk"))])
        self.portal = PortalThread(PortalConfig("127.0.0.1", port))
        self.host, self.port = self.portal.start()
        self.exports = ExportManager(ExportSettings(str(tmp_path / "data"), PREFIX, (f"127.0.0.1:{self.port}",)),
                                     self.volumes, self.portal)

    def login(self, volume_id: str, initiator: str, chap: Credentials | None = CHAP) -> SyncLun:
        settings = ClientSettings(initiator_iqn=initiator, login_timeout=5, reconnect_timeout=1)
        return SyncLun(self.host, self.port, f"{PREFIX}:{volume_id}", 0, settings=settings,
                       chap=(chap.user, initiator_secret(chap.secret, initiator)) if chap else None)

    def stop(self):
        self.portal.stop()


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path)
    node.volumes.create("vol-1", 8 * MiB)
    yield node
    node.stop()


def test_export_serves_the_volume_with_its_identity_to_the_admitted_initiator(node):
    info = node.exports.export("vol-1", X, CHAP)
    identity = LunIdentity(volume_id="vol-1")
    assert info.target_iqn == f"{PREFIX}:vol-1"
    assert (info.lun, info.naa, info.serial, info.chap_user) == (0, identity.naa.hex(), "vol-1", "vol-user")
    assert info.portals == (f"127.0.0.1:{node.port}",)
    lun = node.login("vol-1", X)
    try:
        assert lun.identity() == (info.naa, "vol-1")
        assert lun.size == 8 * MiB
        lun.pwrite(0, b"A" * 512)
        assert lun.pread(0, 512) == b"A" * 512
    finally:
        lun.close()


@pytest.mark.parametrize("initiator, chap", [(Y, CHAP), (X, OTHER), (X, None)])
def test_other_initiators_and_wrong_credentials_are_refused(node, initiator, chap):
    node.exports.export("vol-1", X, CHAP)
    with pytest.raises(LoginError):
        node.login("vol-1", initiator, chap).close()


def _login_with(node, volume_id: str, initiator: str, secret: str) -> SyncLun:
    settings = ClientSettings(initiator_iqn=initiator, login_timeout=5, reconnect_timeout=1)
    return SyncLun(node.host, node.port, f"{PREFIX}:{volume_id}", 0, settings=settings, chap=(CHAP.user, secret))


def test_each_initiator_proves_its_own_secret_not_the_volumes(node):
    """RFC 7143 §9.2.1: one secret SHOULD NOT serve several initiators.  With the volume's secret shared by
    X and Y, X could log in under Y's name: reinstate (close) Y's session, take Y's reservations, and come
    back after a fence of its own name.  Each initiator now proves a secret derived from the volume's and
    its own name, the only one the controller gives it."""
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)
    _login_with(node, "vol-1", X, initiator_secret(CHAP.secret, X)).close()
    with pytest.raises(Exception, match="authentication failed"):
        _login_with(node, "vol-1", X, CHAP.secret).close()  # the volume's secret itself opens nothing
    with pytest.raises(Exception, match="authentication failed"):
        _login_with(node, "vol-1", Y, initiator_secret(CHAP.secret, X)).close()  # X's secret, Y's name
    y = _login_with(node, "vol-1", Y, initiator_secret(CHAP.secret, Y))
    try:
        assert node.exports.fence(X)[0] == ["vol-1"]
        with pytest.raises(Exception, match="authentication failed"):
            _login_with(node, "vol-1", Y, initiator_secret(CHAP.secret, X)).close()
        y.pwrite(0, b"Y" * 512)  # Y's session was not reinstated by any of that
        assert y.pread(0, 512) == b"Y" * 512
    finally:
        y.close()


def test_repeat_export_returns_the_same_info_and_other_credentials_are_refused(node):
    first = node.exports.export("vol-1", X, CHAP)
    assert node.exports.export("vol-1", X, Credentials(CHAP.user, CHAP.secret)) == first
    with pytest.raises(AlreadyExists, match="other CHAP credentials") as caught:
        node.exports.export("vol-1", Y, OTHER)
    assert OTHER.secret not in str(caught.value) and CHAP.secret not in str(caught.value)


def test_export_errors(node):
    with pytest.raises(NotFound):
        node.exports.export("vol-2", X, CHAP)
    with pytest.raises(InvalidArgument, match="initiator_iqn"):
        node.exports.export("vol-1", "not-an-iqn", CHAP)
    assert node.exports.list() == []


def test_unexport_removes_one_initiator_then_the_target(node):
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)
    held = node.login("vol-1", X)
    node.login("vol-1", Y).close()
    try:
        assert node.exports.unexport("vol-1", X) is True
        with pytest.raises((OSError, InitiatorError)):  # X's session was closed with its ACL entry
            held.pread(0, 512)
    finally:
        held.close()
    with pytest.raises(LoginError):
        node.login("vol-1", X).close()
    node.login("vol-1", Y).close()
    assert node.exports.unexport("vol-1", Y) is True
    assert node.portal.served() == set()
    assert node.exports.unexport("vol-1", Y) is False  # repeat: OK
    assert node.exports.list() == []


def test_capacity_change_reaches_the_lun(node):
    node.exports.export("vol-1", X, CHAP)
    node.volumes.expand("vol-1", 16 * MiB)
    node.exports.capacity_changed("vol-1", 16 * MiB)
    lun = node.login("vol-1", X)
    try:
        assert lun.size == 16 * MiB
    finally:
        lun.close()


def test_the_record_keeps_secrets_apart_and_restores_after_a_restart(tmp_path):
    node = Node(tmp_path)
    node.volumes.create("vol-1", 8 * MiB)
    node.volumes.create("vol-gone", 8 * MiB)
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-gone", X, CHAP)
    lun = node.login("vol-1", X)
    lun.pwrite(4096, b"kept" * 128)
    lun.close()
    port = node.port
    node.stop()
    data = tmp_path / "data"
    assert CHAP.secret not in (data / RECORD_FILE).read_text()
    assert stat.S_IMODE(os.stat(data / SECRETS_FILE).st_mode) == 0o600
    assert json.loads((data / RECORD_FILE).read_text())["exports"]["vol-1"]["initiators"] == [X]

    again = Node(tmp_path, port)
    again.volumes.delete("vol-gone")  # gone while the agent was down: kept in the record, not served
    try:
        assert again.exports.restore() == ["vol-1"]
        assert list(again.exports.unserved()) == ["vol-gone"]
        lun = again.login("vol-1", X)
        try:
            assert lun.pread(4096, 512) == b"kept" * 128
        finally:
            lun.close()
        assert [e.volume_id for e in again.exports.list()] == ["vol-1"]
        assert again.exports.export("vol-1", X, CHAP).volume_id == "vol-1"  # the controller's repeat: same export
    finally:
        again.stop()


def _send(sock, conn) -> None:
    for buf in conn.take_output():
        sock.sendall(bytes(buf))


@pytest.mark.parametrize("how", ["fence", "unexport"])
def test_a_login_begun_before_a_fence_or_unexport_does_not_end_in_a_session(node, how):
    """The ACL is checked on a login's first PDU; a fence or an unexport of that initiator may come before
    its last (CHAP takes several round trips, and an initiator retrying its login keeps one under way).
    The session must not open then: its writes would land after the fence returned.  The login ends with
    AUTHORIZATION FAILURE instead, while the target goes on serving the other initiator."""
    import socket

    from node_agent.iscsi.initiator.core import InitiatorConnection, LoginError, LoggedIn, random_isid
    from node_agent.iscsi.keys import InitiatorSettings

    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)  # the other host: the target stays served
    conn = InitiatorConnection(InitiatorSettings(X, f"{PREFIX}:vol-1"), isid=random_isid(),
                               chap=(CHAP.user, initiator_secret(CHAP.secret, X)))
    with socket.create_connection((node.host, node.port), timeout=5) as sock:
        conn.start_login()
        _send(sock, conn)
        conn.receive(sock.recv(65536))  # the first answer: the ACL admitted X
        if how == "fence":
            assert node.exports.fence(X)[0] == ["vol-1"]
        else:
            assert node.exports.unexport("vol-1", X) is True
        with pytest.raises(LoginError) as refused:
            while True:
                _send(sock, conn)
                data = sock.recv(65536)
                assert data, "the target closed the connection without answering the login"
                conn.receive(data)
                assert not [e for e in conn.take_events() if isinstance(e, LoggedIn)], "a session opened"
    assert (refused.value.status_class, refused.value.status_detail) == (0x02, 0x02)  # AUTHORIZATION FAILURE
    with open(node.volumes.get("vol-1").path, "rb") as handle:
        assert handle.read(512) == bytes(512)
    lun = node.login("vol-1", Y)  # the survivor is served as before
    try:
        lun.pwrite(0, b"Y" * 512)
    finally:
        lun.close()


# -- a fence or an unexport that times out, a save that fails: what a repeat must still do ----------------
def _pump(sock, conn, want):
    """Send what ``conn`` queued and receive until an event of type ``want`` comes."""
    while True:
        _send(sock, conn)
        hit = [event for event in conn.take_events() if isinstance(event, want)]
        if hit:
            return hit[0]
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the target")
        conn.receive(data)


@pytest.fixture
def held_writes(monkeypatch):
    """Writes of data starting with ``S`` run on a worker and wait there for ``release`` (a stalled disk)."""
    import threading

    from node_agent.storage import backing as B

    entered, release = threading.Event(), threading.Event()
    write, write_nowait = B.FileBackingStore.write, B.FileBackingStore.write_nowait

    def held_write(self, offset, data, fua=False):
        if bytes(data[:1]) == b"S":
            entered.set()
            release.wait(10)
        return write(self, offset, data, fua)

    def held_write_nowait(self, offset, data, fua=False):
        return False if bytes(data[:1]) == b"S" else write_nowait(self, offset, data, fua)
    monkeypatch.setattr(B.FileBackingStore, "write", held_write)
    monkeypatch.setattr(B.FileBackingStore, "write_nowait", held_write_nowait)
    yield entered, release
    release.set()


def _stuck_write(node, entered):
    """X logs in and sends a WRITE that stays on a worker; the socket (keep it open)."""
    import socket

    from node_agent.iscsi.initiator.core import InitiatorConnection, LoggedIn, TaskDone, random_isid
    from node_agent.iscsi.keys import InitiatorSettings

    sock = socket.create_connection((node.host, node.port), timeout=5)
    conn = InitiatorConnection(InitiatorSettings(X, f"{PREFIX}:vol-1"), isid=random_isid(),
                               chap=(CHAP.user, initiator_secret(CHAP.secret, X)))
    conn.start_login()
    _pump(sock, conn, LoggedIn)
    conn.submit(bytes(6))  # TEST UNIT READY: the power-on unit attention
    _pump(sock, conn, TaskDone)
    conn.submit(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data_out=b"S" * 512)  # WRITE(10) of LBA 0
    _send(sock, conn)
    assert entered.wait(5), "the write never reached a worker"
    return sock


def _first_block(node) -> bytes:
    with open(node.volumes.get("vol-1").path, "rb") as handle:
        return handle.read(512)


def test_a_fence_repeated_after_a_timeout_waits_for_what_still_runs(node, held_writes):
    """FenceInitiator answers UNAVAILABLE when the initiator's commands outlast its wait; the controller repeats
    it.  The repeat found no session left (the first closed them) and answered OK at once while the write was
    still to land; it now waits for the connections the first attempt left running."""
    import threading
    import time

    from node_agent.agent.errors import Unavailable

    entered, release = held_writes
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)  # another host stays admitted: the target stays
    with _stuck_write(node, entered):
        with pytest.raises(Unavailable):
            node.exports.fence(X, timeout=0.3)
        with pytest.raises(Unavailable):
            node.exports.fence(X, timeout=0.3)  # still running: still not done
        threading.Timer(0.3, release.set).start()
        start = time.monotonic()
        volume_ids, result = node.exports.fence(X, timeout=10)
        took = time.monotonic() - start
        assert _first_block(node) == b"S" * 512  # landed before the fence answered OK
    assert took >= 0.2 and result.commands_waited == 1 and volume_ids == []


def test_an_export_after_a_timed_out_fence_does_not_admit_the_fenced_initiator_again(node, held_writes):
    """The fence took X out of the record on disk and out of the ACL before it timed out; memory kept X, and
    the next export of the volume (to the failover host) put X back into the ACL and the file."""
    from node_agent.agent.errors import Unavailable

    entered, release = held_writes
    node.exports.export("vol-1", X, CHAP)
    with _stuck_write(node, entered):
        with pytest.raises(Unavailable):
            node.exports.fence(X, timeout=0.3)
        release.set()
        node.exports.export("vol-1", Y, CHAP)
    record = json.loads((node.tmp_path / "data" / RECORD_FILE).read_text())
    acl = node.portal.call(lambda: node.portal.service.registry.targets[f"{PREFIX}:vol-1"].allowed_initiators)
    assert set(acl) == {Y} and record["exports"]["vol-1"]["initiators"] == [Y]
    assert node.exports.fence(X)[0] == []  # the repeat: nothing left to wait for


def test_an_unexport_from_one_of_two_initiators_waits_for_its_commands(node, held_writes):
    """UnexportVolume(X) with Y still admitted closed X's sessions but returned with X's write still on a
    worker, to land later.  It now waits, as the last unexport (target removal) and a fence do."""
    import threading

    entered, release = held_writes
    node.exports.export("vol-1", X, CHAP)
    node.exports.export("vol-1", Y, CHAP)
    with _stuck_write(node, entered):
        threading.Timer(0.3, release.set).start()
        assert node.exports.unexport("vol-1", X) is True
        assert _first_block(node) == b"S" * 512  # landed before the unexport returned


def _fail_first_save(monkeypatch):
    import errno

    from node_agent.agent import exports as E

    real, calls = E.write_json, []

    def failing(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kwargs)
    monkeypatch.setattr(E, "write_json", failing)


def test_an_unexport_whose_save_failed_changes_nothing_and_its_repeat_removes_the_target(node, monkeypatch):
    """Memory used to change before the save: after a failed save the repeat answered "not exported" with the
    target still served, and DeleteVolume, trusting memory, deleted the file under a writing initiator."""
    from node_agent.agent.exports import refuse_if_exported
    from node_agent.agent.errors import FailedPrecondition

    node.exports.export("vol-1", X, CHAP)
    _fail_first_save(monkeypatch)
    with pytest.raises(OSError):
        node.exports.unexport("vol-1", X)
    with pytest.raises(FailedPrecondition):
        refuse_if_exported(node.exports, "vol-1")  # still exported: no delete
    assert node.portal.served() == {f"{PREFIX}:vol-1"}
    assert node.exports.unexport("vol-1", X) is True  # the repeat does it all
    assert node.portal.served() == set() and not node.exports.is_exported("vol-1")


def test_an_export_whose_save_failed_is_done_by_its_repeat(node, monkeypatch):
    _fail_first_save(monkeypatch)
    with pytest.raises(OSError):
        node.exports.export("vol-1", X, CHAP)
    assert not node.exports.is_exported("vol-1") and node.portal.served() == set()
    info = node.exports.export("vol-1", X, CHAP)
    assert node.portal.served() == {info.target_iqn}


def test_an_export_a_timed_out_fence_left_with_nobody_is_never_written_and_goes_on_the_repeat(node, held_writes):
    """X was the volume's only initiator: the fence takes the export out of the file at once; until its
    repeat removes the target the export stays in memory with an empty ACL (so the volume is not deleted
    under its running commands), and no later save (another volume's export) writes it back."""
    from node_agent.agent.errors import Unavailable

    entered, release = held_writes
    node.exports.export("vol-1", X, CHAP)
    with _stuck_write(node, entered):
        with pytest.raises(Unavailable):
            node.exports.fence(X, timeout=0.3)
        assert node.exports.is_exported("vol-1")
        node.volumes.create("vol-2", 8 * MiB)
        node.exports.export("vol-2", Y, CHAP)  # a save of every record
        record = json.loads((node.tmp_path / "data" / RECORD_FILE).read_text())
        assert set(record["exports"]) == {"vol-2"}
        release.set()
        assert node.exports.fence(X, timeout=10)[0] == []
    assert node.portal.served() == {f"{PREFIX}:vol-2"} and not node.exports.is_exported("vol-1")


def test_a_fence_waiting_for_a_stalled_write_holds_up_no_other_export_change(node, held_writes):
    """The fence waits (up to its timeout) for the initiator's commands without the export manager's lock:
    GetState's listing and an export of another volume go on meanwhile (they waited up to 60 s, long enough
    for the controller to think the node silent); the fence still answers only after the write."""
    import threading
    import time

    entered, release = held_writes
    node.exports.export("vol-1", X, CHAP)
    node.volumes.create("vol-2", 8 * MiB)
    outcome = {}
    with _stuck_write(node, entered):
        fence = threading.Thread(target=lambda: outcome.setdefault("fence", node.exports.fence(X, timeout=10)))
        fence.start()
        time.sleep(0.2)  # the fence waits for the write
        start = time.monotonic()
        listed = node.exports.records()
        node.exports.export("vol-2", Y, CHAP)
        took = time.monotonic() - start
        assert fence.is_alive(), "the fence did not wait for the write"
        release.set()
        fence.join(10)
    volume_ids, result = outcome["fence"]
    assert took < 1.0, f"export changes waited {took:.2f} s for the fence"
    assert [r.volume_id for r in listed] == ["vol-1"] and volume_ids == ["vol-1"] and result.commands_waited == 1
    assert node.portal.served() == {f"{PREFIX}:vol-2"}  # vol-1's target went with its last initiator
