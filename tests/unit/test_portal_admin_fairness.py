"""Work on one volume that waits for its disk does not stall the portal's other sessions (issue 7, "fair
under a slow disk", for what is not a SCSI READ or WRITE).

Two changes of one volume wait for its disk: removing its target (the last unexport, a fence) flushes
the volume and closes it, and a PERSISTENT RESERVE OUT with APTPL=1 saves the reservation state with
two fsyncs (SPC-4 §5.13.5).  Run on the portal's event loop, either would hold every other session of
the node for as long as the disk takes: seconds for a volume with much unwritten data, or on a filesystem
whose journal commit waits for someone else's writeback.  These tests serve two volumes from the agent's
real portal (``PortalThread``), ``slow`` on the slow TEST device (``tests/support/slow_target``: its
flush, close and I/O each block ``SLOW`` seconds) or with a reservation store whose save blocks as long,
and ``fast`` on a plain file.  A session of Shoal's initiator (127.0.0.1) reads ``fast`` one 4 KiB block
at a time throughout; its slowest read while ``slow`` waits for its disk must stay far below ``SLOW``.
Each test also checks that the slow work was done before the answer (the flush before
``remove_target`` returned, the saved state before GOOD).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import time

import pytest

from node_agent.agent.portal import PortalThread
from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient
from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.target import Credentials
from node_agent.scsi.ptpl import PtplStore
from node_agent.target_service import LunSpec, PortalConfig
from tests.support.slow_target import DelayedBackingStore

MiB = 1 << 20
SLOW = 0.4  # seconds each slow step blocks
STALL_LIMIT = 0.15  # a read of ``fast`` slower than this waited behind the slow volume
INITIATOR = "iqn.2026-01.io.shoal:admin-fairness-host"
OTHER_INITIATOR = "iqn.2026-01.io.shoal:admin-fairness-other"
CHAP = Credentials("fair-user", "fair-secret-123")


def iqn(name: str) -> str:
    return f"iqn.2026-01.io.shoal:target:{name}"


@pytest.fixture
def portal(tmp_path):
    # ``shoal agent`` freezes what it loaded at start-up (``eventloop.freeze_startup_objects``), so the
    # collection the portal runs after a connection closes scans only objects made since.  Here the test
    # process (pytest and every module of the suite) stands in for the agent: frozen the same way, or that
    # collection alone would hold the loop for 20-150 ms, which is not what these tests measure.
    gc.collect()
    gc.freeze()
    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    host, port = portal.start()
    paths = {}
    try:
        for name, wrap in (("slow", lambda b: DelayedBackingStore(b, SLOW)), ("fast", None)):
            paths[name] = tmp_path / f"{name}.img"
            portal.add_target(iqn(name), LunSpec(str(paths[name]), 16 * MiB, wrap=wrap), chap=CHAP, mutual_chap=None,
                              allowed_initiators=[INITIATOR, OTHER_INITIATOR])
        yield portal, host, port, paths
    finally:
        portal.stop()
        gc.unfreeze()


def client(host: str, port: int, name: str, depth: int = 1, initiator: str = INITIATOR) -> IscsiClient:
    settings = ClientSettings(initiator_iqn=initiator, queue_depth=depth, reconnect_timeout=0.5)
    return IscsiClient(host, port, iqn(name), settings=settings,
                       chap=(CHAP.user, initiator_secret(CHAP.secret, initiator)))


async def worst_read_while(fast: LunDevice, start_work) -> tuple[float, object]:
    """Read ``fast`` (depth 1) from before ``start_work()`` (an awaitable) is started until it is done; the
    slowest read's seconds and the work's result."""
    await fast.read_blocks(0, 8)  # past the power-on unit attention
    task = asyncio.ensure_future(start_work())
    worst, reads = 0.0, 0
    while not task.done():
        start = time.perf_counter()
        await fast.read_blocks(8 * (reads % 64), 8)
        worst = max(worst, time.perf_counter() - start)
        reads += 1
    assert reads, "no read"
    return worst, task.result()


def test_removing_a_target_flushes_it_off_the_loop(portal):
    """The last unexport of ``slow`` while 8 of its writes wait for its disk: ``remove_target`` returns once the
    ones running on workers are on the file and it is flushed and closed (which takes ``SLOW`` and more), and
    ``fast`` is served all along."""
    portal, host, port, paths = portal
    unit = portal.call(lambda: portal.service.registry.targets[iqn("slow")].luns.luns[0])

    async def scenario():
        async with client(host, port, "fast") as fast_client:
            slow_client = await client(host, port, "slow", depth=8).connect()
            slow = LunDevice(slow_client, 0)
            await slow.read_blocks(0, 1)  # past the power-on unit attention
            writes = [asyncio.ensure_future(slow.write_blocks(8 * i, bytes([0xC0 + i]) * 4096)) for i in range(8)]
            while portal.call(lambda: unit._io_running) == 0:
                await asyncio.sleep(0.005)
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            worst, removed = await worst_read_while(
                LunDevice(fast_client, 0), lambda: loop.run_in_executor(None, portal.remove_target, iqn("slow")))
            took = time.perf_counter() - start
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
            try:
                await slow_client.close()
            except Exception:  # noqa: BLE001 - its session was closed by the removal
                pass
            return worst, removed, took, outcomes

    worst, removed, took, outcomes = asyncio.run(scenario())
    print(f"worst read of fast {worst * 1e3:.1f} ms; remove_target took {took:.2f} s")
    assert removed is True and iqn("slow") not in portal.served()
    assert took >= SLOW, "remove_target returned before the volume was flushed and closed"
    assert unit.backing.inner.fd is None  # closed
    data = paths["slow"].read_bytes()
    # The writes running on workers ran to the end before the close (up to ``io_workers_per_lun`` at once); those
    # still waiting for a worker were dropped with the session, unanswered.  None is torn, and every write
    # the initiator saw succeed is on the file.
    landed = 0
    for i, outcome in enumerate(outcomes):
        block = data[i * 4096:(i + 1) * 4096]
        assert block in (bytes([0xC0 + i]) * 4096, bytes(4096)), (i, outcome)
        if not isinstance(outcome, BaseException):
            assert block == bytes([0xC0 + i]) * 4096, (i, outcome)
        landed += block != bytes(4096)
    assert landed >= 4, f"only {landed} of the writes running on workers reached the file"
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind the removal"
    assert portal.remove_target(iqn("slow")) is False  # a repeat: nothing served, nothing done


class SlowPtplStore(PtplStore):
    """The reservation state's sidecar file on a disk whose fsyncs take ``SLOW`` seconds."""

    def save(self, state: dict) -> None:
        time.sleep(SLOW)
        super().save(state)


