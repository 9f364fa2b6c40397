"""Attachments: volumes exported by some node's agent, attached here as local block devices.

The work is the host connectors' (``node_agent.host``): ``userspace`` (Shoal's
initiator, FUSE, a loop device) or ``kernel`` (open-iscsi).  Both check the
LUN's VPD 0x83 NAA and 0x80 serial against the ExportInfo before a device is
handed out.  This module adds the agent's idempotency and record:

- a record is made by ``attach``; with ``defer_login`` (CSI ControllerPublishVolume)
  it only holds the export and its CHAP credentials, and the node's CSI service
  (this process) calls ``login`` at NodeStageVolume and ``logout`` at
  NodeUnstageVolume; the record stays until ``detach`` (ControllerUnpublishVolume,
  or ``shoalctl volume detach``), which logs out first if needed;
- attaching an attached volume (same export, same mode) returns the same device
  without counting another user, so a retried RPC never leaks a reference, once
  the connector has said that the recorded device is still the volume's
  (``Connector.foreign_device``: for a loop device, bound to the FUSE file this
  process serves); a device that is not (gone, another volume's by now, on a
  dead FUSE file) is never answered: the volume is logged in again;
  another export or mode for an attached volume is ``FailedPrecondition``;
- detaching what is not attached succeeds; logging out what is not logged in too;
- ``attachments.json`` (no secrets) lists them, ``attachment-secrets.json``
  (0600) keeps the credentials a later login needs.  Each save writes the
  secrets first (with those the record on disk still names), then the record,
  then the secrets again without those no record names any more: a crash
  between two writes leaves every recorded attachment its credentials, at
  worst with a secret nobody names, which ``restore`` drops (or the next save).
  Writing the record commits a change: memory takes it only then (``_commit``,
  as ``ExportManager._commit``), so a save that fails (disk full, EIO) leaves
  memory, the files and a repeat of the call where they were before it; the
  call fails with ``Unavailable`` (``ResourceExhausted`` for a full disk) and
  its repeat does the whole of it again.  A failed cleanup of secrets nobody
  names any more does not fail the committed change.  After a restart the
  kernel's sessions are usually still there and their records are kept, but
  the recorded ``/dev/sdX`` is not trusted until the connector has said so
  again (a host reboot ends the sessions, and the name may be another
  disk's by then): the next login asks it (``_unverified``), and a logout
  never asks who uses a recorded path the connector says is another's by now
  (``Connector.reassigned``: a volume mounted from that ``/dev/sdX`` since
  then does not block it); userspace
  devices died with the process that served them (a FUSE file served again at
  the same path does not revive a loop device on the dead one: see
  ``node_agent.host.userspace``), so their leftovers are cleaned and their
  records kept as not logged in (the next NodeStageVolume, or a repeated
  attach, logs in again).  A leftover still in use (mounted while the agent
  stopped) cannot be cleaned then: a login of its volume refuses until it is
  unmounted, and a logout or detach of its record cleans it (and refuses while
  it is still mounted), so no dead loop device is forgotten.  NodeUnstageVolume
  takes a staging mount of such a leftover for the volume's (``unstage_devices``)
  and unmounts it before that logout.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

from node_agent.agent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from node_agent.agent.exports import ExportInfo
from node_agent.agent.records import CorruptRecord, read_json, remove_temp, write_json
from node_agent.host.connector import Connector, VolumeTarget

log = logging.getLogger("shoal.agent.attachments")

RECORD_FILE = "attachments.json"
SECRETS_FILE = "attachment-secrets.json"
USERSPACE, KERNEL = "userspace", "kernel"
MODES = (USERSPACE, KERNEL)


@dataclass(frozen=True)
class AttachmentRecord:
    volume_id: str
    device_path: str
    """The local device; "" while not logged in (published for CSI, not staged)."""
    mode: str
    export: ExportInfo

    @property
    def logged_in(self) -> bool:
        return bool(self.device_path)


@dataclass(frozen=True)
class _Credentials:
    chap_secret: str
    mutual_chap_user: str = ""
    mutual_chap_secret: str = ""

    def __repr__(self) -> str:
        return "<credentials>"

    def as_map(self) -> dict[str, str]:
        return {"chap_secret": self.chap_secret, "mutual_chap_user": self.mutual_chap_user,
                "mutual_chap_secret": self.mutual_chap_secret}


def check_mode(mode: str) -> str:
    mode = mode or USERSPACE
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


class AttachmentManager:
    """Attach and detach through lazily built connectors (``mode`` -> factory)."""

    def __init__(self, data_dir: str, connectors: Mapping[str, Callable[[], Connector]],
                 in_use: Callable[[str], list[str]] = lambda device: []):
        """``in_use(device)``: where the device is mounted or its device file bind-mounted (CSI publishes);
        a logout is refused while there is any, so no device path outlives its login."""
        self.data_dir = data_dir
        self.in_use = in_use
        self._factories = dict(connectors)
        self._connectors: dict[str, Connector] = {}
        self._records: dict[str, AttachmentRecord] = {}
        self._credentials: dict[str, _Credentials] = {}
        # Kernel records restored as logged in whose device path the connector has not confirmed since.
        self._unverified: set[str] = set()
        # The secrets file's content as last written or read (volume id -> credentials map); None: not read yet.
        self._saved_secrets: dict[str, dict[str, str]] | None = None
        self._lock = threading.RLock()
        self._volume_locks: dict[str, threading.RLock] = {}

    def connector(self, mode: str) -> Connector:
        with self._lock:
            if mode not in self._connectors:
                factory = self._factories.get(mode)
                if factory is None:
                    raise FailedPrecondition(f"attach mode {mode!r} is not available on this node")
                self._connectors[mode] = factory()
            return self._connectors[mode]

    def list(self) -> list[AttachmentRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.volume_id)

    def get(self, volume_id: str) -> AttachmentRecord | None:
        with self._lock:
            return self._records.get(volume_id)

    def attach(self, export: ExportInfo, chap_secret: str = "", mutual_chap_user: str = "",
               mutual_chap_secret: str = "", mode: str = USERSPACE, *, defer_login: bool = False) -> str:
        """The local device of ``export``'s LUN, checked to be its volume.

        ``defer_login``: record the export and credentials only, and return the device if already logged
        in, else "" (``login`` makes it).  A failed login or save leaves the record and credentials as they
        were (none for a new volume); see ``_login`` for the device.
        """
        mode = check_mode(mode)
        credentials = _Credentials(chap_secret, mutual_chap_user, mutual_chap_secret)
        # typed and validated now, so a bad export is refused at publish, not at the later login
        VolumeTarget.from_publish_context(export.publish_context(), credentials.as_map())
        with self._volume(export.volume_id):
            with self._lock:
                known = self._records.get(export.volume_id)
                if known is not None:
                    self._check_same(known, export, mode)
            record = known or AttachmentRecord(export.volume_id, "", mode, export)
            if not defer_login:  # the record and credentials are held (and saved) once the login succeeded
                device = self._login(record, credentials)
                if known is not None and known.logged_in and device == known.device_path:
                    self._refresh_size(known)
                return device
            self._commit(export.volume_id, record, credentials, "publishing it")
            if known is None:
                log.info("volume %s published here (%s): login deferred to NodeStageVolume",
                         export.volume_id, mode)
            return record.device_path

    def _refresh_size(self, record: AttachmentRecord) -> None:
        """A repeated attach of a logged-in volume: have its device show the LUN's capacity now (``shoalctl
        volume expand`` grows the volume at its owner; CSI's NodeExpandVolume rescans, a plain attach did not).
        Best effort: the device answered is the volume's either way."""
        try:
            self.connector(record.mode).rescan(_target_without_secrets(record.export))
        except Exception as exc:  # noqa: BLE001 - the attach stands; the size shows at the next rescan
            log.warning("volume %s: could not refresh the size of %s: %s", record.volume_id, record.device_path, exc)

    def login(self, volume_id: str) -> str:
        """Log in to a recorded volume's LUN and return its checked device; a repeat returns the same."""
        with self._volume(volume_id):
            with self._lock:
                record = self._records.get(volume_id)
                credentials = self._credentials.get(volume_id)
            if record is None:
                raise FailedPrecondition(f"volume {volume_id} is not published to this node: "
                                         "ControllerPublishVolume (or an attach) first")
            return self._login(record, credentials)

    def _login(self, record: AttachmentRecord, credentials: _Credentials | None) -> str:
        """Log ``record`` in with ``credentials``, then hold both (saved first).

        When the save fails, a login this call made is undone (the device was never handed out), so the
        connector is where it was and a repeat logs in again; a session that was there before the call
        (a kernel record restored as logged in, or a device in use) is left as it was.
        """
        volume_id = record.volume_id
        if record.logged_in and volume_id not in self._unverified:
            stale = self.connector(record.mode).foreign_device(_target_without_secrets(record.export),
                                                               record.device_path)
            if stale:  # never answer a device that is gone or another's: log in again (the connector's
                # attach tears down what is left of the stale one, or refuses while it is in use)
                log.warning("volume %s: its recorded device %s is not its device any more (%s): logging in "
                            "again", volume_id, record.device_path, stale)
                record = replace(record, device_path="")
        if record.logged_in and volume_id not in self._unverified:
            with self._lock:
                if (record, credentials) != (self._records.get(volume_id), self._credentials.get(volume_id)):
                    self._commit(volume_id, record, credentials, "attaching it")  # a repeat with new credentials
            return record.device_path
        if credentials is None:
            raise FailedPrecondition(f"volume {volume_id}: its CHAP credentials are not known here any more: "
                                     "unpublish and publish it again")
        target = VolumeTarget.from_publish_context(record.export.publish_context(), credentials.as_map())
        device = self.connector(record.mode).attach(target)  # idempotent: a live session's checked device
        try:
            self._commit(volume_id, replace(record, device_path=device.path), credentials, "logging it in",
                         confirmed=True)
        except Exception:
            if not record.logged_in:  # this call's login, unless the device was there and in use already
                self._undo_login(record, device.path)
            raise
        log.info("volume %s logged in (%s) as %s", volume_id, record.mode, device.path)
        return device.path

    def _undo_login(self, record: AttachmentRecord, device: str) -> None:
        users = self.in_use(device)
        if users:
            log.warning("volume %s: its device %s stays: in use at %s", record.volume_id, device, ", ".join(users))
            return
        try:
            self.connector(record.mode).detach(_target_without_secrets(record.export))
        except Exception as exc:  # a repeat of the login finds the session (the connector's attach reuses it)
            log.warning("volume %s: undoing its login after the failed save failed too: %s", record.volume_id, exc)
        else:
            log.info("volume %s: login undone (its record could not be saved)", record.volume_id)

    def logout(self, volume_id: str) -> bool:
        """Flush, remove the device and log out; the record stays.  False when it was not logged in.

        A logout cannot be taken back: when the save fails, the record still says logged in (in memory as
        in the file) and a repeat logs out again (the connector's detach of what is gone succeeds)."""
        with self._volume(volume_id):
            return self._logout(volume_id)

    def _logout(self, volume_id: str) -> bool:
        with self._lock:
            record = self._records.get(volume_id)
        if record is None:
            return False
        if not record.logged_in:
            self._clean_leftovers(record)
            return False
        connector, target = self.connector(record.mode), _target_without_secrets(record.export)
        reassigned = connector.reassigned(target, record.device_path)
        if reassigned:  # its users are another volume's by now: the connector's detach finds what is this one's
            log.warning("volume %s: its recorded device %s is not its device any more (%s): logging out "
                        "without asking who uses that path", volume_id, record.device_path, reassigned)
        else:
            users = self.in_use(record.device_path)
            if users:
                raise FailedPrecondition(f"volume {volume_id} is in use at {', '.join(users)} "
                                         f"({record.device_path}): unpublish and unstage it (or unmount it) first")
        connector.detach(target)
        with self._lock:
            if volume_id in self._records:
                self._commit(volume_id, replace(record, device_path=""), self._credentials.get(volume_id),
                             "logging it out")
        log.info("volume %s logged out (%s) of %s", volume_id, record.mode, record.device_path)
        return True

    def unstage_devices(self, volume_id: str) -> list[str]:
        """The devices a staging mount of the volume may be on, for NodeUnstageVolume: its logged-in device
        unless the connector says that path is another's by now (``Connector.reassigned``), or, while it is not
        logged in, the block devices an earlier run left of it (``Connector.leftovers``: a dead loop device the
        staging mount made before the agent stopped still holds), which its logout removes once unmounted."""
        with self._volume(volume_id):
            with self._lock:
                record = self._records.get(volume_id)
            if record is None:
                return []
            if record.logged_in:
                target = _target_without_secrets(record.export)
                return [] if self.connector(record.mode).reassigned(target, record.device_path) \
                    else [record.device_path]
            if record.mode not in self._factories:
                return []
            return [path for path in self.connector(record.mode).leftovers(volume_id) if _block_device(path)]

    def _clean_leftovers(self, record: AttachmentRecord) -> None:
        """Remove what a previous run left of a userspace attachment that was in use when it stopped (a loop
        device on a dead FUSE file, the dead mount); raises while that device is still in use.  Asks only a
        connector that can tell (``leftovers``: the userspace one), and only when there is something."""
        if record.mode not in self._factories:
            return
        connector = self.connector(record.mode)
        if connector.leftovers(record.volume_id):
            connector.detach(_target_without_secrets(record.export))

    def rescan(self, volume_id: str) -> int:
        """Have the logged-in device see its LUN's current capacity (after an expand); its size in bytes."""
        with self._volume(volume_id):
            record = self._logged_in(volume_id)
            return self.connector(record.mode).rescan(_target_without_secrets(record.export))

    def condition(self, volume_id: str) -> str:
        """Why the volume's device is not healthy ("" when it is): not logged in, gone, session down, I/O errors."""
        with self._lock:
            record = self._records.get(volume_id)
        if record is None:
            return f"volume {volume_id} is not published to this node"
        if not record.logged_in:
            return f"volume {volume_id} is not logged in on this node (not staged)"
        return self.connector(record.mode).condition(_target_without_secrets(record.export))

    def foreign_device(self, volume_id: str, path: str) -> str:
        """Why ``path`` is not the device that the volume's connector gave it ("" when it is, or when only the
        LUN's VPD pages can tell)."""
        with self._lock:
            record = self._records.get(volume_id)
        if record is None:
            return f"volume {volume_id} is not published to this node"
        return self.connector(record.mode).foreign_device(_target_without_secrets(record.export), path)

    def detach(self, volume_id: str, mode: str = "", *, only: AttachmentRecord | None = None) -> bool:
        """Log out if logged in, and forget the record; False when there was none.  When a save fails the
        record stays (logged out if that much was saved) and a repeat does the rest.

        ``only``: detach only while the record is still that very one (False otherwise).  A fenced node's drop
        is decided from a heartbeat and may wait here behind a long detach; an attach made meanwhile (the node
        unfenced) has a record of its own, which that late drop must not take away."""
        with self._volume(volume_id):
            with self._lock:
                record = self._records.get(volume_id)
            if record is None or (only is not None and record is not only):
                return False
            self._logout(volume_id)
            with self._lock:
                self._commit(volume_id, None, None, "detaching it")
        log.info("volume %s detached (%s)", volume_id, record.mode)
        return True

    def restore(self) -> None:
        """Take the record back after a restart; see the module docstring.

        The temporary files of both records (a write a crash cut before its rename) are removed first.  A
        record that is not what ``_save`` writes is ``CorruptRecord`` naming the file (the agent does not
        start: a login needs what it holds).  Writing the records again at the end (userspace devices
        cleaned, credentials nobody names dropped) is best effort: a full or read-only data directory is
        logged, memory holds the change and the next save writes it."""
        record_path, secrets_path = (os.path.join(self.data_dir, name) for name in (RECORD_FILE, SECRETS_FILE))
        for path in (secrets_path, record_path):
            remove_temp(path)
        data, secrets = _load(record_path, secrets_path)
        self._saved_secrets = {vid: asdict(c) for vid, c in secrets.items()}
        orphans = sorted(set(secrets) - set(data))
        if orphans:  # a save that stopped before its record was written, or before the last cleanup
            log.info("dropping the CHAP credentials of %s: no attachment record names them", ", ".join(orphans))
        for volume_id, record in sorted(data.items()):
            export = record.export
            if volume_id in secrets:
                self._credentials[volume_id] = secrets[volume_id]
            else:  # written by an agent that saved the record before its secrets, and stopped in between
                log.warning("volume %s: its CHAP credentials are missing; a login needs them: unpublish and "
                            "publish it again (or repeat its attach)", volume_id)
            if record.mode == USERSPACE and record.logged_in:
                try:  # the FUSE server of this device was the previous process: clean what it left
                    self.connector(record.mode).detach(_target_without_secrets(export))
                except Exception as exc:
                    log.warning("volume %s: leftovers of its userspace attachment stay: %s", volume_id, exc)
                else:
                    log.info("volume %s: userspace attachment of the previous run cleaned up", volume_id)
                record = replace(record, device_path="")
            elif record.logged_in:
                self._unverified.add(volume_id)
            self._records[volume_id] = record
        with self._lock:
            try:
                self._save(self._records, self._credentials)
            except OSError as exc:
                log.warning("attachments: the records could not be written again after the restore (%s); the "
                            "next change writes them", exc.strerror or exc)

    def close(self) -> None:
        """At shutdown: userspace devices cannot outlive this process, so log them out (best effort);
        their records stay, so a restarted agent logs in again when asked."""
        for record in self.list():
            if record.mode != USERSPACE or not record.logged_in:
                continue
            try:
                self.logout(record.volume_id)
            except Exception as exc:
                log.error("volume %s: logout at shutdown failed: %s; %s fails every I/O (EIO) once this process "
                          "has exited, and the next run removes it once it is unmounted, then attaches the "
                          "volume again", record.volume_id, exc, record.device_path)

    def hold(self, volume_id: str) -> threading.RLock:
        """The volume's lock, for a caller whose steps must not interleave with this volume's attach, login,
        logout or detach: the CSI Node service holds it across NodeStage, NodePublish, NodeUnstage and
        NodeExpand (a detach waits for them, and then finds the device in use).  Reentrant: the holder's own
        login or logout goes ahead."""
        return self._volume(volume_id)

    def _volume(self, volume_id: str) -> threading.RLock:
        """The volume's own lock: the agent's RPCs and the CSI Node service (other threads) take turns."""
        with self._lock:
            return self._volume_locks.setdefault(volume_id, threading.RLock())

    def _logged_in(self, volume_id: str) -> AttachmentRecord:
        with self._lock:
            record = self._records.get(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} is not published to this node")
        if not record.logged_in:
            raise FailedPrecondition(f"volume {volume_id} is not logged in on this node: NodeStageVolume first")
        return record

    def _check_same(self, known: AttachmentRecord, export: ExportInfo, mode: str) -> None:
        if (known.export.target_iqn, known.export.lun, known.export.naa, known.export.serial) != \
                (export.target_iqn, export.lun, export.naa, export.serial) or known.mode != mode:
            raise FailedPrecondition(
                f"volume {export.volume_id} is already attached here ({known.mode}, LUN {known.export.lun} of "
                f"{known.export.target_iqn}); detach it first")

    def _commit(self, volume_id: str, record: AttachmentRecord | None, credentials: _Credentials | None,
                doing: str, *, confirmed: bool = False) -> None:
        """Save the attachments with the volume's ``record`` and ``credentials`` (None: without them), then
        hold them in memory: a save that fails changes nothing here, and says so.  ``confirmed``: the
        connector has just given the record's device path (it is no longer ``_unverified``)."""
        with self._lock:
            records, all_credentials = dict(self._records), dict(self._credentials)
            records.pop(volume_id, None)
            all_credentials.pop(volume_id, None)
            if record is not None:
                records[volume_id] = record
            if credentials is not None:
                all_credentials[volume_id] = credentials
            try:
                self._save(records, all_credentials)
            except OSError as exc:
                raise _save_failed(volume_id, doing, exc) from exc
            self._records, self._credentials = records, all_credentials
            if confirmed or record is None or not record.logged_in:
                self._unverified.discard(volume_id)

    def _save(self, records: dict[str, AttachmentRecord], credentials: dict[str, _Credentials]) -> None:
        """Secrets (old and new), record, secrets (new only): see the module docstring.  Written the record,
        the change is made: the cleanup's failure is only logged (the next save or ``restore`` drops them)."""
        secrets_path = os.path.join(self.data_dir, SECRETS_FILE)
        if self._saved_secrets is None:
            self._saved_secrets = read_json(secrets_path, {}).get("credentials", {})
        wanted = {vid: asdict(c) for vid, c in credentials.items() if vid in records}
        both = {**self._saved_secrets, **wanted}
        if both != self._saved_secrets:
            self._write_secrets(secrets_path, both)
        write_json(os.path.join(self.data_dir, RECORD_FILE), {"attachments": {
            vid: {"device_path": r.device_path, "mode": r.mode,
                  "export": {**asdict(r.export), "portals": list(r.export.portals)}}
            for vid, r in records.items()}})
        if wanted != self._saved_secrets:
            try:
                self._write_secrets(secrets_path, wanted)
            except OSError as exc:
                log.warning("the CHAP credentials of %s stay in %s though no attachment names them: %s",
                            ", ".join(sorted(set(both) - set(wanted))), SECRETS_FILE, exc)

    def _write_secrets(self, path: str, secrets: dict[str, dict[str, str]]) -> None:
        self._saved_secrets = None  # unknown if the write fails half-way: read again next time
        write_json(path, {"credentials": secrets}, mode=0o600)
        self._saved_secrets = secrets


