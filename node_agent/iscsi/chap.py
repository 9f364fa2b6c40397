"""CHAP for the iSCSI security stage, target and initiator side, without I/O.

RFC 7143 §12.1.3 carries RFC 1994 CHAP in login keys::

    I->T  AuthMethod=CHAP,None        T->I  AuthMethod=CHAP
    I->T  CHAP_A=<A1,A2,...>           T->I  CHAP_A=<A>  CHAP_I=<I>  CHAP_C=<C>
    I->T  CHAP_N=<N>  CHAP_R=<R>       (mutual: also CHAP_I=<I'>  CHAP_C=<C'>)
                                       T->I  (mutual: CHAP_N=<N'>  CHAP_R=<R'>)

with ``R = H(I || secret || C)`` (RFC 1994 §4.1: identifier octet, secret,
challenge).  H is MD5 (CHAP_A=5, the only algorithm RFC 7143 names); SHA-1,
SHA-256 and SHA3-256 (6, 7, 8 in IANA's PPP authentication-algorithm
registry, as the Linux target and open-iscsi use them) are accepted when
offered.  Binary values travel as ``0x`` hex or ``0b`` base64 (§6.1); we send
hex, which every initiator reads.

Secrets never appear in reprs, log lines or exception messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets as _secrets
from typing import Mapping, Sequence

from node_agent.iscsi.keys import (
    AUTHENTICATION_FAILURE, INITIATOR_ERROR, MISSING_PARAMETER, NegotiationError, decode_binary,
    encode_hex, parse_number,
)

__all__ = [
    "ALGORITHMS", "MD5", "chap_response", "choose_auth_method", "ChapTargetAuth", "ChapInitiatorAuth",
]

log = logging.getLogger("shoal.iscsi.chap")

MD5, SHA1, SHA256, SHA3_256 = 5, 6, 7, 8
#: CHAP_A value -> hashlib name (RFC 7143 §12.1.3; IANA PPP authentication algorithms).
ALGORITHMS = {MD5: "md5", SHA1: "sha1", SHA256: "sha256", SHA3_256: "sha3_256"}
#: RFC 7143 §9.2.1: secrets under 96 bits are only safe inside IPsec.
MIN_SECRET_BYTES = 12
#: Longest challenge we accept from a peer (the Linux target accepts up to 4096 hex digits).
MAX_CHALLENGE_BYTES = 1024


def initiator_secret(secret: str, initiator_name: str) -> str:
    """The CHAP secret of one initiator of a target whose ``secret`` is shared by several (Shoal's exports):
    base64url of HMAC-SHA256(secret, "shoal-chap-initiator" NUL initiator name), 43 characters.

    RFC 7143 §9.2.1: the same secret SHOULD NOT be given to several initiators.  With one secret for every
    initiator of a volume, any of them could log in under another's name (and so reinstate its session,
    take its reservations, or come back after a fence of its own name).  The controller gives each
    initiator only its own derived secret; the target, which knows ``secret``, derives the one to check
    from the InitiatorName of the login."""
    digest = hmac.new(secret.encode("utf-8"), b"shoal-chap-initiator\0" + initiator_name.encode("utf-8"),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(identifier octet || secret || challenge)."""
    digest = hashlib.new(ALGORITHMS[algorithm])
    digest.update(bytes([identifier]))
    digest.update(secret)
    digest.update(challenge)
    return digest.digest()


def choose_auth_method(offered: str, chap_required: bool) -> str:
    """The target's AuthMethod answer (RFC 7143 §12.1, list negotiation of §6.2).

    With CHAP required only ``CHAP`` is acceptable; otherwise ``None`` (no
    authentication).  Raises ``NegotiationError`` (authentication failure)
    when nothing offered is acceptable.
    """
    wanted = "CHAP" if chap_required else "None"
    if wanted in offered.split(","):
        return wanted
    raise NegotiationError("no acceptable AuthMethod offered", AUTHENTICATION_FAILURE)


