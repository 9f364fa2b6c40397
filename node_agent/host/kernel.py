"""The kernel connector: attach volumes with the Linux iSCSI initiator (open-iscsi).

The command sequences follow what production hosts run (os-brick's iSCSI
connector), with the hygiene os-brick lacks or makes optional built in:

attach
    1. rebuild the reference count from the system (``iscsiadm -m session -P 3``)
    2. if the LUN is already attached: re-read its identity and reuse it
    3. the connector's own iface record: ``iscsiadm -m iface -I shoal -o new`` (only
       when absent), ``-o update`` of ``iface.transport_name=tcp`` and
       ``iface.initiatorname=`` the agent's initiator name (only when they differ).
       The login presents that name, the one every export's ACL admits, never the
       host's ``/etc/iscsi/initiatorname.iscsi`` (what open-iscsi's ``default`` iface uses)
    4. node record: ``iscsiadm -m node -T IQN -p PORTAL -I shoal -o new``
       (only when absent), then ``-o update`` of ``node.startup=manual``,
       ``node.session.scan=manual`` (login must not scan every LUN of the target
       into the host: only the one we ask for appears), the digests and
       ``node.session.auth.authmethod``.  The CHAP user names and secrets never go
       on a command line (argv is public in /proc/PID/cmdline): they are written
       into the record's file under ``/etc/iscsi/nodes`` (mode 0600, replaced
       atomically, stale ones removed) and ``-o show`` must read them back
    5. ``-I shoal --login`` unless the target already has a session (exit 15,
       "session exists", counts as success)
    6. a targeted scan of the one LUN: ``0 0 LUN`` into the session's
       ``/sys/class/scsi_host/hostH/scan``
    7. the device from sysfs (``session*/device/targetH:0:0/H:0:0:LUN/block/sdX``),
       cross-checked with ``/dev/disk/by-path/ip-PORTAL-iscsi-IQN-lun-LUN``
    8. **identity**: ``/sys/block/sdX/device/vpd_pg83`` and ``vpd_pg80`` must hold the
       expected NAA designator and serial; otherwise the SCSI device is deleted,
       the session logged out if nothing else uses it, and ``IdentityMismatch``
       raised: no device path leaves this module unchecked
    9. any other failure after a login this attach made (no disk within
       ``device_timeout``, several disks, no SCSI host) deletes what the scan brought
       in and logs out too, unless another LUN of the target has a disk: a failed
       attach leaves no session nor node record that no detach would end
   10. a host where the kernel initiator cannot run is told apart from a failure a retry may mend: no tcp
       transport in sysfs once iscsiadm failed on the iface (it loads iscsi_tcp itself, and exits 7 when
       it cannot), or a login that exits 12 (no transport) or 20 (iscsid does not answer, after iscsiadm
       ran ``iscsid.startup``), is a ``PermanentConnectorError`` saying what is missing

detach
    identity check (never flush or delete a disk that is not this volume's), a
    refusal while anyone holds the disk with ``O_EXCL`` (a mounted filesystem,
    device-mapper, LVM, md, a running mkfs), ``blockdev --flushbufs``, ``1`` into
    ``/sys/block/sdX/device/delete``, wait until it is gone; ``--logout`` and
    ``-o delete`` of the node record only when no other LUN of the target remains
    attached.  These two name no iface: they also end the sessions and records an
    older Shoal made through the ``default`` iface (sessions are matched by target
    and portal, whatever their iface).

Processes go through an injectable ``Runner``; sysfs and ``/dev`` are
injectable roots and sysfs writes an injectable function, so unit tests check
the exact sequences without a kernel.  Only the standard library is used: the
connector runs inside minimal host images.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.host.connector import (
    AttachedDevice,
    Connector,
    IdentityMismatch,
    PermanentConnectorError,
    SessionRegistry,
    TargetLocks,
    TemporaryConnectorError,
    VolumeTarget,
    check_identity,
    parse_vpd_identity,
    refuse_if_busy,
)
from node_agent.host.runner import CommandFailed, Hidden, Runner, SubprocessRunner

log = logging.getLogger(__name__)

# iscsiadm exit codes (open-iscsi include/iscsi_err.h).
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_NO_OBJS_FOUND = 21
ISCSI_ERR_LOGIN_AUTH_FAILED = 24
ISCSI_ERR_ACCESS = 13          # the target refused the initiator (ACL)
ISCSI_ERR_TRANS_NOT_FOUND = 12  # no such transport: iscsi_tcp is not loaded and could not be
ISCSI_ERR_ISCSID_NOTCONN = 20   # iscsid does not answer, even after iscsid.conf's iscsid.startup
_PERMANENT_LOGIN_ERRORS = {ISCSI_ERR_LOGIN_AUTH_FAILED, ISCSI_ERR_ACCESS}
#: What to do on a host where the kernel initiator cannot run (the end of those errors' messages).
USE_USERSPACE = "attach with --mode userspace (Shoal's own initiator) on this node"

#: open-iscsi's built-in ifaces (usr/iface.c ``default_ifaces``): not stored in /etc/iscsi/ifaces
#: and refused by ``-o update``, so they cannot carry the agent's initiator name.
BUILTIN_IFACES = frozenset({"default", "iser"})
#: The iface record fields the connector sets (open-iscsi usr/idbm_fields.h).
IFACE_TRANSPORT = "iface.transport_name"
IFACE_INITIATOR = "iface.initiatorname"
#: The node record's CHAP fields (usr/idbm.c ``idbm_recinfo_node``), in the order iscsiadm writes them.
AUTH_METHOD = "node.session.auth.authmethod"
AUTH_USERNAME = "node.session.auth.username"
AUTH_PASSWORD = "node.session.auth.password"
AUTH_USERNAME_IN = "node.session.auth.username_in"
AUTH_PASSWORD_IN = "node.session.auth.password_in"
CREDENTIAL_FIELDS = (AUTH_USERNAME, AUTH_PASSWORD, AUTH_USERNAME_IN, AUTH_PASSWORD_IN)
#: What ``-o show`` prints for a secret that is set (``IDBM_MASKED``).
MASKED = "********"
#: The fields that name a node record and its file (usr/idbm.c ``idbm_rec_read``).
RECORD_NAME = "node.name"
RECORD_TPGT = "node.tpgt"
RECORD_ADDRESS = "node.conn[0].address"
RECORD_PORT = "node.conn[0].port"
RECORD_IFACE = "iface.iscsi_ifacename"
RECORD_KEYS = (RECORD_NAME, RECORD_TPGT, RECORD_ADDRESS, RECORD_PORT, RECORD_IFACE)
#: open-iscsi keeps CHAP values in 256-byte buffers (``AUTH_STR_MAX_LEN``), NUL included.
AUTH_STR_MAX_LEN = 256

Writer = Callable[[str, str], None]


def write_sysfs(path: str, text: str) -> None:
    """Write one value to a sysfs attribute (the default ``KernelSettings.write``)."""
    with open(path, "w") as f:
        f.write(text)


@dataclass
class KernelSettings:
    """Where the kernel connector looks and how long it waits."""

    sysfs: str = "/sys"
    """Root of sysfs; a test points it at a fake tree."""
    dev: str = "/dev"
    """Root of the device nodes and udev's ``disk/by-path`` links."""
    device_timeout: float = 20.0
    """Seconds to wait for the scanned LUN's block device (TCG guests need several)."""
    by_path_timeout: float = 5.0
    """Seconds to wait for udev's by-path link; without udev the sysfs name is used alone."""
    removal_timeout: float = 10.0
    """Seconds to wait until a deleted SCSI device is gone."""
    poll_interval: float = 0.05
    initiator_iqn: str | None = None
    """The agent's initiator name (``iqn.2026-11.io.shoal:node:<node>``), the only one its exports' ACLs admit.

    Logins present it through the ``iface`` record.  None refuses to log in: the host's
    ``/etc/iscsi/initiatorname.iscsi`` is never used (the targets would refuse it anyway)."""
    iface: str = "shoal"
    """Name of the open-iscsi iface record the connector owns (iscsi_tcp, ``iface.initiatorname`` =
    ``initiator_iqn``), created on first login; not one of open-iscsi's built-in ``default``/``iser``."""
    lock_dir: str | None = None
    """Directory for cross-process per-target lock files; None for in-process locks only."""
    header_digest: tuple[str, ...] = ("None",)
    data_digest: tuple[str, ...] = ("None",)
    """Digests offered at login, in order of preference (open-iscsi ``node.conn[0].iscsi.*Digest``)."""
    node_dirs: tuple[str, ...] = ("/etc/iscsi/nodes", "/var/lib/iscsi/nodes")
    """Where open-iscsi may keep node records (its build's ``NODE_CONFIG_DIR``: Debian and Ubuntu use the
    first, Fedora, RHEL and SUSE the second).  The CHAP credentials go into the record's file in the first
    that has it; ``-o show`` then proves iscsiadm reads them there."""
    write: Writer = write_sysfs
    """How sysfs attributes are written (a test records and simulates the kernel)."""
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


