"""Run ``shoal target`` as a real process for tests and benchmarks.

The process is started with an argument list (never a shell string), waited
for through its ``--port-file``, and stopped by PID on exit — SIGTERM first,
then SIGKILL — also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IQN = "iqn.2026-11.io.shoal.test:target"
LIBISCSI_INITIATORS = (
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
)


@dataclass
class ShoalTarget:
    host: str
    port: int
    iqn: str
    pid: int
    lun_paths: list[Path]
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    more_portals: list[tuple[str, int]] = field(default_factory=list)  # further --listen addresses

    def url(self, lun: int = 0, user: str | None = None, secret: str | None = None,
            target_user: str | None = None, target_secret: str | None = None, portal: int = 0) -> str:
        """A libiscsi/QEMU URL: ``iscsi://[user%secret@]host:port/iqn/lun[?target_user=..&target_password=..]``.

        ``portal`` 1, 2, ... address the further portals (``listen`` given as a list)."""
        auth = f"{quote(user, safe='')}%{quote(secret or '', safe='')}@" if user else ""
        address, port = (self.host, self.port) if portal == 0 else self.more_portals[portal - 1]
        host = f"[{address}]" if ":" in address else address
        url = f"iscsi://{auth}{host}:{port}/{self.iqn}/{lun}"
        if target_user:
            url += f"?target_user={quote(target_user, safe='')}&target_password={quote(target_secret or '', safe='')}"
        return url

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def shoal_command() -> list[str]:
    return [sys.executable, "-m", "node_agent.cli"]


@contextlib.contextmanager
def running_shoal_target(tmp_path: Path, luns=(("disk0", 64 * 2**20),), *, iqn: str = DEFAULT_IQN,
                         chap: tuple[str, str] | None = None, mutual_chap: tuple[str, str] | None = None,
                         allow: list[str] | None = None, netns: str | None = None,
                         listen: str | list[str] = "127.0.0.1:0", extra_args: list[str] | None = None,
                         timeout: float = 20.0, command: list[str] | None = None):
    """Start ``shoal target`` serving ``luns`` and yield a ``ShoalTarget``.

    ``luns`` are (name or path, size) pairs, or (name or path, size, options) with options such
    as ``"ro"`` or ``"atomic"`` (``--lun PATH:SIZE:OPTION``).  ``listen`` may list several
    addresses: one portal group reached through each (multipath).  ``command`` replaces the
    ``python -m node_agent.cli`` prefix (``slow_target.slow_command``: LUNs on a slow test device)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    port_file = tmp_path / f"shoal-target-{os.getpid()}-{time.monotonic_ns()}.port"
    log_path = port_file.with_suffix(".log")
    lun_paths = []
    listens = [listen] if isinstance(listen, str) else list(listen)
    args = (command or shoal_command()) + ["target", "--iqn", iqn, "--port-file", str(port_file)]
    for address in listens:
        args += ["--listen", address]
    for name, size, *options in luns:
        path = Path(name) if os.path.isabs(str(name)) else tmp_path / f"{name}.img"
        lun_paths.append(path)
        if "ro" in options and size and not path.exists():
            with open(path, "wb") as handle:  # the target never creates (nor grows) a read-only LUN's file
                handle.truncate(size)
        args += ["--lun", ":".join([str(path)] + ([str(size)] if size else []) + list(options))]
    if chap:
        args += ["--chap", f"{chap[0]}:{chap[1]}"]
    if mutual_chap:
        args += ["--mutual-chap", f"{mutual_chap[0]}:{mutual_chap[1]}"]
    for name in allow or []:
        args += ["--allow", name]
    host = listens[0].rpartition(":")[0].strip("[]")
    if not chap and host not in ("127.0.0.1", "::1", "localhost"):
        args.append("--allow-anonymous")  # tests that serve a namespace address without CHAP say so
    args += extra_args or []
    if netns:
        args = ["ip", "netns", "exec", netns] + args
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if process.poll() is not None:
                raise RuntimeError(f"shoal target exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"shoal target did not listen within {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.02)
        # HOST:PORT per line, an IPv6 host in brackets ([::1]:PORT): kept bare here (``url()`` brackets it)
        addresses = [(h.strip("[]"), _, p) for h, _, p in (line.rpartition(":")
                                                            for line in port_file.read_text().split())]
        (host, _, port), more = addresses[0], [(h, int(p)) for h, _, p in addresses[1:]]
        yield ShoalTarget(host, int(port), iqn, process.pid, lun_paths, process, log_path, more)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: every process a test starts is stopped by its PID."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(5)
    return process.returncode
