"""Mode parameters (SPC-4 §7.5, SBC-3 §6.4): headers, block descriptors and pages as data.

``MODE_PAGES`` is the table of supported pages: each has a ``Layout``, its
default values and the names of the fields an initiator may change with
MODE SELECT.  ``ModeState`` keeps one logical unit's current values, answers
MODE SENSE for any page control (current/changeable/default; saved values are
not supported: 39h/00h), and applies a MODE SELECT parameter list only after
validating all of it (no partial state).
"""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    PARAMETER_LIST_LENGTH_ERROR,
    CheckCondition,
)
from node_agent.wire import Field, Layout, WireError

MODE_PARAMETER_HEADER_6 = Layout("mode parameter header(6)", 4, (  # SPC-4 §7.5.4 table 453
    Field("mode_data_length", 0, 0xFF),
    Field("medium_type", 1, 0xFF),
    Field("wp", 2, 0x80),
    Field("dpofua", 2, 0x10),
    Field("block_descriptor_length", 3, 0xFF),
))
MODE_PARAMETER_HEADER_10 = Layout("mode parameter header(10)", 8, (  # SPC-4 §7.5.4 table 454
    Field("mode_data_length", 0, 0xFFFF),
    Field("medium_type", 2, 0xFF),
    Field("wp", 3, 0x80),
    Field("dpofua", 3, 0x10),
    Field("longlba", 4, 0x01),
    Field("block_descriptor_length", 6, 0xFFFF),
))
SHORT_LBA_BLOCK_DESCRIPTOR = Layout("short LBA mode parameter block descriptor", 8, (  # SBC-3 §6.4.2 table 156
    Field("number_of_blocks", 0, 0xFFFFFFFF),
    Field("logical_block_length", 5, 0xFFFFFF),
))
LONG_LBA_BLOCK_DESCRIPTOR = Layout("long LBA mode parameter block descriptor", 16, (  # SBC-3 §6.4.2 table 157
    Field("number_of_blocks", 0, 0xFFFFFFFFFFFFFFFF),
    Field("logical_block_length", 12, 0xFFFFFFFF),
))
PAGE_HEADER = Layout("page_0 mode page header", 2, (  # SPC-4 §7.5.7 table 456
    Field("ps", 0, 0x80),
    Field("spf", 0, 0x40),
    Field("page_code", 0, 0x3F),
    Field("page_length", 1, 0xFF),
))


def _page(name: str, size: int, *fields: Field) -> Layout:
    return Layout(name, size, (Field("ps", 0, 0x80), Field("spf", 0, 0x40), Field("page_code", 0, 0x3F),
                               Field("page_length", 1, 0xFF), *fields))


CACHING_PAGE = _page("Caching mode page", 20,  # SBC-3 §6.4.5 table 164
    Field("ic", 2, 0x80), Field("abpf", 2, 0x40), Field("cap", 2, 0x20), Field("disc", 2, 0x10),
    Field("size", 2, 0x08), Field("wce", 2, 0x04), Field("mf", 2, 0x02), Field("rcd", 2, 0x01),
    Field("demand_read_retention_priority", 3, 0xF0), Field("write_retention_priority", 3, 0x0F),
    Field("disable_prefetch_transfer_length", 4, 0xFFFF), Field("minimum_prefetch", 6, 0xFFFF),
    Field("maximum_prefetch", 8, 0xFFFF), Field("maximum_prefetch_ceiling", 10, 0xFFFF),
    Field("fsw", 12, 0x80), Field("lbcss", 12, 0x40), Field("dra", 12, 0x20), Field("nv_dis", 12, 0x01),
    Field("number_of_cache_segments", 13, 0xFF), Field("cache_segment_size", 14, 0xFFFF))
CONTROL_PAGE = _page("Control mode page", 12,  # SPC-4 §7.5.8 table 457
    Field("tst", 2, 0xE0), Field("tmf_only", 2, 0x10), Field("dpicz", 2, 0x08), Field("d_sense", 2, 0x04),
    Field("gltsd", 2, 0x02), Field("rlec", 2, 0x01),
    Field("queue_algorithm_modifier", 3, 0xF0), Field("nuar", 3, 0x08), Field("qerr", 3, 0x06),
    Field("vs", 4, 0x80), Field("rac", 4, 0x40), Field("ua_intlck_ctrl", 4, 0x30), Field("swp", 4, 0x08),
    Field("ato", 5, 0x80), Field("tas", 5, 0x40), Field("atmpe", 5, 0x20), Field("rwwp", 5, 0x10),
    Field("autoload_mode", 5, 0x07), Field("busy_timeout_period", 8, 0xFFFF),
    Field("extended_self_test_completion_time", 10, 0xFFFF))
INFORMATIONAL_EXCEPTIONS_CONTROL_PAGE = _page("Informational Exceptions Control mode page", 12,  # SPC-4 §7.5.11
    Field("perf", 2, 0x80), Field("ebf", 2, 0x20), Field("ewasc", 2, 0x10), Field("dexcpt", 2, 0x08),
    Field("test", 2, 0x04), Field("ebackerr", 2, 0x02), Field("logerr", 2, 0x01),
    Field("mrie", 3, 0x0F), Field("interval_timer", 4, 0xFFFFFFFF), Field("report_count", 8, 0xFFFFFFFF))

ALL_PAGES = 0x3F
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3