def prout_register(key: int, *, aptpl: bool) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY (SPC-4 §6.16.2): CDB and parameter list."""
    params = bytes(8) + key.to_bytes(8, "big") + bytes(4) + bytes([0x01 if aptpl else 0]) + bytes(3)
    cdb = bytes([0x5F, 0x06, 0, 0, 0]) + len(params).to_bytes(4, "big") + bytes([0])
    return cdb, params


def test_an_aptpl_reservation_change_is_saved_off_the_loop(portal):
    """Two initiators register on ``slow`` with APTPL=1 at once: each GOOD comes after a save holding its
    registration (``SLOW`` each), the file ends with both, and ``fast`` is served all along."""
    portal, host, port, paths = portal
    path = str(paths["slow"]) + ".pr"

    def slow_store() -> None:
        unit = portal.service.registry.targets[iqn("slow")].luns.luns[0]
        unit.reservations.store = SlowPtplStore(path)
    portal.call(slow_store)

    async def scenario():
        async with client(host, port, "fast") as fast_client, client(host, port, "slow") as one, \
                client(host, port, "slow", initiator=OTHER_INITIATOR) as two:
            for session in (one, two):
                await session.execute(bytes(6))  # TEST UNIT READY: past the power-on unit attention

            async def register_both():
                async def register(session, key):
                    cdb, params = prout_register(key, aptpl=True)
                    await session.execute(cdb, data_out=params)
                    with open(path) as handle:  # GOOD: what was saved holds this registration
                        return [r["key"] for r in json.load(handle)["registrations"]]
                return await asyncio.gather(register(one, 0x1111), register(two, 0x2222))

            start = time.perf_counter()
            worst, saved = await worst_read_while(LunDevice(fast_client, 0), register_both)
            return worst, saved, time.perf_counter() - start

    worst, saved, took = asyncio.run(scenario())
    print(f"worst read of fast {worst * 1e3:.1f} ms; both registrations took {took:.2f} s; saved {saved}")
    assert 0x1111 in saved[0] and 0x2222 in saved[1]
    assert took >= SLOW
    with open(path) as handle:
        final = json.load(handle)
    assert sorted(r["key"] for r in final["registrations"]) == [0x1111, 0x2222] and final["aptpl"] is True
    assert final["generation"] == 2
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind a reservation save"
    assert os.path.exists(path)


def test_fencing_saves_the_reservation_state_off_the_loop(portal):
    """Both initiators registered on ``slow`` with APTPL=1; fencing one saves the state without it (``SLOW``,
    on the caller's thread) before ``fence_initiator`` returns, and ``fast`` is served all along."""
    portal, host, port, paths = portal
    path = str(paths["slow"]) + ".pr"

    async def register_both():
        async with client(host, port, "slow") as one, client(host, port, "slow", initiator=OTHER_INITIATOR) as two:
            for session, key in ((one, 0x1111), (two, 0x2222)):
                await session.execute(bytes(6))
                cdb, params = prout_register(key, aptpl=True)
                await session.execute(cdb, data_out=params)

    def use_store(store) -> None:  # the slow TEST device has no path for a store of its own beside it
        portal.call(lambda: setattr(portal.service.registry.targets[iqn("slow")].luns.luns[0].reservations, "store",
                                    store))

    use_store(PtplStore(path))
    asyncio.run(register_both())
    use_store(SlowPtplStore(path))

    async def scenario():
        async with client(host, port, "fast", initiator=OTHER_INITIATOR) as fast_client:
            loop = asyncio.get_running_loop()
            return await worst_read_while(LunDevice(fast_client, 0),
                                          lambda: loop.run_in_executor(None, portal.fence_initiator, INITIATOR))

    worst, result = asyncio.run(scenario())
    print(f"worst read of fast {worst * 1e3:.1f} ms; fence {result}")
    assert result.registrations_removed == 1
    with open(path) as handle:
        final = json.load(handle)
    assert [r["key"] for r in final["registrations"]] == [0x2222] and final["generation"] == 3
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind the fence's save"


def test_reads_queued_for_a_peer_that_stopped_reading_go_nowhere_once_their_lun_closed(tmp_path):
    """A hung node (the one a fence is for) stops reading its socket with 32 MiB of reads queued for it, sent
    from the volume's file descriptor (``FileRange``, ``sendfile``).  Its target is removed meanwhile, which
    closes the descriptor, and the number is given to another volume's file.  When the node reads again it
    must get none of that other file: the connection ends instead."""
    from node_agent.scsi.result import FileRange

    portal = PortalThread(PortalConfig("127.0.0.1", 0))
    host, port = portal.start()
    path, secret = tmp_path / "stuck.img", tmp_path / "other-volume.img"
    path.write_bytes(b"\x5a" * (32 * MiB))
    secret.write_bytes(b"\xee" * (32 * MiB))
    buffers = [bytearray(8 * MiB) for _ in range(4)]
    try:
        portal.add_target(iqn("stuck"), LunSpec(str(path)), chap=CHAP, mutual_chap=None,
                          allowed_initiators=[INITIATOR])

        def queued_file_ranges() -> list:
            return [item for channel in portal.service.portal._channels for item in channel.pending
                    if isinstance(item, FileRange)]

        async def scenario():
            stuck = await client(host, port, "stuck", depth=4).connect()
            await stuck.execute(bytes(6))  # past the power-on unit attention
            stuck._proto.transport.pause_reading()  # the node hangs
            reads = [asyncio.ensure_future(stuck.execute(bytes([0x28, 0]) + (i * 16384).to_bytes(4, "big")
                                                         + bytes([0]) + (16384).to_bytes(2, "big") + bytes([0]),
                                                         read_length=8 * MiB, buffer=buffers[i]))
                     for i in range(4)]
            deadline = time.monotonic() + 10
            while not (queued := portal.call(queued_file_ranges)):
                assert time.monotonic() < deadline, "no read data waited in the portal's output"
                await asyncio.sleep(0.01)
            old_fd = queued[0].fd
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, portal.remove_target, iqn("stuck"))
            with pytest.raises(OSError):
                os.fstat(old_fd)  # closed with the LUN
            other = os.open(secret, os.O_RDONLY)
            try:
                if other != old_fd:  # the number the queued reads name now names the other volume's file
                    os.dup2(other, old_fd, inheritable=False)
                stuck._proto.transport.resume_reading()
                outcomes = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
            finally:
                os.close(other)
                if other != old_fd:
                    os.close(old_fd)
            try:
                await stuck.close()
            except Exception:  # noqa: BLE001 - its connection is gone
                pass
            return outcomes

        outcomes = asyncio.run(scenario())
    finally:
        portal.stop()
    assert not any(b"\xee" in bytes(buffer) for buffer in buffers), "another volume's data reached the node"
    assert any(isinstance(outcome, BaseException) for outcome in outcomes), outcomes


