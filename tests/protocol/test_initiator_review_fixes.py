"""Initiator answers a correct target never gives: completions around a protocol error, task
management that ends commands, residuals that do not add up.

Our own target (tests/protocol/conftest.py) cannot be made to send a corrupted digest right after a
good SCSI Response, leave an aborted command unanswered on purpose, or claim a residual larger than
the transfer; so these tests script the target's side.  ``ScriptedTarget`` is a small TCP peer on
127.0.0.1 that logs the initiator in and then answers each SCSI command with what the test writes
(our own boundary: what is checked is the initiator's bookkeeping, not a target's behaviour).  The
core-level tests feed hand-built PDUs to ``InitiatorConnection`` for the same reason.  A short read
needs no script: the PDU hook makes a READ ask Shoal's own target for less than its transfer length.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.initiator.blockdev import Capacity, LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, CommandAborted, IscsiClient
from node_agent.iscsi.keys import InitiatorSettings, encode_text, parse_text
from node_agent.iscsi.pdu import Opcode
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import MemoryBackingStore
from tests.protocol.conftest import INITIATOR, TARGET
from tests.protocol.test_initiator_reconnect_futures import portal

READ_8_BLOCKS = struct.pack(">BBQIBB", 0x88, 0, 0, 8, 0, 0)  # READ(16), 4 KiB
WRITE_8_BLOCKS = struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0)
TEST_UNIT_READY = bytes(6)
UNDECODABLE = bytes([0x3E]) + bytes(47)  # a reserved target opcode: the initiator drops the connection


async def answer_login(target, read: Callable[[], Awaitable[tuple]], writer: asyncio.StreamWriter,
                       keys: dict[str, str] | None = None) -> None:
    """A scripted target's side of a login: the initiator's first choice of every key (``keys`` overrides),
    transit at once; ``target`` keeps ``expcmdsn`` and gives ``sn()``."""
    while True:
        opcode, header, data = await read()
        target.expcmdsn = header.cmdsn
        answers = [(k, (keys or {}).get(k, v.split(",")[0])) for k, v in parse_text(data)
                   if k not in ("InitiatorName", "TargetName", "SessionType", "InitiatorAlias",
                                "MaxRecvDataSegmentLength")]
        nsg = header.nsg if header.transit else 0
        writer.write(pdu(Opcode.LOGIN_RESPONSE, encode_text(answers), transit=header.transit, csg=header.csg,
                         nsg=nsg, version_max=0, version_active=0, isid=header.isid, tsih=7 if nsg == 3 else 0,
                         itt=header.itt, status_class=0, status_detail=0, **target.sn()))
        if header.transit and nsg == 3:
            return


def pdu(opcode: Opcode, data: bytes = b"", *, flags: int = 0, header_digest: bool = False,
        bad_digest: bool = False, **values) -> bytes:
    """One PDU as a target sends it; ``flags`` are OR-ed into byte 1 (the U/O/S bits of §11.4, §11.7)."""
    header = P.encode_header(opcode, data_segment_length=len(data), **values)
    header[1] |= flags
    digest = b""
    if header_digest:
        digest = bytearray(P.digest(header))
        digest[0] ^= 1 if bad_digest else 0
    return bytes(header) + bytes(digest) + data + bytes(P.pad4(len(data)) - len(data))


class ScriptedTarget:
    """A TCP peer that logs one initiator in per connection (no CHAP), answers Logout, and hands every SCSI
    Command and TMF Request to ``answer(target, connection number, opcode, header)``, which returns the bytes
    to send."""

    def __init__(self, answer: Callable[["ScriptedTarget", int, int, object], bytes],
                 header_digest: bool = False):
        self.answer = answer
        self.header_digest = header_digest
        self.connections = 0
        self.commands: list[tuple[int, int]] = []  # (connection, ITT) of every SCSI Command received
        self.statsn = 100
        self.expcmdsn = 1
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "ScriptedTarget":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def sn(self, advance: bool = True) -> dict:
        statsn = self.statsn
        self.statsn += advance
        return dict(statsn=statsn, expcmdsn=self.expcmdsn, maxcmdsn=self.expcmdsn + 31)

    def response(self, itt: int, status: int = 0, *, flags: int = 0, residual: int = 0) -> bytes:
        return pdu(Opcode.SCSI_RESPONSE, final=True, status=status, itt=itt, residual_count=residual, flags=flags,
                   header_digest=self.header_digest, **self.sn())

    def data_in(self, itt: int, data: bytes, *, status: int = 0, flags: int = 0, residual: int = 0) -> bytes:
        """``data`` in Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength (256 KiB: more is a
        protocol error, §13.12), the last with the status."""
        step = 262144
        out = b""
        for datasn, offset in enumerate(range(0, len(data) - step, step)):
            out += pdu(Opcode.DATA_IN, data[offset:offset + step], itt=itt, ttt=0xFFFFFFFF, datasn=datasn,
                       buffer_offset=offset, header_digest=self.header_digest, **self.sn(advance=False))
        last = max(0, (len(data) - 1) // step * step)
        return out + pdu(Opcode.DATA_IN, data[last:], final=True, status_present=True, status=status, itt=itt,
                         ttt=0xFFFFFFFF, datasn=last // step, buffer_offset=last, residual_count=residual,
                         flags=flags, header_digest=self.header_digest, **self.sn())

    def tmf_response(self, itt: int, response: int) -> bytes:
        return pdu(Opcode.TASK_MGMT_RESPONSE, final=True, response=response, itt=itt,
                   header_digest=self.header_digest, **self.sn())

    async def _read(self, reader: asyncio.StreamReader, digest: bool) -> tuple[int, object]:
        bhs = await reader.readexactly(P.BHS_LENGTH)
        if digest:
            await reader.readexactly(4)
        ahs, dsl = P.bhs_lengths(bhs)
        payload = await reader.readexactly(ahs + P.pad4(dsl)) if ahs or dsl else b""
        opcode, header = P.decode_header(bhs)
        return opcode, header, bytes(payload[ahs:ahs + dsl])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            await answer_login(self, lambda: self._read(reader, False), writer)
            while True:
                opcode, header, data = await self._read(reader, self.header_digest)
                if opcode == Opcode.LOGOUT_REQUEST:
                    writer.write(pdu(Opcode.LOGOUT_RESPONSE, final=True, response=0, itt=header.itt,
                                     header_digest=self.header_digest, **self.sn()))
                    await writer.drain()
                    break
                if opcode == Opcode.SCSI_COMMAND:
                    self.expcmdsn = header.cmdsn + 1
                    self.commands.append((number, header.itt))
                elif opcode != Opcode.TASK_MGMT_REQUEST:
                    continue
                writer.write(self.answer(self, number, opcode, header))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(target, scenario: Callable[[IscsiClient], Awaitable], **settings) -> object:
    """Connect a client to ``target`` (a scripted target, served while the run lasts) and run ``scenario``
    with it (10 s at most: a lost completion hangs)."""
    async def main():
        async with target:
            client = IscsiClient("127.0.0.1", target.port, TARGET, settings=ClientSettings(
                **(dict(initiator_iqn=INITIATOR, reconnect_timeout=5) | settings)))
            await client.connect()
            try:
                return await asyncio.wait_for(scenario(client), 10)
            finally:
                await client.close()
    return asyncio.run(main())


# -- a completion decoded before a protocol error ------------------------------------------------------
def test_a_response_followed_by_a_bad_header_digest_still_completes_its_command():
    """RFC 7143 §7.8: a header digest error drops the connection (ERL 0).  The GOOD SCSI Response that came
    in the same receive before the bad PDU was decoded already, and the command left the set a reconnect
    issues again: its completion must reach the caller, and the command must not run a second time."""
    def answer(target, connection, opcode, header):
        out = target.response(header.itt)
        if connection == 1:  # then a NOP-In whose header digest took a bit flip on the wire
            out += pdu(Opcode.NOP_IN, final=True, lun=bytes(8), itt=0xFFFFFFFF, ttt=0xFFFFFFFF,
                       header_digest=True, bad_digest=True, **target.sn(advance=False))
        return out

    target = ScriptedTarget(answer, header_digest=True)
    done = run(target, lambda client: client.execute(WRITE_8_BLOCKS, data_out=bytes(4096)),
               header_digest=("CRC32C",))
    assert done.status == 0
    assert [connection for connection, _ in target.commands] == [1]  # done once, not issued again


@pytest.mark.parametrize("per_pass", [0, 2], ids=["one-pass", "held-then-resumed"])
def test_responses_received_before_an_undecodable_pdu_all_complete(per_pass):
    """Three responses and an undecodable PDU in one receive.  With ``completions_per_pass`` 2 the first two
    complete in the first pass, and ``resume()`` decodes the third before it raises; either way every command
    the target answered completes, and none of them is issued again on the new connection."""
    def answer(target, connection, opcode, header):
        if connection == 1 and len(target.commands) < 3:
            return b""  # hold the answers until all three commands arrived
        if connection == 1:
            return b"".join(target.response(itt) for _, itt in target.commands) + UNDECODABLE
        return target.response(header.itt)

    async def scenario(client):
        return await asyncio.gather(*(client.execute(TEST_UNIT_READY) for _ in range(3)))

    target = ScriptedTarget(answer)
    done = run(target, scenario, completions_per_pass=per_pass)
    assert [d.status for d in done] == [0, 0, 0]
    assert [connection for connection, _ in target.commands] == [1, 1, 1]


# -- task management that ends commands ----------------------------------------------------------------
def logged_in_core() -> C.InitiatorConnection:
    """An ``InitiatorConnection`` in full feature phase, as ``_finish_login`` leaves it (no target needed:
    these tests only feed it hand-built TMF Responses)."""
    conn = C.InitiatorConnection(InitiatorSettings(INITIATOR, TARGET), isid=C.random_isid())
    conn.params = conn.negotiator.params()
    conn.params.max_recv_data_segment_length = 262144  # as declared in a login (8192 if never declared)
    conn.logged_in, conn.stage, conn.maxcmdsn = True, C.FULL_FEATURE, 64
    return conn


def tmf_answer(conn: C.InitiatorConnection, itt: int, response: int) -> list:
    conn.take_output()
    conn.receive(pdu(Opcode.TASK_MGMT_RESPONSE, final=True, response=response, itt=itt, statsn=1, expcmdsn=1,
                     maxcmdsn=64))
    return conn.take_events()


@pytest.mark.parametrize("response", [0, 1], ids=["function-complete", "task-does-not-exist"])
def test_abort_task_answered_forgets_the_command(response):
    """RFC 7143 §11.6.1: after ABORT TASK answered "Function complete" or "Task does not exist" no SCSI
    Response comes for the task: the core forgets it (a reconnect would otherwise issue it again) and names
    it in ``TmfDone.aborted``."""
    conn = logged_in_core()
    victim = conn.submit(READ_8_BLOCKS, read_length=4096)
    other = conn.submit(READ_8_BLOCKS, read_length=4096)
    itt = conn.task_management(C.TMF_ABORT_TASK, 0, victim)
    assert tmf_answer(conn, itt, response) == [C.TmfDone(itt, response, (victim,))]
    assert conn.outstanding() == [other]


def test_a_rejected_abort_leaves_the_command_waiting_for_its_status():
    conn = logged_in_core()
    victim = conn.submit(READ_8_BLOCKS, read_length=4096)
    itt = conn.task_management(C.TMF_ABORT_TASK, 0, victim)
    assert tmf_answer(conn, itt, 255) == [C.TmfDone(itt, 255, ())]  # Function rejected
    assert conn.outstanding() == [victim]


@pytest.mark.parametrize("function", [C.TMF_ABORT_TASK_SET, C.TMF_CLEAR_TASK_SET, C.TMF_LUN_RESET])
def test_a_task_set_function_ends_the_commands_of_its_lun_sent_before_it(function):
    """ABORT TASK SET, CLEAR TASK SET and LOGICAL UNIT RESET end the LU's tasks with a CmdSN below the TMF's
    (§4.2.3.3): another LUN's commands, and one still waiting for the CmdSN window, carry on."""
    conn = logged_in_core()
    conn.maxcmdsn = 2  # room for two commands
    sent = conn.submit(READ_8_BLOCKS, 0, read_length=4096)
    elsewhere = conn.submit(READ_8_BLOCKS, 1, read_length=4096)
    waiting = conn.submit(READ_8_BLOCKS, 0, read_length=4096)
    itt = conn.task_management(function, 0)
    assert tmf_answer(conn, itt, 0) == [C.TmfDone(itt, 0, (sent,))]
    assert sorted(conn.outstanding()) == sorted([elsewhere, waiting])


