"""Many sessions at once, and one misbehaving client does not disturb the others (issue 2).

Real QEMU clients (``qemu-io``) against one ``shoal target`` on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target

pytestmark = pytest.mark.peer
MiB = 1 << 20


def qemu_io(url: str, command: str) -> subprocess.Popen:
    return subprocess.Popen(["qemu-io", "-f", "raw", "-c", command, url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sixteen_sessions_write_and_verify_concurrently(tmp_path):
    require_tools("qemu-io")
    luns = tuple((f"d{i}", 16 * MiB) for i in range(4))
    with running_shoal_target(tmp_path, luns=luns) as target:
        writers = []
        for client in range(16):
            lun, slot = client % 4, client // 4
            pattern = 0x10 + client
            writers.append(qemu_io(target.url(lun), f"write -P {pattern:#x} {slot * 4 * MiB} {4 * MiB}"))
        for proc in writers:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "wrote" in out, out
        readers = []
        for client in range(16):
            lun, slot = client % 4, client // 4
            readers.append(qemu_io(target.url(lun), f"read -P {0x10 + client:#x} {slot * 4 * MiB} {4 * MiB}"))
        for proc in readers:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "Pattern verification failed" not in out, out
        sessions = target.log().count("login: ")
        assert sessions >= 32


def test_killed_and_garbage_clients_do_not_disturb_others(tmp_path):
    """A client killed mid-write and a client sending garbage leave the target serving everyone else."""
    require_tools("qemu-io", "qemu-img")
    with running_shoal_target(tmp_path, luns=(("a", 64 * MiB), ("b", 16 * MiB))) as target:
        victim = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-c", "1000000", "-d", "32",
                                   "-s", "4k", target.url(0)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with socket.create_connection((target.host, target.port)) as junk:
            junk.sendall(os.urandom(4096))
            time.sleep(0.5)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            proc = qemu_io(target.url(1), "write -P 0x77 0 1M")
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            proc = qemu_io(target.url(1), "read -P 0x77 0 1M")
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "Pattern verification failed" not in out, out
        assert target.process.poll() is None, target.log()
        assert "Traceback" not in target.log()