def unmap_cdb(lba: int, blocks: int) -> tuple[bytes, bytes]:
    """UNMAP (SBC-3 §5.28) of one range: CDB and parameter list."""
    params = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4) + lba.to_bytes(8, "big") \
        + blocks.to_bytes(4, "big") + bytes(4)
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(params).to_bytes(2, "big") + bytes([0]), params


def write_same16(lba: int, blocks: int, *, unmap: bool = False) -> bytes:
    return bytes([0x93, 0x08 if unmap else 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)


@pytest.mark.parametrize("command", ["unmap", "write-same-unmap", "write-same-pattern", "stop-unit", "verify",
                                     "compare-and-write", "orwrite"])
def test_commands_that_punch_or_write_long_run_off_the_loop(portal, command):
    """UNMAP, WRITE SAME (a hole punch, or the block written over the range), START STOP UNIT (stopping
    flushes), VERIFY with BYTCHK=01b (reading what it compares), COMPARE AND WRITE and ORWRITE (reading what
    they compare or OR with) on ``slow`` wait for its disk (``SLOW``) on a worker: their GOOD comes after
    the change is in the file, and ``fast`` is served all along."""
    portal, host, port, paths = portal
    pattern = bytes(range(256)) * 2

    async def scenario():
        async with client(host, port, "fast") as fast_client, client(host, port, "slow") as slow:
            await slow.execute(bytes(6))
            slow_device = LunDevice(slow, 0)
            await slow_device.write_blocks(64, b"\x77" * (16 * 512))  # data for the punch to remove

            async def run():
                start = time.perf_counter()
                if command == "unmap":
                    cdb, params = unmap_cdb(64, 16)
                    await slow.execute(cdb, data_out=params)
                elif command == "write-same-unmap":
                    await slow.execute(write_same16(64, 16, unmap=True), data_out=bytes(512))
                elif command == "write-same-pattern":
                    await slow.execute(write_same16(64, 16), data_out=pattern)
                elif command == "verify":  # VERIFY(16), BYTCHK=01b: compare 16 blocks with the Data-Out
                    await slow.execute(bytes([0x8F, 0x02]) + (64).to_bytes(8, "big") + (16).to_bytes(4, "big")
                                       + bytes(2), data_out=b"\x77" * (16 * 512))
                elif command == "compare-and-write":  # one block: \x77 expected, \x55 written
                    await slow.execute(bytes([0x89, 0]) + (64).to_bytes(8, "big") + bytes([0, 0, 0, 1, 0, 0]),
                                       data_out=b"\x77" * 512 + b"\x55" * 512)
                elif command == "orwrite":  # ORWRITE(16) of 16 blocks: \x77 | \x08
                    await slow.execute(bytes([0x8B, 0]) + (64).to_bytes(8, "big") + (16).to_bytes(4, "big")
                                       + bytes(2), data_out=b"\x08" * (16 * 512))
                else:
                    await slow.execute(bytes([0x1B, 0, 0, 0, 0x00, 0]))  # START STOP UNIT: stop, flush
                took = time.perf_counter() - start
                with open(paths["slow"], "rb") as handle:  # GOOD: the change is in the file
                    handle.seek(64 * 512)
                    return took, handle.read(16 * 512)

            return await worst_read_while(LunDevice(fast_client, 0), run)

    worst, (took, stored) = asyncio.run(scenario())
    print(f"{command}: worst read of fast {worst * 1e3:.1f} ms; command took {took:.2f} s")
    expected = {"unmap": bytes(16 * 512), "write-same-unmap": bytes(16 * 512), "write-same-pattern": pattern * 16,
                "stop-unit": b"\x77" * (16 * 512), "verify": b"\x77" * (16 * 512),
                "compare-and-write": b"\x55" * 512 + b"\x77" * (15 * 512), "orwrite": b"\x7f" * (16 * 512)}[command]
    assert stored == expected
    assert took >= SLOW
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind {command}"


@pytest.mark.parametrize("action", ["overwrite", "block-erase"])
def test_sanitize_runs_off_the_loop_and_holds_only_its_own_lun(portal, tmp_path, action):
    """SANITIZE (SBC-4 §5.30) passes over the whole medium: on a worker.  Meanwhile the unit answers other
    commands with NOT READY, SANITIZE IN PROGRESS (REQUEST SENSE says so too; INQUIRY still answers), other
    LUNs are served as ever, and GOOD comes once the medium is sanitized and flushed."""
    from node_agent.iscsi.initiator.client import CommandFailed, sense_code
    from node_agent.scsi.sense import SANITIZE_IN_PROGRESS

    portal, host, port, _ = portal
    path = tmp_path / "tiny.img"
    path.write_bytes(b"\x77" * MiB)
    portal.add_target(iqn("tiny"), LunSpec(str(path), wrap=lambda b: DelayedBackingStore(b, SLOW)), chap=CHAP,
                      mutual_chap=None, allowed_initiators=[INITIATOR, OTHER_INITIATOR])
    if action == "overwrite":  # one pass of the pattern 0xA5A5 (SBC-4 table 133)
        params = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])
        cdb, expected = bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0]), b"\xa5" * MiB
    else:
        params, cdb, expected = None, bytes([0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]), bytes(MiB)

    async def scenario():
        async with client(host, port, "fast") as fast_client, client(host, port, "tiny") as one, \
                client(host, port, "tiny", initiator=OTHER_INITIATOR) as two:
            for session in (one, two):
                await session.execute(bytes(6))
            seen = {}

            async def sanitize_and_look():
                command = asyncio.ensure_future(one.execute(cdb, data_out=params))
                await asyncio.sleep(SLOW / 4)  # it runs on a worker now
                with pytest.raises(CommandFailed) as refused:
                    await two.execute(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), read_length=512)
                seen["read"] = sense_code(refused.value.done.sense)
                sense = await two.execute(bytes([0x03, 0, 0, 0, 252, 0]), read_length=252)
                seen["request sense"] = sense_code(bytes(sense.data))
                inquiry = await two.execute(bytes([0x12, 0, 0, 0, 96, 0]), read_length=96)
                seen["inquiry"] = inquiry.status
                start = time.perf_counter()
                await command
                seen["waited"] = time.perf_counter() - start
                await two.execute(bytes(6))  # TEST UNIT READY: GOOD again
                with open(path, "rb") as handle:
                    seen["stored"] = handle.read()

            worst, _ = await worst_read_while(LunDevice(fast_client, 0), sanitize_and_look)
            return worst, seen

    worst, seen = asyncio.run(scenario())
    print(f"sanitize {action}: worst read of fast {worst * 1e3:.1f} ms; {({k: v for k, v in seen.items() if k != 'stored'})}")
    assert seen["read"] == seen["request sense"] == tuple(SANITIZE_IN_PROGRESS)
    assert seen["inquiry"] == 0
    assert seen["stored"] == expected
    assert seen["waited"] > 0
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind SANITIZE"


