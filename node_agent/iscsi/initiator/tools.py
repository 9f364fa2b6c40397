"""``shoal iscsi``: people's commands over Shoal's initiator, with libiscsi-style URLs.

``iscsi://[user[%secret]@]host[:port]/target-iqn/lun[?target_user=U&target_password=P]``
is parsed exactly as libiscsi's tools take it, so the same URL works with
``iscsi-inq``, ``qemu-img`` and ``shoal iscsi``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from node_agent import eventloop
from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient, SessionLost, discover
from node_agent.iscsi.initiator.core import InitiatorError, LoginError, aligned_buffer
from node_agent.iscsi.keys import parse_digest_list

DEFAULT_INITIATOR = "iqn.2026-11.io.shoal:initiator"
MAX_LUN = 16384  # SAM-5 flat space addressing: LUNs 0 to 16383 (``encode_lun``)
MAX_LBA = 1 << 64  # SBC: a 64-bit logical block address


def masked_url(text: str) -> str:
    """``text`` with the secrets of an iSCSI URL replaced by ``***`` (the initiator's, after the user name,
    and ``target_password``): what error messages quote, as they end up in terminals, logs and CI output."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if at:
        cut = userinfo.find("%") if "%" in userinfo else userinfo.find(":")
        if cut >= 0:
            userinfo = userinfo[:cut + 1] + "***"
        netloc = f"{userinfo}@{host}"
    tail = re.sub(r"(target_password=)[^&#]*", r"\1***", tail)
    return f"{scheme}{sep}{netloc}{tail}"


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
        """As libiscsi's ``iscsi_parse_url``: the user part is split at its first ``%`` (else its first ``:``)
        into user and secret, and each is percent-decoded after the split (so a ``%`` in a secret is written
        ``%25``); an empty user or secret means no CHAP.  Query values are percent-decoded, a ``+`` staying
        a ``+`` (it is no space here).  Unlike libiscsi, a ``target_user`` without ``target_password`` (or the
        reverse) is refused rather than dropped: the target would go unauthenticated without a word.  Port 0
        is refused.  Errors quote the URL with its secrets masked (``masked_url``)."""
        shown = repr(masked_url(text))
        parts = urlsplit(text)
        if parts.scheme != "iscsi" or not parts.hostname:
            raise ValueError(f"{shown}: expected iscsi://[user%secret@]host[:port]/target-iqn/lun")
        chap = None
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at:
            cut = userinfo.find("%") if "%" in userinfo else userinfo.find(":")
            user, secret = (userinfo[:cut], userinfo[cut + 1:]) if cut >= 0 else (userinfo, "")
            user, secret = unquote(user), unquote(secret)
            chap = (user, secret) if user and secret else None
        path = [p for p in parts.path.split("/") if p]
        if need_lun and len(path) != 2:
            raise ValueError(f"{shown}: the path must be /target-iqn/lun")
        lun = None
        if len(path) >= 2:
            if not (path[1].isascii() and path[1].isdigit()) or int(path[1]) >= MAX_LUN:
                raise ValueError(f"{shown}: LUN {path[1]!r} is not a number from 0 to {MAX_LUN - 1}")
            lun = int(path[1])
        query: dict[str, str] = {}
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            query.setdefault(unquote(key), unquote(value))
        target_user, target_password = query.get("target_user", ""), query.get("target_password", "")
        if bool(target_user) != bool(target_password):
            # libiscsi would drop mutual CHAP without a word: the target would then go unauthenticated
            raise ValueError(f"{shown}: target_user and target_password go together (mutual CHAP)")
        mutual = (target_user, target_password) if target_user else None
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{shown}: {exc}") from None
        if port == 0:
            raise ValueError(f"{shown}: port 0 is no port to connect to")
        # An IPv6 zone is written %25 in a URL (RFC 6874): fe80::1%25eth0 is fe80::1%eth0
        return cls(unquote(parts.hostname), port or 3260, path[0] if path else "", lun, chap, mutual)


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
    p.add_argument("--lba", type=_lba, required=True)
    p.add_argument("--blocks", type=_positive, required=True)
    p.add_argument("--out", help="file to write the data to (default: stdout)")
    p = verbs.add_parser("write", help="write blocks from --in FILE (or stdin) at --lba")
    p.add_argument("url")
    p.add_argument("--lba", type=_lba, required=True)
    p.add_argument("--in", dest="infile", help="file with the data (a multiple of the block size)")
    p.add_argument("--fua", action="store_true", help="Force Unit Access: durable before the write returns")
    p = verbs.add_parser("bench", help="a small load generator: random I/O at a queue depth")
    p.add_argument("url")
    p.add_argument("--size", type=_size, default=4096, help="bytes per I/O (default 4096)")
    p.add_argument("--depth", type=_positive, default=32)
    p.add_argument("--seconds", type=_duration, default=5.0, help="how long to run (default 5)")
    p.add_argument("--write", action="store_true", help="write instead of read")
    p.add_argument("--sequential", action="store_true", help="sequential instead of random offsets")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")


def _whole(text: str) -> int:
    if not (text.isascii() and text.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _lba(text: str) -> int:
    """A logical block address: 0 to 2**64 - 1 (READ(16)/WRITE(16) carry 64 bits)."""
    value = _whole(text)
    if value >= MAX_LBA:
        raise argparse.ArgumentTypeError(f"{value} is beyond the last possible LBA ({MAX_LBA - 1})")
    return value


def _digests(text: str) -> tuple[str, ...]:
    try:
        return parse_digest_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _duration(text: str) -> float:
    """Seconds to run: a finite number above 0 and at most a day (``float`` alone takes nan, inf and -1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86400:  # nan compares false: refused too
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, a number above 0 and at most 86400")
    return value


def _size(text: str) -> int:
    """Bytes per I/O: ``4096``, ``64k``, ``1m``; a positive multiple of 512."""
    units = {"k": 1 << 10, "m": 1 << 20}
    number, unit = (text[:-1], units[text[-1].lower()]) if text[-1:].lower() in units else (text, 1)
    if not (number.isascii() and number.isdigit()) or int(number) * unit <= 0 or int(number) * unit % 512:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive multiple of 512 bytes (a suffix k or m)")
    return int(number) * unit


def run(args: argparse.Namespace) -> int:
    try:
        return _run_loop(_VERBS[args.verb](args))
    except ValueError as exc:  # a bad URL or argument (whose message masks the URL's secrets)
        print(f"shoal iscsi: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # "[Errno 111] Connection refused" alone does not say where
        print(f"shoal iscsi: {_portal_of(args)}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (LoginError, InitiatorError, SessionLost, CommandFailed, OSError) as exc:
        print(f"shoal iscsi: {exc}", file=sys.stderr)
        return 1


def _portal_of(args: argparse.Namespace) -> str:
    """``HOST:PORT`` of the URL the command was given (it parsed before anything connected)."""
    url = IscsiUrl.parse(args.url, need_lun=False)
    return f"[{url.host}]:{url.port}" if ":" in url.host else f"{url.host}:{url.port}"


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
    if args.lba + args.blocks > MAX_LBA:
        raise ValueError(f"--lba {args.lba} --blocks {args.blocks} goes past the last possible LBA ({MAX_LBA - 1})")
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
