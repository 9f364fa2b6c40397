"""``shoal target --workers 2``: two targets, each served by its own worker process.

Real processes throughout: ``shoal target`` (the parent, which accepts, answers
discovery and routes each login to the worker owning its target), its two
workers, and libiscsi's and QEMU's initiators plus Shoal's own.  Checked: both
targets serve their own data, each login lands in its target's worker (the
workers' log lines carry ``[worker N]``), CHAP and discovery work through the
parent, one target's reservation and reinstatement behave as with one process,
bad first PDUs and unknown targets get the one-process answers while the
targets keep serving, SIGTERM stops every process with the data synced, and a
worker's death stops the target with status 1 (no process left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.peer.test_target_loops import _scenario
from tests.perf.bench_targets import process_tree
from tests.support.shoal_target import REPO, running_shoal_target, stop_process

pytestmark = pytest.mark.peer
MiB = 1 << 20
A = "iqn.2026-11.io.shoal.test:wa"
B = "iqn.2026-11.io.shoal.test:wb"
CHAP = ("alice", "s3cret-s3cret")


def run(*args, check=True, timeout=120):
    result = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its workers; they start none)."""
    return sorted(process_tree(pid) - {pid})


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def started(tmp_path: Path, **kwargs):
    extra = ["--workers", "2", "--iqn", B, "--lun", f"{tmp_path / 'b.img'}:16M"] + kwargs.pop("extra", [])
    return running_shoal_target(tmp_path, luns=(("a", 16 * MiB),), iqn=A, extra_args=extra, **kwargs)


def url(t, iqn: str, auth: tuple[str, str] | None = None) -> str:
    return t.url(0, *(auth or ())).replace(A, iqn)


def test_two_targets_two_workers_with_chap(tmp_path):
    require_tools("qemu-io", "iscsi-ls")
    with started(tmp_path, chap=CHAP) as t:
        workers = children(t.pid)
        assert len(workers) == 2
        listing = run("iscsi-ls", f"iscsi://{CHAP[0]}%{CHAP[1]}@{t.portal}/").stdout
        assert A in listing and B in listing
        assert run("iscsi-ls", f"iscsi://{t.portal}/", check=False).returncode != 0  # discovery needs CHAP
        assert run("qemu-io", "-f", "raw", "-c", "read 0 512", url(t, A), check=False).returncode != 0
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 1M", url(t, A, CHAP))
        run("qemu-io", "-f", "raw", "-c", "write -P 0xb2 0 1M", url(t, B, CHAP))
        run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 0 1M", url(t, A, CHAP))
        run("qemu-io", "-f", "raw", "-c", "read -P 0xb2 0 1M", url(t, B, CHAP))
        log = t.log()
        assert "[worker 0]: login: iqn.2008-11.org.linux-kvm" in log and f"to {A}" in log
        for line in log.splitlines():  # every normal login to A in worker 0, to B in worker 1
            if "login: " in line and f" to {A} " in line:
                assert "[worker 0]" in line, line
            if "login: " in line and f" to {B} " in line:
                assert "[worker 1]" in line, line
        assert "s3cret" not in log
        os.kill(t.pid, signal.SIGTERM)
        assert t.process.wait(20) == 0
        wait_gone(workers)
    assert (tmp_path / "a.img").read_bytes()[:MiB] == b"\xa1" * MiB
    assert (tmp_path / "b.img").read_bytes()[:MiB] == b"\xb2" * MiB


def test_reservations_and_reinstatement_inside_a_worker(tmp_path):
    with started(tmp_path) as t:
        asyncio.run(_scenario(t.host, t.port, B))  # B's sessions all in worker 1
        asyncio.run(_scenario(t.host, t.port, A))  # A's in worker 0
        log = t.log()
    for iqn, worker in ((A, "[worker 0]"), (B, "[worker 1]")):
        logins = [line for line in log.splitlines() if "login: " in line and f" to {iqn} " in line]
        assert logins and all(worker in line for line in logins), (iqn, logins)