def test_an_aborted_command_fails_with_command_aborted():
    """Through the client: the caller of ``execute`` gets ``CommandAborted`` and its slot back, instead of
    waiting forever for a status that will not come."""
    def answer(target, connection, opcode, header):
        if opcode == Opcode.TASK_MGMT_REQUEST:
            return target.tmf_response(header.itt, 0)
        return b""  # a slow command: no answer before the abort

    async def scenario(client):
        command = asyncio.ensure_future(client.execute(READ_8_BLOCKS, read_length=4096))
        while not client.conn.outstanding():
            await asyncio.sleep(0.01)
        [itt] = client.conn.outstanding()
        assert await client.task_management(C.TMF_ABORT_TASK, 0, itt) == 0
        with pytest.raises(CommandAborted):
            await asyncio.wait_for(command, 2)
        return client

    client = run(ScriptedTarget(answer), scenario, queue_depth=4)
    assert client.conn is None or client.conn.outstanding() == []
    assert client._slots.free == 4


# -- residuals --------------------------------------------------------------------------------------------
def read_answered_with(*pieces: Callable[[ScriptedTarget, int], bytes]) -> list:
    """Issue one 4 KiB READ per piece; each is answered by ``piece(target, itt)``; the outcomes, in order."""
    answers = list(pieces)

    def answer(target, connection, opcode, header):
        return answers.pop(0)(target, header.itt)

    async def scenario(client):
        outcomes = []
        for _ in pieces:
            try:
                outcomes.append(await client.execute(READ_8_BLOCKS, read_length=4096))
            except C.InitiatorError as exc:
                outcomes.append(exc)
        return outcomes

    return run(ScriptedTarget(answer), scenario)


