"""Shared test configuration.

Mocks: none of the tests under tests/ replaces a peer with a mock. Unit tests
drive our own pure code directly (the SCSI device model against an in-memory
backing store, which is our own boundary: ``node_agent.storage.backing.MemoryBackingStore``
implements the same ``BackingStore`` protocol as the file store, so unit tests
need no disk). The FUSE export's unit tests serve ``FileBlockDevice``, our own
implementation of the ``BlockDevice`` protocol that ``SyncLun`` (a remote LUN)
also implements, so the FUSE/loop plumbing is tested without a target; the
peer tests attach real LUNs. Protocol tests feed bytes to the sans-I/O iSCSI core; peer tests
run real third-party software (libiscsi, QEMU, tgtd, the Linux kernel in a QEMU
guest) against real ``shoal target`` processes on 127.0.0.1 or in network
namespaces the tests create.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def require_tools(*tools: str) -> None:
    """Skip (saying which) when a peer's program is not installed; `make test` installs them."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by `make test`)")


def require_loop_and_fuse(*tools: str) -> None:
    """Skip (saying why) where userspace attach cannot run: it needs root, /dev/fuse, loop devices, libfuse 3
    (through mfusepy) and ``tools``."""
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse and /dev/loop-control")
    require_tools(*tools)
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"mfusepy/libfuse3 unavailable: {exc}")
