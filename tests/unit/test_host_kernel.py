"""The kernel connector's command sequences, checked at our runner boundary.

``node_agent.host.kernel.KernelConnector`` talks to the system through three
of our own boundaries: the ``Runner`` (``RecordingRunner`` records every argv),
the sysfs/dev roots (a temporary tree) and the sysfs writer.  ``FakeKernel``
below plays open-iscsi and the SCSI layer at those boundaries: ``iscsiadm``
answers in the format of open-iscsi's ``usr/session_info.c``, a write of
``0 0 LUN`` to a host's ``scan`` file makes the LUN's disk appear in sysfs,
``/dev`` and ``/dev/disk/by-path`` with the VPD pages the target would report,
and ``1`` into ``device/delete`` removes it.  Like open-iscsi, a login presents
the ``iface.initiatorname`` of the node record's iface (the host's own name
through ``default``), and the fake target admits only the agent's name, as every
export's ACL does.  Node records are files in the runner's ``files`` (under
/etc/iscsi/nodes, in iscsiadm's ``name = value`` format): ``-o update`` rewrites
them, ``-o show`` prints them with secrets masked, and a login presents the CHAP
credentials the file holds to a target that may require them.  The same
sequences run against the real kernel in tests/peer/test_kernel_connector.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from node_agent.host.connector import (
    AttachedDevice,
    IdentityMismatch,
    InvalidVolumeTarget,
    PermanentConnectorError,
    SessionRegistry,
    TemporaryConnectorError,
    VolumeTarget,
    check_identity,
    parse_vpd_identity,
)
from node_agent.host.kernel import KernelConnector, KernelSettings, ScsiLun, Session, by_path_name, parse_sessions
from node_agent.host.runner import CommandFailed, Hidden, RecordingRunner, SubprocessRunner
from node_agent.scsi.vpd import LunIdentity, device_identification, naa_for, vpd_page

IQN = "iqn.2026-11.io.shoal.test:target"
PORTAL = "10.99.0.1:3260"
AGENT_IQN = "iqn.2026-11.io.shoal:node:node-a"
"""The agent's initiator name: the only one the fake target admits (the export's ACL)."""
HOST_IQN = "iqn.1993-08.org.debian:01:5a1e0fb2c3d4"
"""/etc/iscsi/initiatorname.iscsi of the host: what open-iscsi's ``default`` iface presents."""


def identity_pages(volume_id: str) -> tuple[bytes, bytes]:
    """VPD 83h and 80h as Shoal's target builds them for ``volume_id`` (SPC-4 §7.8.6, §7.8.15)."""
    identity = LunIdentity(volume_id=volume_id)
    pg83 = vpd_page(0x83, device_identification(identity, IQN, f"{IQN},t,0x1", 1))
    return pg83, vpd_page(0x80, identity.serial.encode())


def volume(lun: int = 0, volume_id: str = "vol-a", **changes) -> VolumeTarget:
    fields = dict(portals=(PORTAL,), target_iqn=IQN, lun=lun, volume_id=volume_id,
                  expected_naa=naa_for(volume_id).hex(), expected_serial=volume_id)
    fields.update(changes)
    return VolumeTarget(**fields)


# --------------------------------------------------------------------------- the fake kernel

@dataclasses.dataclass
class FakeSession:
    sid: int
    host: int
    portal: str
    luns: dict[int, str] = dataclasses.field(default_factory=dict)
    iface: str = "shoal"
    initiator: str = AGENT_IQN


def iface_record(name: str, values: dict[str, str]) -> str:
    """``iscsiadm -m iface -I NAME`` (open-iscsi ``idbm_print``), the fields that matter here."""
    lines = ["# BEGIN RECORD 2.1.8", f"iface.iscsi_ifacename = {name}", "iface.ipaddress = <empty>",
             "iface.hwaddress = <empty>", f"iface.transport_name = {values.get('iface.transport_name') or '<empty>'}",
             f"iface.initiatorname = {values.get('iface.initiatorname') or '<empty>'}",
             "iface.net_ifacename = <empty>", "# END RECORD"]
    return "\n".join(lines) + "\n"


NODE_DIR = "/etc/iscsi/nodes"
"""open-iscsi's ``NODE_CONFIG_DIR`` on Debian."""
#: The node record fields FakeKernel keeps, in iscsiadm's order (usr/idbm.c ``idbm_recinfo_node``).
RECORD_FIELDS = ("node.name", "node.tpgt", "node.startup", "iface.iscsi_ifacename", "iface.transport_name",
                 "node.discovery_type", "node.session.auth.authmethod", "node.session.auth.username",
                 "node.session.auth.password", "node.session.auth.username_in", "node.session.auth.password_in",
                 "node.session.auth.chap_algs", "node.session.scan", "node.conn[0].address", "node.conn[0].port",
                 "node.conn[0].iscsi.HeaderDigest", "node.conn[0].iscsi.DataDigest")
SECRET_FIELDS = ("node.session.auth.password", "node.session.auth.password_in")


