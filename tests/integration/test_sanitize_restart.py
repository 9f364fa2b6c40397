"""A SANITIZE cut short by the death of the process serving it is not forgotten by the next one.

A real ``shoal target`` process serves an 8 MiB LUN on the slow TEST device of
``tests/support/slow_target.py`` (every write blocks ``DELAY``: the overwrite's
pass is 8 chunks of 1 MiB), and Shoal's own initiator starts SANITIZE
OVERWRITE.  Once the pass has written its first chunk the process is killed
(SIGKILL: nothing runs on the way out, as in a crash or a power loss).  A new
``shoal target`` on the same file (an ordinary device now) must not serve the
half-erased medium as if all were well: media access ends with MEDIUM ERROR,
SANITIZE COMMAND FAILED (SBC-4 §4.11) and REQUEST SENSE says so, until a
sanitize completes (or EXIT FAILURE MODE); after that, and after another
restart, the unit is an ordinary one.  What carries the state across is
``<file>.sanitize`` (``node_agent.scsi.sidecar.SanitizeMark``).  Mocks: none
(the slow device is a test-only backing store wrapper, not a mock of Shoal).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient, sense_code
from node_agent.scsi.sense import SANITIZE_COMMAND_FAILED
from tests.support.shoal_target import running_shoal_target
from tests.support.slow_target import slow_command

MiB = 1 << 20
DELAY = 0.1  # seconds per write of the slow device: the whole pass takes ~1 s
PARAMS = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])  # one pass of the pattern A5 A5
OVERWRITE = bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, len(PARAMS), 0])
TUR = bytes(6)
READ = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])  # READ(10) of block 0
REQUEST_SENSE = bytes([0x03, 0, 0, 0, 252, 0])


def settings() -> ClientSettings:
    return ClientSettings(reconnect_timeout=0)


async def start_and_kill(target, path) -> None:
    """Start the overwrite, wait until its pass has written the first chunk, kill the target."""
    async with IscsiClient(target.host, target.port, target.iqn, settings=settings()) as client:
        await client.execute(TUR)  # the power-on unit attention (retried by the client)
        command = asyncio.ensure_future(client.execute(OVERWRITE, data_out=PARAMS))
        deadline = time.monotonic() + 30
        while path.read_bytes()[:2] != b"\xa5\xa5":
            assert time.monotonic() < deadline, "the sanitize's pass never began"
            assert not command.done(), command
            await asyncio.sleep(0.01)
        os.kill(target.pid, signal.SIGKILL)
        target.process.wait(10)
        try:
            await asyncio.wait_for(command, 10)
        except Exception:  # noqa: BLE001 - the connection died with the process: any failure will do
            pass
        else:
            raise AssertionError("the SANITIZE was answered although its target was killed part way")


async def after_restart(target) -> dict:
    out = {}
    async with IscsiClient(target.host, target.port, target.iqn, settings=settings()) as client:
        for name, cdb in (("tur", TUR), ("read", READ)):
            try:
                await client.execute(cdb, read_length=512 if cdb is READ else 0)
                out[name] = "GOOD"
            except CommandFailed as exc:
                out[name] = sense_code(exc.done.sense)
        done = await client.execute(REQUEST_SENSE, read_length=252)
        out["request sense"] = sense_code(bytes(done.data))
        await client.execute(OVERWRITE, data_out=PARAMS)  # a sanitize that completes ends the state
        out["after"] = bytes((await client.execute(READ, read_length=512)).data[:2])
    return out


async def ordinary(target) -> bytes:
    async with IscsiClient(target.host, target.port, target.iqn, settings=settings()) as client:
        await client.execute(TUR)
        return bytes((await client.execute(READ, read_length=512)).data[:2])


def test_a_sanitize_killed_part_way_leaves_the_unit_failed_after_a_restart(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x77" * (8 * MiB))
    mark = tmp_path / "disk.img.sanitize"
    with running_shoal_target(tmp_path / "first", luns=((str(path), 8 * MiB),),
                              command=slow_command([path], DELAY)) as target:
        asyncio.run(start_and_kill(target, path))
    data = path.read_bytes()
    assert data[:2] == b"\xa5\xa5" and data[-2:] == b"\x77\x77", "the pass was not cut short"
    assert mark.exists() and "SANITIZE OVERWRITE" in mark.read_text()

    with running_shoal_target(tmp_path / "second", luns=((str(path), 8 * MiB),)) as target:
        out = asyncio.run(after_restart(target))
        log = target.log_path.read_text()
    print(out)
    assert out["tur"] == out["read"] == out["request sense"] == tuple(SANITIZE_COMMAND_FAILED), out
    assert "did not finish" in log, log
    assert out["after"] == b"\xa5\xa5" and not mark.exists()
    assert path.read_bytes()[-2:] == b"\xa5\xa5"

    with running_shoal_target(tmp_path / "third", luns=((str(path), 8 * MiB),)) as target:
        assert asyncio.run(ordinary(target)) == b"\xa5\xa5"
