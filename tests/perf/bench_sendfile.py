"""What sending a large read costs the kernel here: ``sendfile`` versus ``pread`` + ``send``.

Issue 7 asks for 1 MiB reads at 3x tgtd.  Shoal's target sends a read of 64 KiB
or more (``LunSettings.file_range_threshold``) with ``os.sendfile`` straight
from the page cache; tgtd and istgt ``pread`` into a buffer and send that.  On
some hosts of this lab ``sendfile`` over loopback costs several times what it
did on others, and Shoal's 1 MiB read row moves with it, whatever Shoal's own
code does.  This measures the sending end alone, without iSCSI: a child
process receives over one loopback TCP connection (1 MiB ``recv_into`` calls)
and this process sends ``--mib`` MiB of a file in the page cache in 1 MiB
pieces, one of four ways:

- ``sendfile``: ``os.sendfile`` from the file (Shoal's target today);
- ``pread``: ``os.preadv`` into one reused buffer, then ``sendall`` (what
  tgtd and istgt do);
- ``mmap``: ``sendall`` of a slice of a read-only shared mapping of the file (one copy, from the page
  cache; inside the target this lost to ``sendfile``: tests/perf/README.md);
- ``send``: ``sendall`` of a buffer already in memory: the floor of any sender.

It prints, per mode, the medians over ``--runs`` alternating runs of MiB/s and
of the sender's CPU per MiB (``getrusage``: user + system; over loopback the
sender also pays for delivering into the receiver's socket).  Run:
``.venv/bin/python tests/perf/bench_sendfile.py --runs 6``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its neighbour, also when imported from elsewhere
from bench_splice import alternate, forked_peer, print_medians  # noqa: E402

PIECE = 1 << 20
FILE_MIB = 256


def one_run(mode: str, mib: int, path: str) -> tuple[float, float]:
    """(MiB/s, sender CPU µs per MiB) of one run."""
    fd = os.open(path, os.O_RDONLY)

    def receive(into: socket.socket) -> None:
        buf = bytearray(PIECE)
        while into.recv_into(buf):
            pass
    sock, pid = forked_peer(receive)
    buf = bytearray(PIECE)
    mapped = mmap.mmap(fd, FILE_MIB * PIECE, mmap.MAP_SHARED, mmap.PROT_READ) if mode == "mmap" else None
    view = memoryview(mapped) if mapped is not None else None
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for piece in range(mib):
        offset = piece % FILE_MIB * PIECE
        if mode == "sendfile":
            left = PIECE
            while left:
                sent = os.sendfile(sock.fileno(), fd, offset, left)
                offset += sent
                left -= sent
        elif mode == "pread":
            os.preadv(fd, [buf], offset)
            sock.sendall(buf)
        elif mode == "mmap":
            sock.sendall(view[offset:offset + PIECE])
        else:
            sock.sendall(buf)
    end, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    os.waitpid(pid, 0)
    if mapped is not None:
        view.release()
        mapped.close()
    os.close(fd)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return mib / (end - start), cpu / mib * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", action="append", choices=["sendfile", "pread", "mmap", "send"])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--mib", type=int, default=2048, help="MiB per run")
    args = parser.parse_args(argv)
    modes = args.mode or ["sendfile", "pread", "mmap", "send"]
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "source.img")
        with open(path, "wb") as handle:  # written once, so every run reads cached pages
            for _ in range(FILE_MIB):
                handle.write(os.urandom(PIECE))
        alternate(results, args.runs, lambda mode: one_run(mode, args.mib, path))
    print_medians(results, "sender")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
