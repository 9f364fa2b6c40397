"""Issue 8: a QEMU guest on a Shoal volume, live migration between hosts, and fencing of a failed host.

Hosts A, B and C are network namespaces on one bridge (``tests/support/vm_hosts.py``), each with its
own ``shoal agent``; the controller runs in A's. A pool of A's disk holds the volumes, so their data is
only ever in A's disk directory. The guest (``tests/support/vm_guest.py``) is Debian's kernel with a
busybox initramfs under QEMU (TCG), its only disk the volume through QEMU's ``iscsi`` block driver with
the arguments ``shoalctl volume connect --format qemu`` prints (CHAP secret in a 0600 file, passed as a
QEMU ``secret`` object). Its init writes numbered, checksummed 4 KiB records to consecutive blocks
without stopping; the test reads them back from A's backing file on the host.

- Live migration: the guest runs on B; the volume is connected to C too (``--shared``); a QEMU on C
  started with ``-incoming`` receives the guest over QMP (``qemu.qmp``); B is disconnected; every record
  before and after the migration verifies in order, none missing, and the guest saw no I/O error.
- Fencing: B's agent is frozen (SIGSTOP) while its guest writes; B is fenced (``shoalctl node fence``,
  and in a second test by the controller's ``--fence-grace``); a copy of A's backing file is taken when
  the fence is reported done; the volume goes to C and a fresh guest there continues after the last
  record; B's agent is resumed. No record of B's writer reaches the disk after the copy.
- No CHAP secret appears in any process's command line or in any log the test can read.

Real peers: QEMU (system emulator, iSCSI driver, migration, QMP), the Linux kernel's virtio-blk, busybox.
Every process is stopped by PID and the namespaces are deleted, also on failure. Mocks: none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import vm_guest, vm_hosts
from tests.support.vm_guest import VmGuest, check_records, read_records

pytestmark = [pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(420)]

_missing = vm_guest.missing_requirements()
if _missing:
    pytest.skip("VM tests cannot run: " + "; ".join(_missing), allow_module_level=True)

VOLUME_SIZE = "64MiB"
MIGRATION_PORT = 4444
#: Records the guest writes before each step (a TCG guest writes a few dozen a second).
STEP_RECORDS = 8
WAIT = 120.0
#: Seconds without a heartbeat before the controller fences a node by itself (the hosts' heartbeat timeout is 3 s).
FENCE_GRACE = 4
GRACE_SLACK = 40


@pytest.fixture(scope="module")
def image() -> vm_guest.GuestImage:
    image = vm_guest.ensure_vm_image()
    if image.build_seconds:
        print(f"\nVM guest {image.version} built in {image.build_seconds:.1f}s")
    return image


@contextlib.contextmanager
def hosts_with_pool(workdir: Path, controller_args: Sequence[str] = ()) -> Iterator[vm_hosts.Cluster]:
    """Hosts A, B, C, their agents and a controller; pool ``vm`` is A's disk."""
    with vm_hosts.vm_cluster(workdir, controller_args) as cluster:
        pool = cluster.ctl_json("pool", "create", "vm", "--member", "node-a/data0")
        assert pool["members"] == [{"node_id": "node-a", "disk": "data0"}]
        yield cluster


@pytest.fixture(scope="class")
def cluster(tmp_path_factory) -> Iterator[vm_hosts.Cluster]:
    with hosts_with_pool(tmp_path_factory.mktemp("vm-hosts")) as cluster:
        yield cluster


class Secrets:
    """The secret files the test was given; checks that no secret leaked anywhere the test can read."""

    def __init__(self) -> None:
        self.files: list[Path] = []

    def values(self) -> list[str]:
        return [p.read_text().strip() for p in self.files if p.exists()]

    def check(self, cluster: vm_hosts.Cluster, guests: list[VmGuest]) -> None:
        secrets = self.values()
        assert secrets and all(len(s) >= 12 for s in secrets)
        leaks = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue  # the process ended meanwhile
                leaks += [f"/proc/{proc.name}/cmdline" for s in secrets if s in cmdline]
        texts = dict(cluster.logs())
        texts["shoalctl output"] = "\n".join(cluster.outputs)
        for guest in guests:
            texts[f"{guest.name} qemu log"] = guest.qemu_log()
            texts[f"{guest.name} serial"] = guest.console().text
        leaks += [name for name, text in texts.items() for s in secrets if s in text]
        assert not leaks, f"a CHAP secret appears in: {sorted(set(leaks))}"