_HINT = "; the agent does not start without its attachment records: repair the file or restore it from a backup"


def _load(record_path: str, secrets_path: str) -> tuple[dict[str, AttachmentRecord], dict[str, _Credentials]]:
    """Both records as ``_save`` writes them; ``CorruptRecord`` naming the file that holds something else (a
    filesystem repaired after a crash, a hand edit), not a bare KeyError that names no file."""
    try:
        records = _section(read_json(record_path, {}, dict), "attachments", record_path)
        credentials = _section(read_json(secrets_path, {}, dict), "credentials", secrets_path)
    except CorruptRecord as exc:
        raise CorruptRecord(exc.path, exc.why if exc.why.endswith(_HINT) else exc.why + _HINT) from None
    data, secrets = {}, {}
    for volume_id, entry in records.items():
        try:
            export = dict(entry["export"])
            export["portals"] = tuple(export["portals"])
            record = AttachmentRecord(volume_id, entry["device_path"], entry["mode"], ExportInfo(**export))
            if not (isinstance(record.device_path, str) and record.mode in MODES
                    and all(isinstance(p, str) for p in export["portals"]) and isinstance(export["lun"], int)
                    and all(isinstance(export[k], str) for k in ("volume_id", "target_iqn", "naa", "serial",
                                                                 "chap_user"))):
                raise TypeError("a value of the wrong kind (or an unknown mode)")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(record_path, f"the attachment of volume {volume_id}: {_why(exc)}{_HINT}") from None
        data[volume_id] = record
    for volume_id, entry in credentials.items():
        try:
            secrets[volume_id] = _Credentials(**entry)
            if not all(isinstance(v, str) for v in secrets[volume_id].as_map().values()):
                raise TypeError("credentials must be strings")
        except TypeError as exc:
            raise CorruptRecord(secrets_path, f"the credentials of volume {volume_id}: {exc}{_HINT}") from None
    return data, secrets


def _section(data: dict, key: str, path: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise CorruptRecord(path, f"{key!r} must be a JSON object{_HINT}")
    return value


def _why(exc: BaseException) -> str:
    return f"{exc} is missing" if isinstance(exc, KeyError) else str(exc)


def _save_failed(volume_id: str, doing: str, exc: OSError) -> AgentError:
    """A save that failed, as the RPC's answer: the record is as before the call, which the caller repeats."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    message = (f"volume {volume_id}: {doing}: saving the attachment records failed ({exc.strerror or exc}); "
               f"the agent's record of it is unchanged: repeat the call{' once there is space' if full else ''}")
    return (ResourceExhausted if full else Unavailable)(message)


def _block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _target_without_secrets(export: ExportInfo) -> VolumeTarget:
    """Enough to find and tear down an attachment: detaching needs no login."""
    context = export.publish_context()
    context.pop("chap_user", None)
    return VolumeTarget.from_publish_context(context)
