"""The target's configuration tree and its live sessions (RFC 7143 §4.4, §6.3.5).

``TargetNode`` is one iSCSI target: a name, its LUN map, CHAP credentials and
an initiator ACL.  ``TargetRegistry`` holds the targets a portal group serves
and the sessions logged in to them, and is the one place where a session is
created, reinstated (same initiator name and ISID, ErrorRecoveryLevel 0) or
closed.  It has no I/O; connections reach their transport through the
``close()`` method of the connection object they registered.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from node_agent.iscsi.buffers import BufferPool
from node_agent.iscsi.chap import initiator_secret
from node_agent.iscsi.names import normalize_name
from node_agent.scsi.device import LunMap, Nexus

if TYPE_CHECKING:
    from node_agent.iscsi.keys import SessionParams

log = logging.getLogger("shoal.iscsi.target")


@dataclass(frozen=True)
class Credentials:
    """A CHAP user name and secret; the secret never appears in repr or logs."""

    user: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.user or not self.secret:
            raise ValueError("CHAP credentials need a user name and a secret")

    @classmethod
    def parse(cls, text: str) -> "Credentials":
        """``USER:SECRET``, or ``@FILE`` holding that line (keeps the secret out of the process list).

        Either way is accepted with a warning where the secret is open to other local users: inline, any of
        them reads it in /proc/PID/cmdline; a file with permissions for its group or others (not 0600)
        lets them read or replace it.  The warnings never show the secret."""
        inline = not text.startswith("@")
        if not inline:
            with open(text[1:], encoding="utf-8") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                if mode & 0o077:
                    log.warning("the CHAP secret file %s is open to other users (mode %04o): chmod 600 it",
                                text[1:], stat.S_IMODE(mode))
                text = handle.readline().strip()
        user, sep, secret = text.partition(":")
        if not sep:
            raise ValueError("CHAP credentials are USER:SECRET")
        credentials = cls(user, secret)
        if inline:
            log.warning("the CHAP secret of user %r was given on the command line, where every local user can read "
                        "it (the process list): give it as @FILE, a file of mode 0600 holding USER:SECRET", user)
        return credentials


@dataclass
class TargetNode:
    """One target: what it serves and who may log in."""

    iqn: str
    luns: LunMap
    alias: str = ""
    chap: Credentials | None = None  # initiators must authenticate with this (one-way CHAP)
    mutual_chap: Credentials | None = None  # the target proves itself with this (mutual CHAP)
    allowed_initiators: frozenset[str] | None = None  # None admits every initiator name
    per_initiator_chap: bool = False
    """Each initiator proves its own secret, derived from ``chap``'s and its name (``chap.initiator_secret``),
    so that knowing one's own secret does not let it log in under another admitted name."""
    portal_group_tag: int = 1
    elsewhere: bool = False
    """Served by another process of a ``shoal target --workers N`` (which routes its logins there): this
    process knows the target only to answer discovery, and refuses logins to it."""

    # ``allowed_initiators`` in the form names are compared in (``normalize_name``), made again when it changes.
    _acl: tuple[frozenset[str] | None, frozenset[str]] = field(default=(None, frozenset()), init=False, repr=False,
                                                              compare=False)

    def admits(self, initiator_name: str) -> bool:
        """Whether the ACL lists ``initiator_name``, compared as iSCSI names are (RFC 7143 §4.2.7.2,
        ``normalize_name``): an entry in another case admits that initiator, and no other."""
        allowed = self.allowed_initiators
        if allowed is None or initiator_name in allowed:
            return True
        if self._acl[0] is not allowed:
            self._acl = (allowed, frozenset(normalize_name(name) for name in allowed))
        return normalize_name(initiator_name) in self._acl[1]

    @cached_property
    def name_key(self) -> str:
        """``iqn`` as names are compared (``normalize_name``)."""
        return normalize_name(self.iqn)

    def chap_for(self, initiator_name: str) -> Credentials | None:
        """The CHAP credentials ``initiator_name`` must prove (None: no CHAP)."""
        if self.chap is None or not self.per_initiator_chap:
            return self.chap
        return Credentials(self.chap.user, initiator_secret(self.chap.secret, initiator_name))

    def shown_to(self, session: "Session") -> bool:
        """Whether SendTargets may name this target to ``session``: its ACL admits the session's initiator
        name, and the session proved this target's CHAP credentials (or the target has none).  A name is
        only claimed; the secret proved is what says who is asking."""
        if not self.admits(session.initiator_name):
            return False
        chap = self.chap_for(session.initiator_name)
        return chap is None or chap == session.chap