@pytest.mark.parametrize("function", ["abort task", "lun reset", "cold reset"])
def test_task_management_ends_a_sanitize_command_but_not_the_sanitize(portal, tmp_path, function):
    """SBC-4 §4.11: a sanitize operation goes on through an aborted command, a reset and the loss of the
    I_T nexus.  The task management function answers at once (it does not wait for the medium pass), the
    aborted SANITIZE gets no response, the unit still says SANITIZE IN PROGRESS to a new session, and the
    medium ends up sanitized all the same (libiscsi's Sanitize.Reset checks the same through a cold reset)."""
    from node_agent.iscsi.initiator.client import CommandFailed, sense_code
    from node_agent.iscsi.pdu import TmfFunction, TmfResponse
    from node_agent.scsi.sense import BUS_DEVICE_RESET_FUNCTION_OCCURRED, SANITIZE_IN_PROGRESS

    portal, host, port, _ = portal
    path = tmp_path / "tiny.img"
    path.write_bytes(b"\x77" * MiB)
    portal.add_target(iqn("tiny"), LunSpec(str(path), wrap=lambda b: DelayedBackingStore(b, SLOW)), chap=CHAP,
                      mutual_chap=None, allowed_initiators=[INITIATOR, OTHER_INITIATOR])
    block_erase = bytes([0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0])
    tur = bytes(6)

    async def scenario():
        async with client(host, port, "tiny") as one:
            await one.execute(tur)
            command = asyncio.ensure_future(one.execute(block_erase))
            await asyncio.sleep(SLOW / 4)  # on its worker now
            (itt,) = [tag for tag, fut in one._futures.items() if not fut.done()]
            start = time.perf_counter()
            if function == "abort task":
                response = await one.task_management(TmfFunction.ABORT_TASK, 0, itt)
            elif function == "lun reset":
                response = await one.task_management(TmfFunction.LOGICAL_UNIT_RESET, 0)
            else:
                response = await one.task_management(TmfFunction.TARGET_COLD_RESET, 0)
            answered = time.perf_counter() - start
            await asyncio.sleep(0.05)
            finished_command = command.done() and not command.cancelled() and command.exception() is None
            command.cancel()
            reused = None
            if function != "cold reset":  # the aborted command's task tag is free again at once
                one.conn._itt = itertools.count(itt)
                with pytest.raises(CommandFailed) as refused:
                    await one.execute(tur)
                reused = sense_code(refused.value.done.sense)
        async with client(host, port, "tiny", initiator=OTHER_INITIATOR) as two:
            with pytest.raises(CommandFailed):
                await two.execute(tur)  # the new nexus's power-on unit attention
            with pytest.raises(CommandFailed) as refused:
                await two.execute(tur)
            still = sense_code(refused.value.done.sense)
            deadline = time.monotonic() + 20 * SLOW
            while True:  # TEST UNIT READY until GOOD: the sanitize is over
                try:
                    await two.execute(tur)
                    break
                except CommandFailed as exc:
                    assert sense_code(exc.done.sense) == tuple(SANITIZE_IN_PROGRESS)
                    assert time.monotonic() < deadline, "the sanitize never ended"
                    await asyncio.sleep(SLOW / 4)
        return response, answered, finished_command, still, reused

    response, answered, finished_command, still, reused = asyncio.run(scenario())
    print(f"{function}: answered in {answered * 1e3:.1f} ms while the sanitize ran")
    assert response == TmfResponse.FUNCTION_COMPLETE
    assert answered < SLOW / 2, f"{function} waited {answered:.3f} s for the sanitize's I/O"
    assert not finished_command, "the aborted SANITIZE was answered GOOD"
    assert still == tuple(SANITIZE_IN_PROGRESS)
    if function != "cold reset":  # answered (not rejected as a task tag in use) while the sanitize goes on
        assert reused in (tuple(SANITIZE_IN_PROGRESS), tuple(BUS_DEVICE_RESET_FUNCTION_OCCURRED)), reused
    assert path.read_bytes() == bytes(MiB)