def test_a_residual_larger_than_the_transfer_fails_the_command():
    """§11.4.5.1: an underflow residual counts bytes of the expected transfer that were not sent, so it is at
    most the EDTL.  A larger one would slice the buffer with a negative end (wrong-length data as GOOD)."""
    [outcome] = read_answered_with(lambda t, itt: t.data_in(itt, b"\xab" * 4096, flags=0x02, residual=6000))
    assert isinstance(outcome, C.InitiatorError) and "residual of 6000" in str(outcome)


def test_good_status_with_data_in_missing_fails_the_command():
    """§11.7.5: GOOD with 1 KiB of the 4 KiB asked for and no underflow flag: the other 3 KiB were never
    received, and must not come back as zeros; a declared underflow with the same bytes is a short result."""
    short, declared = read_answered_with(
        lambda t, itt: t.data_in(itt, b"\xab" * 1024),
        lambda t, itt: t.data_in(itt, b"\xab" * 1024, flags=0x02, residual=3072))
    assert isinstance(short, C.InitiatorError) and "1024 bytes of Data-In, 4096 expected" in str(short)
    assert declared.underflow and bytes(declared.data) == b"\xab" * 1024


def test_good_status_in_a_scsi_response_after_too_little_data_in_fails_the_command():
    def answer(target, itt):
        data = pdu(Opcode.DATA_IN, b"\xab" * 512, itt=itt, ttt=0xFFFFFFFF, datasn=0, buffer_offset=0,
                   expcmdsn=target.expcmdsn, maxcmdsn=target.expcmdsn + 31)
        return data + target.response(itt)

    [outcome] = read_answered_with(answer)
    assert isinstance(outcome, C.InitiatorError) and "512 bytes of Data-In" in str(outcome)