def create_volume(cluster: vm_hosts.Cluster, name: str) -> Path:
    """A volume in pool ``vm`` (on A); its backing file on A's disk."""
    volume = cluster.ctl_json("volume", "create", name, "--size", VOLUME_SIZE, "--pool", "vm")
    assert volume["owner_node"] == "node-a", volume
    backing = cluster.disk_dir("a") / "volumes" / f"{volume['id']}.img"
    assert backing.is_file(), sorted(cluster.disk_dir("a").rglob("*"))
    return backing


def connect(cluster: vm_hosts.Cluster, name: str, host: str, secrets: Secrets, workdir: Path,
            shared: bool = False) -> dict:
    """``shoalctl volume connect NAME --node node-HOST --format qemu``; checks what it printed and wrote."""
    secret_file = workdir / f"{name}-{host}.secret"
    args = ["volume", "connect", name, "--node", f"node-{host}", "--format", "qemu",
            "--secret-file", str(secret_file)]
    connection = cluster.ctl_json(*args, *(["--shared"] if shared else []))
    secrets.files.append(secret_file)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert secret and secret not in repr(connection)
    assert connection["node_name"] and connection["secret_file"] == str(secret_file)
    assert connection["portal"] == f"{cluster.hosts['a'].ip}:{vm_hosts.ISCSI_PORT}", connection
    assert connection["initiator_iqn"].endswith(f"node-{host}"), connection
    assert connection["url"].startswith("iscsi://"), connection
    assert f"file={secret_file}" in ",".join(connection["qemu_args"]), connection["qemu_args"]
    return connection


def data_stays_on_a(cluster: vm_hosts.Cluster, backing: Path) -> None:
    """The volume's data is in A's disk directory only: B and C hold no file named after it, nor any file
    of more than 1 MiB (the records the guests wrote went to A)."""
    volume_id = backing.stem
    for host in ("b", "c"):
        files = [p for p in (cluster.workdir / host).rglob("*") if p.is_file() and not p.is_symlink()]
        copies = [p for p in files if p.name.startswith(volume_id) and p.suffix not in (".json",)]
        large = [p for p in files if p.stat().st_size > 1 << 20]
        assert copies == [] and large == [], f"volume data on {host}: {copies + large}"


def login_refused(cluster: vm_hosts.Cluster, backing: Path, host: str) -> list[str]:
    """Lines of A's agent log where a login of ``host``'s initiator to this volume's target was refused."""
    initiator = f"iqn.2026-11.io.shoal:node:node-{host}"
    return [line for line in cluster.agents["a"].log().splitlines()
            if f"login from '{initiator}' refused" in line and backing.stem in line]


def stop_all(*guests: VmGuest | None) -> None:
    for guest in guests:
        if guest is not None:
            guest.stop()


def node_fence(cluster: vm_hosts.Cluster, node: str) -> dict:
    return cluster.ctl_json("node", "show", node)


def wait_fenced(cluster: vm_hosts.Cluster, node: str, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        shown = node_fence(cluster, node)
        if shown.get("fence") == "fenced":
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"{node} not fenced {what}: {shown}")
        time.sleep(0.3)


