"""Attachments: volumes exported by some node's agent, attached here as local block devices.

The work is the host connectors' (``node_agent.host``): ``userspace`` (Shoal's
initiator, FUSE, a loop device) or ``kernel`` (open-iscsi).  Both check the
LUN's VPD 0x83 NAA and 0x80 serial against the ExportInfo before a device is
handed out.  This module adds the agent's idempotency and record:

- attaching an attached volume (same export, same mode) returns the same device
  without counting another user, so a retried RPC never leaks a reference;
  another export or mode for an attached volume is ``FailedPrecondition``;
- detaching what is not attached succeeds;
- ``attachments.json`` (no secrets) lists them.  After a restart the kernel's
  sessions are still there and their records are kept, so a later detach
  finds them; userspace devices died with the process that served them, so
  their leftovers are cleaned and their records dropped (the controller's
  reconcile attaches again).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from node_agent.agent.errors import FailedPrecondition, InvalidArgument
from node_agent.agent.exports import ExportInfo
from node_agent.agent.records import read_json, write_json
from node_agent.host.connector import Connector, VolumeTarget

log = logging.getLogger("shoal.agent.attachments")

RECORD_FILE = "attachments.json"
USERSPACE, KERNEL = "userspace", "kernel"
MODES = (USERSPACE, KERNEL)


@dataclass(frozen=True)
class AttachmentRecord:
    volume_id: str
    device_path: str
    mode: str
    export: ExportInfo


def check_mode(mode: str) -> str:
    mode = mode or USERSPACE
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


class AttachmentManager:
    """Attach and detach through lazily built connectors (``mode`` -> factory)."""

    def __init__(self, data_dir: str, connectors: Mapping[str, Callable[[], Connector]]):
        self.data_dir = data_dir
        self._factories = dict(connectors)
        self._connectors: dict[str, Connector] = {}
        self._records: dict[str, AttachmentRecord] = {}
        self._lock = threading.RLock()

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

    def attach(self, export: ExportInfo, chap_secret: str = "", mutual_chap_user: str = "",
               mutual_chap_secret: str = "", mode: str = USERSPACE) -> str:
        """The local device of ``export``'s LUN, checked to be its volume (callers serialise per volume)."""
        mode = check_mode(mode)
        secrets = {"chap_secret": chap_secret, "mutual_chap_user": mutual_chap_user,
                   "mutual_chap_secret": mutual_chap_secret}
        target = VolumeTarget.from_publish_context(export.publish_context(), secrets)
        with self._lock:
            known = self._records.get(export.volume_id)
        if known is not None:
            return self._same(known, export, mode)
        device = self.connector(mode).attach(target)
        record = AttachmentRecord(export.volume_id, device.path, mode, export)
        with self._lock:
            self._records[export.volume_id] = record
            self._save()
        log.info("volume %s attached (%s) as %s", export.volume_id, mode, device.path)
        return device.path

    def detach(self, volume_id: str, mode: str = "") -> bool:
        """Detach; False when it was not attached here."""
        with self._lock:
            record = self._records.get(volume_id)
        if record is None:
            return False
        self.connector(record.mode).detach(_target_without_secrets(record.export))
        with self._lock:
            self._records.pop(volume_id, None)
            self._save()
        log.info("volume %s detached (%s) from %s", volume_id, record.mode, record.device_path)
        return True

    def restore(self) -> None:
        """Take the record back after a restart; see the module docstring."""
        data = read_json(os.path.join(self.data_dir, RECORD_FILE), {}).get("attachments", {})
        for volume_id, entry in sorted(data.items()):
            export = ExportInfo(**{**entry["export"], "portals": tuple(entry["export"]["portals"])})
            record = AttachmentRecord(volume_id, entry["device_path"], entry["mode"], export)
            if record.mode == KERNEL:
                self._records[volume_id] = record
                continue
            try:  # the FUSE server of this device was the previous process: clean what it left
                self.connector(record.mode).detach(_target_without_secrets(export))
            except Exception as exc:
                log.warning("volume %s: leftovers of its userspace attachment stay: %s", volume_id, exc)
            else:
                log.info("volume %s: userspace attachment of the previous run cleaned up", volume_id)
        with self._lock:
            self._save()

    def close(self) -> None:
        """At shutdown: userspace devices cannot outlive this process, so detach them (best effort)."""
        for record in self.list():
            if record.mode != USERSPACE:
                continue
            try:
                self.detach(record.volume_id)
            except Exception as exc:
                log.warning("volume %s: detach at shutdown failed: %s", record.volume_id, exc)

    def _same(self, known: AttachmentRecord, export: ExportInfo, mode: str) -> str:
        if (known.export.target_iqn, known.export.lun, known.export.naa, known.export.serial) != \
                (export.target_iqn, export.lun, export.naa, export.serial) or known.mode != mode:
            raise FailedPrecondition(
                f"volume {export.volume_id} is already attached here ({known.mode}, LUN {known.export.lun} of "
                f"{known.export.target_iqn}); detach it first")
        return known.device_path

    def _save(self) -> None:
        write_json(os.path.join(self.data_dir, RECORD_FILE), {"attachments": {
            vid: {"device_path": r.device_path, "mode": r.mode,
                  "export": {**asdict(r.export), "portals": list(r.export.portals)}}
            for vid, r in self._records.items()}})


def _target_without_secrets(export: ExportInfo) -> VolumeTarget:
    """Enough to find and tear down an attachment: detaching needs no login."""
    context = export.publish_context()
    context.pop("chap_user", None)
    return VolumeTarget.from_publish_context(context)