# --------------------------------------------------------------------------- iscsiadm -m session -P 3

@dataclass(frozen=True)
class ScsiLun:
    lun: int
    disk: str | None
    """Block device name (``sdb``), None while it has none."""


@dataclass(frozen=True)
class Session:
    """One logged-in session as ``iscsiadm -m session -P 3`` shows it."""

    sid: int
    target_iqn: str
    portal: str
    """Persistent portal (the node record's), ``host:port`` without the TPGT."""
    host: int | None
    luns: tuple[ScsiLun, ...] = ()

    def disk(self, lun: int) -> str | None:
        return next((x.disk for x in self.luns if x.lun == lun), None)


_TARGET = re.compile(r"^Target:\s*(\S+)")
_PORTAL = re.compile(r"^\s*Persistent Portal:\s*(\S+?)(?:,\d+)?\s*$")
_CURRENT_PORTAL = re.compile(r"^\s*Current Portal:\s*(\S+?)(?:,\d+)?\s*$")
_SID = re.compile(r"^\s*SID:\s*(\d+)")
_HOST = re.compile(r"^\s*Host Number:\s*(\d+)")
_LUN = re.compile(r"^\s*scsi(\d+) Channel \d+ Id \d+ Lun: (\d+)")
_DISK = re.compile(r"^\s*Attached scsi disk (\S+)")


