"""Wire layouts as tables of fields, with one generic encoder/decoder.

Every fixed layout Shoal speaks (SCSI CDBs, sense data, VPD and mode pages, the
iSCSI Basic Header Segment of each opcode) is written once as a ``Layout``: a
name, a size and a tuple of ``Field(name, offset, mask)``.  The mask says both
the width of the field (how many bytes it spans, from ``offset``) and which bits
of those bytes belong to it, in the python-scsi manner::

    READ_10 = Layout("READ(10)", 10, (
        Field("opcode", 0, 0xFF),
        Field("fua", 1, 0x08),
        Field("lba", 2, 0xFFFFFFFF),
        Field("transfer_length", 7, 0xFFFF),
    ))

A single-bit field decodes to ``bool``; a ``Field(..., raw=True)`` decodes to
``bytes`` (vendor strings, ISIDs kept opaque); everything else to ``int``.
Multi-byte values are big-endian, as in every SCSI and iSCSI layout.

Decoding returns an immutable record (a namedtuple generated once per layout
when the module defining the layout is imported; ``record._replace`` makes a
changed copy).  The decoder and
encoder are generated from the table as straight-line code, because the
iSCSI header and READ/WRITE CDBs are decoded once per I/O; the table stays
the single source of truth.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One field of a layout: ``mask`` spans ``ceil(bits/8)`` bytes from ``offset``."""

    name: str
    offset: int
    mask: int
    raw: bool = False  # decode as bytes (mask must then cover whole bytes)

    @property
    def width(self) -> int:
        return (self.mask.bit_length() + 7) // 8

    @property
    def shift(self) -> int:
        return (self.mask & -self.mask).bit_length() - 1

    @property
    def is_flag(self) -> bool:
        return self.mask & (self.mask - 1) == 0