class ConnectionHandle(Protocol):
    cid: int

    def close(self, reason: str) -> None: ...


class Session:
    """A logged-in session: its sequence numbers, connections and I_T nexus."""

    def __init__(self, tsih: int, initiator_name: str, isid: int, target: TargetNode | None,
                 params: "SessionParams", initial_cmdsn: int, command_window: int):
        self.tsih = tsih
        self.initiator_name = initiator_name
        self.isid = isid
        self.target = target
        self.params = params
        self.discovery = target is None
        self.expcmdsn = initial_cmdsn
        self.command_window = command_window
        self.connections: dict[int, ConnectionHandle] = {}
        self.pending: dict[int, Any] = {}  # CmdSN -> deferred command (arrived ahead of a gap)
        # Commands whose I/O runs on a worker (a slow disk), and writes waiting for their Data-Out: each
        # keeps a slot of the CmdSN window until it completes, so an initiator cannot queue unbounded
        # blocked work or write buffers (RFC 7143 §3.2.2.1: MaxCmdSN opens as commands end, as LIO and tgt
        # do it).  In-order arrivals and completions keep MaxCmdSN from ever going backwards.
        self.running = 0
        # Bytes of write buffers held by this session's writes waiting for their Data-Out (bounded by the
        # connection settings' ``max_session_write_buffers``).
        self.write_buffers = 0
        self.closed = False
        # The connections of the sessions this one reinstated (closed by ``open_session``): the login waits for
        # their commands still running on a worker before it answers (``TargetConnection._login``).
        self.replaced: list[ConnectionHandle] = []
        self.nexus: Nexus | None = None
        self.chap: Credentials | None = None  # the CHAP credentials its login proved (None: no CHAP)
        if target is not None:
            self.nexus = Nexus(
                initiator_port=f"{initiator_name},i,0x{isid:012x}",
                target_port=f"{target.iqn},t,0x{target.portal_group_tag:04x}",
            )

    @property
    def maxcmdsn(self) -> int:
        return (self.expcmdsn + self.command_window - 1 - self.running) & 0xFFFFFFFF  # sn_add: once per response

    def __repr__(self) -> str:
        kind = "discovery" if self.discovery else self.target.iqn  # type: ignore[union-attr]
        return f"<Session tsih={self.tsih} {self.initiator_name} isid=0x{self.isid:012x} {kind}>"


