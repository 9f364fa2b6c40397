"""Login keys, Text exchanges and SendTargets, from a review against RFC 7143 (each case was reproduced first).

- The target offered its own FirstBurstLength without regard to the MaxBurstLength just agreed, and clamped
  the answer in silence: the initiator believed in a first burst the target then refused (§13.14).  Offers
  keep within the burst the session can have, on both sides, and an answer above it fails the login.
- A Text Request with F=0 was answered with F=1 (§11.11.1: a protocol error); it now gets F=0 and a Target
  Transfer Tag, and the exchange ends with the answer to a request with F=1.
- SendTargets reported only the portal the initiator had reached; every portal of the group is reported
  (Appendix C), and a wildcard IPv6 portal reports an IPv4 initiator its IPv4 address, not ::ffff:a.b.c.d.
- TargetPortalGroupTag was missing from the login of a connection added to a session (§13.9: "IO").
- A login whose answer took more than the 8192 bytes the initiator takes during login (§13.12) got it in one
  oversized Login Response; it is refused with Out of Resources instead.
- A request continuing a long Text Response with another Initiator Task Tag was served (§11.10.3).
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from node_agent.iscsi import pdu as P
from node_agent.iscsi.connection import ConnectionSettings, TargetConnection
from node_agent.iscsi.initiator.client import discover
from node_agent.iscsi.keys import (InitiatorNegotiator, InitiatorSettings, NegotiationError, TargetSettings,
                                   encode_text, parse_text)
from node_agent.iscsi.pdu import Opcode, RejectReason
from node_agent.iscsi.server import PortalServer
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import LunMap
from tests.protocol.conftest import INITIATOR, TARGET, FakeClock, Initiator, keys_of, make_registry
from tests.protocol.test_target_core import WRITE10, rw10

NORMAL = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
          ("HeaderDigest", "None"), ("DataDigest", "None")]
DISCOVERY = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]


def initiator(registry=None, settings=None, local=("127.0.0.1", 3260), **kwargs) -> Initiator:
    conn = TargetConnection(registry or make_registry(), settings or TargetSettings(), local_address=local,
                            peer="test", config=ConnectionSettings(), clock=FakeClock())
    return Initiator(conn, **kwargs)


def login_pdu(ini: Initiator, data: bytes, *, csg: int = 1, transit: bool = True, cont: bool = False,
              itt: int | None = None, cid: int = 0):
    """One Login Request (stage ``csg``, NSG full feature phase when ``transit``) and its answer."""
    ini.send(Opcode.LOGIN_REQUEST, data, immediate=True, transit=transit, cont=cont, csg=csg, nsg=3 if transit else 0,
             isid=ini.isid, tsih=ini.tsih, itt=itt or ini.next_itt(), cid=cid, cmdsn=ini.cmdsn, expstatsn=0,
             digests=False)
    [reply] = ini.receive()
    assert reply.opcode == Opcode.LOGIN_RESPONSE
    return reply


def text(ini: Initiator, data: bytes, *, itt: int, ttt: int = P.RESERVED_TAG, final: bool = True):
    """One Text Request and the one PDU it is answered with."""
    ini.send(Opcode.TEXT_REQUEST, data, immediate=True, final=final, lun=bytes(8), itt=itt, ttt=ttt,
             cmdsn=ini.cmdsn, expstatsn=0)
    [reply] = ini.receive()
    return reply


def addresses(reply) -> list[str]:
    """The TargetAddress values of a SendTargets answer, in order."""
    return [value for key, value in parse_text(reply.data) if key == "TargetAddress"]


def discovery_session(registry=None, **kwargs) -> Initiator:
    """A logged-in discovery session whose initiator takes data segments of 512 bytes at most."""
    ini = initiator(registry, **kwargs)
    reply = login_pdu(ini, encode_text(DISCOVERY + [("MaxRecvDataSegmentLength", "512")]), csg=0)
    assert (reply.header.status_class, reply.header.transit) == (0, True)
    return ini


def many_targets() -> TargetRegistry:
    """20 targets with long names: SendTargets=All takes several 512-byte Text Responses."""
    return TargetRegistry([TargetNode(f"iqn.2026-11.io.shoal.test:{'t' * 40}{i:03d}", LunMap({}))
                           for i in range(20)])


# -- FirstBurstLength within MaxBurstLength (§13.14) ---------------------------------------------------------
def test_target_offers_a_first_burst_within_the_max_burst_just_agreed():
    """The initiator offers MaxBurstLength=131072 and no FirstBurstLength: the target's own offer is 131072
    (its 262144 would exceed the burst), and a 128 KiB WRITE all in immediate data is then taken."""
    ini = initiator()
    reply = login_pdu(ini, encode_text(NORMAL + [("MaxBurstLength", "131072"), ("ImmediateData", "Yes"),
                                                 ("InitialR2T", "No")]))
    assert not reply.header.transit and keys_of(reply)["FirstBurstLength"] == "131072"
    reply = login_pdu(ini, encode_text([("FirstBurstLength", "131072")]))
    assert reply.header.transit and reply.header.status_class == 0
    ini.tsih = reply.header.tsih
    ini.command(bytes(6))
    ini.receive()  # the power-on unit attention
    ini.command(rw10(WRITE10, 0, 256), write=os.urandom(128 * 1024))
    [response] = ini.receive()
    assert response.opcode == Opcode.SCSI_RESPONSE and response.header.status == 0


def test_a_first_burst_answer_above_the_max_burst_agreed_with_it_fails_the_login():
    """The target offers MaxBurstLength=1048576 and FirstBurstLength=262144; the initiator answers 65536 and
    262144 in one request: the first burst would exceed the burst, a negotiation failure (not a silent
    clamp to 65536 that the initiator knows nothing of)."""
    ini = initiator()
    reply = login_pdu(ini, encode_text(NORMAL + [("ImmediateData", "Yes"), ("InitialR2T", "No")]))
    offered = keys_of(reply)
    assert (offered["MaxBurstLength"], offered["FirstBurstLength"]) == ("1048576", "262144")
    reply = login_pdu(ini, encode_text([("FirstBurstLength", "262144"), ("MaxBurstLength", "65536")]))
    assert (reply.header.status_class, reply.header.status_detail) == (0x02, 0x00)


def test_initiator_offers_a_first_burst_within_its_max_burst():
    negotiator = InitiatorNegotiator(InitiatorSettings(INITIATOR, TARGET, max_burst_length=65536,
                                                       first_burst_length=262144))
    offers = dict(negotiator.offers())
    assert (offers["MaxBurstLength"], offers["FirstBurstLength"]) == ("65536", "65536")


@pytest.mark.parametrize("order", ["MaxBurstLength first", "FirstBurstLength first"])
def test_initiator_refuses_a_first_burst_answer_above_the_max_burst_agreed(order):
    negotiator = InitiatorNegotiator(InitiatorSettings(INITIATOR, TARGET))
    negotiator.offers()  # MaxBurstLength=1048576, FirstBurstLength=262144
    answers = [("MaxBurstLength", "65536"), ("FirstBurstLength", "262144")]
    with pytest.raises(NegotiationError, match="13.14"):
        negotiator.response(answers if order == "MaxBurstLength first" else answers[::-1])


# -- Text exchanges (§11.10, §11.11) -------------------------------------------------------------------------
def test_a_text_request_with_f0_is_answered_with_f0_until_one_with_f1():
    """§11.11.1: a response with F=1 to a request with F=0 is a protocol error.  Each F=0 request is answered
    with F=0 and a new Target Transfer Tag, which the next request of the exchange carries back."""
    ini = discovery_session()
    itt = ini.next_itt()
    reply = text(ini, b"SendTargets=All\0", itt=itt, final=False)
    assert reply.opcode == Opcode.TEXT_RESPONSE and not reply.header.final and not reply.header.cont
    assert reply.header.ttt != P.RESERVED_TAG and keys_of(reply) == {"TargetName": TARGET,
                                                                     "TargetAddress": "127.0.0.1:3260,1"}
    first = reply.header.ttt
    reply = text(ini, b"X-com.example.k=1\0", itt=itt, ttt=first, final=False)
    assert not reply.header.final and reply.header.ttt not in (P.RESERVED_TAG, first)
    assert keys_of(reply) == {"X-com.example.k": "NotUnderstood"}
    reply = text(ini, b"", itt=itt, ttt=reply.header.ttt)
    assert reply.header.final and reply.header.ttt == P.RESERVED_TAG and reply.data == b""
    reject = text(ini, b"", itt=itt, ttt=first)  # the exchange ended: its tags are gone
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD


def test_the_last_piece_of_a_long_text_response_keeps_f0_for_a_request_with_f0():
    """The pieces of a long answer have C=1 and F=0; the last one has F=1 only if the request that asked
    for it had F=1."""
    ini = discovery_session(many_targets())
    itt, ttt, pieces = ini.next_itt(), P.RESERVED_TAG, 0
    while True:
        reply = text(ini, b"", itt=itt, ttt=ttt, final=False) if pieces else \
            text(ini, b"SendTargets=All\0", itt=itt, final=False)
        pieces += 1
        assert not reply.header.final and reply.header.ttt != P.RESERVED_TAG
        ttt = reply.header.ttt
        if not reply.header.cont:
            break
    assert pieces > 2
    reply = text(ini, b"", itt=itt, ttt=ttt)
    assert reply.header.final and reply.data == b""


def test_continuing_a_long_text_response_with_another_initiator_task_tag_is_rejected():
    """§11.10.3: the requests of one exchange share its Initiator Task Tag.  The stray request is rejected
    and the exchange stays open for the right one."""
    ini = discovery_session(many_targets())
    itt = ini.next_itt()
    first = text(ini, b"SendTargets=All\0", itt=itt)
    assert first.header.cont and len(first.data) == 512
    reject = text(ini, b"", itt=itt + 77, ttt=first.header.ttt)
    assert reject.opcode == Opcode.REJECT and reject.header.reason == RejectReason.INVALID_PDU_FIELD
    more = text(ini, b"", itt=itt, ttt=first.header.ttt)
    assert more.opcode == Opcode.TEXT_RESPONSE and more.header.itt == itt and more.data != first.data


# -- SendTargets: every portal of the group (Appendix C, §13.8) -----------------------------------------------
def test_send_targets_reports_every_portal_of_the_group():
    registry = make_registry()
    registry.portals = [("127.0.0.1", 3260), ("192.0.2.7", 3261), ("2001:db8::7", 3262)]
    ini = discovery_session(registry)
    reply = text(ini, b"SendTargets=All\0", itt=ini.next_itt())
    assert addresses(reply) == [
        "127.0.0.1:3260,1", "192.0.2.7:3261,1", "[2001:db8::7]:3262,1"]



@pytest.mark.parametrize("portals, local, expected", [
    ([], ("::ffff:127.0.0.1", 3260), ["127.0.0.1:3260,1"]),
    ([("::", 3260)], ("::ffff:10.1.2.3", 3260), ["10.1.2.3:3260,1"]),
    ([("::", 3260), ("0.0.0.0", 3261)], ("2001:db8::1", 3260), ["[2001:db8::1]:3260,1"]),
    ([("0.0.0.0", 3260), ("192.0.2.7", 3261)], ("10.1.2.3", 3260), ["10.1.2.3:3260,1", "192.0.2.7:3261,1"]),
])
def test_send_targets_reports_wildcard_portals_as_the_address_reached_unmapped(portals, local, expected):
    """A wildcard portal is reported as the address the initiator reached, an IPv4-mapped one as IPv4 (an
    IPv4 initiator cannot use [::ffff:a.b.c.d]); an IPv4 wildcard is not offered to an IPv6 initiator."""
    registry = make_registry()
    registry.portals = portals
    ini = discovery_session(registry, local=local)
    reply = text(ini, b"SendTargets=All\0", itt=ini.next_itt())
    assert addresses(reply) == expected


def test_portals_register_their_addresses_while_they_listen():
    """Two portals serving one registry: discovery through either reports both; a closed one is gone."""
    async def scenario():
        registry = make_registry()
        first = PortalServer(registry, TargetSettings(), "127.0.0.1", 0)
        second = PortalServer(registry, TargetSettings(), "127.0.0.1", 0)
        await first.start()
        await second.start()
        try:
            both = [f"127.0.0.1:{port},1" for _, port in (first.address, second.address)]
            seen = [await discover(*server.address) for server in (first, second)]
        finally:
            await second.close()
        assert registry.portals == [first.address]
        await first.close()
        return both, seen

    both, seen = asyncio.run(scenario())
    assert seen == [[(TARGET, both)], [(TARGET, both)]]


def test_an_ipv6_wildcard_portal_reports_an_ipv4_initiator_its_ipv4_address():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def scenario():
        server = PortalServer(make_registry(), TargetSettings(), "::", 0)
        try:
            await server.start()
        except OSError as exc:
            pytest.skip(f"cannot listen on [::]: {exc}")
        try:
            return server.address[1], await discover("127.0.0.1", server.address[1])
        finally:
            await server.close()

    port, found = asyncio.run(scenario())
    assert found == [(TARGET, [f"127.0.0.1:{port},1"])]


# -- Login ---------------------------------------------------------------------------------------------------
def test_target_portal_group_tag_on_a_connection_added_to_a_session():
    """§13.9 (Use: IO by target): the response to the first Login Request giving TargetName has it, on the
    leading connection and on every connection added to the session."""
    registry, settings = make_registry(), TargetSettings(max_connections=2)
    leading = initiator(registry, settings)
    reply = leading.login_normal(extra=[("MaxConnections", "2")])
    assert keys_of(reply)["TargetPortalGroupTag"] == "1"
    added = initiator(registry, settings, isid=leading.isid, tsih=reply.header.tsih)
    reply = login_pdu(added, encode_text(NORMAL), cid=1)
    assert reply.header.status_class == 0 and reply.header.tsih == leading.tsih
    assert keys_of(reply)["TargetPortalGroupTag"] == "1"


def test_a_login_answer_longer_than_the_initiators_8192_bytes_is_refused():
    """1500 extension keys, each answered NotUnderstood: 52 KiB of answer, more than the 8192 bytes the
    initiator takes during login (§13.12).  The login is refused (Out of Resources), no oversized PDU sent."""
    ini = initiator()
    request = encode_text(NORMAL) + b"".join(f"X-com.example.k{i:05d}=1\0".encode() for i in range(1500))
    itt = ini.next_itt()
    pieces = [request[i:i + 8192] for i in range(0, len(request), 8192)]
    for piece in pieces[:-1]:
        reply = login_pdu(ini, piece, transit=False, cont=True, itt=itt)
        assert reply.header.status_class == 0 and reply.data == b""
    reply = login_pdu(ini, pieces[-1], itt=itt)
    assert (reply.header.status_class, reply.header.status_detail) == (0x03, 0x02)
    assert len(reply.data) <= 8192 and ini.conn.closing
