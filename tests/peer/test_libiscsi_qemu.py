"""``shoal target`` against libiscsi's tools and QEMU's iSCSI driver (issue 2, checks 1, 2 and 5).

Real peers, real processes on 127.0.0.1: ``iscsi-ls``/``iscsi-inq``/
``iscsi-readcapacity16`` from libiscsi-bin, ``qemu-img``/``qemu-io`` from
qemu-utils with qemu-block-extra's libiscsi driver.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target

pytestmark = pytest.mark.peer
MiB = 1 << 20
ALLOWED = "iqn.2026-11.io.shoal.test:allowed"
STRANGER = "iqn.2026-11.io.shoal.test:stranger"


def run(*args, check=True, timeout=120, env=None):
    result = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    require_tools("iscsi-ls", "iscsi-inq")
    with running_shoal_target(tmp_path_factory.mktemp("libiscsi"), luns=(("a", 64 * MiB), ("b", 16 * MiB))) as t:
        yield t


def test_iscsi_ls_lists_target_and_luns(target):
    """Check 1: SendTargets discovery, then REPORT LUNS/READ CAPACITY per LUN."""
    out = run("iscsi-ls", "-s", f"iscsi://{target.portal}/").stdout
    assert f"Target:{target.iqn} Portal:{target.portal},1" in out
    assert "Lun:0" in out and "Lun:1" in out
    # iscsi-ls prints the last LBA times the block size: 64 MiB shows as 63M (tgtd alike).
    assert "(Size:63M)" in out and "(Size:15M)" in out, out
    capacity = run("iscsi-readcapacity16", target.url(0)).stdout
    assert "Total size:67108864" in capacity, capacity


def inq(url, page):
    # iscsi-inq reads the page code with atoi(): pass it in decimal.
    return run("iscsi-inq", "-e", "1", "-c", str(page), url).stdout


def test_iscsi_inq_standard_and_vpd_pages(target):
    """Check 1: INQUIRY standard data and VPD 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2 decode in iscsi-inq."""
    url = target.url(0)
    standard = run("iscsi-inq", url).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in standard and "Vendor:SHOAL" in standard, standard
    assert "Version Descriptor:0460 SPC-4" in standard, standard
    pages = inq(url, 0x00)
    for page in ("0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"):
        assert f"Page:{page}" in pages, pages
    serial = inq(url, 0x80)
    assert "Unit Serial Number:[" in serial, serial
    ident = inq(url, 0x83)
    assert "Designator Type:(3) NAA" in ident and "T10_VENDORT_ID" in ident, ident
    assert f"Designator:[{target.iqn},t,0x0001]" in ident, ident
    limits = inq(url, 0xB0)
    assert "maximum unmap lba count:" in limits and "maximum transfer length:" in limits, limits
    chars = inq(url, 0xB1)
    assert "Medium Rotation Rate:1" in chars, chars  # 1 = non-rotating medium
    provisioning = inq(url, 0xB2)
    assert "lbpu:1" in provisioning and "provisioning type:2" in provisioning, provisioning


def test_identity_is_stable_across_restarts(tmp_path):
    """VPD 0x83 designators belong to the volume, not to the process serving it."""
    require_tools("iscsi-inq")
    outputs = []
    for _ in range(2):
        with running_shoal_target(tmp_path, luns=(("same", 8 * MiB),)) as t:
            outputs.append(run("iscsi-inq", "-e", "1", "-c", "0x83", t.url(0)).stdout)
    assert outputs[0] == outputs[1]


def _random_image(path, size):
    with open(path, "wb") as handle:
        handle.write(os.urandom(size))


def _round_trip(url, tmp_path, size=64 * MiB):
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    _random_image(src, size)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url, timeout=300)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(back), timeout=300)
    run("cmp", str(src), str(back))


def test_qemu_img_round_trip(tmp_path):
    """Check 2: 64 MiB of random data through qemu-img onto a LUN and back, byte-identical."""
    require_tools("qemu-img", "cmp")
    with running_shoal_target(tmp_path, luns=(("disk", 64 * MiB),)) as t:
        _round_trip(t.url(0), tmp_path)
        # and the backing file holds exactly what was written
        run("cmp", str(tmp_path / "src.raw"), str(t.lun_paths[0]))


def test_qemu_img_round_trip_with_chap(tmp_path):
    require_tools("qemu-img")
    with running_shoal_target(tmp_path, luns=(("disk", 64 * MiB),), chap=("alice", "s3cret-s3cret")) as t:
        _round_trip(t.url(0, "alice", "s3cret-s3cret"), tmp_path)


def test_qemu_img_round_trip_with_mutual_chap(tmp_path):
    """Mutual CHAP: the target proves itself with its own secret (RFC 7143 §12.1.3).

    QEMU 7.2 reads user and password from the URL but ignores libiscsi's
    ``target_user``/``target_password``, so the mutual step itself is checked
    with libiscsi's own tools, which honour them: the right target secret is
    accepted, a wrong one makes the initiator refuse the target.
    """
    require_tools("qemu-img", "iscsi-inq")
    with running_shoal_target(tmp_path, luns=(("disk", 64 * MiB),), chap=("alice", "s3cret-s3cret"),
                              mutual_chap=("shoal", "target-s3cret")) as t:
        _round_trip(t.url(0, "alice", "s3cret-s3cret", "shoal", "target-s3cret"), tmp_path)
        good = run("iscsi-inq", t.url(0, "alice", "s3cret-s3cret", "shoal", "target-s3cret"))
        assert "Vendor:SHOAL" in good.stdout
        bad = run("iscsi-inq", t.url(0, "alice", "s3cret-s3cret", "shoal", "not-the-secret"), check=False)
        assert bad.returncode != 0 and "Invalid CHAP_R response from the target" in bad.stderr + bad.stdout


def test_wrong_secret_and_missing_secret_are_refused(tmp_path):
    require_tools("qemu-img", "iscsi-inq", "iscsi-ls")
    with running_shoal_target(tmp_path, luns=(("disk", 8 * MiB),), chap=("alice", "s3cret-s3cret")) as t:
        assert run("qemu-img", "info", t.url(0, "alice", "wrong-secret"), check=False).returncode != 0
        assert run("iscsi-inq", t.url(0), check=False).returncode != 0
        assert run("iscsi-inq", t.url(0, "mallory", "s3cret-s3cret"), check=False).returncode != 0
        assert run("iscsi-ls", f"iscsi://{t.portal}/", check=False).returncode != 0  # discovery needs CHAP too
        assert run("iscsi-inq", t.url(0, "alice", "s3cret-s3cret")).returncode == 0
        assert "CHAP" not in t.log() or "s3cret" not in t.log()  # the secret is never logged
        assert "s3cret" not in t.log()


def test_initiator_outside_allow_list_is_refused(tmp_path):
    require_tools("qemu-img", "iscsi-inq", "iscsi-ls")
    with running_shoal_target(tmp_path, luns=(("disk", 8 * MiB),), allow=[ALLOWED]) as t:
        assert run("iscsi-inq", "-i", ALLOWED, t.url(0)).returncode == 0
        assert run("iscsi-inq", "-i", STRANGER, t.url(0), check=False).returncode != 0
        assert run("qemu-img", "info", t.url(0), check=False).returncode != 0  # QEMU's own initiator name
        listing = run("iscsi-ls", "-i", STRANGER, f"iscsi://{t.portal}/", check=False).stdout
        assert t.iqn not in listing


def test_an_acknowledged_fua_write_is_in_the_file_after_sigkill(tmp_path):
    """Check 5: a FUA write acknowledged by the target is in the file even if the target dies at once.

    This shows the target answers only after writing: SIGKILL keeps the page cache, so it cannot tell a FUA
    write flushed from one left in the cache.  That FUA flushes (fdatasync before GOOD) is checked where it
    can be seen, ``tests/unit/test_scsi_commands.py::test_fua_write_is_durable_path``."""
    require_tools("qemu-io")
    with running_shoal_target(tmp_path, luns=(("disk", 8 * MiB),)) as t:
        run("qemu-io", "-f", "raw", "-c", "write -f -P 0xa5 1048576 65536", t.url(0))
        os.kill(t.pid, signal.SIGKILL)
        t.process.wait(10)
        with open(t.lun_paths[0], "rb") as handle:
            handle.seek(1048576)
            assert handle.read(65536) == b"\xa5" * 65536


def test_sigterm_shuts_down_cleanly(tmp_path):
    require_tools("qemu-io")
    with running_shoal_target(tmp_path, luns=(("disk", 8 * MiB),)) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096", t.url(0))
        os.kill(t.pid, signal.SIGTERM)
        assert t.process.wait(15) == 0
        assert "stopped" in t.log()
        with open(t.lun_paths[0], "rb") as handle:
            assert handle.read(4096) == b"\x5a" * 4096
