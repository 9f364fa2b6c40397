"""Boot Debian's kernel under QEMU (TCG) and drive its iSCSI initiator.

The Linux kernel initiator (``iscsi_tcp`` + open-iscsi's ``iscsid``/``iscsiadm``)
is the most widely deployed iSCSI initiator, and the host kernel here has no
``iscsi_tcp``. This module builds a tiny guest from Debian packages and runs
one scripted session against a target on the host side of a network
namespace:

1. :func:`ensure_guest_image` fetches the ``linux-image-*-amd64`` package that
   ``linux-image-amd64`` depends on (``apt-get download``), unpacks it with
   ``dpkg-deb -x``, resolves the modules the guest needs from their
   ``.modinfo`` sections (the same ``depends=`` data ``depmod`` reads), and
   writes a busybox-static initramfs holding those modules, ``iscsid``,
   ``iscsiadm`` and e2fsprogs' ``mke2fs`` with their shared libraries. The
   result is cached under ``$SHOAL_TEST_CACHE`` (default
   ``.cache/kernel-guest`` in the repository), keyed by the kernel version and a hash
   of everything that goes into the image, so a second run only boots.
2. :func:`guest_network` creates a network namespace with a tap device
   (host side 10.99.0.1/24); the target under test listens inside it.
3. :func:`run_kernel_initiator` boots the guest on that tap. Its init
   configures 10.99.0.2, runs SendTargets discovery, logs in (optionally with
   CHAP or mutual CHAP, RFC 7143 §12.1.3, and CRC32C header/data digests,
   §13.1), writes and reads back a pattern
   with O_DIRECT, runs ``mke2fs -t ext4``, mounts, writes files, unmounts, logs
   out (RFC 7143 §11.14) and powers off. Every step prints
   ``SHOAL-RESULT key=value`` on the serial console; the parsed values come
   back as an :class:`InitiatorResult`.
4. :func:`verify_backing_file` checks on the host what the guest left in the
   LUN's backing file: the pattern at its offset, the files via ``debugfs``,
   and ``e2fsck -fn`` clean.

Every process started here is stopped by PID; the namespace is deleted on
exit, also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

#: Part of the image key, with this file's text and the copied host files.
IMAGE_FORMAT = 1

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "kernel-guest"
KERNEL_METAPACKAGE = "linux-image-amd64"

#: Modules the guest loads, dependencies resolved from ``.modinfo``.
#: ``crc32c_generic`` backs ext4/jbd2 metadata checksums (ext4 only names the
#: ``crypto-crc32c`` alias as a soft dependency); ``crct10dif_generic`` backs
#: ``t10-pi``, which ``sd_mod`` depends on.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_net",
    "crc32c_generic",
    "crct10dif_generic",
    "iscsi_tcp",
    "sd_mod",
    "ext4",
)

#: Dynamically linked tools copied into the guest with their libraries.
GUEST_TOOLS = ("/usr/sbin/iscsid", "/usr/sbin/iscsiadm", "/usr/sbin/mke2fs")
BUSYBOX = "/bin/busybox"
MKE2FS_CONF = "/etc/mke2fs.conf"

PATTERN_SIZE = 1 << 20
HOST_IP = "10.99.0.1"
GUEST_IP = "10.99.0.2"
PREFIX_LEN = 24
TAP_NAME = "tap0"
DEFAULT_INITIATOR = "iqn.2026-11.dev.shoal:kernel-guest"
#: Values open-iscsi accepts for ``node.conn[0].iscsi.HeaderDigest``/``DataDigest``.
DIGEST_VALUES = ("None", "CRC32C", "CRC32C,None", "None,CRC32C")

RESULT_MARKER = "SHOAL-RESULT "
_RESULT_LINE = re.compile(r"SHOAL-RESULT ([A-Za-z0-9_]+)=(.*)")
#: Values passed to the guest on the kernel command line: no spaces, quotes
#: or shell metacharacters (init reads them as environment variables).
_SAFE_VALUE = re.compile(r"[A-Za-z0-9._:@%+,/\-\[\]]{1,255}")


class GuestError(RuntimeError):
    """The guest image could not be built or the guest could not be run."""


# --------------------------------------------------------------------------
# Guest-side configuration (part of the image hash)
# --------------------------------------------------------------------------

ISCSID_CONF = """\
# Written by tests/support/kernel_guest.py for a throwaway guest.
# iscsid is started by /init, so iscsiadm must never try to start it.
iscsid.startup = /bin/true
node.startup = manual
node.session.timeo.replacement_timeout = 15
node.conn[0].timeo.login_timeout = 5
node.conn[0].timeo.logout_timeout = 10
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.err_timeo.abort_timeout = 15
node.session.err_timeo.lu_reset_timeout = 20
node.session.err_timeo.tgt_reset_timeout = 20
node.session.initial_login_retry_max = 1
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.conn[0].iscsi.MaxXmitDataSegmentLength = 0
discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
discovery.sendtargets.timeo.login_timeout = 10
discovery.sendtargets.reopen_max = 1
node.session.nr_sessions = 1
node.session.scan = auto
"""

# The guest's PID 1. Parameters arrive as environment variables from the
# kernel command line (the kernel hands unknown NAME=VALUE options without a
# dot in NAME to init's environment).
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt /run/lock/iscsi /etc/iscsi
for d in nodes send_targets ifaces isns static fw slp; do mkdir -p /var/lib/iscsi/$d; done

say() { echo "SHOAL-RESULT $1=$2"; }
stamp() { read up rest < /proc/uptime; say "t_$1" "$up"; }
log() { sed "s/^/SHOAL-LOG $1: /"; }

finish() {
    say result "$1"
    if [ "$1" != ok ]; then
        [ -f /tmp/iscsid.log ] && tail -n 30 /tmp/iscsid.log | log iscsid
        dmesg | tail -n 60 | sed 's/^/SHOAL-DMESG /'
    fi
    dmesg | grep -E 'iscsi|scsi|sd |EXT4|I/O error|blk_update|connection' | tail -n 60 | sed 's/^/SHOAL-KLOG /'
    say io_errors "$(dmesg | grep -cE 'I/O error|blk_update_request|critical|Buffer I/O')"
    say done 1
    sync
    poweroff -f
    sleep 5
    exit 1
}

fail() {
    say "$1" "fail rc=$2"
    if [ -n "$SESSION_UP" ]; then
        umount /mnt 2>/dev/null
        timeout 15 iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" -u 2>&1 | log cleanup
    fi
    finish "fail step=$1"
}

# run STEP COMMAND...: run it, print STEP=ok and a timestamp, or fail.
run() {
    step=$1; shift
    "$@" > /tmp/step.out 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        tail -n 20 /tmp/step.out | log "$step"
        fail "$step" $rc
    fi
    say "$step" ok
    stamp "$step"
}

stamp init
say kernel "$(uname -r)"

load_modules() {
    for m in $(cat /etc/shoal-modules); do
        insmod /lib/modules/$m.ko || { echo "insmod $m failed"; return 1; }
    done
}
run modules load_modules

setup_net() {
    IF=
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] || { IF=$n; break; }
    done
    [ -n "$IF" ] || { echo "no network interface"; return 1; }
    ip link set lo up && ip link set "$IF" up &&
        ip addr add "$SHOAL_GUEST_IP" dev "$IF" || return 1
    i=0
    while [ $i -lt 20 ]; do
        ping -c 1 -W 1 "$SHOAL_HOST_IP" && return 0
        i=$((i + 1))
    done
    return 1
}
run net setup_net

start_iscsid() {
    echo "InitiatorName=$SHOAL_INITIATOR" > /etc/iscsi/initiatorname.iscsi
    iscsid -f > /tmp/iscsid.log 2>&1 &
    i=0
    while [ $i -lt 50 ]; do
        grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix && return 0
        i=$((i + 1)); usleep 100000
    done
    echo "iscsid did not open its socket"; cat /tmp/iscsid.log; return 1
}
run iscsid start_iscsid

set_auth() {  # set_auth MODE RECORD-ARGS... ; MODE is node or discovery
    mode=$1; shift
    if [ "$mode" = node ]; then p=node.session.auth; else p=discovery.sendtargets.auth; fi
    iscsiadm "$@" -o update -n $p.authmethod -v CHAP &&
    iscsiadm "$@" -o update -n $p.username -v "$SHOAL_CHAP_USER" &&
    iscsiadm "$@" -o update -n $p.password -v "$SHOAL_CHAP_SECRET" || return 1
    if [ -n "$SHOAL_MUTUAL_USER" ]; then
        iscsiadm "$@" -o update -n $p.username_in -v "$SHOAL_MUTUAL_USER" &&
        iscsiadm "$@" -o update -n $p.password_in -v "$SHOAL_MUTUAL_SECRET" || return 1
    fi
}

# SendTargets discovery (RFC 7143 Appendix C). Not fatal: the node record
# is created by hand below when discovery fails or names another portal.
if iscsiadm -m discovery -t st -p "$SHOAL_PORTAL" > /tmp/disc.out 2>&1; then
    say discovery ok
elif [ -n "$SHOAL_CHAP_USER" ] && {
        iscsiadm -m discoverydb -t st -p "$SHOAL_PORTAL" -o new > /dev/null 2>&1
        set_auth discovery -m discoverydb -t st -p "$SHOAL_PORTAL" &&
        iscsiadm -m discoverydb -t st -p "$SHOAL_PORTAL" --discover > /tmp/disc.out 2>&1; }; then
    say discovery ok-chap
else
    say discovery fail
fi
log discovery < /tmp/disc.out
say discovered "$(grep -c "$SHOAL_IQN" /tmp/disc.out)"
stamp discovery

set_digest() {  # set_digest KEY VALUE: VALUE is None, CRC32C, "CRC32C,None" or "None,CRC32C"
    [ -z "$2" ] || iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" -o update -n "node.conn[0].iscsi.$1" -v "$2"
}

make_node() {
    iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" > /dev/null 2>&1 ||
        iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" -o new || return 1
    if [ -n "$SHOAL_CHAP_USER" ]; then
        set_auth node -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" || return 1
    fi
    # Digests (RFC 7143 §13.1) are per connection in the node record.
    # Discovery sessions have none: open-iscsi forces them to None.
    set_digest HeaderDigest "$SHOAL_HEADER_DIGEST" && set_digest DataDigest "$SHOAL_DATA_DIGEST"
}
run node make_node
say node_header_digest "$(iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" | sed -n 's/^node.conn\[0\].iscsi.HeaderDigest = //p')"
say node_data_digest "$(iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" | sed -n 's/^node.conn\[0\].iscsi.DataDigest = //p')"
say node_login_timeout "$(iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" | sed -n 's/^node.conn\[0\].timeo.login_timeout = //p')"

SESSION_UP=1
run login iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" -l
iscsiadm -m session -P 2 > /tmp/session.out 2>&1
grep -E 'Target:|Portal|Auth|CHAP|username|HeaderDigest|DataDigest|MaxRecvDataSegmentLength|MaxXmitDataSegmentLength|FirstBurstLength|MaxBurstLength|ImmediateData|InitialR2T|MaxOutstandingR2T' /tmp/session.out | log session
# What the kernel's connection really runs with (from sysfs, via iscsiadm).
say header_digest "$(sed -n 's/^[[:space:]]*HeaderDigest: //p' /tmp/session.out | head -n 1)"
say data_digest "$(sed -n 's/^[[:space:]]*DataDigest: //p' /tmp/session.out | head -n 1)"

find_disk() {
    i=0
    while [ $i -lt 150 ]; do
        for b in /sys/class/iscsi_session/session*/device/target*/*:*:*:"$SHOAL_LUN"/block/*; do
            if [ -e "$b" ] && [ -b "/dev/${b##*/}" ]; then DISK=${b##*/}; return 0; fi
        done
        i=$((i + 1)); usleep 100000
    done
    echo "no block device for LUN $SHOAL_LUN"; ls -R /sys/class/iscsi_session/ 2>&1 | head -n 40
    return 1
}
run find_disk find_disk
DEV=/dev/$DISK
say disk "$DISK"
say disk_bytes "$(( $(cat /sys/block/$DISK/size) * 512 ))"
say logical_block_size "$(cat /sys/block/$DISK/queue/logical_block_size)"
say physical_block_size "$(cat /sys/block/$DISK/queue/physical_block_size)"
say vendor "$(cat /sys/block/$DISK/device/vendor | tr -d ' ')"
say model "$(cat /sys/block/$DISK/device/model | tr -d ' ')"
say rev "$(cat /sys/block/$DISK/device/rev | tr -d ' ')"
say wwid "$(cat /sys/block/$DISK/device/wwid 2>/dev/null | tr ' ' '_')"
say write_cache "$(cat /sys/block/$DISK/queue/write_cache | tr ' ' '_')"
say fua "$(cat /sys/block/$DISK/queue/fua 2>/dev/null)"
say discard_max_bytes "$(cat /sys/block/$DISK/queue/discard_max_bytes)"

# The pattern lies past the filesystem, so the host can find it afterwards.
run pattern_write dd if=/pattern.bin of=$DEV bs=1M seek=$SHOAL_PATTERN_MIB count=1 oflag=direct conv=fsync
read_pattern() {
    dd if=$DEV of=/tmp/readback bs=1M skip=$SHOAL_PATTERN_MIB count=1 iflag=direct &&
        cmp /pattern.bin /tmp/readback
}
run pattern_read read_pattern
say pattern_sha256 "$(sha256sum /tmp/readback | cut -d ' ' -f 1)"

run mkfs /usr/sbin/mke2fs -t ext4 -F -q -L shoal $DEV ${SHOAL_FS_MIB}M
run mount mount -t ext4 $DEV /mnt
write_files() {
    mkdir -p /mnt/shoal && echo "$SHOAL_NONCE" > /mnt/shoal/hello.txt &&
        cp /pattern.bin /mnt/shoal/pattern.bin && sync
}
run file_write write_files
run umount umount /mnt
run flush blockdev --flushbufs $DEV
run pattern_after_mkfs read_pattern
# Connection statistics: digest errors the kernel saw (RFC 7143 §7.8).
iscsiadm -m session -s > /tmp/stats.out 2>&1
grep -iE 'digest|txdata_octets|rxdata_octets|timeout_err' /tmp/stats.out | log stats
say digest_errors "$(sed -n 's/^[[:space:]]*digest_err: //p' /tmp/stats.out | head -n 1)"

run logout iscsiadm -m node -T "$SHOAL_IQN" -p "$SHOAL_PORTAL" -u
SESSION_UP=
no_session() { ! ls -d /sys/class/iscsi_session/session* > /dev/null 2>&1; }
run session_gone no_session
finish ok
"""


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """The cache directory: ``$SHOAL_TEST_CACHE`` or :data:`DEFAULT_CACHE`."""
    return Path(os.environ.get("SHOAL_TEST_CACHE", str(DEFAULT_CACHE)))


