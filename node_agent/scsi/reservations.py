"""Reservations of one logical unit: persistent (SPC-4 §5.13) and SPC-2 RESERVE/RELEASE.

``Reservations`` holds the state (registrations keyed by I_T nexus, the
persistent reservation and its holder, the PRgeneration counter, an SPC-2
reservation) and answers the dispatcher's one question, ``conflicts(cmd,
nexus)``, from the command table's ``pr`` and ``spc2_allowed`` columns.
PERSISTENT RESERVE IN/OUT live in ``persistent_reserve.py``; RESERVE and
RELEASE(6/10) (SPC-2 §7.17-7.22, with the SPC-3 §5.6.3 exceptions: CRH=1) are
below.  Handlers raise ``ReservationConflict`` for RESERVATION CONFLICT status.

Unit attentions go only to I_T nexuses that are logged in.  Resets and I_T
nexus loss release an SPC-2 reservation but leave persistent reservations
alone (SPC-4 §5.13.1).  With APTPL=1 (and a regular backing file) the
persistent state is saved after every change and restored at start-up
(``ptpl.py``, SPC-4 §5.13.5).

A change whose save fails is undone: nothing half-done.  A change takes effect
in memory at once (the commands after it see it: a PREEMPT fences at once) and
is saved after, on a worker thread; the unit attentions it gives other I_T
nexuses wait for the save (``hold``).  Once the save has ended, on the event
loop (``settle_saves``, before the next command looks at the state): saved, its
unit attentions go out; not saved, the state before it comes back and its unit
attentions are dropped, and so are the changes taken on top of it meanwhile
(another initiator's PERSISTENT RESERVE OUT, a fence): the store refuses to
save a state that holds a change whose save failed (``PtplStore.save_numbered``,
by lineage), so their commands end with CHECK CONDITION too and what is on disk
and what is in force stay the same.  A fence whose save was refused fails, and
its retry finds the registrations back and removes them again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.scsi import sense as S
from node_agent.scsi.result import Nexus
from node_agent.scsi.sense import CheckCondition

# How a command fares under a reservation held by another I_T nexus (the command
# table's ``pr`` column, SPC-4 §5.13.1 table 66 and SBC-3 table 13): ALLOWED always
# runs; READ conflicts only with the Exclusive Access types; WRITE with every type.
PR_ALLOWED, PR_READ, PR_WRITE = "allowed", "read", "write"

PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
LU_SCOPE = 0x0


class ReservationConflict(Exception):
    """Raised by a handler: the command ends with RESERVATION CONFLICT status (SAM-5 §5.3.1)."""


def _uint(value, bits: int) -> bool:
    """``value`` is an int (not a bool) that fits in ``bits`` unsigned bits."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def _expect(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


@dataclass(frozen=True)
class PrType:
    """A persistent reservation type (SPC-4 §6.16.3 table 205)."""

    code: int
    name: str
    exclusive_access: bool  # reads conflict too, not only writes
    registrants: str | None  # None, "only" (registrants only) or "all" (all registrants)
    mask: int  # its bit in the PERSISTENT RESERVATION TYPE MASK (SPC-4 table 188)


PR_TYPES = {t.code: t for t in (
    PrType(0x1, "Write Exclusive", False, None, 0x0200),
    PrType(0x3, "Exclusive Access", True, None, 0x0800),
    PrType(0x5, "Write Exclusive - Registrants Only", False, "only", 0x2000),
    PrType(0x6, "Exclusive Access - Registrants Only", True, "only", 0x4000),
    PrType(0x7, "Write Exclusive - All Registrants", False, "all", 0x8000),
    PrType(0x8, "Exclusive Access - All Registrants", True, "all", 0x0001),
)}

@dataclass(eq=False)
class _Change:
    """A change taken to be saved (``save_later``): what it undoes to and announces once its save has ended."""

    number: int
    before: dict  # the state before it (``dump``): restored if its save fails
    announce: list[Callable[[], None]] = field(default_factory=list)  # its unit attentions, held until saved
    saved: bool | None = None  # set by whichever thread ran the save; read on the event loop


