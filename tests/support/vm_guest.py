"""A QEMU guest whose only disk is a Shoal volume, writing checksummed records to it.

Issue 8 needs a virtual machine that keeps writing while it is live-migrated
between hosts and while the host it ran on is fenced. This module builds that
guest and reads back what it wrote:

1. :func:`ensure_vm_image` makes a tiny guest from Debian's kernel and a
   busybox-static initramfs holding ``virtio_pci`` + ``virtio_blk``. The
   kernel download, the module resolution (from ``.modinfo``), the ELF kernel
   and the cpio writer are :mod:`tests.support.kernel_guest`'s; only the
   init script and the module list differ. Cached under ``$SHOAL_TEST_CACHE``
   (``vm-guest/``) by a hash of this file and busybox.
2. The guest has no root disk and no network: everything runs from RAM, so a
   migration moves all of it. Its init (:data:`WRITER_INIT`) writes record
   ``N`` to 4 KiB block ``N`` of ``/dev/vda`` with ``O_DIRECT`` (a completed
   write has reached the target), one after the other without stopping, and
   prints ``SHOAL-VM wrote WRITER N`` per record and ``SHOAL-VM ioerror ...``
   for a failed write (which it retries, never skipping a block) on the serial
   console.
3. :class:`VmGuest` runs ``qemu-system-x86_64`` (TCG; KVM cannot boot a stock
   kernel here) inside a network namespace, with its disk from the
   ``-blockdev driver=iscsi`` arguments of ``shoalctl volume connect`` and a
   QMP socket driven with the QEMU project's own ``qemu.qmp`` client.
4. :func:`read_records` / :func:`check_records` parse a volume's backing file
   on the host and check every record: magic, writer, sequence number equal
   to the block index, payload and MD5.

A record is one 4 KiB block::

    "SHOALVM1 " + writer (16 chars, left-aligned) + " " + seq (10 digits) + " "   -- 37 bytes
    + md5 hex (32) + "\\n"                                                      -- 70 bytes
    + payload: "WRITER:SEQ\\n" repeated, cut at 4026 bytes

The MD5 covers the first 37 bytes and the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support import kernel_guest
from tests.support.shoal_target import stop_process

#: Part of the image key, with the init script, the module list and busybox.
IMAGE_FORMAT = 1
#: Modules the guest loads (dependencies resolved from ``.modinfo``).
GUEST_MODULES = ("virtio_pci", "virtio_blk")
RECORD_SIZE = 4096
MAGIC = b"SHOALVM1 "
HEADER_LEN = 37
LINE_LEN = 70
PAYLOAD_LEN = RECORD_SIZE - LINE_LEN
_WRITER = re.compile(r"[a-z0-9-]{1,16}")
_LINE = re.compile(r"SHOAL-VM (wrote|ioerror|start|disk|error|full) ?(.*)")

# The guest's PID 1. Parameters arrive as environment variables from the
# kernel command line. Each record costs a handful of busybox forks: a few
# dozen records a second under TCG, plenty to see every write land in order.
WRITER_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "SHOAL-VM $*"; }
for m in $(cat /etc/shoal-modules); do
    insmod /lib/modules/$m.ko || say error "insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then say error no-disk; poweroff -f; fi
LAST=$(( $(cat /sys/block/vda/size) / 8 ))
say disk "blocks=$LAST"
W=$SHOAL_WRITER
N=${SHOAL_START:-0}
say start "$W $N"
while [ $N -lt $LAST ]; do
    h=$(printf 'SHOALVM1 %-16s %010d ' "$W" "$N")
    yes "$W:$N" | head -c 4026 > /tmp/payload
    s=$( { printf '%s' "$h"; cat /tmp/payload; } | md5sum)
    { printf '%s%s\n' "$h" "${s%% *}"; cat /tmp/payload; } > /tmp/record
    if dd if=/tmp/record of=/dev/vda bs=4096 count=1 seek=$N oflag=direct conv=notrunc 2> /tmp/dd.err; then
        say wrote "$W $N"
        N=$((N + 1))
    else
        say ioerror "$W $N $(tr '\n' ' ' < /tmp/dd.err)"
        sleep 1
    fi
done
say full "$W $N"
while true; do sleep 60; done
"""


class VmError(RuntimeError):
    """The guest image could not be built, or QEMU/QMP did not do what was asked."""


# --------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------


