"""What is mounted where (``/proc/self/mountinfo``) and the commands that change it.

Every command is an argument list run through a ``Runner`` (``node_agent.host.runner``),
so tests check the argv and production never builds a shell string.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from node_agent.host.runner import CommandFailed, Runner

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")


BLANK_PROBE = 1 << 20
"""Bytes read at each end of a device blkid found nothing on: zeros there, and it is blank."""


def reads_blank(device: str) -> bool:
    """``device`` reads back zeros in its first and last ``BLANK_PROBE`` bytes; ``OSError`` if it cannot be
    read."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for start in sorted({0, max(0, size - BLANK_PROBE)}):
            want = min(BLANK_PROBE, size - start)
            data = bytearray()
            while len(data) < want:
                chunk = os.pread(fd, want - len(data), start + len(data))
                if not chunk:
                    raise OSError(f"{device}: short read at {start + len(data)} of {size} bytes")
                data += chunk
            if data.count(0) != len(data):
                return False
        return True
    finally:
        os.close(fd)


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


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        major, minor = (int(n) for n in fields[2].split(":"))
        mounts.append(Mount(mount_point=_unescape(fields[4]), dev=os.makedev(major, minor),
                            root=_unescape(fields[3]), fs_type=fields[sep + 1],
                            source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                            options=tuple(fields[5].split(","))))
    return mounts


class Mounter:
    """mount, umount, mkfs, blkid and filesystem growth for the Node service."""

    def __init__(self, runner: Runner, mountinfo: str = MOUNTINFO):
        self.runner = runner
        self.mountinfo = mountinfo

    def mounted_at(self, path: str) -> Mount | None:
        """The topmost mount at ``path`` (None when nothing is mounted there)."""
        path = os.path.realpath(path)
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            found = [m for m in parse_mountinfo(f.read()) if m.mount_point == path]
        return found[-1] if found else None

    def users(self, device: str) -> list[str]:
        """Where ``device`` is in use: mounts of a filesystem on it, and bind mounts of its device file."""
        try:
            rdev = os.stat(device).st_rdev
        except OSError:
            return []
        name = os.path.basename(os.path.realpath(device))
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            mounts = parse_mountinfo(f.read())
        found = []
        for m in mounts:
            if m.dev == rdev:
                found.append(m.mount_point)
            elif os.path.basename(m.root) == name:  # a device file bind-mounted (block publish)
                try:
                    st = os.stat(m.mount_point)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                    found.append(m.mount_point)
        return found

    def fs_type(self, device: str) -> str:
        """What blkid finds on ``device``: "" for a blank device, one that reads back zeros at both ends;
        "data" for one that holds bytes blkid recognises as nothing.  blkid exits 2 when it finds nothing, and
        also when it could not read the device (an I/O error of a session recovering): then the reads here
        fail too and the ``OSError`` goes to the caller.  Never a blank answer for a device not read."""
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
        self.runner.run(["mount", "-t", fs_type] + (["-o", ",".join(options)] if options else []) + [device, path])

    def bind(self, source: str, path: str, readonly: bool) -> None:
        """Bind-mount ``source`` at ``path``, read-only if asked: all or nothing (a writable bind mount left
        behind by a failed remount would be taken by a repeat as the read-only publish it asked for)."""
        self.runner.run(["mount", "--bind", source, path])
        if readonly:  # a bind mount takes "ro" only on a remount
            try:
                self.runner.run(["mount", "-o", "remount,bind,ro", path])
            except Exception:
                self.runner.run(["umount", path], check=False)
                raise

    def umount(self, path: str) -> None:
        self.runner.run(["umount", path])

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
        """Grow the mounted filesystem to its device's size, online (a filesystem that fills it: no-op)."""
        if fs_type == "ext4":
            self.runner.run(["resize2fs", device])
        elif fs_type == "xfs":
            self.runner.run(["xfs_growfs", mount_point])
        else:
            raise ValueError(f"cannot grow a {fs_type} filesystem")
