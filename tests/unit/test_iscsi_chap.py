"""CHAP for the iSCSI security stage (RFC 7143 §12.1.3, RFC 1994 §4.1), both sides, no I/O."""

from __future__ import annotations

import base64
import hashlib
import logging

import pytest

from node_agent.iscsi.chap import (
    MD5, SHA1, SHA256, SHA3_256, ChapInitiatorAuth, ChapTargetAuth, chap_response, choose_auth_method,
)
from node_agent.iscsi.keys import NegotiationError

USER, SECRET = "alice", "initiator-secret-1"
TUSER, TSECRET = "target-user", "target-secret-22"


class FixedRng:
    """Deterministic stand-in for the ``secrets`` module."""

    def __init__(self, identifier: int = 7, fill: int = 0xA5):
        self.identifier, self.fill = identifier, fill

    def randbelow(self, n: int) -> int:
        return self.identifier % n

    def token_bytes(self, n: int) -> bytes:
        return bytes([self.fill]) * n


def md5(*parts: bytes) -> bytes:
    return hashlib.md5(b"".join(parts)).digest()


def fails(status_detail: int):
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(NegotiationError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert self.info.value.status_class == 0x02
            assert self.info.value.status_detail == status_detail, str(self.info.value)
            return handled
    return _Check()


# -- the RFC 1994 hash ------------------------------------------------------------------------
def test_known_vectors_rfc1321_and_fips180():
    """H(id || secret || challenge) framed so the input is "abc": RFC 1321 A.5, FIPS 180-2 vectors."""
    assert chap_response(MD5, ord("a"), b"b", b"c").hex() == "900150983cd24fb0d6963f7d28e17f72"
    assert chap_response(MD5, ord("m"), b"essage", b" digest").hex() == "f96b697d7cb7938d525a2f31aaf161d0"
    assert chap_response(SHA1, ord("a"), b"b", b"c").hex() == "a9993e364706816aba3e25717850c26c9cd0d89d"
    assert chap_response(SHA256, ord("a"), b"b", b"c").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert chap_response(SHA3_256, ord("a"), b"b", b"c").hex() == (
        "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532")


def test_response_is_md5_of_identifier_secret_challenge():
    challenge = bytes(range(16))
    assert chap_response(MD5, 0x2A, b"s3cret", challenge) == md5(b"\x2a", b"s3cret", challenge)


# -- target side, one-way ------------------------------------------------------------------------
def challenge_of(auth: ChapTargetAuth, offer: str = "5") -> tuple[int, int, bytes]:
    answer, done = auth.step({"CHAP_A": offer})
    assert not done
    keys = dict(answer)
    assert list(keys) == ["CHAP_A", "CHAP_I", "CHAP_C"]
    assert keys["CHAP_C"].startswith("0x")  # libiscsi only reads hex challenges (lib/login.c)
    return int(keys["CHAP_A"]), int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])


def test_target_one_way_success_libiscsi_style():
    """libiscsi answers with CHAP_N and an upper-case 0x hex CHAP_R (lib/login.c)."""
    auth = ChapTargetAuth((USER, SECRET), rng=FixedRng())
    algorithm, identifier, challenge = challenge_of(auth)
    assert (algorithm, identifier, challenge) == (5, 7, b"\xa5" * 16)
    response = md5(bytes([identifier]), SECRET.encode(), challenge)
    answer, done = auth.step({"CHAP_N": USER, "CHAP_R": "0x" + response.hex().upper()})
    assert (answer, done) == ([], True)
    assert auth.done


def test_target_accepts_base64_response():
    auth = ChapTargetAuth((USER, SECRET))
    _, identifier, challenge = challenge_of(auth)
    response = md5(bytes([identifier]), SECRET.encode(), challenge)
    answer, done = auth.step({"CHAP_N": USER, "CHAP_R": "0b" + base64.b64encode(response).decode()})
    assert done and answer == []


def test_real_random_challenges_differ():
    a, b = ChapTargetAuth((USER, SECRET)), ChapTargetAuth((USER, SECRET))
    assert challenge_of(a)[2] != challenge_of(b)[2]


@pytest.mark.parametrize("offer, chosen", [("5", 5), ("7,5", 7), ("6", 6), ("8,7", 8), ("99,5", 5)])
def test_target_picks_first_supported_algorithm(offer, chosen):
    auth = ChapTargetAuth((USER, SECRET), rng=FixedRng())
    algorithm, identifier, challenge = challenge_of(auth, offer)
    assert algorithm == chosen
    assert len(challenge) == max(16, hashlib.new({5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}[chosen]).digest_size)
    response = chap_response(chosen, identifier, SECRET.encode(), challenge)
    assert auth.step({"CHAP_N": USER, "CHAP_R": "0x" + response.hex()}) == ([], True)