def record_path(portal: str = PORTAL, tpgt: int = -1, iface_name: str = "shoal", root: str = NODE_DIR) -> str:
    """Where iscsiadm keeps the record: ``ADDR,PORT`` when made without a TPGT, else ``ADDR,PORT,TPGT/IFACE``."""
    address, _, port = portal.rpartition(":")
    base = f"{root}/{IQN}/{address.strip('[]')},{port}"
    return base if tpgt == -1 else f"{base},{tpgt}/{iface_name}"


def read_record_file(text: str) -> dict[str, str]:
    """A record file as iscsiadm reads it (usr/idbm.c ``idbm_recinfo_config``): lines stripped, ``#`` skipped,
    the name up to a blank or ``=``, the value after ``=`` and blanks; a line without a value sets nothing."""
    values = {}
    for line in text.split("\n"):
        line = line.strip()
        if match := re.fullmatch(r"([^\s=#][^\s=]*)\s*=\s*(.+)", line):
            values[match.group(1)] = match.group(2)
    return values


def render_record(values: dict[str, str], *, show: bool) -> str:
    """usr/idbm.c ``idbm_print``: into the file every non-empty field; for ``-o show`` every field, empty
    ones as ``<empty>`` and secrets as ``********``."""
    lines = ["# BEGIN RECORD 2.1.8"]
    for key in RECORD_FIELDS:
        value = values.get(key, "")
        if show and value and key in SECRET_FIELDS:
            value = "********"
        if value or show:
            lines.append(f"{key} = {value or '<empty>'}")
    return "\n".join(lines + ["# END RECORD"]) + "\n"


