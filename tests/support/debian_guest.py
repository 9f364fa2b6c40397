"""A Debian guest with Python and open-iscsi, to run Shoal's kernel connector for real.

The host kernel has no ``iscsi_tcp``, so ``node_agent.host.kernel`` runs inside
a QEMU (TCG) guest booted from a Debian root filesystem:

1. :func:`ensure_debian_guest` builds, once, ``debootstrap --variant=minbase``
   of bookworm with python3, open-iscsi, e2fsprogs, util-linux, kmod, iproute2
   and udev, adds the kernel modules the guest needs (from the kernel package
   ``tests/support/kernel_guest.py`` downloads; its functions fetch and resolve
   them), and writes it as an ext4 image.  Beside it: the kernel (ELF vmlinux)
   and a busybox stage-1 initramfs that loads virtio_blk and ext4 and
   ``switch_root``\\ s.  Everything is cached under ``.cache/debian-guest/KEY``
   in the repository, KEY a hash of the recipe and the kernel package, built
   under a file lock.
2. :func:`run_connector_guest` builds a small second disk per run (read-only in
   the guest) holding the repository's ``node_agent`` package as it is now, a
   driver script, the stage-2 init and the run's parameters, so the cached
   root filesystem never changes; the root disk is attached with
   ``snapshot=on``.  The stage-2 init (a shell script as PID 1) starts
   ``systemd-udevd --daemon`` (no coldplug: it still makes the by-path links),
   loads virtio_net/iscsi_tcp/sd_mod, sets 10.99.0.2/24 and runs the driver
   with ``python3 -m``.  The driver starts ``iscsid`` in its own session,
   drives ``KernelConnector`` and prints ``SHOAL-RESULT key=value`` lines on the
   serial console, then powers off with reboot(2).

The guest's /etc/iscsi/initiatorname.iscsi holds a name of its own
(``GUEST_HOST_INITIATOR``), never the agent's: the connector must present the
agent's name (``params["initiator"]``) through its own iface record, as on a
real host, and the driver fails the run when the session shows another name.

Every process started here is stopped by PID, also on failure.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support import kernel_guest
from tests.support.kernel_guest import (
    CpioWriter,
    GuestImage,
    GuestNetwork,
    _download_kernel,
    _locked,
    _module_name,
    _read_module,
    _stop,
    _write_kernel,
    kernel_package,
    parse_results,
    resolve_modules,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "debian-guest"
#: The guest host's own initiator name (/etc/iscsi/initiatorname.iscsi, what open-iscsi's ``default`` iface
#: presents): a Debian-style name, not the agent's, so a session that shows it reveals the connector ignored
#: the agent's name.
GUEST_HOST_INITIATOR = "iqn.1993-08.org.debian:01:5a1e0fb2c3d4"

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-wheel-whl", "open-iscsi", "e2fsprogs", "util-linux", "kmod",
            "iproute2", "udev")
IMAGE_SIZE = "2G"
#: Loaded by stage 1 to reach the root disk (dependencies resolved from .modinfo).
STAGE1_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: Copied into the root filesystem with ``depmod``, for ``modprobe`` in stage 2.
ROOTFS_MODULES = STAGE1_MODULES + ("virtio_net", "crct10dif_generic", "iscsi_tcp", "sd_mod")

#: iscsid.conf of the guest: iscsid is started by the driver, logins fail fast.
#: ``node.session.scan`` stays ``auto``: the connector must set ``manual`` itself.
ISCSID_CONF = """\
# Written by tests/support/debian_guest.py for a throwaway guest.
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
node.session.nr_sessions = 1
node.session.scan = auto
"""

STAGE1_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() { echo "SHOAL-RESULT stage1=fail $1"; echo "SHOAL-RESULT result=fail step=stage1"; poweroff -f; sleep 5; }
for m in $(cat /etc/shoal-modules); do insmod /lib/modules/$m.ko || die "insmod $m"; done
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1)); [ $i -lt 200 ] || die "no /dev/vda or /dev/vdb"; usleep 50000
done
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || die "mount root"
mkdir -p /newroot/shoal
mount -t ext4 -o ro /dev/vdb /newroot/shoal || die "mount share"
mount --move /dev /newroot/dev
umount /proc /sys
echo "SHOAL-RESULT stage1=ok"
exec switch_root /newroot /bin/sh /shoal/init.sh
"""

