"""Block commands (SBC-3 §5) over the logical unit's backing store.

Every handler validates all of its CDB and parameter data before touching the
medium, so a command that fails leaves no partial state.  READ and WRITE are
the hot path: one decoded CDB, one range check, one ``pread``/``pwrite`` on
the caller's buffer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from node_agent.scsi import sense as S
from node_agent.scsi.cdb import (
    DEFECT_DATA_10_HEADER,
    DEFECT_DATA_12_HEADER,
    LBA_STATUS_DESCRIPTOR,
    LBA_STATUS_HEADER,
    READ_CAPACITY_10_DATA,
    READ_CAPACITY_16_DATA,
    UNMAP_BLOCK_DESCRIPTOR,
    UNMAP_PARAMETER_LIST_HEADER,
    offset_of,
)
from node_agent.scsi.result import FileRange, ScsiResult
from node_agent.scsi.sense import CheckCondition

PROVISIONING_MAPPED, PROVISIONING_DEALLOCATED = 0x0, 0x1


def _no_protection(value: int) -> None:
    """RDPROTECT/WRPROTECT/VRPROTECT: no protection information, so only 000b is valid (SBC-3 §5.8)."""
    if value:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)


def _transfer(lu, lba: int, count: int, length_pointer: int) -> None:
    lu.check_range(lba, count)
    if count > lu.max_transfer_blocks:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=length_pointer)


# -- READ ----------------------------------------------------------------------------
def _read(lu, lba: int, count: int):
    bs = lu.block_size
    length = count * bs
    lu.read_commands += 1
    lu.read_bytes += length
    fd = lu.backing.fd
    if length >= lu._range_threshold and fd is not None:
        if lu.read_nowait is not None and not lu.backing.cached(lba * bs, length):
            backing, offset = lu.backing, lba * bs  # sendfile would wait for the disk: read on a worker
            return lu.deferred(lambda: backing.read(offset, length))
        return FileRange(fd, lba * bs, length, lu.backing)
    read_nowait = lu.read_nowait
    if read_nowait is None:
        return lu.backing.read(lba * bs, length)
    data = read_nowait(lba * bs, length)
    if data is None:  # not in the page cache: read it on a worker thread
        backing, offset = lu.backing, lba * bs
        return lu.deferred(lambda: backing.read(offset, length))
    return data


def read_6(lu, nexus, cdb, data_out, edtl):
    """READ(6) (SBC-3 §5.7): a transfer length of 0 means 256 blocks."""
    count = cdb.transfer_length or 256
    _transfer(lu, cdb.lba, count, 4)
    return _read(lu, cdb.lba, count)


def read(lu, nexus, cdb, data_out, edtl):
    """READ(10/12/16) (SBC-3 §5.8-5.10); DPO/FUA need nothing: reads come from the page cache or disk."""
    if cdb.rdprotect:
        _no_protection(cdb.rdprotect)
    lba, count = cdb.lba, cdb.transfer_length
    if lba + count > lu.num_blocks or count > lu.max_transfer_blocks:
        _transfer(lu, lba, count, offset_of(cdb, "transfer_length"))
    if count == 0:
        return b""
    return _read(lu, lba, count)


# -- WRITE ---------------------------------------------------------------------------
def _write(lu, lba: int, count: int, data_out, fua: bool, edtl: int) -> ScsiResult:
    """Write the whole blocks of ``data_out`` (at most ``count``); report ``count`` blocks as wanted.

    ``data_out`` is None when the command came without the W bit: with an Expected Data Transfer
    Length of 0 that is how a transfer of nothing is sent (RFC 7143 §11.3.1: R and W may both be 0
    then), answered as with W=1 (nothing written, the residual says so).  With a length, the initiator
    announced data it never sends (§11.3.1: W MUST be 1 then): CHECK CONDITION, INVALID FIELD IN
    COMMAND INFORMATION UNIT, as SAM-5 transports answer a transfer inconsistent with the command and
    LIO answers a WRITE whose transfer does not match its CDB; GOOD would say a write that never
    happened succeeded.

    A write the backing store cannot do without blocking (``write_nowait`` says so: FUA, a
    slow device) goes to a worker thread; ``data_out`` stays untouched until it is done."""
    bs = lu.block_size
    want = written = count * bs
    if data_out is None and want and edtl:
        raise CheckCondition(S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    got = 0 if data_out is None else len(data_out)
    if got != want:
        written = min(got, want) // bs * bs
        data_out = memoryview(data_out)[:written] if written else None
    lu.write_commands += 1
    lu.write_bytes += written
    result = ScsiResult(S.GOOD, data_out_length=want)
    if data_out is not None:
        fua = fua or lu._fua_always
        write_nowait = lu.write_nowait
        if write_nowait is None:
            lu.backing.write(lba * bs, data_out, fua)
        elif not write_nowait(lba * bs, data_out, fua):
            backing, offset = lu.backing, lba * bs
            return lu.deferred(write_fence(lu).shared(lambda: backing.write(offset, data_out, fua)), result)
    return result


def write_6(lu, nexus, cdb, data_out, edtl):
    """WRITE(6) (SBC-3 §5.32)."""
    count = cdb.transfer_length or 256
    _transfer(lu, cdb.lba, count, 4)
    return _write(lu, cdb.lba, count, data_out, False, edtl)


def write(lu, nexus, cdb, data_out, edtl):
    """WRITE(10/12/16) (SBC-3 §5.33-5.35); FUA → stable before GOOD."""
    if cdb.wrprotect:
        _no_protection(cdb.wrprotect)
    lba, count = cdb.lba, cdb.transfer_length
    if lba + count > lu.num_blocks or count > lu.max_transfer_blocks:
        _transfer(lu, lba, count, offset_of(cdb, "transfer_length"))
    return _write(lu, lba, count, data_out, cdb.fua, edtl)


def write_atomic_16(lu, nexus, cdb, data_out, edtl):
    """WRITE ATOMIC(16) (SBC-4 §5.48): all blocks in one ``pwrite``, within MAXIMUM ATOMIC TRANSFER LENGTH.

    We report no atomic alignment, granularity or boundary (Block Limits VPD), so
    a non-zero ATOMIC BOUNDARY is refused and the whole transfer is one atomic
    write operation (SBC-4 §4.29).  A short Data-Out writes nothing: a partial
    atomic write is exactly what the command must never do.  Only on a unit that
    ``offers_write_atomic`` (the command table's ``available``).
    """
    if cdb.wrprotect:
        _no_protection(cdb.wrprotect)
    lba, count = cdb.lba, cdb.transfer_length
    lu.check_range(lba, count)
    if cdb.atomic_boundary:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=10)
    if count > lu.max_atomic_blocks:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=12)
    want = count * lu.block_size
    if want and (data_out is None or len(data_out) < want):
        raise CheckCondition(S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    if want:
        lu.backing.write(lba * lu.block_size, memoryview(data_out)[:want], lu.write_is_fua(cdb.fua))
    return ScsiResult(S.GOOD, data_out_length=want)


def write_and_verify(lu, nexus, cdb, data_out, edtl):
    """WRITE AND VERIFY(10/12/16) (SBC-3 §5.37-5.39): write, stable; the verify is then trivially true."""
    _no_protection(cdb.wrprotect)
    _transfer(lu, cdb.lba, cdb.transfer_length, offset_of(cdb, "transfer_length"))
    return _write(lu, cdb.lba, cdb.transfer_length, data_out, True, edtl)


def orwrite(lu, nexus, cdb, data_out, edtl):
    """ORWRITE(16) (SBC-3 §5.6): OR the Data-Out into the stored blocks."""
    _no_protection(cdb.orprotect)
    _transfer(lu, cdb.lba, cdb.transfer_length, 10)
    bs = lu.block_size
    want = cdb.transfer_length * bs
    done = ScsiResult(S.GOOD, data_out_length=want)
    if data_out is not None and want:
        n = min(len(data_out), want) // bs * bs
        if n:
            mask = int.from_bytes(bytes(data_out[:n]), "big")
            return _read_modify_write(lu, cdb.lba * bs, n, lambda stored: (int.from_bytes(stored, "big") | mask)
                                      .to_bytes(n, "big"), lu.write_is_fua(cdb.fua), done)
    return done


class WriteFence:
    """Keeps every other write of a logical unit out of a COMPARE AND WRITE (or ORWRITE) between its read and
    its write: SBC-3 §5.2 asks for the read, the compare and the write as "an uninterrupted series of actions".
    A WRITE of another session landing in between would end GOOD and then be overwritten by a COMPARE AND
    WRITE that compared the data it replaced: no order of the two commands gives that (an ATS lock taken over
    a lock record someone else just wrote).

    Writes run inline on the event loop (``write_nowait``, the transport's gathered ``writev``) or on workers
    (``LogicalUnit.deferred``: a FUA write, one that would block, UNMAP, WRITE SAME), the latter through
    ``shared``.  A read-modify-write on the loop keeps the loop's writes out by running there, and runs only
    while no worker writes (``try_exclusive``, holding them off until ``release``).  One on a worker (a cold
    page, FUA, WCE=0) waits for the workers' writes to end (``exclusive``) and, from its hand-off to its end,
    turns the loop's writes into workers' ones (``fence``): the unit's ``write_nowait`` says "would block"
    and nothing is gathered, so while no read-modify-write is out the inline paths do no work for this."""

    __slots__ = ("_cond", "_writers", "_held", "_waiting", "_fenced", "_saved")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writers = 0  # deferred writes of the unit doing their I/O (``shared``)
        self._held = False  # a read-modify-write is between its read and its write
        self._waiting = 0  # read-modify-writes on workers waiting for ``_writers`` to drain (no new one starts)
        self._fenced = 0  # read-modify-writes handed to workers and not ended (``fence``)
        self._saved: tuple | None = None  # the unit's own ``write_nowait`` and ``_writev`` while fenced

    def shared(self, io):
        """``io`` (a write on a worker) made to wait while a read-modify-write holds the unit or waits for it."""
        def run():
            cond = self._cond
            with cond:
                while self._held or self._waiting:
                    cond.wait()
                self._writers += 1
            try:
                return io()
            finally:
                with cond:
                    self._writers -= 1
                    if not self._writers:
                        cond.notify_all()
        return run

    def try_exclusive(self) -> bool:
        """On the event loop: hold the unit if no write runs on a worker and none is fenced; never waits."""
        with self._cond:
            if self._held or self._waiting or self._writers or self._fenced:
                return False
            self._held = True
            return True

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """On a worker: hold the unit once the writes running on workers have ended (new ones wait)."""
        cond = self._cond
        with cond:
            self._waiting += 1
            try:
                while self._held or self._writers:
                    cond.wait()
            finally:
                self._waiting -= 1
            self._held = True
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def fence(self, lu) -> None:
        """On the event loop, handing a read-modify-write to a worker: until ``unfence``, the unit's inline
        writes would block (so they go to workers, through ``shared``) and it gathers none."""
        with self._cond:
            self._fenced += 1
            if self._fenced == 1:
                self._saved = (lu.write_nowait, lu._writev)
                lu.write_nowait, lu._writev = _would_block, None

    def unfence(self, lu) -> None:
        with self._cond:
            self._fenced -= 1
            if not self._fenced:
                lu.write_nowait, lu._writev = self._saved
                self._saved = None


def _would_block(offset: int, data, fua: bool = False) -> bool:
    return False


def write_fence(lu) -> WriteFence:
    """The unit's ``WriteFence``, made on first use (``setdefault``: one per unit even if two threads race)."""
    fence = lu.__dict__.get("write_fence")
    if fence is None:
        fence = lu.__dict__.setdefault("write_fence", WriteFence())
    return fence


def _read_modify_write(lu, offset: int, length: int, change, fua: bool, done: ScsiResult) -> ScsiResult:
    """Write ``change(stored)`` over the ``length`` bytes stored at ``offset`` (``change`` raises
    ``CheckCondition`` to write nothing), with no other read-modify-write of the unit (COMPARE AND WRITE,
    ORWRITE) between the read and the write (the unit's ``rmw_lock``), nor any other write (its
    ``WriteFence``).  On the event loop when the blocks are in the page cache, the write needs no flush and
    no write runs on a worker; otherwise on a worker, so a cold page or a FUA write holds up no other session
    (issue 7, "fair under a slow disk").  A store that never blocks, or a WRITE ATOMIC unit (all of its I/O
    inline, one command at a time), does it here."""
    backing, lock = lu.backing, lu.rmw_lock
    read_nowait = lu.read_nowait
    if read_nowait is None:
        backing.write(offset, change(backing.read(offset, length)), fua)
        return done
    fence = write_fence(lu)
    would_copy = getattr(backing, "would_copy", None)  # the agent's copy-before-write guard (agent.copies)
    if not fua and not (would_copy is not None and would_copy(offset, length)) and lock.acquire(blocking=False):
        try:
            if fence.try_exclusive():
                try:
                    stored = read_nowait(offset, length)
                    if stored is not None:
                        new = change(stored)
                        if not lu.write_nowait(offset, new, False):  # the pages were just read: this is rare
                            backing.write(offset, new, False)  # held still: nothing comes between
                        return done
                finally:
                    fence.release()
        finally:
            lock.release()

    def whole() -> ScsiResult:
        try:
            with lock, fence.exclusive():
                try:
                    new = change(backing.read(offset, length))
                except CheckCondition as refused:
                    return ScsiResult(S.CHECK_CONDITION, sense=refused.sense(lu.mode.d_sense))
                backing.write(offset, new, fua)
            return done
        finally:
            fence.unfence(lu)
    fence.fence(lu)
    return lu.deferred(whole)


def compare_and_write(lu, nexus, cdb, data_out, edtl):
    """COMPARE AND WRITE (SBC-3 §5.2): the read, compare and write run as one uninterrupted series
    (``_read_modify_write``): no other COMPARE AND WRITE or ORWRITE, and no other write of any session, comes
    between them; on the event loop when the blocks are cached, on a worker when they are not."""
    _no_protection(cdb.wrprotect)
    count = cdb.number_of_logical_blocks
    lu.check_range(cdb.lba, count)
    if count > lu.settings.max_compare_and_write_blocks:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=13)
    bs = lu.block_size
    want = 2 * count * bs
    if count == 0:
        if data_out:  # libiscsi sends 256 blocks as NLB=0 with the data: refuse rather than ignore
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=13)
        return ScsiResult(S.GOOD, data_out_length=0)
    if data_out is None or len(data_out) != want:
        raise CheckCondition(S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    verify, new = bytes(data_out[: count * bs]), data_out[count * bs:]

    def compared(stored):
        if stored != verify:
            raise CheckCondition(S.MISCOMPARE_DURING_VERIFY, info=_first_difference(stored, verify))
        return new
    return _read_modify_write(lu, cdb.lba * bs, count * bs, compared, lu.write_is_fua(cdb.fua),
                              ScsiResult(S.GOOD, data_out_length=want))


# -- VERIFY --------------------------------------------------------------------------
def verify(lu, nexus, cdb, data_out, edtl):
    """VERIFY(10/12/16) (SBC-3 §5.24-5.26): BYTCHK 00b medium check, 01b compare, 11b compare one block.

    Deallocated blocks are compared as the zeros they read as (LBPRZ), as VBULS=1 in the Block Device
    Characteristics VPD page says (SBC-4 VERIFY(10): with VBULS=0 a compare over an unmapped LBA would have
    to end in MISCOMPARE VERIFY OF UNMAPPED LBA)."""
    _no_protection(cdb.vrprotect)
    lba, count = cdb.lba, cdb.transfer_length
    _transfer(lu, lba, count, offset_of(cdb, "transfer_length"))  # the VERIFICATION LENGTH field
    if cdb.bytchk == 0b10:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=2)
    if cdb.bytchk == 0 or count == 0:
        return None
    bs = lu.block_size
    want = bs if cdb.bytchk == 0b11 else count * bs
    if data_out is None or len(data_out) < want:
        raise CheckCondition(S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    expected = bytes(data_out[:want])
    if cdb.bytchk == 0b11:
        expected *= count
    backing = lu.backing

    def compare() -> ScsiResult:  # up to 8 MiB read, maybe from the disk
        stored = backing.read(lba * bs, count * bs)
        if stored != expected:
            miscompare = CheckCondition(S.MISCOMPARE_DURING_VERIFY, info=_first_difference(stored, expected))
            return ScsiResult(S.CHECK_CONDITION, sense=miscompare.sense(lu.mode.d_sense))
        return ScsiResult(S.GOOD, data_out_length=want)
    return _off_the_loop(lu, compare, None)


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# -- defects ---------------------------------------------------------------------------
#: DEFECT LIST FORMAT values of SBC-3 table 28 / SBC-4 (short block, extended bytes from index,
#: extended physical sector, long block, bytes from index, physical sector): an empty list can be
#: given in any of them.  Vendor specific (110b) and reserved (111b) get the default format.
_DEFECT_LIST_FORMATS = frozenset((0b000, 0b001, 0b010, 0b011, 0b100, 0b101))
_DEFAULT_DEFECT_LIST_FORMAT = 0b101  # physical sector format


def _defect_header(layout, cdb) -> bytes:
    """A defect list header with no address descriptors: a file has no medium defects to report."""
    fmt = cdb.defect_list_format
    if fmt not in _DEFECT_LIST_FORMATS:
        fmt = _DEFAULT_DEFECT_LIST_FORMAT  # SBC-3 §5.13.1: reply in the default format instead
    return bytes(layout.encode(plistv=cdb.req_plist, glistv=cdb.req_glist, defect_list_format=fmt,
                               defect_list_length=0))


def read_defect_data_10(lu, nexus, cdb, data_out, edtl):
    """READ DEFECT DATA(10) (SBC-3 §5.13): the requested lists, both empty."""
    return _defect_header(DEFECT_DATA_10_HEADER, cdb)


def read_defect_data_12(lu, nexus, cdb, data_out, edtl):
    """READ DEFECT DATA(12) (SBC-3 §5.14): as the 10-byte form; every ADDRESS DESCRIPTOR INDEX is past the end."""
    return _defect_header(DEFECT_DATA_12_HEADER, cdb)


# -- cache and medium ------------------------------------------------------------------
def synchronize_cache(lu, nexus, cdb, data_out, edtl):
    """SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22): fdatasync; GOOD means stable (even with IMMED)."""
    count = cdb.number_of_blocks
    if cdb.lba >= lu.num_blocks or (count and cdb.lba + count > lu.num_blocks):  # the LBA itself must exist
        raise CheckCondition(S.LBA_OUT_OF_RANGE)
    return _off_the_loop(lu, lu.backing.flush, None)  # fdatasync


def pre_fetch(lu, nexus, cdb, data_out, edtl):
    """PRE-FETCH(10/16) (SBC-3 §5.3): GOOD (SBC-3: "no cache room" is GOOD, not CONDITION MET).

    A PREFETCH LENGTH above the MAXIMUM PREFETCH LENGTH of the Block Limits VPD page is refused with
    INVALID FIELD IN CDB (SBC-4 §6.6.4, transfer limits table); 0 (up to the last block) names no
    length, and a prefetch may stop short of what it asks anyway, so it is accepted."""
    count = cdb.prefetch_length
    if cdb.lba >= lu.num_blocks or cdb.lba + count > lu.num_blocks:
        raise CheckCondition(S.LBA_OUT_OF_RANGE)
    if count > lu.max_prefetch_blocks:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=offset_of(cdb, "prefetch_length"))
    return None


