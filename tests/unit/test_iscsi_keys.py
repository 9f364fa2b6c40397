"""Login/text keys and their negotiation (RFC 7143 §6, §12, §13), both sides, no I/O."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from node_agent.iscsi import keys as keys_module
from node_agent.iscsi.keys import (
    KEY_TABLE, InitiatorNegotiator, InitiatorSettings, NegotiationError, SessionParams, TargetNegotiator,
    TargetSettings, decode_binary, encode_hex, encode_text, format_target_address, parse_number, parse_text,
    send_targets_response, split_security,
)

IQN_I = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
IQN_T = "iqn.2024-01.org.shoal:disk0"

# What libiscsi sends in its operational-stage Login Request (lib/login.c, iscsi_login_async).
LIBISCSI_OPNEG = [
    ("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"),
    ("OFMarker", "No"), ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
]


def target(**settings) -> TargetNegotiator:
    session_type = settings.pop("session_type", "Normal")
    leading = settings.pop("leading", True)
    return TargetNegotiator(TargetSettings(**settings), leading=leading, session_type=session_type)


def answer(key: str, value: str, **settings) -> str | None:
    return dict(target(**settings).operational([(key, value)])).get(key)


def status(error: pytest.ExceptionInfo) -> tuple[int, int]:
    return (error.value.status_class, error.value.status_detail)


# -- text format (§6.1) ---------------------------------------------------------------------------
def test_parse_golden():
    data = b"InitiatorName=iqn.2007-10.com.github:sahlberg\x00SessionType=Normal\x00AuthMethod=CHAP,None\x00"
    assert parse_text(data) == [("InitiatorName", "iqn.2007-10.com.github:sahlberg"),
                                ("SessionType", "Normal"), ("AuthMethod", "CHAP,None")]


def test_encode_golden():
    assert encode_text([("HeaderDigest", "None"), ("MaxRecvDataSegmentLength", "262144")]) == (
        b"HeaderDigest=None\x00MaxRecvDataSegmentLength=262144\x00")


def test_parse_edge_cases():
    assert parse_text(b"") == []
    assert parse_text(b"\x00\x00") == []
    assert parse_text(b"A=b\x00\x00\x00") == [("A", "b")]          # trailing padding tolerated
    assert parse_text(b"CHAP_R=0bAAEC==\x00") == [("CHAP_R", "0bAAEC==")]  # '=' inside a value
    assert parse_text(b"SendTargets=\x00") == [("SendTargets", "")]
    assert parse_text(b"A=1\x00A=2\x00") == [("A", "1"), ("A", "2")]  # duplicates are the negotiator's call
    assert parse_text("TargetAlias=Plattenspieler-ü\x00".encode()) == [("TargetAlias", "Plattenspieler-ü")]
    assert parse_text(b"iSCSIProtocolLevel=1\x00") == [("iSCSIProtocolLevel", "1")]
    assert parse_text(b"X#NodeArchitecture=Linux\x00") == [("X#NodeArchitecture", "Linux")]


@pytest.mark.parametrize("data", [
    b"NoEquals\x00", b"=value\x00", b"A=b", b"A=b\x00C=d", b"A=\xff\xfe\x00", b"K\xffey=v\x00",
    b"A=b\x00\x00C=d\x00", b"Bad Key=v\x00", b"K" * 64 + b"=v\x00", b"A=" + b"v" * 256 + b"\x00",
    b"CHAP_C=0x" + b"0" * 8192 + b"\x00",
])
def test_parse_rejects_malformed(data):
    with pytest.raises(NegotiationError) as error:
        parse_text(data)
    assert status(error) == (0x02, 0x00)


def test_length_limits():
    assert parse_text(b"K" * 63 + b"=v\x00")[0][0] == "K" * 63
    assert len(parse_text(b"A=" + b"v" * 255 + b"\x00")[0][1]) == 255
    big = "0x" + "ab" * 4095
    assert parse_text(b"CHAP_C=" + big.encode() + b"\x00") == [("CHAP_C", big)]


@pytest.mark.parametrize("pairs", [[("A", "b\x00c")], [("Bad Key", "v")], [("", "v")], [("A", "v" * 256)]])
def test_encode_rejects(pairs):
    with pytest.raises(ValueError):
        encode_text(pairs)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_parse_raises_only_negotiation_errors(data):
    try:
        pairs = parse_text(data)
    except NegotiationError:
        return
    for key, value in pairs:
        assert isinstance(key, str) and isinstance(value, str)


_key = st.text(alphabet="ABCXYZabcxyz0189.-+@_#", min_size=1, max_size=63)
_value = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_key, _value), max_size=12))
def test_round_trip(pairs):
    assert parse_text(encode_text(pairs)) == pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(KEY_TABLE)), _value), max_size=8), st.booleans(),
       st.sampled_from(["Normal", "Discovery"]))
def test_fuzz_negotiator_raises_only_negotiation_errors(pairs, leading, session_type):
    negotiator = TargetNegotiator(TargetSettings(), leading=leading, session_type=session_type)
    try:
        for key, value in negotiator.operational(pairs) + negotiator.pending_offers():
            assert value != "" or key in ("TargetAlias",)
        negotiator.params()
    except NegotiationError:
        pass


# -- value encodings (§6.1) -------------------------------------------------------------------------
@pytest.mark.parametrize("text, number", [("0", 0), ("262144", 262144), ("0x40000", 262144), ("0XfF", 255),
                                          (str(2**64 - 1), 2**64 - 1)])
def test_parse_number(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize("text", ["", "-1", "01", "1.5", "0x", "abc", " 1", str(2**64), "0b01", "1e3"])
def test_parse_number_rejects(text):
    with pytest.raises(ValueError):
        parse_number(text)


def test_binary_values():
    assert decode_binary("0x0102ff") == b"\x01\x02\xff"
    assert decode_binary("0X102") == b"\x01\x02"       # odd digit count: implied leading zero
    assert decode_binary("0bAQL/") == b"\x01\x02\xff"
    assert decode_binary("0BAQL/") == b"\x01\x02\xff"
    assert encode_hex(b"\x01\xab") == "0x01ab"
    for bad in ("0x", "0xGG", "0b*", "0bAQ", "123", "", "0x 1"):
        with pytest.raises(ValueError):
            decode_binary(bad)


# -- the key table (§12, §13) ------------------------------------------------------------------------
RFC7143_SECTION_13 = [
    "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName", "InitiatorName",
    "TargetAlias", "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
    "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType",
    "TaskReporting", "iSCSIProtocolLevel", "IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt",
    "X#NodeArchitecture",
]
RFC7143_SECTION_12 = ["AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"]


def test_table_has_every_key():
    for name in RFC7143_SECTION_13 + RFC7143_SECTION_12:
        assert name in KEY_TABLE, name
        assert KEY_TABLE[name].name == name


@pytest.mark.parametrize("name, kind, default, scope, phase", [
    ("HeaderDigest", "list", "None", "CO", "IO"), ("DataDigest", "list", "None", "CO", "IO"),
    ("MaxConnections", "number_min", 1, "SW", "LO"), ("InitialR2T", "bool_or", True, "SW", "LO"),
    ("ImmediateData", "bool_and", True, "SW", "LO"),
    ("MaxRecvDataSegmentLength", "declarative", 8192, "CO", "ALL"),
    ("MaxBurstLength", "number_min", 262144, "SW", "LO"), ("FirstBurstLength", "number_min", 65536, "SW", "LO"),
    ("DefaultTime2Wait", "number_max", 2, "SW", "LO"), ("DefaultTime2Retain", "number_min", 20, "SW", "LO"),
    ("MaxOutstandingR2T", "number_min", 1, "SW", "LO"), ("DataPDUInOrder", "bool_or", True, "SW", "LO"),
    ("DataSequenceInOrder", "bool_or", True, "SW", "LO"), ("ErrorRecoveryLevel", "number_min", 0, "SW", "LO"),
    ("SessionType", "declarative", "Normal", "SW", "LO"), ("TaskReporting", "list", "RFC3720", "SW", "LO"),
])
def test_table_rules_match_rfc7143(name, kind, default, scope, phase):
    rule = KEY_TABLE[name]
    assert (rule.kind, rule.default, rule.scope, rule.phase) == (kind, default, scope, phase)
    assert rule.section


@pytest.mark.parametrize("name, low, high", [
    ("MaxConnections", 1, 65535), ("MaxRecvDataSegmentLength", 512, 2**24 - 1),
    ("MaxBurstLength", 512, 2**24 - 1), ("FirstBurstLength", 512, 2**24 - 1), ("DefaultTime2Wait", 0, 3600),
    ("DefaultTime2Retain", 0, 3600), ("MaxOutstandingR2T", 1, 65535), ("ErrorRecoveryLevel", 0, 2),
    ("TargetPortalGroupTag", 0, 65535), ("iSCSIProtocolLevel", 0, 31),
])
def test_table_ranges(name, low, high):
    assert (KEY_TABLE[name].low, KEY_TABLE[name].high) == (low, high)


def test_defaults_agree_with_session_params():
    params = SessionParams()
    for rule in KEY_TABLE.values():
        if rule.param and rule.default is not None:
            expected = rule.default == "CRC32C" if rule.name.endswith("Digest") else rule.default
            assert getattr(params, rule.param) == expected, rule.name
        if rule.low is not None and rule.default is not None:
            assert rule.low <= rule.default <= rule.high


def test_every_key_gets_an_answer_of_its_kind():
    """Each key of the table, offered with a valid value by the initiator in a Normal session."""
    sample = {"bool_and": "Yes", "bool_or": "No", "number_min": "1", "number_max": "3", "list": "None"}
    for name, rule in KEY_TABLE.items():
        negotiator = target()
        value = sample.get(rule.kind, "x")
        if name == "TaskReporting":
            value = "RFC3720"
        if name in ("MaxBurstLength", "FirstBurstLength"):
            value = "4096"
        if rule.kind == "security":
            with pytest.raises(NegotiationError):
                negotiator.operational([(name, value)])
            continue
        if "I" not in rule.senders:
            with pytest.raises(NegotiationError) as error:
                negotiator.operational([(name, value)])
            assert status(error) == (0x02, 0x00)
            continue
        if name == "SessionType":
            value = "Normal"
        if rule.value_type == "number":
            value = "4096"
        got = dict(negotiator.operational([(name, value)])).get(name)
        expected = {
            "bool_and": {"RDMAExtensions": "No"}.get(name, "Yes"),
            "bool_or": {"InitialR2T": "No", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes"}.get(name),
            "number_min": {"ErrorRecoveryLevel": "0"}.get(name, "4096" if "Burst" in name else "1"),
            "number_max": "3", "list": {"TaskReporting": "RFC3720"}.get(name, "None"),
            "obsolete": "Reject", "irrelevant": "Irrelevant", "inquiry": "Irrelevant",
        }.get(rule.kind)
        if rule.kind == "declarative":
            assert got is None or name == "MaxRecvDataSegmentLength", name
        else:
            assert got == expected, (name, got)


# -- negotiation rules (§6.2) -------------------------------------------------------------------
@pytest.mark.parametrize("key, offer, local, expected", [
    ("MaxBurstLength", "2097152", {"max_burst_length": 1048576}, "1048576"),   # min: ours smaller
    ("MaxBurstLength", "65536", {"max_burst_length": 1048576}, "65536"),       # min: theirs smaller
    ("ErrorRecoveryLevel", "2", {}, "0"),
    ("MaxConnections", "8", {"max_connections": 4}, "4"),
    ("MaxOutstandingR2T", "16", {"max_outstanding_r2t": 4}, "4"),
    ("DefaultTime2Retain", "0", {}, "0"),
    ("DefaultTime2Wait", "0", {"default_time2wait": 2}, "2"),                  # max
    ("DefaultTime2Wait", "10", {"default_time2wait": 2}, "10"),
    ("DefaultTime2Wait", "0x0a", {"default_time2wait": 2}, "10"),              # hex-constant accepted
    ("ImmediateData", "Yes", {"immediate_data": True}, "Yes"),                # AND
    ("ImmediateData", "Yes", {"immediate_data": False}, "No"),
    ("ImmediateData", "No", {"immediate_data": True}, "No"),
    ("InitialR2T", "No", {"initial_r2t": False}, "No"),                        # OR
    ("InitialR2T", "No", {"initial_r2t": True}, "Yes"),
    ("InitialR2T", "Yes", {"initial_r2t": False}, "Yes"),
    ("DataPDUInOrder", "No", {"data_pdu_in_order": False}, "No"),
    ("DataSequenceInOrder", "No", {}, "Yes"),
    ("HeaderDigest", "CRC32C,None", {}, "CRC32C"),                             # list: first offered we support
    ("HeaderDigest", "None,CRC32C", {}, "None"),
    ("HeaderDigest", "CRC32C", {"header_digest": ("None",)}, "Reject"),
    ("DataDigest", "MD5,CRC32C", {}, "CRC32C"),                                # unknown values skipped
    ("TaskReporting", "FastAbort,RFC3720", {}, "RFC3720"),
    ("TaskReporting", "FastAbort", {}, "Reject"),
    ("iSCSIProtocolLevel", "2", {}, "1"),
    ("RDMAExtensions", "Yes", {}, "No"),
])
def test_negotiation_rule(key, offer, local, expected):
    assert answer(key, offer, **local) == expected


@pytest.mark.parametrize("key, offer", [("DataDigest", "None"), ("HeaderDigest", "MD5,None")])
def test_a_target_requiring_digests_fails_a_login_without_them(key, offer):
    """``shoal target --data-digest CRC32C``: Reject would leave the key at its default None, which the
    target does not accept either, so the login fails (an initiator error, §11.13.5)."""
    with pytest.raises(NegotiationError, match=key) as error:
        answer(key, offer, header_digest=("CRC32C",), data_digest=("CRC32C",))
    assert status(error) == (2, 0)


@pytest.mark.parametrize("key, offer", [
    ("MaxBurstLength", "511"), ("MaxBurstLength", "16777216"), ("MaxBurstLength", "lots"),
    ("MaxBurstLength", "-1"), ("MaxBurstLength", "0262144"), ("ErrorRecoveryLevel", "3"),
    ("MaxConnections", "0"), ("DefaultTime2Wait", "3601"), ("ImmediateData", "yes"), ("InitialR2T", "True"),
    ("HeaderDigest", ""), ("HeaderDigest", "CRC32C,,None"), ("iSCSIProtocolLevel", "32"),
])
def test_bad_values_are_rejected(key, offer):
    negotiator = target()
    assert dict(negotiator.operational([(key, offer)]))[key] == "Reject"
    assert getattr(negotiator.params(), KEY_TABLE[key].param) == getattr(SessionParams(), KEY_TABLE[key].param)


@pytest.mark.parametrize("key", ["X-com.example.Foo", "X#Bar", "Unknown", "sENDtARGETS", "MaxBurstLengthX"])
def test_unknown_keys_not_understood(key):
    assert answer(key, "whatever") == "NotUnderstood"


@pytest.mark.parametrize("key, value", [("IFMarker", "No"), ("OFMarker", "Yes"), ("IFMarkInt", "2048"),
                                        ("OFMarkInt", "1~65535")])
def test_obsolete_marker_keys_rejected(key, value):
    """§13.25: SHOULD answer Reject, MUST NOT answer NotUnderstood."""
    assert answer(key, value) == "Reject"


def test_send_targets_in_login_irrelevant():
    assert answer("SendTargets", "All") == "Irrelevant"


def test_first_burst_irrelevant_when_initial_r2t_and_no_immediate_data():
    """§13.14, order-independent within one request."""
    negotiator = target(initial_r2t=True, immediate_data=False)
    response = dict(negotiator.operational([("FirstBurstLength", "65536"), ("InitialR2T", "Yes"),
                                            ("ImmediateData", "No")]))
    assert response == {"FirstBurstLength": "Irrelevant", "InitialR2T": "Yes", "ImmediateData": "No",
                        "MaxRecvDataSegmentLength": "262144"}


def test_first_burst_never_exceeds_max_burst():
    negotiator = target(max_burst_length=1048576, first_burst_length=1048576)
    response = dict(negotiator.operational([("FirstBurstLength", "1048576"), ("MaxBurstLength", "131072")]))
    assert response["MaxBurstLength"] == "131072"
    assert response["FirstBurstLength"] == "131072"
    params = negotiator.params()
    assert params.first_burst_length <= params.max_burst_length


def test_response_keeps_request_order_and_declares_mrdsl_once():
    negotiator = target(max_recv_data_segment_length=65536)
    first = negotiator.operational([("MaxBurstLength", "65536"), ("ImmediateData", "Yes")])
    assert [k for k, _ in first] == ["MaxBurstLength", "ImmediateData", "MaxRecvDataSegmentLength"]
    assert dict(first)["MaxRecvDataSegmentLength"] == "65536"
    assert negotiator.operational([("DataDigest", "None")]) == [("DataDigest", "None")]


def test_mrdsl_is_declarative_both_ways():
    negotiator = target(max_recv_data_segment_length=262144)
    response = negotiator.operational([("MaxRecvDataSegmentLength", "16384")])
    assert response == [("MaxRecvDataSegmentLength", "262144")]
    params = negotiator.params()
    assert params.max_recv_data_segment_length == 262144
    assert params.max_xmit_data_segment_length == 16384


@pytest.mark.parametrize("value", ["511", "16777216", "big"])
def test_bad_mrdsl_is_an_initiator_error(value):
    with pytest.raises(NegotiationError) as error:
        target().operational([("MaxRecvDataSegmentLength", value)])
    assert status(error) == (0x02, 0x00)


def test_target_alias_declared_in_normal_sessions_only():
    normal = TargetNegotiator(TargetSettings(target_alias="disk zero"), leading=True, session_type="Normal")
    assert ("TargetAlias", "disk zero") in normal.operational([("ImmediateData", "Yes")])
    discovery = TargetNegotiator(TargetSettings(target_alias="disk zero"), leading=True, session_type="Discovery")
    assert all(k != "TargetAlias" for k, _ in discovery.operational([("HeaderDigest", "None")]))


# -- protocol errors --------------------------------------------------------------------------------
def test_duplicate_key_in_one_request():
    with pytest.raises(NegotiationError) as error:
        target().operational([("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")])
    assert status(error) == (0x02, 0x00)


def test_renegotiation_across_requests():
    """§6.2: a key negotiated twice in one login is an initiator error."""
    negotiator = target()
    negotiator.operational([("MaxBurstLength", "65536")])
    with pytest.raises(NegotiationError) as error:
        negotiator.operational([("MaxBurstLength", "131072")])
    assert status(error) == (0x02, 0x00)


def test_identical_repeat_gets_the_same_answer():
    """libiscsi repeats all its keys in every operational-stage request (lib/login.c)."""
    negotiator = target()
    first = negotiator.operational(LIBISCSI_OPNEG)
    again = negotiator.operational(LIBISCSI_OPNEG)
    assert again == [pair for pair in first if pair[0] != "MaxRecvDataSegmentLength"]


def test_leading_only_key_on_non_leading_connection():
    negotiator = target(leading=False)
    assert negotiator.operational([("HeaderDigest", "None")]) == [
        ("HeaderDigest", "None"), ("MaxRecvDataSegmentLength", "262144")]
    with pytest.raises(NegotiationError) as error:
        target(leading=False).operational([("MaxBurstLength", "65536")])
    assert status(error) == (0x02, 0x00)


def test_non_leading_connection_inherits_session_values():
    leading = target()
    leading.operational(LIBISCSI_OPNEG)
    session = leading.params()
    second = TargetNegotiator(TargetSettings(), leading=False, session_type="Normal", session=session)
    second.operational([("HeaderDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "8192")])
    params = second.params()
    assert params.initial_r2t is False and params.default_time2retain == 0
    assert params.header_digest is True and params.max_xmit_data_segment_length == 8192


@pytest.mark.parametrize("key", ["AuthMethod", "CHAP_A", "CHAP_R", "SRP_U"])
def test_security_keys_outside_security_exchange(key):
    with pytest.raises(NegotiationError):
        target().operational([(key, "5")])


@pytest.mark.parametrize("key", ["TargetAlias", "TargetAddress", "TargetPortalGroupTag"])
def test_target_only_keys_from_initiator(key):
    with pytest.raises(NegotiationError) as error:
        target().operational([(key, "1")])
    assert status(error) == (0x02, 0x00)


def test_session_type():
    negotiator = TargetNegotiator(TargetSettings(), leading=True, session_type=None)
    negotiator.operational([("SessionType", "Discovery"), ("InitiatorName", IQN_I)])
    params = negotiator.params()
    assert params.session_type == "Discovery" and params.initiator_name == IQN_I
    with pytest.raises(NegotiationError) as error:
        TargetNegotiator(TargetSettings(), session_type=None).operational([("SessionType", "Boot")])
    assert status(error) == (0x02, 0x09)


def test_discovery_session_answers_irrelevant():
    negotiator = target(session_type="Discovery")
    response = dict(negotiator.operational(LIBISCSI_OPNEG))
    for key in ("InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                "MaxOutstandingR2T", "MaxConnections", "DataPDUInOrder", "DataSequenceInOrder"):
        assert response[key] == "Irrelevant", key
    # Recovery keys are answered in Discovery too: open-iscsi's iscsiadm refuses
    # "ErrorRecoveryLevel=Irrelevant" and gives up discovery (seen with the kernel guest test).
    assert response["ErrorRecoveryLevel"] == "0"
    assert response["DefaultTime2Wait"] == "2" and response["DefaultTime2Retain"] == "0"
    assert response["HeaderDigest"] == "None" and response["MaxRecvDataSegmentLength"] == "262144"
    assert negotiator.pending_offers() == []
    assert negotiator.params() == dataclasses.replace(
        SessionParams(), session_type="Discovery", max_recv_data_segment_length=262144,
        max_xmit_data_segment_length=262144, default_time2retain=0)


# -- real initiators' requests ----------------------------------------------------------------------
def test_libiscsi_operational_request():
    negotiator = target()
    response = negotiator.operational(LIBISCSI_OPNEG)
    assert response == [
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"), ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"),
        ("IFMarker", "Reject"), ("OFMarker", "Reject"), ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
    ]
    assert negotiator.pending_offers() == [] and negotiator.ready  # transit at once
    params = negotiator.params()
    assert (params.initial_r2t, params.immediate_data, params.max_burst_length, params.first_burst_length) == (
        False, True, 262144, 262144)
    assert params.max_xmit_data_segment_length == 262144 and params.default_time2retain == 0


def test_open_iscsi_style_request():
    """iscsid offers digests as lists, large bursts, and ErrorRecoveryLevel=0."""
    negotiator = target()
    response = dict(negotiator.operational([
        ("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C,None"), ("MaxRecvDataSegmentLength", "262144"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"), ("MaxConnections", "1"), ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"),
    ]))
    assert response["HeaderDigest"] == "CRC32C" and response["MaxBurstLength"] == "1048576"
    params = negotiator.params()
    assert params.header_digest and params.data_digest and params.max_burst_length == 1048576


# -- target offers (§6.2: the target may offer keys) --------------------------------------------------
def test_target_offers_what_it_needs_once():
    negotiator = target()
    assert negotiator.operational([("HeaderDigest", "None")])  # initiator sent almost nothing
    offers = negotiator.pending_offers()
    assert offers == [("InitialR2T", "No"), ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144")]
    assert negotiator.awaiting == {"InitialR2T", "MaxBurstLength", "FirstBurstLength"}
    assert not negotiator.ready
    assert negotiator.pending_offers() == []  # never offered twice
    assert negotiator.operational([("InitialR2T", "No"), ("MaxBurstLength", "524288"),
                                   ("FirstBurstLength", "Irrelevant")]) == []
    assert negotiator.ready
    params = negotiator.params()
    assert (params.initial_r2t, params.max_burst_length, params.first_burst_length) == (False, 524288, 65536)


def test_target_offers_stricter_than_default():
    negotiator = target(max_burst_length=131072, first_burst_length=65536, immediate_data=False,
                        max_recv_data_segment_length=4096)
    offers = dict(negotiator.pending_offers())
    assert offers["MaxRecvDataSegmentLength"] == "4096"  # below the 8192 the initiator would assume
    assert offers["MaxBurstLength"] == "131072" and offers["ImmediateData"] == "No"


@pytest.mark.parametrize("key, bad", [("MaxBurstLength", "2097152"), ("ImmediateData", "Yes"),
                                      ("MaxBurstLength", "x"), ("InitialR2T", "Maybe")])
def test_answers_to_our_offers_must_obey_the_rule(key, bad):
    """Under AND an offered No can only come back No; under min the answer may not grow (§6.2)."""
    negotiator = target(immediate_data=False)
    negotiator.operational([("HeaderDigest", "None")])
    negotiator.pending_offers()
    with pytest.raises(NegotiationError):
        negotiator.operational([(key, bad)])


def test_offers_not_needed_when_defaults_suit():
    negotiator = target(max_burst_length=262144, first_burst_length=65536, initial_r2t=True)
    assert negotiator.pending_offers() == []


# -- initiator side and round trips ----------------------------------------------------------------
def run_login(initiator: InitiatorNegotiator, tgt: TargetNegotiator) -> None:
    answers = initiator.response(tgt.operational(initiator.offers()))
    offers = tgt.pending_offers()
    answers += initiator.response(offers)
    if answers:
        assert tgt.operational(answers) == []
    assert tgt.ready and initiator.ready


@pytest.mark.parametrize("initiator_settings, target_settings", [
    ({}, {}),
    ({"max_burst_length": 65536, "first_burst_length": 8192, "header_digest": ("CRC32C", "None")},
     {"max_recv_data_segment_length": 8192}),
    ({"initial_r2t": True, "immediate_data": False}, {"initial_r2t": True}),
    ({"max_recv_data_segment_length": 4096, "error_recovery_level": 2}, {"default_time2wait": 5}),
])
def test_round_trip_both_sides_agree(initiator_settings, target_settings):
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T, **initiator_settings))
    tgt = TargetNegotiator(TargetSettings(**target_settings), leading=True, session_type="Normal")
    assert initiator.response(tgt.operational(initiator.login_keys())) == []
    run_login(initiator, tgt)
    mine, theirs = initiator.params(), tgt.params()
    assert mine.max_xmit_data_segment_length == theirs.max_recv_data_segment_length
    assert theirs.max_xmit_data_segment_length == mine.max_recv_data_segment_length
    for field in ("header_digest", "data_digest", "initial_r2t", "immediate_data", "max_burst_length",
                  "first_burst_length", "default_time2wait", "default_time2retain", "max_outstanding_r2t",
                  "error_recovery_level", "max_connections", "data_pdu_in_order", "data_sequence_in_order"):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert theirs.initiator_name == IQN_I and theirs.target_name == IQN_T


def test_initiator_answers_target_offers():
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T, max_burst_length=65536))
    assert initiator.response([("MaxBurstLength", "1048576"), ("InitialR2T", "No"), ("X-vendor", "1"),
                               ("IFMarker", "No")]) == [
        ("MaxBurstLength", "65536"), ("InitialR2T", "No"), ("X-vendor", "NotUnderstood"), ("IFMarker", "Reject")]


def test_initiator_checks_target_answers():
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T, max_burst_length=65536))
    initiator.offers()
    with pytest.raises(NegotiationError):
        initiator.response([("MaxBurstLength", "131072")])  # more than we offered under a min rule
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T))
    initiator.offers()
    with pytest.raises(NegotiationError):
        initiator.response([("HeaderDigest", "CRC32C")])   # not among our offered values


@pytest.mark.parametrize("offer, target_supports, outcome", [
    (("CRC32C",), ("None",), None),                 # insisted on digests, refused: the login must fail
    (("CRC32C", "None"), ("None",), False),         # preferred them: the target's choice, None, stands
    (("CRC32C",), ("CRC32C", "None"), True),
])
def test_initiator_insisting_on_digests_ends_a_login_without_them(offer, target_supports, outcome):
    """A Reject leaves a list key at its default (None for digests, §13.1); an initiator that did not
    offer the default ends the login instead of going on without what it insisted on."""
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T, header_digest=offer, data_digest=offer))
    tgt = TargetNegotiator(TargetSettings(header_digest=target_supports, data_digest=target_supports),
                           leading=True, session_type="Normal")
    if outcome is None:
        with pytest.raises(NegotiationError, match="Digest") as refused:
            run_login(initiator, tgt)
        # what to do is in the message: offer the default as well, or turn digests on at the peer
        assert "offer CRC32C,None to go on without it, or turn it on at the peer" in str(refused.value)
        return
    run_login(initiator, tgt)
    assert initiator.params().header_digest is outcome and tgt.params().data_digest is outcome


def test_initiator_records_target_declarations():
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, IQN_T))
    initiator.offers()
    initiator.response([("TargetPortalGroupTag", "1"), ("TargetAlias", "disk"),
                        ("MaxRecvDataSegmentLength", "65536"), ("FirstBurstLength", "Irrelevant")])
    params = initiator.params()
    assert (params.target_portal_group_tag, params.target_alias, params.max_xmit_data_segment_length) == (
        1, "disk", 65536)
    assert params.first_burst_length == 65536  # Irrelevant: the default stays


def test_initiator_discovery_offers_only_relevant_keys():
    initiator = InitiatorNegotiator(InitiatorSettings(IQN_I, session_type="Discovery"))
    assert initiator.login_keys() == [("InitiatorName", IQN_I), ("SessionType", "Discovery")]
    assert sorted(k for k, _ in initiator.offers()) == sorted([
        "HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength", "DefaultTime2Wait", "DefaultTime2Retain",
        "ErrorRecoveryLevel"])


def test_initiator_login_keys():
    settings = InitiatorSettings(IQN_I, IQN_T, initiator_alias="host-a")
    assert InitiatorNegotiator(settings).login_keys() == [
        ("InitiatorName", IQN_I), ("InitiatorAlias", "host-a"), ("TargetName", IQN_T), ("SessionType", "Normal")]
    with pytest.raises(ValueError):
        InitiatorNegotiator(InitiatorSettings(IQN_I)).login_keys()


# -- full feature phase text, SendTargets (§13.3) --------------------------------------------------
def test_full_feature_text():
    negotiator = target()
    negotiator.operational(LIBISCSI_OPNEG)
    response = negotiator.full_feature_text([("SendTargets", "All"), ("MaxRecvDataSegmentLength", "65536"),
                                             ("MaxBurstLength", "4096"), ("X-foo", "1"), ("IFMarkInt", "1")])
    assert response == [("MaxBurstLength", "Reject"), ("X-foo", "NotUnderstood"), ("IFMarkInt", "Reject")]
    assert negotiator.params().max_xmit_data_segment_length == 65536


TARGETS = {IQN_T: ["127.0.0.1:3260,1"], "iqn.2024-01.org.shoal:disk1": ["127.0.0.1:3260,1", "[::1]:3260,1"]}


def test_send_targets_all():
    assert send_targets_response("All", TARGETS) == [
        ("TargetName", IQN_T), ("TargetAddress", "127.0.0.1:3260,1"),
        ("TargetName", "iqn.2024-01.org.shoal:disk1"), ("TargetAddress", "127.0.0.1:3260,1"),
        ("TargetAddress", "[::1]:3260,1")]
    encode_text(send_targets_response("All", TARGETS))


def test_send_targets_by_name_and_current():
    assert send_targets_response(IQN_T, TARGETS) == [("TargetName", IQN_T), ("TargetAddress", "127.0.0.1:3260,1")]
    assert send_targets_response("iqn.2024-01.org.shoal:nope", TARGETS) == []
    assert send_targets_response("", TARGETS, current_target=IQN_T)[0] == ("TargetName", IQN_T)
    assert send_targets_response("", TARGETS) == [("SendTargets", "Reject")]


@pytest.mark.parametrize("value", ["Alle", "A", "all", "iqn.bad"])
def test_send_targets_bad_values_rejected(value):
    """libiscsi's iSCSISendTargets.Invalid test expects these to fail."""
    assert send_targets_response(value, TARGETS) == [("SendTargets", "Reject")]


def test_format_target_address():
    assert format_target_address("127.0.0.1", 3260, 1) == "127.0.0.1:3260,1"
    assert format_target_address("::1", 3261, 2) == "[::1]:3261,2"
    assert format_target_address("host.example", 3260, 1) == "host.example:3260,1"


def test_split_security():
    pairs = [("InitiatorName", IQN_I), ("AuthMethod", "CHAP,None"), ("HeaderDigest", "None"), ("CHAP_A", "5")]
    assert split_security(pairs) == ([("AuthMethod", "CHAP,None"), ("CHAP_A", "5")],
                                     [("InitiatorName", IQN_I), ("HeaderDigest", "None")])


# -- purity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["keys.py", "chap.py"])
def test_modules_do_no_io(module):
    """Sans-I/O: neither module imports sockets, asyncio, threads, files or processes."""
    source = (pathlib.Path(keys_module.__file__).parent / module).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "asyncio", "threading", "subprocess", "os", "io", "selectors"}
