"""``shoal target --loops 2``: sessions on different event loops share one target's state.

A real ``shoal target`` process with two event loops (threads); connections are
pinned to the least busy loop, so two sessions land on different loops.  What
one session does must be seen by the other exactly as with one loop: data, a
persistent reservation (RESERVATION CONFLICT for the other), PREEMPT AND ABORT,
and session reinstatement (the same ISID logging in again replaces the old
session, whichever loop it was on).  Shoal's own initiator drives the sessions.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient
from tests.support.shoal_target import running_shoal_target

pytestmark = pytest.mark.peer
MiB = 1 << 20
RESERVATION_CONFLICT = 0x18


async def _scenario(host: str, port: int, iqn: str) -> None:
    def settings(name: str) -> ClientSettings:
        return ClientSettings(initiator_iqn=f"iqn.2026-11.io.shoal.test:{name}", reconnect_timeout=0.5,
                              unit_attention_retries=8)

    async with IscsiClient(host, port, iqn, settings=settings("a")) as a, \
            IscsiClient(host, port, iqn, settings=settings("b")) as b:
        da, db = LunDevice(a, 0), LunDevice(b, 0)
        payloads = [os.urandom(64 * 1024) for _ in range(8)]
        await asyncio.gather(*(da.write_blocks(i * 128, p) for i, p in enumerate(payloads)))
        read = await asyncio.gather(*(db.read_blocks(i * 128, 128) for i in range(8)))
        assert [bytes(r) for r in read] == payloads

        await da.register(0xA)
        await db.register(0xB)
        await da.reserve(0xA, 1)  # WRITE EXCLUSIVE held by a
        with pytest.raises(CommandFailed) as refused:
            await db.write_blocks(0, bytes(512))
        assert refused.value.done.status == RESERVATION_CONFLICT
        await da.write_blocks(0, bytes(512))
        await db.preempt(0xB, 0xA, 1)  # b takes the reservation and removes a's registration
        with pytest.raises(CommandFailed) as preempted:
            await da.write_blocks(0, bytes(512))
        assert preempted.value.done.status == RESERVATION_CONFLICT
        await db.write_blocks(0, b"b" * 512)
        await db.clear_reservations(0xB)

        # Reinstatement: a new connection with b's ISID replaces b's session (on whichever loop).
        c = IscsiClient(host, port, iqn, settings=settings("b"))
        c.isid = b.isid
        async with c:
            assert bytes(await LunDevice(c, 0).read_blocks(0, 1)) == b"b" * 512


def test_two_loops_share_one_targets_state(tmp_path):
    with running_shoal_target(tmp_path, luns=(("disk", 16 * MiB),), extra_args=["--loops", "2"]) as target:
        asyncio.run(_scenario(target.host, target.port, target.iqn))
        log = target.log()
    assert "2 event loops serve connections" in log, log
    assert "session reinstatement" in log, log
    assert "Traceback" not in log, log
