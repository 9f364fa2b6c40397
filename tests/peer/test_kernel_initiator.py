"""The Linux kernel's iSCSI initiator, in a QEMU guest, against a target.

Issue 2, check 4: Debian's kernel boots under TCG with a busybox initramfs
(built and cached by ``tests/support/kernel_guest.py``); its ``iscsi_tcp``
initiator, driven by open-iscsi's ``iscsid``/``iscsiadm``, discovers the
target (SendTargets, RFC 7143 Appendix C), logs in (RFC 7143 §6, §12.1.3 for
CHAP), writes and reads a pattern with O_DIRECT, makes an ext4 filesystem,
mounts it, writes files, unmounts and logs out (RFC 7143 §11.14). The host
then checks the LUN's backing file with ``debugfs`` and ``e2fsck -fn``.

The tgtd tests check the harness itself against a known-good target; the
shoal tests are the real check. The target runs inside a network namespace
the test creates (host side 10.99.0.1, guest 10.99.0.2); every process is
stopped by PID and the namespace deleted, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import kernel_guest
from tests.support.shoal_target import running_shoal_target

pytestmark = [pytest.mark.peer, pytest.mark.slow]

LUN_SIZE = 64 << 20
PORT = 3260
CHAP = ("shoal-initiator", "initiator-secret-1")
MUTUAL_CHAP = ("shoal-target", "target-secret-22")
TGT_IQN = "iqn.2026-11.dev.shoal.test:tgtd-harness"

_missing = kernel_guest.missing_requirements()
if _missing:
    pytest.skip("kernel initiator test cannot run: " + "; ".join(_missing), allow_module_level=True)


@pytest.fixture(scope="module")
def guest_image() -> kernel_guest.GuestImage:
    """The guest kernel + initramfs (built once, then taken from the cache)."""
    try:
        image = kernel_guest.ensure_guest_image()
    except (kernel_guest.GuestError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        pytest.fail(f"could not build the kernel guest: {exc} {detail}")
    if image.build_seconds:
        print(f"\nkernel guest {image.version} built in {image.build_seconds:.1f}s")
    return image


@pytest.fixture
def guest_net() -> Iterator[kernel_guest.GuestNetwork]:
    with kernel_guest.guest_network() as net:
        yield net


def _run_and_check(
    image: kernel_guest.GuestImage,
    net: kernel_guest.GuestNetwork,
    iqn: str,
    tmp_path: Path,
    **kwargs,
) -> kernel_guest.InitiatorResult:
    result = kernel_guest.run_kernel_initiator(
        net.portal(PORT), iqn, network=net, image=image, log_path=tmp_path / "serial.log", **kwargs
    )
    print(f"\n{result.summary()}")
    assert result.ok, (
        f"guest step failed: {result.failed_step}\n--- serial log (end) ---\n{result.excerpt()}"
    )
    assert result.results.get("io_errors") == "0", result.excerpt()
    return result


def _check_discovery(result: kernel_guest.InitiatorResult, iqn: str) -> None:
    """iscsiadm's SendTargets discovery (RFC 7143 §4.3, Appendix C) listed the target.

    Checked last: the guest falls back to a hand-made node record, so the
    data path above is checked even when discovery fails.
    """
    log = "\n".join(line for line in result.serial_log.splitlines() if "SHOAL-LOG discovery" in line)
    assert result.results.get("discovery") in ("ok", "ok-chap"), f"SendTargets discovery failed:\n{log}"
    assert result.results.get("discovered") == "1", f"{iqn} not in the SendTargets reply:\n{log}"


def _check_backing(backing: Path, result: kernel_guest.InitiatorResult) -> None:
    problems = kernel_guest.verify_backing_file(backing, result)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# tgtd: proves the harness works independently of shoal's target
# --------------------------------------------------------------------------


def _tgtadm(net: kernel_guest.GuestNetwork, cport: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # tgtd's control socket is an abstract unix socket: per network namespace.
    return subprocess.run(
        net.exec_argv(["tgtadm", "-C", str(cport), *args]), capture_output=True, text=True, check=check
    )


@contextlib.contextmanager
def running_tgtd(
    net: kernel_guest.GuestNetwork,
    backing: Path,
    chap: tuple[str, str] | None = None,
    mutual_chap: tuple[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> Iterator[int]:
    """tgtd inside ``net`` on 10.99.0.1:3260 serving ``backing`` as LUN 1.

    (tgtd reserves LUN 0 for its controller.) ``params`` are iSCSI keys set
    on the target (``tgtadm --op update --mode target``). Yields tgtd's PID.
    """
    cport = random.randint(2000, 9000)
    proc = subprocess.Popen(
        net.exec_argv(["tgtd", "-f", "-C", str(cport), "--iscsi", f"portal={net.portal(PORT)}"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while _tgtadm(net, cport, "--op", "show", "--mode", "system", check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.05)
        iscsi = ("--lld", "iscsi")
        _tgtadm(net, cport, *iscsi, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        _tgtadm(net, cport, *iscsi, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                "-b", str(backing))
        _tgtadm(net, cport, *iscsi, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        for key, value in (params or {}).items():
            _tgtadm(net, cport, *iscsi, "--op", "update", "--mode", "target", "--tid", "1",
                    "--name", key, "--value", value)
        if chap:
            _tgtadm(net, cport, *iscsi, "--op", "new", "--mode", "account", "--user", chap[0],
                    "--password", chap[1])
            _tgtadm(net, cport, *iscsi, "--op", "bind", "--mode", "account", "--tid", "1", "--user", chap[0])
        if mutual_chap:
            _tgtadm(net, cport, *iscsi, "--op", "new", "--mode", "account", "--user", mutual_chap[0],
                    "--password", mutual_chap[1])
            _tgtadm(net, cport, *iscsi, "--op", "bind", "--mode", "account", "--tid", "1",
                    "--user", mutual_chap[0], "--outgoing")
        yield proc.pid
    finally:
        # tgtd ignores SIGTERM while it has targets (LAB-FACTS.md).
        _tgtadm(net, cport, "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1",
                "--force", check=False)
        _tgtadm(net, cport, "--op", "delete", "--mode", "system", check=False)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("auth", ["none", "mutual-chap"])
def test_tgtd_harness(guest_image, guest_net, tmp_path, auth):
    """The harness against tgtd: a known-good target, so a failure here is the harness's."""
    backing = _sparse_file(tmp_path / "lun.img", LUN_SIZE)
    chap, mutual = (CHAP, MUTUAL_CHAP) if auth == "mutual-chap" else (None, None)
    with running_tgtd(guest_net, backing, chap, mutual):
        result = _run_and_check(guest_image, guest_net, TGT_IQN, tmp_path, lun=1,
                                chap=chap, mutual_chap=mutual)
    _check_backing(backing, result)
    _check_discovery(result, TGT_IQN)


