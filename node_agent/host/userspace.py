"""The userspace connector: a remote LUN as ``/dev/loopN`` without the kernel's iSCSI initiator.

Attach, under the target's lock:

1. clear what a crashed predecessor left for this volume (a loop device on a
   dead FUSE file, the dead FUSE mount itself);
2. log in with Shoal's initiator (``SyncLun``) and check the LUN's VPD 83h NAA
   designator and 80h serial against the volume **before anything is
   exported** — a mismatch closes the session and raises ``IdentityMismatch``;
3. export the LUN as ``<state_dir>/volumes/<volume>/mnt/disk`` through FUSE
   (``fuse_export``), served by threads of this process;
4. ``losetup --find --show --direct-io=on --sector-size <block>`` on that file
   and check the kernel's ``backing_file`` is ours;
5. write the attachment note (``attachment.json``); only then does the volume
   count as attached: a note that cannot be written undoes steps 2-4.

Attaching an attached volume returns the same device and counts one more
user, once the device is checked to be still the one this process made and
serves (``_bound``: the kernel backs it with the very FUSE file this process
serves, by device and inode, not only by path); a device that is not (detached
or replaced behind our back, its FUSE server gone) is torn down and the volume
attached again, or the attach fails while that device is in use.  ``detach``
counts down and tears down at zero: refuse while the device
is mounted or held exclusively, ``blockdev --flushbufs``, ``losetup -d``,
SYNCHRONIZE CACHE, unmount the FUSE file, log out.  Detaching what is not
attached cleans up stale state and succeeds.

A loop device cannot outlive the process serving its FUSE file: once that
process is gone the kernel aborts the FUSE connection and every I/O on the loop
device fails (EIO) for good.  A FUSE file served again at the same path does not
revive it (the loop device holds the dead mount's inode, and
``LOOP_CHANGE_FD`` only swaps the file of a read-only loop device), so a
restarted agent never reuses such a device: it removes it (and the dead mount)
before attaching the volume again, and refuses while it is still mounted.

Sessions: ``SyncLun`` logs in once per LUN, so two volumes of one target hold
two sessions; ``SessionRegistry`` still tracks the target's LUNs so a shared
session can be dropped in behind ``open_lun`` without changing the count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.host.connector import (
    AttachedDevice,
    Connector,
    ConnectorError,
    IdentityMismatch,
    PermanentConnectorError,
    SessionRegistry,
    TargetLocks,
    TemporaryConnectorError,
    VolumeTarget,
    check_identity,
    refuse_if_busy,
)
from node_agent.host.fuse_export import BlockDevice, ExportBusy, ExportSettings, FuseExport, is_mountpoint, unmount
from node_agent.host.runner import CommandFailed, Runner, SubprocessRunner

log = logging.getLogger(__name__)

LunOpener = Callable[[VolumeTarget, "UserspaceSettings"], BlockDevice]


def open_sync_lun(target: VolumeTarget, settings: "UserspaceSettings") -> BlockDevice:
    """Log in with Shoal's initiator (the default ``LunOpener``).  A login the target refuses, or one
    whose negotiation we refuse (digests required and not given), is a ``PermanentConnectorError``
    (or a temporary one when the target says so, RFC 7143 §11.13.5)."""
    from node_agent.iscsi.initiator.blockdev import SyncLun  # the initiator is only needed to attach
    from node_agent.iscsi.initiator.client import ClientSettings
    from node_agent.iscsi.initiator.core import InitiatorError, LoginError

    client = ClientSettings(header_digest=settings.header_digest, data_digest=settings.data_digest,
                            reconnect_timeout=settings.reconnect_timeout)
    try:
        return SyncLun.open(target, initiator_iqn=settings.initiator_iqn, settings=client)
    except LoginError as exc:
        kind = PermanentConnectorError if exc.permanent else TemporaryConnectorError
        raise kind(f"login to {target.target_iqn} refused: {exc}") from exc
    except InitiatorError as exc:
        raise PermanentConnectorError(f"login to {target.target_iqn} failed: {exc}") from exc


def _initiator_error() -> type[Exception]:
    """``InitiatorError``: what Shoal's initiator raises for a command the target answered against the
    protocol (a Reject, an impossible residual) rather than an ``OSError``; the connector takes it as
    the I/O failure it is (a temporary error: a retry may find the target sane again)."""
    from node_agent.iscsi.initiator.core import InitiatorError  # the initiator is only needed to attach
    return InitiatorError


@dataclass(frozen=True)
class UserspaceSettings:
    """Where and how the userspace connector works."""

    state_dir: str
    """Holds ``volumes/<volume>/mnt`` (the FUSE mount) and ``locks/``; one per agent."""
    initiator_iqn: str = "iqn.2026-11.io.shoal:initiator"
    """The name this host logs in with; the target's ACL admits it."""
    loop_direct_io: bool = True
    """``losetup --direct-io=on``: the loop device reads and writes the FUSE file with O_DIRECT,
    so no page cache sits between the filesystem on /dev/loopN and the LUN (one cache, not two)."""
    export: ExportSettings = field(default_factory=lambda: ExportSettings(zero_punched_ranges=False))
    """FUSE export settings; ``fsname`` is set per volume.  A punch on a LUN whose UNMAP leaves no zeros is
    refused, so the loop device offers no discard there (``ExportSettings.zero_punched_ranges``)."""
    reconnect_timeout: float = 30.0
    """Seconds a lost session is retried (``ClientSettings.reconnect_timeout``): I/O on the loop device
    waits that long for the target to come back, then fails with EIO, and the volume's session is down."""
    release_timeout: float = 10.0
    """Seconds to wait for the kernel to let go of the FUSE file after ``losetup -d``."""
    header_digest: tuple[str, ...] = ("None",)
    data_digest: tuple[str, ...] = ("None",)
    """Digests offered at login, in order of preference (``AgentSettings.iscsi_header_digest``)."""


