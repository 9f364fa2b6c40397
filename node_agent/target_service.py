"""The iSCSI target as a library: LUNs on backing files, targets on one portal.

``shoal target`` is a thin command over ``TargetService`` with one target; the
node agent embeds the same service with none at start and adds, changes and
removes targets (one per exported volume) while it runs.  Nothing here parses
command lines.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import uuid
from fractions import Fraction
from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.iscsi.chap import MIN_SECRET_BYTES
from node_agent.iscsi.connection import ConnectionSettings
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.names import check_iqn, normalize_name
from node_agent.iscsi.server import FairPool, LoopPool, PortalServer, Router, worker_pool
from node_agent.iscsi.target import Credentials, TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap, LunSettings
from node_agent.storage.backing import BackingStore, FileBackingStore, StorageError

log = logging.getLogger("shoal.target")

# Namespace of the volume ids derived for LUNs given only as files.
_LUN_NAMESPACE = uuid.UUID("6f2d4c1e-3b8a-4f7e-9d15-5a0c2e7b9f31")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)(i?B)?$", re.IGNORECASE)
# What a size given after a path looks like, valid or not (a path's own colons, as in /dev/disk/by-path
# names, are followed by other text): a mistyped size is refused rather than taken into the path.
_SIZE_LIKE = re.compile(r"^\s*\d[\d.]*\s*[A-Za-z]{0,3}\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """``64M``, ``1.5G``, ``4096``: binary units, as sizes are given for disks (a whole number of bytes)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"bad size {text!r}: use a number of bytes or a suffix K, M, G, T")
    exact = Fraction(match.group(1)) * _UNITS[match.group(2).upper()]
    if exact.denominator != 1:
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    size = int(exact)
    if size <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return size


#: Options a ``--lun`` may end with, after the path and size (``PATH[:SIZE][:OPTION...]``).
LUN_OPTIONS = ("ro", "atomic", "removable")
#: MAXIMUM ATOMIC TRANSFER LENGTH of a LUN given the ``atomic`` option.
ATOMIC_OPT_IN_BYTES = 1 << 20


@dataclass
class LunSpec:
    """One LUN: a backing file and, when the file is to be created, its size."""

    path: str
    size: int | None = None
    volume_id: str | None = None  # stable identity reported in VPD 0x80/0x83; derived from the path if None
    # A decorator around the opened backing store (the node agent's copy-before-write guard while a snapshot
    # of the volume is being copied); None: the store as opened.
    wrap: Callable[[BackingStore], BackingStore] | None = field(default=None, compare=False, repr=False)
    settings: LunSettings = field(default_factory=LunSettings)

    @classmethod
    def parse(cls, text: str) -> "LunSpec":
        """``PATH[:SIZE][:ro][:atomic][:removable]`` as the command line takes it.

        ``ro`` serves the medium write-protected (writes end with DATA PROTECT).
        ``removable`` makes it a removable medium (RMB=1) initiators may eject and load.
        ``atomic`` offers WRITE ATOMIC(16) up to 1 MiB: only for backing storage
        whose writes cannot tear on power loss (see ``LunSettings.max_atomic_transfer_bytes``).
        """
        rest, options = text, []
        while True:
            head, sep, tail = rest.rpartition(":")
            if not sep or tail not in LUN_OPTIONS:
                break
            options.append(tail)
            rest = head
        settings = LunSettings(read_only="ro" in options, removable="removable" in options,
                               max_atomic_transfer_bytes=ATOMIC_OPT_IN_BYTES if "atomic" in options else 0)
        path, sep, size = rest.rpartition(":")
        if not (sep and _SIZE_LIKE.match(size)):
            path, size = rest, ""
        if not path:
            raise ValueError(f"bad LUN {text!r}: expected PATH[:SIZE][:ro][:atomic][:removable]")
        # What is left must not still end in an option: ``a.img:ro:1M`` (an option before the size) or
        # ``a.img:1G:RO`` (options are lower case) would otherwise serve a new, writable file named
        # ``a.img:ro`` or ``a.img:1G:RO`` instead of the write-protected ``a.img`` that was meant.
        last = path.rpartition(":")[2]
        if ":" in path and last.lower() in LUN_OPTIONS:
            where = ("options go after SIZE" if last in LUN_OPTIONS
                     else f"options are lower case ({last.lower()}, not {last})")
            raise ValueError(f"bad LUN {text!r}: {where}: PATH[:SIZE][:ro][:atomic][:removable]")
        return cls(path, parse_size(size) if size else None, settings=settings)


