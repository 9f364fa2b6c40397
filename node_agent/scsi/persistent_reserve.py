"""PERSISTENT RESERVE IN (SPC-4 §6.15) and PERSISTENT RESERVE OUT (SPC-4 §6.16) service actions.

Each service action is its own row of the command table.  The state they read
and change is the logical unit's ``Reservations`` (``reservations.py``); a
PERSISTENT RESERVE OUT that changed it is saved when APTPL is active
(``_saved``: on a worker thread where the transport can, the command
completing once the state is on disk).  A save that fails undoes the change
(``Reservations.settle_saves``), with none of its unit attentions given, and
ends the command with CHECK CONDITION: ILLEGAL REQUEST, INSUFFICIENT
REGISTRATION RESOURCES when the file system is full (the state the device
server must keep, SPC-4 §5.13.7, has no room), HARDWARE ERROR, INTERNAL TARGET
FAILURE for any other error.  RESERVATION CONFLICT is raised as
``ReservationConflict``.  PREEMPT AND ABORT also ends the preempted I_T
nexuses' commands to the logical unit that are still outstanding (their
Data-Out not all in yet, or I/O still running on a worker) with TASK ABORTED,
through ``lu.abort_tasks``, and answers GOOD only once the unit's I/O already
on workers has ended (``_saved``): no aborted WRITE lands after it.  Those
commands stay aborted if the save then fails (TASK ABORTED tells their
initiator they may not have run, and it sends them again).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from node_agent.iscsi.names import normalize_name
from node_agent.scsi import sense as S
from node_agent.scsi.ptpl import UnsavedChangeIncluded
from node_agent.scsi.reservations import LU_SCOPE, PR_TYPES, PrType, ReservationConflict, Reservations
from node_agent.scsi.result import Nexus, ScsiResult
from node_agent.scsi.sense import CheckCondition, SenseCode, build_sense
from node_agent.wire import Field, Layout

log = logging.getLogger("shoal.scsi")

# SPC-4 §5.13.7: no room for the registration state.  Here: the file system of its ``.pr`` file is full.
INSUFFICIENT_REGISTRATION_RESOURCES = SenseCode(S.ILLEGAL_REQUEST, 0x55, 0x04)

# -- parameter data layouts -------------------------------------------------------
PR_IN_HEADER = Layout("PERSISTENT RESERVE IN parameter data header", 8, (  # SPC-4 tables 171, 172
    Field("prgeneration", 0, 0xFFFFFFFF),
    Field("additional_length", 4, 0xFFFFFFFF),
))
RESERVATION_DESCRIPTOR = Layout("READ RESERVATION reservation descriptor", 16, (  # SPC-4 table 173
    Field("reservation_key", 0, 0xFFFFFFFFFFFFFFFF),
    Field("scope", 13, 0xF0),
    Field("type", 13, 0x0F),
))
REPORT_CAPABILITIES_DATA = Layout("REPORT CAPABILITIES parameter data", 8, (  # SPC-4 table 187
    Field("length", 0, 0xFFFF),
    Field("crh", 2, 0x10),
    Field("sip_c", 2, 0x08),
    Field("atp_c", 2, 0x04),
    Field("ptpl_c", 2, 0x01),
    Field("tmv", 3, 0x80),
    Field("allow_commands", 3, 0x70),
    Field("ptpl_a", 3, 0x01),
    Field("persistent_reservation_type_mask", 4, 0xFFFF),
))
FULL_STATUS_DESCRIPTOR = Layout("READ FULL STATUS descriptor", 24, (  # SPC-4 table 190
    Field("reservation_key", 0, 0xFFFFFFFFFFFFFFFF),
    Field("all_tg_pt", 12, 0x02),
    Field("r_holder", 12, 0x01),
    Field("scope", 13, 0xF0),
    Field("type", 13, 0x0F),
    Field("relative_target_port_identifier", 18, 0xFFFF),
    Field("additional_descriptor_length", 20, 0xFFFFFFFF),
))
ISCSI_TRANSPORT_ID = Layout("iSCSI initiator port TransportID header", 4, (  # SPC-4 table 491
    Field("format_code", 0, 0xC0),
    Field("protocol_identifier", 0, 0x0F),
    Field("additional_length", 2, 0xFFFF),
))
PR_OUT_PARAMETERS = Layout("PERSISTENT RESERVE OUT parameter list", 24, (  # SPC-4 table 207
    Field("reservation_key", 0, 0xFFFFFFFFFFFFFFFF),
    Field("service_action_reservation_key", 8, 0xFFFFFFFFFFFFFFFF),
    Field("spec_i_pt", 20, 0x08),
    Field("all_tg_pt", 20, 0x04),
    Field("aptpl", 20, 0x01),
))
PROTOCOL_ISCSI = 0x5
TRANSPORT_ID_WITH_ISID = 0b01  # "iSCSI name,i,0xISID" (SPC-4 §7.6.4.6)
ALLOW_COMMANDS = 0b001  # TEST UNIT READY runs through Write Exclusive and Exclusive Access (SPC-4 table 188)



# -- PERSISTENT RESERVE IN (SPC-4 §6.15) -----------------------------------------------
def _header(res: Reservations, body: bytes) -> bytes:
    return bytes(PR_IN_HEADER.encode(prgeneration=res.generation & 0xFFFFFFFF, additional_length=len(body))) + body


def read_keys(lu, nexus, cdb, data_out, edtl):
    """READ KEYS (SPC-4 §6.15.2): every registered key, one per registered I_T nexus."""
    res = lu.reservations
    return _header(res, b"".join(key.to_bytes(8, "big") for key in res.registrations.values()))


def read_reservation(lu, nexus, cdb, data_out, edtl):
    """READ RESERVATION (SPC-4 §6.15.3): the persistent reservation, if any."""
    res = lu.reservations
    if res.type is None:
        return _header(res, b"")
    body = RESERVATION_DESCRIPTOR.encode(reservation_key=res.reservation_key(), scope=LU_SCOPE, type=res.type.code)
    return _header(res, bytes(body))


def report_capabilities(lu, nexus, cdb, data_out, edtl):
    """REPORT CAPABILITIES (SPC-4 §6.15.4): CRH, every type, no SPEC_I_PT / ALL_TG_PT; PTPL with a file."""
    res = lu.reservations
    mask = 0
    for pr_type in PR_TYPES.values():
        mask |= pr_type.mask
    return bytes(REPORT_CAPABILITIES_DATA.encode(
        length=REPORT_CAPABILITIES_DATA.size, crh=True, sip_c=False, atp_c=False, ptpl_c=res.store is not None,
        tmv=True, allow_commands=ALLOW_COMMANDS, ptpl_a=res.aptpl, persistent_reservation_type_mask=mask))


def transport_id(initiator_port: str) -> bytes:
    """An iSCSI initiator port TransportID, format 01b (SPC-4 §7.6.4.6): "name,i,0xISID", NUL, padded."""
    name = initiator_port.encode("utf-8") + b"\0"
    name += b"\0" * (-len(name) % 4)
    name = name.ljust(20, b"\0")
    head = ISCSI_TRANSPORT_ID.encode(format_code=TRANSPORT_ID_WITH_ISID, protocol_identifier=PROTOCOL_ISCSI,
                                     additional_length=len(name))
    return bytes(head) + name


def read_full_status(lu, nexus, cdb, data_out, edtl):
    """READ FULL STATUS (SPC-4 §6.15.5): one descriptor per registered I_T nexus."""
    res = lu.reservations
    body = bytearray()
    for registrant, key in res.registrations.items():
        holder = res.is_holder(registrant)
        tid = transport_id(registrant.initiator_port)
        body += FULL_STATUS_DESCRIPTOR.encode(
            reservation_key=key, all_tg_pt=False, r_holder=holder, scope=LU_SCOPE,
            type=res.type.code if holder else 0, relative_target_port_identifier=registrant.relative_target_port,
            additional_descriptor_length=len(tid))
        body += tid
    return _header(res, bytes(body))


# -- PERSISTENT RESERVE OUT (SPC-4 §6.16) ----------------------------------------------
def _parameters(cdb, data_out, *, registering: bool, ptpl_capable: bool = False):
    """The 24-byte basic parameter list (SPC-4 §6.16.3): no SPEC_I_PT, no ALL_TG_PT; APTPL if PTPL_C."""
    length = cdb.parameter_list_length
    data = bytes(data_out[:length]) if data_out is not None else b""
    if length < PR_OUT_PARAMETERS.size or len(data) < length:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    p = PR_OUT_PARAMETERS.decode(data)
    if p.spec_i_pt:  # SIP_C=0
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=20, bit_pointer=3, in_cdb=False)
    if length != PR_OUT_PARAMETERS.size:
        raise CheckCondition(S.PARAMETER_LIST_LENGTH_ERROR)
    if registering and p.all_tg_pt:  # ATP_C=0
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=20, bit_pointer=2, in_cdb=False)
    if registering and p.aptpl and not ptpl_capable:  # PTPL_C=0
        raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=20, bit_pointer=0, in_cdb=False)
    return p


def _scope_and_type(cdb) -> PrType:
    if cdb.scope != LU_SCOPE:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=7)
    pr_type = PR_TYPES.get(cdb.type)
    if pr_type is None:
        raise CheckCondition(S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=3)
    return pr_type


def _registered_with(res: Reservations, nexus: Nexus, key: int) -> None:
    """RESERVATION CONFLICT unless ``nexus`` is registered with ``key`` (SPC-4 §5.13.1)."""
    if res.registrations.get(nexus) != key:
        raise ReservationConflict()


def _announce(lu, code, nexuses, *, except_nexus: Nexus) -> None:
    """Unit attentions for the other I_T nexuses, given once the change is saved (``Reservations.hold``)."""
    res = lu.reservations
    for other in nexuses:
        if other != except_nexus:
            res.hold(lambda other=other: lu.unit_attention(other, code))


def _unregister(lu, res: Reservations, nexus: Nexus) -> None:
    released = res.unregister(nexus)
    if released is not None and released.registrants == "only":  # SPC-4 §5.13.11.2.3
        _announce(lu, S.RESERVATIONS_RELEASED, list(res.registrations), except_nexus=nexus)


def _saved(lu, res: Reservations, *, after_earlier_io: bool = False) -> ScsiResult | None:
    """The answer of a PERSISTENT RESERVE OUT that changed the state: GOOD once the state is saved (APTPL=1;
    the saved copy is dropped with APTPL=0), CHECK CONDITION if that fails (``_answer``; the change is then
    undone, ``Reservations.settle_saves``).  The save fsyncs twice, which can take as long as the disk
    likes: where the transport can (a store with non-blocking I/O) it runs on a worker thread and the
    command completes after it, so the other sessions are served meanwhile (issue 7, "fair under a slow
    disk").  The state itself changed already: commands after this one see it.  ``after_earlier_io``
    (PREEMPT AND ABORT): GOOD also waits until the unit's I/O already running on workers has ended, the
    preempted nexuses' aborted WRITEs among it: none of them lands after the preempting initiator's GOOD."""
    save = res.save_later()
    if lu.write_nowait is not None and (save is not None or after_earlier_io):
        def job() -> ScsiResult:
            if after_earlier_io:
                lu.wait_for_earlier_io()
            return _answer(lu, save)
        return lu.deferred(job)
    if save is None:
        return None
    answer = _answer(lu, save)
    res.settle_saves()  # here, on the event loop: a failed change is undone before the next command
    return answer


def _answer(lu, save: Callable[[], None] | None) -> ScsiResult:
    """Run ``save`` (on any thread): GOOD, or the CHECK CONDITION that says why the state was not saved."""
    if save is None:
        return ScsiResult(S.GOOD)
    try:
        save()
    except UnsavedChangeIncluded as exc:  # an earlier change's save failed; this one was made on top of it
        log.warning("%s", exc)
        code = S.INTERNAL_TARGET_FAILURE
    except OSError as exc:
        log.error("%s: saving the persistent reservations failed, the change is undone: %s",
                  lu.reservations.store.path, exc)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        code = INSUFFICIENT_REGISTRATION_RESOURCES if full else S.INTERNAL_TARGET_FAILURE
    except Exception:  # noqa: BLE001 - a bug: the change is undone all the same
        log.exception("saving the persistent reservations of %s failed, the change is undone", lu.target_name)
        code = S.INTERNAL_TARGET_FAILURE
    else:
        return ScsiResult(S.GOOD)
    return ScsiResult(S.CHECK_CONDITION, sense=build_sense(code, descriptor=lu.mode.d_sense))


def _register(lu, nexus, cdb, data_out, *, ignore_existing: bool):
    """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7, table 57)."""
    res = lu.reservations
    p = _parameters(cdb, data_out, registering=True, ptpl_capable=res.store is not None)
    current = res.registrations.get(nexus)
    if not ignore_existing and p.reservation_key != (current or 0):
        raise ReservationConflict()
    new_key = p.service_action_reservation_key
    if current is None and new_key == 0:
        return None  # nothing to register or unregister: GOOD, generation unchanged
    if current is None or new_key:
        res.registrations[nexus] = new_key
    else:
        _unregister(lu, res, nexus)
    res.generation += 1
    res.aptpl = p.aptpl
    return _saved(lu, res)


def register(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT REGISTER (SPC-4 §6.16.2)."""
    return _register(lu, nexus, cdb, data_out, ignore_existing=False)