@dataclass(frozen=True)
class ModePage:
    """One supported mode page: layout, defaults, and what MODE SELECT may change."""

    code: int
    layout: Layout
    defaults: dict
    changeable: tuple[str, ...]

    def default_record(self):
        return self.layout.make(page_code=self.code, page_length=self.layout.size - 2, **self.defaults)

    def changeable_bytes(self) -> bytes:
        values = {}
        for f in self.layout.fields:
            if f.name in self.changeable:
                values[f.name] = True if f.is_flag else f.mask >> f.shift
        return bytes(self.layout.encode(page_code=self.code, page_length=self.layout.size - 2, **values))


#: Supported mode pages in ascending page-code order (SPC-4 §6.11: "return all
#: pages" lists them in ascending order).
MODE_PAGES: tuple[ModePage, ...] = (
    # WCE on: writes land in the page cache; SYNCHRONIZE CACHE or FUA makes
    # them stable.  An initiator may turn it off, and then every write is FUA.
    ModePage(0x08, CACHING_PAGE, {"wce": True}, ("wce",)),
    # D_SENSE selects descriptor sense; QERR=00, TST=000 (one task set).
    # TAS=1: tasks aborted by another I_T nexus end with TASK ABORTED.
    # SWP: an initiator may write-protect the medium for everyone (SPC-4 §7.5.8).
    ModePage(0x0A, CONTROL_PAGE, {"d_sense": False, "tas": True, "queue_algorithm_modifier": 1},
             ("d_sense", "swp")),
    ModePage(0x1C, INFORMATIONAL_EXCEPTIONS_CONTROL_PAGE, {"dexcpt": True}, ()),
)
PAGES_BY_CODE = {p.code: p for p in MODE_PAGES}


class ModeState:
    """Current mode page values of one logical unit."""

    def __init__(self):
        self.current = {p.code: p.default_record() for p in MODE_PAGES}

    @property
    def d_sense(self) -> bool:
        return self.current[0x0A].d_sense

    @property
    def wce(self) -> bool:
        return self.current[0x08].wce

    @property
    def swp(self) -> bool:
        return self.current[0x0A].swp

    def page_bytes(self, page: ModePage, pc: int) -> bytes:
        if pc == PC_CHANGEABLE:
            return page.changeable_bytes()
        record = page.default_record() if pc == PC_DEFAULT else self.current[page.code]
        return bytes(page.layout.encode(record))

    def pages(self, page_code: int, subpage_code: int, pc: int, field_pointer: int) -> bytes:
        """The mode pages MODE SENSE asked for; unsupported page → INVALID FIELD IN CDB."""
        if pc == PC_SAVED:
            raise CheckCondition(SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit_pointer=7)
        if page_code == ALL_PAGES and subpage_code in (0x00, 0xFF):
            return b"".join(self.page_bytes(p, pc) for p in MODE_PAGES)
        page = PAGES_BY_CODE.get(page_code)
        # Subpage FFh: the page and all its subpages (SPC-4 §6.11 table); ours have none, so the page_0 page alone.
        if page is None or subpage_code not in (0x00, 0xFF):
            raise CheckCondition(INVALID_FIELD_IN_CDB, field_pointer=field_pointer if page is None else 3)
        return self.page_bytes(page, pc)

    def select(self, data: bytes | memoryview, *, ten: bool, pf: bool, block_size: int) -> bool:
        """Apply a MODE SELECT parameter list (SPC-4 §6.9); True when a value changed.

        Validates the header, the block descriptor (it may only restate the
        current block length) and every page before changing anything.
        """
        data = bytes(data)
        header_layout = MODE_PARAMETER_HEADER_10 if ten else MODE_PARAMETER_HEADER_6
        if len(data) < header_layout.size:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        header = header_layout.decode(data)
        pos = header_layout.size
        bdl = header.block_descriptor_length
        if bdl:
            self._check_block_descriptors(data, pos, bdl, longlba=ten and header.longlba, block_size=block_size)
        pos += bdl
        new = dict(self.current)
        while pos < len(data):
            if len(data) - pos < 2:
                raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
            ph = PAGE_HEADER.decode(data, pos)
            page = PAGES_BY_CODE.get(ph.page_code)
            if page is None or ph.spf or ph.ps:
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos, in_cdb=False)
            if ph.page_length != page.layout.size - 2:
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 1, in_cdb=False)
            end = pos + page.layout.size
            if end > len(data):
                raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
            new[page.code] = self._validated(page, data[pos:end], self.current[page.code], pos)
            pos = end
        if not pf and pos > header_layout.size + bdl:
            # PF=0 means vendor-specific page format; we only speak the standard one.
            raise CheckCondition(INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
        changed = new != self.current
        self.current = new
        return changed

    @staticmethod
    def _check_block_descriptors(data: bytes, pos: int, length: int, *, longlba: bool, block_size: int) -> None:
        layout = LONG_LBA_BLOCK_DESCRIPTOR if longlba else SHORT_LBA_BLOCK_DESCRIPTOR
        if length % layout.size or pos + length > len(data):
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR)
        for off in range(pos, pos + length, layout.size):
            d = layout.decode(data, off)
            if d.logical_block_length not in (0, block_size):
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=off + layout.size - 3,
                                     in_cdb=False)

    @staticmethod
    def _validated(page: ModePage, raw: bytes, current, pos: int):
        try:
            proposed = page.layout.decode(raw)
        except WireError:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR) from None
        fixed_mask = bytes(~b & 0xFF for b in page.changeable_bytes())
        cur = page.layout.encode(current)
        for i in range(2, page.layout.size):  # bytes 0-1 were checked above
            if (raw[i] ^ cur[i]) & fixed_mask[i]:
                diff = (raw[i] ^ cur[i]) & fixed_mask[i]
                raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + i,
                                     bit_pointer=diff.bit_length() - 1, in_cdb=False)
        return proposed._replace(ps=False)
