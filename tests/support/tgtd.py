"""Run tgtd (the Linux SCSI target framework's userspace daemon) as a test peer.

tgtd is the reference target our initiator is tested against and the speed
yardstick of ``tests/perf``. Each instance gets its own iSCSI portal and its own
management socket (``-C CPORT`` makes ``/var/run/tgtd/socket.CPORT``), so
several may run at once. LUN 0 of a tgtd target is its controller
(SPC-4 §6.6.2 REPORT LUNS lists it, peripheral device type 0x0C); backing-store
LUNs start at 1.

Stopping: tgtd ignores SIGTERM (seen here even with no targets), so the
target is deleted with ``--force``, the daemon told to exit with
``--op delete --mode system``, and SIGKILL sent by PID if it is still there.
That always happens, also when the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

DEFAULT_IQN = "iqn.2026-11.io.shoal.test:tgtd"
IPC_DIR = Path("/var/run/tgtd")

# The negotiated limits the benchmark compares at (RFC 7143 §13.12, §13.13,
# §13.14). tgtd's defaults are MaxRecvDataSegmentLength 8192,
# MaxXmitDataSegmentLength 8192, MaxBurstLength 262144, FirstBurstLength 65536;
# its 8 KiB segments halve its 1 MiB throughput. These equal what shoal target
# offers.
TUNED_PARAMS = {
    "MaxRecvDataSegmentLength": 262144,
    "MaxXmitDataSegmentLength": 262144,
    "MaxBurstLength": 1048576,
    "FirstBurstLength": 262144,
}


class TgtdError(RuntimeError):
    """tgtd did not start, or a tgtadm command failed."""


@dataclass
class Tgtd:
    host: str
    port: int
    iqn: str
    pid: int
    control_port: int
    lun_paths: list[Path]
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def url(self, lun: int = 1, user: str | None = None, secret: str | None = None,
            target_user: str | None = None, target_secret: str | None = None) -> str:
        """A libiscsi/QEMU URL: ``iscsi://[user%secret@]host:port/iqn/lun[?target_user=..&target_password=..]``."""
        auth = f"{quote(user, safe='')}%{quote(secret or '', safe='')}@" if user else ""
        url = f"iscsi://{auth}{self.host}:{self.port}/{self.iqn}/{lun}"
        if target_user:
            url += f"?target_user={quote(target_user, safe='')}&target_password={quote(target_secret or '', safe='')}"
        return url

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``tgtadm -C CPORT --lld iscsi ARGS`` against this instance."""
        return tgtadm(self.control_port, *args, check=check)

    def show(self) -> str:
        """``tgtadm --op show --mode target``: targets, LUNs, nexus, accounts, ACLs."""
        return self.tgtadm("--op", "show", "--mode", "target").stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def tgtadm(control_port: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["tgtadm", "-C", str(control_port), "--lld", "iscsi", *args],
                            capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise TgtdError(f"tgtadm {' '.join(args)} failed ({result.returncode}): "
                        f"{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def running_tgtd(tmp_path: Path, luns=(("disk0", 64 * 2**20),), *, iqn: str = DEFAULT_IQN,
                 chap: tuple[str, str] | None = None, mutual_chap: tuple[str, str] | None = None,
                 netns: str | None = None, listen: str = "127.0.0.1:0", tuned: bool = True,
                 params: dict[str, str] | None = None, timeout: float = 10.0):
    """Start tgtd serving ``luns`` ((name or absolute path, size) pairs) as LUNs 1, 2, ... of ``iqn``.

    A missing backing file is created sparse with the given size; an existing
    one is used as it is. ``chap`` is the initiator's (user, secret) the target
    demands; ``mutual_chap`` the (user, secret) the target answers with
    (RFC 7143 §12.1.3). ``listen`` is IPv4 ``HOST:PORT``; port 0 picks a free
    one. Yields a ``Tgtd``; all LUNs are open to every initiator (``-I ALL``).
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    host, _, port_text = listen.rpartition(":")
    lun_paths = [_backing_file(tmp_path, name, size) for name, size in luns]
    process, port, control_port, log_path = _start(tmp_path, host, int(port_text), netns, timeout)
    try:
        _configure(control_port, iqn, lun_paths, chap, mutual_chap, tuned, params or {})
        yield Tgtd(host, port, iqn, process.pid, control_port, lun_paths, process, log_path)
    finally:
        _stop(process, control_port)


def _backing_file(tmp_path: Path, name, size: int | None) -> Path:
    path = Path(name) if os.path.isabs(str(name)) else tmp_path / f"{name}.img"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size or 0)
    return path