def test_target_restricted_to_md5():
    auth = ChapTargetAuth((USER, SECRET), algorithms=(MD5,))
    with fails(0x01):
        auth.step({"CHAP_A": "7"})


@pytest.mark.parametrize("offer", ["", "md5", "5,", "0x", "-5"])
def test_target_rejects_malformed_chap_a(offer):
    with fails(0x01):
        ChapTargetAuth((USER, SECRET)).step({"CHAP_A": offer})


def wrong(auth: ChapTargetAuth, **keys):
    with pytest.raises(NegotiationError) as info:
        auth.step(keys)
    return info.value


def answered(**overrides):
    auth = ChapTargetAuth((USER, SECRET), rng=FixedRng())
    _, identifier, challenge = challenge_of(auth)
    keys = {"CHAP_N": USER, "CHAP_R": "0x" + md5(bytes([identifier]), SECRET.encode(), challenge).hex()}
    keys.update(overrides)
    return auth, {k: v for k, v in keys.items() if v is not None}


@pytest.mark.parametrize("overrides, detail", [
    ({"CHAP_R": "0x" + md5(b"\x07", b"wrong-secret-xx", b"\xa5" * 16).hex()}, 0x01),  # wrong secret
    ({"CHAP_N": "mallory"}, 0x01),                        # wrong user
    ({"CHAP_R": "0xZZ"}, 0x01),                           # malformed hex
    ({"CHAP_R": "0b!!!"}, 0x01),                          # malformed base64
    ({"CHAP_R": "1234"}, 0x01),                           # no binary prefix
    ({"CHAP_R": "0x"}, 0x01),                             # empty
    ({"CHAP_R": "0x" + "00" * 16}, 0x01),                 # right length, wrong value
    ({"CHAP_R": None}, 0x07),                             # missing CHAP_R
    ({"CHAP_N": None}, 0x07),                             # missing CHAP_N
    ({"CHAP_A": "5"}, 0x00),                              # CHAP_A again
])
def test_target_refuses(overrides, detail):
    auth, keys = answered(**overrides)
    error = wrong(auth, **keys)
    assert (error.status_class, error.status_detail) == (0x02, detail)
    assert SECRET not in str(error)


def test_target_refuses_response_before_challenge():
    with fails(0x01):
        ChapTargetAuth((USER, SECRET)).step({"CHAP_N": USER, "CHAP_R": "0x00"})


def test_no_keys_after_completion():
    auth, keys = answered()
    assert auth.step(keys) == ([], True)
    with fails(0x00):
        auth.step({"CHAP_A": "5"})


def test_a_failed_attempt_cannot_be_retried():
    auth, keys = answered(CHAP_N="mallory")
    wrong(auth, **keys)
    with pytest.raises(NegotiationError):
        auth.step({"CHAP_N": USER, "CHAP_R": keys["CHAP_R"]})


# -- target side, mutual ------------------------------------------------------------------------
def test_target_mutual_authenticates_itself():
    auth = ChapTargetAuth((USER, SECRET), (TUSER, TSECRET), rng=FixedRng())
    _, identifier, challenge = challenge_of(auth)
    my_challenge = bytes(range(32))  # libiscsi sends 32 random bytes
    answer, done = auth.step({
        "CHAP_N": USER, "CHAP_R": "0x" + md5(bytes([identifier]), SECRET.encode(), challenge).hex(),
        "CHAP_I": "3", "CHAP_C": "0x" + my_challenge.hex().upper(),
    })
    assert done
    keys = dict(answer)
    assert keys["CHAP_N"] == TUSER
    # libiscsi requires exactly "0x" + 32 hex digits for an MD5 CHAP_R.
    assert keys["CHAP_R"] == "0x" + md5(b"\x03", TSECRET.encode(), my_challenge).hex()


def test_target_refuses_reflected_challenge():
    """RFC 7143 §12.1.3: the initiator must not send the target's own challenge back."""
    auth = ChapTargetAuth((USER, SECRET), (TUSER, TSECRET), rng=FixedRng())
    _, identifier, challenge = challenge_of(auth)
    with fails(0x01):
        auth.step({"CHAP_N": USER, "CHAP_R": "0x" + md5(bytes([identifier]), SECRET.encode(), challenge).hex(),
                   "CHAP_I": "3", "CHAP_C": "0x" + challenge.hex()})


