"""Which device on this host is a CSI volume, checked before the Node service touches it.

ControllerPublishVolume has the agent attach the volume and sends its ``device_path``
with the export's ``naa``/``serial`` in the publish_context.  The Node service only
uses that device when this agent's attachment record says the same: the volume is
attached here, at that path, with that identity.  The device must be a block device,
and where the kernel shows the LUN's VPD pages (``/sys/class/block/X/device/vpd_pg83``,
kernel attachments) they must name the volume too; a userspace attachment's LUN was
checked by the connector when it was attached.  A stale or reused path never reaches
mkfs or mount.
"""

from __future__ import annotations

import os
import stat
from typing import Mapping, Protocol, Sequence

from controller.domain.errors import FailedPrecondition
from node_agent.host.connector import normalise_naa, parse_vpd_identity

SYS_BLOCK = "/sys/class/block"


class AttachedVolumes(Protocol):
    """What ``AttachmentManager`` offers: records with volume_id, device_path and export (naa, serial)."""

    def list(self) -> Sequence: ...


def _same_naa(a: str, b: str) -> bool:
    try:
        return normalise_naa(a) == normalise_naa(b)
    except ValueError:
        return a == b


class DeviceResolver:
    def __init__(self, attachments: AttachedVolumes, sys_block: str = SYS_BLOCK):
        self.attachments = attachments
        self.sys_block = sys_block

    def device(self, volume_id: str, publish_context: Mapping[str, str]) -> str:
        """The checked device path of ``volume_id``; FailedPrecondition when there is none to trust."""
        record = next((r for r in self.attachments.list() if r.volume_id == volume_id), None)
        if record is None:
            raise FailedPrecondition(f"volume {volume_id} is not attached to this node: "
                                     "ControllerPublishVolume attaches it first")
        path = publish_context.get("device_path", "")
        if path and path != record.device_path:
            raise FailedPrecondition(f"volume {volume_id}: publish_context names device {path}, this node has it "
                                     f"at {record.device_path}: publish it again")
        for key, known, same in (("naa", record.export.naa, _same_naa),
                                 ("serial", record.export.serial, str.__eq__)):
            sent = publish_context.get(key, "")
            if sent and known and not same(sent, known):
                raise FailedPrecondition(f"volume {volume_id}: publish_context {key} {sent} is not the attached "
                                         f"LUN's ({known}): publish it again")
        self._check_device(volume_id, record.device_path, record.export.naa, record.export.serial)
        return record.device_path

    def _check_device(self, volume_id: str, path: str, naa: str, serial: str) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise FailedPrecondition(f"volume {volume_id}: device {path} is gone ({exc.strerror}): "
                                     "unpublish and publish it again") from exc
        if not stat.S_ISBLK(mode):
            raise FailedPrecondition(f"volume {volume_id}: {path} is not a block device")
        sysdev = os.path.join(self.sys_block, os.path.basename(os.path.realpath(path)), "device")
        pg83 = _read(os.path.join(sysdev, "vpd_pg83"))
        pg80 = _read(os.path.join(sysdev, "vpd_pg80"))
        if pg83 is None and pg80 is None:
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