def fence_and_fail_over(cluster: vm_hosts.Cluster, image, tmp_path: Path, name: str, fence) -> None:
    """Guest on B writing; B's agent frozen; ``fence(frozen_at)`` fences B (returns ``node show``); copy; fresh
    guest on C; B's agent resumed; then prove no record of B's writer after the copy reached the disk."""
    secrets = Secrets()
    backing = create_volume(cluster, name)
    writer_b, writer_c = f"{name[-5:]}-b", f"{name[-5:]}-c"
    agent_b = cluster.agents["b"].process.pid
    guest_b = guest_c = None
    frozen = False
    try:
        guest_b = VmGuest.start(f"{name}-b", cluster.hosts["b"].exec_argv([]), image,
                                connect(cluster, name, "b", secrets, tmp_path), tmp_path, writer=writer_b)
        guest_b.wait_for_seq(writer_b, STEP_RECORDS, WAIT)

        os.kill(agent_b, signal.SIGSTOP)
        frozen, frozen_at = True, time.monotonic()
        # QEMU, not the agent, is B's writer: it goes on writing while the agent is frozen.
        guest_b.wait_for_seq(writer_b, guest_b.console().last(writer_b) + 3, WAIT)
        shown = fence(frozen_at)
        assert shown["fence"] == "fenced", shown
        fenced_after = time.monotonic() - frozen_at
        at_fence = tmp_path / "at-fence.img"
        shutil.copyfile(backing, at_fence)
        copy = read_records(at_fence)
        last_b = len(copy) - 1
        problems = check_records(copy, {writer_b: range(len(copy))})
        assert not problems, "\n".join(problems)
        assert last_b >= STEP_RECORDS

        # The volume goes to C (B is fenced: no --shared needed, nothing to clean up on B).
        guest_c = VmGuest.start(f"{name}-c", cluster.hosts["c"].exec_argv([]), image,
                                connect(cluster, name, "c", secrets, tmp_path), tmp_path,
                                writer=writer_c, start=last_b + 1)
        guest_c.wait_for_seq(writer_c, last_b + 1 + STEP_RECORDS // 2, WAIT)
        os.kill(agent_b, signal.SIGCONT)
        frozen = False
        # A few seconds with B's agent back and B's QEMU still trying to write.
        guest_c.wait_for_seq(writer_c, guest_c.console().last(writer_c) + STEP_RECORDS, WAIT)
        assert guest_b.alive(), f"B's QEMU died:\n{guest_b.qemu_log()[-2000:]}"
        shown = node_fence(cluster, "node-b")
        assert shown["fence"] == "fenced", shown
        assert any(step.startswith("node-a") for step in shown["fence_steps"]), shown  # the owner's step
        guest_b.kill()
        guest_c.pause()
        final_c = guest_c.console().last(writer_c)

        final = read_records(backing)
        assert read_bytes(backing, last_b + 1) == read_bytes(at_fence, last_b + 1), \
            "B's records changed after the fence"
        problems = check_records(final, {writer_b: range(last_b + 1), writer_c: range(last_b + 1, len(final))})
        assert not problems, "\n".join(problems)
        assert final_c + 1 <= len(final) <= final_c + 2, (final_c, len(final))
        # What B's guest saw: no write it reported done is missing from the copy, and it kept failing after.
        log_b = guest_b.console()
        assert log_b.last(writer_b) <= last_b, f"B reported record {log_b.last(writer_b)} written after the fence"
        # B's QEMU lost its session at the fence and kept logging in again: A refused every time.
        assert login_refused(cluster, backing, "b"), "no refused login of B's initiator in A's agent log"
        log_c = guest_c.console()
        assert not log_c.io_errors and not log_c.errors, "\n".join(log_c.io_errors + log_c.errors)
        print(f"\n{name}: fenced {fenced_after:.1f}s after B's agent froze; B wrote 0-{last_b}, "
              f"C {last_b + 1}-{final_c}; B's guest then saw "
              f"{len(log_b.io_errors)} I/O error line(s); fence steps: {shown['fence_steps']}")
        data_stays_on_a(cluster, backing)
        secrets.check(cluster, [guest_b, guest_c])
    finally:
        if frozen:
            os.kill(agent_b, signal.SIGCONT)
        if guest_b is not None:
            guest_b.kill()
        stop_all(guest_c)
    cluster.ctl("volume", "disconnect", name, "--node", "node-c")


def read_bytes(path: Path, blocks: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(blocks * vm_guest.RECORD_SIZE)


class TestOneCluster:
    """Migration, then the admin's fence, on one set of hosts (B is unfenced at the end)."""

    def test_live_migration(self, cluster, image, tmp_path):
        """A writing guest moves from B to C over QMP; every record before and after verifies in order."""
        secrets = Secrets()
        backing = create_volume(cluster, "vm-migrate")
        writer = "mig-b1"
        guest_b = guest_c = None
        try:
            guest_b = VmGuest.start("mig-b", cluster.hosts["b"].exec_argv([]), image,
                                    connect(cluster, "vm-migrate", "b", secrets, tmp_path), tmp_path, writer=writer)
            guest_b.wait_for_seq(writer, STEP_RECORDS, WAIT)

            # A second writer only on purpose: without --shared the volume is not published to C.
            refused = cluster.ctl("volume", "connect", "vm-migrate", "--node", "node-c", "--format", "qemu",
                                  "--secret-file", str(tmp_path / "refused.secret"), check=False)
            assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr, refused.stderr
            assert not (tmp_path / "refused.secret").exists()

            connection_c = connect(cluster, "vm-migrate", "c", secrets, tmp_path, shared=True)
            uri = f"tcp:{cluster.hosts['c'].ip}:{MIGRATION_PORT}"
            guest_c = VmGuest.start("mig-c", cluster.hosts["c"].exec_argv([]), image, connection_c, tmp_path,
                                    writer=writer, incoming=uri)
            assert guest_c.status() == "inmigrate"

            before = guest_b.console().last(writer)
            info = vm_guest.migrate(guest_b, uri, timeout=WAIT)
            assert info["status"] == "completed", info
            guest_c.wait_status("running", WAIT)
            assert guest_b.status() == "postmigrate"
            on_b = guest_b.console().written[writer]
            guest_b.stop()
            cluster.ctl("volume", "disconnect", "vm-migrate", "--node", "node-b")
            assert cluster.ctl_json("volume", "show", "vm-migrate")["attached_nodes"] == ["node-c"]

            # The guest goes on writing on C, to the same disk.
            guest_c.wait_for_seq(writer, on_b[-1] + STEP_RECORDS, WAIT)
            guest_c.pause()  # drains the guest's requests: what it reported written is on the target
            final = guest_c.console().last(writer)
            on_c = guest_c.console().written.get(writer, [])
            print(f"\nmigrated after record {before}: {info['total-time']} ms, downtime {info['downtime']} ms; "
                  f"records 0-{on_b[-1]} from B, {on_c[0]}-{final} from C")

            records = read_records(backing)
            problems = check_records(records, {writer: range(len(records))})
            assert not problems, "\n".join(problems)
            # Every record the guest reported is on A's disk; at most the one being reported when it paused is more.
            assert final + 1 <= len(records) <= final + 2, (final, len(records))
            # One console across both hosts (a line may be cut by the migration: B has its start, C the rest).
            reports = vm_guest.parse_console(guest_b.console().text + guest_c.console().text).written[writer]
            assert reports == list(range(final + 1)), "the guest's reports are not one gapless sequence"
            assert on_b and on_c and on_b[-1] >= before, "records on both sides of the migration"
            for guest in (guest_b, guest_c):
                log = guest.console()
                assert not log.io_errors and not log.errors, f"{guest.name}:\n" + "\n".join(log.io_errors + log.errors)
            data_stays_on_a(cluster, backing)
            secrets.check(cluster, [guest_b, guest_c])
        finally:
            stop_all(guest_b, guest_c)
        cluster.ctl("volume", "disconnect", "vm-migrate", "--node", "node-c")

    def test_fence_by_admin(self, cluster, image, tmp_path):
        """``shoalctl node fence`` returns once B is fenced at A; then B cannot write a block."""
        def fence(frozen_at: float) -> dict:
            cluster.ctl("node", "fence", "node-b")  # exits 0 only once B is fenced
            return node_fence(cluster, "node-b")

        fence_and_fail_over(cluster, image, tmp_path, "vm-fence-admin", fence)
        cluster.ctl("node", "unfence", "node-b")
        assert node_fence(cluster, "node-b")["fence"] == ""


def test_fence_on_grace(image, tmp_path):
    """The controller fences B by itself once B is silent for longer than ``--fence-grace``.

    Hosts of its own: the controller starts with ``--fence-grace`` (restarting the other test's
    controller with it would be a test of restarts)."""
    with hosts_with_pool(tmp_path / "hosts", ["--fence-grace", str(FENCE_GRACE)]) as cluster:
        def fence(frozen_at: float) -> dict:
            # Heartbeat timeout + grace, and slack for a loaded machine: not a measurement, a bound on
            # "the grace is honoured" (a controller busy elsewhere for minutes would not be).
            bound = vm_hosts.HEARTBEAT_TIMEOUT + FENCE_GRACE + GRACE_SLACK
            return wait_fenced(cluster, "node-b", frozen_at + bound - time.monotonic(),
                               f"within {bound:.0f}s of B's agent freezing (heartbeat timeout "
                               f"{vm_hosts.HEARTBEAT_TIMEOUT:.0f}s + fence grace {FENCE_GRACE}s + {GRACE_SLACK}s)")

        fence_and_fail_over(cluster, image, tmp_path, "vm-fence-grace", fence)