def eight_chunk_target(portal, tmp_path, delay: float = SLOW, allowed=(INITIATOR,)):
    """Target ``eight``: an 8 MiB LUN of 0x77 on the slow device, so an overwrite is 8 chunks of ``delay``."""
    path = tmp_path / "eight.img"
    path.write_bytes(b"\x77" * (8 * MiB))
    portal.add_target(iqn("eight"), LunSpec(str(path), wrap=lambda b: DelayedBackingStore(b, delay)), chap=CHAP,
                      mutual_chap=None, allowed_initiators=list(allowed))
    return path


def test_a_snapshot_pause_is_refused_while_a_sanitize_runs_and_stalls_nobody(portal, tmp_path):
    """A snapshot pauses the volume's I/O (``call_quiesced``, on the portal's loop), waiting for what runs on
    workers: a SANITIZE's pass would hold the loop, and every volume of the portal, until the whole medium is
    done (a read of another volume took 3.4 s here), to snapshot a half-erased medium.  It is refused at once
    instead (FAILED_PRECONDITION at the agent's API), and works again once the pass is over."""
    from node_agent.agent.errors import FailedPrecondition

    portal, host, port, _ = portal
    eight_chunk_target(portal, tmp_path, delay=SLOW / 4)
    params = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])

    async def scenario():
        loop = asyncio.get_running_loop()
        async with client(host, port, "fast") as fast_client, client(host, port, "eight") as one:
            fast = LunDevice(fast_client, 0)
            await fast.read_blocks(0, 8)
            await one.execute(bytes(6))
            command = asyncio.ensure_future(one.execute(bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0]),
                                                        data_out=params))
            await asyncio.sleep(SLOW / 4)
            start = time.perf_counter()
            with pytest.raises(FailedPrecondition, match="SANITIZE"):
                await loop.run_in_executor(None, portal.call_quiesced, iqn("eight"), lambda: "snap")
            refused = time.perf_counter() - start
            start = time.perf_counter()
            await fast.read_blocks(8, 8)  # another volume
            read = time.perf_counter() - start
            await command  # the pass ends
            after = await loop.run_in_executor(None, portal.call_quiesced, iqn("eight"), lambda: "snap")
            return refused, read, after

    refused, read, after = asyncio.run(scenario())
    print(f"refused in {refused * 1e3:.1f} ms; a read of another volume meanwhile {read * 1e3:.1f} ms")
    assert refused < SLOW / 2 and read < SLOW / 2 and after == "snap"


def test_stopping_the_portal_stops_a_running_sanitize_and_keeps_its_failed_state(portal, tmp_path):
    """Stopping the agent or ``shoal target`` while a SANITIZE runs stops the pass at its next chunk, as a
    removal does, instead of waiting for the whole medium (the executor's shutdown waited for it: 8 x SLOW
    here, hours on a large volume); the mark beside the file keeps the failed state for the next start."""
    portal, host, port, _ = portal
    path = eight_chunk_target(portal, tmp_path)
    params = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])

    async def scenario():
        loop = asyncio.get_running_loop()
        async with client(host, port, "eight") as one:
            await one.execute(bytes(6))
            command = asyncio.ensure_future(one.execute(bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0]),
                                                        data_out=params))
            await asyncio.sleep(SLOW / 4)  # the pass is on its worker
            start = time.perf_counter()
            await loop.run_in_executor(None, portal.stop)
            took = time.perf_counter() - start
            command.cancel()
            return took

    took = asyncio.run(scenario())
    print(f"the stop took {took:.2f} s with a sanitize running")
    assert took < 5 * SLOW, f"the stop waited {took:.2f} s for the sanitize (its whole pass is {8 * SLOW:.1f} s)"
    assert (tmp_path / "eight.img.sanitize").exists()
    assert path.read_bytes()[:2] == b"\xa5\xa5" and path.read_bytes()[-2:] == b"\x77\x77"  # stopped part way