@dataclass
class TargetSpec:
    """A further target of ``TargetConfig``: its name and LUNs (credentials and ACL are the config's)."""

    iqn: str
    luns: list[LunSpec]


@dataclass
class TargetConfig:
    """Everything ``TargetService`` needs: one target (``iqn``, ``luns``), and maybe more (``more_targets``)."""

    iqn: str
    luns: list[LunSpec]
    host: str = "127.0.0.1"
    port: int = 3260
    more_portals: list[tuple[str, int]] = field(default_factory=list)  # further portals of the same group
    chap: Credentials | None = None
    mutual_chap: Credentials | None = None
    allowed_initiators: list[str] | None = None
    settings: TargetSettings = field(default_factory=TargetSettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    loops: int = 1  # event loops (threads) serving connections; see PortalConfig.loops
    more_targets: list[TargetSpec] = field(default_factory=list)
    workers: int = 1
    """Processes serving sessions (``shoal target --workers N``): each target belongs to one of them (the
    first to worker 0, the second to worker 1, ...), whose sessions it serves; the process started serves
    discovery and routes every other login to its target's worker (node_agent.target_workers).  One
    target's sessions stay in one process: its reservations, unit attentions, task management and
    session reinstatement need no sharing between processes."""

    def portal(self) -> "PortalConfig":
        """Where and how this configuration's portals listen."""
        return PortalConfig(self.host, self.port, self.settings, self.connection, list(self.more_portals),
                            self.loops)

    @property
    def targets(self) -> list[TargetSpec]:
        """Every target served, the first (``iqn``, ``luns``) first."""
        return [TargetSpec(self.iqn, self.luns)] + list(self.more_targets)

    def validate(self) -> None:
        names: set[str] = set()
        paths: dict[object, str] = {}
        for target in self.targets:
            check_iqn(target.iqn)
            key = normalize_name(target.iqn)  # iSCSI names compare case-blind (RFC 7143 §4.2.7.2): one target
            if key in names:
                raise ValueError(f"target {target.iqn} is given twice (iSCSI names do not differ by case alone)")
            names.add(key)
            if not target.luns:
                raise ValueError(f"target {target.iqn} needs at least one LUN")
            for spec in target.luns:  # two LUNs on one file would keep two sets of reservations for one medium
                # An existing file is known by its inode: a hard link is another path to the same medium (and
                # would get another VPD identity, so a multipath initiator would see two disks).
                real = os.path.realpath(spec.path)
                try:
                    st = os.stat(real)
                    key: object = (st.st_dev, st.st_ino)
                except OSError:  # not there yet (created at start): its path is all there is
                    key = real
                if key in paths:
                    raise ValueError(f"{spec.path} is served twice (by {paths[key]} and {target.iqn})")
                paths[key] = target.iqn
        if not 1 <= self.loops <= 64:
            raise ValueError(f"--loops must be 1 to 64, not {self.loops}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"--workers must be 1 to 64, not {self.workers}")
        if self.workers > len(self.targets):
            raise ValueError(f"--workers {self.workers} needs at least {self.workers} targets: each target's "
                             f"sessions are served by one process (give more with --iqn NAME --lun FILE)")
        if not self.connection.nop_timeout > 0:
            raise ValueError("--nop-timeout must be more than 0 seconds")
        if self.mutual_chap is not None and self.chap is None:
            raise ValueError("mutual CHAP needs one-way CHAP credentials too")
        if self.mutual_chap is not None and self.chap is not None and self.mutual_chap.secret == self.chap.secret:
            # RFC 7143 §9.2.1: a secret that authenticates initiators must not authenticate the target.
            raise ValueError("the mutual CHAP secret must differ from the initiator's CHAP secret")
        if self.allowed_initiators is not None and not self.allowed_initiators:
            raise ValueError("an initiator ACL needs at least one initiator name (no ACL admits every initiator)")
        for name in self.allowed_initiators or []:
            check_iqn(name)
        for role, creds in (("initiator", self.chap), ("target (mutual)", self.mutual_chap)):
            if creds is not None and len(creds.secret.encode()) < MIN_SECRET_BYTES:
                log.warning("the %s CHAP secret for user %r is shorter than %d bytes (RFC 7143 §9.2.1): easy "
                            "to guess from one captured login", role, creds.user, MIN_SECRET_BYTES)


def open_lun(spec: LunSpec, iqn: str) -> LogicalUnit:
    real = os.path.realpath(spec.path)
    read_only = spec.settings.read_only
    if not os.path.exists(real) and (read_only or spec.size is None):
        raise StorageError(errno.ENOENT, f"{spec.path} does not exist" + (
            " (a :ro LUN is never created)" if read_only else ", and no size was given to create it (PATH:SIZE)"))
    # A write-protected LUN is opened O_RDONLY: never created or extended, and servable from a file or mount
    # this process may not write (a smaller file than SIZE is refused).
    backing: BackingStore = FileBackingStore(real, size=spec.size, read_only=read_only)
    if spec.wrap is not None:
        backing = spec.wrap(backing)
    volume_id = spec.volume_id or str(uuid.uuid5(_LUN_NAMESPACE, real))
    identity = LunIdentity(volume_id=volume_id)
    return LogicalUnit(backing, identity, target_name=iqn, settings=spec.settings)


@dataclass
class PortalConfig:
    """Where a portal listens and how its connections negotiate (no targets: they come at run time)."""

    host: str = "127.0.0.1"
    port: int = 3260
    settings: TargetSettings = field(default_factory=TargetSettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    # Further addresses of the same portal group (multipath: one target, one set of LUNs and
    # reservations, reached through several portals).
    more_portals: list[tuple[str, int]] = field(default_factory=list)
    loops: int = 1
    """Event loops serving connections, each on its own thread; connections are pinned to the
    least busy one.  1 (the default): the Python work of a session is what costs, and the GIL
    runs it on one core whatever the number of threads; more loops overlap only the system
    calls of different sessions (see tests/perf/README.md for what that measured)."""


class TargetService:
    """A running portal: its registry, the targets it serves and their LUNs.

    ``TargetService(config)`` serves the one target of ``config`` (``shoal
    target``); ``TargetService(portal=PortalConfig(...))`` starts with none,
    and ``add_target``/``remove_target``/``set_allowed_initiators``/``resize_lun``
    change what it serves while it runs (the node agent's exports).  Those
    methods must run on the event loop that started the service: the registry
    and the logical units belong to it.
    """

    def __init__(self, config: TargetConfig | None = None, *, portal: PortalConfig | None = None):
        if config is None and portal is None:
            raise ValueError("TargetService needs a target (config) or a portal")
        if config is not None:
            config.validate()
            portal = portal or config.portal()
        self.config = config
        self.portal_config: PortalConfig = portal  # type: ignore[assignment]
        self._units: dict[str, list[LogicalUnit]] = {}
        self.registry: TargetRegistry | None = None
        self.portal: PortalServer | None = None
        self.more_portals: list[PortalServer] = []
        self.executor: FairPool | None = None  # blocking I/O of every portal
        self.loops: LoopPool | None = None

    @property
    def units(self) -> list[LogicalUnit]:
        """Every logical unit of every target served."""
        return [unit for units in self._units.values() for unit in units]

    async def start(self) -> tuple[str, int]:
        self.registry = TargetRegistry()
        config = self.config
        if config is not None:
            try:
                for target in config.targets:
                    self.add_target(target.iqn, target.luns, chap=config.chap, mutual_chap=config.mutual_chap,
                                    allowed_initiators=config.allowed_initiators)
            except BaseException:  # the targets opened before the one that failed are closed too
                self._close_units()
                raise
        return await self.start_portals()

    async def start_portals(self, *, listen: bool = True, router: Router | None = None) -> tuple[str, int]:
        """Start the portals of the targets added so far.  ``listen=False``: one portal that only serves
        sockets given to ``self.portal.adopt`` (a worker process); ``router`` decides for each accepted
        connection which process serves it (the parent of the workers)."""
        pc = self.portal_config
        self.executor = worker_pool(pc.connection)
        if pc.loops > 1:
            self.loops = LoopPool(pc.loops)
            self.loops.start(asyncio.get_running_loop())
        self.portal = PortalServer(self.registry, pc.settings, pc.host, pc.port, pc.connection, self.executor,
                                   self.loops, router)
        try:
            await self.portal.start(listen=listen)
            if not listen:
                return (pc.host, pc.port)
            for host, port in pc.more_portals:
                extra = PortalServer(self.registry, pc.settings, host, port, pc.connection, self.executor,
                                     self.loops, router)
                await extra.start()
                self.more_portals.append(extra)
        except BaseException:
            await self._close_portals()
            self._close_units()
            raise
        return self.portal.address

    def add_routed_target(self, iqn: str, *, chap: Credentials | None, mutual_chap: Credentials | None,
                          allowed_initiators: list[str] | frozenset[str] | None) -> TargetNode:
        """Know ``iqn`` for discovery only: another process serves its sessions (its LUNs are not opened)."""
        if self.registry is None:
            self.registry = TargetRegistry()
        node = TargetNode(iqn=iqn, luns=LunMap({}), chap=chap, mutual_chap=mutual_chap,
                          allowed_initiators=None if allowed_initiators is None else frozenset(allowed_initiators),
                          elsewhere=True)
        with self.registry.lock:
            return self.registry.add_target(node)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every listening portal's address, the first one first."""
        portals = ([self.portal] if self.portal is not None else []) + self.more_portals
        return [p.address for p in portals]

    async def _close_portals(self) -> None:
        for extra in self.more_portals:
            await extra.close()
        self.more_portals.clear()
        if self.portal is not None:
            await self.portal.close()
            self.portal = None
        if self.loops is not None:
            self.loops.stop()
            self.loops = None
        if self.executor is not None:  # I/O still running ends before the backing stores close
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    async def stop(self) -> None:
        """Close every session, then flush and close the backing stores.  A running SANITIZE stops at its next
        chunk (as for a removal: its pass over a whole medium would hold the stop for minutes), leaving the
        failed-sanitize state on disk for the next start."""
        for unit in self.units:
            unit.stop_sanitize()
        await self._close_portals()
        self._close_units()

    # -- run-time changes ------------------------------------------------------------
    def add_target(self, iqn: str, luns: list[LunSpec], *, chap: Credentials | None = None,
                   mutual_chap: Credentials | None = None,
                   allowed_initiators: list[str] | frozenset[str] | None = None,
                   per_initiator_chap: bool = False) -> TargetNode:
        """Serve a new target with ``luns`` (0, 1, ...).  A target of that name already served is returned
        unchanged (its LUNs are not reopened).  ``per_initiator_chap``: see ``TargetNode``."""
        if self.registry is None:
            self.registry = TargetRegistry()
        with self.registry.lock:
            return self._add_target(iqn, luns, chap, mutual_chap, allowed_initiators, per_initiator_chap)

    def _add_target(self, iqn, luns, chap, mutual_chap, allowed_initiators, per_initiator_chap=False) -> TargetNode:
        assert self.registry is not None
        existing = self.registry.targets.get(iqn)
        if existing is not None:
            return existing
        TargetConfig(iqn, list(luns), chap=chap, mutual_chap=mutual_chap,
                     allowed_initiators=list(allowed_initiators) if allowed_initiators is not None else None
                     ).validate()
        units: list[LogicalUnit] = []
        try:
            for spec in luns:
                units.append(open_lun(spec, iqn))
        except BaseException:
            _close_all(units)
            raise
        node = TargetNode(
            iqn=iqn,
            luns=LunMap(dict(enumerate(units))),
            chap=chap,
            mutual_chap=mutual_chap,
            allowed_initiators=None if allowed_initiators is None else frozenset(allowed_initiators),
            per_initiator_chap=per_initiator_chap,
        )
        self._units[iqn] = units
        return self.registry.add_target(node)

    def remove_target(self, iqn: str) -> bool:
        """Stop serving ``iqn``: close its sessions, then flush and close its LUNs.  False if not served."""
        units = self.detach_target(iqn)
        if units is None:
            return False
        for unit in units:  # all of them first: an EXTENDED COPY running on one may write another
            unit.retire()
        _close_all(units)
        return True

    def detach_target(self, iqn: str) -> list[LogicalUnit] | None:
        """Stop serving ``iqn`` and close its sessions, but leave its LUNs open: the caller retires them
        (``LogicalUnit.retire``: the flush, which can take seconds, off the event loop) and then closes
        them (``close_units``).  None if not served."""
        if self.registry is None:
            return None
        with self.registry.lock:
            node = self.registry.remove_target(iqn)
            units = self._units.pop(iqn, [])
        return units if node is not None else None

    @staticmethod
    def close_units(units: list[LogicalUnit]) -> None:
        """Close LUNs ``detach_target`` gave (errors are logged)."""
        _close_all(list(units))

    def set_allowed_initiators(self, iqn: str, names: list[str] | frozenset[str]) -> dict[str, list]:
        """Replace the ACL of ``iqn``; sessions of initiators no longer admitted are closed.  Returns their
        connections by initiator name (commands of theirs may still run on workers)."""
        if self.registry is None:
            raise KeyError(f"target {iqn} is not served")
        with self.registry.lock:
            return self._set_allowed_initiators(iqn, names)

    def _set_allowed_initiators(self, iqn: str, names: list[str] | frozenset[str]) -> dict[str, list]:
        node = self._target(iqn)
        for name in names:
            check_iqn(name)
        allowed = frozenset(names)
        if not allowed:
            raise ValueError("an ACL needs at least one initiator (remove the target instead)")
        before = node.allowed_initiators
        node.allowed_initiators = allowed
        assert self.registry is not None
        closed: dict[str, list] = {}
        for gone in (before or frozenset()) - allowed:
            closed[gone] = self.registry.close_initiator_sessions(iqn, gone, "initiator removed from the ACL")
        if before is None:  # everyone was admitted: close whoever is not now
            for session in list(self.registry.sessions.values()):
                if session.target is node and session.initiator_name not in allowed:
                    closed.setdefault(session.initiator_name, []).extend(session.connections.values())
                    self.registry.close_session(session, "initiator removed from the ACL")
        return closed

    def resize_lun(self, iqn: str, lun: int, new_bytes: int) -> int:
        """Grow a LUN's medium to ``new_bytes``; logged-in initiators get CAPACITY DATA HAS CHANGED
        (SBC-3 §4.6).  Returns the new size; the same size is a no-op, a smaller one is refused."""
        if self.registry is None:
            raise KeyError(f"target {iqn} is not served")
        with self.registry.lock:
            unit = self._target(iqn).luns.luns.get(lun)
            if unit is None:
                raise KeyError(f"target {iqn} has no LUN {lun}")
            if new_bytes != unit.backing.size:
                unit.resize(new_bytes)
            return unit.backing.size

    def _target(self, iqn: str) -> TargetNode:
        node = self.registry.targets.get(iqn) if self.registry is not None else None
        if node is None:
            raise KeyError(f"target {iqn} is not served")
        return node

    def _close_units(self) -> None:
        for units in self._units.values():
            _close_all(units)
        self._units.clear()


def _close_all(units: list[LogicalUnit]) -> None:
    for unit in units:
        try:
            unit.close()
        except OSError as exc:
            log.error("closing a LUN failed: %s", exc)
    units.clear()


@dataclass(frozen=True)
class _LunFileBefore:
    """A LUN file as it was before a start (``size`` None: it did not exist), and the size the start gives it."""

    path: str
    size: int | None
    inode: tuple[int, int] | None
    wanted: int | None


def lun_files_before(config: TargetConfig) -> list[_LunFileBefore]:
    """The regular LUN files of ``config`` (and the missing ones) as they are now, for ``undo_lun_files``."""
    found = []
    for target in config.targets:
        for spec in target.luns:
            real = os.path.realpath(spec.path)
            try:
                st = os.stat(real)
            except FileNotFoundError:
                found.append(_LunFileBefore(real, None, None, spec.size))
                continue
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(_LunFileBefore(real, st.st_size, (st.st_dev, st.st_ino), spec.size))
    return found


def undo_lun_files(before: list[_LunFileBefore]) -> None:
    """After a start that failed: remove the LUN files it created and shrink back the ones it extended, so
    that nothing is left changed on disk by a target that never served.  Only what surely holds no data is
    undone: a created file still of the size it was made with and with no block allocated, an extended one
    still the same inode, of the extended size and with nothing written past its old end (SEEK_DATA)."""
    for was in before:
        if was.wanted is None:
            continue
        try:
            try:
                st = os.stat(was.path)
            except FileNotFoundError:  # not created (or removed again by its store)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != was.wanted:
                continue
            if was.size is None:
                if st.st_blocks == 0:
                    os.unlink(was.path)
                    log.info("removed %s again: the target did not start", was.path)
            elif (st.st_dev, st.st_ino) == was.inode and was.size < was.wanted:
                fd = os.open(was.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    if _only_hole_after(fd, was.size):
                        os.ftruncate(fd, was.size)
                        log.info("shrank %s back to %d bytes: the target did not start", was.path, was.size)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("could not undo the start's change to %s: %s", was.path, exc)


def _only_hole_after(fd: int, offset: int) -> bool:
    """Whether nothing was written at or after ``offset`` (SEEK_DATA finds no data there)."""
    try:
        os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    return False


async def serve(config: TargetConfig, ready=None, stop: asyncio.Event | None = None) -> None:
    """Run a target until ``stop`` is set; ``ready(addresses)`` is called once every portal listens.
    With ``config.workers`` > 1 the sessions are served by worker processes (node_agent.target_workers).

    A start that fails (a busy port, a bad LUN after good ones, a worker that could not open its LUNs)
    leaves the LUN files as they were: the LUNs are opened before the portals listen (an initiator that
    reconnects must never find the target missing), so what this start created or extended is undone
    (``undo_lun_files``)."""
    before = lun_files_before(config)
    serving = False

    def started(addresses: list[tuple[str, int]]) -> None:
        nonlocal serving
        if ready is not None:
            ready(addresses)
        serving = True

    try:
        if config.workers > 1:
            from node_agent.target_workers import serve_sharded

            config.validate()
            await serve_sharded(config, started, stop or asyncio.Event())
            return
        service = TargetService(config)
        stop = stop or asyncio.Event()
        await service.start()
        try:
            started(service.addresses)
            await stop.wait()
        finally:
            await service.stop()
    except BaseException:
        if not serving:  # every LUN is closed by now (the service or the workers stopped)
            undo_lun_files(before)
        raise
