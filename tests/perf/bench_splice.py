"""What receiving a large write costs the kernel here: ``recv`` + ``pwrite`` versus ``splice``.

Issue 7 asks for 1 MiB writes at 2.5x tgtd.  The target's cost per 1 MiB
write is mostly the kernel's (receiving the payload, writing it into the page
cache), so this measures those alone, without iSCSI: a child process streams
``--mib`` MiB over one loopback TCP connection in 256 KiB pieces (the
negotiated segment size) and this process takes them in one of four ways,
each piece with one call as the target does (``MSG_WAITALL`` for ``recv``):

- ``recv``: ``recv_into`` a buffer, then ``os.pwrite`` it to a file (the
  target today: direct placement, then the write);
- ``splice``: ``os.splice`` socket -> pipe (1 MiB) -> the file at the offset
  (no copy into user memory; the pipe-to-file step still copies into the
  page cache);
- ``mmap``: ``recv_into`` straight into a shared mapping of the file (one
  copy, by the kernel, into the page cache; a page the kernel cannot fault in
  fails the receive with EFAULT, no SIGBUS, since only the kernel touches it);
- ``recvonly``: ``recv_into`` only: the floor of any receiver.

It prints, per mode, the medians over ``--runs`` alternating runs of MiB/s
and of the receiver's CPU per MiB (``getrusage``: user + system).  Run:
``.venv/bin/python tests/perf/bench_splice.py --runs 6``.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import resource
import socket
import statistics
import tempfile
import time

PIECE = 256 * 1024
F_SETPIPE_SZ = 1031


def one_run(mode: str, mib: int, path: str) -> tuple[float, float]:
    """(MiB/s, receiver CPU µs per MiB) of one run."""
    fd = os.open(path, os.O_RDWR)
    limit = os.fstat(fd).st_size

    def send(out: socket.socket) -> None:
        data = b"\x5a" * PIECE
        for _ in range(mib * (1 << 20) // PIECE):
            out.sendall(data)
    sock, pid = forked_peer(send)
    got = offset = 0
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if mode == "splice":
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        while count := os.splice(sock.fileno(), w, PIECE):
            left = count
            while left:
                moved = os.splice(r, fd, left, offset_dst=offset % limit)
                offset += moved
                left -= moved
            got += count
        os.close(r)
        os.close(w)
    elif mode == "mmap":
        mapped = mmap.mmap(fd, limit, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(mapped)
        while count := sock.recv_into(view[(at := offset % limit):at + PIECE], 0, socket.MSG_WAITALL):
            offset += count
            got += count
        view.release()
        mapped.close()
    else:
        buf = bytearray(PIECE)
        while count := sock.recv_into(buf, PIECE, socket.MSG_WAITALL):
            if mode == "recv":
                os.pwrite(fd, memoryview(buf)[:count], offset % limit)
            offset += count
            got += count
    end, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    sock.close()
    os.close(fd)
    done = got / (1 << 20)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return done / (end - start), cpu / done * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", action="append", choices=["recv", "splice", "mmap", "recvonly"])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--mib", type=int, default=2048, help="MiB per run")
    args = parser.parse_args(argv)
    modes = args.mode or ["recv", "splice", "mmap", "recvonly"]
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "target.img")
        with open(path, "wb") as handle:  # 64 MiB, written once: the runs rewrite cached pages
            for _ in range(64):
                handle.write(b"\x01" * (1 << 20))
        alternate(results, args.runs, lambda mode: one_run(mode, args.mib, path))
    print_medians(results, "receiver")
    return 0


def forked_peer(run) -> tuple[socket.socket, int]:
    """One loopback TCP connection whose other end is a child process running ``run(its socket)``: (this end,
    the child's PID, to ``waitpid``)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        try:
            with socket.create_connection(listener.getsockname()) as peer:
                run(peer)
        finally:
            os._exit(0)
    sock, _ = listener.accept()
    listener.close()
    return sock, pid


def alternate(results: dict[str, list[tuple[float, float]]], runs: int, run) -> None:
    """``runs`` rounds of ``run(mode)`` for each mode of ``results`` in turn, appended there."""
    for _ in range(runs):
        for mode in results:
            results[mode].append(run(mode))


def print_medians(results: dict[str, list[tuple[float, float]]], side: str) -> None:
    """Per mode: the medians of MiB/s and of ``side``'s CPU per MiB, and each run's CPU."""
    for mode, runs in results.items():
        print(f"{mode:9s} {statistics.median(r[0] for r in runs):7.0f} MiB/s"
              f"   {side} {statistics.median(r[1] for r in runs):5.0f} µs CPU per MiB"
              f"   (runs: {' '.join(f'{r[1]:.0f}' for r in runs)})")


if __name__ == "__main__":
    raise SystemExit(main())