class FakeKernel:
    """open-iscsi + the SCSI layer, as seen through the runner, sysfs and /dev."""

    def __init__(self, root: Path, target_luns: dict[int, str]):
        self.sysfs, self.dev = root / "sys", root / "dev"
        self.sysfs.mkdir()
        (self.dev / "disk" / "by-path").mkdir(parents=True)
        self.target_luns = dict(target_luns)  # LUN -> volume id the target serves there
        self.records: dict[str, str] = {}  # portal -> iface of its node record
        self.record_files: dict[str, str] = {}  # portal -> the record's file in runner.files
        self.chap: tuple[str, str] | None = None  # what the target requires of the initiator
        self.mutual_chap: tuple[str, str] | None = None  # what the target answers a mutual challenge with
        self.ifaces: dict[str, dict[str, str]] = {}  # /etc/iscsi/ifaces
        self.allowed = {AGENT_IQN}  # the target's ACL
        self.sessions: dict[str, FakeSession] = {}
        self.writes: list[tuple[str, str]] = []
        self.login_rc = 0
        self.next_sid, self.next_host, self.next_disk = 1, 2, 0
        self.runner = RecordingRunner()
        self.runner.on("iscsiadm", "-m", "session", "-P", "3", call=lambda argv: self.session_p3())
        self.runner.on("iscsiadm", "-m", "node", call=self.node)
        self.runner.on("iscsiadm", "-m", "iface", call=self.iface)
        self.now = 0.0

    # -- runner side

    def session_p3(self):
        if not self.sessions:
            return (21, "", "iscsiadm: No active sessions.\n")
        out = ["iSCSI Transport Class version 2.0-870", "version 2.1.8", f"Target: {IQN} (non-flash)"]
        for s in self.sessions.values():
            out += [f"\tCurrent Portal: {s.portal},1", f"\tPersistent Portal: {s.portal},1",
                    "\t\t**********", "\t\tInterface:", "\t\t**********", f"\t\tIface Name: {s.iface}",
                    "\t\tIface Transport: tcp", f"\t\tIface Initiatorname: {s.initiator}",
                    f"\t\tSID: {s.sid}", "\t\tiSCSI Connection State: LOGGED IN",
                    "\t\tiSCSI Session State: LOGGED_IN", "\t\tInternal iscsid Session State: NO CHANGE",
                    "\t\t************************", "\t\tAttached SCSI devices:", "\t\t************************",
                    f"\t\tHost Number: {s.host}\tState: running"]
            for lun, disk in sorted(s.luns.items()):
                out += [f"\t\tscsi{s.host} Channel 00 Id 0 Lun: {lun}",
                        f"\t\t\tAttached scsi disk {disk}\t\tState: running"]
        return (0, "\n".join(out) + "\n")

    def add_record(self, portal: str = PORTAL, iface_name: str = "shoal", tpgt: int = -1, root: str = NODE_DIR,
                   **values: str) -> str:
        """A node record as ``-o new`` writes it (or discovery, with a TPGT); ``values`` by field name."""
        address, _, port = portal.rpartition(":")
        fields = {"node.name": IQN, "node.tpgt": str(tpgt), "node.startup": "manual",
                  "iface.iscsi_ifacename": iface_name, "iface.transport_name": "tcp", "node.discovery_type": "static",
                  "node.session.auth.authmethod": "None", "node.session.auth.chap_algs": "MD5",
                  "node.session.scan": "auto", "node.conn[0].address": address.strip("[]"),
                  "node.conn[0].port": port, "node.conn[0].iscsi.HeaderDigest": "None",
                  "node.conn[0].iscsi.DataDigest": "None", **values}
        path = record_path(portal, tpgt, iface_name, root)
        self.records[portal], self.record_files[portal] = iface_name, path
        self.runner.files[path] = render_record(fields, show=False)
        return path

    def record(self, portal: str = PORTAL) -> dict[str, str]:
        """The node record as iscsiadm reads it from its file."""
        return read_record_file(self.runner.files[self.record_files[portal]])

    def chap_refusal(self, record: dict[str, str]) -> str:
        """Why the CHAP exchange of a login with ``record`` fails ("" when it succeeds), RFC 7143 §12.1.3."""
        def pair(user, secret):
            return (record.get(user, ""), record.get(secret, "")) if record.get(secret) else None

        offered = pair("node.session.auth.username", "node.session.auth.password")
        if record.get("node.session.auth.authmethod") != "CHAP":
            offered = None
        if self.chap is not None and offered != self.chap:
            return "the target refused the initiator's CHAP response"
        challenge = pair("node.session.auth.username_in", "node.session.auth.password_in")
        if offered is not None and challenge is not None and challenge != self.mutual_chap:
            return "the initiator refused the target's CHAP response"
        return ""

    def node(self, argv):
        """``iscsiadm -m node -T IQN -p PORTAL [-I IFACE] ...``: without ``-I``, records of every iface."""
        assert argv[:7] == ["iscsiadm", "-m", "node", "-T", IQN, "-p", argv[6]]
        portal, rest, iface = argv[6], argv[7:], None
        if "-I" in rest or "--interface" in rest:  # anywhere, as getopt takes it
            at = rest.index("-I") if "-I" in rest else rest.index("--interface")
            iface, rest = rest[at + 1], rest[:at] + rest[at + 2:]
        mine = portal in self.records and iface in (None, self.records[portal])
        if not rest or rest == ["-o", "show"]:
            if not mine:
                return (21, "", "iscsiadm: No records found\n")
            return (0, render_record(self.record(portal), show=True))
        if rest == ["-o", "new"]:
            assert iface is not None, "a node record is created for a named iface"
            if iface != "default" and iface not in self.ifaces:
                return (6, "", f"iscsiadm: Could not read iface info for {iface}.\n")
            self.add_record(portal, iface)
        elif rest[:2] == ["-o", "update"]:
            if not mine:
                return (21, "")
            assert rest[2] == "-n" and rest[4] == "-v" and len(rest) == 6, rest
            values = self.record(portal)  # iscsiadm reads the record, sets the field and writes it all anew
            values[rest[3]] = rest[5]
            self.runner.files[self.record_files[portal]] = render_record(values, show=False)
        elif rest == ["-o", "delete"]:
            if not mine:
                return (21, "")
            del self.records[portal]
            self.runner.files.pop(self.record_files.pop(portal, ""), None)
        elif rest == ["--login"]:
            if not mine:
                return (21, "", "iscsiadm: No records found\n")
            if portal in self.sessions:
                return (15, "", "iscsiadm: default: 1 session requested, but 1 already present.\n")
            if self.login_rc:
                return (self.login_rc, "", "iscsiadm: Could not login\n")
            # iscsid: the iface's initiator name, else the host's (usr/initiator.c __session_create)
            record_iface = self.records[portal]
            initiator = self.ifaces.get(record_iface, {}).get("iface.initiatorname") or HOST_IQN
            if initiator not in self.allowed:
                return (24, "", "iscsiadm: initiator reported error (24 - iSCSI login failed due to "
                                "authorization failure)\n")
            if refusal := self.chap_refusal(self.record(portal)):
                return (24, "", f"iscsiadm: initiator reported error (24 - iSCSI login failed due to "
                                f"authorization failure: {refusal})\n")
            self.sessions[portal] = FakeSession(self.next_sid, self.next_host, portal, iface=record_iface,
                                                initiator=initiator)
            self.next_sid += 1
            self.next_host += 1
        elif rest == ["--logout"]:
            session = self.sessions.get(portal)
            if session is None or iface not in (None, session.iface):
                return (21, "")
            del self.sessions[portal]
            assert not session.luns, "logout under attached disks"
        return (0, "")

    def iface(self, argv):
        """``iscsiadm -m iface -I NAME ...`` (usr/iscsiadm.c ``exec_iface_op``)."""
        assert argv[:4] == ["iscsiadm", "-m", "iface", "-I"]
        name, rest = argv[4], argv[5:]
        if rest == ["-o", "show"]:
            if name == "default":
                return (0, iface_record(name, {"iface.transport_name": "tcp"}))
            if name not in self.ifaces:
                return (6, "", f"iscsiadm: Could not read iface {name} (6).\n")
            return (0, iface_record(name, self.ifaces[name]))
        if name in ("default", "iser"):
            return (7, "", f"iscsiadm: iface {name} is a special interface and cannot be modified.\n")
        if rest == ["-o", "new"]:
            if any(s.iface == name for s in self.sessions.values()):
                return (15, "", f"iscsiadm: Could not create new interface {name}.\n")
            self.ifaces[name] = {"iface.transport_name": "tcp"}  # iface_setup_defaults
        elif rest[:2] == ["-o", "update"] and rest[2] == "-n" and rest[4] == "-v":
            if name not in self.ifaces:
                return (7, "", f"iscsiadm: Could not update iface {name}\n")
            self.ifaces[name][rest[3]] = rest[5]
        else:
            raise AssertionError(f"unexpected iface command {argv}")
        return (0, f"{name} updated.\n")

    # -- sysfs side

    def write(self, path: str, text: str) -> None:
        self.writes.append((os.path.relpath(path, self.sysfs), text))
        parts = Path(path).relative_to(self.sysfs).parts
        if parts[:2] == ("class", "scsi_host") and parts[3] == "scan":
            self.scan(int(parts[2].removeprefix("host")), text)
        elif parts[0] == "block" and parts[-1] == "delete":
            self.delete(parts[1])

    def scan(self, host: int, text: str) -> None:
        channel, target_id, lun = (int(x) for x in text.split())
        session = next(s for s in self.sessions.values() if s.host == host)
        if lun not in self.target_luns or lun in session.luns:
            return
        disk = "sd" + chr(ord("a") + self.next_disk)
        self.next_disk += 1
        session.luns[lun] = disk
        self.add_disk(session, lun, disk, self.target_luns[lun])

    def add_disk(self, session: FakeSession, lun: int, disk: str, volume_id: str) -> None:
        address = f"{session.host}:0:0:{lun}"
        block = (self.sysfs / "class" / "iscsi_session" / f"session{session.sid}" / "device" /
                 f"target{session.host}:0:0" / address / "block" / disk)
        block.mkdir(parents=True)
        device = self.sysfs / "block" / disk / "device"
        device.mkdir(parents=True)
        pg83, pg80 = identity_pages(volume_id)
        (device / "vpd_pg83").write_bytes(pg83)
        (device / "vpd_pg80").write_bytes(pg80)
        (self.dev / disk).write_bytes(b"")
        link = self.dev / "disk" / "by-path" / f"ip-{session.portal}-iscsi-{IQN}-lun-{lun}"
        link.unlink(missing_ok=True)
        link.symlink_to(f"../../{disk}")

    def delete(self, disk: str) -> None:
        import shutil
        shutil.rmtree(self.sysfs / "block" / disk)
        (self.dev / disk).unlink()
        for session in self.sessions.values():
            for lun, name in list(session.luns.items()):
                if name == disk:
                    del session.luns[lun]
                    shutil.rmtree(self.sysfs / "class" / "iscsi_session" / f"session{session.sid}" / "device" /
                                  f"target{session.host}:0:0" / f"{session.host}:0:0:{lun}")
                    (self.dev / "disk" / "by-path" / f"ip-{session.portal}-iscsi-{IQN}-lun-{lun}").unlink()

    # -- the connector under test

    def settings(self) -> KernelSettings:
        def sleep(seconds):
            self.now += seconds

        return KernelSettings(sysfs=str(self.sysfs), dev=str(self.dev), write=self.write, sleep=sleep,
                              clock=lambda: self.now, device_timeout=1.0, by_path_timeout=0.5,
                              removal_timeout=1.0, initiator_iqn=AGENT_IQN)

    def connector(self) -> KernelConnector:
        return KernelConnector(runner=self.runner, settings=self.settings())

    def take(self):
        """Commands and writes since the last call."""
        calls, writes = list(self.runner.calls), list(self.writes)
        self.runner.calls.clear()
        self.runner.shown_calls.clear()
        self.writes.clear()
        return calls, writes


