"""CRC32C header digests between QEMU's libiscsi driver and ``shoal target``; a target requiring digests.

RFC 7143 §13.1 (HeaderDigest, DataDigest keys), §12.1 (CRC32C), §6.2.1 (list
negotiation: the responder answers with the first value of the originator's
list that it supports). QEMU's ``iscsi`` block driver (qemu-block-extra,
libiscsi 1.19) takes ``header-digest=crc32c|crc32c-none|none-crc32c|none``
and sends it as ``HeaderDigest=CRC32C``, ``CRC32C,None``, ``None,CRC32C``,
``None``. libiscsi always offers ``DataDigest=None`` (its login code has no
data digest at all), so data digests are exercised by the kernel initiator
in ``test_kernel_initiator.py`` instead.

Whether a digest was really negotiated is read from the target's own login
line (``login: ... HeaderDigest=CRC32C DataDigest=None``, INFO level): if the
two sides disagreed, the first PDU after login would be misframed and the
I/O would fail, so a passing transfer with that line means digests were on
the wire in both directions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.support.shoal_target import ShoalTarget, running_shoal_target

pytestmark = pytest.mark.peer
MiB = 1 << 20
_LOGIN = re.compile(r"login: \S+ isid=\S+ to (\S+) \(tsih \d+, Normal, HeaderDigest=(\w+) DataDigest=(\w+)\)")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def image_opts(target: ShoalTarget, header_digest: str | None, lun: int = 0) -> str:
    """``--image-opts`` for QEMU's iscsi driver (QAPI ``BlockdevOptionsIscsi``)."""
    opts = f"driver=iscsi,transport=tcp,portal={target.portal},target={target.iqn},lun={lun}"
    return opts + (f",header-digest={header_digest}" if header_digest else "")


def normal_logins(target: ShoalTarget, since: int = 0) -> list[tuple[str, str]]:
    """(HeaderDigest, DataDigest) of every Normal-session login logged after byte ``since``."""
    return [(m.group(2), m.group(3)) for m in _LOGIN.finditer(target.log()[since:]) if m.group(1) == target.iqn]


@pytest.fixture
def target(tmp_path):
    require_tools("qemu-img", "qemu-io")
    with running_shoal_target(tmp_path, luns=[("disk0", 16 * MiB)]) as t:
        yield t


def test_qemu_img_16mib_round_trip_with_header_digest(target, tmp_path):
    """16 MiB of random data written and read back with HeaderDigest=CRC32C on both logins."""
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(16 * MiB))
    back = tmp_path / "back.bin"
    opts = image_opts(target, "crc32c")
    run("qemu-img", "convert", "-n", "--image-opts", f"driver=file,filename={source}", "--target-image-opts", opts)
    run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(back))
    data = source.read_bytes()
    assert back.read_bytes() == data, "data read back over iSCSI differs from what was written"
    assert Path(target.lun_paths[0]).read_bytes() == data, "the backing file differs from what was written"
    logins = normal_logins(target)
    assert logins == [("CRC32C", "None")] * 2, f"expected two logins with HeaderDigest=CRC32C:\n{target.log()}"


def test_qemu_io_commands_with_header_digest(target):
    """WRITE, READ, WRITE SAME/zeroes, UNMAP, SYNCHRONIZE CACHE and queued AIO, all under header digests."""
    commands = [
        "write -P 0xab 0 1M", "read -P 0xab 0 1M",
        "write -z 1M 1M", "read -P 0 1M 1M",
        "discard 2M 1M", "read -P 0 2M 1M",
        "flush",
        "aio_write -P 0x5a 3M 64k", "aio_write -P 0xa5 4M 512", "aio_flush",
        "read -P 0x5a 3M 64k", "read -P 0xa5 4M 512",
        "write -P 0x11 16383k 1k", "read -P 0x11 16383k 1k",
    ]
    argv = ["qemu-io", "--image-opts", image_opts(target, "crc32c")]
    for command in commands:
        argv += ["-c", command]
    out = run(*argv).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert normal_logins(target) == [("CRC32C", "None")], target.log()


@pytest.mark.parametrize(
    ("offer", "expected"),
    [("crc32c", "CRC32C"), ("crc32c-none", "CRC32C"), ("none-crc32c", "None"), ("none", "None"), (None, "None")],
)
def test_header_digest_negotiation(target, offer, expected):
    """The target answers with the first value of the initiator's list it supports (RFC 7143 §6.2.1)."""
    argv = ["qemu-io", "--image-opts", image_opts(target, offer), "-c", "write -P 0x3c 8M 64k", "-c", "read -P 0x3c 8M 64k"]
    out = run(*argv).stdout
    assert "Pattern verification failed" not in out, out
    assert normal_logins(target) == [(expected, "None")], target.log()


def test_a_target_that_requires_digests(tmp_path):
    """``shoal target --header-digest CRC32C --data-digest CRC32C``: QEMU (libiscsi offers DataDigest=None
    only) is refused at login and the target keeps serving; Shoal's initiator offering CRC32C,None gets both
    digests, and one offering only None is refused with the key named."""
    require_tools("qemu-io")
    digests = ["--header-digest", "CRC32C", "--data-digest", "crc32c"]
    with running_shoal_target(tmp_path, luns=[("disk0", 16 * MiB)], extra_args=digests) as t:
        refused = subprocess.run(["qemu-io", "--image-opts", image_opts(t, "crc32c"), "-c", "read 0 4k"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "Initiator error" in refused.stderr, refused.stdout + refused.stderr
        assert "refused: DataDigest: none of 'None' is acceptable to us (CRC32C)" in t.log(), t.log()
        assert normal_logins(t) == [], t.log()

        def shoal_iscsi(*offer: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "node_agent.cli", "iscsi", *offer, "bench", t.url(0),
                                   "--seconds", "0.5", "--depth", "4", "--write", "-o", "json"],
                                  capture_output=True, text=True, timeout=60)
        ok = shoal_iscsi("--header-digest", "None,CRC32C", "--data-digest", "None,CRC32C")
        assert ok.returncode == 0, ok.stderr
        negotiated = json.loads(ok.stdout)["negotiated"]
        assert negotiated["HeaderDigest"] is True and negotiated["DataDigest"] is True
        assert normal_logins(t) == [("CRC32C", "CRC32C")], t.log()
        plain = shoal_iscsi()
        assert plain.returncode == 1 and "login failed: initiator error" in plain.stderr, plain.stderr
        assert "this login offered HeaderDigest=None, DataDigest=None" in plain.stderr, plain.stderr
        assert normal_logins(t) == [("CRC32C", "CRC32C")], t.log()  # no session without digests