def pattern_bytes(size: int = PATTERN_SIZE) -> bytes:
    """A deterministic, incompressible pattern (SHA-256 of a counter)."""
    blocks = (size + 31) // 32
    data = b"".join(hashlib.sha256(b"shoal-kernel-guest-%d" % i).digest() for i in range(blocks))
    return data[:size]


def _run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kwargs)


def missing_requirements() -> list[str]:
    """Why the kernel initiator test cannot run here; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (network namespaces, tap devices)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun is missing")
    for tool in ("qemu-system-x86_64", "ip", "debugfs", "e2fsck", "apt-get", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is not installed")
    for path in (BUSYBOX, *GUEST_TOOLS):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} is not installed")
    return missing


# --------------------------------------------------------------------------
# Kernel modules: dependencies from .modinfo (what depmod reads)
# --------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".ko.xz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo(image: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an ELF64 module as key -> values."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise GuestError("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, = struct.unpack_from("<I", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = image[str_off : str_off + str_size]
    for index in range(shnum):
        name_off, offset, size = section(index)
        if names[name_off : names.index(b"\0", name_off)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in image[offset : offset + size].split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), []).append(value.decode(errors="replace"))
            return info
    raise GuestError("module has no .modinfo section")


def resolve_modules(module_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, in load order.

    Hard dependencies come from ``depends=``; ``softdep=pre:`` names are
    followed when they name a module file (aliases like ``crypto-crc32c``
    are not resolved: list their provider in ``wanted``).
    """
    index = {_module_name(p): p for p in module_dir.rglob("*.ko*") if p.name.endswith((".ko", ".ko.xz"))}
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestError(f"module dependency cycle at {name}")
        if name not in index:
            raise GuestError(f"module {name} not found under {module_dir}")
        state[name] = "visiting"
        info = modinfo(_read_module(index[name]))
        deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        for soft in info.get("softdep", []):
            pre = soft.split("pre:", 1)[1].split("post:", 1)[0] if "pre:" in soft else ""
            deps += [d for d in pre.split() if d.replace("-", "_") in index]
        for dep in deps:
            visit(dep)
        state[name] = "done"
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------
# cpio (newc) writer
# --------------------------------------------------------------------------