def node(*args: str, portal: str = PORTAL) -> list[str]:
    """A command on the node record bound to the connector's iface."""
    return any_node("-I", "shoal", *args, portal=portal)


def any_node(*args: str, portal: str = PORTAL) -> list[str]:
    """A command on the node records of every iface (logout and delete)."""
    return ["iscsiadm", "-m", "node", "-T", IQN, "-p", portal, *args]


def iface(*args: str) -> list[str]:
    return ["iscsiadm", "-m", "iface", "-I", "shoal", *args]


SESSION_P3 = ["iscsiadm", "-m", "session", "-P", "3"]
IFACE_SETUP = [
    iface("-o", "show"),
    iface("-o", "new"),
    iface("-o", "update", "-n", "iface.transport_name", "-v", "tcp"),
    iface("-o", "update", "-n", "iface.initiatorname", "-v", AGENT_IQN),
]
NODE_SETUP = [
    node(),
    node("-o", "new"),
    node("-o", "update", "-n", "node.startup", "-v", "manual"),
    node("-o", "update", "-n", "node.session.scan", "-v", "manual"),
    node("-o", "update", "-n", "node.conn[0].iscsi.HeaderDigest", "-v", "None"),
    node("-o", "update", "-n", "node.conn[0].iscsi.DataDigest", "-v", "None"),
]
NO_CHAP = [
    node("-o", "update", "-n", "node.session.auth.authmethod", "-v", "None"),
    node("-o", "show"),  # no credential lines to remove: nothing written, the record as shown is checked
]


@pytest.fixture
def kernel(tmp_path):
    return FakeKernel(tmp_path, {0: "vol-a", 1: "vol-b"})