def test_a_sanitize_with_immed_answers_at_once_and_a_fence_still_waits_for_its_pass(portal, tmp_path):
    """SANITIZE with IMMED (SBC-4 §5.30.1) is answered GOOD as soon as its pass is on a worker, not after the
    whole medium (tools such as ``sg_sanitize`` send IMMED with a short timeout); the unit says SANITIZE IN
    PROGRESS meanwhile.  The answered command's pass is still the connection's I/O in flight: fencing its
    initiator stops it at the next chunk and waits for that chunk, so no write of it lands after the fence."""
    from node_agent.iscsi.initiator.client import CommandFailed, sense_code
    from node_agent.scsi.sense import SANITIZE_IN_PROGRESS

    portal, host, port, _ = portal
    path = eight_chunk_target(portal, tmp_path)
    params = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])

    async def scenario():
        loop = asyncio.get_running_loop()
        async with client(host, port, "eight") as one:
            await one.execute(bytes(6))
            start = time.perf_counter()
            await one.execute(bytes([0x48, 0x80 | 0x20 | 0x01, 0, 0, 0, 0, 0, 0, len(params), 0]), data_out=params)
            answered = time.perf_counter() - start
            with pytest.raises(CommandFailed) as refused:
                await one.execute(bytes(6))
            # Inside its first chunk (SLOW long): a pass stopped before it wrote anything ends at once, and the
            # fence has nothing to wait for (CI once fenced that early: commands_waited 0).
            await asyncio.sleep(SLOW / 4)
            fenced = await loop.run_in_executor(None, portal.fence_initiator, INITIATOR)
            tail = path.read_bytes()[-2:]
        return answered, sense_code(refused.value.done.sense), fenced, tail

    answered, during, fenced, tail = asyncio.run(scenario())
    print(f"SANITIZE IMMED answered in {answered * 1e3:.1f} ms; fence: {fenced}")
    assert answered < SLOW / 2, f"IMMED waited {answered:.2f} s"
    assert during == tuple(SANITIZE_IN_PROGRESS)
    assert fenced.commands_waited == 1 and tail == b"\x77\x77"
    assert path.read_bytes()[-2:] == b"\x77\x77"  # nothing more landed after the fence
    assert (tmp_path / "eight.img.sanitize").exists()


@pytest.mark.parametrize("how", ["fence", "removal"])
def test_a_fence_or_a_removal_stops_a_running_sanitize(portal, tmp_path, how):
    """A fence promises that none of the initiator's writes lands after it returns, and waits for its
    commands on workers: a SANITIZE's pass (minutes on a large volume) would hold it up to its timeout.  The
    fence stops the pass at its next chunk instead (``LogicalUnit.stop_sanitize``): it returns within about
    one chunk's write, and the unit is left in the failed-sanitize state (SANITIZE COMMAND FAILED) for the
    next owner to see, who may sanitize again or EXIT FAILURE MODE.  Removing the target (the volume's
    last unexport) stops it the same way rather than wait for the whole pass."""
    from node_agent.iscsi.initiator.client import CommandFailed, sense_code
    from node_agent.scsi.sense import SANITIZE_COMMAND_FAILED

    portal, host, port, _ = portal
    path = eight_chunk_target(portal, tmp_path, allowed=[INITIATOR, OTHER_INITIATOR])
    params = bytes([0x01, 0, 0, 2, 0xA5, 0xA5])
    overwrite = bytes([0x48, 0x21, 0, 0, 0, 0, 0, 0, len(params), 0])  # AUSE: EXIT FAILURE MODE may end a failure
    tur = bytes(6)

    async def scenario():
        loop = asyncio.get_running_loop()
        async with client(host, port, "eight") as one:
            await one.execute(tur)
            command = asyncio.ensure_future(one.execute(overwrite, data_out=params))
            await asyncio.sleep(SLOW / 4)  # the pass is on its worker
            start = time.perf_counter()
            if how == "removal":
                removed = await loop.run_in_executor(None, portal.remove_target, iqn("eight"))
                took = time.perf_counter() - start
                command.cancel()
                return removed, took, None
            fenced = await loop.run_in_executor(None, portal.fence_initiator, INITIATOR)
            took = time.perf_counter() - start
            command.cancel()
        async with client(host, port, "eight", initiator=OTHER_INITIATOR) as two:
            with pytest.raises(CommandFailed):
                await two.execute(tur)  # a unit attention first
            with pytest.raises(CommandFailed) as refused:
                await two.execute(tur)
            after = sense_code(refused.value.done.sense)
            await two.execute(bytes([0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0]))  # EXIT FAILURE MODE
            await two.execute(tur)
        return fenced, took, after

    fenced, took, after = asyncio.run(scenario())
    print(f"{how} took {took:.2f} s with a sanitize running; {fenced}")
    assert took < 3 * SLOW + (2 * SLOW if how == "removal" else 0), \
        f"the {how} waited {took:.2f} s for the sanitize (its whole pass is {8 * SLOW:.1f} s)"
    if how == "removal":  # and a flush and a close, each SLOW on this device
        assert fenced is True
    else:
        assert fenced.commands_waited == 1
        assert after == tuple(SANITIZE_COMMAND_FAILED)
    assert path.read_bytes()[:2] == b"\xa5\xa5" and path.read_bytes()[-2:] == b"\x77\x77"  # stopped part way