def test_target_refuses_mutual_without_target_secret():
    auth, keys = answered(CHAP_I="1", CHAP_C="0x0102030405060708090a0b0c0d0e0f10")
    with fails(0x01):
        auth.step(keys)


@pytest.mark.parametrize("extra, detail", [
    ({"CHAP_I": "1"}, 0x07), ({"CHAP_C": "0x01020304"}, 0x07),
    ({"CHAP_I": "256", "CHAP_C": "0x0102"}, 0x01), ({"CHAP_I": "x", "CHAP_C": "0x0102"}, 0x01),
    ({"CHAP_I": "1", "CHAP_C": "0xGG"}, 0x01),
])
def test_target_mutual_malformed(extra, detail):
    auth = ChapTargetAuth((USER, SECRET), (TUSER, TSECRET), rng=FixedRng())
    _, identifier, challenge = challenge_of(auth)
    keys = {"CHAP_N": USER, "CHAP_R": "0x" + md5(bytes([identifier]), SECRET.encode(), challenge).hex()}
    with fails(detail):
        auth.step({**keys, **extra})


# -- AuthMethod --------------------------------------------------------------------------------
@pytest.mark.parametrize("offered, required, answer", [
    ("CHAP,None", True, "CHAP"), ("None,CHAP", True, "CHAP"), ("CHAP,None", False, "None"),
    ("None", False, "None"), ("SRP,None", False, "None"),
])
def test_choose_auth_method(offered, required, answer):
    assert choose_auth_method(offered, required) == answer


@pytest.mark.parametrize("offered, required", [("None", True), ("SRP,KRB5", True), ("CHAP", False)])
def test_choose_auth_method_refuses(offered, required):
    with fails(0x01):
        choose_auth_method(offered, required)


def test_step_handles_auth_method_then_chap():
    auth = ChapTargetAuth((USER, SECRET), rng=FixedRng())
    assert auth.step({"AuthMethod": "CHAP,None"}) == ([("AuthMethod", "CHAP")], False)
    assert challenge_of(auth)[0] == 5


def test_step_auth_method_none_without_credentials():
    auth = ChapTargetAuth(None)
    assert not auth.required
    assert auth.step({"AuthMethod": "None"}) == ([("AuthMethod", "None")], True)


# -- configuration rules and secrecy ------------------------------------------------------------
def test_same_secret_both_ways_is_refused():
    """RFC 7143 §9.2.1: a secret for initiator authentication MUST NOT authenticate a target."""
    with pytest.raises(ValueError):
        ChapTargetAuth((USER, SECRET), (TUSER, SECRET))
    with pytest.raises(ValueError):
        ChapInitiatorAuth((USER, SECRET), (TUSER, SECRET))


@pytest.mark.parametrize("creds", [("", SECRET), (USER, ""), (USER, b"")])
def test_empty_credentials_refused(creds):
    with pytest.raises(ValueError):
        ChapTargetAuth(creds)


def test_short_secret_warns_without_revealing_it(caplog):
    with caplog.at_level(logging.WARNING):
        ChapInitiatorAuth((USER, "short"))
    assert "shorter than 12" in caplog.text
    assert "short" not in caplog.text.replace("shorter", "")


def test_a_targets_short_secret_is_warned_of_once_at_configuration_not_per_login(caplog):
    """A target builds its CHAP state for every login, which any peer may start: a warning there would let
    anyone fill the log.  ``TargetConfig.validate`` warns once instead."""
    from node_agent.iscsi.target import Credentials
    from node_agent.target_service import LunSpec, TargetConfig

    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            ChapTargetAuth((USER, "short"), alternatives=[((USER, "tiny"), None)])
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        TargetConfig("iqn.2026-11.io.shoal.test:t", [LunSpec("/nonexistent")], chap=Credentials(USER, "short"),
                     mutual_chap=Credentials(TUSER, "also-short")).validate()
    assert [r.getMessage().split(" CHAP")[0] for r in caplog.records] == ["the initiator", "the target (mutual)"]
    assert "shorter than 12" in caplog.text and "short" not in caplog.text.replace("shorter", "")