def register_and_ignore_existing_key(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY (SPC-4 §6.16.2)."""
    return _register(lu, nexus, cdb, data_out, ignore_existing=True)


def reserve(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT RESERVE (SPC-4 §5.13.9): registered nexuses only; the holder may repeat it."""
    pr_type = _scope_and_type(cdb)
    p = _parameters(cdb, data_out, registering=False)
    res = lu.reservations
    _registered_with(res, nexus, p.reservation_key)
    if res.type is not None:
        if res.is_holder(nexus) and res.type is pr_type:
            return None
        raise ReservationConflict()
    res.reserve(nexus, pr_type)
    return _saved(lu, res)


def release(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT RELEASE (SPC-4 §5.13.11.2.2)."""
    pr_type = _scope_and_type(cdb)
    p = _parameters(cdb, data_out, registering=False)
    res = lu.reservations
    _registered_with(res, nexus, p.reservation_key)
    if res.type is None or not res.is_holder(nexus):
        return None  # nothing of ours to release: GOOD, no change
    if res.type is not pr_type:
        raise CheckCondition(S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    res.release()
    if pr_type.registrants is not None:
        _announce(lu, S.RESERVATIONS_RELEASED, list(res.registrations), except_nexus=nexus)
    return _saved(lu, res)


def clear(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT CLEAR (SPC-4 §5.13.11.2.6): every registration and the reservation go."""
    p = _parameters(cdb, data_out, registering=False)
    res = lu.reservations
    _registered_with(res, nexus, p.reservation_key)
    registered = list(res.registrations)
    res.registrations.clear()
    res.release()
    res.generation += 1
    _announce(lu, S.RESERVATIONS_PREEMPTED, registered, except_nexus=nexus)
    return _saved(lu, res)


def preempt(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT PREEMPT (SPC-4 §5.13.11.4)."""
    _preempt(lu, nexus, cdb, data_out)
    return _saved(lu, lu.reservations)


def _preempt(lu, nexus, cdb, data_out) -> tuple[list[Nexus], ScsiResult | None]:
    """PREEMPT's work: the I_T nexuses whose registrations it removed (the caller saves the state).  SCOPE
    and TYPE count only where a reservation is taken (§5.13.11.4.3 b: ignored when the key names no holder)."""
    p = _parameters(cdb, data_out, registering=False)
    res = lu.reservations
    _registered_with(res, nexus, p.reservation_key)
    victim = p.service_action_reservation_key
    if res.type is not None and res.type.registrants == "all" and victim == 0:
        removed = [n for n in res.registrations if n != nexus]  # §5.13.11.4.5: preempt every other registrant
        _preempt_reservation(lu, res, nexus, _scope_and_type(cdb), removed)
    elif res.type is not None and res.type.registrants != "all" and res.registrations.get(res.holder) == victim:
        removed = [n for n, key in res.registrations.items() if key == victim and n != nexus]  # §5.13.11.4.4
        _preempt_reservation(lu, res, nexus, _scope_and_type(cdb), removed)
    else:
        if victim == 0:
            raise CheckCondition(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=8, in_cdb=False)
        removed = [n for n, key in res.registrations.items() if key == victim]  # §5.13.11.4.3
        if not removed:
            raise ReservationConflict()
        for gone in removed:
            res.unregister(gone)
        _announce(lu, S.REGISTRATIONS_PREEMPTED, removed, except_nexus=nexus)
    res.generation += 1
    return removed, None


def _preempt_reservation(lu, res: Reservations, nexus: Nexus, pr_type: PrType, removed: list[Nexus]) -> None:
    old = res.type
    for gone in removed:
        res.registrations.pop(gone, None)
    res.reserve(nexus, pr_type)
    _announce(lu, S.REGISTRATIONS_PREEMPTED, removed, except_nexus=nexus)
    if old is not pr_type:
        _announce(lu, S.RESERVATIONS_RELEASED, list(res.registrations), except_nexus=nexus)


def preempt_and_abort(lu, nexus, cdb, data_out, edtl):
    """PERSISTENT RESERVE OUT PREEMPT AND ABORT (SPC-4 §5.13.11.5): PREEMPT, then abort the preempted
    I_T nexuses' outstanding commands to this logical unit (TASK ABORTED: TAS=1, SAM-5 §5.6)."""
    removed, _ = _preempt(lu, nexus, cdb, data_out)
    if removed:
        lu.abort_tasks(removed)
    return _saved(lu, lu.reservations, after_earlier_io=bool(removed))




def remove_initiator(lu, initiator_name: str, *, save: bool = True) -> list[Nexus]:
    """Fence ``initiator_name`` at this logical unit: the device server itself does what PREEMPT AND ABORT of
    its registration key would do (SPC-4 §5.13.11.4.3/§5.13.11.5), for every I_T nexus of that initiator
    name (any ISID, any target port), whatever key it registered with.

    Its registrations go; a reservation it held alone is released (an all-registrants one lasts while
    another registrant is left), and then the remaining registrants of a registrants-only or all-registrants
    type get RESERVATIONS RELEASED (as §5.13.11.2.3 when its holder unregisters); removed I_T nexuses still
    logged in get REGISTRATIONS PREEMPTED, and their commands are aborted; the generation moves on and
    APTPL state is saved (``save=False``: the caller saves it, ``lu.reservations.save_later()``, off the event
    loop).  Returns the removed nexuses (none: nothing changed).  The unit attentions go out once the state
    is saved; a save that fails undoes the removal (``Reservations.settle_saves``), so that a retry of the
    fence finds the registrations again and removes them again.
    """
    res = lu.reservations
    res.settle_saves()  # a change whose save failed is undone first: not kept by being built on
    # The name as iSCSI names compare (RFC 7143 §4.2.7.2): a registration made under it in another case is its.
    key = normalize_name(initiator_name)
    removed = [n for n in res.registrations if normalize_name(n.initiator_port.rpartition(",i,")[0]) == key]
    if not removed:
        return []
    before = res.type
    for gone in removed:
        res.unregister(gone)
    if before is not None and res.type is None and before.registrants is not None:
        for other in res.registrations:
            res.hold(lambda other=other: lu.unit_attention(other, S.RESERVATIONS_RELEASED))
    for gone in removed:
        res.hold(lambda gone=gone: lu.unit_attention(gone, S.REGISTRATIONS_PREEMPTED))
    res.generation += 1
    if save:
        res.changed()
    lu.abort_tasks(removed)
    return removed