class CpioWriter:
    """Writes a ``newc`` cpio archive, the format the kernel unpacks."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        parent = os.path.dirname(name)
        if parent:
            self.directory(parent)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


# --------------------------------------------------------------------------
# The guest image
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A bootable guest: the kernel and the initramfs built for it."""

    version: str
    """Kernel release, e.g. ``6.1.0-56-amd64``."""
    kernel: Path
    """ELF ``vmlinux`` (PVH boot) or, failing that, the bzImage."""
    initramfs: Path
    build_seconds: float = 0.0
    """Time spent building it now; 0.0 when it came from the cache."""


APT_LISTS = Path("/var/lib/apt/lists")


def kernel_package(cache: Path | None = None) -> str:
    """The ``linux-image-X-amd64`` package ``linux-image-amd64`` depends on.

    ``apt-cache`` takes most of a second, so the answer is kept in the cache
    until the package lists change (``apt-get update``).
    """
    memo = (cache or cache_root()) / "kernel-package"
    stamp = str(APT_LISTS.stat().st_mtime_ns) if APT_LISTS.exists() else "none"
    with contextlib.suppress(OSError, ValueError):
        seen, package = memo.read_text().split()
        if seen == stamp:
            return package
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE]).stdout
    match = re.search(r"Depends:\s*(linux-image-\d\S*-amd64)\b", out)
    if not match:
        raise GuestError(f"no kernel package among the dependencies of {KERNEL_METAPACKAGE}:\n{out}")
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(f"{stamp} {match.group(1)}\n")
    return match.group(1)


