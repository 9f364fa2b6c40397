"""The iSCSI target as a library: LUNs on backing files, one target, one portal.

``shoal target`` is a thin command over ``TargetService``; the node agent
embeds the same service.  Nothing here parses command lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

from node_agent.iscsi.connection import ConnectionSettings
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.names import check_iqn
from node_agent.iscsi.server import PortalServer
from node_agent.iscsi.target import Credentials, TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import FileBackingStore

log = logging.getLogger("shoal.target")

# Namespace of the volume ids derived for LUNs given only as files.
_LUN_NAMESPACE = uuid.UUID("6f2d4c1e-3b8a-4f7e-9d15-5a0c2e7b9f31")
_SIZE = re.compile(r"^(\d+)([KMGTP]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``: binary units, as sizes are given for disks."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"bad size {text!r}: use a number of bytes or a suffix K, M, G, T")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return size


@dataclass
class LunSpec:
    """One LUN: a backing file and, when the file is to be created, its size."""

    path: str
    size: int | None = None
    volume_id: str | None = None  # stable identity reported in VPD 0x80/0x83; derived from the path if None

    @classmethod
    def parse(cls, text: str) -> "LunSpec":
        """``PATH[:SIZE]`` as the command line takes it."""
        path, sep, size = text.rpartition(":")
        if sep and _SIZE.match(size.strip()):
            return cls(path, parse_size(size))
        return cls(text)


@dataclass
class TargetConfig:
    """Everything ``TargetService`` needs."""

    iqn: str
    luns: list[LunSpec]
    host: str = "127.0.0.1"
    port: int = 3260
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allowed_initiators: list[str] | None = None
    settings: TargetSettings = field(default_factory=TargetSettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)

    def validate(self) -> None:
        check_iqn(self.iqn)
        if not self.luns:
            raise ValueError("a target needs at least one LUN")
        if self.mutual_chap is not None and self.chap is None:
            raise ValueError("mutual CHAP needs one-way CHAP credentials too")
        if self.mutual_chap is not None and self.chap is not None and self.mutual_chap.secret == self.chap.secret:
            # RFC 7143 §9.2.1: a secret that authenticates initiators must not authenticate the target.
            raise ValueError("the mutual CHAP secret must differ from the initiator's CHAP secret")
        for name in self.allowed_initiators or []:
            check_iqn(name)


def open_lun(spec: LunSpec, iqn: str) -> LogicalUnit:
    real = os.path.realpath(spec.path)
    backing = FileBackingStore(real, size=spec.size)
    volume_id = spec.volume_id or str(uuid.uuid5(_LUN_NAMESPACE, real))
    identity = LunIdentity(volume_id=volume_id)
    return LogicalUnit(backing, identity, target_name=iqn)


class TargetService:
    """A running target: its LUNs, registry and portal."""

    def __init__(self, config: TargetConfig):
        config.validate()
        self.config = config
        self.units: list[LogicalUnit] = []
        self.registry: TargetRegistry | None = None
        self.portal: PortalServer | None = None

    async def start(self) -> tuple[str, int]:
        config = self.config
        try:
            for spec in config.luns:
                self.units.append(open_lun(spec, config.iqn))
        except BaseException:
            self._close_units()
            raise
        node = TargetNode(
            iqn=config.iqn,
            luns=LunMap(dict(enumerate(self.units))),
            chap=config.chap,
            mutual_chap=config.mutual_chap,
            allowed_initiators=frozenset(config.allowed_initiators) if config.allowed_initiators else None,
        )
        self.registry = TargetRegistry([node])
        self.portal = PortalServer(self.registry, config.settings, config.host, config.port, config.connection)
        await self.portal.start()
        return self.portal.address

    async def stop(self) -> None:
        """Close every session, then flush and close the backing stores."""
        if self.portal is not None:
            await self.portal.close()
            self.portal = None
        self._close_units()

    def _close_units(self) -> None:
        for unit in self.units:
            try:
                unit.close()
            except OSError as exc:
                log.error("closing a LUN failed: %s", exc)
        self.units.clear()


async def serve(config: TargetConfig, ready=None, stop: asyncio.Event | None = None) -> None:
    """Run a target until ``stop`` is set; ``ready(address)`` is called once it listens."""
    service = TargetService(config)
    stop = stop or asyncio.Event()
    address = await service.start()
    try:
        if ready is not None:
            ready(address)
        await stop.wait()
    finally:
        await service.stop()