class _Secret:
    """A CHAP secret: bytes that never show in a repr or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes):
        self._value = value.encode("utf-8") if isinstance(value, str) else bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret) and hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "<secret>"


def _credentials(pair, role: str, *, warn: bool = True) -> tuple[str, _Secret] | None:
    """``warn``: log a secret shorter than RFC 7143 asks.  A target's side does not: it builds these per
    login, which any peer may start, so its configuration is warned of once (``TargetConfig.validate``)."""
    if pair is None:
        return None
    user, secret = pair
    if not user or not secret:
        raise ValueError(f"{role} CHAP credentials need a user name and a secret")
    secret = _Secret(secret)
    if warn and len(secret) < MIN_SECRET_BYTES:
        log.warning("%s CHAP secret for user %r is shorter than %d bytes (RFC 7143 §9.2.1)",
                    role, user, MIN_SECRET_BYTES)
    return str(user), secret


def _check_distinct(one, other) -> None:
    # RFC 7143 §9.2.1: a secret that authenticates initiators MUST NOT authenticate targets.
    if one is not None and other is not None and one[1] == other[1]:
        raise ValueError("the initiator and target CHAP secrets must differ (RFC 7143 §9.2.1)")


def _fail(message: str, status: tuple[int, int] = AUTHENTICATION_FAILURE) -> NegotiationError:
    return NegotiationError(message, status)


def _algorithm_list(value: str) -> list[int]:
    try:
        return [parse_number(item) for item in value.split(",")]
    except ValueError:
        raise _fail("malformed CHAP_A") from None


def _identifier(value: str) -> int:
    try:
        number = parse_number(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 255:
        raise _fail("malformed CHAP_I")
    return number


def _binary(value: str, key: str) -> bytes:
    try:
        data = decode_binary(value)
    except ValueError:
        raise _fail(f"malformed {key}") from None
    if not data or len(data) > MAX_CHALLENGE_BYTES:
        raise _fail(f"{key} has a bad length")
    return data


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class ChapTargetAuth:
    """The target's side of CHAP (RFC 7143 §12.1.3), one login connection.

    ``credentials`` is the (user, secret) the initiator must prove; ``mutual``
    the (user, secret) the target answers with when the initiator asks the
    target to authenticate itself.  Feed each Login Request's security keys to
    ``step``; it returns the keys to answer with and whether authentication is
    complete.  ``alternatives``: more (credentials, mutual) pairs the initiator
    may prove instead (a discovery session: those of every target whose ACL
    admits it); the mutual answer then comes of the pair whose CHAP_N and
    CHAP_R it proved, never of another.  Every failure raises ``NegotiationError`` with status 0x0201
    (authentication failure), 0x0207 (missing CHAP_N/CHAP_R) or 0x0200.
    """

    def __init__(self, credentials: tuple[str, str | bytes] | None,
                 mutual: tuple[str, str | bytes] | None = None, rng=_secrets,
                 algorithms: tuple[int, ...] = (MD5, SHA1, SHA256, SHA3_256), *,
                 alternatives: Sequence[tuple[tuple[str, str | bytes], tuple[str, str | bytes] | None]] = ()):
        self._credentials = _credentials(credentials, "initiator", warn=False)
        self._mutual = _credentials(mutual, "target", warn=False)
        _check_distinct(self._credentials, self._mutual)
        self._alternatives = [(_credentials(c, "initiator", warn=False), _credentials(m, "target", warn=False))
                              for c, m in alternatives]
        for pair in self._alternatives:
            _check_distinct(*pair)
        if not set(algorithms) <= set(ALGORITHMS):
            raise ValueError("unsupported CHAP algorithm")
        self._rng = rng
        self._algorithms = tuple(algorithms)
        self._state = "start"
        self._algorithm = MD5
        self._identifier = 0
        self._challenge = b""
        self.proved_index: int | None = None
        """Which credentials the initiator proved: 0 the first, 1 the first alternative, ...; None until then."""

    def __repr__(self) -> str:
        return f"<ChapTargetAuth state={self._state} mutual={self._mutual is not None}>"

    @property
    def required(self) -> bool:
        """Whether the initiator must authenticate (AuthMethod=CHAP)."""
        return self._credentials is not None

    @property
    def done(self) -> bool:
        return self._state == "done"

    def auth_method(self, offered: str) -> str:
        """The AuthMethod answer; ``None`` ends authentication at once."""
        answer = choose_auth_method(offered, self.required)
        if answer == "None":
            self._state = "done"
        return answer

    def step(self, pairs: Mapping[str, str]) -> tuple[list[tuple[str, str]], bool]:
        """Answer one request's security keys; returns (keys to send, authentication complete)."""
        pairs = dict(pairs)
        response: list[tuple[str, str]] = []
        if "AuthMethod" in pairs:
            if self._state != "start":
                raise _fail("AuthMethod negotiated twice", INITIATOR_ERROR)
            response.append(("AuthMethod", self.auth_method(pairs.pop("AuthMethod"))))
            if self._state == "done":
                if pairs:
                    raise _fail("CHAP keys after AuthMethod=None", INITIATOR_ERROR)
                return response, True
            self._state = "method"
        if not pairs:
            return response, self.done
        if self._credentials is None:
            raise _fail("CHAP keys but CHAP is not configured", INITIATOR_ERROR)
        if self._state in ("start", "method"):
            response += self._challenge_step(pairs)
            return response, False
        if self._state == "challenged":
            return response + self._verify_step(pairs), True
        raise _fail("CHAP keys after authentication completed", INITIATOR_ERROR)

    def _challenge_step(self, pairs: dict[str, str]) -> list[tuple[str, str]]:
        if set(pairs) != {"CHAP_A"}:
            raise _fail("expected CHAP_A alone")
        offered = _algorithm_list(pairs["CHAP_A"])
        chosen = next((a for a in offered if a in self._algorithms), None)
        if chosen is None:
            raise _fail("no supported CHAP algorithm offered")
        self._algorithm = chosen
        self._identifier = self._rng.randbelow(256)
        size = max(16, hashlib.new(ALGORITHMS[chosen]).digest_size)
        self._challenge = self._rng.token_bytes(size)
        self._state = "challenged"
        return [("CHAP_A", str(chosen)), ("CHAP_I", str(self._identifier)),
                ("CHAP_C", encode_hex(self._challenge))]

    def _verify_step(self, pairs: dict[str, str]) -> list[tuple[str, str]]:
        self._state = "failed"
        if "CHAP_N" not in pairs or "CHAP_R" not in pairs:
            raise _fail("CHAP_N or CHAP_R missing", MISSING_PARAMETER)
        unexpected = set(pairs) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if unexpected:
            raise _fail(f"unexpected keys {sorted(unexpected)} with the CHAP response", INITIATOR_ERROR)
        response = _binary(pairs["CHAP_R"], "CHAP_R")
        name = pairs["CHAP_N"].encode("utf-8")
        proved = None
        for index, (credentials, mutual) in enumerate([(self._credentials, self._mutual), *self._alternatives]):
            user, secret = credentials
            expected = chap_response(self._algorithm, self._identifier, secret.reveal(), self._challenge)
            if _same(response, expected) & _same(name, user.encode("utf-8")) and proved is None:
                proved = (credentials, mutual)  # every pair is computed: the time says nothing of which
                self.proved_index = index
        if proved is None:
            raise _fail("CHAP authentication failed")
        self._credentials, self._mutual = proved
        answer = self._mutual_answer(pairs)
        self._state = "done"
        return answer

    def _mutual_answer(self, pairs: dict[str, str]) -> list[tuple[str, str]]:
        if "CHAP_I" not in pairs and "CHAP_C" not in pairs:
            return []
        if "CHAP_I" not in pairs or "CHAP_C" not in pairs:
            raise _fail("mutual CHAP needs both CHAP_I and CHAP_C", MISSING_PARAMETER)
        if self._mutual is None:
            raise _fail("initiator asks for mutual CHAP but no target secret is configured")
        identifier = _identifier(pairs["CHAP_I"])
        challenge = _binary(pairs["CHAP_C"], "CHAP_C")
        if _same(challenge, self._challenge):
            # RFC 7143 §12.1.3: a reflected challenge MUST be refused.
            raise _fail("initiator reused the target's CHAP challenge")
        user, secret = self._mutual
        return [("CHAP_N", user),
                ("CHAP_R", encode_hex(chap_response(self._algorithm, identifier, secret.reveal(), challenge)))]