def _shared_libraries(binary: str) -> list[str]:
    out = _run(["ldd", binary]).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _guest_files() -> list[str]:
    """Host files copied into the guest at the same path."""
    files = [BUSYBOX, *GUEST_TOOLS]
    for tool in GUEST_TOOLS:
        files += _shared_libraries(tool)
    if os.path.exists(MKE2FS_CONF):
        files.append(MKE2FS_CONF)
    return sorted(set(files))


def _image_key(files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(b"format %d\n" % IMAGE_FORMAT)
    # This file holds the init script, the configuration and the builder.
    digest.update(Path(__file__).read_bytes())
    for path in files:
        st = os.stat(path)
        digest.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _download_kernel(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o755)  # let apt's sandbox user write here
        _run(["apt-get", "download", package], cwd=tmp)
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not got:
            raise GuestError(f"apt-get download {package} produced no .deb")
        target = debs / got[-1].name
        os.replace(got[-1], target)
        return target


def _build_initramfs(root: Path, version: str, files: Sequence[str]) -> tuple[bytes, list[str]]:
    modules = resolve_modules(root / "lib" / "modules" / version, GUEST_MODULES)
    names = [_module_name(p) for p in modules]
    cpio = CpioWriter()
    for directory in ("dev", "proc", "sys", "tmp", "mnt", "bin", "sbin", "usr/sbin", "etc", "run", "var"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    for path in files:
        mode = os.stat(path).st_mode & 0o777
        cpio.file(path, Path(path).read_bytes(), mode)  # follows symlinks: a soname gets its library
    for name, path in zip(names, modules):
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    cpio.file("etc/shoal-modules", ("\n".join(names) + "\n").encode())
    cpio.file("etc/iscsi/iscsid.conf", ISCSID_CONF.encode())
    # iscsid authorises iscsiadm by the peer's user name (peeruser_unix).
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/nsswitch.conf", b"passwd: files\ngroup: files\n")
    cpio.file("pattern.bin", pattern_bytes())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0), names


def _write_kernel(bzimage: Path, target: Path) -> None:
    """Store the kernel as the ELF ``vmlinux`` when it can be unpacked.

    QEMU boots an ELF kernel through its PVH entry point (Debian sets
    ``CONFIG_PVH``), skipping the firmware and the bzImage's own
    decompression: under TCG that is about 4 s of a 10 s run. The payload of
    Debian's bzImage is an xz stream; anything else is kept as the bzImage.
    """
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start >= 0:
        with contextlib.suppress(lzma.LZMAError):
            vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
            if vmlinux[:4] == b"\x7fELF":
                target.write_bytes(vmlinux)
                return
    shutil.copyfile(bzimage, target)


def _prune_images(images: Path, keep: Path, spare: int = 1) -> None:
    """Drop all but the newest ``spare`` images besides ``keep`` (each holds a
    ~66 MB vmlinux; every edit of this file makes a new one)."""
    others = sorted((d for d in images.iterdir() if d.is_dir() and d != keep),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in others[spare:]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_guest_image(cache: Path | None = None) -> GuestImage:
    """Build the guest (or take it from the cache) and return its paths."""
    cache = cache or cache_root()
    files = _guest_files()
    key = _image_key(files)
    try:
        package = kernel_package(cache)
    except (subprocess.CalledProcessError, GuestError, FileNotFoundError):
        package = None  # no apt lists: fall back to a cached image with this key
    images = cache / "images"
    if package is None:
        cached = sorted(images.glob(f"*-{key}"))
        if cached and (cached[-1] / "initramfs.cpio.gz").exists():
            d = cached[-1]
            return GuestImage(d.name[: -len(key) - 1], d / "kernel", d / "initramfs.cpio.gz")
        raise GuestError("cannot resolve the kernel package (apt-cache failed) and nothing is cached")
    version = package.removeprefix("linux-image-")
    image_dir = images / f"{version}-{key}"
    kernel, initramfs = image_dir / "kernel", image_dir / "initramfs.cpio.gz"
    if kernel.exists() and initramfs.exists():
        return GuestImage(version, kernel, initramfs)
    with _locked(cache):
        if kernel.exists() and initramfs.exists():
            return GuestImage(version, kernel, initramfs)
        start = time.monotonic()
        deb = _download_kernel(package, cache / "debs")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            blob, names = _build_initramfs(root, version, files)
            staging = Path(tmp) / "image"
            staging.mkdir()
            _write_kernel(root / "boot" / f"vmlinuz-{version}", staging / "kernel")
            (staging / "initramfs.cpio.gz").write_bytes(blob)
            (staging / "modules.txt").write_text("\n".join(names) + "\n")
            (staging / "init.sh").write_text(INIT_SCRIPT)
            image_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, image_dir)
        _prune_images(images, keep=image_dir)
        return GuestImage(version, kernel, initramfs, time.monotonic() - start)


# --------------------------------------------------------------------------
# Network namespace with a tap device
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestNetwork:
    """A network namespace holding the guest's tap device."""

    netns: str
    tap: str = TAP_NAME
    host_ip: str = HOST_IP
    guest_ip: str = GUEST_IP
    prefix_len: int = PREFIX_LEN

    def portal(self, port: int = 3260) -> str:
        return f"{self.host_ip}:{port}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs in place,
        so the PID of the returned command is the PID of ``argv``)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@contextlib.contextmanager