def test_read_blocks_refuses_a_short_read_instead_of_joining_it():
    """A READ answered with a declared underflow is a short result at the iSCSI level; ``LunDevice`` asked for
    whole blocks, and joining a short chunk would shift every later byte of a multi-command read."""
    def answer(target, connection, opcode, header):
        length = struct.unpack_from(">I", header.cdb, 10)[0] * 512
        return target.data_in(header.itt, bytes(length - 512), flags=0x02, residual=512)

    async def scenario(client):
        device = LunDevice(client)
        device.capacity = Capacity(1 << 20, 512)
        with pytest.raises(IOError, match="returned 3584 bytes, 4096 expected"):
            await device.read_blocks(0, 8)
        with pytest.raises(IOError, match="returned 1048064 bytes, 1048576 expected"):
            await device.read_blocks(0, 4096)  # two commands of 2048 blocks

    run(ScriptedTarget(answer), scenario)


# -- reads into the caller's buffer -------------------------------------------------------------------
def shorter_reads(opcode, header, data):
    """PDU hook: every READ(16) asks the target for one block less than its Expected Data Transfer Length,
    so Shoal's own target answers GOOD with an underflow residual of 512 bytes (§11.4.5.1)."""
    if opcode == Opcode.SCSI_COMMAND and header[32] == 0x88:
        blocks = int.from_bytes(header[42:46], "big")
        header[42:46] = (blocks - 1).to_bytes(4, "big")