class Reservations:
    """Registrations, the persistent reservation and an SPC-2 reservation of one logical unit."""

    def __init__(self, store=None):
        self.registrations: dict[Nexus, int] = {}  # I_T nexus -> reservation key, in registration order
        self.generation = 0
        self.type: PrType | None = None  # the persistent reservation, if any (always LU_SCOPE)
        self.holder: Nexus | None = None  # its holder, unless the type is an all-registrants one
        self.spc2_holder: Nexus | None = None
        self.engaged = False  # some reservation exists: the dispatcher must ask ``conflicts``
        self.store = store  # a ``PtplStore``, or None: Persist Through Power Loss not offered
        self.aptpl = False  # APTPL of the last successful REGISTER (SPC-4 §5.13.5)
        self._taken = 0  # states taken to be saved (``save_later``)
        self.pending: list[_Change] = []  # changes whose save has not been settled, oldest first
        self._held: list[Callable[[], None]] = []  # unit attentions of the change being made (``hold``)
        self._lineage = 0  # changes undone so far: a state taken since then holds none of them
        self._base: dict = {}  # the state as the last change left it (``dump``): what undoing the next restores
        self._kept = False  # the store holds a saved state, or will once the pending saves are done
        try:
            saved = store.load() if store is not None else None
            if saved is not None:
                self.restore(saved)
            self._base, self._kept = self.dump(), saved is not None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as exc:
            # Not served without its reservations: an initiator fenced by them could write again.  Said plainly,
            # with the file, so an operator can judge (and move it aside to serve the volume without them).
            raise ValueError(f"{store.path}: the saved persistent reservations cannot be read "
                             f"({type(exc).__name__}: {exc}); the volume is not served without them: "
                             "repair the file, or move it aside to drop its reservations") from None

    # -- persistence (SPC-4 §5.13.5) ---------------------------------------------------
    def dump(self) -> dict:
        """The persistent state (not the SPC-2 reservation, which a power loss ends)."""
        nexuses = list(self.registrations)
        return {
            "version": 1, "generation": self.generation, "aptpl": self.aptpl,
            "registrations": [{"initiator_port": n.initiator_port, "target_port": n.target_port,
                               "relative_target_port": n.relative_target_port, "key": key}
                              for n, key in self.registrations.items()],
            "type": self.type.code if self.type else None,
            "holder": nexuses.index(self.holder) if self.holder in self.registrations else None,
        }

    def restore(self, state: dict) -> None:
        """Take a saved state (``dump``), checked whole first: a file that is valid JSON but holds a value of the
        wrong kind (hand-edited, or damaged) is refused as an unreadable one is (ValueError), rather than loaded
        to make every later PR command fail (INTERNAL TARGET FAILURE) while its reservation stays enforced and
        no initiator can PREEMPT or CLEAR it."""
        if state.get("version") != 1:
            raise ValueError(f"unknown reservation state version {state.get('version')!r}")
        registrations = state["registrations"]
        _expect(isinstance(registrations, list), "registrations: not a list")
        for r in registrations:
            _expect(isinstance(r, dict) and isinstance(r["initiator_port"], str) and isinstance(r["target_port"], str)
                    and _uint(r["relative_target_port"], 16) and _uint(r["key"], 64) and r["key"] != 0,
                    f"registration {r!r}: ports are names, the relative port a 16-bit and the key a non-zero "
                    "64-bit number")
        nexuses = [Nexus(r["initiator_port"], r["target_port"], r["relative_target_port"]) for r in registrations]
        _expect(len(set(nexuses)) == len(nexuses), "an I_T nexus registered twice")
        generation, aptpl, code, holder = state["generation"], state["aptpl"], state["type"], state["holder"]
        _expect(_uint(generation, 32), f"generation {generation!r}: not a 32-bit number")
        _expect(isinstance(aptpl, bool), f"aptpl {aptpl!r}: not true or false")
        _expect(code is None or (not isinstance(code, bool) and code in PR_TYPES), f"type {code!r}: no such type")
        wants_holder = code is not None and PR_TYPES[code].registrants != "all"
        _expect(holder is None or (_uint(holder, 16) and holder < len(nexuses)), f"holder {holder!r}: no such nexus")
        _expect((holder is not None) == wants_holder, "a reservation's holder and its type do not agree")
        self.registrations = {n: r["key"] for n, r in zip(nexuses, registrations)}
        self.generation, self.aptpl = generation, aptpl
        self.type = PR_TYPES[code] if code is not None else None
        self.holder = nexuses[holder] if holder is not None else None
        self._settle()

    def changed(self) -> None:
        """Save the state after a change, or drop the saved copy if APTPL=0, here and now (on the event loop);
        a failed save undoes the change (``settle_saves``) and raises."""
        save = self.save_later()
        if save is not None:
            try:
                save()
            finally:
                self.settle_saves()

    def hold(self, announce: Callable[[], None]) -> None:
        """A unit attention the change being made gives another I_T nexus: given once the change is saved
        (at once when nothing is saved), never for a change that was undone."""
        self._held.append(announce)

    def save_later(self) -> Callable[[], None] | None:
        """``changed`` in two halves: the state is taken now, and the returned call saves it (fsyncs: a
        worker thread's job) or drops the saved copy (APTPL=0), raising if it fails.  None when there is
        nothing to save (no store; APTPL=0 with nothing saved): then the held unit attentions go out now.

        Saves may run in any order on any threads: each one taken is numbered, and one that finds a later
        one saved already does nothing (that later state includes its change), so the file always ends
        with the latest state, and whoever's save returned knows its change is on disk.  Its outcome is
        acted on by ``settle_saves``, on the event loop."""
        store, announce, self._held = self.store, self._held, []
        now = self.dump()
        state = now if self.aptpl else None
        if store is None or (state is None and not self._kept and not self.pending):
            self._base = now  # nothing saved, nothing being saved: nothing to drop, nothing that can fail
            _run(announce)
            return None
        self._taken += 1
        change = _Change(self._taken, self._base, announce)
        self._base, self._kept = now, state is not None
        self.pending.append(change)
        self.engaged = True  # the dispatcher settles the save before the next command (``settle_saves``)
        number, lineage = self._taken, self._lineage

        def save() -> None:
            try:
                store.save_numbered(number, state, lineage)
            except BaseException:
                change.saved = False
                raise
            change.saved = True
        return save

    def settle_saves(self) -> None:
        """On the event loop: act on the saves that have ended, oldest first, up to one still running.  Saved:
        its unit attentions go out.  Not saved: the state before it is back, and every change taken after it
        is undone with it (each was made on top of it; the store refuses their saves, so their commands
        fail too); their unit attentions are dropped."""
        pending = self.pending
        while pending and pending[0].saved is not None:
            change = pending.pop(0)
            if change.saved:
                _run(change.announce)
                continue
            pending.clear()
            self._lineage += 1  # states taken from now on hold none of the undone changes
            self.restore(change.before)
            self._base, self._kept = change.before, change.before["aptpl"]
        self._settle()

    # -- queries -------------------------------------------------------------------
    def is_holder(self, nexus: Nexus) -> bool:
        """SPC-4 §5.13.10: every registrant holds an all-registrants reservation."""
        if self.type is None:
            return False
        if self.type.registrants == "all":
            return nexus in self.registrations
        return nexus == self.holder

    def may_access(self, nexus: Nexus) -> bool:
        """The holder, or a registrant under a registrants-only / all-registrants type."""
        return self.is_holder(nexus) or (self.type is not None and self.type.registrants is not None
                                         and nexus in self.registrations)

    def conflicts(self, cmd, nexus: Nexus, cdb=None) -> bool:
        """Whether ``cmd`` from ``nexus`` ends with RESERVATION CONFLICT (SPC-4 §5.13.1, SPC-2 §5.5.1).
        ``cdb``: its bytes, for a command whose row allows some forms under every reservation
        (``Command.runs_reserved``: START STOP UNIT with START=1 and POWER CONDITION 0, SBC-3 table 13)."""
        if cdb is not None and cmd.exempt and cmd.runs_reserved(cdb):
            return False
        if self.spc2_holder is not None:
            if cmd.opcode in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT):
                return True  # SPC-3 §5.6.3 b): every PR command conflicts with an SPC-2 reservation
            if nexus != self.spc2_holder and not cmd.spc2_allowed:
                return True
        if self.type is None or cmd.pr == PR_ALLOWED or self.may_access(nexus):
            return False
        return cmd.pr == PR_WRITE or self.type.exclusive_access

    def reservation_key(self) -> int:
        """The RESERVATION KEY READ RESERVATION reports: 0 for all-registrants types (SPC-4 §6.15.3)."""
        if self.type is None or self.type.registrants == "all":
            return 0
        return self.registrations.get(self.holder, 0)

    # -- changes -------------------------------------------------------------------
    def _settle(self) -> None:
        if self.type is not None and self.type.registrants == "all" and not self.registrations:
            self.type = None  # the last registrant of an all-registrants reservation left
        if self.type is None:
            self.holder = None
        self.engaged = self.type is not None or self.spc2_holder is not None or bool(self.pending)

    def reserve(self, nexus: Nexus, pr_type: PrType) -> None:
        self.type = pr_type
        self.holder = None if pr_type.registrants == "all" else nexus
        self._settle()

    def release(self) -> PrType | None:
        released, self.type = self.type, None
        self._settle()
        return released

    def unregister(self, nexus: Nexus) -> PrType | None:
        """Remove ``nexus``'s registration; returns the reservation type that went with it (§5.13.11.2.3)."""
        before = self.type
        if before is not None and before.registrants != "all" and self.holder == nexus:
            self.type = None  # the holder of a single-holder reservation left
        self.registrations.pop(nexus, None)
        self._settle()
        return before if before is not None and self.type is None else None

    def spc2_reserve(self, nexus: Nexus | None) -> None:
        self.spc2_holder = nexus
        self._settle()