def missing_requirements() -> list[str]:
    """Why the VM tests cannot run here; empty when they can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (network namespaces)")
    for tool in ("qemu-system-x86_64", "ip", "apt-get", "dpkg-deb", "openssl"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is not installed")
    if not os.access(kernel_guest.BUSYBOX, os.X_OK):
        missing.append(f"{kernel_guest.BUSYBOX} is not installed")
    if not Path("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so").exists():
        missing.append("QEMU's iSCSI driver (qemu-block-extra) is not installed")
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        missing.append("the qemu.qmp package is not installed (pip install -e '.[test]')")
    return missing


def _image_key() -> str:
    # What goes into the image: bump IMAGE_FORMAT when _initramfs changes what it writes.
    digest = hashlib.sha256(f"{IMAGE_FORMAT} {GUEST_MODULES}\n{WRITER_INIT}".encode())
    st = os.stat(kernel_guest.BUSYBOX)
    digest.update(f"{st.st_size} {st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _initramfs(root: Path, version: str) -> bytes:
    modules = kernel_guest.resolve_modules(root / "lib" / "modules" / version, GUEST_MODULES)
    cpio = kernel_guest.CpioWriter()
    for directory in ("dev", "proc", "sys", "tmp", "bin", "etc"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("init", WRITER_INIT.encode(), 0o755)
    cpio.file(kernel_guest.BUSYBOX, Path(kernel_guest.BUSYBOX).read_bytes(), 0o755)
    names = [kernel_guest._module_name(p) for p in modules]
    for name, path in zip(names, modules):
        cpio.file(f"lib/modules/{name}.ko", kernel_guest._read_module(path))
    cpio.file("etc/shoal-modules", ("\n".join(names) + "\n").encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def ensure_vm_image(cache: Path | None = None) -> kernel_guest.GuestImage:
    """Build the writer guest (or take it from the cache) and return its paths."""
    cache = cache or kernel_guest.cache_root()
    package = kernel_guest.kernel_package(cache)
    version = package.removeprefix("linux-image-")
    image_dir = cache / "vm-guest" / f"{version}-{_image_key()}"
    kernel, initramfs = image_dir / "kernel", image_dir / "initramfs.cpio.gz"
    if kernel.exists() and initramfs.exists():
        return kernel_guest.GuestImage(version, kernel, initramfs)
    with kernel_guest._locked(cache):
        if kernel.exists() and initramfs.exists():
            return kernel_guest.GuestImage(version, kernel, initramfs)
        start = time.monotonic()
        deb = kernel_guest._download_kernel(package, cache / "debs")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            kernel_guest._run(["dpkg-deb", "-x", str(deb), str(root)])
            staging = Path(tmp) / "image"
            staging.mkdir()
            kernel_guest._write_kernel(root / "boot" / f"vmlinuz-{version}", staging / "kernel")
            (staging / "initramfs.cpio.gz").write_bytes(_initramfs(root, version))
            image_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, image_dir)
        kernel_guest._prune_images(image_dir.parent, keep=image_dir)
        return kernel_guest.GuestImage(version, kernel, initramfs, time.monotonic() - start)


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """One block of the volume, parsed."""

    block: int
    writer: str
    seq: int
    valid: bool
    """Magic, MD5 and payload all check out."""


def record_bytes(writer: str, seq: int) -> bytes:
    """The record the guest writes for (writer, seq): the host's reference implementation."""
    header = b"SHOALVM1 %-16s %010d " % (writer.encode(), seq)
    unit = f"{writer}:{seq}\n".encode()
    payload = (unit * (PAYLOAD_LEN // len(unit) + 1))[:PAYLOAD_LEN]
    digest = hashlib.md5(header + payload).hexdigest().encode()
    return header + digest + b"\n" + payload


def parse_record(block: int, data: bytes) -> Record | None:
    """The record in one block, or None for a block the guest never wrote (all zeros)."""
    if not data.strip(b"\0"):
        return None
    if not data.startswith(MAGIC) or len(data) != RECORD_SIZE:
        return Record(block, "", -1, False)
    try:
        writer = data[9:25].decode().rstrip()
        seq = int(data[26:36])
    except (UnicodeDecodeError, ValueError):
        return Record(block, "", -1, False)
    return Record(block, writer, seq, data == record_bytes(writer, seq))


def read_records(backing: Path) -> list[Record | None]:
    """Every block of a volume's backing file, parsed; trailing unwritten blocks dropped."""
    records: list[Record | None] = []
    with open(backing, "rb") as f:
        block = 0
        while chunk := f.read(RECORD_SIZE * 256):
            for offset in range(0, len(chunk), RECORD_SIZE):
                records.append(parse_record(block, chunk[offset : offset + RECORD_SIZE]))
                block += 1
    while records and records[-1] is None:
        records.pop()
    return records


def check_records(records: Sequence[Record | None], writers: dict[str, range]) -> list[str]:
    """Problems with ``records``; empty when every block from 0 holds a valid record of the writer
    whose sequence range holds that block number (``writers``: writer id -> blocks it owns), with
    no gap."""
    problems = []
    for block, record in enumerate(records):
        expected = next((w for w, blocks in writers.items() if block in blocks), None)
        if record is None:
            problems.append(f"block {block}: never written (a gap)")
        elif not record.valid:
            problems.append(f"block {block}: not a valid record (bad magic, payload or checksum)")
        elif record.seq != block:
            problems.append(f"block {block}: holds seq {record.seq}")
        elif record.writer != expected:
            problems.append(f"block {block}: written by {record.writer!r}, expected {expected!r}")
        if len(problems) > 20:
            problems.append("...")
            break
    return problems


# --------------------------------------------------------------------------
# The serial console
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConsoleLog:
    """What the guest's init printed (``SHOAL-VM ...`` lines) and the kernel's errors."""

    written: dict[str, list[int]]
    """writer -> sequence numbers reported written, in order."""
    io_errors: list[str]
    """``SHOAL-VM ioerror`` lines and kernel ``I/O error`` lines."""
    errors: list[str]
    started: list[str]
    text: str

    def last(self, writer: str) -> int:
        return self.written[writer][-1] if self.written.get(writer) else -1

    def excerpt(self, lines: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-lines:])


def parse_console(text: str) -> ConsoleLog:
    """The lines of a serial log. A line still being written is left out: a migration can stop the guest
    mid-line, and the destination's log then starts with the rest (parse both logs joined to see it)."""
    written: dict[str, list[int]] = {}
    io_errors, errors, started = [], [], []
    lines = text.replace("\r", "").split("\n")[:-1]  # what follows the last newline is incomplete
    for line in lines:
        match = _LINE.search(line)
        if match:
            kind, rest = match.groups()
            if kind == "wrote":
                writer, _, seq = rest.partition(" ")
                with contextlib.suppress(ValueError):
                    written.setdefault(writer, []).append(int(seq))
            elif kind == "ioerror":
                io_errors.append(line)
            elif kind == "error":
                errors.append(line)
            elif kind == "start":
                started.append(rest)
        elif "I/O error" in line or "blk_update_request" in line:
            io_errors.append(line)
    return ConsoleLog(written, io_errors, errors, started, text)


# --------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------


def qemu_argv(image: kernel_guest.GuestImage, disk_args: Sequence[str], drive: str, *, writer: str,
              start: int, serial: Path, qmp: Path, incoming: str | None = None,
              memory_mib: int = 160) -> list[str]:
    """The QEMU command line: TCG, no network, the console to ``serial``, QMP on ``qmp``.

    ``disk_args`` are the ``-object secret,...`` / ``-blockdev driver=iscsi,...`` arguments from
    ``shoalctl volume connect --format qemu``; ``drive`` their ``node-name``. ``incoming``
    (``tcp:IP:PORT``) starts a migration destination. The kernel command line holds the writer id
    and the first block only (never a secret)."""
    if not _WRITER.fullmatch(writer):
        raise ValueError(f"writer {writer!r}: 1-16 of a-z, 0-9 and -")
    argv = [
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-serial", f"file:{serial}",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 quiet panic=-1 mitigations=off SHOAL_WRITER={writer} SHOAL_START={int(start)}",
        *disk_args,
        "-device", f"virtio-blk-pci,drive={drive},id=vdisk0",
    ]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


class VmGuest:
    """One ``qemu-system-x86_64`` process inside a network namespace, stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, serial: Path, qmp: Path):
        self.name = name
        self.serial = serial
        self.qmp_path = qmp
        self.log_path = workdir / f"{name}.qemu.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def start(cls, name: str, exec_prefix: Sequence[str], image: kernel_guest.GuestImage,
              connection: dict, workdir: Path, *, writer: str, start: int = 0,
              incoming: str | None = None) -> VmGuest:
        """QEMU for ``connection`` (``shoalctl -o json volume connect --format qemu``'s output)."""
        serial, qmp = workdir / f"{name}.serial.log", workdir / f"{name}.qmp"
        argv = qemu_argv(image, connection["qemu_args"], connection["node_name"], writer=writer, start=start,
                         serial=serial, qmp=qmp, incoming=incoming)
        guest = cls(name, [*exec_prefix, *argv], workdir, serial, qmp)
        guest.wait_for_qmp()
        return guest

    def console(self) -> ConsoleLog:
        return parse_console(self.serial.read_text(errors="replace") if self.serial.exists() else "")

    def qemu_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_qmp(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if not self.alive():
                raise VmError(f"QEMU {self.name} exited {self.process.returncode}:\n{self.qemu_log()}")
            if time.monotonic() > deadline:
                raise VmError(f"QEMU {self.name}: no QMP socket after {timeout}s:\n{self.qemu_log()}")
            time.sleep(0.05)

    def qmp(self, command: str, **arguments) -> object:
        """One QMP command on a fresh connection (the server takes one client at a time)."""
        return asyncio.run(_qmp_commands(self.qmp_path, [(command, arguments)]))[0]

    def status(self) -> str:
        return self.qmp("query-status")["status"]

    def wait_status(self, status: str, timeout: float) -> str:
        """Wait for ``query-status`` to say ``status`` (a migration destination still loads the state and
        activates its disks when the source already reports ``completed``)."""
        deadline = time.monotonic() + timeout
        while (now := self.status()) != status:
            if not self.alive() or time.monotonic() > deadline:
                raise VmError(f"{self.name}: status {now!r}, waited for {status!r}:\n{self.qemu_log()[-2000:]}")
            time.sleep(0.1)
        return now

    def wait_for_seq(self, writer: str, seq: int, timeout: float) -> int:
        """Wait until the guest reported record ``seq`` of ``writer`` written; return the last one reported."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.console()
            if log.last(writer) >= seq:
                return log.last(writer)
            if not self.alive() or time.monotonic() > deadline:
                raise VmError(f"{self.name}: {writer} reported record {log.last(writer)}, waited for {seq} "
                              f"(alive={self.alive()}):\n{log.excerpt()}\n--- qemu ---\n{self.qemu_log()[-2000:]}")
            time.sleep(0.2)

    def pause(self) -> None:
        """QMP ``stop``: QEMU drains the guest's in-flight requests before it answers."""
        self.qmp("stop")

    def stop(self) -> None:
        stop_process(self.process, grace=5.0)

    def kill(self) -> None:
        """SIGKILL by PID, as a host that dies: a QEMU whose requests hang on a refused session would
        wait for them on SIGTERM."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


async def _connect(socket_path: Path, name: str, attempts: int = 5):
    """A connected ``QMPClient``. qemu.qmp 0.0.6 reads the first message after ``qmp_capabilities`` as its
    reply; an event QEMU sends at that moment (a migration destination emits several as it starts running)
    fails the negotiation, so a failed negotiation is tried again on a new connection."""
    from qemu.qmp import ConnectError, QMPClient

    for attempt in range(attempts):
        client = QMPClient(name)
        try:
            await client.connect(str(socket_path))
            return client
        except ConnectError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def _qmp_commands(socket_path: Path, commands: Sequence[tuple[str, dict]]) -> list:
    client = await _connect(socket_path, "shoal-test")
    try:
        return [await client.execute(name, args or None) for name, args in commands]
    finally:
        await client.disconnect()


async def _migrate(source: Path, uri: str, timeout: float) -> dict:
    client = await _connect(source, "shoal-migrate")
    try:
        # QEMU 7.2's default of 32 MiB/s would take seconds for nothing: the hosts share a bridge.
        await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30, "downtime-limit": 1000})
        await client.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        while True:
            info = await client.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                await client.execute("migrate_cancel")
                raise VmError(f"migration not done after {timeout}s: {info}")
            await asyncio.sleep(0.2)
    finally:
        await client.disconnect()


def migrate(source: VmGuest, destination_uri: str, timeout: float = 120.0) -> dict:
    """Live-migrate ``source`` to the QEMU listening on ``destination_uri`` (``tcp:IP:PORT``) over QMP;
    return the final ``query-migrate`` answer."""
    return asyncio.run(_migrate(source.qmp_path, destination_uri, timeout))