def parse_sessions(text: str) -> list[Session]:
    """Sessions from ``iscsiadm -m session -P 3`` (open-iscsi ``usr/session_info.c``)."""
    sessions: list[Session] = []
    target = portal = None
    current: dict | None = None

    def close():
        if current is not None and current.get("sid") is not None:
            sessions.append(Session(current["sid"], current["target"], current["portal"], current.get("host"),
                                    tuple(current["luns"])))

    for line in text.splitlines():
        if m := _TARGET.match(line):
            target, portal = m.group(1), None
        elif m := _CURRENT_PORTAL.match(line):
            portal = m.group(1)  # a second session to the same portal prints no portal lines
        elif m := _PORTAL.match(line):
            portal = m.group(1)
        elif m := _SID.match(line):
            close()
            current = {"sid": int(m.group(1)), "target": target, "portal": portal, "luns": []}
        elif current is None:
            continue
        elif m := _HOST.match(line):
            current["host"] = int(m.group(1))
        elif m := _LUN.match(line):
            current["luns"].append(ScsiLun(int(m.group(2)), None))
            current.setdefault("host", int(m.group(1)))
        elif (m := _DISK.match(line)) and current["luns"]:
            current["luns"][-1] = ScsiLun(current["luns"][-1].lun, m.group(1))
    close()
    return sessions


# --------------------------------------------------------------------------- the connector

