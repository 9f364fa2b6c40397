"""The target core's own Python cost per 4 KiB command, without sockets: steady on a loaded machine.

``bench_targets.py`` and ``bench_ab.py`` measure the whole target (system calls,
the event loop, the kernel's TCP), and on a shared 2-core machine their CPU
per I/O moves with the load, which changes how many commands each receive
carries.  This measures only what Python does per command: a real
``TargetConnection`` (logged in, unit attention taken) over a real
``LogicalUnit`` on a ``FileBackingStore`` whose file is in the page cache is fed
batches of 32 pre-encoded SCSI commands (READ(10) or WRITE(10) of 4 KiB with
immediate data, as QEMU at depth 32 sends them) through ``get_buffer`` /
``buffer_updated``, the way the transport does, and its output is taken with
``take_output`` after each batch (not sent).  It prints CPU µs per command
(``time.process_time``; the median of ``--rounds``), so two source trees can be
compared in alternating rounds:

    .venv/bin/python tests/perf/bench_core.py --tree new=. --tree old=/tmp/wt-3f33269

``--workload 4k-read-digests`` / ``4k-write-digests``: the same with header and data digests
(CRC32C) negotiated; ``4k-read-hd`` / ``4k-write-hd``: header digest only (``bench_targets.py``'s
HD rows).  ``--profile FILE`` writes a cProfile of one tree's run instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = int(os.environ.get("SHOAL_BENCH_BATCH", "32"))  # commands per receive (--batch)
BLOCK = 512


def _child(workload: str, batches: int, profile: str | None) -> dict:
    """Run inside the tree under test (its ``node_agent`` first on ``sys.path``)."""
    from node_agent.iscsi import pdu as P
    from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
    from node_agent.iscsi.keys import TargetSettings, encode_text
    from node_agent.iscsi.pdu import Opcode
    from node_agent.iscsi.target import TargetNode, TargetRegistry
    from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
    from node_agent.storage.backing import FileBackingStore

    target, initiator = "iqn.2026-11.io.shoal.test:core", "iqn.2026-11.io.shoal.test:bench"
    with tempfile.TemporaryDirectory(prefix="shoal-core-") as tmp:
        path = Path(tmp) / "disk.img"
        size = 16 << 20
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
        store = FileBackingStore(str(path), size)
        lu = LogicalUnit(store, LunIdentity(volume_id="vol-core"), target_name=target)
        registry = TargetRegistry([TargetNode(target, LunMap({0: lu}))])
        conn = TargetConnection(registry, TargetSettings(), local_address=("127.0.0.1", 3260), peer="bench",
                                config=ConnectionSettings(nop_interval=0))

        def feed(data: bytes) -> None:
            view = memoryview(data)
            while view:
                buf = conn.get_buffer()
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                conn.buffer_updated(n)
                view = view[n:]

        digests = workload.endswith("-digests")  # header and data digests (CRC32C) on
        header_only = workload.endswith("-hd")  # header digest only, as qemu-img's HD rows negotiate

        def pdu(opcode, data=b"", *, login=False, **fields) -> bytes:
            hd = (digests or header_only) and not login
            return b"".join(bytes(p) for p in P.encode_pdu(opcode, data, header_digest=hd,
                                                            data_digest=digests and not login, **fields))

        digest = "CRC32C" if digests else "None"
        keys = [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C" if header_only else digest), ("DataDigest", digest),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"), ("MaxRecvDataSegmentLength", "262144"), ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144")]
        feed(pdu(Opcode.LOGIN_REQUEST, encode_text(keys), login=True, immediate=True, transit=True, csg=1, nsg=3,
                 isid=0x400001370000, tsih=0, itt=1, cid=0, cmdsn=1, expstatsn=0))
        conn.take_output()
        assert conn.header_digest == (digests or header_only) and conn.data_digest == digests
        cmdsn = 1
        write = workload.startswith("4k-write")
        payload = os.urandom(4096)

        def command(itt: int, lba: int) -> bytes:
            nonlocal cmdsn
            cdb = bytes([0x2A if write else 0x28, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, 8, 0])
            raw = pdu(Opcode.SCSI_COMMAND, payload if write else b"", final=True, read=not write, write=write,
                      attr=1, lun=bytes(8), itt=itt, expected_data_transfer_length=4096, cmdsn=cmdsn,
                      expstatsn=0, cdb=cdb.ljust(16, b"\0"))
            cmdsn += 1
            return raw

        feed(pdu(Opcode.SCSI_COMMAND, final=True, attr=1, lun=bytes(8), itt=2, expected_data_transfer_length=0,
                 cmdsn=cmdsn, expstatsn=0, cdb=bytes(16)))  # TEST UNIT READY takes the unit attention
        cmdsn += 1
        conn.take_output()
        blocks = size // BLOCK
        encoded = [b"".join(command(0x1000 + i, (b * BATCH + i) * 8 % blocks) for i in range(BATCH))
                   for b in range(batches)]
        for data in encoded[:8]:  # warm-up (and a check that every command got its answer)
            feed(data)
            out = conn.take_output()
            assert len(out) >= BATCH, out
        profiler = None
        if profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        start = time.process_time()
        for data in encoded[8:]:
            feed(data)
            conn.take_output()
        elapsed = time.process_time() - start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        assert not conn.closing, conn.close_reason
        store.close()
    return {"us_per_command": elapsed / ((batches - 8) * BATCH) * 1e6}


def run_tree(path: str, workload: str, batches: int, profile: str | None = None) -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
    args = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", workload, "--batches", str(batches)]
    if profile:
        args += ["--profile", profile]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["us_per_command"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (repeatable)")
    parser.add_argument("--workload", action="append",
                        choices=["4k-read", "4k-write", "4k-read-hd", "4k-write-hd", "4k-read-digests",
                                 "4k-write-digests"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="commands per receive (32; QEMU's 4 KiB writes at depth 32 arrive ~4 at a time)")
    parser.add_argument("--batches", type=int, default=400, help="batches of 32 commands per round")
    parser.add_argument("--profile", help="write a cProfile of the first tree's run to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["SHOAL_BENCH_BATCH"] = str(args.batch)  # for the children
    if args.child:
        print(json.dumps(_child(args.child, args.batches, args.profile)))
        return 0
    trees = dict(item.split("=", 1) for item in (args.tree or ["this=" + str(Path(__file__).resolve().parents[2])]))
    for workload in args.workload or ["4k-read", "4k-write"]:
        if args.profile:
            name, path = next(iter(trees.items()))
            run_tree(path, workload, args.batches, args.profile)
            print(f"{workload}: profile of {name} in {args.profile}")
            continue
        results: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, path in trees.items():
                results[name].append(run_tree(path, workload, args.batches))
        print(f"{workload}: {args.batch} commands per receive, {args.batches} batches, {args.rounds} alternating rounds")
        for name, values in results.items():
            each = " ".join(f"{v:.2f}" for v in values)
            print(f"  {name:>12}: {statistics.median(values):6.2f} µs CPU per command   (rounds: {each})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