# --------------------------------------------------------------------------- attach

def test_attach_creates_the_record_logs_in_scans_one_lun_and_checks_identity(kernel):
    """Attach: node record, scan=manual, login, a targeted scan of LUN 0, VPD 83h/80h checked."""
    device = kernel.connector().attach(volume(0))
    calls, writes = kernel.take()
    assert calls == [
        SESSION_P3,
        *IFACE_SETUP,
        *NODE_SETUP,
        *NO_CHAP,
        node("--login"),
        SESSION_P3,
    ]
    assert writes == [("class/scsi_host/host2/scan", "0 0 0")]
    assert device == AttachedDevice(path=str(kernel.dev / "sda"), volume_id="vol-a", target=volume(0),
                                    naa=naa_for("vol-a").hex(), serial="vol-a", handle="sda")
    assert os.path.realpath(kernel.dev / "disk" / "by-path" / by_path_name(PORTAL, volume(0))) == device.path


def test_attach_offers_the_configured_digests(kernel):
    """``shoal agent --iscsi-header-digest CRC32C,None --iscsi-data-digest CRC32C``: the node record offers
    them to the target (open-iscsi's node.conn[0].iscsi.*Digest) before the login."""
    connector = KernelConnector(runner=kernel.runner, settings=dataclasses.replace(
        kernel.settings(), header_digest=("CRC32C", "None"), data_digest=("CRC32C",)))
    connector.attach(volume(0))
    calls, _ = kernel.take()
    login = calls.index(node("--login"))
    assert node("-o", "update", "-n", "node.conn[0].iscsi.HeaderDigest", "-v", "CRC32C,None") in calls[:login]
    assert node("-o", "update", "-n", "node.conn[0].iscsi.DataDigest", "-v", "CRC32C") in calls[:login]


def test_second_lun_of_the_same_target_reuses_the_session(kernel):
    """A second LUN of an attached target: no node setup, no second login, only its own scan."""
    connector = kernel.connector()
    connector.attach(volume(0))
    kernel.take()
    device = connector.attach(volume(1, "vol-b"))
    calls, writes = kernel.take()
    assert calls == [SESSION_P3]
    assert writes == [("class/scsi_host/host2/scan", "0 0 1")]
    assert device.path == str(kernel.dev / "sdb")
    assert connector.registry.holders(volume(0).session_key) == {0, 1}


def test_detaching_one_of_two_luns_keeps_the_session(kernel):
    """Detach flushes and deletes the SCSI device; the other LUN keeps the session logged in."""
    connector = kernel.connector()
    connector.attach(volume(0))
    connector.attach(volume(1, "vol-b"))
    kernel.take()
    connector.detach(volume(1, "vol-b"))
    calls, writes = kernel.take()
    assert calls == [SESSION_P3, ["blockdev", "--flushbufs", str(kernel.dev / "sdb")]]
    assert writes == [("block/sdb/device/delete", "1")]
    assert PORTAL in kernel.sessions and kernel.sessions[PORTAL].luns == {0: "sda"}


def test_detaching_the_last_lun_logs_out_and_deletes_the_record(kernel):
    connector = kernel.connector()
    connector.attach(volume(0))
    kernel.take()
    connector.detach(volume(0))
    calls, writes = kernel.take()
    assert calls == [SESSION_P3, ["blockdev", "--flushbufs", str(kernel.dev / "sda")],
                     any_node("--logout"), any_node("-o", "delete")]
    assert writes == [("block/sda/device/delete", "1")]
    assert not kernel.sessions and not kernel.records
    assert not (kernel.sysfs / "block" / "sda").exists()


def test_reference_count_is_rebuilt_from_the_system_after_a_restart(kernel):
    """A new connector (agent restarted) learns from ``iscsiadm -m session -P 3`` that LUN 0 still uses the session."""
    first = kernel.connector()
    first.attach(volume(0))
    first.attach(volume(1, "vol-b"))
    kernel.take()
    restarted = kernel.connector()
    restarted.detach(volume(1, "vol-b"))
    calls, _ = kernel.take()
    assert any_node("--logout") not in calls
    assert kernel.sessions[PORTAL].luns == {0: "sda"}


# --------------------------------------------------------------------------- identity

def test_a_lun_with_another_naa_is_deleted_and_never_handed_out(kernel):
    """OSSA-2023-003 class: the LUN answers with another volume's designator -> error, device removed."""
    wrong = volume(0, expected_naa=naa_for("someone-else").hex(), expected_serial=None)
    with pytest.raises(IdentityMismatch, match="not volume vol-a") as caught:
        kernel.connector().attach(wrong)
    calls, writes = kernel.take()
    assert writes == [("class/scsi_host/host2/scan", "0 0 0"), ("block/sda/device/delete", "1")]
    assert calls[-2:] == [any_node("--logout"), any_node("-o", "delete")]
    assert "/dev/" not in str(caught.value) and "sda" not in str(caught.value)
    assert not list((kernel.sysfs / "block").iterdir()) and not (kernel.dev / "sda").exists()
    assert not kernel.sessions