@dataclass
class KernelConnector(Connector):
    """Attach with open-iscsi; see the module docstring for the sequences."""

    runner: Runner = field(default_factory=SubprocessRunner)
    settings: KernelSettings = field(default_factory=KernelSettings)
    registry: SessionRegistry = field(default_factory=SessionRegistry)

    def __post_init__(self):
        self._locks = TargetLocks(self.settings.lock_dir)

    # ---- public

    def attach(self, target: VolumeTarget) -> AttachedDevice:
        with self._locks.hold(target.session_key), _system_errors(target):
            sessions = self._sessions(target)
            for session in sessions:
                disk = session.disk(target.lun)
                if disk:
                    return self._reuse(target, session, disk)
            if sessions:
                return self._attach_lun(target, sessions[0])
            session = self._login(target)
            try:
                return self._attach_lun(target, session)
            except IdentityMismatch:
                raise  # _attach_lun removed the disk and logged out already
            except BaseException:
                self._abandon_login(target, session)
                raise

    def detach(self, target: VolumeTarget) -> None:
        with self._locks.hold(target.session_key), _system_errors(target):
            sessions = self._sessions(target)
            for session in sessions:
                disk = session.disk(target.lun)
                if disk:
                    self._check(target, disk)  # never flush or delete another volume's disk
                    refuse_if_busy(self._dev(disk))  # nor one a mount, device-mapper, LVM, md or mkfs holds
                    self.runner.run(["blockdev", "--flushbufs", self._dev(disk)])
                    self._delete_disk(disk)
            self.registry.release(target.session_key, target.lun)
            if not self.registry.holders(target.session_key):
                self._logout(target, sessions)

    def rescan(self, target: VolumeTarget) -> int:
        """The kernel re-reads the LUN's capacity (``/sys/block/sdX/device/rescan``); the disk's size in bytes."""
        with self._locks.hold(target.session_key), _system_errors(target):
            disk = self._attached_disk(target)
            self._check(target, disk)  # never rescan (or report) another volume's disk
            self.settings.write(self._sys("block", disk, "device", "rescan"), "1")
            with open(self._sys("block", disk, "size"), encoding="ascii") as f:
                return int(f.read().strip()) * 512  # sysfs counts 512-byte sectors whatever the block size

    def condition(self, target: VolumeTarget) -> str:
        """"" while the session shows the LUN's disk and the SCSI layer counted no I/O error on it."""
        try:
            with _system_errors(target):
                disk = self._attached_disk(target)
        except PermanentConnectorError as exc:
            return str(exc)
        except TemporaryConnectorError as exc:
            return f"cannot read the iSCSI sessions: {exc}"
        errors = _read(self._sys("block", disk, "device", "ioerr_cnt"))
        if errors and int(errors.strip() or b"0", 0):
            return f"{disk}: the SCSI layer counted {int(errors.strip(), 0)} I/O errors"
        state = _read(self._sys("block", disk, "device", "state"))
        if state and state.strip() != b"running":
            return f"{disk}: SCSI device state {state.strip().decode(errors='replace')}"
        return ""

    def foreign_device(self, target: VolumeTarget, path: str) -> str:
        """Why ``path`` is not the disk of ``target``'s LUN ("" when it is): a session of the target must show
        the LUN with that disk, and the disk's VPD pages must name the volume.  A session that ended behind
        the agent's back (a host reboot, ``iscsiadm --logoutall``) leaves a recorded ``/dev/sdX`` that may
        be another volume's disk by now.  Sessions that cannot be read raise ``TemporaryConnectorError``:
        no answer is a guess."""
        disk = os.path.basename(path)
        if path != self._dev(disk):
            return f"{path} is not a disk in {self.settings.dev}"
        with self._locks.hold(target.session_key), _system_errors(target):
            shown = sorted({d for s in self._sessions(target) if (d := s.disk(target.lun))})
            if disk not in shown:
                return (f"no session of {target.target_iqn} shows {disk} as LUN {target.lun} "
                        f"(they show {', '.join(shown) or 'no disk'} there)")
            try:
                self._check(target, disk)
            except IdentityMismatch as exc:
                return f"{disk}: {exc}"
        return ""

    def reassigned(self, target: VolumeTarget, path: str) -> str:
        """A disk that is not the LUN's (``foreign_device``) is another's or nothing: a SCSI disk has no dead
        state that would still be the volume's."""
        return self.foreign_device(target, path)

    def _attached_disk(self, target: VolumeTarget) -> str:
        for session in self._sessions(target):
            disk = session.disk(target.lun)
            if disk:
                return disk
        raise PermanentConnectorError(f"LUN {target.lun} of {target.target_iqn} has no disk on this host "
                                      "(session down or never attached)")

    # ---- system state

    def _sessions(self, target: VolumeTarget) -> list[Session]:
        """The target's sessions, and the reference count rebuilt from them.

        Every LUN with a disk counts, also one this process did not attach
        (left by a previous agent): a session is never logged out under a disk.
        """
        result = self.runner.run(["iscsiadm", "-m", "session", "-P", "3"], check=False)
        if result.returncode not in (0, ISCSI_ERR_NO_OBJS_FOUND):
            raise TemporaryConnectorError(f"iscsiadm -m session -P 3 exited {result.returncode}: "
                                          f"{result.stderr.strip()}")
        mine = [s for s in parse_sessions(result.stdout)
                if s.target_iqn == target.target_iqn and s.portal in target.portals]
        self.registry.replace(target.session_key, {x.lun for s in mine for x in s.luns if x.disk})
        return mine

    def _node(self, target: VolumeTarget, portal: str, *args) -> list:
        """A command on the target's node record bound to our iface."""
        return self._any_node(target, portal, "-I", self.settings.iface, *args)

    def _any_node(self, target: VolumeTarget, portal: str, *args) -> list:
        """A command on the target's node records through any iface (logout and delete: cleanup)."""
        return ["iscsiadm", "-m", "node", "-T", target.target_iqn, "-p", portal, *args]

    def _update(self, target: VolumeTarget, portal: str, name: str, value) -> None:
        self.runner.run(self._node(target, portal, "-o", "update", "-n", name, "-v", value))

    def _iface(self, *args) -> list:
        return ["iscsiadm", "-m", "iface", "-I", self.settings.iface, *args]

    def _ensure_iface(self) -> None:
        """Create or correct our iface record so that logins present the agent's initiator name.

        iscsid takes a session's InitiatorName from the node record's ``iface.initiatorname``
        and falls back to /etc/iscsi/initiatorname.iscsi only when that is empty (open-iscsi
        usr/initiator.c ``__session_create``).  ``-o new`` resets an existing record to its
        defaults (usr/iscsiadm.c ``exec_iface_op``), so it runs only when ``-o show`` finds
        none; updates run only for values that differ, and reach the node records bound to
        the iface as well.
        """
        iqn, name = self.settings.initiator_iqn, self.settings.iface
        if not iqn:
            raise PermanentConnectorError("the kernel connector has no initiator name (KernelSettings.initiator_iqn); "
                                          "it never logs in with the host's /etc/iscsi/initiatorname.iscsi")
        if name in BUILTIN_IFACES:
            raise PermanentConnectorError(f"iface {name!r} is built into open-iscsi and cannot carry "
                                          "the agent's initiator name")
        shown = self.runner.run(self._iface("-o", "show"), check=False)
        values = parse_record(shown.stdout) if shown.returncode == 0 else None
        try:
            if values is None:  # no such record (iscsiadm exits ISCSI_ERR_IDBM)
                self.runner.run(self._iface("-o", "new"))
                values = {}
            for key, wanted in ((IFACE_TRANSPORT, "tcp"), (IFACE_INITIATOR, iqn)):
                if values.get(key) != wanted:
                    self.runner.run(self._iface("-o", "update", "-n", key, "-v", wanted))
        except CommandFailed as exc:
            # iscsiadm loads the transport's module itself (libkmod) and exits ISCSI_ERR_INVAL ("Cound not
            # locate transport for iface") when it cannot: a kernel without iscsi_tcp (a container, a VM
            # kernel built without it).  No retry makes one appear, so the caller must hear "not here".
            if not self._has_tcp_transport():
                raise PermanentConnectorError(self._no_transport(exc)) from exc
            raise

    def _has_tcp_transport(self) -> bool:
        """The kernel has the iscsi_tcp transport (loaded or built in): what iscsiadm looks up in sysfs."""
        return os.path.isdir(self._sys("class", "iscsi_transport", "tcp"))

    def _no_transport(self, exc: CommandFailed) -> str:
        return (f"the kernel connector cannot work on this node: its kernel has no iscsi_tcp transport "
                f"(no {self._sys('class', 'iscsi_transport', 'tcp')}; {exc}); load it (modprobe iscsi_tcp, on "
                f"the host for a container) and run iscsid, or {USE_USERSPACE}")

    def _configure_node(self, target: VolumeTarget, portal: str) -> None:
        shown = self.runner.run(self._node(target, portal), check=False)
        if shown.returncode == ISCSI_ERR_NO_OBJS_FOUND:
            self.runner.run(self._node(target, portal, "-o", "new"))
        elif shown.returncode != 0:
            raise TemporaryConnectorError(f"iscsiadm cannot read the node record of {target.target_iqn} "
                                          f"at {portal}: exit {shown.returncode}")
        # The agent, not iscsid's startup, decides which sessions exist after a reboot.
        self._update(target, portal, "node.startup", "manual")
        # Login must not scan every LUN of the target into this host; we scan ours.
        self._update(target, portal, "node.session.scan", "manual")
        self._update(target, portal, "node.conn[0].iscsi.HeaderDigest", ",".join(self.settings.header_digest))
        self._update(target, portal, "node.conn[0].iscsi.DataDigest", ",".join(self.settings.data_digest))
        self._configure_chap(target, portal)

    def _configure_chap(self, target: VolumeTarget, portal: str) -> None:
        """The CHAP settings of the node record, with no secret on any command line.

        ``-o update -n node.session.auth.password -v SECRET`` (what os-brick runs) would put the secret
        in iscsiadm's argv, which every local user reads in /proc/PID/cmdline while it runs.  iscsiadm
        sets the method; the four credential lines go into the record's file in iscsiadm's own
        ``name = value`` format (usr/idbm.c ``idbm_print``), through the runner, where iscsiadm runs.
        Lines left by an earlier attach (another secret, CHAP since turned off) are replaced or removed.
        ``-o show`` afterwards must show the user names and a masked secret exactly where one is set:
        that is iscsiadm reading the file written, which the login then reads too.
        """
        wanted = _credentials(target)
        self._update(target, portal, AUTH_METHOD, "None" if target.chap is None else "CHAP")
        records = self._records(target, portal)
        written = [self._write_credentials(record, wanted) for record in records]
        if any(written):
            records = self._records(target, portal)  # what iscsiadm reads now
        expected = {key: MASKED if value and key in (AUTH_PASSWORD, AUTH_PASSWORD_IN) else value
                    for key, value in wanted.items()}
        for record in records:
            if {key: record.get(key, "") for key in CREDENTIAL_FIELDS} != expected:
                raise TemporaryConnectorError(f"iscsiadm does not show the CHAP settings put into the node "
                                              f"record of {target.target_iqn} at {portal} (are its node "
                                              f"records in {' or '.join(self.settings.node_dirs)}?)")

    def _records(self, target: VolumeTarget, portal: str) -> list[dict[str, str]]:
        """The node records ``-o show`` prints for the target and portal on our iface (one per TPGT)."""
        records = parse_records(self.runner.run(self._node(target, portal, "-o", "show")).stdout)
        if not records:
            raise TemporaryConnectorError(f"iscsiadm shows no node record of {target.target_iqn} at {portal}")
        return records

    def _write_credentials(self, record: dict[str, str], wanted: dict[str, str]) -> bool:
        """Put ``wanted`` into the file of ``record``; whether it had to be written.

        The file is where usr/idbm.c ``idbm_rec_read`` looks: ``TARGET/ADDR,PORT`` (what ``-o new`` makes
        without a TPGT), else ``TARGET/ADDR,PORT,TPGT/IFACE``.  It must name the record ``-o show`` printed.
        The agent's per-target lock keeps its own iscsiadm runs off the record meanwhile, so iscsiadm's
        database lock is not taken; the rename makes the change atomic for any reader.
        """
        name, tpgt, address, port, iface = (record.get(key, "") for key in RECORD_KEYS)
        portal_dir = f"{address},{port}"
        for part in (name, address, port, tpgt, iface):
            if not part or "/" in part or part in (".", ".."):
                raise TemporaryConnectorError("iscsiadm shows a node record without a usable name: "
                                              + ", ".join(f"{key} = {record.get(key, '')}" for key in RECORD_KEYS))
        for root in self.settings.node_dirs:
            target_dir = os.path.join(root, name)
            for path in (os.path.join(target_dir, portal_dir),
                         os.path.join(target_dir, f"{portal_dir},{tpgt}", iface)):
                text = self.runner.read_private(path)
                if text is None:
                    continue
                found = parse_record(text)
                if any(found.get(key) != record[key] for key in RECORD_KEYS):
                    raise TemporaryConnectorError(f"{path} is not the node record iscsiadm shows for {name} "
                                                  f"at {portal_dir} (TPGT {tpgt}, iface {iface})")
                updated = with_credentials(text, wanted)
                if updated == text:
                    return False
                self.runner.write_private(path, Hidden(updated), temp_dir=target_dir)
                log.debug("%s: CHAP settings of the node record at %s written into %s", name, portal_dir, path)
                return True
        raise TemporaryConnectorError(f"no file of the node record of {name} at {portal_dir} (TPGT {tpgt}, "
                                      f"iface {iface}) in {', '.join(self.settings.node_dirs)}")

    def _login(self, target: VolumeTarget) -> Session:
        """Log in through the first portal that accepts us (one path; no multipath)."""
        self._ensure_iface()
        errors = []
        for portal in target.portals:
            try:
                self._configure_node(target, portal)
            except BaseException:
                # No half-configured record (it may hold a secret by now) outlives the failed attach.
                self.runner.run(self._any_node(target, portal, "-o", "delete"), check=False)
                raise
            try:
                self.runner.run(self._node(target, portal, "--login"))
            except CommandFailed as exc:
                if exc.result.returncode != ISCSI_ERR_SESS_EXISTS:
                    errors.append(exc)
                    self.runner.run(self._any_node(target, portal, "-o", "delete"), check=False)
                    continue
            session = next((s for s in self._sessions(target) if s.portal == portal), None)
            if session is None:
                raise TemporaryConnectorError(f"logged in to {target.target_iqn} at {portal} but no session shows")
            return session
        if errors and all(e.result.returncode == ISCSI_ERR_ISCSID_NOTCONN for e in errors):
            # iscsiadm already ran iscsid.startup and tried again: the host's open-iscsi is not set up.
            raise PermanentConnectorError(
                f"the kernel connector cannot work on this node: iscsid does not answer on its control socket "
                f"({errors[-1]}); start it (systemctl enable --now iscsid.socket) or {USE_USERSPACE}")
        if errors and all(e.result.returncode == ISCSI_ERR_TRANS_NOT_FOUND for e in errors):
            raise PermanentConnectorError(self._no_transport(errors[-1]))
        if errors and all(e.result.returncode in _PERMANENT_LOGIN_ERRORS for e in errors):
            raise PermanentConnectorError(f"login to {target.target_iqn} refused: {errors[-1]}")
        raise TemporaryConnectorError(f"login to {target.target_iqn} failed on every portal: "
                                      + "; ".join(str(e) for e in errors))

    def _abandon_login(self, target: VolumeTarget, session: Session) -> None:
        """Undo the login of an attach that failed before it had a device (no disk within ``device_timeout``,
        several disks, no SCSI host yet): delete what the scan brought in, then log out and forget the node
        record, unless another LUN of the target shows a disk by now.  Nobody was given a disk of this
        session.  Best effort: the attach's own error is the answer, and a repeat logs in again."""
        try:
            for disk in self._lun_disks(target, session):
                self._delete_disk(disk)
            sessions = self._sessions(target)
            others = self.registry.holders(target.session_key) - {target.lun}
            if others:
                log.warning("%s: the session of the failed attach of LUN %d stays: LUNs %s have disks",
                            target.target_iqn, target.lun, sorted(others))
                return
            self._logout(target, sessions or [session])
        except Exception as exc:
            log.warning("%s: logging out after the failed attach of LUN %d failed: %s", target.target_iqn,
                        target.lun, exc)

    def _logout(self, target: VolumeTarget, sessions: list[Session]) -> None:
        """Log out of the target's sessions and forget the node records (absent ones are fine).

        No iface is named: ``sessions`` (matched by target and portal) may hold one an older
        Shoal logged in through the ``default`` iface, and it ends with ours.
        """
        for portal in target.portals:
            if any(s.portal == portal for s in sessions):
                self.runner.run(self._any_node(target, portal, "--logout"), check=False)
            self.runner.run(self._any_node(target, portal, "-o", "delete"), check=False)

    # ---- the LUN

    def _attach_lun(self, target: VolumeTarget, session: Session) -> AttachedDevice:
        if session.host is None:
            raise TemporaryConnectorError(f"session {session.sid} of {target.target_iqn} has no SCSI host yet")
        self.settings.write(self._sys("class", "scsi_host", f"host{session.host}", "scan"), f"0 0 {target.lun}")
        disk = self._wait_for_disk(target, session)
        try:
            device = self._verified(target, session, disk)
        except IdentityMismatch:
            self._delete_disk(disk)  # nobody has opened it yet: it never existed for the caller
            if not self.registry.holders(target.session_key):
                self._logout(target, [session])
            raise
        self.registry.acquire(target.session_key, target.lun)
        return device

    def _reuse(self, target: VolumeTarget, session: Session, disk: str) -> AttachedDevice:
        # VPD pages in sysfs are read at scan time; ask the kernel to re-read
        # them, so a LUN replaced on the target behind a live session is seen.
        self.settings.write(self._sys("block", disk, "device", "rescan"), "1")
        # A mismatch here is not deleted: the disk may be in use by whoever it
        # really belongs to.  The caller gets an error, never the device.
        device = self._verified(target, session, disk)
        self.registry.acquire(target.session_key, target.lun)
        return device

    def _verified(self, target: VolumeTarget, session: Session, disk: str) -> AttachedDevice:
        reported = self._check(target, disk)
        self._check_by_path(target, session, disk)
        return AttachedDevice(path=self._dev(disk), volume_id=target.volume_id, target=target,
                              naa=target.expected_naa, serial=reported.serial, handle=disk)

    def _check(self, target: VolumeTarget, disk: str):
        device = self._sys("block", disk, "device")
        reported = parse_vpd_identity(_read(os.path.join(device, "vpd_pg83")),
                                      _read(os.path.join(device, "vpd_pg80")))
        check_identity(target, reported)
        return reported

    def _check_by_path(self, target: VolumeTarget, session: Session, disk: str) -> None:
        """udev's by-path link for this LUN must name the same disk (waits briefly for udev)."""
        link = os.path.join(self.settings.dev, "disk", "by-path", by_path_name(session.portal, target))
        deadline = self.settings.clock() + self.settings.by_path_timeout
        while not os.path.lexists(link):
            if self.settings.clock() >= deadline:
                log.warning("no udev link %s; using %s from sysfs", link, disk)
                return
            self.settings.sleep(self.settings.poll_interval)
        if os.path.basename(os.path.realpath(link)) != disk:
            raise IdentityMismatch(f"{link} points to {os.path.realpath(link)}, but LUN {target.lun} "
                                   f"of session {session.sid} is {disk}")

    def _lun_disks(self, target: VolumeTarget, session: Session) -> list[str]:
        """The block devices sysfs shows for the LUN in ``session``."""
        if session.host is None:
            return []
        # iscsi_tcp gives each session its own SCSI host with channel 0 and
        # target id 0; the glob accepts any, the LUN must be ours.
        pattern = self._sys("class", "iscsi_session", f"session{session.sid}", "device",
                            f"target{session.host}:*:*", f"{session.host}:*:*:{target.lun}", "block", "*")
        return sorted(os.path.basename(p) for p in glob.glob(pattern))

    def _wait_for_disk(self, target: VolumeTarget, session: Session) -> str:
        address = f"{session.host}:0:0:{target.lun}"
        deadline = self.settings.clock() + self.settings.device_timeout
        while True:
            names = self._lun_disks(target, session)
            if len(names) > 1:
                raise PermanentConnectorError(f"LUN {target.lun} of session {session.sid} has several disks: {names}")
            if names and os.path.exists(self._dev(names[0])):
                return names[0]
            if self.settings.clock() >= deadline:
                raise TemporaryConnectorError(f"LUN {target.lun} of {target.target_iqn} (SCSI {address}) "
                                              f"has no block device after {self.settings.device_timeout:g} s")
            self.settings.sleep(self.settings.poll_interval)

    def _delete_disk(self, disk: str) -> None:
        """Remove the SCSI device (SCSI layer, not the LUN) and wait until it is gone."""
        device = self._sys("block", disk)
        if not os.path.exists(device):
            return
        self.settings.write(os.path.join(device, "device", "delete"), "1")
        deadline = self.settings.clock() + self.settings.removal_timeout
        while os.path.exists(device):
            if self.settings.clock() >= deadline:
                raise TemporaryConnectorError(f"{disk} still present {self.settings.removal_timeout:g} s "
                                              "after its deletion")
            self.settings.sleep(self.settings.poll_interval)

    # ---- paths

    def _sys(self, *parts: str) -> str:
        return os.path.join(self.settings.sysfs, *parts)

    def _dev(self, disk: str) -> str:
        return os.path.join(self.settings.dev, disk)