DIGESTS = {"header_digest": "CRC32C", "data_digest": "CRC32C"}


def _check_digests(result: kernel_guest.InitiatorResult) -> None:
    """The session ran with CRC32C header and data digests (RFC 7143 §13.1) and saw no digest error.

    ``header_digest``/``data_digest`` are what ``iscsiadm -m session -P 2``
    printed from the kernel's connection after login; ``digest_errors`` is the
    connection's ``digest_err`` counter after all the I/O.
    """
    got = {key: result.results.get(key) for key in DIGESTS}
    session = "\n".join(line for line in result.serial_log.splitlines() if "SHOAL-LOG session" in line)
    assert got == DIGESTS, f"negotiated digests {got}, wanted {DIGESTS}:\n{session}"
    assert result.results.get("digest_errors") == "0", result.excerpt()


def test_tgtd_harness_digests(guest_image, guest_net, tmp_path):
    """The harness's digest variant against tgtd: the guest really runs with CRC32C digests."""
    backing = _sparse_file(tmp_path / "lun.img", LUN_SIZE)
    # tgtd offers HeaderDigest/DataDigest=None unless told otherwise.
    with running_tgtd(guest_net, backing, params={"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}):
        result = _run_and_check(guest_image, guest_net, TGT_IQN, tmp_path, lun=1, **DIGESTS)
    _check_digests(result)
    _check_backing(backing, result)


def _assert_login_refused(result: kernel_guest.InitiatorResult) -> None:
    assert result.failed_step == "login", (
        f"expected the login to be refused, got step {result.failed_step!r}\n{result.excerpt()}"
    )
    assert "disk" not in result.results, "a disk appeared although the login was refused"


def test_tgtd_harness_wrong_secret(guest_image, guest_net, tmp_path):
    """The harness reports a refused CHAP login as a failed ``login`` step."""
    backing = _sparse_file(tmp_path / "lun.img", LUN_SIZE)
    with running_tgtd(guest_net, backing, CHAP):
        result = kernel_guest.run_kernel_initiator(
            guest_net.portal(PORT), TGT_IQN, lun=1, chap=(CHAP[0], "wrong-secret-123"),
            network=guest_net, image=guest_image, log_path=tmp_path / "serial.log",
        )
    _assert_login_refused(result)


# --------------------------------------------------------------------------
# shoal target
# --------------------------------------------------------------------------


def _shoal_target():
    return running_shoal_target


@pytest.mark.parametrize(
    "auth", ["none", "chap", "mutual-chap"],
)
def test_shoal_target_kernel_initiator(guest_image, guest_net, tmp_path, auth):
    """Linux's initiator logs in to shoal target, does O_DIRECT I/O and ext4, logs out.

    RFC 7143 §6 (login), §12.1.3 (CHAP), §11.14 (logout); SBC-3 READ/WRITE,
    SYNCHRONIZE CACHE; the backing file holds exactly what the guest wrote.
    """
    running_shoal_target = _shoal_target()
    chap = CHAP if auth in ("chap", "mutual-chap") else None
    mutual = MUTUAL_CHAP if auth == "mutual-chap" else None
    with running_shoal_target(
        tmp_path, luns=[("disk0", LUN_SIZE)], chap=chap, mutual_chap=mutual,
        netns=guest_net.netns, listen=guest_net.portal(PORT),
    ) as target:
        result = _run_and_check(guest_image, guest_net, target.iqn, tmp_path, lun=0, chap=chap, mutual_chap=mutual)
    _check_backing(Path(target.lun_paths[0]), result)
    _check_discovery(result, target.iqn)


def test_shoal_target_refuses_wrong_chap_secret(guest_image, guest_net, tmp_path):
    """Without the right CHAP secret the kernel initiator cannot log in (RFC 7143 §12.1.3)."""
    running_shoal_target = _shoal_target()
    with running_shoal_target(
        tmp_path, luns=[("disk0", LUN_SIZE)], chap=CHAP,
        netns=guest_net.netns, listen=guest_net.portal(PORT),
    ) as target:
        result = kernel_guest.run_kernel_initiator(
            guest_net.portal(PORT), target.iqn, lun=0, chap=(CHAP[0], "wrong-secret-123"),
            network=guest_net, image=guest_image, log_path=tmp_path / "serial.log",
        )
    _assert_login_refused(result)


@pytest.mark.parametrize("auth", ["none", "mutual-chap"])
def test_shoal_target_kernel_initiator_digests(guest_image, guest_net, tmp_path, auth):
    """The whole kernel run with CRC32C header and data digests on the session.

    RFC 7143 §13.1 (HeaderDigest, DataDigest), §12.1 (CRC32C), §7.8 (digest
    errors): both sides must agree, or the first PDU after login is misframed.
    Checked from the guest (``iscsiadm -m session -P 2``, ``digest_err``) and
    from the target's login line. SendTargets discovery stays without digests
    (open-iscsi never offers them for discovery sessions).
    """
    running_shoal_target = _shoal_target()
    chap, mutual = (CHAP, MUTUAL_CHAP) if auth == "mutual-chap" else (None, None)
    with running_shoal_target(
        tmp_path, luns=[("disk0", LUN_SIZE)], chap=chap, mutual_chap=mutual,
        netns=guest_net.netns, listen=guest_net.portal(PORT),
    ) as target:
        result = _run_and_check(guest_image, guest_net, target.iqn, tmp_path, lun=0, chap=chap,
                                mutual_chap=mutual, **DIGESTS)
        log = target.log()
    _check_digests(result)
    logins = [line for line in log.splitlines()
              if f"login: {kernel_guest.DEFAULT_INITIATOR} " in line and f" to {target.iqn} " in line]
    assert logins and all("HeaderDigest=CRC32C DataDigest=CRC32C" in line for line in logins), (
        "the target's login line does not show both digests:\n" + log
    )
    _check_backing(Path(target.lun_paths[0]), result)
    _check_discovery(result, target.iqn)


def test_shoal_target_workers_kernel_initiator(guest_image, guest_net, tmp_path):
    """``shoal target --workers 2``: the kernel's discovery goes to the parent, which lists both targets, and
    its login to the second target is handed to worker 1, which serves the whole run (mutual CHAP)."""
    running_shoal_target = _shoal_target()
    second = "iqn.2026-11.io.shoal.test:second"
    backing = tmp_path / "second.img"
    with running_shoal_target(
        tmp_path, luns=[("disk0", LUN_SIZE)], chap=CHAP, mutual_chap=MUTUAL_CHAP,
        netns=guest_net.netns, listen=guest_net.portal(PORT),
        extra_args=["--workers", "2", "--iqn", second, "--lun", f"{backing}:{LUN_SIZE}"],
    ) as target:
        result = _run_and_check(guest_image, guest_net, second, tmp_path, lun=0, chap=CHAP, mutual_chap=MUTUAL_CHAP)
        log = target.log()
    logins = [line for line in log.splitlines() if f"login: {kernel_guest.DEFAULT_INITIATOR} " in line]
    assert any(f" to {second} " in line and "[worker 1]" in line for line in logins), log
    assert not any(f" to {second} " in line and "[worker 1]" not in line for line in logins), log
    _check_backing(backing, result)
    _check_discovery(result, second)
