"""`shoal iscsi` commands (discover, inquiry, read, write, bench) against shoal target and tgtd (issue 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node_agent.iscsi.initiator.tools import IscsiUrl
from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target
from tests.support.tgtd import running_tgtd

pytestmark = pytest.mark.peer


def shoal(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "node_agent.cli", "iscsi", *args], capture_output=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


@pytest.fixture(params=["shoal", "tgtd"])
def target(request, tmp_path):
    if request.param == "tgtd":
        require_tools("tgtd")
        with running_tgtd(tmp_path, luns=(("d", 64 << 20),)) as t:
            yield t, t.url(1)
    else:
        with running_shoal_target(tmp_path, luns=(("d", 64 << 20),)) as t:
            yield t, t.url(0)


def test_discover_inquiry_write_read(target, tmp_path):
    t, url = target
    found = json.loads(shoal("discover", t.portal, "-o", "json").stdout)
    assert found[0]["target"] == t.iqn
    info = json.loads(shoal("inquiry", url, "-o", "json").stdout)
    assert info["bytes"] == 64 << 20 and info["block_size"] == 512
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(8192))
    shoal("write", url, "--lba", "100", "--in", str(payload), "--fua")
    assert shoal("read", url, "--lba", "100", "--blocks", "16").stdout == payload.read_bytes()


def test_scsi_errors_are_named(target):
    """A command the target refuses exits 1 with the status and sense named, numbers after them."""
    _, url = target
    proc = shoal("read", url, "--lba", str((64 << 20) // 512), "--blocks", "1", check=False)
    assert proc.returncode == 1 and proc.stdout == b""
    assert ("SCSI status CHECK CONDITION (0x02): ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE "
            "(sense key 0x5, ASC/ASCQ 0x21/0x00)") in proc.stderr.decode(), proc.stderr.decode()


def test_bench_prints_figures(target):
    _, url = target
    for extra in ([], ["--write"]):
        result = json.loads(shoal("bench", url, "--seconds", "1", "--depth", "8", "-o", "json", *extra).stdout)
        assert result["iops"] > 0 and result["io_count"] > 0


def test_digests_offered_required_and_refused(tmp_path):
    """``--header-digest``/``--data-digest``: CRC32C is used where the target agrees; insisting on it
    against a target that allows only None (tgtd, configured so) fails the login with exit 1 and says
    which key, while offering CRC32C,None lets the target choose None."""
    with running_shoal_target(tmp_path / "shoal", luns=(("d", 64 << 20),)) as t:
        result = json.loads(shoal("--header-digest", "CRC32C", "--data-digest", "crc32c", "bench", t.url(0),
                                  "--seconds", "0.5", "--depth", "4", "--write", "-o", "json").stdout)
        assert result["negotiated"]["HeaderDigest"] is True and result["negotiated"]["DataDigest"] is True
        assert result["io_count"] > 0
    require_tools("tgtd")
    with running_tgtd(tmp_path / "tgtd", luns=(("d", 64 << 20),),
                      params={"HeaderDigest": "None", "DataDigest": "None"}) as t:
        proc = shoal("--data-digest", "CRC32C", "inquiry", t.url(1), check=False)
        assert proc.returncode == 1 and "DataDigest" in proc.stderr.decode(), proc.stderr.decode()
        result = json.loads(shoal("--data-digest", "CRC32C,None", "bench", t.url(1), "--seconds", "0.5",
                                  "--depth", "4", "-o", "json").stdout)
        assert result["negotiated"]["DataDigest"] is False and result["io_count"] > 0


@pytest.mark.parametrize("value", ["MD5", "CRC32C,CRC32C", "", "None,"])
def test_bad_digest_lists_are_usage_errors(value):
    proc = shoal("--header-digest", value, "inquiry", "iscsi://127.0.0.1:1/iqn.2026-11.x:y/0", check=False)
    assert proc.returncode == 2 and "a list of None and CRC32C" in proc.stderr.decode()


@pytest.mark.parametrize("url, message", [
    ("http://x/iqn.a/0", "expected iscsi://"),
    ("iscsi://127.0.0.1:3260/iqn.2026-11.x:y", "the path must be /target-iqn/lun"),
    ("iscsi://127.0.0.1:3260/iqn.2026-11.x:y/zero", "is not a number"),
])
def test_bad_urls(url, message):
    proc = shoal("inquiry", url, check=False)
    assert proc.returncode == 2 and message in proc.stderr.decode()


def test_url_forms():
    url = IscsiUrl.parse("iscsi://alice%s3cr%40t@[::1]:3261/iqn.2026-11.x:y/3?target_user=t&target_password=p")
    assert (url.host, url.port, url.target, url.lun) == ("::1", 3261, "iqn.2026-11.x:y", 3)
    assert url.chap == ("alice", "s3cr@t") and url.mutual_chap == ("t", "p")
