"""Shoal's own initiator against tgtd (an independent target) and against ``shoal target`` (issue 3).

Discovery, CHAP, mutual CHAP, a wrong secret refused, 64 MiB of random data
written at depth 32 and read back identical, and a target restarted in the
middle of a stream of writes: the writes in flight complete after the
initiator reconnects and reinstates its session, and the data verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient, discover
from node_agent.iscsi.initiator.core import LoginError
from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target
from tests.support.tgtd import running_tgtd

pytestmark = pytest.mark.peer
MiB = 1 << 20
CHAP = ("alice", "initiator-secret-1")
MUTUAL = ("target", "target-secret-22")


@contextlib.contextmanager
def target_of(kind: str, tmp_path: Path, **kwargs):
    """(target, first LUN number) for tgtd (LUN 0 is its controller) or shoal target."""
    if kind == "tgtd":
        require_tools("tgtd", "tgtadm")
        with running_tgtd(tmp_path, luns=(("d", 128 * MiB),), **kwargs) as t:
            yield t, 1
    else:
        with running_shoal_target(tmp_path, luns=(("d", 128 * MiB),), **kwargs) as t:
            yield t, 0


def settings(**kw) -> ClientSettings:
    return ClientSettings(initiator_iqn="iqn.2026-11.io.shoal.test:initiator", **kw)


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
def test_discovery(kind, tmp_path):
    with target_of(kind, tmp_path) as (t, _):
        found = asyncio.run(discover(t.host, t.port, settings=settings()))
    assert [name for name, _ in found] == [t.iqn]
    assert found[0][1][0].startswith(f"{t.host}:{t.port},")


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
@pytest.mark.parametrize("mutual", [False, True], ids=["chap", "mutual-chap"])
def test_chap_and_wrong_secret(kind, mutual, tmp_path):
    with target_of(kind, tmp_path, chap=CHAP, mutual_chap=MUTUAL if mutual else None) as (t, lun):
        async def good():
            async with IscsiClient(t.host, t.port, t.iqn, settings=settings(), chap=CHAP,
                                   mutual_chap=MUTUAL if mutual else None) as client:
                return await LunDevice(client, lun).read_capacity()

        async def bad(chap, mutual_chap=None):
            client = IscsiClient(t.host, t.port, t.iqn, settings=settings(reconnect_timeout=0), chap=chap,
                                 mutual_chap=mutual_chap)
            with pytest.raises((LoginError, ConnectionError, Exception)) as exc:
                await client.connect()
            await client.close()
            return exc.value

        assert asyncio.run(good()).bytes == 128 * MiB
        refused = asyncio.run(bad(("alice", "the-wrong-secret")))
        assert isinstance(refused, (LoginError, ConnectionError)), refused
        if isinstance(refused, LoginError):
            assert (refused.status_class, refused.status_detail) == (2, 1)
        if mutual:  # a target that cannot prove the secret we expect is refused by us
            wrong_target = asyncio.run(bad(CHAP, ("target", "not-the-target-secret")))
            assert "mutual" in str(wrong_target) or isinstance(wrong_target, LoginError)


async def _write_read_64m(client: IscsiClient, lun: int, depth: int = 32) -> None:
    device = LunDevice(client, lun)
    data = os.urandom(64 * MiB)
    chunk = 256 * 1024
    slots = asyncio.Semaphore(depth)

    async def write(i):
        async with slots:
            await device.write(i * chunk, data[i * chunk:(i + 1) * chunk])

    async def read(i):
        async with slots:
            return await device.read(i * chunk, chunk)

    await asyncio.gather(*(write(i) for i in range(len(data) // chunk)))
    parts = await asyncio.gather(*(read(i) for i in range(len(data) // chunk)))
    assert b"".join(parts) == data


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
def test_64_mib_random_at_depth_32(kind, tmp_path):
    with target_of(kind, tmp_path) as (t, lun):
        async def run():
            async with IscsiClient(t.host, t.port, t.iqn, settings=settings(queue_depth=32)) as client:
                await _write_read_64m(client, lun)
        asyncio.run(run())


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
def test_target_restart_mid_stream(kind, tmp_path):
    """Writes in flight when the target dies complete once it is back; the data verifies."""
    data = os.urandom(32 * MiB)
    chunk = 128 * 1024
    with contextlib.ExitStack() as cleanup, target_of(kind, tmp_path / "first") as (t, lun):
        cleanup.callback(_stop_restarted)
        host, port, iqn, backing = t.host, t.port, t.iqn, t.lun_paths[0]

        async def run():
            client = await IscsiClient(host, port, iqn, settings=settings(queue_depth=32,
                                                                          reconnect_timeout=30)).connect()
            device = LunDevice(client, lun)
            slots = asyncio.Semaphore(32)
            total = len(data) // chunk
            done = 0
            quarter = asyncio.Event()
            done_at_kill = []

            async def write(i):
                nonlocal done
                async with slots:
                    await device.write(i * chunk, data[i * chunk:(i + 1) * chunk])
                done += 1
                if done >= total // 4:
                    quarter.set()

            async def restart():
                await quarter.wait()
                done_at_kill.append(done)
                await asyncio.to_thread(_restart, kind, t, tmp_path, backing, port)

            restarter = asyncio.create_task(restart())
            await asyncio.gather(*(write(i) for i in range(total)))
            await restarter
            assert done_at_kill[0] < total  # the target really died in the middle of the stream
            back = await device.read(0, len(data))
            await client.close()
            assert back == data

        asyncio.run(run())


_RESTARTED: list = []


def _restart(kind, t, tmp_path, backing, port):
    """Stop the target by PID and start it again on the same port with the same backing file."""
    if kind == "shoal":
        from tests.support.shoal_target import stop_process
        stop_process(t.process)
        cm = running_shoal_target(tmp_path / "second", luns=((str(backing), None),), iqn=t.iqn,
                                  listen=f"127.0.0.1:{port}")
    else:
        t.process.kill()
        t.process.wait(10)
        cm = running_tgtd(tmp_path / "second", luns=((str(backing), 0),), iqn=t.iqn, listen=f"127.0.0.1:{port}")
    _RESTARTED.append(cm)
    cm.__enter__()


def _stop_restarted():
    while _RESTARTED:
        _RESTARTED.pop().__exit__(None, None, None)


def test_dead_target_is_detected_and_reported(tmp_path):
    """A target that stops answering (SIGSTOP): NOP-Out pings time out, reconnects fail, commands get SessionLost."""
    import signal
    import time

    from node_agent.iscsi.initiator.client import SessionLost

    with running_shoal_target(tmp_path, luns=(("d", 8 * MiB),)) as t:
        async def run():
            client = await IscsiClient(t.host, t.port, t.iqn, settings=settings(
                nop_interval=0.5, nop_timeout=1.0, reconnect_timeout=2.0, login_timeout=1.0)).connect()
            device = LunDevice(client, 0)
            await device.read_capacity()
            os.kill(t.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(SessionLost):
                    await asyncio.wait_for(device.read(0, 4096), 30)
                assert time.monotonic() - started < 20
            finally:
                os.kill(t.pid, signal.SIGCONT)
                await client.close()

        asyncio.run(run())


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
def test_a_discard_is_split_within_the_luns_unmap_limits_or_refused(kind, tmp_path):
    """The whole of a 2 GiB LUN discarded: more blocks than one UNMAP command takes on shoal target
    (MAXIMUM UNMAP LBA COUNT 2^20, all descriptors of a command together, Block Limits page), so several
    commands; it reads back as zeros (LBPRZ).  tgtd's LUN takes no UNMAP (LBPME 0): the discard is refused with EOPNOTSUPP, and the FUSE export
    of such a LUN writes zeros for a punched range instead (``SyncLun.discard_zeroes``)."""
    import errno

    size = 2048 * MiB
    if kind == "tgtd":
        require_tools("tgtd", "tgtadm")
    cm = running_shoal_target(tmp_path, luns=(("d", size),)) if kind == "shoal" else \
        running_tgtd(tmp_path, luns=(("d", size),))
    with cm as t:
        lun = 0 if kind == "shoal" else 1

        async def run():
            client = await IscsiClient(t.host, t.port, t.iqn, settings=settings()).connect()
            try:
                device = LunDevice(client, lun)
                with contextlib.suppress(Exception):
                    await client.execute(bytes(6), lun)  # past the power-on unit attention
                cap = await device.read_capacity()
                await device.write(0, b"x" * 4096)
                await device.write(cap.bytes - 4096, b"y" * 4096)
                if kind == "tgtd":
                    assert not (cap.lbpme and cap.lbprz)
                    with pytest.raises(OSError) as refused:
                        await device.discard(0, cap.bytes)
                    assert refused.value.errno == errno.EOPNOTSUPP
                    assert await device.read(0, 4096) == b"x" * 4096
                    return
                max_blocks, max_descriptors = await device.unmap_limits()
                assert cap.lbpme and cap.lbprz and max_descriptors >= 1 and cap.blocks > max_blocks
                await device.discard(0, cap.bytes)
                assert await device.read(0, 4096) == bytes(4096)
                assert await device.read(cap.bytes - 4096, 4096) == bytes(4096)
            finally:
                await client.close()

        asyncio.run(run())


def test_reservations_through_the_block_api(tmp_path):
    """Two initiators: one registers and reserves Write Exclusive; the other's writes conflict (SPC-4 §5.13)."""
    from node_agent.iscsi.initiator.client import CommandFailed

    with running_shoal_target(tmp_path, luns=(("d", 8 * MiB),)) as t:
        async def run():
            a = await IscsiClient(t.host, t.port, t.iqn, settings=settings()).connect()
            b = await IscsiClient(t.host, t.port, t.iqn, settings=ClientSettings(
                initiator_iqn="iqn.2026-11.io.shoal.test:other")).connect()
            try:
                da, db = LunDevice(a, 0), LunDevice(b, 0)
                await da.register(0xA1)
                await da.reserve(0xA1, 1)
                assert await da.read_reservation() == (0xA1, 1)
                assert (await da.read_keys())[1] == [0xA1]
                await da.write(0, b"a" * 512)
                with pytest.raises(CommandFailed) as exc:
                    await db.write(0, b"b" * 512)
                assert exc.value.done.status == 0x18  # RESERVATION CONFLICT
                assert str(exc.value) == "SCSI status RESERVATION CONFLICT (0x18)"
                await da.release(0xA1, 1)
                await db.write(0, b"b" * 512)
            finally:
                await a.close()
                await b.close()

        asyncio.run(run())


@pytest.mark.parametrize("kind", ["shoal", "tgtd"])
def test_header_and_data_digests(kind, tmp_path):
    """CRC32C header and data digests negotiated and used against both targets (RFC 7143 §12.1)."""
    extra = {"params": {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}} if kind == "tgtd" else {}
    with target_of(kind, tmp_path, **extra) as (t, lun):
        async def run():
            digest = ("CRC32C", "None")
            async with IscsiClient(t.host, t.port, t.iqn, settings=settings(header_digest=digest,
                                                                            data_digest=digest)) as client:
                assert client.params.header_digest and client.params.data_digest
                device = LunDevice(client, lun)
                data = os.urandom(4 * MiB)
                await device.write(0, data)
                assert bytes(await device.read(0, len(data))) == data
        asyncio.run(run())
