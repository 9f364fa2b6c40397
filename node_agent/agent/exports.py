"""Exports: one iSCSI target per exported volume, its ACL and CHAP, and the record that outlives us.

Volume ``ID`` is exported as LUN 0 of target ``<prefix>:ID``; the target's
ACL (``allowed_initiators``) lists the initiator IQNs it is exported to and
every login must pass CHAP with the volume's credentials (the controller's,
one pair per volume).  The LUN's identity is ``LunIdentity(volume_id=ID)``, so
VPD 0x80 carries the id and VPD 0x83 the NAA derived from it: the ExportInfo
says both and the consumer checks them before using the device.

The record: ``exports.json`` (volume, initiators, CHAP user names) and
``export-secrets.json`` (mode 0600: the secrets), both under the data
directory, saved by write-temp, fsync, rename *before* the portal changes.
``restore()`` serves them again at start, before the gRPC server opens, so
consumers keep working across an agent restart without the controller.  An
export whose volume is missing then (a disk mounted late) or unreadable (its
record corrupt: state "error") keeps its record and is served once the volume
is back (``restore``'s docstring says how).  Either file corrupt stops the start,
with a message naming it: serving without it would drop ACLs and credentials
the controller relies on.

Idempotency (agent.proto): exporting to an initiator already admitted with
the same credentials returns the same ExportInfo; other credentials for an
exported volume are ``AlreadyExists``; unexporting what is not exported
succeeds; the target goes with its last initiator.  Initiator names compare
as the target's ACL compares them (case-blind, ``same_name``): an export,
unexport or fence names an initiator in any spelling, and takes every
spelling of it out of the record.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from node_agent.agent.copies import READY, guarded
from node_agent.agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from node_agent.agent.records import CorruptRecord, read_json, remove_temp, write_json
from node_agent.agent.volumes import VolumeInfo, VolumeManager, check_volume_id
from node_agent.iscsi.names import check_iqn
from node_agent.iscsi.target import Credentials, TargetNode, same_name
from node_agent.scsi.device import LunSettings
from node_agent.scsi.vpd import LunIdentity
from node_agent.target_service import LunSpec

log = logging.getLogger("shoal.agent.exports")

LUN = 0
RECORD_FILE = "exports.json"
SECRETS_FILE = "export-secrets.json"
T = TypeVar("T")


@dataclass(frozen=True)
class ExportInfo:
    """Where and how an exported volume is reached (common.proto ExportInfo); no secret in it."""

    volume_id: str
    target_iqn: str
    portals: tuple[str, ...]
    lun: int
    naa: str
    serial: str
    chap_user: str

    def publish_context(self) -> dict[str, str]:
        """The keys ``VolumeTarget.from_publish_context`` reads (secrets go in a separate map)."""
        return {"volume_id": self.volume_id, "target_iqn": self.target_iqn, "portals": ",".join(self.portals),
                "lun": str(self.lun), "naa": self.naa, "serial": self.serial, "chap_user": self.chap_user}


@dataclass(frozen=True)
class ExportRecord:
    """What is exported to whom; the secrets are kept apart (``_Secrets``)."""

    volume_id: str
    initiators: tuple[str, ...]
    chap_user: str
    mutual_chap_user: str = ""


@dataclass(frozen=True, repr=False)
class _Secrets:
    chap: str
    mutual_chap: str = ""

    def __repr__(self) -> str:
        return "<secrets>"


@dataclass(frozen=True)
class ExportSettings:
    data_dir: str
    """Holds ``exports.json`` and ``export-secrets.json``."""
    target_prefix: str
    """Targets are ``<prefix>:<volume_id>``."""
    portals: tuple[str, ...]
    """``IP:PORT`` of this node's portal(s), as consumers reach them."""