class _SessionGone(TemporaryConnectorError):
    """The detach released everything, but could not SYNCHRONIZE CACHE: the session ended for good."""


@dataclass
class _Attachment:
    device: AttachedDevice
    lun: BlockDevice
    export: FuseExport
    users: int = 1
    loop_released: bool = False
    """``losetup --detach`` of ``device.path`` succeeded: the number may now be another volume's loop device,
    so a retried detach (after SYNCHRONIZE CACHE or the unmount failed) must never touch it again."""


class UserspaceConnector(Connector):
    """Shoal's initiator + FUSE + a loop device; see the module docstring."""

    def __init__(self, settings: UserspaceSettings, *, runner: Runner | None = None,
                 open_lun: LunOpener = open_sync_lun, locks: TargetLocks | None = None,
                 sessions: SessionRegistry | None = None):
        self.settings = settings
        self._root = os.path.realpath(settings.state_dir)  # sysfs shows the loop's backing file resolved
        self.runner = runner or SubprocessRunner(timeout=60.0)
        self.open_lun = open_lun
        self.locks = locks or TargetLocks(os.path.join(self._root, "locks"))
        self.sessions = sessions or SessionRegistry()
        self._attached: dict[str, _Attachment] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ public

    def attach(self, target: VolumeTarget) -> AttachedDevice:
        with self.locks.hold(target.session_key):
            with self._guard:
                current = self._attached.get(target.volume_id)
            if current is not None:
                stale = self._stale(current)
                if not stale:
                    return self._reuse(current, target)
                self._drop_stale(current, stale)
            self._clean_stale(target.volume_id)
            return self._attach_new(target)

    def detach(self, target: VolumeTarget) -> None:
        with self.locks.hold(target.session_key):
            with self._guard:
                current = self._attached.get(target.volume_id)
                if current is not None and current.users > 1:
                    current.users -= 1
                    log.info("detach %s: %d user(s) remain on %s", target.volume_id, current.users,
                             current.device.path)
                    return
            if current is None:
                self._clean_stale(target.volume_id)
                return
            try:
                self._teardown(current)
            except _SessionGone:  # torn down all the same: a retry finds nothing attached
                self._forget(target)
                raise
            self._forget(target)
            log.info("detached %s from %s", target.volume_id, current.device.path)

    def _forget(self, target: VolumeTarget) -> None:
        with self._guard:
            del self._attached[target.volume_id]
        self.sessions.release(target.session_key, target.lun)

    def rescan(self, target: VolumeTarget) -> int:
        """READ CAPACITY again, grow the FUSE file to it, then ``losetup --set-capacity``; the new size."""
        with self.locks.hold(target.session_key):
            with self._guard:
                current = self._attached.get(target.volume_id)
            if current is None:
                raise PermanentConnectorError(f"volume {target.volume_id} is not attached by this connector")
            try:
                size = current.lun.refresh_capacity()
                current.export.resize(size)
                self.runner.run(["losetup", "--set-capacity", current.device.path])
            except CommandFailed as exc:
                raise TemporaryConnectorError(f"losetup --set-capacity {current.device.path}: {exc}") from exc
            except (OSError, TimeoutError, _initiator_error()) as exc:
                raise TemporaryConnectorError(f"cannot read the capacity of {target.volume_id}: {exc}") from exc
            log.info("rescanned %s: %s is %d bytes", target.volume_id, current.device.path, size)
            return _device_size(current.device.path)

    def condition(self, target: VolumeTarget) -> str:
        """"" while the loop device is ours, the FUSE export serves and answered no read or write with EIO."""
        with self._guard:
            current = self._attached.get(target.volume_id)
        if current is None:
            return f"volume {target.volume_id} is not attached (its userspace session ended)"
        unbound = _bound(current.device.path, current.export.path) if current.export.running else ""
        if unbound:
            return f"{unbound}: no longer the volume's device"
        session = current.lun.session_state
        if session != "up":
            return f"the iSCSI session of {target.volume_id} to {target.target_iqn} is {session}"
        if not current.export.running:
            return f"the FUSE export of {target.volume_id} stopped"
        if current.export.io_errors:
            return f"{current.export.io_errors} I/O errors answered on {target.volume_id} since it was attached"
        return ""

    def foreign_device(self, target: VolumeTarget, path: str) -> str:
        """A loop device has no VPD pages: it is ours while the kernel backs it with the volume's FUSE file as
        this process serves it (the same device and inode: a loop device left on the same path by a previous
        agent's FUSE mount is not), and that export still serves."""
        with self._guard:
            current = self._attached.get(target.volume_id)
        if current is None:
            return f"volume {target.volume_id} is not attached (its userspace session ended)"
        backing = _backing_file(path)
        if backing != current.export.path:
            return (f"{path} is backed by {backing or 'nothing'}, not by the FUSE file of {target.volume_id} "
                    f"({current.export.path})")
        if not current.export.running:
            return f"the FUSE export of {target.volume_id} at {current.export.path} stopped"
        return _bound(path, current.export.path)

    def leftovers(self, volume_id: str) -> list[str]:
        """What a previous process left of ``volume_id`` while this one has not attached it: loop devices on
        its FUSE file (dead: their server exited) and the FUSE mount itself; ``detach`` removes them."""
        with self._guard:
            if volume_id in self._attached:
                return []
        mountpoint = os.path.join(self.volume_dir(volume_id), "mnt")
        found = _loops_backed_by(os.path.join(mountpoint, "disk"))
        return found + [mountpoint] if is_mountpoint(mountpoint) else found

    def users(self, volume_id: str) -> int:
        """How many attaches of ``volume_id`` are outstanding (0 if not attached)."""
        with self._guard:
            current = self._attached.get(volume_id)
            return current.users if current else 0

    def volume_dir(self, volume_id: str) -> str:
        """``<state_dir>/volumes/<name>``: the id itself when it is a safe file name, else a hashed form."""
        name = volume_id if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", volume_id) and volume_id not in (".", "..") \
            else re.sub(r"[^A-Za-z0-9._-]", "_", volume_id)[:60] + "-" + \
            hashlib.sha256(volume_id.encode()).hexdigest()[:16]
        return os.path.join(self._root, "volumes", name)

    # ------------------------------------------------------------------ attach

    def _reuse(self, current: _Attachment, target: VolumeTarget) -> AttachedDevice:
        known = current.device.target
        if (known.target_iqn, known.portals, known.lun) != (target.target_iqn, target.portals, target.lun):
            raise PermanentConnectorError(
                f"volume {target.volume_id} is attached from LUN {known.lun} of {known.target_iqn}, "
                f"not LUN {target.lun} of {target.target_iqn}")
        if (known.expected_naa, known.expected_serial) != (target.expected_naa, target.expected_serial):
            raise IdentityMismatch(f"volume {target.volume_id} is attached with another expected identity")
        with self._guard:
            current.users += 1
        log.info("attach %s: reusing %s (%d users)", target.volume_id, current.device.path, current.users)
        return current.device

    def _stale(self, current: _Attachment) -> str:
        """Why ``current``'s device is no longer the volume's live device ("" while it is)."""
        if current.loop_released:
            return f"{current.device.path} was released by a detach that did not finish"
        if not current.export.running:
            return f"the FUSE export of {current.device.volume_id} at {current.export.path} stopped"
        return _bound(current.device.path, current.export.path)

    def _drop_stale(self, current: _Attachment, why: str) -> None:
        """Tear down an attachment whose device is stale, so the volume is attached again: raises (and keeps
        it) while its loop device is still bound to its file and in use; a device bound elsewhere (another
        volume's by now) is never touched."""
        log.warning("attach %s: %s is stale (%s): attaching it again", current.device.volume_id,
                    current.device.path, why)
        try:
            self._teardown(current)
        except _SessionGone:
            pass  # everything released; the session had ended anyway
        self._forget(current.device.target)

    def _attach_new(self, target: VolumeTarget) -> AttachedDevice:
        lun = self._login(target)
        export = None
        try:
            naa, serial = self._check(lun, target)
            mountpoint = os.path.join(self.volume_dir(target.volume_id), "mnt")
            # A punched range must read back as zeros: unmapped only where the LUN's UNMAP leaves zeros.
            export_settings = dataclasses.replace(self.settings.export, fsname=f"shoal:{target.volume_id}",
                                                  discard_zeroes=self.settings.export.discard_zeroes
                                                  and getattr(lun, "discard_zeroes", False))
            export = FuseExport(lun, mountpoint, export_settings)
            export.start()
            loop = self._losetup(export.path, lun.block_size)
            device = AttachedDevice(path=loop, volume_id=target.volume_id, target=target, naa=naa or None,
                                    serial=serial or None, handle=export.path)
            # Noted before it counts as attached: a note that cannot be written undoes the attach (nobody was
            # given the device yet) and a repeat attaches afresh, never a second user of a half-made one.
            try:
                self._write_record(target, device)
            except OSError as exc:
                self._release_unused(loop, export.path)
                raise TemporaryConnectorError(f"attach of {target.volume_id} undone: cannot write its attachment "
                                              f"note under {self.volume_dir(target.volume_id)}: {exc}") from exc
        except BaseException:
            if export is not None:
                with contextlib.suppress(Exception):
                    export.stop(lazy=True)
            with contextlib.suppress(Exception):
                lun.close()
            raise
        with self._guard:
            self._attached[target.volume_id] = _Attachment(device, lun, export)
        self.sessions.acquire(target.session_key, target.lun)
        log.info("attached %s as %s (%d bytes)", target.volume_id, loop, lun.size)
        return device

    def _release_unused(self, loop: str, path: str) -> None:
        """Detach the loop device a failed attach made (handed to nobody).  Best effort: one left behind is on a
        FUSE file about to stop, a dead device the next attach of the volume removes (``_clean_stale``)."""
        try:
            self.runner.run(["losetup", "--detach", loop])
            self._wait_released(loop, path)
        except (CommandFailed, ConnectorError) as exc:
            log.warning("%s of the failed attach stays on %s until the next attach of its volume: %s", loop, path,
                        exc)

    def _login(self, target: VolumeTarget) -> BlockDevice:
        try:
            return self.open_lun(target, self.settings)
        except ConnectorError:
            raise
        except (OSError, TimeoutError) as exc:
            raise TemporaryConnectorError(f"cannot reach LUN {target.lun} of {target.target_iqn} "
                                          f"at {', '.join(target.portals)}: {exc}") from exc
        except Exception as exc:  # login refused (ACL, CHAP), no such LUN: retrying will not help
            raise PermanentConnectorError(f"cannot open LUN {target.lun} of {target.target_iqn}: {exc}") from exc

    def _check(self, lun: BlockDevice, target: VolumeTarget) -> tuple[str, str]:
        """The identity check (SPC-4 §7.8.6, §7.8.15), before anything is exported: the expected NAA must be
        among every logical-unit NAA designator the LUN reports, not only its first (tgtd reports an NAA 3
        and then an NAA 6).  Returns the designator that matched (else the first) and the serial."""
        reported = lun.reported_identity()
        check_identity(target, reported)
        naa = target.expected_naa if target.expected_naa in reported.naas else \
            (reported.naas[0] if reported.naas else "")
        return naa, reported.serial or ""

    def _losetup(self, path: str, block_size: int) -> str:
        argv = ["losetup", "--find", "--show"]
        if self.settings.loop_direct_io:
            argv.append("--direct-io=on")
        argv += ["--sector-size", str(block_size), path]
        try:
            loop = self.runner.run(argv).stdout.strip()
        except CommandFailed as exc:
            raise TemporaryConnectorError(f"losetup failed: {exc}") from exc
        if not re.fullmatch(r"/dev/loop\d+", loop):
            raise ConnectorError(f"losetup printed {loop!r}, not a loop device")
        wrong = _bound(loop, path)
        if wrong:  # the device node must be ours before it is handed out
            if _backing_file(loop) == path:  # ours, but not as expected: do not leave it behind
                self.runner.run(["losetup", "--detach", loop], check=False)
            raise ConnectorError(wrong)
        return loop

    def _write_record(self, target: VolumeTarget, device: AttachedDevice, *, released: bool = False) -> None:
        """A note for people and for a restarted agent: which loop device, which LUN (no secrets).

        ``released``: the loop device was detached (its number may be another volume's now) while the
        session and the FUSE file remain, so the record names no device."""
        record = {"volume_id": target.volume_id, "device": None if released else device.path,
                  "file": device.handle,
                  "target_iqn": target.target_iqn, "portals": list(target.portals), "lun": target.lun,
                  "naa": device.naa, "serial": device.serial, "pid": os.getpid()}
        path = os.path.join(self.volume_dir(target.volume_id), "attachment.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # ------------------------------------------------------------------ detach

    def _teardown(self, current: _Attachment) -> None:
        """Release the loop device, SYNCHRONIZE CACHE (SBC-3 §5.24), unmount the FUSE file, log out.

        Each step may fail and the detach be retried; the loop device is released once only.  Once
        ``losetup --detach`` succeeded its number is free for any other attach, so a retry skips it, and
        a loop device is only ever detached while the kernel still backs it with this volume's file."""
        loop = current.device.path
        if not current.loop_released:
            if _backing_file(loop) == current.export.path:
                refuse_if_busy(loop)
                try:
                    self.runner.run(["blockdev", "--flushbufs", loop])
                    self.runner.run(["losetup", "--detach", loop])
                except CommandFailed as exc:
                    raise TemporaryConnectorError(f"cannot release {loop}: {exc}") from exc
            else:
                log.warning("%s is no longer backed by %s: not detaching it", loop, current.export.path)
            self._wait_released(loop, current.export.path)
            current.loop_released = True
            try:
                self._write_record(current.device.target, current.device, released=True)
            except OSError as exc:  # only a note: the detach goes on, and its end removes the note
                log.warning("could not note that %s of %s is released: %s", loop, current.device.volume_id, exc)
        try:
            current.lun.flush()  # SYNCHRONIZE CACHE before logout, whatever the loop device did
        except (OSError, TimeoutError, _initiator_error()) as exc:
            message = f"{loop} is released, but SYNCHRONIZE CACHE of {current.device.volume_id} failed: {exc}"
            if current.lun.session_state != "down":
                raise TemporaryConnectorError(message) from exc  # a retry flushes again, then goes on
            # The session is gone for good (the target stayed away past the reconnect timeout): no retry
            # can flush, so finish the teardown and report it once.
            self._stop_export(current)
            raise _SessionGone(message) from exc
        self._stop_export(current)

    def _stop_export(self, current: _Attachment) -> None:
        try:
            current.export.stop()
        except ExportBusy:
            current.export.stop(lazy=True)
        current.lun.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.volume_dir(current.device.volume_id), "attachment.json"))

    def _wait_released(self, loop: str, path: str) -> None:
        deadline = time.monotonic() + self.settings.release_timeout
        while _backing_file(loop) == path:
            if time.monotonic() > deadline:
                raise TemporaryConnectorError(f"{loop} still holds {path} after losetup --detach")
            time.sleep(0.05)

    def _clean_stale(self, volume_id: str) -> None:
        """Remove a loop device on this volume's FUSE file and the FUSE mount left by a dead agent."""
        mountpoint = os.path.join(self.volume_dir(volume_id), "mnt")
        path = os.path.join(mountpoint, "disk")
        for loop in _loops_backed_by(path):
            log.warning("removing stale %s on %s", loop, path)
            try:
                refuse_if_busy(loop)
            except TemporaryConnectorError:
                raise TemporaryConnectorError(
                    f"{loop} is a stale device of volume {volume_id}: it was left on a FUSE file whose server has "
                    f"exited (an agent stopped while it was in use), so all its I/O fails; it is in use "
                    f"(mounted?): unmount it, then attach or detach the volume again") from None
            self.runner.run(["losetup", "--detach", loop], check=False)
            with contextlib.suppress(TemporaryConnectorError):
                self._wait_released(loop, path)
        if is_mountpoint(mountpoint):
            log.warning("unmounting stale FUSE export %s", mountpoint)
            try:
                unmount(mountpoint)
            except ExportBusy:
                unmount(mountpoint, lazy=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.volume_dir(volume_id), "attachment.json"))


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _backing_file(loop: str) -> str | None:
    """The loop device's backing file as the kernel sees it (sysfs), or None when unbound."""
    name = os.path.basename(loop)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="replace") as fh:
            return fh.read().rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 (linux/loop.h): lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), lo_file_name[64], lo_crypt_name[64],
