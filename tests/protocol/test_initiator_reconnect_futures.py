"""Requests other than SCSI commands when the connection drops: each caller gets an answer, never a hang.

A NOP-Out, a Task Management Function or a Text Request is answered on the connection it went out on
(ErrorRecoveryLevel 0, RFC 7143 §7.1.1 and §6.3.5): when that connection is lost, the answer is lost
with it.  SCSI commands without status are issued again after the session is reinstated; the others
end with ``ConnectionLost`` at once, except a SendTargets query, which asks nothing of the target but
its configuration and is asked again on the new connection.  The commands a lost TMF was ending are
not issued again either: reinstating the session ended them on the target (§6.3.5), and the caller
asked for them to end.  When the session gives up for good, every caller gets ``SessionLost``.

The peer is Shoal's own target (``PortalServer`` over a ``MemoryBackingStore`` LUN, on this test's
event loop, 127.0.0.1:0).  The client stops reading (``pause_reading``) before it sends what the test
wants outstanding, so the target's answers wait in the socket until the connection is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.initiator.client import ClientSettings, CommandAborted, IscsiClient, SessionLost
from node_agent.iscsi.keys import TargetSettings
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.server import PortalServer
from node_agent.iscsi.target import TargetRegistry
from tests.protocol.conftest import INITIATOR, TARGET, make_registry

READ_8_BLOCKS = struct.pack(">BBQIBB", 0x88, 0, 0, 8, 0, 0)  # READ(16), 4 KiB at LBA 0
LOST = "connection to .* lost"


@contextlib.asynccontextmanager
async def portal(registry: TargetRegistry | None = None) -> AsyncIterator[PortalServer]:
    """Shoal's target serving ``registry`` (``make_registry()``'s one 1 MiB LUN by default) on 127.0.0.1:0."""
    server = PortalServer(registry or make_registry(), TargetSettings(), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def session(server: PortalServer, sent: list | None = None, **settings) -> AsyncIterator[IscsiClient]:
    """A logged-in client; ``sent`` collects (opcode, ITT) of every PDU it sends (through the PDU hook)."""
    def hook(opcode, header, data):
        sent.append((opcode, int.from_bytes(header[16:20], "big")))

    values = dict(initiator_iqn=INITIATOR, reconnect_timeout=5, nop_interval=3600) | settings
    client = IscsiClient(*server.address, TARGET, settings=ClientSettings(**values),
                         pdu_hook=hook if sent is not None else None)
    await client.connect()
    await client.execute(bytes(6), check=False)  # TEST UNIT READY takes the power-on unit attention
    try:
        yield client
    finally:
        await client.close()


async def outstanding(client: IscsiClient, *requests) -> list[asyncio.Task]:
    """Start ``requests`` with the client not reading: they go out, and their answers wait unread."""
    client._proto.transport.pause_reading()
    tasks = [asyncio.ensure_future(request) for request in requests]
    await asyncio.sleep(0.05)  # sent, and answered by the target into the socket
    assert not any(task.done() for task in tasks)
    return tasks


def drop(client: IscsiClient) -> None:
    client._proto.transport.abort()


async def reinstated(client: IscsiClient) -> None:
    for _ in range(200):
        if client.state == "up" and client.conn is not None and client.conn.logged_in:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session was not reinstated")


def test_the_core_ends_what_was_answered_on_the_lost_connection_only():
    """Sans I/O: ``lost()`` ends the ping, the TMF (with the command it was aborting) and the negotiation;
    ``adopt`` on the next connection issues the other command again and asks the SendTargets query again."""
    from tests.protocol.test_initiator_review_fixes import logged_in_core  # (that module imports this one)

    old = logged_in_core()
    victim, other = (old.submit(READ_8_BLOCKS, read_length=4096) for _ in range(2))
    ping = old.nop_out(b"ping")
    abort = old.task_management(C.TMF_ABORT_TASK, 0, victim)
    query = old.text([("SendTargets", "All")])
    negotiation = old.text([("MaxRecvDataSegmentLength", "65536")])
    old.take_output()
    old.lost()
    assert old.take_events() == [C.RequestLost(ping, Opcode.NOP_OUT),
                                 C.RequestLost(abort, Opcode.TASK_MGMT_REQUEST, (victim,)),
                                 C.RequestLost(negotiation, Opcode.TEXT_REQUEST)]
    assert old.outstanding() == [other]
    new = logged_in_core()
    new.adopt(old)
    out = b"".join(bytes(piece) for piece in new.take_output())
    sent = []
    while out:
        opcode, header = P.decode_header(out[:P.BHS_LENGTH])
        sent.append((opcode, header.itt))
        out = out[P.frame_length(out[:P.BHS_LENGTH], False, False):]
    assert sent == [(Opcode.SCSI_COMMAND, other), (Opcode.TEXT_REQUEST, query)]


def test_a_ping_outstanding_when_the_connection_drops_fails_at_once():
    """A NOP-Out checks the connection it was sent on (§11.18): lost with it, it fails (not sent again)."""
    async def scenario():
        async with portal() as server, session(server, sent := []) as client:
            [ping] = await outstanding(client, client.nop(b"ping"))
            drop(client)
            with pytest.raises(ConnectionError, match=LOST):
                await asyncio.wait_for(ping, 2)
            await reinstated(client)
            assert await asyncio.wait_for(client.nop(b"again"), 2) == b"again"
            return sent

    sent = asyncio.run(scenario())
    assert [op for op, _ in sent].count(Opcode.NOP_OUT) == 2  # the lost ping, and the one after


@pytest.mark.parametrize("function", [C.TMF_ABORT_TASK, C.TMF_LUN_RESET])
def test_task_management_outstanding_when_the_connection_drops_fails_and_is_not_sent_again(function):
    """The TMF fails with the connection (its answer is lost and whether the target performed it is
    unknown); it is not sent again on the new connection, whose task set is another one, and the READ
    it was ending is not issued again: reinstatement ended it on the target (§6.3.5), so its caller
    gets ``CommandAborted`` (no status, may or may not have run), as after an answered TMF."""
    async def scenario():
        async with portal() as server, session(server, sent := []) as client:
            [read] = await outstanding(client, client.execute(READ_8_BLOCKS, read_length=4096))
            [itt] = client.conn.outstanding()
            [tmf] = await outstanding(client, client.task_management(function, 0, itt))
            drop(client)
            with pytest.raises(ConnectionError, match=LOST):
                await asyncio.wait_for(tmf, 2)
            with pytest.raises(CommandAborted):
                await asyncio.wait_for(read, 2)
            await reinstated(client)
            assert (await asyncio.wait_for(client.execute(READ_8_BLOCKS, read_length=4096), 2)).status == 0
            assert client.conn.outstanding() == [] and client._slots.free == client.settings.queue_depth
            return sent, itt

    sent, itt = asyncio.run(scenario())
    assert [op for op, _ in sent].count(Opcode.TASK_MGMT_REQUEST) == 1
    assert sent.count((Opcode.SCSI_COMMAND, itt)) == 1


def test_a_sendtargets_query_is_asked_again_and_other_text_fails():
    """SendTargets only reads the target's configuration (§13.3): asked again after the reinstatement,
    its caller gets the answer.  Any other key in a Text Request is a negotiation (§6.2) that may or may
    not have taken effect on the lost connection: it fails instead of being repeated."""
    async def scenario():
        async with portal() as server, session(server) as client:
            query, negotiation = await outstanding(
                # SendTargets with an empty value (the session's own target): All is for discovery sessions only
                client, client.text([("SendTargets", "")]), client.text([("MaxRecvDataSegmentLength", "65536")]))
            drop(client)
            with pytest.raises(ConnectionError, match=LOST):
                await asyncio.wait_for(negotiation, 2)
            return await asyncio.wait_for(query, 5)

    pairs = asyncio.run(scenario())
    assert ("TargetName", TARGET) in pairs


def test_every_caller_gets_session_lost_when_the_target_does_not_come_back():
    """The target goes away for good: a query kept for the next connection and callers waiting for the
    reconnect (with no timeout of their own) all end with ``SessionLost`` after ``reconnect_timeout``."""
    async def scenario():
        async with portal() as server, session(server, reconnect_timeout=0.5) as client:
            [query] = await outstanding(client, client.text([("SendTargets", "All")]))
            await server.close()
            drop(client)
            await asyncio.sleep(0)
            waiting = [asyncio.ensure_future(request) for request in
                       (client.nop(), client.task_management(C.TMF_LUN_RESET), client.execute(READ_8_BLOCKS,
                                                                                           read_length=4096))]
            for task in [query, *waiting]:
                with pytest.raises(SessionLost):
                    await asyncio.wait_for(task, 5)
            assert client.state == "down"

    asyncio.run(scenario())


def test_callers_waiting_for_a_reconnect_get_session_lost_when_the_client_is_closed():
    """``close()`` during a reconnect cancels the reconnect task; a caller waiting for it must get
    ``SessionLost``, not a ``CancelledError`` it did not ask for (which reads as its own cancellation)."""
    async def scenario():
        async with portal() as server, session(server, reconnect_timeout=30) as client:
            await server.close()
            drop(client)
            await asyncio.sleep(0)
            waiting = [asyncio.ensure_future(request) for request in
                       (client.nop(), client.text([("SendTargets", "All")]),
                        client.execute(READ_8_BLOCKS, read_length=4096))]
            await asyncio.sleep(0.05)
            assert client.state == "reconnecting" and not any(task.done() for task in waiting)
            await client.close()
            for task in waiting:
                with pytest.raises(SessionLost):
                    await asyncio.wait_for(task, 2)

    asyncio.run(scenario())


# -- a connection lost the moment its login completes -------------------------------------------------
@contextlib.asynccontextmanager
async def dropping_proxy(target_port: int, drop: set[int]) -> AsyncIterator[int]:
    """A TCP relay to the target that closes its connections numbered in ``drop`` (1 = the first) right
    after forwarding the Login Response that enters full feature phase (T=1, NSG=3, §11.13): the
    initiator reads the response and the end of the connection together."""
    count = 0

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, last_login: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                if last_login and data[0] & 0x3F == Opcode.LOGIN_RESPONSE and data[1] & 0x83 == 0x83:
                    break
        writer.close()

    async def serve(client_reader, client_writer):
        nonlocal count
        count += 1
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        asyncio.ensure_future(relay(client_reader, target_writer, False))
        await relay(target_reader, client_writer, count in drop)
        target_writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_a_connection_lost_as_its_login_completes_is_not_taken_for_the_session():
    """The initial login: ``connect`` fails instead of returning a client that is "up" on a closed socket
    (whose commands would never be sent, and whose dead-ping aborts would change nothing)."""
    async def scenario():
        async with portal() as server, dropping_proxy(server.address[1], {1}) as port:
            client = IscsiClient("127.0.0.1", port, TARGET, settings=ClientSettings(
                initiator_iqn=INITIATOR, reconnect_timeout=2, nop_interval=3600))
            try:
                with pytest.raises(ConnectionError, match="lost right after the login"):
                    await asyncio.wait_for(client.connect(), 5)
            finally:
                await client.close()

    asyncio.run(scenario())


def test_a_reconnect_whose_connection_is_lost_as_its_login_completes_tries_again():
    """A reinstatement on a connection lost at once is one more failed attempt: the next one carries the
    command that was waiting, instead of the session settling on the dead connection for good."""
    async def scenario():
        async with portal() as server, dropping_proxy(server.address[1], {2}) as port:
            client = IscsiClient("127.0.0.1", port, TARGET, settings=ClientSettings(
                initiator_iqn=INITIATOR, reconnect_timeout=5, nop_interval=3600))
            await client.connect()
            try:
                await client.execute(bytes(6), check=False)  # the power-on unit attention
                [read] = await outstanding(client, client.execute(READ_8_BLOCKS, read_length=4096))
                drop(client)
                assert (await asyncio.wait_for(read, 5)).status == 0
            finally:
                await client.close()

    asyncio.run(scenario())


def test_a_reconnect_the_target_refuses_as_not_authorized_gives_up_at_once():
    """After a fence (the initiator out of the ACL, its sessions closed) every reconnect login is refused with
    "authorization failure" (0202h), which no retry changes: the callers hear SessionLost at once instead of
    after ``reconnect_timeout`` (30 s by default: a self-fenced node's own drop waited that long)."""
    async def run():
        registry = make_registry(allow=frozenset({INITIATOR}))
        async with portal(registry) as server, session(server, reconnect_timeout=30) as client:
            with server.lock:
                registry.fence_initiator(INITIATOR)
            started = asyncio.get_running_loop().time()
            with pytest.raises(SessionLost, match="authoriz"):
                await asyncio.wait_for(client.execute(READ_8_BLOCKS), 20)
            return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 5
