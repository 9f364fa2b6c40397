"""A remote LUN as a block device: async (``LunDevice``) and thread-safe sync (``SyncLun``) APIs.

``LunDevice`` turns byte ranges into READ(16)/WRITE(16) (with FUA), SYNCHRONIZE
CACHE(16), UNMAP, READ CAPACITY(16), INQUIRY/VPD, REPORT LUNS, persistent
reservations and task management on an ``IscsiClient``.  ``SyncLun`` runs a
client on an event loop in its own thread for callers that block (FUSE
threads, the userspace connector, the CLI).
"""

from __future__ import annotations

import asyncio
import errno
import struct
import threading
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node_agent.host.connector import ReportedIdentity, parse_vpd_identity
from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient

if TYPE_CHECKING:
    from node_agent.host.connector import VolumeTarget

READ_16, WRITE_16, SYNCHRONIZE_CACHE_16 = 0x88, 0x8A, 0x91
INQUIRY, REPORT_LUNS, UNMAP, SERVICE_ACTION_IN_16 = 0x12, 0xA0, 0x42, 0x9E
PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT = 0x5E, 0x5F
MAX_IO_BLOCKS = 2048  # split larger ranges: 1 MiB of 512-byte blocks per command
_RW16 = struct.Struct(">BBQIBB")  # READ(16)/WRITE(16)/SYNCHRONIZE CACHE(16): opcode, flags, LBA, blocks (SBC-3)


@dataclass(frozen=True)
class Capacity:
    blocks: int
    block_size: int
    lbpme: bool = False
    """Logical block provisioning management: the LUN deallocates (UNMAP) (READ CAPACITY(16), SBC-3 §5.16.2)."""
    lbprz: bool = False
    """A deallocated block reads back as zeros."""

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_size