def parse_record(text: str) -> dict[str, str]:
    """The ``name = value`` lines of an iscsiadm record (``-m iface -I NAME``); ``<empty>`` is ""."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and not name.startswith("#"):
            value = value.strip()
            values[name.strip()] = "" if value == "<empty>" else value
    return values


def parse_records(text: str) -> list[dict[str, str]]:
    """The records of ``iscsiadm -m node ... -o show``, each opened by a ``# BEGIN RECORD`` line."""
    records: list[dict[str, str]] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("# BEGIN RECORD") or not records:
            records.append({})
        records[-1].update(parse_record(line))
    return [r for r in records if r]


def _credentials(target: VolumeTarget) -> dict[str, str]:
    """The four credential fields the record must hold for ``target`` ("" for none)."""
    user, secret = target.chap or ("", "")
    user_in, secret_in = target.mutual_chap or ("", "")
    values = {AUTH_USERNAME: user, AUTH_PASSWORD: secret, AUTH_USERNAME_IN: user_in, AUTH_PASSWORD_IN: secret_in}
    for value in values.values():
        # open-iscsi strips a line before reading its value and copies at most 255 bytes:
        # such a value would be read back as another one, and every login refused.
        if value != value.strip() or len(value.encode()) >= AUTH_STR_MAX_LEN:
            raise PermanentConnectorError(f"{target.target_iqn}: a CHAP user or secret with blanks at either end "
                                          f"or over {AUTH_STR_MAX_LEN - 1} bytes cannot go into a node record")
    return values