def test_a_wrong_serial_is_refused_too(kernel):
    with pytest.raises(IdentityMismatch, match="serial"):
        kernel.connector().attach(volume(0, expected_serial="vol-z"))
    assert not kernel.sessions


def test_a_mismatch_beside_an_attached_lun_keeps_the_session(kernel):
    connector = kernel.connector()
    connector.attach(volume(0))
    kernel.take()
    with pytest.raises(IdentityMismatch):
        connector.attach(volume(1, "vol-a"))  # LUN 1 holds vol-b
    calls, writes = kernel.take()
    assert writes == [("class/scsi_host/host2/scan", "0 0 1"), ("block/sdb/device/delete", "1")]
    assert calls == [SESSION_P3]
    assert kernel.sessions[PORTAL].luns == {0: "sda"}


def test_an_attached_disk_that_changed_identity_is_refused_not_deleted(kernel):
    """Re-attach re-reads VPD (``device/rescan``); a swapped LUN is an error, and the disk is left alone."""
    connector = kernel.connector()
    connector.attach(volume(0))
    pg83, pg80 = identity_pages("vol-other")
    (kernel.sysfs / "block" / "sda" / "device" / "vpd_pg83").write_bytes(pg83)
    kernel.take()
    with pytest.raises(IdentityMismatch):
        connector.attach(volume(0))
    calls, writes = kernel.take()
    assert writes == [("block/sda/device/rescan", "1")]
    assert calls == [SESSION_P3]
    assert (kernel.dev / "sda").exists()


def test_detach_refuses_to_flush_or_delete_another_volumes_disk(kernel):
    connector = kernel.connector()
    connector.attach(volume(0))
    kernel.take()
    with pytest.raises(IdentityMismatch):
        connector.detach(volume(0, "vol-b"))
    calls, writes = kernel.take()
    assert calls == [SESSION_P3] and writes == []


def test_a_by_path_link_naming_another_disk_is_refused(kernel):
    connector = kernel.connector()
    connector.attach(volume(1, "vol-b"))  # sda
    connector.attach(volume(0))           # sdb
    link = kernel.dev / "disk" / "by-path" / by_path_name(PORTAL, volume(0))
    link.unlink()
    link.symlink_to("../../sda")          # a stale link
    with pytest.raises(IdentityMismatch, match="points to"):
        connector.attach(volume(0))


# --------------------------------------------------------------------------- CHAP

def test_chap_secrets_go_into_the_node_record_file_and_never_on_a_command_line(kernel):
    """iscsiadm's argv is public in /proc/PID/cmdline: the secrets go into the record's file (iscsiadm's own
    ``name = value`` lines, right after the method), ``-o show`` reads them back masked, and the target, which
    requires both ways of CHAP, accepts the login made with what the file holds."""
    kernel.chap, kernel.mutual_chap = ("alice", "initiator-secret-1"), ("tgt", "target-secret-22")
    target = volume(0, chap=kernel.chap, mutual_chap=kernel.mutual_chap)
    assert kernel.connector().attach(target).path.endswith("sda")
    calls = kernel.runner.calls
    assert not [argv for argv in calls if any("secret" in arg for arg in argv)]
    assert [c[9:] for c in calls if c[9:11] == ["-o", "update"] and "auth" in c[12]] == [
        ["-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP"]]
    # Written once, between the show that found the record and the show that reads it back; then the login.
    [(at, path)] = kernel.runner.file_writes
    assert path == record_path() == kernel.record_files[PORTAL]
    assert calls[at - 1] == calls[at] == node("-o", "show") and calls[at + 1] == node("--login")
    text = kernel.runner.files[path]
    assert ("node.session.auth.authmethod = CHAP\nnode.session.auth.username = alice\n"
            "node.session.auth.password = initiator-secret-1\nnode.session.auth.username_in = tgt\n"
            "node.session.auth.password_in = target-secret-22\n") in text
    shown = repr(kernel.runner.shown_calls) + repr(target) + str(target)
    assert "initiator-secret-1" not in shown and "target-secret-22" not in shown
    assert "alice" in repr(target)


def test_one_way_chap_sets_no_incoming_credentials(kernel):
    kernel.chap = ("alice", "initiator-secret-1")
    kernel.connector().attach(volume(0, chap=kernel.chap))
    record = kernel.record()
    assert record["node.session.auth.password"] == "initiator-secret-1"
    assert "node.session.auth.username_in" not in record and "node.session.auth.password_in" not in record


def test_a_failed_command_shows_hidden_values_masked():
    with pytest.raises(CommandFailed) as caught:
        SubprocessRunner().run(["false", "--password", Hidden("s3cret-value")])
    assert "s3cret-value" not in str(caught.value) and "***" in str(caught.value)


# --------------------------------------------------------------------------- idempotency and errors

def test_attach_twice_returns_the_same_device_without_a_second_login(kernel):
    connector = kernel.connector()
    first = connector.attach(volume(0))
    kernel.take()
    again = connector.attach(volume(0))
    calls, writes = kernel.take()
    assert again == first
    assert calls == [SESSION_P3]
    assert writes == [("block/sda/device/rescan", "1")]