class TargetHost(Protocol):
    """What exports need from the portal (``PortalThread``)."""

    def add_target(self, iqn: str, spec: LunSpec, *, chap: Credentials | None, mutual_chap: Credentials | None,
                   allowed_initiators: list[str]) -> TargetNode: ...
    def remove_target(self, iqn: str) -> bool: ...
    def set_allowed_initiators(self, iqn: str, names: list[str], *, timeout: float = 60.0) -> None: ...
    def drain(self, initiator_name: str, *, timeout: float = 60.0) -> int: ...
    def served(self) -> set[str]: ...
    def resize_lun(self, iqn: str, lun: int, size: int) -> int: ...
    def fence_initiator(self, initiator_name: str, *, timeout: float = 60.0) -> Any: ...
    def cut_initiator(self, initiator_name: str) -> Any: ...
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...
    def call_quiesced(self, iqn: str, fn: Callable[[], Any]) -> Any: ...


class ExportManager:
    """The exports of this node's volumes; see the module docstring."""

    def __init__(self, settings: ExportSettings, volumes: VolumeManager, host: TargetHost):
        if not settings.portals:
            raise ValueError("exports need at least one portal address")
        self.settings = settings
        self.volumes = volumes
        self.host = host
        self._records: dict[str, ExportRecord] = {}
        self._secrets: dict[str, _Secrets] = {}
        # Records ``restore`` kept without serving them (volume id -> why); still in ``_records`` and the files.
        self._unserved: dict[str, str] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ queries

    def target_iqn(self, volume_id: str) -> str:
        return f"{self.settings.target_prefix}:{volume_id}"

    def info(self, volume_id: str, chap_user: str) -> ExportInfo:
        identity = LunIdentity(volume_id=volume_id)
        return ExportInfo(volume_id, self.target_iqn(volume_id), self.settings.portals, LUN, identity.naa.hex(),
                          identity.serial, chap_user)

    def is_exported(self, volume_id: str) -> bool:
        """True while a record names the volume, served or kept (``unserved``): the volume's delete waits for
        an unexport, so a kept ACL never outlives the controller's decision about it."""
        with self._lock:
            return volume_id in self._records

    def records(self) -> list[ExportRecord]:
        """The exports being served (GetState, metrics); the records kept unserved are ``unserved()``."""
        with self._lock:
            return sorted((r for r in self._records.values() if r.volume_id not in self._unserved),
                          key=lambda r: r.volume_id)

    def unserved(self) -> dict[str, str]:
        """Exports whose record ``restore`` kept but could not serve (volume id -> why)."""
        with self._lock:
            return dict(self._unserved)

    def list(self) -> list[ExportInfo]:
        return [self.info(r.volume_id, r.chap_user) for r in self.records()]

    # ------------------------------------------------------------------ changes

    def export(self, volume_id: str, initiator_iqn: str, chap: Credentials,
               mutual_chap: Credentials | None = None) -> ExportInfo:
        check_volume_id(volume_id)
        try:
            check_iqn(initiator_iqn)
        except ValueError as exc:
            raise InvalidArgument(f"initiator_iqn: {exc}") from None
        with self._lock:
            volume = self.volumes.require(volume_id)
            record = self._records.get(volume_id)
            secrets = _Secrets(chap.secret, mutual_chap.secret if mutual_chap else "")
            if record is None:
                return self._export_new(volume, ExportRecord(
                    volume_id, (initiator_iqn,), chap.user, mutual_chap.user if mutual_chap else ""), secrets)
            self._check_same_credentials(record, chap, mutual_chap)
            if volume_id in self._unserved:
                return self._serve_kept(volume, record, initiator_iqn)
            if not _admits(record, initiator_iqn):
                updated = replace(record, initiators=record.initiators + (initiator_iqn,))
                self._commit(updated, self._secrets[volume_id])
                self.host.set_allowed_initiators(self.target_iqn(volume_id), list(updated.initiators))
                log.info("volume %s: export extended to %s", volume_id, initiator_iqn)
            elif self.target_iqn(volume_id) not in self.host.served():  # an earlier attempt did not get so far
                self._serve(volume, record, self._secrets[volume_id])
            return self.info(volume_id, record.chap_user)

    def unexport(self, volume_id: str, initiator_iqn: str) -> bool:
        """Remove ``initiator_iqn`` from the volume's ACL (closing its sessions); the target goes with the
        last one.  False when it was not exported to that initiator."""
        check_volume_id(volume_id)
        with self._lock:
            record = self._records.get(volume_id)
            if record is None or not _admits(record, initiator_iqn):
                self._drain(initiator_iqn)  # a repeat after a timeout: its commands may still run
                return False
            remaining = _without_name(record.initiators, initiator_iqn)
            iqn = self.target_iqn(volume_id)
            if remaining:
                self._commit(replace(record, initiators=remaining), self._secrets[volume_id])
                if volume_id in self._unserved:  # no target: the record was all there was
                    log.info("volume %s: kept export to %s removed", volume_id, initiator_iqn)
                    return True
                try:  # closes its sessions and waits for their commands on workers
                    self.host.set_allowed_initiators(iqn, list(remaining))
                except TimeoutError as exc:
                    raise Unavailable(f"unexporting volume {volume_id} from {initiator_iqn}: {exc}; retry") from None
                log.info("volume %s: export to %s removed", volume_id, initiator_iqn)
            else:
                self._remove(volume_id)
                log.info("volume %s: no longer exported (target %s removed)", volume_id, iqn)
            return True

    def _drain(self, initiator_iqn: str) -> None:
        try:
            self.host.drain(initiator_iqn)
        except TimeoutError as exc:
            raise Unavailable(f"commands of {initiator_iqn}: {exc}; retry") from None

    def fence(self, initiator_iqn: str, *, timeout: float = 60.0) -> tuple[list[str], Any]:
        """Cut ``initiator_iqn`` off every target here (agent.proto FenceInitiator): the record first (a restart
        does not admit it again), then the portal (ACLs, sessions, reservation registrations, waiting for its
        commands in flight), then the targets it was the last initiator of go.  Returns the volume ids whose
        export admitted it and the portal's ``FenceResult``.  Idempotent."""
        try:
            check_iqn(initiator_iqn)
        except ValueError as exc:
            raise InvalidArgument(f"initiator_iqn: {exc}") from None
        with self._lock:
            volume_ids, records = [], dict(self._records)
            for record in sorted(self._records.values(), key=lambda r: r.volume_id):  # kept ones too
                if _admits(record, initiator_iqn):
                    volume_ids.append(record.volume_id)
                    records[record.volume_id] = replace(record,
                                                        initiators=_without_name(record.initiators, initiator_iqn))
            # Exports left with nobody (now, or by an earlier attempt that timed out): gone from the file at once,
            # kept in memory with an empty ACL until their targets go below (a delete is refused meanwhile).
            emptied = [volume_id for volume_id, record in records.items() if not record.initiators]
            if volume_ids or emptied:
                self._save(records, self._secrets)  # without the emptied ones (``_save``)
            self._records = records  # saved: memory follows (a later export must not admit it again)
            result = self.host.cut_initiator(initiator_iqn)
        # The wait for its commands still running, without the lock: other exports of this node, and GetState,
        # go on meanwhile (a fence may wait up to ``timeout`` for a stalled disk).
        try:
            waited = self.host.drain(initiator_iqn, timeout=timeout)
        except TimeoutError as exc:
            raise Unavailable(f"fencing {initiator_iqn}: {exc}; retry") from None
        with self._lock:
            # Nobody is admitted and nothing of it runs: the target goes, unless an export admitted someone
            # since (the failover host, while this waited).
            removed = [volume_id for volume_id in emptied
                       if volume_id in self._records and not self._records[volume_id].initiators]
            for volume_id in removed:
                self.host.remove_target(self.target_iqn(volume_id))
                self._records.pop(volume_id, None)
                self._secrets.pop(volume_id, None)
                self._unserved.pop(volume_id, None)
        log.warning("initiator %s fenced: %d export(s) no longer admit it (%d target(s) removed)", initiator_iqn,
                    len(volume_ids), len(removed))
        return volume_ids, replace(result, commands_waited=waited)

    def _without(self, volume_ids: list[str]) -> tuple[dict, dict]:
        """The records and secrets as if ``volume_ids`` were not exported."""
        return ({vid: r for vid, r in self._records.items() if vid not in volume_ids},
                {vid: s for vid, s in self._secrets.items() if vid not in volume_ids})

    def unexport_all(self, volume_id: str) -> None:
        with self._lock:
            if volume_id in self._records:
                self._remove(volume_id)

    def _remove(self, volume_id: str) -> None:
        """The export gone: from the file first (a restart does not serve it again), then the target (its I/O
        ends), then memory, so that until the target is gone the volume counts as exported (no delete
        meanwhile) and a repeat after a failure does what is left."""
        self._save(*self._without([volume_id]))
        self.host.remove_target(self.target_iqn(volume_id))
        self._records.pop(volume_id, None)
        self._secrets.pop(volume_id, None)
        self._unserved.pop(volume_id, None)

    def capacity_changed(self, volume_id: str, size: int) -> None:
        """An exported volume grew: its LUN reports the new capacity (and CAPACITY DATA HAS CHANGED)."""
        with self._lock:
            if volume_id in self._records and volume_id not in self._unserved:
                self.host.resize_lun(self.target_iqn(volume_id), LUN, size)

    def quiesced(self, volume_id: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` while no SCSI command runs on the volume's LUN (on the portal's loop, which executes
        them, once the LUN's I/O on worker threads has finished) when the volume is exported; right here
        otherwise.  ``fn`` must be short: every LUN of the portal waits for it."""
        with self._lock:  # an export cannot start meanwhile
            if volume_id in self._records and volume_id not in self._unserved:
                return self.host.call_quiesced(self.target_iqn(volume_id), fn)
            return fn()

    def restore(self) -> list[str]:
        """Serve what the record says was exported; the ids served.

        An export whose volume is missing (its disk not mounted yet, its backing file moved away) or whose
        target cannot be served is *kept*, not served: its record (ACL, CHAP user and secret) stays in the
        files, ``unserved()`` says why, a warning is logged, and ``records()`` (so GetState) leaves it out.
        The controller's reconcile, not seeing it, repeats the export: that repeat fails ``NotFound`` while
        the volume is missing and serves the kept export (its own ACL, plus the repeat's initiator) once the
        volume is back; so does the next ``restore``.  Nothing watches for the volume meanwhile.  Unexport
        and fence change a kept record as any other (a fenced initiator does not come back with the disk).

        Only a record whose secrets are missing is dropped: ``_save`` writes the secrets first, so that is
        an unexport that stopped between its two writes, finished here.  A volume whose own record is corrupt
        (state "error") is kept as a missing one is.  ``exports.json`` or ``export-secrets.json`` corrupt:
        ``CorruptRecord`` naming the file, and the agent does not start.

        The temporary files of both (a write a crash cut before its rename: the file it was to replace is whole)
        are removed first.  The files are then written again without what was dropped; that write failing (a
        full or read-only data directory) is only logged: memory holds what it would have written, the next
        change writes it, and the exports restored stay served (the agent's start does not fail on it).
        """
        for name in (SECRETS_FILE, RECORD_FILE):
            remove_temp(self._path(name))
        loaded = self._load()
        restored = []
        with self._lock:
            for record, secrets in loaded:
                volume_id = record.volume_id
                if secrets is None:
                    log.warning("export of volume %s dropped: its CHAP secret is missing (an unexport stopped "
                                "half-way)", volume_id)
                    continue
                self._records[volume_id] = record
                self._secrets[volume_id] = secrets
                volume = self.volumes.get(volume_id)
                if volume is None:
                    unavailable = sorted(self.volumes.unavailable)
                    self._keep_unserved(volume_id, "its volume is missing (a disk not mounted yet?" + (
                        f" disk(s) {', '.join(unavailable)} are unavailable)" if unavailable else ")"))
                    continue
                if volume.state != READY:  # its record unreadable (VolumeManager._info): the message says which
                    self._keep_unserved(volume_id, volume.message)
                    continue
                try:
                    self._serve(volume, record, self._secrets[volume_id])
                except Exception as exc:
                    self._keep_unserved(volume_id, f"serving it failed: {exc}")
                    continue
                restored.append(volume_id)
            try:
                self._save()
            except OSError as exc:
                log.warning("exports: the records could not be written again after the restore (%s); what was "
                            "dropped from them goes at the next change", exc.strerror or exc)
        if restored:
            log.info("restored %d export(s): %s", len(restored), ", ".join(restored))
        return restored

    def _load(self) -> list[tuple[ExportRecord, _Secrets | None]]:
        """The records of both files, each with its secrets (None: missing); ``CorruptRecord`` naming the file
        that does not hold what ``_save`` writes."""
        hint = "; the agent does not start without its exports: repair the file or restore it from a backup"
        record_path, secrets_path = self._path(RECORD_FILE), self._path(SECRETS_FILE)
        try:
            data = read_json(record_path, {}, dict)
            secrets = read_json(secrets_path, {}, dict)
        except CorruptRecord as exc:
            raise CorruptRecord(exc.path, exc.why + hint) from None
        loaded = []
        for volume_id, entry in sorted(_mapping(data.get("exports", {}), record_path, "exports", hint).items()):
            try:
                record = ExportRecord(volume_id, tuple(entry["initiators"]), entry["chap_user"],
                                      entry.get("mutual_chap_user", ""))
                if not (all(isinstance(name, str) for name in record.initiators)
                        and isinstance(entry["initiators"], list) and isinstance(record.chap_user, str)
                        and isinstance(record.mutual_chap_user, str)):
                    raise TypeError("initiators must be a list of names, chap users strings")
            except (KeyError, TypeError, AttributeError) as exc:
                raise CorruptRecord(record_path, f"the export of volume {volume_id}: {_why(exc)}{hint}") from None
            secret = _mapping(secrets.get("secrets", {}), secrets_path, "secrets", hint).get(volume_id)
            if secret is None:
                loaded.append((record, None))
                continue
            try:
                chap, mutual = secret["chap"], secret.get("mutual_chap", "")
                if not isinstance(chap, str) or not isinstance(mutual, str):
                    raise TypeError("secrets must be strings")
            except (KeyError, TypeError, AttributeError) as exc:
                raise CorruptRecord(secrets_path, f"the secrets of volume {volume_id}: {_why(exc)}{hint}") from None
            loaded.append((record, _Secrets(chap, mutual)))
        return loaded

    def _keep_unserved(self, volume_id: str, why: str) -> None:
        self._unserved[volume_id] = why
        log.warning("export of volume %s kept but not served: %s; the controller's repeat of the export, or the "
                    "next restart, serves it once the volume is there", volume_id, why)

    def _serve_kept(self, volume: VolumeInfo, record: ExportRecord, initiator_iqn: str) -> ExportInfo:
        """Serve a record ``restore`` kept, its volume back: its own ACL (plus ``initiator_iqn``) and CHAP."""
        if not _admits(record, initiator_iqn):
            record = replace(record, initiators=record.initiators + (initiator_iqn,))
            self._commit(record, self._secrets[record.volume_id])
        self._serve(volume, record, self._secrets[record.volume_id])  # a failure: still kept, a repeat tries again
        del self._unserved[record.volume_id]
        log.info("volume %s: kept export served again as %s to %s", record.volume_id,
                 self.target_iqn(record.volume_id), ", ".join(record.initiators))
        return self.info(record.volume_id, record.chap_user)

    # ------------------------------------------------------------------ helpers

    def _export_new(self, volume: VolumeInfo, record: ExportRecord, secrets: _Secrets) -> ExportInfo:
        self._commit(record, secrets)
        try:
            self._serve(volume, record, secrets)
        except BaseException:
            self._forget(record.volume_id)
            raise
        log.info("volume %s exported as %s to %s", record.volume_id, self.target_iqn(record.volume_id),
                 record.initiators[0])
        return self.info(record.volume_id, record.chap_user)

    def _serve(self, volume: VolumeInfo, record: ExportRecord, secrets: _Secrets) -> None:
        chap = Credentials(record.chap_user, secrets.chap)
        mutual = Credentials(record.mutual_chap_user, secrets.mutual_chap) if record.mutual_chap_user else None
        # Every LUN is guarded: a snapshot or clone of the volume copied in the background (copies.py) saves
        # the chunks a write is about to change, also when the copy began before this export.
        guards, volume_id = self.volumes.guards, record.volume_id
        # A fully allocated volume is no thin LUN (LBPME=0): UNMAP and WRITE SAME's unmap would punch holes in
        # it, and the space it was given would go to the disk's other volumes.
        spec = LunSpec(volume.path, volume_id=volume_id, wrap=lambda backing: guarded(backing, volume_id, guards),
                       settings=LunSettings(thin_provisioning=volume.thin))
        self.host.add_target(self.target_iqn(volume_id), spec, chap=chap, mutual_chap=mutual,
                             allowed_initiators=list(record.initiators))

    def _check_same_credentials(self, record: ExportRecord, chap: Credentials,
                                mutual_chap: Credentials | None) -> None:
        known = self._secrets[record.volume_id]
        same = (record.chap_user == chap.user and hmac.compare_digest(known.chap.encode(), chap.secret.encode())
                and record.mutual_chap_user == (mutual_chap.user if mutual_chap else "")
                and hmac.compare_digest(known.mutual_chap.encode(),
                                        (mutual_chap.secret if mutual_chap else "").encode()))
        if not same:
            raise AlreadyExists(f"volume {record.volume_id} is exported with other CHAP credentials "
                                f"(user {record.chap_user!r}); unexport it from every initiator first")

    def _commit(self, record: ExportRecord, secrets: _Secrets) -> None:
        """Save the records with ``record``, then hold it in memory: a save that fails changes nothing, so a
        repeat of the call finds the state it found the first time."""
        records = dict(self._records, **{record.volume_id: record})
        all_secrets = dict(self._secrets, **{record.volume_id: secrets})
        self._save(records, all_secrets)
        self._records, self._secrets = records, all_secrets

    def _forget(self, volume_id: str) -> None:
        records, secrets = self._without([volume_id])
        self._save(records, secrets)
        self._records, self._secrets = records, secrets

    def _save(self, records: dict | None = None, secrets: dict | None = None) -> None:
        records = self._records if records is None else records
        secrets = self._secrets if secrets is None else secrets
        # An export a timed-out fence left with nobody is never written: its target goes on the fence's repeat,
        # and a restart does not serve it.
        records = {vid: r for vid, r in records.items() if r.initiators}
        secrets = {vid: s for vid, s in secrets.items() if vid in records}
        # Secrets first: a record never names credentials the secrets file lacks.
        write_json(self._path(SECRETS_FILE), {"secrets": {
            vid: {"chap": s.chap, "mutual_chap": s.mutual_chap} for vid, s in secrets.items()}}, mode=0o600)
        write_json(self._path(RECORD_FILE), {"exports": {
            vid: {"initiators": list(r.initiators), "chap_user": r.chap_user, "mutual_chap_user": r.mutual_chap_user}
            for vid, r in records.items()}})

    def _path(self, name: str) -> str:
        return os.path.join(self.settings.data_dir, name)


def _admits(record: ExportRecord, initiator_iqn: str) -> bool:
    """Whether the record names ``initiator_iqn``, in any spelling: iSCSI names compare case-blind (RFC 7143
    §4.2.7.2, ``same_name``), as the target's ACL does."""
    return any(same_name(name, initiator_iqn) for name in record.initiators)


def _without_name(initiators: tuple[str, ...], initiator_iqn: str) -> tuple[str, ...]:
    """``initiators`` without ``initiator_iqn`` in any spelling: a spelling left behind would admit the initiator
    an unexport or fence cut off, at the next ACL change or restart."""
    return tuple(name for name in initiators if not same_name(name, initiator_iqn))


def _mapping(value: Any, path: str, key: str, hint: str) -> dict:
    if not isinstance(value, dict):
        raise CorruptRecord(path, f"{key!r} must be a JSON object{hint}")
    return value


def _why(exc: BaseException) -> str:
    return f"{exc} is missing" if isinstance(exc, KeyError) else str(exc)


def refuse_if_exported(exports: ExportManager, volume_id: str) -> None:
    if exports.is_exported(volume_id):
        raise FailedPrecondition(f"volume {volume_id} is exported; unexport it before deleting it")
