"""What is mounted where (``/proc/self/mountinfo``) and the commands that change it.

Every command is an argument list run through a ``Runner`` (``node_agent.host.runner``),
so tests check the argv and production never builds a shell string.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from node_agent.host.fuse_export import unescape_mountinfo
from node_agent.host.runner import CommandFailed, Runner

MOUNTINFO = "/proc/self/mountinfo"
SYS_BLOCK = "/sys/class/block"
SYS_DEV_BLOCK = "/sys/dev/block"


BLANK_PROBE = 1 << 20
"""Bytes read in one window of a device blkid found nothing on."""
BLANK_READ_BUDGET = 1 << 30
"""Bytes ``reads_blank`` reads at most: a device up to this size is read whole; a larger one in
``BLANK_READ_BUDGET // BLANK_PROBE`` windows spread evenly from its first byte to its last."""
_ZEROS = bytes(BLANK_PROBE)


def reads_blank(device: str, budget: int = BLANK_READ_BUDGET) -> bool:
    """``device`` reads back zeros where it was read; ``OSError`` if it cannot be read.

    The rule (the "blank" of NodeStageVolume, which formats only a blank device): a device of up to
    ``budget`` bytes is read whole, so any byte written anywhere on it refuses the format.  A larger device is
    read in windows of ``BLANK_PROBE`` bytes spread evenly over it (both ends included, ``budget`` bytes in
    all): data written only between windows is not seen.  Two more guards stand in front of this one: blkid
    (any signature it knows refuses the format) and the in-use checks (a device mounted, published for raw
    block access or held open exclusively is never formatted)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for start, length in _windows(size, budget):
            if not _zeros_at(fd, device, start, length, size):
                return False
        return True
    finally:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # what was read is no one's cache
        except OSError:
            pass
        os.close(fd)


def _windows(size: int, budget: int) -> list[tuple[int, int]]:
    """(offset, length) pairs to read of a ``size``-byte device: all of it, or evenly spread windows."""
    if size <= budget:
        return [(start, min(BLANK_PROBE, size - start)) for start in range(0, size, BLANK_PROBE)]
    count = max(2, budget // BLANK_PROBE)
    last = size - BLANK_PROBE
    starts = sorted({(i * last // (count - 1)) // 4096 * 4096 for i in range(count - 1)} | {last})
    return [(start, BLANK_PROBE) for start in starts]


def _zeros_at(fd: int, device: str, start: int, length: int, size: int) -> bool:
    done = 0
    while done < length:
        chunk = os.pread(fd, length - done, start + done)
        if not chunk:
            raise OSError(f"{device}: short read at {start + done} of {size} bytes")
        if chunk != _ZEROS[:len(chunk)]:
            return False
        done += len(chunk)
    return True


@dataclass(frozen=True)
class Mount:
    mount_point: str
    dev: int
    """st_dev of the mounted filesystem (os.makedev(major, minor))."""
    root: str
    """The path inside that filesystem which is mounted (a bind mount of a file or a subdirectory)."""
    fs_type: str
    source: str
    options: tuple[str, ...]
    """The mount's own options (``ro``/``rw``, ``nodev``, ``noatime``, ...)."""
    super_options: tuple[str, ...] = ()
    """The filesystem's options, shared by every mount of it (``sync``, ``commit=30``, ...)."""


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        major, minor = (int(n) for n in fields[2].split(":"))
        mounts.append(Mount(mount_point=unescape_mountinfo(fields[4]), dev=os.makedev(major, minor),
                            root=unescape_mountinfo(fields[3]), fs_type=fields[sep + 1],
                            source=unescape_mountinfo(fields[sep + 2]) if len(fields) > sep + 2 else "",
                            options=tuple(fields[5].split(",")),
                            super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else ()))
    return mounts


#: Mount flags the kernel shows in mountinfo when set (and only then): a repeated stage compares these.
SHOWN_FLAGS = frozenset({"nodev", "nosuid", "noexec", "noatime", "nodiratime", "nosymfollow",
                         "sync", "dirsync", "lazytime"})