def test_extended_copy_runs_off_the_loop(portal):
    """EXTENDED COPY (SPC-4 §6.4: up to 32 segments of 64 MiB) on ``slow`` reads and writes on a worker:
    meanwhile RECEIVE COPY STATUS says "in progress" and the same list identifier is refused with OPERATION IN
    PROGRESS; GOOD comes once the data is in place; ``fast`` is served all along."""
    from node_agent.iscsi.initiator.client import CommandFailed, sense_code
    from node_agent.scsi import xcopy as X
    from node_agent.scsi.sense import OPERATION_IN_PROGRESS
    from test_scsi_copy_sanitize import parameter_list, segment, target_descriptor

    portal, host, port, paths = portal
    unit = portal.call(lambda: portal.service.registry.targets[iqn("slow")].luns.luns[0])
    params = parameter_list([target_descriptor(unit, block_length=512)], [segment(0, 0, 16, 64, 256)])
    cdb = bytes([0x83, 0]) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2)
    status_cdb = bytes([0x84, X.SA_COPY_STATUS, 1]) + bytes(7) + (1024).to_bytes(4, "big") + bytes(2)

    async def scenario():
        async with client(host, port, "fast") as fast_client, client(host, port, "slow", depth=4) as slow:
            await slow.execute(bytes(6))
            await LunDevice(slow, 0).write_blocks(64, b"\x77" * (16 * 512))
            seen = {}

            async def copy_and_look():
                command = asyncio.ensure_future(slow.execute(cdb, data_out=params))
                await asyncio.sleep(SLOW / 4)
                status = await slow.execute(status_cdb, read_length=1024)
                seen["during"] = X.COPY_STATUS.decode(bytes(status.data)).copy_manager_status
                with pytest.raises(CommandFailed) as refused:
                    await slow.execute(cdb, data_out=params)
                seen["again"] = sense_code(refused.value.done.sense)
                await command
                status = await slow.execute(status_cdb, read_length=1024)
                seen["after"] = X.COPY_STATUS.decode(bytes(status.data)).copy_manager_status
                with open(paths["slow"], "rb") as handle:
                    handle.seek(256 * 512)
                    seen["copied"] = handle.read(16 * 512)

            worst, _ = await worst_read_while(LunDevice(fast_client, 0), copy_and_look)
            return worst, seen

    worst, seen = asyncio.run(scenario())
    print(f"xcopy: worst read of fast {worst * 1e3:.1f} ms")
    assert seen["during"] == X.COPY_IN_PROGRESS and seen["after"] == X.COPY_COMPLETED
    assert seen["again"] == tuple(OPERATION_IN_PROGRESS)
    assert seen["copied"] == b"\x77" * (16 * 512)
    assert worst < STALL_LIMIT, f"a read of another volume waited {worst:.3f} s behind EXTENDED COPY"


def test_a_closed_connection_whose_peer_reads_nothing_is_dropped_after_the_linger(tmp_path):
    """A hung node stops reading with 32 MiB of reads queued for it, and its session is closed by the target
    (here: a fence; its LUN stays served).  The portal keeps the socket and the queued output only
    ``close_linger`` seconds (0.5 here), not until the node's TCP stack gives up."""
    from node_agent.iscsi.connection import ConnectionSettings

    gc.collect()
    gc.freeze()
    portal = PortalThread(PortalConfig("127.0.0.1", 0, connection=ConnectionSettings(close_linger=0.5)))
    host, port = portal.start()
    path = tmp_path / "hung.img"
    path.write_bytes(b"\x5a" * (32 * MiB))
    try:
        portal.add_target(iqn("hung"), LunSpec(str(path)), chap=CHAP, mutual_chap=None,
                          allowed_initiators=[INITIATOR])

        def channels() -> int:
            return len(portal.service.portal._channels)

        async def scenario():
            hung = await client(host, port, "hung", depth=4).connect()
            await hung.execute(bytes(6))
            hung._proto.transport.pause_reading()
            reads = [asyncio.ensure_future(hung.execute(bytes([0x28, 0]) + (i * 16384).to_bytes(4, "big") + bytes([0])
                                                        + (16384).to_bytes(2, "big") + bytes([0]),
                                                        read_length=8 * MiB)) for i in range(4)]
            await asyncio.sleep(0.3)  # the portal's output to it is stuck now
            loop = asyncio.get_running_loop()
            fenced = await loop.run_in_executor(None, portal.fence_initiator, INITIATOR)
            assert fenced.sessions_closed == 1
            assert portal.call(channels) == 1  # closed, but its last output still waits for the peer
            deadline = time.monotonic() + 5
            while portal.call(channels):
                assert time.monotonic() < deadline, "the closed connection was never dropped"
                await asyncio.sleep(0.05)
            took = time.monotonic() - deadline + 5
            hung._proto.transport.resume_reading()  # the node wakes up: only the end of its connection is left
            outcomes = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
            assert all(isinstance(outcome, BaseException) for outcome in outcomes), outcomes
            try:
                await hung.close()
            except Exception:  # noqa: BLE001 - its connection is gone
                pass
            return took

        took = asyncio.run(scenario())
    finally:
        portal.stop()
        gc.unfreeze()
    print(f"dropped {took:.2f} s after the fence")