def _start(tmp_path: Path, host: str, port: int, netns: str | None, timeout: float):
    """Start tgtd on a free portal and control port, retrying when another process took either."""
    errors = []
    for attempt in range(8):
        portal_port = port or _free_port(host, netns)
        control_port = _free_control_port()
        log_path = tmp_path / f"tgtd-{portal_port}-{control_port}.log"
        args = ["tgtd", "-f", "-C", str(control_port), "--iscsi", f"portal={host}:{portal_port}"]
        if netns:
            args = ["ip", "netns", "exec", netns] + args  # ip execs tgtd: same PID
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        try:
            if _wait_ready(process, portal_port, control_port, log_path, timeout):
                return process, portal_port, control_port, log_path
        except BaseException:
            _kill(process)
            raise
        _kill(process)
        errors.append(log_path.read_text(errors="replace"))
        if port:
            break  # a fixed port that is taken will stay taken
    raise TgtdError("tgtd did not start:\n" + "\n---\n".join(errors))


def _free_port(host: str, netns: str | None) -> int:
    """A port nobody listens on now; inside a namespace we cannot bind-test, so guess and verify later."""
    if netns:
        return random.randint(20000, 60999)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_control_port() -> int:
    """A control port whose lock file no tgtd holds (tgtd takes a lockf() lock on socket.N.lock)."""
    IPC_DIR.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        candidate = random.randint(10000, 32000)  # tgtd refuses -C values above 32767 ("out of range")
        lock = IPC_DIR / f"socket.{candidate}.lock"
        if not lock.exists():
            return candidate
        with open(lock, "r+b") as f:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            fcntl.lockf(f, fcntl.LOCK_UN)
            return candidate
    raise TgtdError("no free tgtd control port")


def _wait_ready(process: subprocess.Popen, port: int, control_port: int, log_path: Path,
                timeout: float) -> bool:
    """True once tgtd itself listens on ``port`` and answers tgtadm; False if it exited or cannot bind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # e.g. "another tgtd is using /var/run/tgtd/socket.N.lock"
        if _listens(process.pid, port):
            if tgtadm(control_port, "--op", "show", "--mode", "target", check=False).returncode == 0:
                return True
        elif b"failed to create/bind to portal" in log_path.read_bytes():
            return False  # tgtd keeps running without a portal; we retry elsewhere
        time.sleep(0.02)
    return False


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` owns a TCP socket in LISTEN state on ``port`` (its own network namespace)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        lines = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):
                lines += Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split()
        local_port = int(cols[1].rsplit(":", 1)[1], 16)
        if local_port == port and cols[3] == "0A" and f"socket:[{cols[9]}]" in inodes:
            return True
    return False


def _configure(control_port: int, iqn: str, lun_paths: list[Path], chap, mutual_chap, tuned: bool,
               params: dict[str, str]) -> None:
    def adm(*args):
        tgtadm(control_port, *args)

    adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
    for lun, path in enumerate(lun_paths, start=1):
        adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun), "-b", str(path))
    if tuned:
        for key, value in TUNED_PARAMS.items():
            adm("--op", "update", "--mode", "target", "--tid", "1", "--name", key, "--value", str(value))
    for key, value in params.items():  # e.g. HeaderDigest=CRC32C: tgtd offers None unless told
        adm("--op", "update", "--mode", "target", "--tid", "1", "--name", key, "--value", str(value))
    if chap:
        adm("--op", "new", "--mode", "account", "--user", chap[0], "--password", chap[1])
        adm("--op", "bind", "--mode", "account", "--tid", "1", "--user", chap[0])
    if mutual_chap:
        adm("--op", "new", "--mode", "account", "--user", mutual_chap[0], "--password", mutual_chap[1])
        adm("--op", "bind", "--mode", "account", "--tid", "1", "--user", mutual_chap[0], "--outgoing")
    adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")


def _stop(process: subprocess.Popen, control_port: int, grace: float = 5.0) -> None:
    """Delete the target (forcing out sessions), ask tgtd to exit, SIGKILL it by PID if it does not."""
    try:
        if process.poll() is None:
            tgtadm(control_port, "--op", "delete", "--mode", "target", "--tid", "1", "--force", check=False)
            subprocess.run(["tgtadm", "-C", str(control_port), "--op", "delete", "--mode", "system"],
                           capture_output=True, timeout=30)
            process.wait(grace)
    except (subprocess.TimeoutExpired, OSError):
        pass
    finally:
        _kill(process)
        for leftover in (f"socket.{control_port}", f"socket.{control_port}.lock"):
            with contextlib.suppress(OSError):
                (IPC_DIR / leftover).unlink()


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(0.5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(5)