def test_detaching_what_is_gone_succeeds(kernel):
    connector = kernel.connector()
    connector.attach(volume(0))
    connector.detach(volume(0))
    kernel.take()
    connector.detach(volume(0))
    calls, writes = kernel.take()
    assert calls == [SESSION_P3, any_node("-o", "delete")]  # exit 21 (no record) is fine
    assert writes == []


def test_an_existing_node_record_is_reused(kernel):
    kernel.ifaces["shoal"] = {"iface.transport_name": "tcp", "iface.initiatorname": AGENT_IQN}
    kernel.add_record()
    kernel.connector().attach(volume(0))
    calls, _ = kernel.take()
    assert node("-o", "new") not in calls


def test_session_exists_on_login_counts_as_logged_in(kernel):
    """Exit 15 from --login (another tool logged in between our look and our login) is success."""
    kernel.runner.on("iscsiadm", "-m", "session", "-P", "3", call=lambda argv: (
        kernel.session_p3() if kernel.runner.calls.count(SESSION_P3) > 1 else (21, "")))
    kernel.ifaces["shoal"] = {"iface.transport_name": "tcp", "iface.initiatorname": AGENT_IQN}  # the other tool's
    kernel.sessions[PORTAL] = FakeSession(7, 9, PORTAL)
    device = kernel.connector().attach(volume(0))
    assert device.path.endswith("sda")
    assert ("class/scsi_host/host9/scan", "0 0 0") in kernel.writes


def test_refused_login_is_permanent_and_leaves_no_record(kernel):
    kernel.login_rc = 24  # ISCSI_ERR_LOGIN_AUTH_FAILED
    with pytest.raises(PermanentConnectorError, match="refused"):
        kernel.connector().attach(volume(0, chap=("alice", "wrong-secret-123")))
    assert not kernel.records
    assert "wrong-secret-123" not in repr(kernel.runner.shown_calls)


def test_unreachable_target_is_temporary(kernel):
    kernel.login_rc = 8  # ISCSI_ERR_TRANS_TIMEOUT
    with pytest.raises(TemporaryConnectorError):
        kernel.connector().attach(volume(0))
    assert not kernel.records


def test_a_lun_that_never_appears_is_temporary(kernel):
    with pytest.raises(TemporaryConnectorError, match="no block device"):
        kernel.connector().attach(volume(5, "vol-x"))


# --------------------------------------------------------------------------- publish contexts

GOOD_CONTEXT = {"portals": "10.99.0.1:3260", "target_iqn": IQN, "lun": "0", "volume_id": "vol-a",
                "naa": "0x" + naa_for("vol-a").hex().upper(), "serial": "vol-a"}


def test_publish_context_converts_to_typed_properties():
    target = VolumeTarget.from_publish_context(
        {**GOOD_CONTEXT, "portals": "10.99.0.1, [fd00::1]:3261"},
        secrets={"chap_user": "alice", "chap_secret": "initiator-secret-1"})
    assert target.portals == ("10.99.0.1:3260", "[fd00::1]:3261")
    assert target.expected_naa == naa_for("vol-a").hex()
    assert target.lun == 0 and target.chap == ("alice", "initiator-secret-1")
    assert "initiator-secret-1" not in repr(target)


@pytest.mark.parametrize(("change", "message"), [
    ({"portals": ""}, "lacks 'portals'"),
    ({"portals": "storage.example:3260"}, "IP address"),
    ({"portals": "10.0.0.1:99999"}, "port must be"),
    ({"target_iqn": "target"}, "not an iSCSI name"),
    ({"lun": "-1"}, "lun"),
    ({"lun": "x"}, "lun"),
    ({"lun": "70000"}, "lun"),
    ({"volume_id": ""}, "lacks 'volume_id'"),
    ({"naa": "", "serial": ""}, "expected identity is required"),
    ({"naa": "xyz"}, "naa"),
    ({"naa": "6" * 20}, "16 or 32 hex digits"),
    ({"chap_user": "alice"}, "only one of"),
    ({"mutual_chap_user": "t", "mutual_chap_secret": "target-secret-22"}, "mutual CHAP requires CHAP"),
    ({"chap_user": "alice", "chap_secret": "a\nnode.startup = automatic"}, "control characters"),
])
def test_bad_publish_contexts_are_refused_with_the_key_named(change, message):
    with pytest.raises(InvalidVolumeTarget, match=message):
        VolumeTarget.from_publish_context({**GOOD_CONTEXT, **change})


def test_invalid_properties_are_permanent_errors():
    assert issubclass(InvalidVolumeTarget, PermanentConnectorError)
    assert issubclass(IdentityMismatch, PermanentConnectorError)


# --------------------------------------------------------------------------- parsers

def test_vpd_identity_round_trip():
    """The parser reads back what node_agent.scsi.vpd encodes (SPC-4 §7.8.6.6 NAA, §7.8.15 serial)."""
    pg83, pg80 = identity_pages("vol-a")
    reported = parse_vpd_identity(pg83, pg80)
    assert reported.naas == (naa_for("vol-a").hex(),) and reported.serial == "vol-a"
    check_identity(volume(0), reported)
    with pytest.raises(IdentityMismatch):
        check_identity(volume(0), parse_vpd_identity(None, None))