#: Stage 2: PID 1 of the Debian root (lives on the per-run share disk).
STAGE2_INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock/iscsi /run/udev
hostname shoal-guest
read up rest < /proc/uptime; echo "SHOAL-RESULT t_stage2=$up"
/lib/systemd/systemd-udevd --daemon > /dev/null 2>&1 || echo "SHOAL-RESULT udevd=fail"
for m in virtio_net iscsi_tcp sd_mod; do modprobe $m || echo "SHOAL-RESULT modprobe_$m=fail"; done
IF=
for d in /sys/class/net/*; do n=${d##*/}; [ "$n" = lo ] || { IF=$n; break; }; done
ip link set lo up
ip link set "$IF" up
ip addr add 10.99.0.2/24 dev "$IF"
PYTHONPATH=/shoal python3 -m shoal_guest_driver /shoal/params.json
echo "SHOAL-RESULT driver_exit=$?"
sync
python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321FEDC)'
"""

#: Runs inside the guest; only the standard library and ``node_agent``.
GUEST_DRIVER = r'''
"""Drive node_agent.host.kernel.KernelConnector in the guest; print SHOAL-RESULT lines."""
import ctypes
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import traceback

from node_agent.host.connector import IdentityMismatch, VolumeTarget
from node_agent.host.kernel import KernelConnector, KernelSettings, by_path_name, parse_sessions
from node_agent.host.runner import SubprocessRunner

T0 = time.monotonic()


def say(key, value):
    print(f"SHOAL-RESULT {key}={value}", flush=True)


def show(tag, text):
    for line in str(text).splitlines():
        print(f"SHOAL-LOG {tag}: {line}", flush=True)


def stamp(key):
    say(f"t_{key}", f"{time.monotonic() - T0:.2f}")


def sessions():
    out = subprocess.run(["iscsiadm", "-m", "session", "-P", "3"], capture_output=True, text=True)
    return out.stdout, parse_sessions(out.stdout)


def disks():
    return sorted(d for d in os.listdir("/sys/block") if d.startswith("sd")) or ["none"]


def start_iscsid(host_initiator):
    # The host's own name, not the agent's: the connector's iface must carry the agent's.
    with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
        f.write(f"InitiatorName={host_initiator}\n")
    # iscsid killpg()s its own process group on SIGTERM: its own session.
    log = open("/tmp/iscsid.log", "wb")
    subprocess.Popen(["iscsid", "-f"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        with open("/proc/net/unix") as f:
            if "ISCSIADM_ABSTRACT_NAMESPACE" in f.read():
                return
        time.sleep(0.1)
    raise RuntimeError("iscsid did not open its control socket")


def wait_for_portal(portal, timeout=20.0):
    host, _, port = portal.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


def field(text, name):
    """The value of the first ``name: value`` or ``name = value`` line of iscsiadm output."""
    for line in text.splitlines():
        for sep in (": ", " = "):
            key, found, value = line.strip().partition(sep)
            if found and key == name:
                return value.strip()
    return "?"


def scenario(p):
    if p["host_initiator"] == p["initiator"]:
        raise RuntimeError("the guest's initiatorname.iscsi must not hold the agent's name")
    start_iscsid(p["host_initiator"])
    stamp("iscsid")
    wait_for_portal(p["portal"])
    stamp("network")
    digests = {key: tuple(p[key]) for key in ("header_digest", "data_digest") if key in p}
    connector = KernelConnector(runner=SubprocessRunner(timeout=60),
                                settings=KernelSettings(device_timeout=30, initiator_iqn=p["initiator"], **digests))
    chap = tuple(p["chap"]) if p.get("chap") else None
    mutual = tuple(p["mutual_chap"]) if p.get("mutual_chap") else None
    target = VolumeTarget(portals=(p["portal"],), target_iqn=p["iqn"], lun=0, volume_id=p["volumes"][0]["id"],
                          expected_naa=p["volumes"][0]["naa"], expected_serial=p["volumes"][0]["serial"],
                          chap=chap, mutual_chap=mutual)
    other = dataclasses.replace(target, lun=1, volume_id=p["volumes"][1]["id"],
                                expected_naa=p["volumes"][1]["naa"], expected_serial=p["volumes"][1]["serial"])

    device = connector.attach(target)
    stamp("attach")
    say("device", device.path)
    say("device_naa", device.naa)
    say("device_serial", device.serial)
    link = os.path.join("/dev/disk/by-path", by_path_name(target.portals[0], target))
    say("by_path", os.path.realpath(link) if os.path.exists(link) else "missing")
    text, found = sessions()
    show("session-P3", text)
    say("session_iface", field(text, "Iface Name"))
    say("session_initiator", field(text, "Iface Initiatorname"))
    if field(text, "Iface Initiatorname") != p["initiator"]:
        raise RuntimeError(f"the session presents {field(text, 'Iface Initiatorname')}, not the agent's "
                           f"{p['initiator']}")
    record = subprocess.run(["iscsiadm", "-m", "iface", "-I", connector.settings.iface], capture_output=True,
                            text=True).stdout
    say("iface_initiatorname", field(record, "iface.initiatorname"))
    say("iface_transport", field(record, "iface.transport_name"))
    say("sessions_after_attach", len(found))
    say("luns_in_session", ",".join(str(x.lun) for s in found for x in s.luns))
    node = subprocess.run(["iscsiadm", "-m", "node", "-T", p["iqn"], "-p", p["portal"]],
                          capture_output=True, text=True).stdout
    say("node_scan", next((l.split("=", 1)[1].strip() for l in node.splitlines()
                           if l.startswith("node.session.scan")), "?"))
    say("node_authmethod", next((l.split("=", 1)[1].strip() for l in node.splitlines()
                                 if l.startswith("node.session.auth.authmethod")), "?"))
    for key in ("HeaderDigest", "DataDigest"):
        say(f"node_{key}", next((l.split("=", 1)[1].strip() for l in node.splitlines()
                                 if l.startswith(f"node.conn[0].iscsi.{key}")), "?"))

    again = connector.attach(target)
    say("reattach_same", again.path == device.path)
    say("sessions_after_reattach", len(sessions()[1]))

    second = connector.attach(other)
    stamp("attach_lun1")
    say("lun1_device", second.path)
    say("sessions_with_two_luns", len(sessions()[1]))
    # An agent restarted while the kernel's sessions stayed trusts a recorded /dev/sdX only once a connector
    # it makes anew says it is the volume's (AttachmentManager.restore, ``_unverified``): its own disk, not
    # the other LUN's of the same session.
    restarted = KernelConnector(runner=SubprocessRunner(timeout=60), settings=connector.settings)
    say("restart_own_disk", restarted.foreign_device(target, device.path) or "ok")
    other_lun = restarted.foreign_device(target, second.path)
    show("restart-other-lun", other_lun)
    say("restart_other_luns_disk", "refused" if other_lun else "accepted")
    say("restart_not_a_disk", "refused" if restarted.foreign_device(target, "/dev/null") else "accepted")
    say("restart_reassigned", restarted.reassigned(target, device.path) or "ok")
    connector.detach(other)
    stamp("detach_lun1")
    say("sessions_after_lun1_detach", len(sessions()[1]))
    say("lun1_gone", not os.path.exists(f"/sys/block/{os.path.basename(second.path)}"))

    run(["mkfs.ext4", "-F", "-q", "-L", "shoal", device.path])
    stamp("mkfs")
    os.makedirs("/mnt", exist_ok=True)
    run(["mount", "-t", "ext4", device.path, "/mnt"])
    os.makedirs("/mnt/shoal", exist_ok=True)
    with open("/mnt/shoal/hello.txt", "w") as f:
        f.write(p["nonce"] + "\n")
        f.flush()
        os.fsync(f.fileno())
    run(["umount", "/mnt"])
    stamp("filesystem")
    say("filesystem", "ok")

    connector.detach(target)
    stamp("detach")
    say("device_gone", not os.path.exists(f"/sys/block/{os.path.basename(device.path)}"))
    # The session ended behind a restarted agent's back (a host reboot, ``iscsiadm --logoutall``): the
    # recorded /dev/sdX is not the volume's any more, and a logout asks nobody who uses it.
    stale = restarted.foreign_device(target, device.path)
    show("restart-stale", stale)
    say("restart_after_logout", "refused" if stale else "accepted")
    say("restart_after_logout_reassigned", "yes" if restarted.reassigned(target, device.path) else "no")
    say("sessions_after_detach", len(sessions()[1]))
    say("node_records_after_detach", subprocess.run(["iscsiadm", "-m", "node"], capture_output=True).returncode)
    connector.detach(target)
    say("detach_again", "ok")
    # The hazard itself: another volume's disk now has the recorded name (the kernel hands out the lowest
    # free sdX, so LUN 1 attached now usually becomes the old /dev/sda of LUN 0).  This is also LUN 1 first
    # in a new session: Linux probes it with the SCSI-2 LUN field set in INQUIRY's byte 1.
    reused = connector.attach(other)
    stamp("attach_lun1_first")
    say("lun1_first_device", reused.path)
    say("reuse_same_name", reused.path == device.path)
    say("restart_reused_name", "refused" if restarted.foreign_device(target, device.path) else "accepted")
    say("restart_reused_name_reassigned", "yes" if restarted.reassigned(target, device.path) else "no")
    connector.detach(other)

    wrong = dataclasses.replace(target, expected_naa=p["wrong_naa"])
    try:
        handed = connector.attach(wrong)
    except IdentityMismatch as exc:
        say("wrong_naa", "refused")
        show("mismatch", exc)
    else:
        say("wrong_naa", f"handed-out:{handed.path}")
    stamp("mismatch")
    say("disks_after_refusal", ",".join(disks()))
    say("sessions_after_refusal", len(sessions()[1]))


def main():
    with open(sys.argv[1]) as f:
        params = json.load(f)
    try:
        scenario(params)
        say("result", "ok")
    except BaseException as exc:  # report every failure on the console, then power off
        show("traceback", traceback.format_exc())
        with open("/tmp/iscsid.log", errors="replace") as f:
            show("iscsid", f.read()[-3000:])
        show("dmesg", subprocess.run(["dmesg"], capture_output=True, text=True).stdout[-4000:])
        say("result", f"fail {type(exc).__name__}")
    finally:
        stamp("end")
        os.sync()
        ctypes.CDLL(None, use_errno=True).reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF


main()
'''


class DebianGuestError(RuntimeError):
    """The Debian guest could not be built or run."""


@dataclasses.dataclass(frozen=True)
class DebianGuest:
    """A cached bootable Debian guest."""

    version: str
    kernel: Path
    initramfs: Path
    rootfs: Path
    build_seconds: float = 0.0

    def as_guest_image(self) -> GuestImage:
        return GuestImage(self.version, self.kernel, self.initramfs)


def cache_root() -> Path:
    return Path(os.environ.get("SHOAL_DEBIAN_GUEST_CACHE", str(DEFAULT_CACHE)))


def missing_requirements() -> list[str]:
    """Why the guest cannot run here; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (debootstrap, network namespaces, tap devices)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun is missing")
    for tool in ("qemu-system-x86_64", "ip", "debootstrap", "mkfs.ext4", "debugfs", "e2fsck", "depmod",
                 "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is not installed")
    if not os.access(kernel_guest.BUSYBOX, os.X_OK):
        missing.append(f"{kernel_guest.BUSYBOX} is not installed")
    return missing