def start_stop_unit(lu, nexus, cdb, data_out, edtl):
    """START STOP UNIT (SBC-3 §5.20): LOEJ loads/ejects a removable medium; stopping flushes."""
    # Reserved POWER CONDITION codes are not refused: libiscsi's StartStopUnit.PwrCnd sends all sixteen with
    # LOEJ and expects GOOD with nothing ejected (any code but START_VALID leaves START and LOEJ unused).
    if cdb.loej:
        if not lu.settings.removable:
            raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=4, bit_pointer=1)
        if cdb.power_condition == 0:
            lu.load_or_eject(load=bool(cdb.start))
        return None
    if not cdb.start and not cdb.no_flush and cdb.power_condition == 0:
        return _off_the_loop(lu, lu.backing.flush, None)
    return None


# -- capacity ----------------------------------------------------------------------------
def read_capacity_10(lu, nexus, cdb, data_out, edtl):
    """READ CAPACITY(10) (SBC-3 §5.15): FFFFFFFFh says "use READ CAPACITY(16)"."""
    if not cdb.pmi and cdb.lba:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    return bytes(READ_CAPACITY_10_DATA.encode(returned_lba=min(lu.num_blocks - 1, 0xFFFFFFFF),
                                              block_length=lu.block_size))


def read_capacity_16(lu, nexus, cdb, data_out, edtl):
    """READ CAPACITY(16) (SBC-3 §5.16) with LBPME/LBPRZ for thin provisioning."""
    if not cdb.pmi and cdb.lba:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    thin = lu.settings.thin_provisioning
    return bytes(READ_CAPACITY_16_DATA.encode(returned_lba=lu.num_blocks - 1, block_length=lu.block_size,
                                              lbppbe=lu.lbppbe, lbpme=thin, lbprz=thin))


