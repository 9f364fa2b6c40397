"""Run istgt (Debian ``istgt``, a second C iSCSI target) as a speed yardstick.

istgt is used by ``tests/perf`` only, never for conformance: it hangs on
out-of-range tests (LAB-FACTS.md). Each instance gets its own config, PID and
auth files in a temporary directory and its own portal on 127.0.0.1; it runs
in the foreground (``-D``) so the ``Popen`` PID is istgt's own, and is stopped
by that PID: SIGTERM (istgt exits within a second or two), then SIGKILL.

The config sets the same negotiation limits as tuned tgtd
(``tests.support.tgtd.TUNED_PARAMS``: MaxRecvDataSegmentLength 262144,
MaxBurstLength 1048576, FirstBurstLength 262144; istgt has no
MaxXmitDataSegmentLength key), the internal unit controller off (no portal),
no authentication, one logical unit with LUN 0 on the given file. istgt's
``QueueDepth`` (commands queued per LU) is 64: its default, 32, equals the
benchmark's deepest queue and leaves no headroom.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.shoal_target import stop_process
from tests.support.tgtd import TUNED_PARAMS, _listens

NODE_BASE = "iqn.2026-11.io.shoal.test"
TARGET_NAME = "istgt"
DEFAULT_QUEUE_DEPTH = 64
MiB = 1 << 20


class IstgtError(RuntimeError):
    """istgt did not start, or its configuration cannot be written."""


@dataclass
class Istgt:
    host: str
    port: int
    iqn: str
    pid: int
    lun_paths: list[Path]
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    config_path: Path = field(repr=False)

    def url(self, lun: int = 0) -> str:
        """A libiscsi/QEMU URL: ``iscsi://host:port/iqn/lun`` (istgt's disk LUNs start at 0)."""
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{lun}"

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _quoted(value: str | Path) -> str:
    """A config value in double quotes; istgt's parser has no escapes, so quotes and newlines are refused."""
    text = str(value)
    if any(c in text for c in '"\\\n\r') or not text.isprintable() or not text.isascii():
        raise IstgtError(f"cannot put {text!r} in an istgt config: quotes, backslashes, non-ASCII "
                         "and control characters are not allowed")
    return f'"{text}"'


def render_config(workdir: Path, portal: tuple[str, int], luns: list[tuple[Path, int]], *,
                  params: dict[str, int] | None = None, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                  node_base: str = NODE_BASE, target_name: str = TARGET_NAME) -> str:
    """istgt.conf text: one portal group on ``portal``, one LU whose LUN 0, 1, ... are ``luns``.

    ``luns`` are (file, size in bytes, a multiple of 1 MiB) pairs; ``params``
    the negotiation limits (default ``TUNED_PARAMS``, less the key istgt does
    not know). The PID and auth files go into ``workdir``.
    """
    host, port = portal
    if not 0 < port < 65536:
        raise IstgtError(f"portal port {port} out of range")
    if not 1 <= queue_depth <= 255:
        raise IstgtError(f"QueueDepth {queue_depth} out of istgt's range 1..255")
    if not luns:
        raise IstgtError("istgt needs at least one LUN")
    limits = dict(params if params is not None else TUNED_PARAMS)
    limits.pop("MaxXmitDataSegmentLength", None)  # istgt has no such key: it sends what the initiator takes
    workdir = Path(workdir)
    lines = [
        "# written by tests/support/istgt.py",
        "[Global]",
        f"  NodeBase {_quoted(node_base)}",
        f"  PidFile {_quoted(workdir / 'istgt.pid')}",
        f"  AuthFile {_quoted(workdir / 'auth.conf')}",
        f"  MediaDirectory {_quoted(workdir)}",
        "  Timeout 30",
        "  NopInInterval 20",
        "  DiscoveryAuthMethod None",
        "  MaxSessions 16",
        "  MaxConnections 4",
        "  MaxR2T 32",
        "  MaxOutstandingR2T 16",
        "  DefaultTime2Wait 2",
        "  DefaultTime2Retain 60",
    ]
    lines += [f"  {key} {int(value)}" for key, value in limits.items()]
    lines += [
        "  InitialR2T Yes",
        "  ImmediateData Yes",
        "  DataPDUInOrder Yes",
        "  DataSequenceInOrder Yes",
        "  ErrorRecoveryLevel 0",
        "[UnitControl]",  # istgtcontrol's unit controller: no portal, so off
        "  AuthMethod None",
        "[PortalGroup1]",
        f"  Portal DA1 {host}:{int(port)}",
        "[InitiatorGroup1]",
        '  InitiatorName "ALL"',
        f"  Netmask {host}",
        "[LogicalUnit1]",
        f"  TargetName {_quoted(target_name)}",
        "  Mapping PortalGroup1 InitiatorGroup1",
        "  AuthMethod None",
        "  UseDigest Auto",
        "  UnitType Disk",
        f"  QueueDepth {int(queue_depth)}",
    ]
    for lun, (path, size) in enumerate(luns):
        if size <= 0 or size % MiB:
            raise IstgtError(f"LUN {lun} size {size} is not a positive multiple of 1 MiB")
        lines.append(f"  LUN{lun} Storage {_quoted(path)} {size // MiB}MB")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_istgt(tmp_path: Path, luns=(("disk0", 64 * MiB),), *, host: str = "127.0.0.1",
                  params: dict[str, int] | None = None, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                  timeout: float = 10.0):
    """Start istgt serving ``luns`` ((name or absolute path, size) pairs) as LUNs 0, 1, ...; yield an ``Istgt``.

    A missing backing file is created sparse with the given size; an existing
    one is used as it is. The portal is a free port on ``host``.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    lun_files = []
    for name, size in luns:
        path = Path(name) if os.path.isabs(str(name)) else tmp_path / f"{name}.img"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        lun_files.append((path, size))
    (tmp_path / "auth.conf").write_text("# no CHAP: the benchmark logs in without authentication\n")
    errors = []
    for _attempt in range(8):
        port = _free_port(host)
        config_path = tmp_path / f"istgt-{port}.conf"
        config_path.write_text(render_config(tmp_path, (host, port), lun_files, params=params,
                                             queue_depth=queue_depth))
        log_path = config_path.with_suffix(".log")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(["istgt", "-c", str(config_path), "-D"], stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            ready = _wait_ready(process, port, timeout)
            if ready:
                yield Istgt(host, port, f"{NODE_BASE}:{TARGET_NAME}", process.pid,
                            [p for p, _ in lun_files], process, log_path, config_path)
                return
        finally:
            stop_istgt(process)
        errors.append(log_path.read_text(errors="replace"))
    raise IstgtError("istgt did not start:\n" + "\n---\n".join(errors))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_ready(process: subprocess.Popen, port: int, timeout: float) -> bool:
    """True once istgt itself listens on ``port``; False if it exited (e.g. the port was taken meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _listens(process.pid, port):
            return True
        time.sleep(0.02)
    return False


def stop_istgt(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM by PID, wait ``grace`` seconds, then SIGKILL (the suite's one way to stop a process)."""
    stop_process(process, grace)