def recipe_key(package: str) -> str:
    """Hash of everything that goes into the cached image (not the per-run share disk)."""
    recipe = {
        "format": 1, "suite": SUITE, "packages": PACKAGES, "size": IMAGE_SIZE, "kernel": package,
        "stage1_modules": STAGE1_MODULES, "rootfs_modules": ROOTFS_MODULES, "iscsid_conf": ISCSID_CONF,
        "stage1_init": STAGE1_INIT, "busybox": os.stat(kernel_guest.BUSYBOX).st_size,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise DebianGuestError(f"{' '.join(argv)} exited {exc.returncode}:\n{exc.stdout[-3000:]}"
                               f"{exc.stderr[-3000:]}") from None


def _install_modules(kroot: Path, root: Path, version: str) -> None:
    source = kroot / "lib" / "modules" / version
    dest = root / "lib" / "modules" / version
    for path in resolve_modules(source, ROOTFS_MODULES):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
    _run(["depmod", "-b", str(root), version])


def _configure_root(root: Path) -> None:
    (root / "etc" / "iscsi" / "iscsid.conf").write_text(ISCSID_CONF)
    (root / "etc" / "hostname").write_text("shoal-guest\n")
    (root / "shoal").mkdir(exist_ok=True)
    (root / "mnt").mkdir(exist_ok=True)


def _stage1_initramfs(kroot: Path, version: str) -> bytes:
    modules = resolve_modules(kroot / "lib" / "modules" / version, STAGE1_MODULES)
    names = [_module_name(p) for p in modules]
    cpio = CpioWriter()
    for directory in ("dev", "proc", "sys", "bin", "newroot"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("init", STAGE1_INIT.encode(), 0o755)
    cpio.file("bin/busybox", Path(kernel_guest.BUSYBOX).read_bytes(), 0o755)
    for name, path in zip(names, modules):
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    cpio.file("etc/shoal-modules", ("\n".join(names) + "\n").encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def _build(image_dir: Path, package: str, cache: Path, log: Path) -> None:
    version = package.removeprefix("linux-image-")
    deb = _download_kernel(package, kernel_guest.cache_root() / "debs")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_path = Path(tmp)
        kroot, root, staging = tmp_path / "kernel", tmp_path / "root", tmp_path / "image"
        staging.mkdir()
        _run(["dpkg-deb", "-x", str(deb), str(kroot)])
        with open(log, "w") as out:
            proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                                   str(root)], stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise DebianGuestError(f"debootstrap exited {proc.returncode}; see {log}")
        _install_modules(kroot, root, version)
        _configure_root(root)
        _run(["mkfs.ext4", "-q", "-F", "-L", "shoal-root", "-d", str(root), "-E", "root_owner=0:0",
              str(staging / "rootfs.ext4"), IMAGE_SIZE])
        _write_kernel(kroot / "boot" / f"vmlinuz-{version}", staging / "kernel")
        (staging / "initramfs.cpio.gz").write_bytes(_stage1_initramfs(kroot, version))
        (staging / "version").write_text(version + "\n")
        os.replace(staging, image_dir)


def ensure_debian_guest(cache: Path | None = None) -> DebianGuest:
    """Build the guest (about 2 minutes, once) or take it from the cache."""
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        package = kernel_package(kernel_guest.cache_root())
    except (subprocess.CalledProcessError, kernel_guest.GuestError, FileNotFoundError):
        package = None
    if package is None:  # no apt lists: any complete cached image will do
        cached = sorted((d for d in cache.iterdir() if (d / "version").exists()), key=lambda d: d.stat().st_mtime)
        if not cached:
            raise DebianGuestError("cannot resolve the kernel package (apt-cache failed) and nothing is cached")
        return _guest(cached[-1])
    image_dir = cache / recipe_key(package)
    if (image_dir / "version").exists():
        return _guest(image_dir)
    with _locked(cache):
        if (image_dir / "version").exists():
            return _guest(image_dir)
        start = time.monotonic()
        _build(image_dir, package, cache, cache / "debootstrap.log")
        _prune(cache, keep=image_dir)
        return dataclasses.replace(_guest(image_dir), build_seconds=time.monotonic() - start)


def _prune(cache: Path, keep: Path, spare: int = 1) -> None:
    """Drop all but the newest ``spare`` images besides ``keep`` (each root image holds ~350 MB)."""
    others = sorted((d for d in cache.iterdir() if d.is_dir() and d != keep and (d / "version").exists()),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in others[spare:]:
        shutil.rmtree(old, ignore_errors=True)


def _guest(image_dir: Path) -> DebianGuest:
    return DebianGuest((image_dir / "version").read_text().strip(), image_dir / "kernel",
                       image_dir / "initramfs.cpio.gz", image_dir / "rootfs.ext4")


# --------------------------------------------------------------------------- one run

@dataclasses.dataclass(frozen=True)
class GuestRun:
    results: Mapping[str, str]
    serial_log: str
    elapsed: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.results.get("result") == "ok" and not self.timed_out

    def excerpt(self, lines: int = 120) -> str:
        return "\n".join(self.serial_log.splitlines()[-lines:])


def _share_disk(workdir: Path, params: Mapping) -> Path:
    share = workdir / "share"
    shutil.copytree(REPO / "node_agent", share / "node_agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (share / "shoal_guest_driver.py").write_text(GUEST_DRIVER)
    (share / "init.sh").write_text(STAGE2_INIT)
    (share / "init.sh").chmod(0o755)
    (share / "params.json").write_text(json.dumps(params))
    (share / "params.json").chmod(0o600)
    image = workdir / "share.ext4"
    _run(["mkfs.ext4", "-q", "-F", "-L", "shoal-share", "-d", str(share), "-E", "root_owner=0:0", str(image), "32M"])
    return image


def run_connector_guest(guest: DebianGuest, network: GuestNetwork, params: Mapping, workdir: Path, *,
                        timeout: float = 150.0, memory_mib: int = 1024) -> GuestRun:
    """Boot the guest once with ``params`` for the driver; return what it printed.

    ``params["host_initiator"]`` (default ``GUEST_HOST_INITIATOR``) goes into the guest's
    /etc/iscsi/initiatorname.iscsi; the agent's name is ``params["initiator"]``."""
    share = _share_disk(workdir, {"host_initiator": GUEST_HOST_INITIATOR, **params})
    argv = kernel_guest.qemu_argv(guest.as_guest_image(), network,
                                  "console=ttyS0 quiet panic=-1 mitigations=off", memory_mib=memory_mib)
    argv += ["-drive", f"file={guest.rootfs},if=virtio,format=raw,snapshot=on",
             "-drive", f"file={share},if=virtio,format=raw,readonly=on"]
    log_path = workdir / "serial.log"
    start = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(network.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop(proc)
    serial = log_path.read_bytes().decode(errors="replace")
    return GuestRun(parse_results(serial), serial, time.monotonic() - start, timed_out)