#: Two sessions to one target and portal: the second prints a blank line
#: instead of the portal lines (open-iscsi ``session_info_print_tree``).
P3_TWO_SESSIONS = """\
iSCSI Transport Class version 2.0-870
version 2.1.8
Target: iqn.2026-11.io.shoal.test:target (non-flash)
\tCurrent Portal: 10.99.0.1:3260,1
\tPersistent Portal: 10.99.0.1:3260,1
\t\t**********
\t\tInterface:
\t\t**********
\t\tIface Name: default
\t\tSID: 1
\t\tiSCSI Connection State: LOGGED IN
\t\t************************
\t\tAttached SCSI devices:
\t\t************************
\t\tHost Number: 2\tState: running
\t\tscsi2 Channel 00 Id 0 Lun: 0
\t\t\tAttached scsi disk sda\t\tState: running
\t\tscsi2 Channel 00 Id 0 Lun: 3

\t\t**********
\t\tInterface:
\t\t**********
\t\tSID: 2
\t\t************************
\t\tAttached SCSI devices:
\t\t************************
\t\tHost Number: 3\tState: running
Target: iqn.2026-11.io.shoal.test:other (non-flash)
\tCurrent Portal: [fd00::1]:3260,1
\tPersistent Portal: [fd00::1]:3260,1
\t\tSID: 4
\t\tHost Number: 5\tState: running
"""


def test_session_listing_parser():
    sessions = parse_sessions(P3_TWO_SESSIONS)
    assert [(s.sid, s.target_iqn, s.portal, s.host) for s in sessions] == [
        (1, IQN, PORTAL, 2), (2, IQN, PORTAL, 3), (4, "iqn.2026-11.io.shoal.test:other", "[fd00::1]:3260", 5)]
    assert sessions[0].disk(0) == "sda" and sessions[0].disk(3) is None and sessions[1].luns == ()


def test_session_registry_counts_luns_per_target():
    registry = SessionRegistry()
    key = volume(0).session_key
    assert registry.acquire(key, 0) is True
    assert registry.acquire(key, 1) is False
    assert registry.release(key, 0) is False
    assert registry.release(key, 1) is True
    assert registry.release(key, 1) is True  # releasing what is gone


def test_a_failing_flush_is_a_temporary_error_and_keeps_the_session(kernel):
    connector = kernel.connector()
    connector.attach(volume(0))
    kernel.runner.on("blockdev", rc=1, stderr="blockdev: cannot open /dev/sda\n")
    with pytest.raises(TemporaryConnectorError, match="blockdev"):
        connector.detach(volume(0))
    assert kernel.sessions[PORTAL].luns == {0: "sda"}


#: Captured in the Debian guest (open-iscsi 2.1.8, kernel 6.1) by tests/peer/test_kernel_connector.py.
P3_DEBIAN_GUEST = """\
iSCSI Transport Class version 2.0-870
version 2.1.8
Target: iqn.2026-11.io.shoal.test:connector (non-flash)
\tCurrent Portal: 10.99.0.1:3260,1
\tPersistent Portal: 10.99.0.1:3260,1
\t\t**********
\t\tInterface:
\t\t**********
\t\tIface Name: default
\t\tIface Transport: tcp
\t\tIface Initiatorname: iqn.2026-11.dev.shoal:debian-guest
\t\tIface IPaddress: 10.99.0.2
\t\tIface HWaddress: default
\t\tIface Netdev: default
\t\tSID: 1
\t\tiSCSI Connection State: LOGGED IN
\t\tiSCSI Session State: LOGGED_IN
\t\tInternal iscsid Session State: NO CHANGE
\t\t*********
\t\tTimeouts:
\t\t*********
\t\tRecovery Timeout: 15
\t\tTarget Reset Timeout: 20
\t\tLUN Reset Timeout: 20
\t\tAbort Timeout: 15
\t\t*****
\t\tCHAP:
\t\t*****
\t\tusername: guest-initiator
\t\tpassword: ********
\t\tusername_in: shoal-target
\t\tpassword_in: ********
\t\t************************
\t\tNegotiated iSCSI params:
\t\t************************
\t\tHeaderDigest: None
\t\tDataDigest: None
\t\tMaxRecvDataSegmentLength: 262144
\t\tMaxXmitDataSegmentLength: 262144
\t\tFirstBurstLength: 262144
\t\tMaxBurstLength: 1048576
\t\tImmediateData: Yes
\t\tInitialR2T: No
\t\tMaxOutstandingR2T: 1
\t\t************************
\t\tAttached SCSI devices:
\t\t************************
\t\tHost Number: 0\tState: running
\t\tscsi0 Channel 00 Id 0 Lun: 0
\t\t\tAttached scsi disk sda\t\tState: running
"""


def test_session_listing_parser_reads_real_iscsiadm_output():
    [session] = parse_sessions(P3_DEBIAN_GUEST)
    assert session == Session(1, "iqn.2026-11.io.shoal.test:connector", PORTAL, 0, (ScsiLun(0, "sda"),))
