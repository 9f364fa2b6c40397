"""deploy/systemd/shoal-target@.service: its sandbox, read from the file and then run by real systemd.

The file's directives are checked first (what the target is confined to, and what it must keep: block devices
as LUNs, its one capability, RestartPreventExitStatus=2), then ``systemd-analyze security --offline`` scores it.

``test_the_unit_serves_in_its_sandbox`` then runs the unit itself, unchanged, under Debian's systemd as PID 1 of
fresh pid/mount/network/uts/ipc/cgroup namespaces (this machine's PID 1 is not systemd): ``/usr/local/bin/shoal``
there runs the distribution's ``/usr/bin/python3.X`` over this checkout and the test interpreter's
site-packages (the venv's own Python may live under /root, which ProtectHome= hides, as the unit's header says).
The drop-in it adds changes no sandbox setting: DefaultDependencies=no (no sysinit.target to boot) and the
target's output into a file (no journald). The root file system, /proc/sys and /sys are read-only in those
namespaces and /etc is an overlay, so nothing of the host is written; systemd's cgroups live under one cgroup
made for the test and removed after it. Each target instance is stopped by ``systemctl stop``, and systemd, the
namespaces' PID 1, is killed by its PID at the end (which ends every process of the namespaces).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "shoal-target@.service"


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}`` of a unit file (comments and blank lines skipped)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a setting: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service_settings() -> dict[str, str]:
    settings = unit_sections(UNIT.read_text())["Service"]
    keys = [key for key, _ in settings]
    assert len(keys) == len(set(keys)), f"a setting given twice: {keys}"
    return dict(settings)


# -- the file ----------------------------------------------------------------------------------------------------
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "ProtectSystem": "strict",
    "ReadWritePaths": "-/srv/shoal",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "LimitNOFILE": "65536",
    "RuntimeDirectory": "shoal-target-%i",
    "KillMode": "mixed",
}


def test_unit_is_sandboxed():
    settings = service_settings()
    for key, value in HARDENING.items():
        assert settings.get(key) == value, f"{key}={settings.get(key)!r}, expected {value!r}"


def test_unit_keeps_what_the_target_needs():
    """A LUN may be a block device (node_agent/storage/backing.py): nothing may hide /dev or close the device
    list. Runs as root (no User=): the CHAP file and LUN files are root's 0600 files. Usage errors (exit 2) are
    not restarted."""
    settings = service_settings()
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "User", "DynamicUser", "PrivateUsers"):
        assert key not in settings, key
    assert settings["RestartPreventExitStatus"] == "2"
    assert settings["Restart"] == "on-failure"
    assert settings["ExecStart"] == "/usr/local/bin/shoal target $SHOAL_TARGET_ARGS"
    assert settings["EnvironmentFile"] == "/etc/shoal/target-%i.env"
    assert all(path.startswith("-") for path in settings["ReadWritePaths"].split())


def test_unit_security_exposure():
    """``systemd-analyze security --offline``: 9.0 "UNSAFE" before the sandbox settings, 3.7 "OK" with them."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)], capture_output=True,
                            text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if found is None and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 4.5, result.stdout


# -- the unit under systemd --------------------------------------------------------------------------------------
SYSTEMD = next((p for p in (Path("/lib/systemd/systemd"), Path("/usr/lib/systemd/systemd")) if p.exists()), None)
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")

# In the new namespaces, before systemd: $1 the cgroup to enter, $2 staged files, $3 site-packages, $4 the
# checkout, $5 systemd. The host's mounts are only covered (private propagation), never changed.
BOOT = r"""
set -eu
echo $$ > "$1/cgroup.procs"
mount -o remount,bind,ro /
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
umount -l /sys/fs/cgroup 2>/dev/null || true
mount -o remount,bind,ro /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/test/stage /run/test/etc-up /run/test/etc-work /run/systemd/system
mount --bind "$2" /run/test/stage
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/test/etc-up,workdir=/run/test/etc-work /etc
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
mount -t tmpfs -o mode=0755 tmpfs /opt
mkdir -p /opt/shoal/site /opt/shoal/src
mount --bind "$3" /opt/shoal/site
mount --bind "$4" /opt/shoal/src
mount -t tmpfs -o mode=0755 tmpfs /usr/local/bin
mount -t tmpfs -o mode=0755 tmpfs /srv
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=1777 tmpfs /tmp
cp -R /run/test/stage/etc/. /etc/
cp -R /run/test/stage/run/. /run/systemd/system/
cp /run/test/stage/shoal /usr/local/bin/shoal && chmod 0755 /usr/local/bin/shoal
chmod 0600 /etc/shoal/chap-vol1
install -d -m 0750 /srv/shoal
exec unshare --cgroup env -i container=shoal-test PATH=/usr/sbin:/usr/bin:/sbin:/bin "$5" --system \
    --unit=shoal-test.target --log-target=console --log-level=notice --show-status=no \
    systemd.unified_cgroup_hierarchy=1
"""