def same_name(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one iSCSI name (RFC 7143 §4.2.7.2: compared after RFC 3722's stringprep)."""
    return a == b or normalize_name(a) == normalize_name(b)


def _reported(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """The address ``host`` as an initiator knows it: an IPv4-mapped IPv6 address as its IPv4 address (a name,
    which no bound socket reports, as it is)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return getattr(address, "ipv4_mapped", None) or address


class TargetRegistry:
    """Targets served by one portal group, and the sessions logged in to them."""

    def __init__(self, targets: list[TargetNode] | None = None, command_window: int = 128):
        self.targets: dict[str, TargetNode] = {}
        self.sessions: dict[int, Session] = {}
        self.command_window = command_window
        self.buffers = BufferPool()  # write buffers shared by every connection of this portal group
        # Bytes of write buffers all sessions' writes waiting for their Data-Out hold together (bounded by the
        # connection settings' ``max_portal_write_buffers``; each session's share by ``Session.write_buffers``).
        self.write_buffers = 0
        # Held around every call into a connection core, the registry or a logical unit when the
        # portal runs several event loops (threads): the target's shared state changes one at a time.
        self.lock = threading.RLock()
        self._tsih = itertools.count(1)
        # The addresses the portals of this group listen on, as bound (``PortalServer`` adds and removes them):
        # SendTargets reports every one of them (``portal_addresses``).
        self.portals: list[tuple[str, int]] = []
        for target in targets or []:
            self.add_target(target)

    def portal_addresses(self, local: tuple[str, int]) -> list[tuple[str, int]]:
        """The portals SendTargets reports to an initiator connected to ``local`` (RFC 7143 Appendix C: every
        portal of the group through which the target is reached; §13.8 TargetAddress).

        A wildcard portal (0.0.0.0, ::) has no address to report: the one the initiator reached stands for
        it.  An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) is reported as the IPv4
        address the initiator knows.  Without registered portals (a worker process, handed its sockets):
        ``local`` alone."""
        here = _reported(local[0])
        out: list[tuple[str, int]] = []
        for host, port in self.portals or [local]:
            address = _reported(host)
            if not isinstance(address, str) and address.is_unspecified:
                if address.version == 4 and getattr(here, "version", 4) == 6:
                    continue  # an IPv4 wildcard does not listen on the IPv6 address this initiator used
                address = here
            if (str(address), port) not in out:
                out.append((str(address), port))
        return out

    def find_target(self, name: str) -> TargetNode | None:
        """The target ``name`` names, compared as iSCSI names are (RFC 7143 §4.2.7.2, ``normalize_name``): a
        TargetName or SendTargets value in another case than configured finds it.  The login and SendTargets
        use this; the management API (``targets``) goes by the configured spelling."""
        target = self.targets.get(name)
        if target is None:
            key = normalize_name(name)
            target = next((t for t in self.targets.values() if t.name_key == key), None)
        return target

    def add_target(self, target: TargetNode) -> TargetNode:
        existing = self.targets.get(target.iqn)
        if existing is not None:
            return existing
        if self.find_target(target.iqn) is not None:  # logins find targets case-blind: which one would it be?
            raise ValueError(f"target {target.iqn}: another target's name differs from it only by case")
        self.targets[target.iqn] = target
        target.luns.on_abort = lambda lun, nexuses: self.abort_tasks(target, lun, nexuses)
        return target

    def abort_tasks(self, target: TargetNode, lun: int, nexuses: list) -> int:
        """PREEMPT AND ABORT (SPC-4 §5.13.11.5): end the outstanding commands to ``lun`` of ``target``
        from the sessions of ``nexuses``; how many were aborted."""
        aborted = 0
        for session in list(self.sessions.values()):
            if session.target is target and session.nexus in nexuses:
                for conn in list(session.connections.values()):
                    abort = getattr(conn, "abort_tasks", None)
                    if abort is not None:
                        aborted += abort(lun)
        return aborted

    def remove_target(self, iqn: str) -> TargetNode | None:
        """Stop serving ``iqn``: every session logged in to it is closed first.  Unknown names: None."""
        target = self.targets.pop(iqn, None)
        if target is not None:
            for session in list(self.sessions.values()):
                if session.target is target:
                    self.close_session(session, "target removed")
        return target

    def close_initiator_sessions(self, iqn: str, initiator_name: str, reason: str) -> list[ConnectionHandle]:
        """Close the sessions of ``initiator_name`` to target ``iqn`` (its ACL entry went); their connections,
        whose commands still running on a worker the caller may wait for."""
        closed: list[ConnectionHandle] = []
        for session in list(self.sessions.values()):
            if (session.target is not None and session.target.iqn == iqn
                    and same_name(session.initiator_name, initiator_name)):
                closed.extend(session.connections.values())
                self.close_session(session, reason)
        return closed

    def fence_initiator(self, initiator_name: str, reason: str = "initiator fenced") -> list[ConnectionHandle]:
        """Cut ``initiator_name`` off every target: it leaves each ACL (a target left with an empty ACL admits
        nobody: ``admits`` is False for every name) and every session it has, on any target, is closed.

        Names are compared as iSCSI names are (``normalize_name``): an ACL entry or a session of the same name in
        another case goes too, or ``admits``, which compares that way, would let the fenced initiator back in.

        Returns the connections closed, so the caller can wait for their commands still running on a
        worker (a fence answers only once none is left).  Idempotent."""
        key = normalize_name(initiator_name)
        for target in self.targets.values():
            if target.allowed_initiators is not None and target.admits(initiator_name):
                target.allowed_initiators = frozenset(name for name in target.allowed_initiators
                                                      if normalize_name(name) != key)
        closed: list[ConnectionHandle] = []
        for session in list(self.sessions.values()):
            if normalize_name(session.initiator_name) == key and not session.discovery:
                closed.extend(session.connections.values())
                self.close_session(session, reason)
        return closed

    def visible_targets(self, session: Session) -> list[TargetNode]:
        """Targets SendTargets may reveal to ``session`` (``TargetNode.shown_to``)."""
        return [t for t in self.targets.values() if t.shown_to(session)]

    def find_session(self, initiator_name: str, isid: int, tsih: int | None = None) -> Session | None:
        for session in self.sessions.values():
            if session.isid == isid and not session.closed and same_name(session.initiator_name, initiator_name):
                if tsih is None or session.tsih == tsih:
                    return session
        return None

    def _next_tsih(self) -> int:
        while True:
            tsih = next(self._tsih) & 0xFFFF
            if tsih and tsih not in self.sessions:
                return tsih

    def open_session(self, initiator_name: str, isid: int, target: TargetNode | None,
                     params: "SessionParams", initial_cmdsn: int, conn: ConnectionHandle) -> Session:
        """Create a session; an existing one with the same I_T nexus (initiator name, ISID and target: the
        same name and ISID to another target, or in discovery, is another session) is reinstated: closed
        first, whatever else shares the name and ISID.  The name compares as iSCSI names do (``same_name``)."""
        replaced: list[ConnectionHandle] = []
        for old in [s for s in self.sessions.values()
                    if s.isid == isid and s.target is target and not s.closed
                    and same_name(s.initiator_name, initiator_name)]:
            log.info("session reinstatement: %s replaces tsih %d", initiator_name, old.tsih)
            replaced += self.close_session(old, "session reinstatement")
        session = Session(self._next_tsih(), initiator_name, isid, target, params, initial_cmdsn,
                          self.command_window)
        session.replaced = replaced
        session.connections[conn.cid] = conn
        self.sessions[session.tsih] = session
        if target is not None and session.nexus is not None:
            target.luns.add_nexus(session.nexus)
        return session

    def detach_connection(self, session: Session, conn: ConnectionHandle) -> None:
        """A connection ended; with ErrorRecoveryLevel 0 its session ends with its last connection."""
        if session.connections.get(conn.cid) is conn:
            del session.connections[conn.cid]
        if not session.connections:
            self.close_session(session, "last connection closed")

    def close_session(self, session: Session, reason: str) -> list[ConnectionHandle]:
        """End the session and close its connections; those connections (none if it had ended already)."""
        if session.closed:
            return []
        session.closed = True
        self.sessions.pop(session.tsih, None)
        closed = list(session.connections.values())
        for conn in closed:
            conn.close(reason)
        session.connections.clear()
        session.pending.clear()
        if session.target is not None and session.nexus is not None:
            session.target.luns.remove_nexus(session.nexus)
        return closed

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session, reason)
