"""iSCSI text keys and their negotiation, without I/O (RFC 7143 §6, §12, §13).

The wire format (§6.1) is a run of ``key=value`` strings, each followed by one
NUL byte.  ``parse_text``/``encode_text`` convert it; ``KEY_TABLE`` holds every
key of §13 (and the security keys of §12) as data: its negotiation rule,
default, scope, where it may be used and by whom.  ``TargetNegotiator`` and
``InitiatorNegotiator`` apply the rules of §6.2 to the keys of one login and
produce typed ``SessionParams``.

Negotiation rules (§6.2):

* list keys: the responder picks the first offered value it supports, else
  ``Reject``;
* numerical keys: the result is the minimum (or maximum) of the offer and the
  responder's value; a value outside the key's range is answered ``Reject``;
* boolean keys: the result is the AND (or OR) of both values;
* declarative keys: each side states its own value; no answer is due;
* keys that do not apply (e.g. burst lengths in a Discovery session) are
  answered ``Irrelevant``; unknown keys (including ``X-``/``X#`` extension
  keys) ``NotUnderstood``;
* a key must not be negotiated twice in one login: that is an initiator error.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Sequence

__all__ = [
    "NegotiationError", "parse_text", "encode_text", "KeyRule", "KEY_TABLE", "SessionParams",
    "TargetSettings", "InitiatorSettings", "TargetNegotiator", "InitiatorNegotiator",
    "split_security", "parse_number", "decode_binary", "encode_hex", "send_targets_response",
    "format_target_address",
]

# -- Login status (RFC 7143 §11.13.5) ------------------------------------------------------
INITIATOR_ERROR = (0x02, 0x00)
AUTHENTICATION_FAILURE = (0x02, 0x01)
AUTHORIZATION_FAILURE = (0x02, 0x02)
NOT_FOUND = (0x02, 0x03)
UNSUPPORTED_VERSION = (0x02, 0x05)
MISSING_PARAMETER = (0x02, 0x07)
SESSION_TYPE_NOT_SUPPORTED = (0x02, 0x09)


class NegotiationError(ValueError):
    """A login must fail: carries the Login Response status (RFC 7143 §11.13.5)."""

    def __init__(self, message: str, status: tuple[int, int] = INITIATOR_ERROR):
        super().__init__(message)
        self.status_class, self.status_detail = status

    @property
    def status(self) -> tuple[int, int]:
        return (self.status_class, self.status_detail)


# -- Text format (RFC 7143 §6.1) -----------------------------------------------------------
MAX_KEY_LENGTH = 63
MAX_VALUE_LENGTH = 255
MAX_LARGE_VALUE_LENGTH = 8192
#: Keys whose values are large-binary-values (§6.1, §12): longer than 255 bytes is allowed.
LARGE_VALUE_KEYS = frozenset({
    "CHAP_C", "CHAP_R", "SRP_s", "SRP_A", "SRP_B", "SRP_M", "SRP_HM", "KRB_AP_REQ", "KRB_AP_REP",
})
_KEY_NAME = re.compile(r"[A-Za-z0-9.\-+@_#]+\Z")  # §6.1: letters, digits, . - + @ _ (and X# keys)
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+\Z")
NOT_UNDERSTOOD, IRRELEVANT, REJECT = "NotUnderstood", "Irrelevant", "Reject"
_SPECIAL = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """Split a text data segment into ``(key, value)`` pairs, in order (RFC 7143 §6.1).

    Every pair, the last included, ends with one NUL; stray NULs after the last
    pair (padding) are tolerated.  Raises ``NegotiationError`` (initiator error)
    for a pair without ``=``, an empty or over-long key, a key with characters
    outside §6.1's set, a value that is not UTF-8 or longer than 255 bytes
    (8192 for large binary values), or text that does not end with a NUL.
    Duplicate keys are kept; whether they are allowed is the negotiator's call.
    """
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise NegotiationError("text data does not end with a NUL")
    items = data.rstrip(b"\0").split(b"\0") if data.strip(b"\0") else []
    pairs = []
    for raw in items:
        key_raw, sep, value_raw = raw.partition(b"=")
        if not sep:
            raise NegotiationError("text item without '='")
        try:
            key, value = key_raw.decode("ascii"), value_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NegotiationError("text item is not valid UTF-8") from None
        _check_key(key)
        limit = MAX_LARGE_VALUE_LENGTH if key in LARGE_VALUE_KEYS else MAX_VALUE_LENGTH
        if len(value_raw) > limit:
            raise NegotiationError(f"value of {key} longer than {limit} bytes")
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """The wire form of ``pairs``: ``key=value\\0`` each (RFC 7143 §6.1)."""
    out = bytearray()
    for key, value in pairs:
        _check_key(key)
        raw = str(value).encode("utf-8")
        limit = MAX_LARGE_VALUE_LENGTH if key in LARGE_VALUE_KEYS else MAX_VALUE_LENGTH
        if b"\0" in raw or len(raw) > limit:
            raise ValueError(f"cannot encode the value of {key}")
        out += key.encode("ascii") + b"=" + raw + b"\0"
    return bytes(out)


def _check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not _KEY_NAME.match(key):
        raise NegotiationError(f"malformed key name {key[:MAX_KEY_LENGTH]!r}")


def parse_digest_list(text: str) -> tuple[str, ...]:
    """A command line's HeaderDigest/DataDigest preference list (§13.1), e.g. ``CRC32C,None``: None and
    CRC32C (any case), each at most once, in order of preference.  ``CRC32C`` alone requires digests."""
    names = {"none": "None", "crc32c": "CRC32C"}
    values = tuple(names.get(part.strip().lower(), "") for part in text.split(","))
    if "" in values or len(set(values)) != len(values):
        raise ValueError(f"{text!r}: a list of None and CRC32C, each at most once")
    return values


def parse_number(text: str) -> int:
    """A numerical-value: decimal-constant or hex-constant below 2**64 (RFC 7143 §6.1)."""
    if _DECIMAL.match(text):
        number = int(text)
    elif _HEX.match(text):
        number = int(text[2:], 16)
    else:
        raise ValueError(f"not a numerical value: {text[:20]!r}")
    if number >= 2**64:
        raise ValueError("numerical value out of range")
    return number


def decode_binary(text: str) -> bytes:
    """A binary-value in hex (``0x``, odd digit counts get a leading zero) or base64 (``0b``) (§6.1)."""
    prefix, body = text[:2], text[2:]
    if not body:
        raise ValueError("empty binary value")
    if prefix in ("0x", "0X"):
        if not _HEX_DIGITS.match(body):
            raise ValueError("malformed hex binary value")
        return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
    if prefix in ("0b", "0B"):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("malformed base64 binary value") from None
    raise ValueError("binary value needs a 0x or 0b prefix")


def encode_hex(data: bytes) -> str:
    """The hex-constant form of ``data`` (``0x…``), which every initiator reads (§6.1)."""
    return "0x" + data.hex()


# -- The key table (RFC 7143 §12, §13) -----------------------------------------------------
@dataclass(frozen=True)
class KeyRule:
    """One text key.

    kind: ``bool_and``/``bool_or``/``number_min``/``number_max``/``list`` (negotiated),
    ``declarative`` (stated, never answered), ``inquiry`` (SendTargets), ``security``
    (AuthMethod, CHAP_*, SRP_*, KRB_*: the security stage only), ``obsolete`` (§13.25:
    answered Reject), ``irrelevant`` (iSER keys on TCP: answered Irrelevant).
    scope: ``SW`` session-wide or ``CO`` connection-only.
    phase (the RFC's "Use"): ``LO`` leading-connection login only, ``IO`` login of any
    connection, ``ALL`` login and full feature phase, ``FFP`` full feature phase only,
    ``SEC`` security stage only.
    senders: who may send it, ``I``, ``T`` or ``IT``.
    """

    name: str
    kind: str
    default: object
    scope: str
    phase: str
    senders: str = "IT"
    low: int | None = None
    high: int | None = None
    values: tuple[str, ...] = ()
    param: str | None = None        # SessionParams attribute it sets
    discovery: bool = False         # relevant in a Discovery session
    value_type: str = ""            # for declarative keys: "number", "text", "enum"
    section: str = ""

    @property
    def leading_only(self) -> bool:
        return self.phase == "LO"

    @property
    def negotiated(self) -> bool:
        return self.kind in ("bool_and", "bool_or", "number_min", "number_max", "list")


_MAX_24 = 2**24 - 1


def _rules(*rules: KeyRule) -> dict[str, KeyRule]:
    return {rule.name: rule for rule in rules}


KEY_TABLE: dict[str, KeyRule] = _rules(
    # §13.1 digests
    KeyRule("HeaderDigest", "list", "None", "CO", "IO", values=("CRC32C", "None"), param="header_digest",
            discovery=True, section="13.1"),
    KeyRule("DataDigest", "list", "None", "CO", "IO", values=("CRC32C", "None"), param="data_digest",
            discovery=True, section="13.1"),
    KeyRule("MaxConnections", "number_min", 1, "SW", "LO", low=1, high=65535, param="max_connections",
            section="13.2"),
    KeyRule("SendTargets", "inquiry", None, "SW", "FFP", senders="I", discovery=True, section="13.3"),
    KeyRule("TargetName", "declarative", None, "SW", "IO", value_type="text", param="target_name",
            discovery=True, section="13.4"),
    KeyRule("InitiatorName", "declarative", None, "SW", "IO", senders="I", value_type="text",
            param="initiator_name", discovery=True, section="13.5"),
    KeyRule("TargetAlias", "declarative", None, "SW", "ALL", senders="T", value_type="text",
            param="target_alias", discovery=True, section="13.6"),
    KeyRule("InitiatorAlias", "declarative", None, "SW", "ALL", senders="I", value_type="text",
            param="initiator_alias", discovery=True, section="13.7"),
    KeyRule("TargetAddress", "declarative", None, "SW", "ALL", senders="T", value_type="text",
            discovery=True, section="13.8"),
    KeyRule("TargetPortalGroupTag", "declarative", None, "SW", "IO", senders="T", low=0, high=65535,
            value_type="number", param="target_portal_group_tag", discovery=True, section="13.9"),
    KeyRule("InitialR2T", "bool_or", True, "SW", "LO", param="initial_r2t", section="13.10"),
    KeyRule("ImmediateData", "bool_and", True, "SW", "LO", param="immediate_data", section="13.11"),
    KeyRule("MaxRecvDataSegmentLength", "declarative", 8192, "CO", "ALL", low=512, high=_MAX_24,
            value_type="number", discovery=True, section="13.12"),
    KeyRule("MaxBurstLength", "number_min", 262144, "SW", "LO", low=512, high=_MAX_24,
            param="max_burst_length", section="13.13"),
    KeyRule("FirstBurstLength", "number_min", 65536, "SW", "LO", low=512, high=_MAX_24,
            param="first_burst_length", section="13.14"),
    # Recovery keys stay relevant in Discovery sessions: open-iscsi offers them there and refuses
    # "Irrelevant" for ErrorRecoveryLevel; LIO answers them too (only burst/R2T/ordering keys are irrelevant).
    KeyRule("DefaultTime2Wait", "number_max", 2, "SW", "LO", low=0, high=3600, param="default_time2wait",
            discovery=True, section="13.15"),
    KeyRule("DefaultTime2Retain", "number_min", 20, "SW", "LO", low=0, high=3600,
            param="default_time2retain", discovery=True, section="13.16"),
    KeyRule("MaxOutstandingR2T", "number_min", 1, "SW", "LO", low=1, high=65535,
            param="max_outstanding_r2t", section="13.17"),
    KeyRule("DataPDUInOrder", "bool_or", True, "SW", "LO", param="data_pdu_in_order", section="13.18"),
    KeyRule("DataSequenceInOrder", "bool_or", True, "SW", "LO", param="data_sequence_in_order",
            section="13.19"),
    KeyRule("ErrorRecoveryLevel", "number_min", 0, "SW", "LO", low=0, high=2, param="error_recovery_level",
            discovery=True, section="13.20"),
    KeyRule("SessionType", "declarative", "Normal", "SW", "LO", senders="I", values=("Discovery", "Normal"),
            value_type="enum", param="session_type", discovery=True, section="13.21"),
    KeyRule("TaskReporting", "list", "RFC3720", "SW", "LO", values=("RFC3720", "ResponseFence", "FastAbort"),
            param="task_reporting", section="13.23"),
    KeyRule("iSCSIProtocolLevel", "number_min", 1, "SW", "LO", low=0, high=31, param="iscsi_protocol_level",
            section="13.24"),
    # §13.25: obsoleted marker keys are answered Reject (never NotUnderstood).
    KeyRule("IFMarker", "obsolete", False, "CO", "IO", discovery=True, section="13.25"),
    KeyRule("OFMarker", "obsolete", False, "CO", "IO", discovery=True, section="13.25"),
    KeyRule("IFMarkInt", "obsolete", None, "CO", "IO", discovery=True, section="13.25"),
    KeyRule("OFMarkInt", "obsolete", None, "CO", "IO", discovery=True, section="13.25"),
    KeyRule("X#NodeArchitecture", "declarative", None, "SW", "ALL", value_type="text", discovery=True,
            section="13.26"),
    # §12: security negotiation
    KeyRule("AuthMethod", "security", "None", "CO", "SEC", values=("KRB5", "SRP", "CHAP", "None"),
            discovery=True, section="12.1"),
    *(KeyRule(name, "security", None, "CO", "SEC", discovery=True, section="12.1.3")
      for name in ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")),
    *(KeyRule(name, "security", None, "CO", "SEC", discovery=True, section="12.1.2")
      for name in ("SRP_U", "SRP_GROUP", "SRP_s", "SRP_A", "SRP_B", "SRP_M", "SRP_HM", "TargetAuth")),
    *(KeyRule(name, "security", None, "CO", "SEC", discovery=True, section="12.1.1")
      for name in ("KRB_AP_REQ", "KRB_AP_REP")),
    # RFC 7145 (iSER): on TCP only RDMAExtensions=No makes sense; the others are then irrelevant.
    KeyRule("RDMAExtensions", "bool_and", False, "SW", "LO", param="rdma_extensions", section="RFC 7145 §6.3"),
    *(KeyRule(name, "irrelevant", None, "CO", "ALL", section="RFC 7145 §6.3")
      for name in ("TargetRecvDataSegmentLength", "InitiatorRecvDataSegmentLength",
                   "MaxOutstandingUnexpectedPDUs")),
)

SECURITY_KEYS = frozenset(name for name, rule in KEY_TABLE.items() if rule.kind == "security")
IDENTITY_KEYS = frozenset({"InitiatorName", "TargetName", "SessionType", "InitiatorAlias"})


def split_security(pairs: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(security keys, everything else) of one request, order kept (RFC 7143 §6.3, §12)."""
    security, other = [], []
    for key, value in pairs:
        (security if key in SECURITY_KEYS else other).append((key, value))
    return security, other


# -- Negotiated values ---------------------------------------------------------------------
@dataclass
class SessionParams:
    """The values in force after login (RFC 7143 §13 defaults until negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    #: What we may receive: the MaxRecvDataSegmentLength we declared (8192 if we never did).
    max_recv_data_segment_length: int = 8192
    #: What we may send: the MaxRecvDataSegmentLength the peer declared (8192 if it never did).
    max_xmit_data_segment_length: int = 8192
    session_type: str = "Normal"
    initiator_name: str = ""
    target_name: str = ""
    initiator_alias: str | None = None
    target_alias: str | None = None
    target_portal_group_tag: int | None = None
    task_reporting: str = "RFC3720"
    iscsi_protocol_level: int = 1
    rdma_extensions: bool = False


_SW_PARAMS = tuple(rule.param for rule in KEY_TABLE.values() if rule.scope == "SW" and rule.param)


@dataclass(frozen=True)
class TargetSettings:
    """What the target accepts and prefers; each field is its side of one key (RFC 7143 §13)."""

    #: Largest data segment we accept in one PDU; declared to the initiator (§13.12).
    max_recv_data_segment_length: int = 262144
    #: Largest solicited burst we accept; 1 MiB lets a 1 MiB write go in one R2T (§13.13).
    max_burst_length: int = 1048576
    #: Largest unsolicited burst (immediate + unsolicited Data-Out) we accept (§13.14).
    first_burst_length: int = 262144
    #: We take immediate data: saves a round trip per small write (§13.11).
    immediate_data: bool = True
    #: We do not require an R2T before the first burst (§13.10).
    initial_r2t: bool = False
    #: R2Ts we keep outstanding per task (§13.17).
    max_outstanding_r2t: int = 1
    #: Digest values we support, in our order of preference (§13.1).
    header_digest: tuple[str, ...] = ("CRC32C", "None")
    data_digest: tuple[str, ...] = ("CRC32C", "None")
    #: Only session-level recovery is implemented (§13.20).
    error_recovery_level: int = 0
    #: Connections per session (§13.2).
    max_connections: int = 1
    #: Seconds before a logged-out/dropped task may be reassigned (§13.15, §13.16).
    default_time2wait: int = 2
    default_time2retain: int = 20
    #: We send Data-In PDUs and sequences in order (§13.18, §13.19).
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    #: TaskReporting values we support (§13.23): only the RFC 3720 behaviour.
    task_reporting: tuple[str, ...] = ("RFC3720",)
    #: Highest iSCSIProtocolLevel we implement: 1 = RFC 7143 (§13.24).
    iscsi_protocol_level: int = 1
    #: iSER is not supported on TCP (RFC 7145).
    rdma_extensions: bool = False
    #: Declared in Normal-session logins when set (§13.6).
    target_alias: str | None = None


@dataclass(frozen=True)
class InitiatorSettings:
    """What our initiator offers; each field is its side of one key (RFC 7143 §13)."""

    initiator_name: str
    target_name: str | None = None
    session_type: str = "Normal"
    initiator_alias: str | None = None
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 1
    header_digest: tuple[str, ...] = ("None",)
    data_digest: tuple[str, ...] = ("None",)
    error_recovery_level: int = 0
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    task_reporting: tuple[str, ...] = ("RFC3720",)
    iscsi_protocol_level: int = 1
    rdma_extensions: bool = False


# -- Shared negotiation machinery ----------------------------------------------------------
def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def _typed(rule: KeyRule, value: object) -> object:
    """The SessionParams form of a negotiated wire value."""
    if rule.name in ("HeaderDigest", "DataDigest"):
        return value == "CRC32C"
    return value


class _Negotiator:
    """State common to both sides: results, what we offered, what the peer sent."""

    we: str = ""     # "T" or "I"
    peer: str = ""

    def __init__(self, local, *, leading: bool, session_type: str | None,
                 session: SessionParams | None) -> None:
        self.local = local
        self.leading = leading
        self.session_type = session_type
        self._values: dict[str, object] = {}          # key -> negotiated wire-typed result
        self._received: dict[str, tuple[str, str | None]] = {}  # key -> (value, our answer)
        self._offered: dict[str, object] = {}         # key -> value we offered
        self._answered: set[str] = set()
        self._peer_mrdsl: int | None = None
        self._declared_mrdsl = False
        self._declarations: dict[str, str] = {}       # declarative keys the peer sent
        self._inherited = session

    # local preferences in wire form ------------------------------------------------------
    def _local(self, rule: KeyRule) -> object:
        value = getattr(self.local, rule.param)
        if rule.kind == "list":
            return tuple(value) if not isinstance(value, str) else (value,)
        if rule.name == "FirstBurstLength":
            # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.  Neither offer nor accept more than the
            # burst this session can have: an offer above it, answered with itself, would leave the initiator
            # believing in unsolicited data the target then refuses.
            return min(value, self.local.max_burst_length, self._max_burst_bound())
        return value

    def _max_burst_bound(self) -> int:
        """The most MaxBurstLength can end at: the agreed value; while our own offer is unanswered, that
        offer (a minimum never exceeds it); else the value in force (RFC 7143 §13.13)."""
        if "MaxBurstLength" not in self._values and "MaxBurstLength" in self._offered:
            return self._offered["MaxBurstLength"]
        return self._current("MaxBurstLength")

    def _offer_value(self, rule: KeyRule) -> object:
        local = self._local(rule)
        return ",".join(local) if rule.kind == "list" else local

    # the responder's rule (§6.2) ------------------------------------------------------------
    def _respond(self, rule: KeyRule, value: str, local: object) -> tuple[str, object | None]:
        if rule.kind in ("bool_and", "bool_or"):
            if value not in ("Yes", "No"):
                return REJECT, None
            offer, mine = value == "Yes", bool(local)
            result = (offer and mine) if rule.kind == "bool_and" else (offer or mine)
            return _fmt(result), result
        if rule.kind in ("number_min", "number_max"):
            try:
                offer = parse_number(value)
            except ValueError:
                return REJECT, None
            if not rule.low <= offer <= rule.high:
                return REJECT, None
            result = min(offer, local) if rule.kind == "number_min" else max(offer, local)
            return str(result), result
        # list
        items = value.split(",")
        if any(not item for item in items):
            return REJECT, None
        for item in items:
            if item in local:
                return item, item
        if rule.default not in local:
            # Reject would leave the key at its default, which we do not accept either (digests required).
            raise NegotiationError(f"{rule.name}: none of {value[:40]!r} is acceptable to us ({','.join(local)}), "
                                   f"nor is the default {rule.default}")
        return REJECT, None

    def _check_answer(self, rule: KeyRule, value: str) -> None:
        """The peer's answer to our offer must obey the key's rule (§6.2)."""
        self._answered.add(rule.name)
        offered = self._offered[rule.name]
        if value in _SPECIAL:  # the key keeps its default
            if rule.kind == "list" and rule.default not in str(offered).split(","):
                # We offered only values other than the default (HeaderDigest=CRC32C: digests required),
                # so the default is not acceptable to us: end the login rather than go on without it.
                raise NegotiationError(f"{rule.name}: the peer answered {value} to our offer {offered}, and the "
                                       f"default {rule.default} is not one we offered (the peer does not take "
                                       f"{offered}: offer {offered},{rule.default} to go on without it, or turn it "
                                       f"on at the peer)")
            return
        ok = True
        if rule.kind in ("bool_and", "bool_or"):
            ok = value in ("Yes", "No")
            if ok and rule.kind == "bool_and" and offered is False:
                ok = value == "No"
            if ok and rule.kind == "bool_or" and offered is True:
                ok = value == "Yes"
            result: object = value == "Yes"
        elif rule.kind in ("number_min", "number_max"):
            try:
                result = parse_number(value)
            except ValueError:
                ok, result = False, None
            if ok:
                ok = rule.low <= result <= rule.high and (
                    result <= offered if rule.kind == "number_min" else result >= offered)
            if ok and rule.name == "FirstBurstLength" and result > self._max_burst_bound():
                # MaxBurstLength was agreed lower after our offer (both in one exchange): §13.14 is broken,
                # and clamping in silence would leave the two sides with different first bursts.
                raise NegotiationError(f"FirstBurstLength={result} answered above MaxBurstLength="
                                       f"{self._max_burst_bound()} (RFC 7143 §13.14)")
        else:
            result = value
            if value not in str(offered).split(","):
                raise NegotiationError(f"{rule.name}: the peer chose {value[:40]!r}, which is not in our offer "
                                       f"{offered}")
        if not ok:
            raise NegotiationError(f"answer {value[:40]!r} to our {rule.name} offer breaks its rule")
        self._values[rule.name] = result

    def _declare_peer(self, rule: KeyRule, value: str) -> None:
        if rule.value_type == "number":
            try:
                number = parse_number(value)
            except ValueError:
                number = -1
            if not rule.low <= number <= rule.high:
                raise NegotiationError(f"bad {rule.name} value {value[:20]!r}")
            if rule.name == "MaxRecvDataSegmentLength":
                self._peer_mrdsl = number
            else:
                self._values[rule.name] = number
            return
        if rule.value_type == "enum" and value not in rule.values:
            raise NegotiationError(f"{rule.name}={value[:40]!r} not supported", SESSION_TYPE_NOT_SUPPORTED)
        if rule.name == "SessionType":
            self.session_type = value
        self._declarations[rule.name] = value
        if rule.param:
            self._values[rule.name] = value

    # results ----------------------------------------------------------------------------
    @property
    def awaiting(self) -> frozenset[str]:
        """Keys we offered that the peer has not answered: no transit until it has (§6.2)."""
        return frozenset(self._offered) - self._answered

    @property
    def ready(self) -> bool:
        return not self.awaiting

    def params(self) -> SessionParams:
        """The negotiated values, RFC defaults for the rest (RFC 7143 §13)."""
        params = SessionParams()
        if self._inherited is not None and not self.leading:
            for name in _SW_PARAMS:
                setattr(params, name, getattr(self._inherited, name))
        for key, value in self._values.items():
            rule = KEY_TABLE[key]
            if rule.param:
                setattr(params, rule.param, _typed(rule, value))
        if self.session_type:
            params.session_type = self.session_type
        params.max_recv_data_segment_length = (
            self.local.max_recv_data_segment_length if self._declared_mrdsl else 8192)
        params.max_xmit_data_segment_length = self._peer_mrdsl or 8192
        # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.  Offers and answers keep to it (``_local``,
        # ``_check_answer``); this covers a FirstBurstLength left at its default (irrelevant, or never offered)
        # or agreed before a peer offered a lower MaxBurstLength.
        params.first_burst_length = min(params.first_burst_length, params.max_burst_length)
        return params

    def _relevant(self, rule: KeyRule) -> bool:
        if self.session_type == "Discovery" and not rule.discovery:
            return False
        if rule.name == "FirstBurstLength":
            # §13.14: irrelevant when InitialR2T=Yes and ImmediateData=No.
            return not (self._current("InitialR2T") and not self._current("ImmediateData"))
        return True

    def _current(self, key: str) -> object:
        if key in self._values:
            return self._values[key]
        if self._inherited is not None and not self.leading:
            return getattr(self._inherited, KEY_TABLE[key].param)
        return KEY_TABLE[key].default

    def _pending_offers(self) -> list[tuple[str, str]]:
        """Negotiable keys where our value differs from the default and nobody has spoken."""
        offers = []
        for rule in KEY_TABLE.values():
            if not rule.negotiated or rule.name in self._values or rule.name in self._offered:
                continue
            if rule.name in self._received:
                continue
            if rule.leading_only and not self.leading:
                continue
            if not self._relevant(rule):
                continue
            value = self._offer_value(rule)
            if rule.kind == "list":
                if rule.default in self._local(rule):
                    continue  # the default is acceptable to us: nothing to ask for
            elif value == rule.default:
                continue
            self._offered[rule.name] = value
            offers.append((rule.name, _fmt(value)))
        return offers


class TargetNegotiator(_Negotiator):
    """The target's side of login key negotiation (RFC 7143 §6.2, §13).

    Call ``operational`` once per complete Login Request (C bit clear) with its
    non-security keys (``split_security``), and ``pending_offers`` when the
    initiator asks to transit: it returns the keys the target still needs to
    offer (each only once).  Do not transit to full feature phase while
    ``awaiting`` is not empty.  ``params`` gives the result.
    """

    we, peer = "T", "I"

    def __init__(self, local: TargetSettings, leading: bool = True, session_type: str | None = None,
                 *, session: SessionParams | None = None) -> None:
        super().__init__(local, leading=leading, session_type=session_type, session=session)
        self._declared_alias = False

    def operational(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The answers to one Login Request's keys, in request order, plus our declarations."""
        names = [key for key, _ in pairs]
        if len(set(names)) != len(names):
            raise NegotiationError("a key appears twice in one request")
        answers: dict[str, str | None] = {}
        # Booleans and MaxBurstLength first: FirstBurstLength depends on them (§13.14).
        order = sorted(range(len(pairs)), key=lambda i: _PRIORITY.get(pairs[i][0], 2))
        for index in order:
            key, value = pairs[index]
            answers[key] = self._one(key, value)
        response = [(key, answers[key]) for key, _ in pairs if answers[key] is not None]
        response += self._declarations_due()
        return response

    def _one(self, key: str, value: str) -> str | None:
        rule = KEY_TABLE.get(key)
        if rule is None:
            return NOT_UNDERSTOOD  # includes X- and X# extension keys (§13.22)
        if rule.kind == "security":
            raise NegotiationError(f"{key} outside the security exchange")
        if self.peer not in rule.senders:
            raise NegotiationError(f"the initiator may not send {key}")
        if rule.phase == "FFP":
            return IRRELEVANT  # SendTargets belongs to Text requests (§13.3)
        if rule.leading_only and not self.leading:
            raise NegotiationError(f"leading-only key {key} on a non-leading connection")
        if key in self._received:
            previous, answer = self._received[key]
            if previous != value:
                raise NegotiationError(f"{key} negotiated twice (RFC 7143 §6.2)")
            # libiscsi repeats its whole key set in every operational-stage request
            # (lib/login.c): an identical repeat gets the same answer again.
            return answer
        if key in self._offered:
            if key in self._answered:
                raise NegotiationError(f"{key} negotiated twice (RFC 7143 §6.2)")
            self._check_answer(rule, value)
            self._received[key] = (value, None)
            return None
        answer = self._answer(rule, value)
        self._received[key] = (value, answer)
        return answer

    def _answer(self, rule: KeyRule, value: str) -> str | None:
        if rule.kind == "declarative":
            self._declare_peer(rule, value)
            return None
        if rule.kind == "obsolete":
            return REJECT  # §13.25
        if rule.kind == "irrelevant" or not self._relevant(rule):
            return IRRELEVANT
        answer, result = self._respond(rule, value, self._local(rule))
        if result is not None:
            self._values[rule.name] = result
        return answer

    def _declarations_due(self) -> list[tuple[str, str]]:
        out = []
        if not self._declared_mrdsl:
            self._declared_mrdsl = True
            out.append(("MaxRecvDataSegmentLength", str(self.local.max_recv_data_segment_length)))
        if not self._declared_alias and self.local.target_alias and self.session_type != "Discovery":
            self._declared_alias = True
            out.append(("TargetAlias", self.local.target_alias))
        return out

    def pending_offers(self) -> list[tuple[str, str]]:
        """Keys the target offers on its own before transit (RFC 7143 §6.2); each only once.

        Our MaxRecvDataSegmentLength is declared here only when it was never
        declared and is below the 8192 default the initiator would assume.
        """
        out = []
        if not self._declared_mrdsl and self.local.max_recv_data_segment_length < 8192:
            out += self._declarations_due()
        return out + self._pending_offers()

    def full_feature_text(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Answers to a Text Request's keys other than SendTargets (RFC 7143 §6.2, §11.10).

        Only ``ALL`` keys may be (re)declared in full feature phase; login-only keys
        are answered Reject, unknown keys NotUnderstood.  SendTargets is left to
        ``send_targets_response``.
        """
        response = []
        for key, value in pairs:
            rule = KEY_TABLE.get(key)
            if key == "SendTargets":
                continue
            if rule is None:
                response.append((key, NOT_UNDERSTOOD))
            elif rule.phase != "ALL" or self.peer not in rule.senders:
                response.append((key, REJECT))
            elif rule.kind == "irrelevant":
                response.append((key, IRRELEVANT))
            elif rule.kind == "declarative":
                self._declare_peer(rule, value)
        return response


_PRIORITY = {"InitialR2T": 0, "ImmediateData": 0, "MaxBurstLength": 1}


class InitiatorNegotiator(_Negotiator):
    """The initiator's side (RFC 7143 §6.2, §13): offers our keys, checks the target's answers.

    ``login_keys`` goes into the first Login Request; ``offers`` into the first
    operational-stage request; every Login Response's keys go to ``response``,
    which returns the answers due to keys the target offered.
    """

    we, peer = "I", "T"

    def __init__(self, local: InitiatorSettings, leading: bool = True, *,
                 session: SessionParams | None = None) -> None:
        super().__init__(local, leading=leading, session_type=local.session_type, session=session)
        self._values["InitiatorName"] = local.initiator_name
        if local.initiator_alias:
            self._values["InitiatorAlias"] = local.initiator_alias
        if local.target_name and local.session_type == "Normal":
            self._values["TargetName"] = local.target_name

    def login_keys(self) -> list[tuple[str, str]]:
        """The declarations of the first Login Request (§13.4, §13.5, §13.7, §13.21)."""
        keys = [("InitiatorName", self.local.initiator_name)]
        if self.local.initiator_alias:
            keys.append(("InitiatorAlias", self.local.initiator_alias))
        if self.local.session_type == "Normal":
            if not self.local.target_name:
                raise ValueError("a Normal session needs a TargetName")
            keys.append(("TargetName", self.local.target_name))
        keys.append(("SessionType", self.local.session_type))
        return keys

    def offered(self, name: str) -> str | None:
        """What we offered for key ``name`` (as sent), or None if we did not offer it."""
        return _fmt(self._offered[name]) if name in self._offered else None

    def offers(self) -> list[tuple[str, str]]:
        """Our operational offers, each key once; later calls return only what is new."""
        out = []
        for rule in KEY_TABLE.values():
            if not rule.negotiated or rule.name in self._offered or rule.name in self._received:
                continue
            if rule.leading_only and not self.leading:
                continue
            if self.session_type == "Discovery" and not rule.discovery:
                continue
            if rule.name in ("TaskReporting", "iSCSIProtocolLevel", "RDMAExtensions"):
                continue  # defaults suffice; not every target understands them
            if rule.name == "FirstBurstLength" and self.local.initial_r2t and not self.local.immediate_data:
                continue
            value = self._offer_value(rule)
            self._offered[rule.name] = value
            out.append((rule.name, _fmt(value)))
        if not self._declared_mrdsl:
            self._declared_mrdsl = True
            out.append(("MaxRecvDataSegmentLength", str(self.local.max_recv_data_segment_length)))
        return out

    def response(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Take one Login Response's keys; return the answers we owe (to the target's offers).

        Security keys are skipped (they belong to the authenticator).
        """
        names = [key for key, _ in pairs if key != "TargetAddress"]
        if len(set(names)) != len(names):
            raise NegotiationError("a key appears twice in one response")
        answers: dict[int, str | None] = {}
        # As the target does: FirstBurstLength after the keys it depends on (§13.14), in whatever order they came.
        for index in sorted(range(len(pairs)), key=lambda i: _PRIORITY.get(pairs[i][0], 2)):
            answers[index] = self._one(*pairs[index])
        return [(key, answers[index]) for index, (key, _) in enumerate(pairs) if answers[index] is not None]

    def _one(self, key: str, value: str) -> str | None:
        rule = KEY_TABLE.get(key)
        if rule is None:
            return NOT_UNDERSTOOD
        if rule.kind == "security":
            return None
        if key in self._offered:
            if key in self._answered:
                raise NegotiationError(f"{key} answered twice")
            self._check_answer(rule, value)
            return None
        if key == "TargetAddress":
            self._declarations.setdefault(key, value)
            return None
        if key in self._received:
            raise NegotiationError(f"{key} negotiated twice (RFC 7143 §6.2)")
        if self.peer not in rule.senders:
            raise NegotiationError(f"the target may not send {key}")
        self._received[key] = (value, None)
        if rule.kind == "declarative":
            self._declare_peer(rule, value)
            return None
        if rule.kind == "obsolete":
            return REJECT
        if rule.kind in ("irrelevant", "inquiry") or not self._relevant(rule):
            return IRRELEVANT
        if rule.leading_only and not self.leading:
            raise NegotiationError(f"leading-only key {key} on a non-leading connection")
        answer, result = self._respond(rule, value, self._local(rule))
        if result is not None:
            self._values[key] = result
        return answer

    @property
    def target_address(self) -> str | None:
        """The TargetAddress of a redirection or declaration, if the target sent one (§13.8)."""
        return self._declarations.get("TargetAddress")


# -- SendTargets (RFC 7143 §13.3, Appendix C) ----------------------------------------------
_ISCSI_NAME = re.compile(r"(?:iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})\Z")


def format_target_address(host: str, port: int, portal_group_tag: int) -> str:
    """``domainname[:port][,portal-group-tag]``; IPv6 literals in brackets (§13.8)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port},{portal_group_tag}"


def send_targets_response(value: str, targets: Mapping[str, Sequence[str]], *,
                          current_target: str | None = None) -> list[tuple[str, str]]:
    """The Text Response keys for ``SendTargets=value`` (RFC 7143 §13.3).

    ``targets`` maps each target name the initiator may see to its
    TargetAddress values.  ``All`` lists every target; an iSCSI name lists that
    target (nothing if unknown); an empty value lists the session's own target.
    Anything else is answered ``SendTargets=Reject``.
    """
    if value == "All":
        names = list(targets)
    elif value == "":
        if current_target is None:
            return [("SendTargets", REJECT)]
        names = [current_target] if current_target in targets else []
    elif _ISCSI_NAME.match(value):
        names = [value] if value in targets else []
    else:
        return [("SendTargets", REJECT)]
    out = []
    for name in names:
        out.append(("TargetName", name))
        out += [("TargetAddress", address) for address in targets[name]]
    return out


def _check_fields_match() -> None:
    """Every ``param`` in the table names a SessionParams field (checked at import)."""
    names = {f.name for f in fields(SessionParams)}
    missing = [rule.name for rule in KEY_TABLE.values() if rule.param and rule.param not in names]
    if missing:
        raise AssertionError(f"KEY_TABLE params without SessionParams fields: {missing}")


_check_fields_match()