# -- which units offer a command (the command table's ``available``) ---------------------
def offers_thin_provisioning(lu) -> bool:
    """UNMAP, GET LBA STATUS and SANITIZE BLOCK ERASE: only on a thin (LBPME=1) unit (SBC-3 §4.7)."""
    return lu.settings.thin_provisioning


def offers_write_atomic(lu) -> bool:
    """WRITE ATOMIC(16): only where an operator opted in (``LunSettings.max_atomic_transfer_bytes``)."""
    return lu.max_atomic_blocks > 0


# -- thin provisioning -----------------------------------------------------------------
def fenced_write(lu, io):
    """``io``, which writes the unit's medium, made to wait for a COMPARE AND WRITE between its read and its
    write (``WriteFence.shared``) where the unit's writes can run on workers; as it is where all of the unit's
    I/O runs on its loop (no ``write_nowait``), one command at a time."""
    return write_fence(lu).shared(io) if lu.write_nowait is not None else io


def _write_off_the_loop(lu, io, done: ScsiResult | None) -> ScsiResult | None:
    """``_off_the_loop`` for ``io`` that writes the medium (a hole punch, WRITE SAME's blocks), fenced."""
    return _off_the_loop(lu, fenced_write(lu, io), done)


def _off_the_loop(lu, io, done: ScsiResult | None) -> ScsiResult | None:
    """Run ``io`` (a hole punch, a long write, a flush: it may take the disk's time) where it holds up no
    other session: on a worker thread when the transport can (a store with non-blocking I/O), the command
    then completing with ``done``; here otherwise, answering ``done``.  ``done`` None: what ``io`` returned
    (a ``ScsiResult``, or None for GOOD).  Every check of the command has passed already (issue 7, "fair
    under a slow disk")."""
    if lu.write_nowait is not None:
        return lu.deferred(io, done)
    result = io()
    return done if done is not None else result