class _WriteGate:
    """Whole-block writes share it; a read-modify-write holds it alone, from its READ to its WRITE.

    A whole-block write to a block between an RMW's READ and WRITE would be overwritten by the RMW's
    stale copy of the block (and one in flight when the RMW reads would be, too).  Partial writes are
    rare (FUSE's ``BlockFile`` merges its own and writes whole blocks), so an RMW simply holds every
    write off instead of tracking ranges.  Taking a free gate is a counter: it is on every write's path.
    Waiters are served in order, so a stream of writes cannot starve an RMW."""

    def __init__(self) -> None:
        self.writers = 0  # whole-block writes in flight
        self.exclusive = False  # a read-modify-write holds the gate
        self.waiters: deque[tuple[bool, asyncio.Future]] = deque()

    async def wait(self, exclusive: bool) -> None:
        """Wait for the gate (call when it is not free for this kind); it is then the caller's."""
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((exclusive, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed the gate, then cancelled: give it back
                self.release(exclusive)
            else:
                self.wake()  # those behind us may go now
            raise

    def release(self, exclusive: bool) -> None:
        if exclusive:
            self.exclusive = False
        else:
            self.writers -= 1
        if self.waiters:
            self.wake()

    def wake(self) -> None:
        waiters = self.waiters
        while waiters:
            exclusive, fut = waiters[0]
            if fut.done():  # its waiter was cancelled
                waiters.popleft()
            elif self.exclusive or (exclusive and self.writers):
                return
            else:
                waiters.popleft()
                if exclusive:
                    self.exclusive = True
                else:
                    self.writers += 1
                fut.set_result(None)
                if exclusive:
                    return


class LunDevice:
    """Block-level access to one LUN of a session."""

    def __init__(self, client: IscsiClient, lun: int = 0):
        self.client = client
        self.lun = lun
        self.capacity: Capacity | None = None
        self._gate = _WriteGate()  # whole-block writes against read-modify-writes (``write``)
        self._unmap_limits: tuple[int, int] | None = None

    async def read_capacity(self) -> Capacity:
        cdb = struct.pack(">BBQIBB", SERVICE_ACTION_IN_16, 0x10, 0, 32, 0, 0)
        done = await self.client.execute(cdb, self.lun, read_length=32)
        data = bytes(done.data)
        _check_parameter_data(data, 12, "READ CAPACITY(16)")  # RETURNED LOGICAL BLOCK ADDRESS, BLOCK LENGTH
        last_lba, block_size = struct.unpack_from(">QI", data)
        flags = data[14] if len(data) > 14 else 0
        self.capacity = Capacity(last_lba + 1, block_size, lbpme=bool(flags & 0x80), lbprz=bool(flags & 0x40))
        return self.capacity

    async def _geometry(self) -> Capacity:
        return self.capacity or await self.read_capacity()

    async def read_blocks(self, lba: int, count: int) -> bytes | memoryview:
        """``count`` blocks at ``lba``; a READ answered with fewer bytes (an underflow residual, SBC-3
        §5.16) is an ``IOError``, never a shorter result (joined chunks would shift every later byte)."""
        cap = self.capacity or await self.read_capacity()
        if count <= MAX_IO_BLOCKS:
            cdb = _RW16.pack(READ_16, 0, lba, count, 0, 0)
            data = (await self.client.execute(cdb, self.lun, read_length=count * cap.block_size)).data
            _check_length(data, count * cap.block_size, lba)
            return data
        parts = []
        while count:
            n = min(count, MAX_IO_BLOCKS)
            cdb = struct.pack(">BBQIBB", READ_16, 0, lba, n, 0, 0)
            done = await self.client.execute(cdb, self.lun, read_length=n * cap.block_size)
            _check_length(done.data, n * cap.block_size, lba)
            parts.append(bytes(done.data))
            lba, count = lba + n, count - n
        return b"".join(parts)

    def read_into(self, lba: int, buffer: bytearray | memoryview) -> Awaitable[Any]:
        """Read ``len(buffer)`` bytes of whole blocks at ``lba`` into ``buffer``: Data-In is received
        there directly, with no buffer allocated per command (what a caller reusing buffers wants).
        A READ answered with fewer bytes is an ``IOError``, as for ``read_blocks``: the rest of the buffer
        would hold whatever was there before.

        Await the result (its value is not part of the API).  Not a coroutine itself: a read of one
        command returns ``execute``'s coroutine directly, one coroutine less to create and resume per I/O."""
        cap = self.capacity
        view = buffer
        if buffer.__class__ is not bytearray and (buffer.__class__ is not memoryview or buffer.format != "B"
                                                  or buffer.ndim != 1):
            view = memoryview(buffer).cast("B")
        if cap is not None:
            size, block_size = len(view), cap.block_size
            if size <= MAX_IO_BLOCKS * block_size and not size % block_size:  # one command: the common case
                return self.client.execute(_RW16.pack(READ_16, 0, lba, size // block_size, 0, 0), self.lun,
                                           buffer=view, exact=True)
        return self._read_into(lba, view)

    async def _read_into(self, lba: int, view: bytearray | memoryview) -> None:
        cap = self.capacity or await self.read_capacity()
        size, block_size = len(view), cap.block_size
        if size % block_size:
            raise ValueError(f"read of {size} bytes is not a multiple of the {block_size}-byte block")
        view = memoryview(view)
        step = MAX_IO_BLOCKS * block_size
        for start in range(0, size, step):
            chunk = view[start:start + step]
            cdb = _RW16.pack(READ_16, 0, lba + start // block_size, len(chunk) // block_size, 0, 0)
            await self.client.execute(cdb, self.lun, buffer=chunk, exact=True)

    async def write_blocks(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        gate = self._gate
        if gate.exclusive or gate.waiters:  # a read-modify-write holds or waits for the gate: after it
            await gate.wait(False)
        else:
            gate.writers += 1
        try:
            await self._write_blocks(lba, data, fua=fua)
        finally:
            gate.release(False)

    async def _write_blocks(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        cap = self.capacity or await self.read_capacity()
        view = memoryview(data).cast("B")
        if len(view) % cap.block_size:
            raise ValueError(f"write of {len(view)} bytes is not a multiple of the {cap.block_size}-byte block")
        step = MAX_IO_BLOCKS * cap.block_size
        if len(view) <= step:  # one command: the common case, kept short
            cdb = _RW16.pack(WRITE_16, 0x08 if fua else 0, lba, len(view) // cap.block_size, 0, 0)
            await self.client.execute(cdb, self.lun, data_out=view)
            return
        for start in range(0, len(view), step):
            chunk = view[start:start + step]
            n = len(chunk) // cap.block_size
            cdb = _RW16.pack(WRITE_16, 0x08 if fua else 0, lba + start // cap.block_size, n, 0, 0)
            await self.client.execute(cdb, self.lun, data_out=chunk)

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes at any offset (whole blocks are read around it)."""
        cap = await self._geometry()
        first, last = offset // cap.block_size, (offset + length + cap.block_size - 1) // cap.block_size
        data = await self.read_blocks(first, last - first)
        skip = offset - first * cap.block_size
        return data[skip:skip + length]

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Bytes at any offset; partial blocks are read, merged and written back."""
        cap = await self._geometry()
        bs = cap.block_size
        data = bytes(data)
        if offset % bs == 0 and len(data) % bs == 0:
            await self.write_blocks(offset // bs, data, fua=fua)
            return
        # Read-modify-write of the edge blocks, holding every other write off (``_WriteGate``): two partial
        # writes to one block, or a whole-block write landing between the READ and the WRITE, would
        # otherwise lose bytes to the stale copy written back.
        gate = self._gate
        if gate.exclusive or gate.writers or gate.waiters:
            await gate.wait(True)
        else:
            gate.exclusive = True
        try:
            first, last = offset // bs, (offset + len(data) + bs - 1) // bs
            merged = bytearray(await self.read_blocks(first, last - first))
            skip = offset - first * bs
            merged[skip:skip + len(data)] = data
            await self._write_blocks(first, merged, fua=fua)
        finally:
            gate.release(True)

    async def flush(self) -> None:
        await self.client.execute(struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0), self.lun)

    async def unmap(self, ranges: list[tuple[int, int]]) -> None:
        """Deallocate (lba, blocks) ranges (SBC-3 §5.28)."""
        descriptors = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
        params = struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors
        cdb = bytes([UNMAP, 0, 0, 0, 0, 0, 0]) + len(params).to_bytes(2, "big") + b"\0"
        await self.client.execute(cdb, self.lun, data_out=params)

    async def unmap_limits(self) -> tuple[int, int]:
        """(MAXIMUM UNMAP LBA COUNT, MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT) of the Block Limits VPD page
        (SBC-3 §6.5.3); (0, 0) when the LUN has no such page, or takes no UNMAP."""
        if self._unmap_limits is None:
            try:
                page = await self.inquiry(0xB0, 64)
            except CommandFailed:  # no Block Limits page: nothing says how much UNMAP takes
                page = b""
            self._unmap_limits = struct.unpack_from(">II", page, 20) if len(page) >= 28 and page[1] == 0xB0 \
                else (0, 0)
        return self._unmap_limits

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate the whole blocks of ``[offset, offset+length)`` in UNMAP commands within the LUN's
        limits (its Block Limits page): MAXIMUM UNMAP LBA COUNT bounds the blocks of one *command*, all its
        descriptors together (SBC-3 §5.28: more is INVALID FIELD IN PARAMETER LIST), so a contiguous range
        goes as one descriptor per command of at most that many blocks.  ``OSError(EOPNOTSUPP)`` when the
        LUN takes no UNMAP."""
        cap = await self._geometry()
        first = -(-offset // cap.block_size)
        last = (offset + length) // cap.block_size
        if last <= first:
            return
        max_blocks, max_descriptors = await self.unmap_limits()
        if not (cap.lbpme and max_blocks and max_descriptors):
            raise OSError(errno.EOPNOTSUPP, "the LUN takes no UNMAP (READ CAPACITY LBPME, Block Limits page)")
        per_command = min(max_blocks, 0xFFFFFFFF)  # FFFFFFFFh: no limit but the descriptor field's own
        for lba in range(first, last, per_command):
            await self.unmap([(lba, min(per_command, last - lba))])

    async def inquiry(self, page: int | None = None, length: int = 255) -> bytes:
        cdb = bytes([INQUIRY, 1 if page is not None else 0, page or 0]) + length.to_bytes(2, "big") + b"\0"
        return bytes((await self.client.execute(cdb, self.lun, read_length=length)).data)

    async def reported_identity(self) -> ReportedIdentity:
        """Every logical-unit NAA designator of VPD 83h and the serial of 80h (SPC-4 §7.8.6, §7.8.15).

        All of them: a LUN may report several (tgtd lists an NAA 3 and then an NAA 6 designator), and
        the one a volume is known by need not be the first.  Decoded by ``parse_vpd_identity``, the
        connectors' one decoder (which also strips the NUL padding some targets give the serial)."""
        return parse_vpd_identity(await self.inquiry(0x83), await self.inquiry(0x80))

    async def identity(self) -> tuple[str, str]:
        """(first NAA designator as lowercase hex, unit serial number); see ``reported_identity``."""
        reported = await self.reported_identity()
        return (reported.naas[0] if reported.naas else ""), reported.serial or ""

    async def report_luns(self) -> list[int]:
        cdb = bytes([REPORT_LUNS, 0, 0, 0, 0, 0]) + (4096).to_bytes(4, "big") + b"\0\0"
        data = bytes((await self.client.execute(cdb, self.lun, read_length=4096)).data)
        length = int.from_bytes(data[:4], "big")
        luns = []
        for pos in range(8, 8 + length, 8):
            field = data[pos:pos + 8]
            luns.append(((field[0] & 0x3F) << 8 | field[1]) if field[0] & 0xC0 == 0x40 else field[1])
        return luns

    async def register(self, key: int, *, old_key: int = 0, ignore_existing: bool = False) -> None:
        """PERSISTENT RESERVE OUT REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §6.16.2)."""
        await self._prout(0x06 if ignore_existing else 0x00, 0, old_key, key)

    async def reserve(self, key: int, pr_type: int) -> None:
        """PERSISTENT RESERVE OUT RESERVE; ``pr_type`` 1 WE, 3 EA, 5 WE-RO, 6 EA-RO, 7 WE-AR, 8 EA-AR."""
        await self._prout(0x01, pr_type, key, 0)

    async def release(self, key: int, pr_type: int) -> None:
        await self._prout(0x02, pr_type, key, 0)

    async def preempt(self, key: int, victim: int, pr_type: int) -> None:
        await self._prout(0x04, pr_type, key, victim)

    async def clear_reservations(self, key: int) -> None:
        await self._prout(0x03, 0, key, 0)

    async def _prout(self, action: int, pr_type: int, key: int, sa_key: int) -> None:
        params = struct.pack(">QQ8x", key, sa_key)
        cdb = bytes([PERSISTENT_RESERVE_OUT, action, pr_type & 0x0F]) + bytes(2) + len(params).to_bytes(4, "big") + b"\0"
        await self.client.execute(cdb, self.lun, data_out=params)

    async def read_keys(self) -> tuple[int, list[int]]:
        """PERSISTENT RESERVE IN READ KEYS: (generation, registered keys) (SPC-4 §6.15.2)."""
        cdb = bytes([PERSISTENT_RESERVE_IN, 0x00]) + bytes(5) + (8192).to_bytes(2, "big") + b"\0"
        data = bytes((await self.client.execute(cdb, self.lun, read_length=8192)).data)
        _check_parameter_data(data, 8, "PERSISTENT RESERVE IN READ KEYS")
        generation, length = struct.unpack_from(">II", data)
        # ADDITIONAL LENGTH counts every key, even those past our allocation length (SPC-4 §6.15.2): the
        # data must hold the keys up to there, whole.
        _check_parameter_data(data, min(8 + length, 8192), "PERSISTENT RESERVE IN READ KEYS")
        keys = min(length, len(data) - 8) // 8
        return generation, [int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big") for i in range(keys)]

    async def read_reservation(self) -> tuple[int, int] | None:
        """PERSISTENT RESERVE IN READ RESERVATION: (holder key, type) or None."""
        cdb = bytes([PERSISTENT_RESERVE_IN, 0x01]) + bytes(5) + (24).to_bytes(2, "big") + b"\0"
        data = bytes((await self.client.execute(cdb, self.lun, read_length=24)).data)
        _check_parameter_data(data, 8, "PERSISTENT RESERVE IN READ RESERVATION")
        if int.from_bytes(data[4:8], "big") < 16:
            return None
        _check_parameter_data(data, 24, "PERSISTENT RESERVE IN READ RESERVATION")  # the reservation descriptor
        return int.from_bytes(data[8:16], "big"), data[21] & 0x0F

    async def test_unit_ready(self) -> None:
        await self.client.execute(bytes(6), self.lun)


def _check_parameter_data(data: bytes, needed: int, command: str) -> None:
    """Parameter data shorter than its fields (GOOD with an underflow residual, §11.4.5.1 of RFC 7143) is an
    ``IOError`` naming the command, never a ``struct.error`` or fields read as zeros."""
    if len(data) < needed:
        raise IOError(f"{command} returned {len(data)} bytes of parameter data, {needed} needed")


def _check_length(data: bytes | bytearray | memoryview, expected: int, lba: int) -> None:
    if len(data) != expected:
        raise IOError(f"READ(16) at LBA {lba} returned {len(data)} bytes, {expected} expected")


class SyncLun:
    """A ``LunDevice`` for threads: its client runs on a private event loop thread."""

    def __init__(self, host: str, port: int, target_iqn: str, lun: int = 0, *,
                 settings: ClientSettings | None = None, chap=None, mutual_chap=None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"iscsi-{target_iqn}", daemon=True)
        self._thread.start()
        self.client = IscsiClient(host, port, target_iqn, settings=settings, chap=chap, mutual_chap=mutual_chap)
        self.device = LunDevice(self.client, lun)
        try:
            self._call(self.client.connect())
            capacity = self._call(self.device.read_capacity())
        except BaseException:
            self.close()
            raise
        self.size = capacity.bytes
        self.block_size = capacity.block_size
        # A discard (UNMAP) leaves zeros: only then may a punched range of the FUSE file be unmapped, as a
        # punched range must read back as zeros (READ CAPACITY(16) LBPME and LBPRZ, SBC-3 §4.7.3.4).
        self.discard_zeroes = capacity.lbpme and capacity.lbprz

    @classmethod
    def open(cls, target: "VolumeTarget", *, initiator_iqn: str, settings: ClientSettings | None = None) -> "SyncLun":
        """Log in through the first of the target's portals that answers."""
        settings = settings or ClientSettings()
        settings = ClientSettings(**{**settings.__dict__, "initiator_iqn": initiator_iqn})
        errors = []
        for portal in target.portals:
            host, _, port = portal.rpartition(":")
            try:
                return cls(host.strip("[]"), int(port), target.target_iqn, target.lun, settings=settings,
                           chap=target.chap, mutual_chap=target.mutual_chap)
            except OSError as exc:  # this portal is unreachable: try the next
                errors.append(f"{portal}: {exc}")
        raise ConnectionError(f"no portal of {target.target_iqn} answered: {'; '.join(errors)}")

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def pread(self, offset: int, length: int) -> bytes:
        return self._call(self.device.read(offset, length))

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        self._call(self.device.write(offset, data, fua=fua))

    def flush(self) -> None:
        self._call(self.device.flush())

    def discard(self, offset: int, length: int) -> None:
        self._call(self.device.discard(offset, length))

    def identity(self) -> tuple[str, str]:
        return self._call(self.device.identity())

    def reported_identity(self) -> ReportedIdentity:
        return self._call(self.device.reported_identity())

    @property
    def session_state(self) -> str:
        """The session's state: "up", "reconnecting" or "down" (``IscsiClient.state``)."""
        return self.client.state

    def refresh_capacity(self) -> int:
        """READ CAPACITY(16) again (the volume grew); updates ``size`` and returns it."""
        capacity = self._call(self.device.read_capacity())
        self.size = capacity.bytes
        return self.size

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result(10)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