def _field_name(line: str) -> str:
    """The setting a record line sets, read as open-iscsi does (usr/idbm.c ``idbm_recinfo_config``)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return ""
    return re.split(r"[\s=]", line, maxsplit=1)[0]


def with_credentials(text: str, values: dict[str, str]) -> str:
    """The node record file ``text`` with its credential lines replaced by ``values`` (empty ones left out, as
    iscsiadm leaves out every empty field), right after the ``authmethod`` line where iscsiadm puts them."""
    # Lines as iscsiadm's fgets() reads them: ended by "\n" alone.
    lines = [line for line in re.split(r"(?<=\n)", text) if line and _field_name(line) not in values]
    ours = [f"{key} = {value}\n" for key, value in values.items() if value]
    names = [_field_name(line) for line in lines]
    if AUTH_METHOD in names:
        at = names.index(AUTH_METHOD) + 1
    else:
        at = next((i for i, line in enumerate(lines) if line.startswith("# END RECORD")), len(lines))
    if at == len(lines) and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines[:at] + ours + lines[at:])


def by_path_name(portal: str, target: VolumeTarget) -> str:
    """udev's ``ip-PORTAL-iscsi-IQN-lun-N`` name (udev drops IPv6 brackets)."""
    return f"ip-{portal.replace('[', '').replace(']', '')}-iscsi-{target.target_iqn}-lun-{target.lun}"


@contextlib.contextmanager
def _system_errors(target: VolumeTarget):
    """A failed command or sysfs write is a temporary connector error (the system may recover)."""
    try:
        yield
    except CommandFailed as exc:
        raise TemporaryConnectorError(f"{target.target_iqn} LUN {target.lun}: {exc}") from exc
    except OSError as exc:
        raise TemporaryConnectorError(f"{target.target_iqn} LUN {target.lun}: {exc}") from exc


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