def unmap(lu, nexus, cdb, data_out, edtl):
    """UNMAP (SBC-3 §5.28): validate every descriptor, then punch them all."""
    if cdb.anchor:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)
    length = cdb.parameter_list_length
    if length == 0:
        return None
    if length < UNMAP_PARAMETER_LIST_HEADER.size:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(data_out[:length]) if data_out is not None else b""
    if len(data) < length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    header = UNMAP_PARAMETER_LIST_HEADER.decode(data)
    available = min(header.block_descriptor_data_length, length - UNMAP_PARAMETER_LIST_HEADER.size)
    count = available // UNMAP_BLOCK_DESCRIPTOR.size  # a partial last descriptor is ignored
    if count > lu.settings.max_unmap_descriptors:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=2, in_cdb=False)
    ranges = []
    total = 0  # MAXIMUM UNMAP LBA COUNT bounds the sum over all descriptors (SBC-3 §5.28.2)
    for i in range(count):
        pos = UNMAP_PARAMETER_LIST_HEADER.size + i * UNMAP_BLOCK_DESCRIPTOR.size
        d = UNMAP_BLOCK_DESCRIPTOR.decode(data, pos)
        if d.lba + d.number_of_blocks > lu.num_blocks:
            raise CheckCondition(S.LBA_OUT_OF_RANGE)
        total += d.number_of_blocks
        if total > lu.settings.max_unmap_lba_count:  # pointing at the count that went past it
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 8, in_cdb=False)
        if d.number_of_blocks:
            ranges.append((d.lba, d.number_of_blocks))
    if not ranges:
        return None
    bs, backing, fua = lu.block_size, lu.backing, lu._fua_always

    def deallocate() -> None:  # 256 descriptors of 512 MiB: a hole punch of ~0.1 s each on ext4
        for lba, n in ranges:
            backing.punch(lba * bs, n * bs)
        if fua:
            backing.flush()
    return _write_off_the_loop(lu, deallocate, None)