# lo_encrypt_key[32] (u8), lo_init[2] (u64)
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")


def _loop_inode(loop: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file the loop device is bound to (``LOOP_GET_STATUS64``), or None when the
    device is missing or unbound."""
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:  # ENXIO: no file bound
        return None
    finally:
        os.close(fd)
    lo_device, lo_inode = LOOP_INFO64.unpack(info)[:2]
    return lo_device, lo_inode


def _bound(loop: str, path: str) -> str:
    """Why ``loop`` is not bound to the file ``path`` serves now ("" when it is).

    The path alone does not tell: a loop device left on a dead FUSE mount (an agent that stopped while the
    device was in use) shows the same path as the live mount served again there.  The kernel's record of the
    file's device and inode does: a new FUSE mount is a new device."""
    backing = _backing_file(loop)
    if backing != path:
        return f"{loop} is backed by {backing or 'nothing'}, not by {path}"
    bound = _loop_inode(loop)
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}, the backing file of {loop}, cannot be read: {exc.strerror}"
    if bound is None or (os.major(bound[0]), os.minor(bound[0]), bound[1]) != \
            (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
        return f"{loop} is bound to an earlier file at {path} (a FUSE mount that is gone), not the one served now"
    return ""


def _loops_backed_by(path: str) -> list[str]:
    """Every loop device whose backing file is ``path`` (read from sysfs: works while the FUSE file is dead)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop") and _backing_file(f"/dev/{name}") == path:
                found.append(f"/dev/{name}")
    return found