def flags_differ(flags: list[str], mount: Mount) -> list[str]:
    """The mount flags in which ``mount`` differs from what ``flags`` asked, as far as mountinfo shows them: the
    ``SHOWN_FLAGS`` both ways, and a ``key=value`` asked for where the filesystem shows another value."""
    shown = set(mount.options) | set(mount.super_options)
    asked = set(flags)
    differ = sorted((asked ^ shown) & SHOWN_FLAGS)
    values = {option.split("=", 1)[0]: option for option in shown if "=" in option}
    differ += [flag for flag in flags if "=" in flag and values.get(flag.split("=", 1)[0], flag) != flag]
    return differ


@dataclass(frozen=True)
class Use:
    """Where a device is in use: its filesystem mounted, or its device file (or a read-only loop device over
    it) bind-mounted for raw block access."""

    mount_point: str
    block: bool


class Mounter:
    """mount, umount, mkfs, blkid, loop devices and filesystem growth for the Node service."""

    def __init__(self, runner: Runner, mountinfo: str = MOUNTINFO, sys_block: str = SYS_BLOCK,
                 sys_dev_block: str = SYS_DEV_BLOCK):
        self.runner = runner
        self.mountinfo = mountinfo
        self.sys_block = sys_block
        self.sys_dev_block = sys_dev_block

    def _mounts(self) -> list[Mount]:
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())

    def mounted_at(self, path: str) -> Mount | None:
        """The topmost mount at ``path`` (None when nothing is mounted there)."""
        path = os.path.realpath(path)
        found = [m for m in self._mounts() if m.mount_point == path]
        return found[-1] if found else None

    def users(self, device: str) -> list[str]:
        """Where ``device`` is in use: mounts of a filesystem on it, and bind mounts of its device file or of a
        read-only loop device over it (a read-only block publish)."""
        return [use.mount_point for use in self.uses(device)]

    def uses(self, device: str) -> list[Use]:
        try:
            rdev = os.stat(device).st_rdev
        except OSError:
            return []
        names = {os.path.basename(os.path.realpath(device)): rdev}
        for loop in self.loops_over(device):
            try:
                names[os.path.basename(loop)] = os.stat(loop).st_rdev
            except OSError:
                continue
        found = []
        for m in self._mounts():
            if m.dev in names.values():
                found.append(Use(m.mount_point, block=False))
            elif os.path.basename(m.root) in names:  # a device file bind-mounted (block publish)
                try:
                    st = os.stat(m.mount_point)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == names[os.path.basename(m.root)]:
                    found.append(Use(m.mount_point, block=True))
        return found

    def filesystem_mounts(self, device: str) -> list[Mount]:
        """The mounts of the filesystem on ``device``."""
        try:
            rdev = os.stat(device).st_rdev
        except OSError:
            return []
        return [m for m in self._mounts() if m.dev == rdev]

    def held_exclusively(self, device: str) -> bool:
        """Whether something holds ``device`` open exclusively (a mounted filesystem, a device-mapper or md
        device over it, a running mkfs): an ``O_EXCL`` open of it fails with EBUSY."""
        try:
            fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return True
            raise
        os.close(fd)
        return False

    # -- read-only loop devices (read-only block publish) -----------------------------------------------
    def read_only_loop(self, device: str) -> str:
        """A new read-only loop device over ``device``: the kernel refuses writes to it (a read-only bind
        mount of a device node does not: writes through the node go to the device)."""
        return self.runner.run(["losetup", "--read-only", "--direct-io=on", "--find", "--show", "--",
                                device]).stdout.strip()

    def loops_over(self, device: str) -> list[str]:
        """The read-only loop devices whose backing file is the block device ``device``."""
        try:
            rdev = os.stat(device).st_rdev
            names = os.listdir(self.sys_block)
        except OSError:
            return []
        return [f"/dev/{name}" for name in sorted(names)
                if name.startswith("loop") and self._read_only_backing(name) == rdev]

    def loop_at(self, path: str) -> tuple[str, int] | None:
        """(``/dev/loopN``, the backing device's rdev) when ``path`` is a read-only loop device over a block
        device (what a read-only block publish binds); None otherwise."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        name = os.path.basename(os.path.realpath(
            os.path.join(self.sys_dev_block, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")))
        backing = self._read_only_backing(name) if name.startswith("loop") else None
        return (f"/dev/{name}", backing) if backing is not None else None

    def _read_only_backing(self, name: str) -> int | None:
        """The rdev of the block device backing the read-only loop device ``name``; None for anything else."""
        base = os.path.join(self.sys_block, name)
        try:
            with open(os.path.join(base, "ro")) as f:
                if f.read().strip() != "1":
                    return None
            with open(os.path.join(base, "loop", "backing_file")) as f:
                backing = f.read().strip()
            st = os.stat(backing)
        except OSError:
            return None
        return st.st_rdev if stat.S_ISBLK(st.st_mode) else None

    def detach_loop(self, loop: str) -> None:
        self.runner.run(["losetup", "--detach", loop])

    def refresh_loop(self, loop: str) -> None:
        """The loop device takes its backing device's new size."""
        self.runner.run(["losetup", "--set-capacity", loop])

    # -- filesystems -------------------------------------------------------------------------------------------
    def fs_type(self, device: str) -> str:
        """What blkid finds on ``device``: "" for a blank device (``reads_blank``); "data" for one that holds
        bytes blkid recognises as nothing.  blkid exits 2 when it finds nothing, and also when it could not
        read the device (an I/O error of a session recovering): then the reads here fail too and the
        ``OSError`` goes to the caller.  Never a blank answer for a device not read."""
        result = self.runner.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
        if result.returncode == 2:
            return "" if reads_blank(device) else "data"
        if result.returncode != 0:
            # blkid -p reports other signatures (a partition table, an ambivalent probe) with a non-zero
            # exit: never format over those
            return "unknown"
        return result.stdout.strip() or "unknown"

    def mkfs(self, device: str, fs_type: str) -> None:
        argv = {"ext4": ["mkfs.ext4", "-q", "-F", device], "xfs": ["mkfs.xfs", "-q", device]}[fs_type]
        self.runner.run(argv)

    def mount(self, device: str, path: str, fs_type: str, options: list[str]) -> None:
        self.runner.run(["mount", "-t", fs_type] + (["-o", ",".join(options)] if options else [])
                        + ["--", device, path])

    def bind(self, source: str, path: str, readonly: bool) -> None:
        """Bind-mount ``source`` at ``path``, read-only if asked: all or nothing (a writable bind mount left
        behind by a failed remount would be taken by a repeat as the read-only publish it asked for)."""
        self.runner.run(["mount", "--bind", "--", source, path])
        if readonly:  # a bind mount takes "ro" only on a remount
            try:
                self.runner.run(["mount", "-o", "remount,bind,ro", "--", path])
            except Exception:
                self.runner.run(["umount", "--", path], check=False)
                raise

    def umount(self, path: str) -> None:
        self.runner.run(["umount", "--", path])

    def ext4_size(self, device: str) -> int:
        """Bytes the ext4 filesystem on ``device`` spans (its superblock, ``dumpe2fs -h``)."""
        fields = {}
        for line in self.runner.run(["dumpe2fs", "-h", device]).stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return int(fields["Block count"]) * int(fields["Block size"])

    def grow_offline(self, device: str) -> None:
        """Grow an unmounted ext4 to its device: ``e2fsck -f -p`` first (resize2fs insists on a checked
        filesystem; exit 1 means it fixed something, fine), then ``resize2fs``."""
        checked = self.runner.run(["e2fsck", "-f", "-p", device], check=False)
        if checked.returncode not in (0, 1):
            raise CommandFailed(checked)
        self.runner.run(["resize2fs", device])

    def grow(self, device: str, mount_point: str, fs_type: str) -> None:
        """Grow the mounted filesystem to its device's size, online (a filesystem that fills it: no-op).
        ``mount_point``: a writable mount of it (xfs_growfs works through it; resize2fs finds its own)."""
        if fs_type == "ext4":
            self.runner.run(["resize2fs", device])
        elif fs_type == "xfs":
            self.runner.run(["xfs_growfs", mount_point])
        else:
            raise ValueError(f"cannot grow a {fs_type} filesystem")
