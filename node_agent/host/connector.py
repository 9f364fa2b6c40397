"""The host-attach interface both connectors implement, and what they share.

A connector turns a volume's connection properties (``VolumeTarget``, typed and
validated once, at the boundary, from a CSI publish context) into a local block
device (``AttachedDevice``) and back.  Three rules hold for every connector:

- **Identity before hand-out.**  The LUN must report the VPD page 83h NAA
  designator and/or the page 80h unit serial number the volume is known by
  (SPC-4 §7.8.6, §7.8.15).  A mismatch raises ``IdentityMismatch`` and no device
  path leaves the connector: the class of bug behind OSSA-2023-003 (a reused
  LUN path giving a VM another tenant's volume) is refused, not logged.
- **Reference-counted sessions.**  The LUNs of one target share a session
  (one login per portal); the session is logged out only when the last LUN of
  that target is detached (``SessionRegistry``).
- **Idempotency.**  Attaching an attached volume returns the same device;
  detaching what is gone succeeds.  Operations on one target are serialised by
  ``TargetLocks``.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from node_agent.iscsi.names import check_iqn
from node_agent.scsi.vpd import ASSOC_LOGICAL_UNIT, DESIGNATION_DESCRIPTOR, DESIGNATOR_NAA, VPD_HEADER

DEFAULT_ISCSI_PORT = 3260
MAX_LUN = 16383  # the flat/peripheral LUN addressing range (SAM-5 §4.7.7); what by-path links name

# Keys of a publish context (CSI ControllerPublishVolume's publish_context, a
# map of strings).  Secrets may come in the same map or, as CSI prefers, in a
# separate secrets map (NodeStageVolume's secrets); both are read alike.
CTX_PORTALS = "portals"            # comma-separated "host:port" ("[v6addr]:port"); "portal" accepted too
CTX_TARGET_IQN = "target_iqn"
CTX_LUN = "lun"
CTX_VOLUME_ID = "volume_id"
CTX_NAA = "naa"                    # hex of the NAA designator, optional "0x"/"naa." prefix
CTX_SERIAL = "serial"
CTX_CHAP_USER, CTX_CHAP_SECRET = "chap_user", "chap_secret"
CTX_MUTUAL_CHAP_USER, CTX_MUTUAL_CHAP_SECRET = "mutual_chap_user", "mutual_chap_secret"

#: The node label an agent announces at registration: which connector its CSI NodeStageVolume logs in with.
CONNECTOR_LABEL = "shoal.io/connector"

_HEX = re.compile(r"^[0-9a-f]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: iscsid's control socket, in the abstract namespace of the network namespace (open-iscsi
#: usr/mgmt_ipc.h ``ISCSIADM_NAMESPACE``): iscsiadm sends every login and logout there.
ISCSID_SOCKET = "\0ISCSIADM_ABSTRACT_NAMESPACE"


def iscsid_reachable(address: str = ISCSID_SOCKET, timeout: float = 1.0) -> bool:
    """True when something accepts connections on iscsid's control socket (iscsid, or systemd's
    ``iscsid.socket`` that starts it).

    ``iscsiadm -m session`` cannot tell: it reads sysfs and asks iscsid nothing while no session
    exists (usr/session_info.c), and the commands that need iscsid (``--login``) exit
    ISCSI_ERR_ISCSID_NOTCONN (20) only after running iscsid.conf's ``iscsid.startup`` and a second
    try.  Connecting and closing is what iscsiadm's ``ipc_connect`` does first; iscsid drops a
    connection that closes before a request (usr/mgmt_ipc.c ``mgmt_ipc_handle``).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def preferred_connector(sys_module: str = "/sys/module", iscsiadm: str | None = None,
                        iscsid: Callable[[], bool] = iscsid_reachable) -> str:
    """"kernel" where the kernel's iSCSI initiator can run (``iscsi_tcp`` loaded, open-iscsi's ``iscsiadm``
    installed and ``iscsid`` reachable), else "userspace" (Shoal's initiator with FUSE and a loop device).

    ``iscsid`` is asked last, only where the other two hold (a connect on a local socket)."""
    import shutil

    iscsiadm = iscsiadm if iscsiadm is not None else (shutil.which("iscsiadm") or "")
    if not (os.path.isdir(os.path.join(sys_module, "iscsi_tcp")) and iscsiadm):
        return "userspace"
    return "kernel" if iscsid() else "userspace"


# --------------------------------------------------------------------------- errors

class ConnectorError(Exception):
    """Attaching or detaching failed."""


class TemporaryConnectorError(ConnectorError):
    """May succeed when retried after a delay (target unreachable, device not yet visible)."""


class PermanentConnectorError(ConnectorError):
    """Retrying the same request cannot help."""


