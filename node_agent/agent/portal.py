"""The agent's iSCSI portal on an event loop of its own thread, with a blocking façade.

gRPC calls run on worker threads; the portal's registry and logical units
belong to its event loop.  ``PortalThread.call`` runs a change (add or remove
a target, change an ACL, resize a LUN) on that loop and waits for it, so the
registry is only ever touched by the loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from node_agent import eventloop
from node_agent.agent.errors import FailedPrecondition
from node_agent.iscsi.names import normalize_name
from node_agent.iscsi.target import Credentials, TargetNode, same_name
from node_agent.scsi import persistent_reserve
from node_agent.target_service import LunSpec, PortalConfig, TargetService

log = logging.getLogger("shoal.agent.portal")


@dataclass(frozen=True)
class FenceResult:
    """What cutting an initiator off did (agent.proto FenceInitiatorResponse)."""

    targets: tuple[str, ...] = ()
    """Targets whose ACL admitted it."""
    sessions_closed: int = 0
    registrations_removed: int = 0
    commands_waited: int = 0
    """Commands of its closed connections still running on a worker when they closed."""


def _in_flight(connection: Any) -> int:
    in_flight = getattr(connection, "in_flight", None)  # the registry's handles are TargetConnections
    return in_flight() if in_flight is not None else 0


def _new_loop() -> asyncio.AbstractEventLoop:
    return eventloop.new_event_loop()


class PortalThread:
    """A ``TargetService`` without initial targets, served from a background thread."""

    def __init__(self, config: PortalConfig):
        self.service = TargetService(portal=config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None
        # Connections a fence or an ACL change closed whose commands still ran when a wait for them timed out,
        # by initiator name: a repeat of that fence or unexport waits for them (their sessions are gone from the
        # registry, so it would find nothing to wait for and answer at once, the writes still to land).  Keyed by
        # the name as names compare (``normalize_name``): a repeat that spells it in another case is the same one.
        self._draining: dict[str, list] = {}
        self._draining_lock = threading.Lock()

    def start(self) -> tuple[str, int]:
        loop = _new_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="iscsi-portal", daemon=True)
        self._thread.start()
        try:
            self.address = self._await(self.service.start())
        except BaseException:
            self._halt()
            raise
        return self.address

    def stop(self) -> None:
        """Close every session, flush and close every LUN, end the thread."""
        if self._loop is None:
            return
        try:
            self._await(self.service.stop(), timeout=30)
        finally:
            self._halt()

    # -- the changes, run on the loop -------------------------------------------------
    def add_target(self, iqn: str, spec: LunSpec, *, chap: Credentials | None,
                   mutual_chap: Credentials | None, allowed_initiators: list[str]) -> TargetNode:
        # Each initiator of an export proves its own secret, derived from the volume's (the controller hands
        # each node only its own): one node cannot log in under another's name.
        return self.call(self.service.add_target, iqn, [spec], chap=chap, mutual_chap=mutual_chap,
                         allowed_initiators=allowed_initiators, per_initiator_chap=True)

    def remove_target(self, iqn: str) -> bool:
        """Stop serving ``iqn``; its LUNs are flushed and closed when this returns (False: not served).

        Only the registry change and the final close run on the loop: waiting for the target's I/O on
        worker threads and the flush (fdatasync: seconds for a volume written much of late) run on the
        calling thread, so the portal's other sessions are served meanwhile (issue 7, "fair under a slow
        disk").  The close comes back to the loop, after the closed connections sent what they had
        queued, which may name a LUN's file descriptor (``FileRange``)."""
        units = self.call(self.service.detach_target, iqn)
        if units is None:
            return False
        try:
            for unit in units:
                unit.retire()
        finally:
            self.call(self.service.close_units, units)
        return True

    def set_allowed_initiators(self, iqn: str, names: list[str], *, timeout: float = 60.0) -> None:
        """Replace the ACL of ``iqn``, closing the sessions of initiators it no longer names, and wait until
        none of their commands still runs on a worker (``TimeoutError`` after ``timeout``; ``drain`` goes on
        waiting): once this returns, no write of theirs lands."""
        closed = self.call(self.service.set_allowed_initiators, iqn, names)
        for name, connections in closed.items():
            self._drain(name, connections, timeout)

    def drain(self, initiator_name: str, *, timeout: float = 60.0) -> int:
        """Wait for the commands of ``initiator_name`` that an earlier fence or ACL change left running when its
        wait timed out (``TimeoutError`` again after ``timeout``); how many there were."""
        return self._drain(initiator_name, [], timeout)

    def _drain(self, initiator_name: str, connections: list, timeout: float) -> int:
        """Wait for ``connections`` and those an earlier wait for ``initiator_name`` left.  They stay listed
        until drained, so that callers waiting at the same time (a fence and an unexport) all wait for them."""
        key = normalize_name(initiator_name)
        with self._draining_lock:
            pending = self._draining.setdefault(key, [])
            pending.extend(c for c in connections if all(c is not p for p in pending))
            watched = list(pending)
        deadline = time.monotonic() + timeout
        waited = running = self.call(lambda: sum(_in_flight(c) for c in watched)) if watched else 0
        while running:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{running} command(s) of {initiator_name} still running after {timeout:g} s")
            time.sleep(0.01)
            running = self.call(lambda: sum(_in_flight(c) for c in watched))
        with self._draining_lock:
            left = [c for c in self._draining.get(key, []) if all(c is not w for w in watched)]
            if left:
                self._draining[key] = left
            else:
                self._draining.pop(key, None)
        return waited

    def resize_lun(self, iqn: str, lun: int, size: int) -> int:
        return self.call(self.service.resize_lun, iqn, lun, size)

    def fence_initiator(self, initiator_name: str, *, timeout: float = 60.0) -> FenceResult:
        """Cut ``initiator_name`` off every target (ACL, sessions, persistent-reservation registrations), then
        wait, off the loop, until none of its commands still runs on a worker: TimeoutError after ``timeout``
        (a repeat goes on waiting; the initiator is cut off already).  The reservation state that changed is
        saved (APTPL) before that wait, on this thread: its fsyncs hold up no session."""
        result = self.cut_initiator(initiator_name)
        waited = self.drain(initiator_name, timeout=timeout)  # with what an earlier attempt left running
        return replace(result, commands_waited=waited)

    def cut_initiator(self, initiator_name: str) -> FenceResult:
        """The first half of ``fence_initiator``: ACLs, sessions and registrations, without the wait; its closed
        connections are left for ``drain``, which a caller may run without holding its own locks."""
        result, connections, saves = self.call(self._fence_on_loop, initiator_name)
        for save in saves:  # the reservation state (APTPL), saved here: fsyncs, off the loop
            save()
        with self._draining_lock:
            pending = self._draining.setdefault(normalize_name(initiator_name), [])
            pending.extend(c for c in connections if all(c is not p for p in pending))
        return result

    def _fence_on_loop(self, initiator_name: str) -> tuple[FenceResult, list, list]:
        registry = self.service.registry
        if registry is None:
            return FenceResult(), [], []
        # Every spelling of the name counts, as iSCSI names compare (RFC 7143 §4.2.7.2, ``same_name``): the registry's
        # fence cuts ACL entries and sessions of the name in any case, so must the counts and the registrations
        # here, or an initiator that logged in (and registered) as ``...:HOST-X`` keeps its reservation key after a
        # fence of ``...:host-x``.  Registrations keep the name as the login (or a TransportID) spelled it, and
        # ``remove_initiator`` and ``stop_sanitize`` match it exactly: each spelling found is handed to them.
        with registry.lock:
            admitted = tuple(iqn for iqn, t in registry.targets.items() if t.allowed_initiators is not None
                             and any(same_name(name, initiator_name) for name in t.allowed_initiators))
            spellings = {initiator_name}
            sessions = 0
            for session in registry.sessions.values():
                if same_name(session.initiator_name, initiator_name) and not session.discovery:
                    sessions += 1
                    spellings.add(session.initiator_name)
            connections = registry.fence_initiator(initiator_name)
            removed, saves = 0, []
            for target in registry.targets.values():
                for unit in target.luns.luns.values():
                    unit.reservations.settle_saves()  # as ``remove_initiator`` does: an undone change is back
                    names = spellings | {nexus.initiator_port.rpartition(",i,")[0]
                                         for nexus in unit.reservations.registrations}
                    names = sorted(name for name in names if same_name(name, initiator_name))
                    for name in names:
                        unit.stop_sanitize(name)  # its pass writes on; the fence waits for none of it
                    gone = [nexus for name in names
                            for nexus in persistent_reserve.remove_initiator(unit, name, save=False)]
                    save = unit.reservations.save_later() if gone else None
                    if save is not None:
                        saves.append(save)
                    removed += len(gone)
        log.warning("fenced initiator %s: %d target(s), %d session(s) closed, %d registration(s) removed",
                    initiator_name, len(admitted), sessions, removed)
        return FenceResult(admitted, sessions, removed), connections, saves

    def call_quiesced(self, iqn: str, fn: Callable[[], Any]) -> Any:
        """``call(fn)`` while no command runs on the LUNs of target ``iqn``: the loop runs no command while
        it runs ``fn``, and the LUNs' I/O handed to worker threads first finishes, and what a worker
        picks up meanwhile waits until ``fn`` returned (``LogicalUnit.io_paused``).  ``FailedPrecondition``
        while a LUN runs a SANITIZE: its pass over the whole medium is I/O on a worker that the pause would
        wait for, holding the loop (every session of the portal) for minutes, to catch a half-erased medium."""
        def run() -> Any:
            registry = self.service.registry
            target = registry.targets.get(iqn) if registry is not None else None
            units = list(target.luns.luns.values()) if target is not None else []
            if any(unit.sanitizing for unit in units):
                raise FailedPrecondition(f"{iqn} is running a SANITIZE: wait until it has ended")
            with contextlib.ExitStack() as paused:
                for unit in units:
                    paused.enter_context(unit.io_paused())
                return fn()
        return self.call(run)

    def served(self) -> set[str]:
        return self.call(lambda: set(self.service.registry.targets) if self.service.registry else set())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the portal's loop and return (or raise) its result."""
        return self.call_within(60, fn, *args, **kwargs)

    def call_within(self, timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call`` that waits at most ``timeout`` seconds (``TimeoutError`` after; ``fn`` may still run)."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the iSCSI portal is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout=timeout)

    def _await(self, coro, timeout: float = 60) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _halt(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        if not loop.is_running():
            loop.close()
