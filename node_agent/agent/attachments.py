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
  without counting another user, so a retried RPC never leaks a reference;
  another export or mode for an attached volume is ``FailedPrecondition``;
- detaching what is not attached succeeds; logging out what is not logged in too;
- ``attachments.json`` (no secrets) lists them, ``attachment-secrets.json``
  (0600) keeps the credentials a later login needs.  Each save writes the
  secrets first (with those the record on disk still names), then the record,
  then the secrets again without those no record names any more: a crash
  between two writes leaves every recorded attachment its credentials, at
  worst with a secret nobody names, which ``restore`` drops.  After a restart the
  kernel's sessions are usually still there and their records are kept, but
  the recorded ``/dev/sdX`` is not trusted until the connector has said so
  again (a host reboot ends the sessions, and the name may be another
  disk's by then): the next login asks it (``_unverified``); userspace
  devices died with the process that served them, so their leftovers are
  cleaned and their records kept as not logged in (the next NodeStageVolume,
  or a repeated attach, logs in again).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

from node_agent.agent.errors import FailedPrecondition, InvalidArgument, NotFound
from node_agent.agent.exports import ExportInfo
from node_agent.agent.records import read_json, write_json
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
        in, else "" (``login`` makes it).  A failed login leaves no new record behind.
        """
        mode = check_mode(mode)
        credentials = _Credentials(chap_secret, mutual_chap_user, mutual_chap_secret)
        # typed and validated now, so a bad export is refused at publish, not at the later login
        VolumeTarget.from_publish_context(export.publish_context(), credentials.as_map())
        with self._volume(export.volume_id):
            with self._lock:
                known = self._records.get(export.volume_id)
                new = known is None
                if known is not None:
                    self._check_same(known, export, mode)
                else:
                    known = AttachmentRecord(export.volume_id, "", mode, export)
                    self._records[export.volume_id] = known
                previous = self._credentials.get(export.volume_id)
                self._credentials[export.volume_id] = credentials
                if defer_login or known.logged_in:
                    self._save()
            if defer_login:
                if new:
                    log.info("volume %s published here (%s): login deferred to NodeStageVolume",
                             export.volume_id, mode)
                return known.device_path
            try:
                device = self.login(export.volume_id)
            except BaseException:
                with self._lock:
                    if new:
                        self._records.pop(export.volume_id, None)
                        self._credentials.pop(export.volume_id, None)
                    elif previous is not None:
                        self._credentials[export.volume_id] = previous
                    self._save()
                raise
            return device

    def login(self, volume_id: str) -> str:
        """Log in to a recorded volume's LUN and return its checked device; a repeat returns the same."""
        with self._volume(volume_id):
            return self._login(volume_id)

    def _login(self, volume_id: str) -> str:
        with self._lock:
            record = self._records.get(volume_id)
            credentials = self._credentials.get(volume_id)
        if record is None:
            raise FailedPrecondition(f"volume {volume_id} is not published to this node: "
                                     "ControllerPublishVolume (or an attach) first")
        if record.logged_in and volume_id not in self._unverified:
            return record.device_path
        if credentials is None:
            raise FailedPrecondition(f"volume {volume_id}: its CHAP credentials are not known here any more: "
                                     "unpublish and publish it again")
        target = VolumeTarget.from_publish_context(record.export.publish_context(), credentials.as_map())
        device = self.connector(record.mode).attach(target)  # idempotent: a live session's checked device
        with self._lock:
            self._records[volume_id] = replace(record, device_path=device.path)
            self._unverified.discard(volume_id)
            self._save()
        log.info("volume %s logged in (%s) as %s", volume_id, record.mode, device.path)
        return device.path

    def logout(self, volume_id: str) -> bool:
        """Flush, remove the device and log out; the record stays.  False when it was not logged in."""
        with self._volume(volume_id):
            return self._logout(volume_id)

    def _logout(self, volume_id: str) -> bool:
        with self._lock:
            record = self._records.get(volume_id)
        if record is None or not record.logged_in:
            return False
        users = self.in_use(record.device_path)
        if users:
            raise FailedPrecondition(f"volume {volume_id} is in use at {', '.join(users)} ({record.device_path}): "
                                     "unpublish and unstage it (or unmount it) first")
        self.connector(record.mode).detach(_target_without_secrets(record.export))
        with self._lock:
            if volume_id in self._records:
                self._records[volume_id] = replace(record, device_path="")
                self._save()
        log.info("volume %s logged out (%s) of %s", volume_id, record.mode, record.device_path)
        return True

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

    def detach(self, volume_id: str, mode: str = "") -> bool:
        """Log out if logged in, and forget the record; False when there was none."""
        with self._volume(volume_id):
            with self._lock:
                record = self._records.get(volume_id)
            if record is None:
                return False
            self._logout(volume_id)
            with self._lock:
                self._records.pop(volume_id, None)
                self._credentials.pop(volume_id, None)
                self._save()
        log.info("volume %s detached (%s)", volume_id, record.mode)
        return True

    def restore(self) -> None:
        """Take the record back after a restart; see the module docstring."""
        data = read_json(os.path.join(self.data_dir, RECORD_FILE), {}).get("attachments", {})
        secrets = read_json(os.path.join(self.data_dir, SECRETS_FILE), {}).get("credentials", {})
        self._saved_secrets = dict(secrets)
        orphans = sorted(set(secrets) - set(data))
        if orphans:  # a save that stopped before its record was written, or before the last cleanup
            log.info("dropping the CHAP credentials of %s: no attachment record names them", ", ".join(orphans))
        for volume_id, entry in sorted(data.items()):
            export = ExportInfo(**{**entry["export"], "portals": tuple(entry["export"]["portals"])})
            record = AttachmentRecord(volume_id, entry["device_path"], entry["mode"], export)
            if volume_id in secrets:
                self._credentials[volume_id] = _Credentials(**secrets[volume_id])
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
            self._save()

    def close(self) -> None:
        """At shutdown: userspace devices cannot outlive this process, so log them out (best effort);
        their records stay, so a restarted agent logs in again when asked."""
        for record in self.list():
            if record.mode != USERSPACE or not record.logged_in:
                continue
            try:
                self.logout(record.volume_id)
            except Exception as exc:
                log.warning("volume %s: logout at shutdown failed: %s", record.volume_id, exc)

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

    def _save(self) -> None:
        """Secrets (old and new), record, secrets (new only): see the module docstring."""
        secrets_path = os.path.join(self.data_dir, SECRETS_FILE)
        if self._saved_secrets is None:
            self._saved_secrets = read_json(secrets_path, {}).get("credentials", {})
        wanted = {vid: asdict(c) for vid, c in self._credentials.items() if vid in self._records}
        both = {**self._saved_secrets, **wanted}
        if both != self._saved_secrets:
            self._write_secrets(secrets_path, both)
        write_json(os.path.join(self.data_dir, RECORD_FILE), {"attachments": {
            vid: {"device_path": r.device_path, "mode": r.mode,
                  "export": {**asdict(r.export), "portals": list(r.export.portals)}}
            for vid, r in self._records.items()}})
        if wanted != self._saved_secrets:
            self._write_secrets(secrets_path, wanted)

    def _write_secrets(self, path: str, secrets: dict[str, dict[str, str]]) -> None:
        self._saved_secrets = None  # unknown if the write fails half-way: read again next time
        write_json(path, {"credentials": secrets}, mode=0o600)
        self._saved_secrets = secrets


def _target_without_secrets(export: ExportInfo) -> VolumeTarget:
    """Enough to find and tear down an attachment: detaching needs no login."""
    context = export.publish_context()
    context.pop("chap_user", None)
    return VolumeTarget.from_publish_context(context)