@pytest.mark.parametrize("blocks, known", [(8, True), (8, False), (4096, True)],
                         ids=["one-command", "capacity-read-first", "two-commands"])
def test_read_into_refuses_a_short_read_as_read_blocks_does(blocks, known):
    """``read_into`` fills the caller's buffer in place: after an underflow the buffer's last bytes are
    what was there before, so a short READ must fail as it does for ``read_blocks``, never pass as data.
    Each path: one command (returned without a coroutine of its own), the capacity read first, and a
    read split into commands of ``MAX_IO_BLOCKS``."""
    lu = LogicalUnit(MemoryBackingStore(8192 * 512), LunIdentity(volume_id="vol-short"), target_name=TARGET)
    registry = TargetRegistry([TargetNode(TARGET, LunMap({0: lu}))])

    async def scenario():
        async with portal(registry) as server:
            client = IscsiClient(*server.address, TARGET, pdu_hook=shorter_reads, settings=ClientSettings(
                initiator_iqn=INITIATOR, nop_interval=3600))
            await client.connect()
            try:
                await client.execute(bytes(6), check=False)  # the power-on unit attention
                device = LunDevice(client)
                if known:
                    device.capacity = Capacity(8192, 512)
                buffer = bytearray(b"\xee" * blocks * 512)
                with pytest.raises(IOError, match=r"transferred \d+ bytes, \d+ expected"):
                    await device.read_into(0, buffer)
                with pytest.raises(IOError, match="expected"):
                    await device.read_blocks(0, blocks)
            finally:
                await client.close()

    asyncio.run(scenario())


def data_in(itt: int, data: bytes, datasn: int, offset: int, *, last: bool = False) -> bytes:
    return pdu(Opcode.DATA_IN, data, final=last, status_present=last, status=0, itt=itt, ttt=0xFFFFFFFF,
               datasn=datasn, buffer_offset=offset, statsn=1, expcmdsn=1, maxcmdsn=64)


@pytest.mark.parametrize("size", [4096, 128 * 1024], ids=["copied", "placed-in-the-buffer"])
@pytest.mark.parametrize("callers_buffer", [False, True], ids=["own-buffer", "callers-buffer"])
def test_data_in_that_overlaps_instead_of_covering_the_buffer_fails_the_command(size, callers_buffer):
    """With DataPDUInOrder and DataSequenceInOrder (both Yes here) Data-In comes at continuously
    increasing offsets, with no gap or overlay (§13.18, §13.19).  Two halves both at offset 0 add up to
    the transfer length, but the second half of the buffer was never written: the command fails instead
    of GOOD with stale bytes (the caller's, or zeros)."""
    conn = logged_in_core()
    buffer = bytearray(b"\xee" * size) if callers_buffer else None
    cdb = struct.pack(">BBQIBB", 0x88, 0, 0, size // 512, 0, 0)
    itt = conn.submit(cdb, buffer=buffer) if callers_buffer else conn.submit(cdb, read_length=size)
    conn.take_output()
    half = size // 2
    wire = data_in(itt, b"\xab" * half, 0, 0) + data_in(itt, b"\xcd" * half, 1, 0, last=True)
    for start in range(0, len(wire), 1000):  # TCP-sized pieces: a large payload is then received in place
        conn.receive(wire[start:start + 1000])
    [event] = conn.take_events()
    assert isinstance(event, C.TaskFailed) and f"offset 0, {half} expected" in event.reason, event
    assert conn.outstanding() == []
    if callers_buffer:  # the misplaced PDU was not written there either (nor placed in it directly)
        assert buffer == b"\xab" * half + b"\xee" * half
