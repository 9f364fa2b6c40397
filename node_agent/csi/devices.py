"""Which device on this host is a CSI volume, checked before the Node service touches it.

ControllerPublishVolume has the node's agent record the volume's target and CHAP
credentials (``AttachmentManager``, no login yet) and sends the export's
``target_iqn``/``lun``/``naa``/``serial`` in the publish_context.  NodeStageVolume
logs in through ``stage``: the publish_context must name what the agent recorded,
the connector checks the LUN's VPD identity (NAA, serial) before it hands out a
device, and here the device must be a block device and, where the kernel shows the
LUN's VPD pages (``/sys/class/block/X/device/vpd_pg83``, kernel attachments), they
must name the volume too; a device without them (a loop device, userspace
attachments) must be the one the connector made (its backing file).  ``device`` (NodePublish, NodeExpand) does the same
checks on a volume already logged in.  A stale or reused path never reaches mkfs
or mount.

The agent's errors become the domain's (the CSI error table's) by their gRPC code.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import ContextManager, Iterator, Mapping, Protocol

import grpc

from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted, Unavailable)
from node_agent.agent.errors import grpc_status
from node_agent.host.connector import normalise_naa, parse_vpd_identity

SYS_BLOCK = "/sys/class/block"

_BY_CODE: dict[grpc.StatusCode, type[DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists, grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted, grpc.StatusCode.UNAVAILABLE: Unavailable,
}


class AttachedVolumes(Protocol):
    """What ``AttachmentManager`` offers: records (volume_id, device_path ("" until logged in), export with
    target_iqn, lun, naa, serial) and the agent-local login, logout, rescan and condition."""

    def get(self, volume_id: str): ...

    def login(self, volume_id: str) -> str: ...

    def logout(self, volume_id: str) -> bool: ...

    def rescan(self, volume_id: str) -> int: ...

    def condition(self, volume_id: str) -> str: ...

    def foreign_device(self, volume_id: str, path: str) -> str: ...

    def unstage_devices(self, volume_id: str) -> list[str]: ...

    def hold(self, volume_id: str) -> ContextManager: ...


def _same_naa(a: str, b: str) -> bool:
    try:
        return normalise_naa(a) == normalise_naa(b)
    except ValueError:
        return a == b


@contextlib.contextmanager
def _agent_errors() -> Iterator[None]:
    """The agent's and the connectors' errors as domain errors (same gRPC code); bugs pass through."""
    try:
        yield
    except DomainError:
        raise
    except Exception as exc:
        status = grpc_status(exc)
        if status is None or status[0] not in _BY_CODE:
            raise
        raise _BY_CODE[status[0]](status[1]) from exc


class DeviceResolver:
    def __init__(self, attachments: AttachedVolumes, sys_block: str = SYS_BLOCK):
        self.attachments = attachments
        self.sys_block = sys_block

    def hold(self, volume_id: str) -> ContextManager:
        """The agent's own per-volume lock (reentrant): while a Node RPC holds it, the agent's attach, login,
        logout and detach of the volume (ControllerUnpublishVolume, ``shoalctl volume detach``) wait, so the
        device checked at its start is still the volume's when it formats or mounts it."""
        return self.attachments.hold(volume_id)

    def stage(self, volume_id: str, publish_context: Mapping[str, str]) -> str:
        """Log in (a repeat: the same device) and return the checked device path."""
        record = self._record(volume_id, publish_context)
        with _agent_errors():
            path = self.attachments.login(volume_id)
        self._check_device(volume_id, path, record.export.naa, record.export.serial)
        return path

    def device(self, volume_id: str, publish_context: Mapping[str, str]) -> str:
        """The checked device path of a volume logged in here; FailedPrecondition when there is none to trust."""
        record = self._record(volume_id, publish_context)
        if not record.device_path:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node: NodeStageVolume first")
        path = publish_context.get("device_path", "")
        if path and path != record.device_path:
            raise FailedPrecondition(f"volume {volume_id}: publish_context names device {path}, this node has it "
                                     f"at {record.device_path}: publish it again")
        self._check_device(volume_id, record.device_path, record.export.naa, record.export.serial)
        return record.device_path

    def known(self, volume_id: str) -> bool:
        """Whether the agent has a record of the volume (ControllerPublishVolume to this node, not unpublished)."""
        return self.attachments.get(volume_id) is not None

    def logged_in(self, volume_id: str) -> str:
        """The device of a volume logged in here, unchecked ("" when there is none): for tearing down."""
        record = self.attachments.get(volume_id)
        return record.device_path if record is not None else ""

    def unstage_devices(self, volume_id: str) -> list[str]:
        """The devices whose mounts NodeUnstageVolume takes for the volume's, unchecked (for tearing down): its
        logged-in device unless the agent's connector says that path is another's by now, or the dead devices an
        earlier agent left of it.  Attachments that cannot tell (no ``unstage_devices``): the logged-in device."""
        devices = getattr(self.attachments, "unstage_devices", None)
        if devices is None:
            path = self.logged_in(volume_id)
            return [path] if path else []
        with _agent_errors():
            return devices(volume_id)

    def unstage(self, volume_id: str) -> None:
        """Log out (flush, remove the device); the agent keeps the record.  Nothing logged in: OK."""
        with _agent_errors():
            self.attachments.logout(volume_id)

    def rescan(self, volume_id: str) -> int:
        """The device shows the LUN's current capacity (after an expand); its size in bytes."""
        self.device(volume_id, {})
        with _agent_errors():
            return self.attachments.rescan(volume_id)

    def condition(self, volume_id: str) -> str:
        """Why the volume is not healthy on this node ("" when it is)."""
        try:
            with _agent_errors():
                reason = self.attachments.condition(volume_id)
            if not reason:
                self.device(volume_id, {})
        except DomainError as exc:
            return str(exc)
        return reason

    def _record(self, volume_id: str, publish_context: Mapping[str, str]):
        record = self.attachments.get(volume_id)
        if record is None:  # the spec's "volume does not exist", as far as this node can know
            raise NotFound(f"volume {volume_id} is not published to this node: ControllerPublishVolume first")
        export = record.export
        for key, known, same in (("naa", export.naa, _same_naa), ("serial", export.serial, str.__eq__),
                                 ("target_iqn", export.target_iqn, str.__eq__),
                                 ("lun", str(export.lun), str.__eq__)):
            sent = publish_context.get(key, "")
            if sent and known and not same(sent, known):
                raise FailedPrecondition(f"volume {volume_id}: publish_context {key} {sent} is not the published "
                                         f"LUN's ({known}): publish it again")
        return record

    def _check_device(self, volume_id: str, path: str, naa: str, serial: str) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise FailedPrecondition(f"volume {volume_id}: device {path} is gone ({exc.strerror}): "
                                     "unstage and stage it again") from exc
        if not stat.S_ISBLK(mode):
            raise FailedPrecondition(f"volume {volume_id}: {path} is not a block device")
        sysdev = os.path.join(self.sys_block, os.path.basename(os.path.realpath(path)), "device")
        pg83 = _read(os.path.join(sysdev, "vpd_pg83"))
        pg80 = _read(os.path.join(sysdev, "vpd_pg80"))
        if pg83 is None and pg80 is None:  # no VPD pages (a loop device): the connector knows what it made
            with _agent_errors():
                reason = self.attachments.foreign_device(volume_id, path)
            if reason:
                raise FailedPrecondition(f"volume {volume_id}: {path} is not this volume's device: {reason}: "
                                         "unstage and stage it again")
            return
        reported = parse_vpd_identity(pg83, pg80)
        problems = []
        if naa and pg83 is not None and not any(_same_naa(naa, n) for n in reported.naas):
            problems.append(f"NAA {naa} expected, the device reports {list(reported.naas) or 'none'}")
        if serial and pg80 is not None and reported.serial != serial:
            problems.append(f"serial {serial!r} expected, the device reports {reported.serial!r}")
        if problems:
            raise FailedPrecondition(f"volume {volume_id}: {path} is not this volume's LUN: {'; '.join(problems)}")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