def guest_network(name: str | None = None) -> Iterator[GuestNetwork]:
    """Create a namespace with ``tap0`` at 10.99.0.1/24; delete it on exit.

    Processes started inside it must be stopped by the caller before exit.
    """
    name = name or f"shoal-kg-{os.getpid()}-{secrets.token_hex(3)}"
    net = GuestNetwork(name)
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        _run(["ip", "-n", name, "tuntap", "add", "dev", net.tap, "mode", "tap"])
        _run(["ip", "-n", name, "addr", "add", f"{net.host_ip}/{net.prefix_len}", "dev", net.tap])
        _run(["ip", "-n", name, "link", "set", net.tap, "up"])
        yield net
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


# --------------------------------------------------------------------------
# Running the guest
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitiatorResult:
    """What one guest run reported on its serial console."""

    results: Mapping[str, str]
    serial_log: str
    elapsed: float
    """Seconds from starting QEMU to its exit."""
    returncode: int | None
    timed_out: bool
    pattern_offset: int
    """Byte offset of the pattern on the LUN."""
    fs_size: int
    nonce: str

    @property
    def ok(self) -> bool:
        return self.results.get("result") == "ok" and not self.timed_out

    @property
    def failed_step(self) -> str | None:
        result = self.results.get("result")
        if result is None:
            return "timeout" if self.timed_out else "no result (guest died?)"
        return None if result == "ok" else result.removeprefix("fail step=")

    def excerpt(self, lines: int = 80) -> str:
        """The end of the serial log, for assertion messages."""
        return "\n".join(self.serial_log.splitlines()[-lines:])

    def summary(self) -> str:
        keys = ("kernel", "discovery", "login", "header_digest", "data_digest", "disk", "disk_bytes", "vendor",
                "model", "result", "io_errors", "digest_errors")
        shown = " ".join(f"{k}={self.results[k]}" for k in keys if k in self.results)
        return f"{shown} elapsed={self.elapsed:.1f}s"