# The console script, as `pip install` makes it, for the distribution's Python over this checkout.
WRAPPER = """#!{python}
import os, sys
os.environ["PYTHONPATH"] = "/opt/shoal/src:/opt/shoal/site"  # --workers start `python -m node_agent.target_workers`
sys.path[:0] = ["/opt/shoal/src", "/opt/shoal/site"]
from node_agent.cli import main
raise SystemExit(main())
"""

DROP_IN = """[Unit]
DefaultDependencies=no
[Service]
StandardOutput=append:/run/shoal-test.log
StandardError=inherit
"""


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            mine = next((l[3:] for l in Path("/proc/self/cgroup").read_text().splitlines() if l.startswith("0::")),
                        None)
            if mine is None:
                return None
            return Path(fields[4] + mine)
    return None


def _remove_cgroup(path: Path) -> None:
    deadline = time.monotonic() + 30
    while path.exists():
        for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                child.rmdir()
            except OSError:
                pass
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Sandbox:
    """systemd as PID 1 of new namespaces; ``systemctl`` and the portals are reached with nsenter."""

    def __init__(self, work: Path):
        self.work = work
        self.process: subprocess.Popen | None = None
        self.cgroup: Path | None = None
        self.pid1 = 0
        self.log = work / "systemd.log"

    def start(self, chap: str) -> None:
        root = _cgroup2_root()
        if root is None:
            pytest.skip("no cgroup2 hierarchy here")
        self.cgroup = root / f"shoal-unit-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.cgroup.mkdir()
        stage = self.work / "stage"
        (stage / "etc" / "systemd" / "system").mkdir(parents=True)
        (stage / "etc" / "shoal").mkdir()
        shutil.copy(UNIT, stage / "etc" / "systemd" / "system" / UNIT.name)  # the unit as it is
        (stage / "etc" / "shoal" / "chap-vol1").write_text(f"{chap}\n")
        (stage / "run" / f"{UNIT.name}.d").mkdir(parents=True)
        (stage / "run" / f"{UNIT.name}.d" / "test.conf").write_text(DROP_IN)
        (stage / "run" / "shoal-test.target").write_text("[Unit]\nDescription=Shoal unit test\n")
        (stage / "shoal").write_text(WRAPPER.format(python=SYSTEM_PYTHON))
        site = sysconfig.get_paths()["purelib"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--fork", "--pid", "--mount", "--net", "--uts", "--ipc", "--mount-proc",
                 "--propagation", "private", "/bin/sh", "-c", BOOT, "sh", str(self.cgroup), str(stage), site,
                 str(REPO), str(SYSTEMD)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.pid1:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            try:
                found = children.read_text().split()
            except OSError:
                found = []
            if found and Path(f"/proc/{found[0]}/exe").resolve() == SYSTEMD.resolve():
                self.pid1 = int(found[0])
            elif self.process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd did not start in namespaces here: {self.log.read_text()[-2000:]}")
            else:
                time.sleep(0.05)
        while not self.path("/run/systemd/private").exists():  # its bus socket, for systemctl
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd did not start in namespaces here: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        state = self.systemctl("is-system-running", "--wait", check=False, timeout=60)
        if state.stdout.strip() not in ("running", "degraded"):
            pytest.skip(f"systemd did not boot in namespaces here ({state.stdout.strip()}, {state.stderr.strip()}):"
                        f" {self.log.read_text()[-2000:]}")

    def enter(self, *command: str, net_only: bool = False, check: bool = True, timeout: float = 60,
              **kw) -> subprocess.CompletedProcess:
        spaces = ["-n"] if net_only else ["-m", "-p", "-n"]
        return subprocess.run(["nsenter", "-t", str(self.pid1), *spaces, "--", *command], capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.enter("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def path(self, inside: str) -> Path:
        """A path of the namespaces' file system, from here."""
        return Path(f"/proc/{self.pid1}/root{inside}")

    def write_env(self, instance: str, args: str) -> None:
        self.path(f"/etc/shoal/target-{instance}.env").write_text(f'SHOAL_TARGET_ARGS="{args}"\n')

    def output(self) -> str:
        try:
            return self.path("/run/shoal-test.log").read_text()
        except FileNotFoundError:
            return ""

    def host_pids(self, unit: str) -> list[int]:
        """The unit's processes, as PIDs of this (the host's) PID namespace."""
        assert self.cgroup is not None
        escaped = unit.split("@")[0].replace("-", "\\x2d")
        procs = self.cgroup / "system.slice" / f"system-{escaped}.slice" / unit / "cgroup.procs"
        return [int(pid) for pid in procs.read_text().split()]

    def start_target(self, instance: str, port_file: str, timeout: float = 30) -> None:
        self.systemctl("start", f"shoal-target@{instance}.service")
        deadline = time.monotonic() + timeout
        while not self.path(port_file).exists():
            state = self.show(f"shoal-target@{instance}.service", "ActiveState")
            assert state in ("active", "activating"), f"{instance}: {state}\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{instance}: no port file\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)  # PID 1 of the namespaces: every process in them ends
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.cgroup is not None and self.cgroup.exists():
            _remove_cgroup(self.cgroup)


@pytest.fixture
def sandbox(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts, cgroups)")
    missing = [tool for tool in ("unshare", "nsenter", "losetup") if shutil.which(tool) is None]
    if missing or SYSTEMD is None:
        pytest.skip(f"needs {', '.join(missing or ['systemd'])}")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"needs {SYSTEM_PYTHON}, the Python a system install of shoal runs with")
    box = Sandbox(tmp_path)
    try:
        yield box
    finally:
        box.stop()


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def _mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as process ``pid`` sees them (the last mount on a point wins)."""
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        found[fields[4]] = set(fields[5].split(","))
    return found


def _iscsi(box: Sandbox, action: str, url: str, lba: int, data: Path, out: Path | None = None) -> None:
    """``shoal iscsi write|read`` (our initiator) in the namespaces' network, against the target there."""
    if action == "write":
        args = ["--in", str(data), "--fua"]
    else:
        args = ["--blocks", str(data.stat().st_size // 512), "--out", str(out)]
    box.enter(sys.executable, "-m", "node_agent.cli", "iscsi", action, "--lba", str(lba), *args, url,
              net_only=True, cwd=str(REPO))


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_unit_serves_in_its_sandbox(sandbox, tmp_path):
    chap = f"alice:{secrets.token_hex(8)}"
    sandbox.start(chap)
    user, secret = chap.split(":")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(4096))

    # 1. The header's example: a file LUN under /srv/shoal, CHAP from a 0600 file, a port file in its runtime dir.
    sandbox.write_env("vol1", "--listen 127.0.0.1:3260 --iqn iqn.2026-11.com.example:vol1 --lun "
                              "/srv/shoal/vol1.img:16M --chap @/etc/shoal/chap-vol1 "
                              "--port-file /run/shoal-target-vol1/port")
    sandbox.start_target("vol1", "/run/shoal-target-vol1/port")
    url = f"iscsi://{user}%{secret}@127.0.0.1:3260/iqn.2026-11.com.example:vol1/0"
    _iscsi(sandbox, "write", url, 8, data)
    _iscsi(sandbox, "read", url, 8, data, out=tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data.read_bytes()
    with open(sandbox.path("/srv/shoal/vol1.img"), "rb") as lun:
        lun.seek(8 * 512)
        assert lun.read(4096) == data.read_bytes()
    # What it runs with: one capability, no new privileges, seccomp filters, its umask and file limit.
    [pid] = sandbox.host_pids("shoal-target@vol1.service")
    status = _status(pid)
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    assert status["Seccomp"].strip() == "2"  # filters: address families, W+X memory, personality, ...
    assert status["Umask"].strip() == "0077"
    assert sandbox.path("/run/shoal-target-vol1/port").stat().st_mode & 0o777 == 0o600
    assert sandbox.path("/srv/shoal/vol1.img").stat().st_mode & 0o777 == 0o600
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))
    assert soft > 1024, limits  # systemd's default soft limit is 1024; the unit asks 65536 (capped by the hard)
    # What it sees: / read-only, /srv/shoal and its runtime dir writable, no /root, /home or shared /tmp.
    mounts = _mounts(pid)
    assert "ro" in mounts["/"] and "rw" in mounts["/srv/shoal"], mounts
    assert "rw" in mounts["/run/shoal-target-vol1"] and "ro" in mounts["/etc"], mounts
    for hidden in ("/root", "/home"):
        assert not os.listdir(f"/proc/{pid}/root{hidden}"), hidden
    assert "/tmp" in mounts and "/var/tmp" in mounts
    sandbox.systemctl("stop", "shoal-target@vol1.service")
    assert sandbox.show("shoal-target@vol1.service", "Result") == "success"
    assert "INFO shoal.target: stopped: sessions closed, data synced" in sandbox.output()

    # 2. A block device as the LUN: the unit hides and denies no device.
    backing = tmp_path / "device.img"
    backing.write_bytes(bytes(8 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                          timeout=30, check=False)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        sandbox.write_env("blk", f"--listen 127.0.0.1:3261 --iqn iqn.2026-11.com.example:blk --lun {device} "
                                 "--allow-anonymous --port-file /run/shoal-target-blk/port")
        sandbox.start_target("blk", "/run/shoal-target-blk/port")
        _iscsi(sandbox, "write", "iscsi://127.0.0.1:3261/iqn.2026-11.com.example:blk/0", 0, data)
        sandbox.systemctl("stop", "shoal-target@blk.service")
        assert sandbox.show("shoal-target@blk.service", "Result") == "success"
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30, check=False)
    with open(backing, "rb") as written:
        assert written.read(4096) == data.read_bytes()

    # 3. --workers: a stop goes to the main process, which stops its workers (each syncs its LUNs) and waits.
    sandbox.write_env("w", "--listen 127.0.0.1:3262 --workers 2 --iqn iqn.2026-11.com.example:w1 "
                           "--lun /srv/shoal/w1.img:4M --iqn iqn.2026-11.com.example:w2 --lun /srv/shoal/w2.img:4M "
                           "--allow-anonymous --port-file /run/shoal-target-w/port")
    for _ in range(3):
        before = len(sandbox.output())
        sandbox.start_target("w", "/run/shoal-target-w/port")
        assert len(sandbox.host_pids("shoal-target@w.service")) == 3
        sandbox.systemctl("stop", "shoal-target@w.service")
        this_run = sandbox.output()[before:]
        assert sandbox.show("shoal-target@w.service", "Result") == "success", this_run
        for worker in (0, 1):
            assert f"worker {worker} stopped: sessions closed, data synced" in this_run, this_run
        assert "exited with status" not in this_run, this_run

    # 4. A usage error (exit 2) is not restarted: the same arguments would fail again.
    sandbox.write_env("bad", "--listen 127.0.0.1 --lun /srv/shoal/bad.img:1M --allow-anonymous")
    sandbox.systemctl("start", "shoal-target@bad.service")
    deadline = time.monotonic() + 30
    while sandbox.show("shoal-target@bad.service", "ActiveState") != "failed":
        assert time.monotonic() < deadline, sandbox.output()[-2000:]
        time.sleep(0.1)
    time.sleep(1.0)  # RestartSec (100 ms) over: a restart would show by now
    assert sandbox.show("shoal-target@bad.service", "ExecMainStatus") == "2"
    assert sandbox.show("shoal-target@bad.service", "NRestarts") == "0"
    assert sandbox.show("shoal-target@bad.service", "ActiveState") == "failed"