class InvalidVolumeTarget(PermanentConnectorError, ValueError):
    """The connection properties are missing or malformed; the message names the key."""


class IdentityMismatch(PermanentConnectorError):
    """The LUN is not the volume we were asked for: it is never handed out."""


# --------------------------------------------------------------------------- typed properties

def normalise_portal(text: str) -> str:
    """``ADDR[:port]`` or ``[V6ADDR][:port]`` -> ``ADDR:port``; raises on anything else.

    Addresses must be IP literals: open-iscsi records and reports sessions by
    address, so a host name could never be matched to its session again (and
    a name that resolves differently later would reach another machine).
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidVolumeTarget(f"portal {text!r}: expected [IPv6]:port")
        port = rest[1:] if rest else str(DEFAULT_ISCSI_PORT)
    else:
        host, _, port = text.partition(":")
        port = port or str(DEFAULT_ISCSI_PORT)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidVolumeTarget(f"portal {text!r}: expected an IP address and port (IPv6 in brackets)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidVolumeTarget(f"portal {text!r}: port must be 1-65535")
    shown = f"[{address.compressed}]" if address.version == 6 else str(address)
    return f"{shown}:{int(port)}"


def normalise_naa(text: str) -> str:
    """Lowercase hex of an 8- or 16-byte NAA designator, without ``0x``/``naa.`` prefixes or separators."""
    value = text.strip().lower()
    for prefix in ("naa.", "0x"):
        value = value.removeprefix(prefix)
    value = value.replace(":", "").replace("-", "")
    if not _HEX.fullmatch(value) or len(value) not in (16, 32):
        raise InvalidVolumeTarget(f"naa {text!r}: expected 16 or 32 hex digits (an 8- or 16-byte NAA designator)")
    return value


def _check_credential(what: str, pair: tuple[str, str] | None) -> None:
    if pair is None:
        return
    user, secret = pair
    if not user or not secret:
        raise InvalidVolumeTarget(f"{what}: both user and secret are required")
    # open-iscsi keeps node records as "name = value" lines: a newline in a
    # value would write a second setting.  No control characters at all.
    if _CONTROL.search(user) or _CONTROL.search(secret):
        raise InvalidVolumeTarget(f"{what}: control characters are not allowed in a user or secret")


@dataclass(frozen=True, repr=False)
class VolumeTarget:
    """Where a volume is served and who it must be (typed publish context)."""

    portals: tuple[str, ...]
    """Normalised ``host:port`` of every portal (one session each)."""
    target_iqn: str
    lun: int
    volume_id: str
    """The identity we expect; used for logging and the device record."""
    expected_naa: str | None
    """Lowercase hex of the VPD 83h NAA designator (logical-unit association) the LUN must report."""
    expected_serial: str | None
    """The VPD 80h unit serial number the LUN must report."""
    chap: tuple[str, str] | None = None
    """(user, secret) the initiator presents; the secret is never in a repr."""
    mutual_chap: tuple[str, str] | None = None
    """(user, secret) the target must present back (mutual CHAP)."""

    def __post_init__(self):
        if not self.portals:
            raise InvalidVolumeTarget("at least one portal is required")
        object.__setattr__(self, "portals", tuple(normalise_portal(p) for p in self.portals))
        try:
            check_iqn(self.target_iqn)
        except ValueError as exc:
            raise InvalidVolumeTarget(f"target_iqn: {exc}") from None
        if isinstance(self.lun, bool) or not isinstance(self.lun, int) or not 0 <= self.lun <= MAX_LUN:
            raise InvalidVolumeTarget(f"lun {self.lun!r}: expected an integer 0-{MAX_LUN}")
        if not self.volume_id or _CONTROL.search(self.volume_id):
            raise InvalidVolumeTarget("volume_id is required (printable text)")
        if self.expected_naa is None and not self.expected_serial:
            raise InvalidVolumeTarget("an expected identity is required: naa and/or serial "
                                      "(a LUN is never handed out unchecked)")
        if self.expected_naa is not None:
            object.__setattr__(self, "expected_naa", normalise_naa(self.expected_naa))
        if self.mutual_chap is not None and self.chap is None:
            raise InvalidVolumeTarget("mutual CHAP requires CHAP (the initiator authenticates first)")
        _check_credential("chap", self.chap)
        _check_credential("mutual_chap", self.mutual_chap)

    @property
    def session_key(self) -> tuple[str, tuple[str, ...]]:
        """What the LUNs of one session share: the target and its portals."""
        return (self.target_iqn, self.portals)

    def __repr__(self) -> str:
        def hidden(pair):
            return None if pair is None else (pair[0], "***")
        return (f"VolumeTarget(portals={self.portals!r}, target_iqn={self.target_iqn!r}, lun={self.lun}, "
                f"volume_id={self.volume_id!r}, expected_naa={self.expected_naa!r}, "
                f"expected_serial={self.expected_serial!r}, chap={hidden(self.chap)!r}, "
                f"mutual_chap={hidden(self.mutual_chap)!r})")

    __str__ = __repr__

    @classmethod
    def from_publish_context(cls, ctx: Mapping[str, str],
                             secrets: Mapping[str, str] | None = None) -> "VolumeTarget":
        """Validate and convert a publish context (and optional secrets map); errors name the key."""
        merged = {**ctx, **(secrets or {})}

        def need(key: str) -> str:
            value = merged.get(key, "").strip()
            if not value:
                raise InvalidVolumeTarget(f"publish context lacks {key!r}")
            return value

        portals_text = merged.get(CTX_PORTALS) or merged.get("portal") or ""
        portals = tuple(p for p in (s.strip() for s in portals_text.split(",")) if p)
        if not portals:
            raise InvalidVolumeTarget(f"publish context lacks {CTX_PORTALS!r}")
        lun_text = need(CTX_LUN)
        if not lun_text.isdigit():
            raise InvalidVolumeTarget(f"lun {lun_text!r}: expected an integer 0-{MAX_LUN}")
        return cls(
            portals=portals,
            target_iqn=need(CTX_TARGET_IQN),
            lun=int(lun_text),
            volume_id=need(CTX_VOLUME_ID),
            expected_naa=merged.get(CTX_NAA) or None,
            expected_serial=merged.get(CTX_SERIAL) or None,
            chap=_pair(merged, CTX_CHAP_USER, CTX_CHAP_SECRET),
            mutual_chap=_pair(merged, CTX_MUTUAL_CHAP_USER, CTX_MUTUAL_CHAP_SECRET),
        )


def _pair(merged: Mapping[str, str], user_key: str, secret_key: str) -> tuple[str, str] | None:
    user, secret = merged.get(user_key, ""), merged.get(secret_key, "")
    if not user and not secret:
        return None
    if not user or not secret:
        raise InvalidVolumeTarget(f"publish context has only one of {user_key!r} and {secret_key!r}")
    return (user, secret)


@dataclass(frozen=True)
class AttachedDevice:
    """A local block device that was checked to be the volume."""

    path: str
    """The device node handed to the caller (e.g. ``/dev/sdb``, ``/dev/loop3``)."""
    volume_id: str
    target: VolumeTarget
    naa: str | None = None
    """NAA designator the device reported (lowercase hex), as checked."""
    serial: str | None = None
    """Unit serial number the device reported, as checked."""
    handle: str = ""
    """Connector-specific name of the attachment (kernel: ``sdX``; userspace: its FUSE file)."""


# --------------------------------------------------------------------------- identity

@dataclass(frozen=True)
class ReportedIdentity:
    """What a LUN says it is: every logical-unit NAA designator (hex) and the unit serial number."""

    naas: tuple[str, ...]
    serial: str | None


def parse_vpd_identity(pg83: bytes | None, pg80: bytes | None) -> ReportedIdentity:
    """Decode the NAA designators of VPD page 83h and the serial of page 80h (SPC-4 §7.8.6, §7.8.15)."""
    naas: list[str] = []
    if pg83 and len(pg83) >= VPD_HEADER.size:
        end = min(len(pg83), VPD_HEADER.size + VPD_HEADER.decode(pg83).page_length)
        offset = VPD_HEADER.size
        while offset + DESIGNATION_DESCRIPTOR.size <= end:
            d = DESIGNATION_DESCRIPTOR.decode(pg83, offset)
            value = bytes(pg83[offset + 4: offset + 4 + d.designator_length])
            if d.designator_type == DESIGNATOR_NAA and d.association == ASSOC_LOGICAL_UNIT:
                naas.append(value.hex())
            offset += 4 + d.designator_length
    serial = None
    if pg80 and len(pg80) >= VPD_HEADER.size:
        length = VPD_HEADER.decode(pg80).page_length
        serial = bytes(pg80[4:4 + length]).decode("ascii", "replace").strip(" \0")
    return ReportedIdentity(tuple(naas), serial)


def check_identity(target: VolumeTarget, reported: ReportedIdentity) -> None:
    """Raise ``IdentityMismatch`` unless every expected identifier is reported exactly."""
    problems = []
    if target.expected_naa is not None and target.expected_naa not in reported.naas:
        problems.append(f"NAA {target.expected_naa} expected, LUN reports {list(reported.naas) or 'none'}")
    if target.expected_serial is not None and reported.serial != target.expected_serial:
        problems.append(f"serial {target.expected_serial!r} expected, LUN reports {reported.serial!r}")
    if problems:
        raise IdentityMismatch(f"LUN {target.lun} of {target.target_iqn} is not volume {target.volume_id}: "
                               + "; ".join(problems))


# --------------------------------------------------------------------------- locks and counts

class TargetLocks:
    """One lock per target (``VolumeTarget.session_key``), so login/logout of a session never race.

    Within a process a ``threading.Lock`` per key; with ``lock_dir`` also an
    ``flock`` on a file per key, so a restarted agent and one still draining (or
    two tools on one host) serialise too.
    """

    def __init__(self, lock_dir: str | None = None):
        self._lock_dir = lock_dir
        self._guard = threading.Lock()
        self._locks: dict[object, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, key: tuple[str, tuple[str, ...]]) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if self._lock_dir is None:
                yield
                return
            os.makedirs(self._lock_dir, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9.-]", "_", key[0])[:200] + ".lock"
            fd = os.open(os.path.join(self._lock_dir, name), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock


@dataclass
class SessionRegistry:
    """Which LUNs of each target are attached: the reference count behind login/logout.

    Connectors that can see the system rebuild an entry with ``replace`` after
    a restart (the kernel connector from ``iscsiadm -m session -P 3``), so the
    count survives the agent.
    """

    _luns: dict[tuple[str, tuple[str, ...]], set[int]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def acquire(self, key, lun: int) -> bool:
        """Count ``lun`` as attached; True if it is the first LUN of the target (a login is needed)."""
        with self._guard:
            luns = self._luns.setdefault(key, set())
            first = not luns
            luns.add(lun)
            return first

    def release(self, key, lun: int) -> bool:
        """Forget ``lun``; True if no LUN of the target remains (the session may be logged out)."""
        with self._guard:
            luns = self._luns.get(key, set())
            luns.discard(lun)
            if not luns:
                self._luns.pop(key, None)
                return True
            return False

    def holders(self, key) -> frozenset[int]:
        with self._guard:
            return frozenset(self._luns.get(key, ()))

    def replace(self, key, luns) -> None:
        """Set the attached LUNs of a target from what the system shows."""
        with self._guard:
            if luns:
                self._luns[key] = set(luns)
            else:
                self._luns.pop(key, None)


class Connector(abc.ABC):
    """Attach a volume as a local block device, and detach it."""

    @abc.abstractmethod
    def attach(self, target: VolumeTarget) -> AttachedDevice:
        """Return a device proven to be ``target``'s volume.  Idempotent: a second attach reuses.

        Raises ``IdentityMismatch`` (and leaves no device behind) when the LUN
        reports another identity; ``TemporaryConnectorError`` when a retry may help.
        """

    @abc.abstractmethod
    def detach(self, target: VolumeTarget) -> None:
        """Flush and remove the device; log out when it was the target's last LUN.  Detaching what is gone succeeds."""

    def rescan(self, target: VolumeTarget) -> int:
        """Have the attached device show the LUN's current capacity (after the volume grew); its size in bytes.

        Idempotent.  Raises ``PermanentConnectorError`` when the volume is not attached by this connector.
        """
        raise PermanentConnectorError(f"{type(self).__name__} cannot rescan volume {target.volume_id}")

    def condition(self, target: VolumeTarget) -> str:
        """Why the attached device is not healthy ("" when it is): session down, device gone, I/O errors."""
        return ""

    def leftovers(self, volume_id: str) -> list[str]:
        """What an earlier run left of ``volume_id``'s attachment on this host that ``detach`` would remove (a
        userspace loop device on a dead FUSE file); [] where a restart leaves nothing behind."""
        return []

    def foreign_device(self, target: VolumeTarget, path: str) -> str:
        """Why ``path`` is not the device this connector gave ``target`` ("" when it is, or when only the LUN's
        VPD pages could tell: the caller checks those)."""
        return ""

    def reassigned(self, target: VolumeTarget, path: str) -> str:
        """Why ``path``, a device this connector gave ``target``, names something else by now (nothing, or
        another volume's disk: after a host reboot ``/dev/sdX`` is whichever disk came first), so whoever
        uses it is not the volume's user ("" when it may still be the volume's device, a dead one too).  A
        logout asks nobody about the users of a reassigned path.  The base says "": its users are asked."""
        return ""


def refuse_if_busy(device: str) -> None:
    """Raise while a filesystem or anyone else with ``O_EXCL`` (device-mapper, LVM, md, a running mkfs) holds
    ``device``: a detach must not flush, delete or release a disk from under them.  A device that is gone is
    not busy."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TemporaryConnectorError(f"{device} is in use (mounted, or held by device-mapper, LVM or md); "
                                          "release it before detaching") from None
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return
        raise
    os.close(fd)