def parse_results(serial: str) -> dict[str, str]:
    """``SHOAL-RESULT key=value`` lines; the last value of a key wins."""
    results = {}
    for line in serial.splitlines():
        match = _RESULT_LINE.search(line.replace("\r", ""))
        if match:
            results[match.group(1)] = match.group(2).strip()
    return results


def _check_value(name: str, value: str) -> str:
    if not _SAFE_VALUE.fullmatch(value):
        raise ValueError(f"{name}={value!r}: use letters, digits and ._:@%+,/-[] only")
    return value


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def qemu_argv(image: GuestImage, network: GuestNetwork, append: str, memory_mib: int = 512) -> list[str]:
    """The QEMU command line (TCG; KVM cannot boot a stock kernel here)."""
    return [
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", append,
        "-netdev", f"tap,id=n0,ifname={network.tap},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0",
    ]


def run_kernel_initiator(
    target_portal: str,
    target_iqn: str,
    lun: int = 0,
    chap: tuple[str, str] | None = None,
    mutual_chap: tuple[str, str] | None = None,
    *,
    network: GuestNetwork,
    header_digest: str | None = None,
    data_digest: str | None = None,
    image: GuestImage | None = None,
    initiator_iqn: str = DEFAULT_INITIATOR,
    pattern_offset_mib: int = 40,
    fs_size_mib: int = 32,
    timeout: float = 120.0,
    log_path: Path | None = None,
) -> InitiatorResult:
    """Boot the guest once and run the scripted session against the target.

    ``chap`` is the initiator's (user, secret) pair; ``mutual_chap`` the
    pair the target answers with (RFC 7143 §12.1.3). ``header_digest`` and
    ``data_digest`` go into the node record's ``node.conn[0].iscsi.HeaderDigest``
    / ``DataDigest`` (``None``, ``CRC32C``, ``CRC32C,None``, ``None,CRC32C``;
    RFC 7143 §13.1); unset keeps iscsid.conf's default (None). What the
    session really negotiated comes back as ``header_digest``/``data_digest``
    in the results. The LUN must be larger
    than ``pattern_offset_mib`` + 1 MiB; the filesystem takes the first
    ``fs_size_mib`` MiB and must end before the pattern.
    """
    if mutual_chap and not chap:
        raise ValueError("mutual CHAP needs one-way CHAP too")
    if fs_size_mib > pattern_offset_mib:
        raise ValueError("the filesystem would overwrite the pattern")
    image = image or ensure_guest_image()
    nonce = f"shoal-{secrets.token_hex(8)}"
    env = {
        "SHOAL_PORTAL": target_portal,
        "SHOAL_IQN": target_iqn,
        "SHOAL_LUN": str(lun),
        "SHOAL_INITIATOR": initiator_iqn,
        "SHOAL_HOST_IP": network.host_ip,
        "SHOAL_GUEST_IP": f"{network.guest_ip}/{network.prefix_len}",
        "SHOAL_PATTERN_MIB": str(pattern_offset_mib),
        "SHOAL_FS_MIB": str(fs_size_mib),
        "SHOAL_NONCE": nonce,
    }
    if chap:
        env["SHOAL_CHAP_USER"], env["SHOAL_CHAP_SECRET"] = chap
    if mutual_chap:
        env["SHOAL_MUTUAL_USER"], env["SHOAL_MUTUAL_SECRET"] = mutual_chap
    for name, value in (("SHOAL_HEADER_DIGEST", header_digest), ("SHOAL_DATA_DIGEST", data_digest)):
        if value is not None:
            if value not in DIGEST_VALUES:
                raise ValueError(f"{name}={value!r}: one of {', '.join(DIGEST_VALUES)}")
            env[name] = value
    options = " ".join(f"{k}={_check_value(k, v)}" for k, v in env.items())
    append = f"console=ttyS0 quiet panic=-1 mitigations=off {options}"

    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="kernel-guest-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    start = time.monotonic()
    timed_out = False
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                network.exec_argv(qemu_argv(image, network, append)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _stop(proc)
        elapsed = time.monotonic() - start
        serial = log_path.read_bytes().decode(errors="replace")
    finally:
        if own_log:
            log_path.unlink(missing_ok=True)
    return InitiatorResult(
        results=parse_results(serial), serial_log=serial, elapsed=elapsed,
        returncode=proc.returncode, timed_out=timed_out,
        pattern_offset=pattern_offset_mib << 20, fs_size=fs_size_mib << 20, nonce=nonce,
    )


# --------------------------------------------------------------------------
# Host-side checks of the backing file
# --------------------------------------------------------------------------


def debugfs_cat(image: Path, path: str) -> bytes:
    """A file's contents from an ext4 image, read by e2fsprogs' debugfs."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return proc.stdout


def verify_backing_file(backing: Path, result: InitiatorResult) -> list[str]:
    """Problems found in the LUN's backing file after a run; empty when fine.

    Checks the pattern at its offset, ``/shoal/hello.txt`` (the run's nonce)
    and ``/shoal/pattern.bin`` through ``debugfs``, and ``e2fsck -fn``.
    """
    problems = []
    expected = pattern_bytes()
    with open(backing, "rb") as f:
        f.seek(result.pattern_offset)
        found = f.read(len(expected))
    if found != expected:
        problems.append(f"pattern at offset {result.pattern_offset} differs from what the guest wrote")
    try:
        hello = debugfs_cat(backing, "/shoal/hello.txt")
        if hello != (result.nonce + "\n").encode():
            problems.append(f"/shoal/hello.txt holds {hello[:100]!r}, expected {result.nonce!r}")
        if debugfs_cat(backing, "/shoal/pattern.bin") != expected:
            problems.append("/shoal/pattern.bin differs from the pattern")
    except subprocess.CalledProcessError as exc:
        problems.append(f"debugfs failed: {exc.stderr!r}")
    fsck = subprocess.run(["e2fsck", "-fn", str(backing)], capture_output=True, text=True)
    if fsck.returncode != 0:
        problems.append(f"e2fsck -fn exit {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}")
    return problems
