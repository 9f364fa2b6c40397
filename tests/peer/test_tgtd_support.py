"""The tgtd test peer itself works: ``running_tgtd`` serves LUNs libiscsi can see.

tgtd is what our initiator is tested against and what ``tests/perf`` measures
``shoal target`` against; these tests prove the helper (start on a free portal,
tgtadm configuration, CHAP accounts, negotiated limits, stop by PID).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require_tools
from tests.support.tgtd import TUNED_PARAMS, running_tgtd

pytestmark = pytest.mark.peer
MiB = 1 << 20


def run(*args, check=True):
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_iscsi_ls_sees_tgtd_lun(tmp_path):
    """SendTargets discovery (RFC 7143 §12.3) and REPORT LUNS (SPC-4 §6.33) against tgtd: LUN 1 is the disk."""
    require_tools("tgtd", "tgtadm", "iscsi-ls")
    with running_tgtd(tmp_path, luns=[("disk", 64 * MiB)]) as tgtd:
        out = run("iscsi-ls", "-s", f"iscsi://{tgtd.portal}/").stdout
        assert f"Target:{tgtd.iqn} Portal:{tgtd.portal}" in out
        # iscsi-ls prints the last LBA times the block size: 64 MiB shows as 63M.
        assert "Lun:1    Type:DIRECT_ACCESS (Size:63M)" in out, out
        params = tgtd.tgtadm("--op", "show", "--mode", "target", "--tid", "1").stdout
        for key, value in TUNED_PARAMS.items():
            assert f"{key}={value}" in params
        pid = tgtd.pid
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), "tgtd still running after the context"


def test_tgtd_chap(tmp_path):
    """CHAP and mutual CHAP (RFC 7143 §12.1.3): the right secrets log in, a wrong one is refused."""
    require_tools("tgtd", "tgtadm", "iscsi-inq")
    with running_tgtd(tmp_path, luns=[("disk", 16 * MiB)], chap=("alice", "secret-alice-12"),
                      mutual_chap=("tgt", "secret-target-34")) as tgtd:
        assert run("iscsi-inq", tgtd.url(1, "alice", "secret-alice-12")).returncode == 0
        assert run("iscsi-inq", tgtd.url(1, "alice", "secret-alice-12", "tgt", "secret-target-34")).returncode == 0
        assert run("iscsi-inq", tgtd.url(1, "alice", "wrong-secret-123"), check=False).returncode != 0


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