class Layout:
    """A fixed-size wire layout described by fields; see the module docstring."""

    def __init__(self, name: str, size: int, fields: tuple[Field, ...]):
        self.name = name
        self.size = size
        self.fields = tuple(fields)
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate field names")
        for f in self.fields:
            if f.offset < 0 or f.offset + f.width > size or f.mask <= 0:
                raise ValueError(f"{name}.{f.name}: field outside the layout")
            if f.raw and (f.shift != 0 or f.mask != (1 << (8 * f.width)) - 1):
                raise ValueError(f"{name}.{f.name}: a raw field covers whole bytes")
        self._check_overlaps()
        # A namedtuple: immutable like a frozen dataclass, but built ten times
        # faster, which matters for a header decoded once per PDU.
        self.record = collections.namedtuple(
            _class_name(name), names, defaults=[_default(f) for f in self.fields]
        )
        self._raw_spans: set[tuple[int, int]] = set()
        self.decode = self._compile_decode()
        self._encode_into = self._compile_encode()

    def _check_overlaps(self) -> None:
        seen: dict[int, str] = {}
        for f in self.fields:
            span = f.mask << (8 * (self.size - f.offset - f.width))
            for bit in range(8 * self.size):
                if span >> bit & 1:
                    if bit in seen:
                        raise ValueError(f"{self.name}: {f.name} overlaps {seen[bit]}")
                    seen[bit] = f.name

    def _compile_decode(self):
        lines = ["def decode(buf, offset=0):"]
        lines.append(f"    if len(buf) - offset < {self.size}: raise WireError('{self.name}: need {self.size} bytes, got %d' % (len(buf) - offset))")
        args = []
        units = self._struct_units()
        if units:
            # One struct.unpack_from for every byte-aligned unit the fields live in.
            lines.append("    u = _unpack(buf, offset)")
        for f in self.fields:
            start = f"offset+{f.offset}"
            end = f"offset+{f.offset + f.width}"
            index = units.get((f.offset, f.width)) if units else None
            if index is not None:
                as_bytes = (f.offset, f.width) in self._raw_spans or self._unit_code(f.width) == "s"
                expr = f"u[{index}]" if (f.raw or not as_bytes) else f"_int(u[{index}], 'big')"
            elif f.raw:
                expr = f"bytes(buf[{start}:{end}])"
            elif f.width == 1:
                expr = f"buf[{start}]"
            else:
                expr = f"_int(buf[{start}:{end}], 'big')"
            full = (1 << (8 * f.width)) - 1
            if not f.raw and f.mask != full:
                expr = f"({expr} & {f.mask:#x})"
                if f.shift:
                    expr = f"({expr} >> {f.shift})"
            if f.is_flag and not f.raw:
                expr = f"bool({expr})"
            args.append(expr)
        lines.append(f"    return _new(_record, ({', '.join(args)},))")
        namespace = {"_int": int.from_bytes, "_record": self.record, "_new": tuple.__new__, "WireError": WireError,
                     "_unpack": self._struct.unpack_from if units else None}
        exec("\n".join(lines), namespace)  # noqa: S102 - source generated from the field table above
        return namespace["decode"]

    @staticmethod
    def _unit_code(width: int) -> str:
        return {1: "B", 2: "H", 4: "I", 8: "Q"}.get(width, "s")

    def _struct_units(self) -> dict[tuple[int, int], int]:
        """Byte ranges the fields occupy, in offset order, as struct items; {} when ranges overlap."""
        spans = sorted({(f.offset, f.width) for f in self.fields})
        self._raw_spans = {(f.offset, f.width) for f in self.fields if f.raw}
        fmt, pos, index = [">"], 0, {}
        for offset, width in spans:
            if offset < pos:
                return {}  # two fields share bytes with different widths: keep the slicing decoder
            if offset > pos:
                fmt.append(f"{offset - pos}x")
            code = "s" if (offset, width) in self._raw_spans else self._unit_code(width)
            fmt.append(f"{width}s" if code == "s" else code)
            index[(offset, width)] = len(index)
            pos = offset + width
        self._struct = struct.Struct("".join(fmt))
        return index

    def _compile_encode(self):
        lines = ["def encode_into(buf, offset, values):"]
        for f in self.fields:
            v = f"values.{f.name}"
            start, end = f"offset+{f.offset}", f"offset+{f.offset + f.width}"
            if f.raw:
                lines.append(f"    _put_raw(buf, {start}, {f.width}, {v}, {f.name!r})")
                continue
            full = (1 << (8 * f.width)) - 1
            lines.append(f"    x = int({v})")
            lines.append(f"    if x < 0 or x > {f.mask >> f.shift:#x}: raise WireError('{self.name}.{f.name}=%r does not fit' % (x,))")
            if f.mask == full:
                if f.width == 1:
                    lines.append(f"    buf[{start}] = x")
                else:
                    lines.append(f"    buf[{start}:{end}] = x.to_bytes({f.width}, 'big')")
            elif f.width == 1:
                lines.append(f"    buf[{start}] |= x << {f.shift}")
            else:
                lines.append(f"    cur = _int(buf[{start}:{end}], 'big') | (x << {f.shift})")
                lines.append(f"    buf[{start}:{end}] = cur.to_bytes({f.width}, 'big')")
        lines.append("    return buf")
        namespace = {"_int": int.from_bytes, "_put_raw": _put_raw, "WireError": WireError}
        exec("\n".join(lines), namespace)  # noqa: S102 - source generated from the field table above
        return namespace["encode_into"]

    def make(self, **values: Any):
        """A record of this layout; unnamed fields take their zero default."""
        return self.record(**values)

    def encode(self, record=None, /, **values: Any) -> bytearray:
        """Encode a record (or keyword values) into a new ``bytearray`` of ``size`` bytes."""
        if record is None:
            record = self.record(**values)
        elif values:
            record = record._replace(**values)
        return self._encode_into(bytearray(self.size), 0, record)

    def encode_into(self, buf: bytearray, offset: int, record) -> bytearray:
        """Encode into ``buf`` at ``offset``; the bytes there must be zero."""
        return self._encode_into(buf, offset, record)

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, {self.size}, {len(self.fields)} fields)"


class WireError(ValueError):
    """Bytes that do not fit a layout: too short, or a value too wide for its field."""


def _put_raw(buf: bytearray, start: int, width: int, value: bytes, name: str) -> None:
    if len(value) != width:
        raise WireError(f"{name}: need {width} bytes, got {len(value)}")
    buf[start : start + width] = value


def _default(f: Field) -> Any:
    if f.raw:
        return bytes(f.width)
    return False if f.is_flag else 0


def _class_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name)
    return cleaned if cleaned[:1].isalpha() else f"L_{cleaned}"


def ascii_field(text: str, width: int) -> bytes:
    """Left-aligned, space-padded ASCII as SPC-4 §4.3.1 requires for vendor/product fields."""
    data = text.encode("ascii")[:width]
    return data + b" " * (width - len(data))