class ChapInitiatorAuth:
    """The initiator's side of CHAP (RFC 7143 §12.1.3).

    ``credentials`` is our (user, secret); ``mutual`` the (user, secret) the
    target must prove, which makes us ask for mutual authentication.  Send
    ``start()`` in the first Login Request; pass every Login Response's
    security keys to ``step``, which returns the keys for the next request and
    whether that request may ask to transit.  ``complete`` turns true once the
    target is authenticated too (or no mutual authentication was asked).
    """

    def __init__(self, credentials: tuple[str, str | bytes] | None,
                 mutual: tuple[str, str | bytes] | None = None, rng=_secrets,
                 algorithms: tuple[int, ...] = (MD5,)):
        self._credentials = _credentials(credentials, "initiator")
        self._mutual = _credentials(mutual, "target")
        _check_distinct(self._credentials, self._mutual)
        if self._mutual is not None and self._credentials is None:
            raise ValueError("mutual CHAP needs initiator credentials too")
        if not algorithms or not set(algorithms) <= set(ALGORITHMS):
            raise ValueError("unsupported CHAP algorithm")
        self._rng = rng
        self._algorithms = tuple(algorithms)
        self._state = "start"
        self._algorithm = MD5
        self._identifier = 0
        self._challenge = b""
        self.complete = False

    def __repr__(self) -> str:
        return f"<ChapInitiatorAuth state={self._state} mutual={self._mutual is not None}>"

    def start(self) -> list[tuple[str, str]]:
        """The AuthMethod offer of the first Login Request."""
        self._state = "offered"
        if self._credentials is None:
            return [("AuthMethod", "None")]
        return [("AuthMethod", "CHAP" if self._mutual else "CHAP,None")]

    def step(self, pairs: Mapping[str, str]) -> tuple[list[tuple[str, str]], bool]:
        pairs = dict(pairs)
        if self._state == "offered":
            return self._method(pairs)
        if self._state == "algorithm":
            return self._respond(pairs)
        if self._state == "responded":
            return self._verify(pairs)
        if self._state == "done" and not pairs:
            return [], True
        raise _fail("unexpected security keys from the target", INITIATOR_ERROR)

    def _method(self, pairs: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        method = pairs.get("AuthMethod")
        if method == "None" and self._mutual is None:
            self._state, self.complete = "done", True
            return [], True
        if method != "CHAP" or self._credentials is None:
            raise _fail(f"target chose AuthMethod {method!r}")
        self._state = "algorithm"
        return [("CHAP_A", ",".join(str(a) for a in self._algorithms))], False

    def _respond(self, pairs: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        for key in ("CHAP_A", "CHAP_I", "CHAP_C"):
            if key not in pairs:
                raise _fail(f"{key} missing from the target's challenge", MISSING_PARAMETER)
        algorithms = _algorithm_list(pairs["CHAP_A"])
        if len(algorithms) != 1 or algorithms[0] not in self._algorithms:
            raise _fail("target chose a CHAP algorithm we did not offer")
        self._algorithm = algorithms[0]
        identifier = _identifier(pairs["CHAP_I"])
        challenge = _binary(pairs["CHAP_C"], "CHAP_C")
        user, secret = self._credentials
        out = [("CHAP_N", user),
               ("CHAP_R", encode_hex(chap_response(self._algorithm, identifier, secret.reveal(), challenge)))]
        self._state = "responded"
        if self._mutual is None:
            self.complete = True
            self._state = "done"
            return out, True
        self._identifier = self._rng.randbelow(256)
        size = max(16, hashlib.new(ALGORITHMS[self._algorithm]).digest_size)
        self._challenge = self._rng.token_bytes(size)
        while _same(self._challenge, challenge):  # never reflect the target's challenge (§12.1.3)
            self._challenge = self._rng.token_bytes(size)
        out += [("CHAP_I", str(self._identifier)), ("CHAP_C", encode_hex(self._challenge))]
        return out, True

    def _verify(self, pairs: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        self._state = "failed"
        if "CHAP_N" not in pairs or "CHAP_R" not in pairs:
            raise _fail("target did not authenticate itself", MISSING_PARAMETER)
        user, secret = self._mutual
        response = _binary(pairs["CHAP_R"], "CHAP_R")
        expected = chap_response(self._algorithm, self._identifier, secret.reveal(), self._challenge)
        if not (_same(response, expected) and _same(pairs["CHAP_N"].encode("utf-8"), user.encode("utf-8"))):
            raise _fail("target failed mutual CHAP authentication")
        self._state, self.complete = "done", True
        return [], True
