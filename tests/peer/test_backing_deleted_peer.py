"""A LUN file deleted under a running ``shoal target`` (``server.check_backing_files`` on its portal's tick),
seen through QEMU's iSCSI driver (qemu-io); ``tests/unit/test_backing_deleted.py`` has the check itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.support.shoal_target import running_shoal_target

MiB = 1 << 20


def test_shoal_target_reports_a_lun_file_deleted_under_it_and_serves_on(tmp_path):
    """End to end: a real ``shoal target`` process, its LUN file deleted while served; its log names the LUN and
    the file within a few ticks, and QEMU still writes and reads the LUN (now only in the open file)."""
    if shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-io (Debian qemu-utils; make deps installs it)")
    with running_shoal_target(tmp_path, luns=[("disk0", 16 * MiB)]) as target:
        path = target.lun_paths[0]
        os.unlink(path)
        deadline = time.monotonic() + 10
        while "was deleted while served" not in target.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"its backing file {path} was deleted while served" in target.log(), target.log()
        assert f"/proc/{target.pid}/fd/" in target.log()
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k",
                             target.url(0)], capture_output=True, text=True, timeout=60)
        assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr
        assert target.log().count("was deleted while served") == 1  # once, not every tick