def _run(announce: list[Callable[[], None]]) -> None:
    for give in announce:
        give()


# -- RESERVE / RELEASE (SPC-2 §7.17-7.22, with the SPC-3 §5.6.3 exceptions) ------------------------
def _no_third_party(cdb) -> None:
    if getattr(cdb, "thirdpty", False) or getattr(cdb, "longid", False):
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4 if cdb.thirdpty else 1)


def _spc2_blocked_by_registrations(res: Reservations, nexus: Nexus) -> bool:
    """SPC-3 §5.6.3 a): with registrations, RESERVE/RELEASE are a GOOD no-op for a nexus the persistent
    reservation lets through (True) and a RESERVATION CONFLICT for everyone else."""
    if not res.registrations:
        return False
    if res.may_access(nexus):
        return True
    raise ReservationConflict()


def spc2_reserve(lu, nexus, cdb, data_out, edtl):
    """RESERVE(6)/(10) (SPC-2 §7.21): the logical unit for this I_T nexus only; the holder may repeat it."""
    _no_third_party(cdb)
    res = lu.reservations
    if _spc2_blocked_by_registrations(res, nexus):
        return None
    if res.spc2_holder not in (None, nexus):
        raise ReservationConflict()
    res.spc2_reserve(nexus)
    return None


def spc2_release(lu, nexus, cdb, data_out, edtl):
    """RELEASE(6)/(10) (SPC-2 §7.17): releases our own reservation; from anyone else it is a GOOD no-op."""
    _no_third_party(cdb)
    res = lu.reservations
    if _spc2_blocked_by_registrations(res, nexus):
        return None
    if res.spc2_holder == nexus:
        res.spc2_reserve(None)
    return None