def _login_pdu(text: bytes, opcode: int = 0x43) -> bytes:
    header = bytearray(48)
    header[0] = opcode  # immediate Login Request
    header[1] = 0x87  # T, CSG 1 NSG 3
    header[5:8] = len(text).to_bytes(3, "big")
    header[8:14] = bytes.fromhex("800000000001")  # ISID
    return bytes(header) + text + bytes(-len(text) % 4)


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < 48:
        chunk = sock.recv(48 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_bad_first_pdus_and_unknown_targets_get_answers_and_harm_nothing(tmp_path):
    require_tools("qemu-io", "iscsi-inq")
    with started(tmp_path) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", url(t, B))
        # Not a login: the parent answers as one process does (a Reject, or the connection closed).
        with socket.create_connection((t.host, t.port)) as sock:
            sock.sendall(b"\x01" + bytes(47))  # a SCSI Command before login
            answer = _answer(sock)
            assert answer == b"" or answer[0] & 0x3F in (0x3F, 0x23), answer[:1]
        # A login to a target nobody serves: "not found" (class 2, detail 3).
        text = b"InitiatorName=iqn.2026-11.io.shoal.test:x\0TargetName=iqn.2026-11.io.shoal.test:nobody\0"
        with socket.create_connection((t.host, t.port)) as sock:
            sock.sendall(_login_pdu(text))
            answer = _answer(sock)
            assert answer[0] & 0x3F == 0x23 and answer[36:38] == b"\x02\x03"
        # A first PDU that announces more text than it sends, then goes quiet: the others are served meanwhile.
        quiet = socket.create_connection((t.host, t.port))
        quiet.sendall(_login_pdu(b"InitiatorName=iqn.2026-11.io.shoal.test:x\0")[:48 + 8])
        # A first PDU claiming a 16 MiB text: served (refused) by the parent, not buffered.
        with socket.create_connection((t.host, t.port)) as sock:
            header = bytearray(_login_pdu(b"")[:48])
            header[5:8] = (16 * MiB - 4).to_bytes(3, "big")
            sock.sendall(bytes(header) + b"InitiatorName=x\0")
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
        assert run("iscsi-inq", url(t, "iqn.2026-11.io.shoal.test:nobody"), check=False).returncode != 0
        run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 64k", url(t, B))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x4d 0 64k", url(t, A))
        quiet.close()
        assert len(children(t.pid)) == 2


def test_a_dying_worker_stops_the_target(tmp_path):
    """A worker killed while serving stops the whole target with status 1 (its death logged once, not again by
    the stop); the other worker's data is synced, and a restart on the same port serves both targets."""
    require_tools("qemu-io")
    with started(tmp_path) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", url(t, A))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x78 0 64k", url(t, B))
        workers = children(t.pid)
        os.kill(workers[1], signal.SIGKILL)
        assert t.process.wait(30) == 1
        wait_gone(workers)
        log = t.log()
        port = t.port
    assert "exited while serving (status -9)" in log
    assert [line for line in log.splitlines() if " ERROR " in line and "status -9" in line] == [
        line for line in log.splitlines() if "exited while serving (status -9)" in line], log
    assert (tmp_path / "a.img").read_bytes()[:65536] == b"\x77" * 65536
    with started(tmp_path, listen=f"127.0.0.1:{port}") as again:
        run("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", url(again, A))
        run("qemu-io", "-f", "raw", "-c", "read -P 0x78 0 64k", url(again, B))
        workers = children(again.pid)
    wait_gone(workers)