def test_secrets_never_shown(caplog):
    caplog.set_level(logging.DEBUG)
    target = ChapTargetAuth((USER, SECRET), (TUSER, TSECRET))
    initiator = ChapInitiatorAuth((USER, SECRET), (TUSER, TSECRET))
    texts = [repr(target), repr(initiator), str(vars(target)), str(vars(initiator))]
    auth, keys = answered(CHAP_R="0x" + "11" * 16)
    texts.append(str(wrong(auth, **keys)))
    for text in texts + [caplog.text]:
        assert SECRET not in text and TSECRET not in text


# -- initiator side and round trips ------------------------------------------------------------
def run_login(initiator: ChapInitiatorAuth, target: ChapTargetAuth) -> None:
    """Drive both sides the way login PDUs carry the keys."""
    request = dict(initiator.start())
    answer, done = target.step(request)
    while True:
        request_pairs, ready = initiator.step(dict(answer))
        if not request_pairs:
            break
        answer, done = target.step(dict(request_pairs))
        if done:
            initiator.step(dict(answer))
            break
    assert target.done and initiator.complete


@pytest.mark.parametrize("algorithms", [(MD5,), (SHA256, MD5), (SHA3_256,), (SHA1,)])
@pytest.mark.parametrize("mutual", [False, True])
def test_round_trip(algorithms, mutual):
    target = ChapTargetAuth((USER, SECRET), (TUSER, TSECRET) if mutual else None)
    initiator = ChapInitiatorAuth((USER, SECRET), (TUSER, TSECRET) if mutual else None, algorithms=algorithms)
    run_login(initiator, target)


def test_initiator_offers():
    assert ChapInitiatorAuth(None).start() == [("AuthMethod", "None")]
    assert ChapInitiatorAuth((USER, SECRET)).start() == [("AuthMethod", "CHAP,None")]
    assert ChapInitiatorAuth((USER, SECRET), (TUSER, TSECRET)).start() == [("AuthMethod", "CHAP")]


def test_initiator_answers_challenge():
    initiator = ChapInitiatorAuth((USER, SECRET))
    initiator.start()
    assert initiator.step({"AuthMethod": "CHAP"}) == ([("CHAP_A", "5")], False)
    answer, ready = initiator.step({"CHAP_A": "5", "CHAP_I": "200", "CHAP_C": "0x0102"})
    assert ready and initiator.complete
    assert dict(answer) == {"CHAP_N": USER, "CHAP_R": "0x" + md5(bytes([200]), SECRET.encode(), b"\x01\x02").hex()}


def test_initiator_detects_bad_target_proof():
    initiator = ChapInitiatorAuth((USER, SECRET), (TUSER, TSECRET), rng=FixedRng())
    initiator.start()
    initiator.step({"AuthMethod": "CHAP"})
    initiator.step({"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x0102"})
    assert not initiator.complete
    with fails(0x01):
        initiator.step({"CHAP_N": TUSER, "CHAP_R": "0x" + md5(b"\x07", b"not-the-secret", b"\xa5" * 16).hex()})
    assert not initiator.complete


def test_initiator_demands_mutual():
    initiator = ChapInitiatorAuth((USER, SECRET), (TUSER, TSECRET), rng=FixedRng())
    initiator.start()
    with fails(0x01):
        initiator.step({"AuthMethod": "None"})


def test_initiator_refuses_algorithm_not_offered():
    initiator = ChapInitiatorAuth((USER, SECRET))
    initiator.start()
    initiator.step({"AuthMethod": "CHAP"})
    with fails(0x01):
        initiator.step({"CHAP_A": "7", "CHAP_I": "1", "CHAP_C": "0x0102"})


def test_an_initiators_own_secret_is_derived_from_the_targets_and_its_name():
    """``initiator_secret``: HMAC-SHA256(secret, "shoal-chap-initiator" NUL name), base64url without padding.
    Checked against hmac/hashlib directly; one per name, never the secret itself, and long enough."""
    import hmac as _hmac

    from node_agent.iscsi.chap import initiator_secret

    x, y = "iqn.2026-11.io.shoal.test:node-x", "iqn.2026-11.io.shoal.test:node-y"
    expected = base64.urlsafe_b64encode(_hmac.new(SECRET.encode(), b"shoal-chap-initiator\0" + x.encode(),
                                                  hashlib.sha256).digest()).rstrip(b"=").decode()
    assert initiator_secret(SECRET, x) == expected and len(expected) == 43
    assert len({initiator_secret(SECRET, x), initiator_secret(SECRET, y), SECRET,
                initiator_secret("another-secret-1", x)}) == 4
