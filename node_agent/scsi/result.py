"""Values that cross the boundary between the iSCSI target and the SCSI device model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus (SAM-5 §4.8): initiator port and target port names (RFC 7143 §10.1.1)."""

    initiator_port: str  # "iqn...,i,0x" + 12 hex digits of the ISID
    target_port: str  # "iqn...,t,0x" + 4 hex digits of the TPGT
    relative_target_port: int = 1


class FileRange(NamedTuple):
    """Data-In the transport may send with ``os.sendfile`` (or ``os.pread``)."""

    fd: int
    offset: int
    length: int
    source: Any = None
    """The backing store whose ``fd`` this is: the transport sends nothing once ``source.fd`` is not ``fd``
    (the LUN was closed while this waited in a connection's output, and the number may name another file)."""


@dataclass(slots=True)
class ScsiResult:
    """Outcome of one command: status, Data-In, sense, and the Data-Out length the CDB wanted.

    ``data`` is what the command would transfer, already cut to the CDB's
    allocation length; the transport sends at most EDTL bytes of it and sets
    the residual from the difference.  ``data_out_length`` is set by Data-Out
    commands: the bytes their CDB asked for (RFC 7143 §11.4.5.2 residuals).

    ``blocking`` is set when the command's I/O would block (a cold page cache, a
    slow disk, a flush): the transport calls it off its event loop and completes
    the command with the ``ScsiResult`` it returns (it never raises); ``status``
    and ``data`` are then meaningless.
    """

    status: int
    data: bytes | bytearray | memoryview | FileRange | None = None
    sense: bytes = b""
    data_out_length: int | None = None
    blocking: Callable[[], Any] | None = None
    outlives_abort: bool = False
    """``blocking`` goes on when the command is aborted (ABORT TASK, a reset, its connection gone): task
    management answers at once instead of waiting for it.  A SANITIZE (SBC-4 §4.11)."""
    answer_now: "ScsiResult | None" = None
    """The command's answer, sent at once; ``blocking`` then runs with the command already ended (what it
    returns is dropped), still counted as the connection's I/O in flight.  A SANITIZE with IMMED set."""