def worker_processes() -> set[int]:
    return {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if b"node_agent.target_workers" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_a_worker_that_cannot_open_its_lun_stops_the_start(tmp_path):
    (tmp_path / "b.img").mkdir()  # a directory where B's backing file should be
    before = worker_processes()
    with pytest.raises(RuntimeError) as failed:
        with started(tmp_path):
            pass
    assert "worker 1" in str(failed.value) and "b.img" in str(failed.value)
    wait_gone(list(worker_processes() - before))


def test_more_workers_than_targets_is_a_usage_error(tmp_path):
    result = run(sys.executable, "-m", "node_agent.cli", "target", "--listen", "127.0.0.1:0", "--lun",
                 f"{tmp_path / 'a.img'}:1M", "--workers", "2", check=False)
    assert result.returncode == 2 and "--workers 2 needs at least 2 targets" in result.stderr
    assert not (tmp_path / "a.img").exists()



def test_sigterm_to_every_process_at_once_is_a_clean_stop(tmp_path):
    """systemd's KillMode=control-group sends SIGTERM to the workers too, often before the parent has begun
    its own stop: a worker that stopped cleanly on it was taken for one that died (exit 1, ERROR lines)."""
    for _ in range(3):
        with started(tmp_path) as t:
            workers = children(t.pid)
            for pid in [t.pid, *workers]:
                os.kill(pid, signal.SIGTERM)
            assert t.process.wait(30) == 0, t.log()
            wait_gone(workers)
            assert "exited while serving" not in t.log()


def test_connections_that_send_part_of_a_first_pdu_cost_the_parent_little(tmp_path):
    """The parent peeked at a connection whose first PDU had not all come every 2 ms: 64 such connections
    from one address took a quarter of its core.  Peeks back off while nothing new arrives."""
    with started(tmp_path) as t:
        host, port = t.url(0).split("//")[1].split("/")[0].rsplit(":", 1)
        conns = [socket.create_connection((host, int(port))) for _ in range(64)]
        try:
            for conn in conns:
                conn.sendall(b"\x43")  # one byte of a Login Request, then nothing
            time.sleep(1.0)  # the back-off reaches its longest
            before = _cpu_seconds(t.pid)
            time.sleep(3.0)
            share = (_cpu_seconds(t.pid) - before) / 3.0
        finally:
            for conn in conns:
                conn.close()
        assert share < 0.05, f"the parent used {share:.0%} of a core on 64 stalled first PDUs"
        # Closed, they are let go at the next peek (not after the 15 s login timeout): the address, which
        # had all the 64 connections it may have waiting, may connect again.
        require_tools("qemu-io")
        time.sleep(0.5)
        run("qemu-io", "-f", "raw", "-c", "read 0 4k", url(t, A))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sendtargets_in_a_workers_session_lists_every_portal(tmp_path):
    """RFC 7143 Appendix C: SendTargets lists every portal of the group.  A worker listens on none itself, so
    in its sessions it listed only the address the initiator reached; the parent now tells it its portals."""
    from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient

    with started(tmp_path, extra=["--listen", "127.0.0.2:0"]) as t:
        host, port = t.url(0).split("//")[1].split("/")[0].rsplit(":", 1)

        async def ask():
            settings = ClientSettings(initiator_iqn="iqn.2026-11.io.shoal.test:st", login_timeout=10)
            async with IscsiClient(host, int(port), A, settings=settings) as client:
                return await client.text([("SendTargets", "")])

        answer = asyncio.run(ask())
    addresses = [value for key, value in answer if key == "TargetAddress"]
    assert len(addresses) == 2 and any(a.startswith("127.0.0.2:") for a in addresses), answer


def test_the_login_time_limit_counts_from_the_parents_accept_not_from_the_hand_over(tmp_path):
    """A first Login PDU the parent waited 10 s for, then a login that goes no further: the worker gave it
    another 15 s from the hand-over (25 s in all); one process closes it 15 s after it connected."""
    from node_agent.iscsi import pdu as P
    from node_agent.iscsi.keys import encode_text

    text = encode_text([("InitiatorName", "iqn.2026-11.io.shoal.test:slow"), ("TargetName", A),
                        ("SessionType", "Normal"), ("AuthMethod", "None")])
    first = b"".join(bytes(p) for p in P.encode_pdu(P.Opcode.LOGIN_REQUEST, text, immediate=True, transit=False,
                                                     csg=0, nsg=1, isid=0x400001370001, tsih=0, itt=1, cid=0,
                                                     cmdsn=1, expstatsn=0))
    with started(tmp_path) as t:
        host, port = t.url(0).split("//")[1].split("/")[0].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as conn:
            start = time.monotonic()
            conn.sendall(first[:-1])
            time.sleep(10)
            conn.sendall(first[-1:])  # now the parent hands it to the worker, which answers and waits
            conn.settimeout(40)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
            held = time.monotonic() - start
    assert 14 <= held <= 18, f"closed after {held:.1f} s (login timeout 15 s)"


def _spawn_target(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``shoal target --workers 2`` started without waiting for it to serve (``started`` waits)."""
    log_path = tmp_path / f"target-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "node_agent.cli", "target", "--listen", "127.0.0.1:0", "--iqn", A, "--lun",
            f"{tmp_path / 'a.img'}:16M", "--iqn", B, "--lun", f"{tmp_path / 'b.img'}:16M", "--workers", "2",
            "--port-file", str(tmp_path / "port")]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    return process, log_path


def test_sigterm_to_workers_while_they_start_is_a_clean_stop(tmp_path):
    """systemd's default KillMode (control-group) signals the workers too: on a stop soon after the start one
    could come before a worker's handler was in place, and Python's default killed it (-15): the start
    failed (exit 1, "exited with status -15", a BrokenPipeError traceback from a worker whose parent had
    gone).  The parent now starts them with SIGTERM held back until their handler is in place."""
    for delay in (0.0, 0.1, 0.3):
        process, log_path = _spawn_target(tmp_path)
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 20
            while len(workers) < 2:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                workers = children(process.pid)
                time.sleep(0.005)
            time.sleep(delay)
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            assert process.wait(30) == 0, log_path.read_text()
        finally:
            stop_process(process)
            wait_gone(workers)
        log = log_path.read_text()
        assert "ERROR" not in log and "Traceback" not in log, log
        assert log.count("stopped: sessions closed, data synced") == 3, log  # both workers and the parent


def test_a_worker_whose_parent_went_away_while_it_started_stops_without_a_traceback(tmp_path):
    """When one worker fails to start the parent closes the others' control sockets: a worker still starting
    then died of a BrokenPipeError (exit 1, a traceback in the log) telling its parent it was ready."""
    from node_agent.target_service import LunSpec, PortalConfig, TargetSpec
    from node_agent.target_workers import WorkerSpec

    spec = WorkerSpec(0, [TargetSpec(A, [LunSpec(str(tmp_path / "a.img"), MiB)])], PortalConfig(), None, None,
                      None)
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = subprocess.Popen([sys.executable, "-m", "node_agent.target_workers", str(child_end.fileno())],
                                   stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=[child_end.fileno()],
                                   cwd=REPO)
    finally:
        child_end.close()
        parent_end.close()  # gone before the worker could say it is ready
    try:
        _, stderr = process.communicate(pickle.dumps(spec), timeout=30)
    finally:
        stop_process(process)
    assert process.returncode == 0 and b"Traceback" not in stderr, stderr.decode(errors="replace")


def test_sigterm_to_one_serving_worker_stops_the_target_cleanly(tmp_path):
    """``kill`` of one worker (or systemd signalling the group): it closes its sessions, syncs and exits 0, and
    the parent takes that for a stop (exit 0, no ERROR), not for a crash."""
    require_tools("qemu-io")
    with started(tmp_path) as t:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5e 0 1M", url(t, B))
        workers = children(t.pid)
        os.kill(workers[1], signal.SIGTERM)
        assert t.process.wait(30) == 0, t.log()
        wait_gone(workers)
        log = t.log()
    assert "ERROR" not in log and "worker 1 stopped: sessions closed, data synced" in log, log
    assert (tmp_path / "b.img").read_bytes()[:MiB] == b"\x5e" * MiB


def test_a_target_name_in_another_case_reaches_its_worker(tmp_path):
    """RFC 7143 §4.2.7.2: a TargetName in another case names the same target, and one process serves it; the
    router looked it up as given, served the login itself and answered "service unavailable" forever."""
    require_tools("iscsi-inq")
    with started(tmp_path) as t:
        answer = run("iscsi-inq", url(t, B.upper())).stdout
        assert "DIRECT_ACCESS" in answer, answer
        log = t.log()
    assert "served by another process" not in log
    assert any("[worker 1]" in line and "login: " in line for line in log.splitlines()), log


def _raw_login(host: str, port: int, target: str, wait: bool) -> None:
    """One connection whose first PDU is a whole Normal-session login to ``target``, closed after its answer
    (``wait``) or at once."""
    text = f"InitiatorName=iqn.2026-11.io.shoal.test:fd\0TargetName={target}\0AuthMethod=None\0".encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(_login_pdu(text, opcode=0x43))
        if wait:
            assert len(_answer(sock)) == 48


def test_a_stopped_worker_leaves_the_others_served_and_hand_overs_leak_no_descriptor(tmp_path):
    """A hung worker (SIGSTOP) takes no connections: the ones for its target queue on its control socket, then
    are dropped; the parent goes on answering discovery and routing to the other worker.  After 200
    hand-overs, some dropped, the parent holds exactly the file descriptors it held before."""
    require_tools("iscsi-inq", "iscsi-ls")
    with started(tmp_path) as t:
        workers = children(t.pid)
        fds = lambda: len(os.listdir(f"/proc/{t.pid}/fd"))  # noqa: E731
        before = fds()
        os.kill(workers[1], signal.SIGSTOP)
        try:
            for _ in range(100):
                _raw_login(t.host, t.port, A, wait=True)
                _raw_login(t.host, t.port, B, wait=False)
            assert "DIRECT_ACCESS" in run("iscsi-inq", url(t, A), timeout=20).stdout
            assert B in run("iscsi-ls", f"iscsi://{t.portal}/", timeout=20).stdout
        finally:
            os.kill(workers[1], signal.SIGCONT)
        # Served again, once the worker has taken (and closed) the connections queued for it meanwhile: their
        # initiators gone, they count a moment among the address's connections in the login phase.
        deadline = time.monotonic() + 10
        while "DIRECT_ACCESS" not in run("iscsi-inq", url(t, B), check=False, timeout=20).stdout:
            assert time.monotonic() < deadline, t.log()[-3000:]
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while fds() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds() == before
        assert len(children(t.pid)) == 2
