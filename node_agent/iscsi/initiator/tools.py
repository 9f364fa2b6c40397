"""``shoal iscsi``: people's commands over Shoal's initiator, with libiscsi-style URLs.

``iscsi://[user[%secret]@]host[:port]/target-iqn/lun[?target_user=U&target_password=P]``
is parsed exactly as libiscsi's tools take it, so the same URL works with
``iscsi-inq``, ``qemu-img`` and ``shoal iscsi``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from node_agent import eventloop
from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient, SessionLost, discover
from node_agent.iscsi.initiator.core import InitiatorError, LoginError, aligned_buffer
from node_agent.iscsi.keys import parse_digest_list

DEFAULT_INITIATOR = "iqn.2026-11.io.shoal:initiator"


@dataclass(frozen=True)
class IscsiUrl:
    host: str
    port: int
    target: str
    lun: int | None
    chap: tuple[str, str] | None
    mutual_chap: tuple[str, str] | None

    @classmethod
    def parse(cls, text: str, *, need_lun: bool = True) -> "IscsiUrl":
        parts = urlsplit(text)
        if parts.scheme != "iscsi" or not parts.hostname:
            raise ValueError(f"{text!r}: expected iscsi://[user%secret@]host[:port]/target-iqn/lun")
        chap = None
        if parts.username is not None:
            user, _, secret = unquote(parts.netloc.rpartition("@")[0]).partition("%")
            chap = (user, secret)
        path = [p for p in parts.path.split("/") if p]
        if need_lun and len(path) != 2:
            raise ValueError(f"{text!r}: the path must be /target-iqn/lun")
        lun = None
        if len(path) >= 2:
            if not path[1].isdigit():
                raise ValueError(f"{text!r}: LUN {path[1]!r} is not a number")
            lun = int(path[1])
        query = parse_qs(parts.query)
        mutual = None
        if "target_user" in query:
            mutual = (query["target_user"][0], query.get("target_password", [""])[0])
        try:
            port = parts.port or 3260
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return cls(parts.hostname, port, path[0] if path else "", lun, chap, mutual)


def build_parser(sub: argparse._SubParsersAction) -> None:
    iscsi = sub.add_parser("iscsi", help="Shoal's iSCSI initiator for people",
                           description="Discover targets and run I/O with Shoal's own initiator.")
    iscsi.add_argument("-i", "--initiator-name", default=DEFAULT_INITIATOR, help="our iSCSI name")
    for key in ("header", "data"):
        iscsi.add_argument(f"--{key}-digest", type=_digests, default=("None",), metavar="LIST",
                           help=f"{key.capitalize()}Digest values to offer, in order of preference: None (the "
                                "default), CRC32C (insist on it: the login fails if the target refuses), or "
                                "CRC32C,None / None,CRC32C (let the target choose)")
    verbs = iscsi.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("discover", help="SendTargets discovery: list targets and their portals")
    p.add_argument("portal", help="HOST[:PORT] or iscsi://[user%%secret@]host[:port]")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p = verbs.add_parser("inquiry", help="standard INQUIRY, capacity and identity (VPD 0x80/0x83)")
    p.add_argument("url")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p = verbs.add_parser("read", help="read blocks and write them to stdout (or --out FILE)")
    p.add_argument("url")
    p.add_argument("--lba", type=_natural, required=True)
    p.add_argument("--blocks", type=_positive, required=True)
    p.add_argument("--out", help="file to write the data to (default: stdout)")
    p = verbs.add_parser("write", help="write blocks from --in FILE (or stdin) at --lba")
    p.add_argument("url")
    p.add_argument("--lba", type=_natural, required=True)
    p.add_argument("--in", dest="infile", help="file with the data (a multiple of the block size)")
    p.add_argument("--fua", action="store_true", help="Force Unit Access: durable before the write returns")
    p = verbs.add_parser("bench", help="a small load generator: random I/O at a queue depth")
    p.add_argument("url")
    p.add_argument("--size", type=_size, default=4096, help="bytes per I/O (default 4096)")
    p.add_argument("--depth", type=_positive, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--write", action="store_true", help="write instead of read")
    p.add_argument("--sequential", action="store_true", help="sequential instead of random offsets")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _digests(text: str) -> tuple[str, ...]:
    try:
        return parse_digest_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    suffix = text[-1].lower()
    value = int(text[:-1]) * units[suffix] if suffix in units else int(text)
    if value <= 0 or value % 512:
        raise argparse.ArgumentTypeError("a positive multiple of 512")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        return _run_loop(_VERBS[args.verb](args))
    except ValueError as exc:
        print(f"shoal iscsi: {exc}", file=sys.stderr)
        return 2
    except (LoginError, InitiatorError, SessionLost, CommandFailed, OSError) as exc:
        print(f"shoal iscsi: {exc}", file=sys.stderr)
        return 1


def _run_loop(coro) -> int:
    return eventloop.run(coro)


def _settings(args, **settings) -> ClientSettings:
    return ClientSettings(initiator_iqn=args.initiator_name, header_digest=args.header_digest,
                          data_digest=args.data_digest, **settings)


def _client(args, url: IscsiUrl, **settings) -> IscsiClient:
    return IscsiClient(url.host, url.port, url.target, chap=url.chap, mutual_chap=url.mutual_chap,
                       settings=_settings(args, reconnect_timeout=5, **settings))


async def _discover(args) -> int:
    text = args.portal if args.portal.startswith("iscsi://") else f"iscsi://{args.portal}"
    url = IscsiUrl.parse(text, need_lun=False)
    found = await discover(url.host, url.port, chap=url.chap, mutual_chap=url.mutual_chap,
                           settings=_settings(args))
    if args.output == "json":
        print(json.dumps([{"target": name, "portals": portals} for name, portals in found]))
    else:
        for name, portals in found:
            print(f"{name}  {' '.join(portals)}")
    return 0


async def _inquiry(args) -> int:
    url = IscsiUrl.parse(args.url)
    async with _client(args, url) as client:
        device = LunDevice(client, url.lun or 0)
        standard = await device.inquiry()
        capacity = await device.read_capacity()
        naa, serial = await device.identity()
    info = {"vendor": standard[8:16].decode(errors="replace").strip(),
            "product": standard[16:32].decode(errors="replace").strip(),
            "revision": standard[32:36].decode(errors="replace").strip(),
            "device_type": standard[0] & 0x1F, "blocks": capacity.blocks, "block_size": capacity.block_size,
            "bytes": capacity.bytes, "naa": naa, "serial": serial}
    if args.output == "json":
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:<12} {value}")
    return 0


async def _read(args) -> int:
    url = IscsiUrl.parse(args.url)
    async with _client(args, url) as client:
        data = await LunDevice(client, url.lun or 0).read_blocks(args.lba, args.blocks)
    if args.out:
        with open(args.out, "wb") as handle:
            handle.write(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


async def _write(args) -> int:
    url = IscsiUrl.parse(args.url)
    if args.infile:
        with open(args.infile, "rb") as handle:
            data = handle.read()
    else:
        data = sys.stdin.buffer.read()
    async with _client(args, url) as client:
        await LunDevice(client, url.lun or 0).write_blocks(args.lba, data, fua=args.fua)
    print(f"wrote {len(data)} bytes at LBA {args.lba}", file=sys.stderr)
    return 0


async def _bench(args) -> int:
    url = IscsiUrl.parse(args.url)
    async with _client(args, url, queue_depth=args.depth) as client:
        device = LunDevice(client, url.lun or 0)
        capacity = await device.read_capacity()
        blocks = args.size // capacity.block_size
        span = capacity.blocks - blocks
        payload = aligned_buffer(args.size)  # aligned, as qemu-img's buffers (see aligned_buffer)
        payload[:] = os.urandom(args.size)
        count = 0
        deadline = time.perf_counter() + args.seconds
        rng = random.Random(1)
        position = 0
        sequential, write, span = args.sequential, args.write, max(span, 1)

        async def worker() -> None:
            nonlocal count, position
            buffer = aligned_buffer(args.size)  # each worker reads into its own buffer, as qemu-img bench does
            clock = time.perf_counter
            while clock() < deadline:
                if sequential:
                    lba, position = position, (position + blocks) % span
                else:
                    lba = rng.randrange(0, span // blocks) * blocks
                if write:
                    await device.write_blocks(lba, payload)
                else:
                    await device.read_into(lba, buffer)
                count += 1

        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.depth)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        params = client.params
    result = {"iops": round(count / elapsed), "mb_per_s": round(count * args.size / elapsed / 1e6, 1),
              "io_count": count, "seconds": round(elapsed, 2), "size": args.size, "depth": args.depth,
              "write": args.write, "initiator_cpu_us_per_io": round(cpu / max(count, 1) * 1e6, 1),
              "negotiated": {  # what decides the PDU sizes: Data-In is cut at the MaxRecvDataSegmentLength we declared
                  "MaxRecvDataSegmentLength": params.max_recv_data_segment_length,
                  "TargetMaxRecvDataSegmentLength": params.max_xmit_data_segment_length,
                  "MaxBurstLength": params.max_burst_length, "FirstBurstLength": params.first_burst_length,
                  "ImmediateData": params.immediate_data, "InitialR2T": params.initial_r2t,
                  "HeaderDigest": params.header_digest, "DataDigest": params.data_digest}}
    if args.output == "json":
        print(json.dumps(result))
    else:
        kind = "write" if args.write else "read"
        print(f"{kind} {args.size} B x depth {args.depth}: {result['iops']} IOPS, {result['mb_per_s']} MB/s, "
              f"{result['initiator_cpu_us_per_io']} µs initiator CPU per I/O over {result['seconds']} s")
    return 0


_VERBS = {"discover": _discover, "inquiry": _inquiry, "read": _read, "write": _write, "bench": _bench}