def test_a_hung_volume_cannot_take_every_worker_thread(portal, tmp_path):
    """``slow`` keeps 32 reads in flight, each blocking ``SLOW`` on a worker thread, while ``cold`` (a volume
    whose every read also goes to a worker: a cold page cache, 5 ms per read) is read one block at a time.
    The worker pool is shared, but no LUN may hold more than ``io_workers_per_lun`` of its threads and each
    LUN's excess waits in its own queue: ``cold``'s reads find a free worker, instead of queueing behind
    ``slow``'s (where each would wait ~1 s)."""
    portal, host, port, _ = portal
    path = tmp_path / "cold.img"
    path.write_bytes(bytes(MiB))
    portal.add_target(iqn("cold"), LunSpec(str(path), wrap=lambda b: DelayedBackingStore(b, 0.005)), chap=CHAP,
                      mutual_chap=None, allowed_initiators=[INITIATOR])

    async def scenario():
        async with client(host, port, "slow", depth=32) as slow, client(host, port, "cold") as cold:
            await slow.execute(bytes(6))
            cold_device, slow_device = LunDevice(cold, 0), LunDevice(slow, 0)
            await cold_device.read_blocks(0, 1)  # past the power-on unit attention
            stop = asyncio.Event()

            async def load(i: int) -> None:
                while not stop.is_set():
                    await slow_device.read_blocks(8 * i, 8)

            loads = [asyncio.ensure_future(load(i)) for i in range(32)]
            await asyncio.sleep(SLOW / 2)  # the slow LUN's reads hold workers and wait for more
            times = []
            for i in range(10):
                start = time.perf_counter()
                await cold_device.read_blocks(8 * i, 8)
                times.append(time.perf_counter() - start)
            stop.set()
            await asyncio.gather(*loads)
            return times

    times = asyncio.run(scenario())
    print(f"cold reads beside a hung volume: worst {max(times) * 1e3:.1f} ms, median {sorted(times)[5] * 1e3:.1f} ms")
    assert max(times) < STALL_LIMIT, f"a read of another volume waited {max(times):.3f} s for a worker thread"


def test_fair_pool_holds_each_key_to_its_share_in_order():
    """``FairPool`` itself: at most ``per_key`` jobs of a key run at once, the key's others start in the order
    given as those end, other keys are not held back, and a shutdown cancels what never started."""
    import concurrent.futures
    import threading

    from node_agent.iscsi.server import FairPool

    pool = FairPool(concurrent.futures.ThreadPoolExecutor(6), per_key=2)
    gate = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def job(name: str, wait: bool):
        def run():
            with lock:
                started.append(name)
            if wait:
                assert gate.wait(10)
            return name
        return run

    hung = [pool.submit(job(f"a{i}", True), "a") for i in range(5)]
    other = [pool.submit(job(f"b{i}", False), "b") for i in range(3)]
    assert [f.result(5) for f in other] == ["b0", "b1", "b2"]  # "a" holds 2 threads of 6; "b" runs on
    while len([n for n in started if n.startswith("a")]) < 2:
        time.sleep(0.005)
    time.sleep(0.05)
    assert sorted(n for n in started if n.startswith("a")) == ["a0", "a1"]  # no third one
    gate.set()
    assert [f.result(5) for f in hung] == [f"a{i}" for i in range(5)]
    assert [n for n in started if n.startswith("a")][2:] == ["a2", "a3", "a4"]  # the rest, in order
    gate.clear()
    blocked = [pool.submit(job(f"c{i}", True), "c") for i in range(4)]
    while len([n for n in started if n.startswith("c")]) < 2:
        time.sleep(0.005)
    pool.shutdown(wait=False, cancel_futures=True)  # c2 and c3 never reached a thread
    gate.set()
    assert [f.result(5) for f in blocked[:2]] == ["c0", "c1"]
    assert [f.cancelled() for f in blocked[2:]] == [True, True]
    deadline = time.monotonic() + 5
    while pool._running:  # each job gives its share back just after its result is set
        assert time.monotonic() < deadline, pool._running
        time.sleep(0.005)
    assert pool._waiting == {}


def test_one_address_cannot_hold_more_than_its_share_of_logins(tmp_path):
    """Connections that never log in each hold a receive buffer until the login timeout: one address may have
    ``max_logins_per_peer`` (4 here) in the login phase at once; one more is closed at once, while another
    address is still taken, and once those end, the first address logs in as ever."""
    import socket

    from node_agent.iscsi.connection import ConnectionSettings

    portal = PortalThread(PortalConfig("127.0.0.1", 0, connection=ConnectionSettings(max_logins_per_peer=4)))
    host, port = portal.start()
    idle: list[socket.socket] = []
    try:
        portal.add_target(iqn("fast"), LunSpec(str(tmp_path / "fast.img"), 16 * MiB), chap=CHAP, mutual_chap=None,
                          allowed_initiators=[INITIATOR])
        channels = lambda: len(portal.service.portal._channels)  # noqa: E731
        idle = [socket.create_connection((host, port)) for _ in range(4)]
        deadline = time.monotonic() + 5
        while portal.call(channels) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        extra = socket.create_connection((host, port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed by the portal, not by a timeout
        extra.close()
        other = socket.create_connection((host, port), source_address=("127.0.0.2", 0))
        other.settimeout(0.3)
        with pytest.raises(socket.timeout):  # another address: taken, waiting for its login
            other.recv(1)
        other.close()
        for sock in idle:
            sock.close()
        idle = []

        async def login() -> int:
            async with client(host, port, "fast") as session:
                return (await session.execute(bytes(6))).status

        deadline = time.monotonic() + 5
        while portal.call(channels):  # the idle ones are gone
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert asyncio.run(login()) in (0, 2)  # GOOD, or the power-on unit attention
    finally:
        for sock in idle:
            sock.close()
        portal.stop()