def write_same(lu, nexus, cdb, data_out, edtl):
    """WRITE SAME(10/16) (SBC-3 §5.41-5.42): UNMAP bit or an all-zero block → punch (LBPRZ); else replicate."""
    _no_protection(cdb.wrprotect)
    ndob = getattr(cdb, "ndob", False)
    if cdb.anchor or cdb.pbdata or cdb.lbdata:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4 if cdb.anchor else 2)
    if cdb.unmap and not lu.settings.thin_provisioning:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=3)
    lba, count = cdb.lba, cdb.number_of_blocks
    length_pointer = offset_of(cdb, "number_of_blocks")
    lu.check_range(lba, count)
    if count == 0 or count > lu.max_write_same_blocks:  # WSNZ=1 in the Block Limits page
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=length_pointer)
    bs = lu.block_size
    if ndob:
        block = None
    else:
        if data_out is None or len(data_out) != bs:
            raise CheckCondition(S.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        block = bytes(data_out)
    backing, fua = lu.backing, lu._fua_always
    if block is None and not lu.settings.thin_provisioning:
        block = bytes(bs)  # NDOB on a fully provisioned unit: zeros written, its blocks stay allocated
    if block is None or (lu.settings.thin_provisioning and not any(block)):
        def io() -> None:
            backing.punch(lba * bs, count * bs)
            if fua:
                backing.flush()
    else:
        def io() -> None:
            _replicate(lu, lba, count, block)
    return _write_off_the_loop(lu, io, ScsiResult(S.GOOD, data_out_length=0 if ndob else bs))


def _replicate(lu, lba: int, count: int, block: bytes) -> None:
    bs = lu.block_size
    per_chunk = max(1, (1 << 20) // bs)
    chunk = block * min(count, per_chunk)
    done = 0
    fua = lu._fua_always
    while done < count:
        if lu.sanitize_stopping and lu.sanitizing:  # a sanitize's pass stopped by a fence or a removal
            raise InterruptedError("the sanitize was stopped (fence or removal)")
        n = min(per_chunk, count - done)
        lu.backing.write((lba + done) * bs, chunk if n * bs == len(chunk) else chunk[: n * bs], fua)
        done += n


_LBA_STATUS_LOOKUPS = 4096  # backing store extent lookups one GET LBA STATUS makes at most


def get_lba_status(lu, nexus, cdb, data_out, edtl):
    """GET LBA STATUS (SBC-3 §5.5): mapped/deallocated extents from SEEK_DATA/SEEK_HOLE."""
    lba = cdb.lba
    if lba >= lu.num_blocks:
        raise CheckCondition(S.LBA_OUT_OF_RANGE)
    bs = lu.block_size
    room = max(1, (min(cdb.allocation_length, 1 << 16) - LBA_STATUS_HEADER.size) // LBA_STATUS_DESCRIPTOR.size)
    runs: list[list[int]] = []  # [lba, blocks, status], adjacent runs of one status merged
    end = min(lu.num_blocks, lba + 0xFFFFFFFF)
    for _ in range(_LBA_STATUS_LOOKUPS):  # bounded: fewer LBAs described is an answer too; the client asks on
        if lba >= lu.num_blocks:
            break
        mapped, run = lu.backing.extent(lba * bs, min(lu.num_blocks - lba, 0xFFFFFFFF) * bs)
        # An LBA is deallocated only if all of it is a hole: the backing file's holes may be finer than the
        # LBA (a 1 KiB-block filesystem under 4 KiB LBAs), and with LBPRZ=1 "deallocated" promises zeros, which
        # sparse-aware copiers skip. A hole's run is rounded down; one shorter than an LBA leaves it mapped.
        blocks = -(-run // bs) if mapped else run // bs
        if not blocks:
            mapped, blocks = True, 1
        status = PROVISIONING_MAPPED if mapped else PROVISIONING_DEALLOCATED
        if runs and runs[-1][2] == status and runs[-1][1] + blocks <= 0xFFFFFFFF:
            runs[-1][1] += blocks
        elif len(runs) < room:
            runs.append([lba, blocks, status])
        else:
            break
        lba += blocks
        if lba >= end:
            break
    out = b"".join(bytes(LBA_STATUS_DESCRIPTOR.encode(lba=start, number_of_blocks=count, provisioning_status=status))
                   for start, count, status in runs)
    header = LBA_STATUS_HEADER.encode(parameter_data_length=len(out) + 4)
    return bytes(header) + out


# -- SANITIZE (SBC-4 §4.11, §5.30) --------------------------------------------------------
SANITIZE_OVERWRITE_HEADER = 4  # OVERWRITE parameter list header (SBC-4 table 133) before the pattern


def _sanitize_no_parameters(cdb) -> None:
    if cdb.parameter_list_length:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=7)


def sanitize_overwrite(lu, nexus, cdb, data_out, edtl):
    """SANITIZE OVERWRITE: every block rewritten with the initialization pattern, OVERWRITE COUNT times.

    INVERT alternates the pattern and its complement between passes; the last pass
    writes the pattern itself.  The medium is made stable before GOOD.  It runs on
    a worker thread (``LogicalUnit.sanitize``), other commands to the unit ending
    with SANITIZE IN PROGRESS meanwhile; the command completes when it is over, or
    at once with IMMED (SBC-4 §5.30.1: status once the CDB and parameters are checked).
    """
    bs = lu.block_size
    length = cdb.parameter_list_length
    if not SANITIZE_OVERWRITE_HEADER < length <= bs + SANITIZE_OVERWRITE_HEADER:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=7)
    data = bytes(data_out[:length]) if data_out is not None else b""
    if len(data) < length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    invert, test, count = data[0] & 0x80, data[0] & 0x60, data[0] & 0x1F
    pattern_length = int.from_bytes(data[2:4], "big")
    if test:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=0, bit_pointer=6, in_cdb=False)
    if count == 0:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=0, in_cdb=False)
    if pattern_length == 0 or pattern_length > bs or SANITIZE_OVERWRITE_HEADER + pattern_length > length:
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=2, in_cdb=False)
    pattern = data[SANITIZE_OVERWRITE_HEADER: SANITIZE_OVERWRITE_HEADER + pattern_length]
    block = (pattern * -(-bs // pattern_length))[:bs]
    complement = bytes(b ^ 0xFF for b in block)

    def overwrite() -> None:
        for n in range(count):
            inverted = invert and (count - 1 - n) % 2 == 1
            _replicate(lu, 0, lu.num_blocks, complement if inverted else block)
        lu.backing.flush()
    return lu.sanitize(overwrite, ScsiResult(S.GOOD, data_out_length=length), nexus, "SANITIZE OVERWRITE",
                       bool(cdb.ause), bool(cdb.immed))


def sanitize_block_erase(lu, nexus, cdb, data_out, edtl):
    """SANITIZE BLOCK ERASE: deallocate every block (LBPRZ: they read back as zeros), then flush."""
    _sanitize_no_parameters(cdb)
    backing, size = lu.backing, lu.num_blocks * lu.block_size

    def erase() -> None:
        backing.punch(0, size)
        backing.flush()
    return lu.sanitize(erase, None, nexus, "SANITIZE BLOCK ERASE", bool(cdb.ause), bool(cdb.immed))


def sanitize_exit_failure_mode(lu, nexus, cdb, data_out, edtl):
    """SANITIZE EXIT FAILURE MODE: leave the state a failed sanitize put the unit in, if that sanitize had
    AUSE set (SBC-4 §5.30.1; INVALID FIELD IN CDB otherwise); GOOD also when the unit is not in it."""
    _sanitize_no_parameters(cdb)
    lu.exit_sanitize_failure()
    return None
