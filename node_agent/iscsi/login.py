"""The target side of the login phase (RFC 7143 §6): stages, security, operational keys.

``TargetLogin`` consumes Login Request PDUs of one connection and produces
Login Response PDUs.  It checks the first request (version, InitiatorName,
SessionType, TargetName, the ACL), runs AuthMethod/CHAP in the security stage
(CSG 0), hands operational keys to ``TargetNegotiator`` (CSG 1), and decides
when the target agrees to transit to full feature phase.  A failure becomes a
Login Response with a status class and detail (§11.13.5) after which the
connection is closed.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from node_agent.iscsi.chap import ChapTargetAuth
from node_agent.iscsi.keys import NegotiationError, TargetNegotiator, TargetSettings, encode_text, parse_text
from node_agent.iscsi.target import Session, TargetNode, TargetRegistry, same_name

log = logging.getLogger("shoal.iscsi.login")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
#: The most text one Login Response carries: during the login the target may assume no more than the
#: default of the initiator's MaxRecvDataSegmentLength (RFC 7143 §13.12).
LOGIN_RESPONSE_MAX = 8192


class LoginStatus(tuple, enum.Enum):
    """Status-Class/Status-Detail pairs of RFC 7143 §11.13.5."""

    SUCCESS = (0x00, 0x00)
    INITIATOR_ERROR = (0x02, 0x00)
    AUTHENTICATION_FAILURE = (0x02, 0x01)
    AUTHORIZATION_FAILURE = (0x02, 0x02)
    NOT_FOUND = (0x02, 0x03)
    TARGET_REMOVED = (0x02, 0x04)
    UNSUPPORTED_VERSION = (0x02, 0x05)
    TOO_MANY_CONNECTIONS = (0x02, 0x06)
    MISSING_PARAMETER = (0x02, 0x07)
    CANT_INCLUDE_IN_SESSION = (0x02, 0x08)
    SESSION_TYPE_NOT_SUPPORTED = (0x02, 0x09)
    SESSION_DOES_NOT_EXIST = (0x02, 0x0A)
    INVALID_DURING_LOGIN = (0x02, 0x0B)
    TARGET_ERROR = (0x03, 0x00)
    SERVICE_UNAVAILABLE = (0x03, 0x01)
    OUT_OF_RESOURCES = (0x03, 0x02)


class LoginFailed(Exception):
    def __init__(self, status: LoginStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoginReply:
    """What the connection sends back for one Login Request."""

    transit: bool
    csg: int
    nsg: int
    text: bytes
    tsih: int
    status: LoginStatus = LoginStatus.SUCCESS
    session: Session | None = None  # set once full feature phase is reached
    replaced: list = field(default_factory=list)  # connections the login reinstated (closed): see ``_login``


class TargetLogin:
    """Login state of one connection (target side)."""

    def __init__(self, registry: TargetRegistry, settings: TargetSettings, connection: Any):
        self.registry = registry
        self.settings = settings
        self.connection = connection
        self.initiator_name = ""
        self.session_type = "Normal"
        self.target: TargetNode | None = None
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.initial_cmdsn = 0
        self.stage = SECURITY
        self.first = True
        self.auth: ChapTargetAuth | None = None
        self._chap_choices: list = []  # the credentials ``auth`` accepts, in its order (``proved_index``)
        self.auth_done = False
        self.negotiator: TargetNegotiator | None = None
        self.existing: Session | None = None
        self._replaced: list = []  # connections this login reinstated (closed): set by ``_establish``
        self._partial = bytearray()

    # -- entry point -------------------------------------------------------------------
    def handle(self, header: Any, data: bytes) -> LoginReply | None:
        """One Login Request; None means: a continued (C bit) request, answer with an empty response."""
        try:
            return self._handle(header, data)
        except NegotiationError as exc:
            status = _status_of(exc)
            log.info("login from %r refused: %s", self.initiator_name or "?", exc)
            return self._failure(header, status)
        except LoginFailed as exc:
            log.info("login from %r refused: %s", self.initiator_name or "?", exc)
            return self._failure(header, exc.status)

    def _failure(self, header: Any, status: LoginStatus) -> LoginReply:
        return LoginReply(False, header.csg, header.nsg, b"", header.tsih, status)

    def _handle(self, header: Any, data: bytes) -> LoginReply | None:
        if self.first:
            self._check_first(header)
        elif header.isid != self.isid or header.tsih != self.tsih or header.cid != self.cid:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID changed during login")
        if header.csg != self.stage and not (self.first and header.csg == OPERATIONAL):
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"login request in stage {header.csg}, expected {self.stage}")
        # RFC 7143 §6.3: a transit goes forward only (0 -> 1, 0 -> 3, 1 -> 3), never to stage 2 or back.
        if header.csg == 2 or header.csg == FULL_FEATURE or (header.transit and (header.nsg == 2
                                                                                  or header.nsg <= header.csg)):
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "invalid login stage transition")
        if header.transit and header.cont:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "T and C bits both set")
        self._partial += data
        if header.cont:
            if len(self._partial) > 65536:
                raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, "login text too long")
            return None
        pairs = parse_text(bytes(self._partial))
        self._partial.clear()
        names = [key for key, _ in pairs]
        if len(names) != len(set(names)):  # "last one wins" would let two readers of the PDU disagree
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "a key appears twice in one request (RFC 7143 §6.2)")
        first_response = self.first
        if self.first:
            self._identify(pairs)
            self.first = False
        else:
            said = {"InitiatorName": self.initiator_name, "SessionType": self.session_type,
                    "TargetName": self.target.iqn if self.target is not None else None}
            # The names compare as iSCSI names do (``same_name``): in another case they are the same.
            if any(key in said and value != said[key]
                   and (key == "SessionType" or said[key] is None or not same_name(value, said[key]))
                   for key, value in pairs):
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, "InitiatorName, TargetName or SessionType changed "
                                  "during the login")
        if header.csg == SECURITY:
            response, done = self._security(pairs)
        else:
            if self.stage == SECURITY:
                self._skip_security()
            response, done = self._operational(pairs)
        if first_response and self.target is not None:
            # RFC 7143 §13.9 (Use: IO by target): returned in the response to the first Login Request that
            # gives a TargetName, on every connection of the session, not only the leading one.
            response.append(("TargetPortalGroupTag", str(self.target.portal_group_tag)))
        return self._reply(header, response, done)

    # -- first PDU -----------------------------------------------------------------------
    def _check_first(self, header: Any) -> None:
        if not header.version_min <= 0 <= header.version_max:
            raise LoginFailed(LoginStatus.UNSUPPORTED_VERSION, "only iSCSI version 0 is supported")
        self.isid, self.tsih, self.cid = header.isid, header.tsih, header.cid
        self.initial_cmdsn = header.cmdsn

    def _identify(self, pairs: list[tuple[str, str]]) -> None:
        keys = dict(pairs)
        self.initiator_name = keys.get("InitiatorName", "")
        if not self.initiator_name:
            raise LoginFailed(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        self.session_type = keys.get("SessionType", "Normal")
        if self.session_type not in ("Normal", "Discovery"):
            raise LoginFailed(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {self.session_type!r}")
        if self.session_type == "Normal":
            name = keys.get("TargetName")
            if not name:
                raise LoginFailed(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            target = self.registry.find_target(name)  # RFC 7143 §4.2.7.2: in any case (``normalize_name``)
            if target is None:
                raise LoginFailed(LoginStatus.NOT_FOUND, f"no target {name!r}")
            if not target.admits(self.initiator_name):
                raise LoginFailed(LoginStatus.AUTHORIZATION_FAILURE,
                                  f"initiator {self.initiator_name!r} not in the ACL of {name!r}")
            if target.elsewhere:  # the router could not tell which process serves it: the initiator retries
                raise LoginFailed(LoginStatus.SERVICE_UNAVAILABLE, f"target {name!r} is served by another process")
            self.target = target
        if self.tsih:
            existing = self.registry.find_session(self.initiator_name, self.isid, self.tsih)
            if existing is None or existing.target is not self.target:
                raise LoginFailed(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session with TSIH {self.tsih}")
            self._check_room(existing)
            self.existing = existing
        # A connection added to a session (or reinstated) works with what the session negotiated (§6.3.4).
        self.negotiator = TargetNegotiator(self.settings, leading=self.tsih == 0, session_type=self.session_type,
                                           session=self.existing.params if self.existing is not None else None)

    def _check_room(self, existing: Session) -> None:
        """A connection added to ``existing`` (not one reinstating its CID) must fit its MaxConnections."""
        if self.cid not in existing.connections and len(existing.connections) >= existing.params.max_connections:
            raise LoginFailed(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections reached")

    def _credentials(self):
        """(CHAP credentials, mutual ones) to check, and for discovery the other pairs the initiator may
        prove instead (``ChapTargetAuth`` alternatives)."""
        target = self.target
        if target is not None:
            return target.chap_for(self.initiator_name), target.mutual_chap, ()
        # Discovery: the credentials of a target whose ACL admits this initiator name, its own mutual secret
        # with them (the one CHAP_N and CHAP_R prove is chosen).  Never another tenant's: its mutual secret
        # would answer this initiator's challenges, and the claimed name would see that tenant's targets.
        # SendTargets then lists only the targets those proved credentials open (``Session.chap``), and the
        # open targets: an initiator that only open targets admit discovers them without CHAP.
        targets = self.registry.targets.values()
        if not any(t.chap for t in targets):
            return None, None, ()
        pairs = [(t.chap_for(self.initiator_name), t.mutual_chap) for t in targets
                 if t.chap and t.admits(self.initiator_name)]
        if not pairs:
            if any(t.chap is None and t.admits(self.initiator_name) for t in targets):
                return None, None, ()
            raise LoginFailed(LoginStatus.AUTHORIZATION_FAILURE,
                              f"initiator {self.initiator_name!r} is in no target's ACL")
        return pairs[0][0], pairs[0][1], tuple(pairs[1:])

    def _proved(self):
        """The CHAP credentials this login proved (None: no CHAP)."""
        if self.auth is None or self.auth.proved_index is None:
            return None
        return self._chap_choices[self.auth.proved_index]

    # -- security stage ------------------------------------------------------------------
    def _security(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        creds, mutual, alternatives = self._credentials()
        response: list[tuple[str, str]] = []
        security_keys = {k: v for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")}
        other = [(k, v) for k, v in pairs if k not in security_keys and k not in _IDENTITY_KEYS]
        if "AuthMethod" in security_keys:
            if self.auth is not None or self.auth_done:
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, "AuthMethod negotiated twice (RFC 7143 §6.2)")
            offered = [m.strip() for m in security_keys.pop("AuthMethod").split(",")]
            if creds is not None:
                if "CHAP" not in offered:
                    raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "target requires CHAP")
                response.append(("AuthMethod", "CHAP"))
                self._chap_choices = [creds, *(c for c, _ in alternatives)]
                self.auth = ChapTargetAuth(
                    (creds.user, creds.secret), mutual and (mutual.user, mutual.secret),
                    alternatives=[((c.user, c.secret), m and (m.user, m.secret)) for c, m in alternatives])
            elif "None" in offered:
                response.append(("AuthMethod", "None"))
                self.auth_done = True
            else:
                response.append(("AuthMethod", "Reject"))
                raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "no acceptable AuthMethod")
        elif creds is None and self.auth is None:
            self.auth_done = True  # AuthMethod defaults to None (§13.? / §12.1)
        if security_keys:
            if self.auth is None:
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
            answer, done = self.auth.step(security_keys)
            response += answer
            self.auth_done = done
        if creds is not None and self.auth is None:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "target requires CHAP")
        if other:
            assert self.negotiator is not None
            response += self.negotiator.operational(other)
        return response, self.auth_done

    def _skip_security(self) -> None:
        creds, _, _ = self._credentials()
        if creds is not None and not self.auth_done:
            raise LoginFailed(LoginStatus.AUTHENTICATION_FAILURE, "target requires CHAP")
        self.stage = OPERATIONAL

    # -- operational stage ---------------------------------------------------------------
    def _operational(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        assert self.negotiator is not None
        pairs = [(k, v) for k, v in pairs if k not in _IDENTITY_KEYS]
        response = self.negotiator.operational(pairs) if pairs else []
        offers = self.negotiator.pending_offers()
        # Transit only once the initiator answered every key we offered (RFC 7143 §6.2).
        return response + offers, self.negotiator.ready

    # -- the response --------------------------------------------------------------------
    def _reply(self, header: Any, response: list[tuple[str, str]], ready: bool) -> LoginReply:
        transit = bool(header.transit) and ready
        nsg = header.nsg if transit else 0
        csg = header.csg
        if transit and csg == SECURITY and nsg == FULL_FEATURE:
            # Operational keys never negotiated: the target may still need to declare its own.
            assert self.negotiator is not None
            offers = self.negotiator.pending_offers()
            if offers or not self.negotiator.ready:
                response += offers
                nsg = OPERATIONAL
        text = encode_text(response)
        if len(text) > LOGIN_RESPONSE_MAX:
            # Refused rather than continued over several responses (C bit, §11.13.1): only a request full of
            # keys the target must answer one by one (NotUnderstood) gets this far.
            raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, f"the answer to the login's keys takes {len(text)} "
                              f"bytes, more than the {LOGIN_RESPONSE_MAX} the initiator takes in one PDU")
        reply = LoginReply(transit, csg, nsg if transit else 0, text, self.tsih)
        if transit:
            self.stage = nsg
            if nsg == FULL_FEATURE:
                reply.session = self._establish()
                reply.tsih = reply.session.tsih
                reply.replaced = self._replaced
        return reply

    def _establish(self) -> Session:
        assert self.negotiator is not None
        # The ACL was checked on the first login PDU; a fence, an unexport or a removal may have come between
        # then and now (the login runs under the registry's lock, as they do: this check and the session's
        # opening are one step for them).  A session opened after a fence returned could write after it.
        if self.target is not None:
            if self.registry.targets.get(self.target.iqn) is not self.target:
                raise LoginFailed(LoginStatus.NOT_FOUND, f"target {self.target.iqn!r} was removed during the login")
            if not self.target.admits(self.initiator_name):
                raise LoginFailed(LoginStatus.AUTHORIZATION_FAILURE, f"initiator {self.initiator_name!r} left the "
                                  f"ACL of {self.target.iqn!r} during the login")
        if self.existing is not None and (self.existing.closed
                                          or self.registry.sessions.get(self.existing.tsih) is not self.existing):
            raise LoginFailed(LoginStatus.SESSION_DOES_NOT_EXIST, f"session {self.tsih} ended during the login")
        if self.existing is not None:  # as on the first PDU: another connection may have joined since
            self._check_room(self.existing)
        params = self.negotiator.params()
        params.initiator_name = self.initiator_name
        if self.target is not None:
            params.target_name = self.target.iqn
        if self.existing is not None:
            session = self.existing
            old = session.connections.get(self.cid)
            if old is not None and old is not self.connection:
                old.close("connection reinstatement")  # RFC 7143 §6.3.4
                self._replaced = [old]
            session.connections[self.cid] = self.connection
            return session
        session = self.registry.open_session(self.initiator_name, self.isid, self.target, params,
                                             self.initial_cmdsn, self.connection)
        session.chap = self._proved()
        self._replaced = session.replaced
        log.info("login: %s isid=0x%012x to %s (tsih %d, %s, HeaderDigest=%s DataDigest=%s)",
                 self.initiator_name, self.isid, self.target.iqn if self.target else "discovery", session.tsih,
                 self.session_type, "CRC32C" if params.header_digest else "None",
                 "CRC32C" if params.data_digest else "None")
        return session


_IDENTITY_KEYS = frozenset({"InitiatorName", "TargetName", "SessionType", "InitiatorAlias"})


def _status_of(exc: NegotiationError) -> LoginStatus:
    pair = tuple(exc.status)
    for status in LoginStatus:
        if status.value == pair:
            return status
    return LoginStatus.INITIATOR_ERROR
