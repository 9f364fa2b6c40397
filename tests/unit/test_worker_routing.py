"""The pieces of ``shoal target --workers N`` that need no process: the first-PDU router's parser, the
``--iqn``/``--lun`` layout, the configuration's checks and how targets are shared out among workers."""

from __future__ import annotations

import pytest

from node_agent import cli
from node_agent.target_service import LunSpec, TargetConfig, TargetSpec
from node_agent.target_workers import FIRST_PDU_LIMIT, FirstLogin, WorkerPool, first_login


def login(text: bytes, *, opcode: int = 0x43, ahs_words: int = 0) -> bytes:
    header = bytearray(48)
    header[0] = opcode
    header[4] = ahs_words
    header[5:8] = len(text).to_bytes(3, "big")
    return bytes(header) + bytes(4 * ahs_words) + text


NORMAL = b"InitiatorName=iqn.2026-11.io.shoal.test:i\0TargetName=iqn.2026-11.io.shoal.test:t\0"


def test_a_normal_login_names_its_target():
    assert first_login(login(NORMAL)) == FirstLogin("iqn.2026-11.io.shoal.test:t")
    assert first_login(login(NORMAL, opcode=0x03)) == FirstLogin("iqn.2026-11.io.shoal.test:t")  # not immediate
    assert first_login(login(NORMAL + b"SessionType=Normal\0")) == FirstLogin("iqn.2026-11.io.shoal.test:t")


def test_an_ahs_is_skipped():
    assert first_login(login(NORMAL, ahs_words=2)) == FirstLogin("iqn.2026-11.io.shoal.test:t")


def test_incomplete_pdus_say_how_much_is_needed():
    pdu = login(NORMAL)
    assert first_login(b"") == 48
    assert first_login(pdu[:47]) == 48
    assert first_login(pdu[:60]) == len(pdu)


@pytest.mark.parametrize("pdu", [
    login(b"InitiatorName=i\0SessionType=Discovery\0TargetName=iqn.2026-11.io.shoal.test:t\0"),
    login(b"InitiatorName=i\0"),  # no TargetName: the parent answers (MISSING PARAMETER)
    login(NORMAL, opcode=0x01),  # a SCSI Command before login: the parent rejects it
    login(b"TargetName=\xff\xfe\0"),  # not UTF-8
    b"\x43" + bytes(4) + (FIRST_PDU_LIMIT).to_bytes(3, "big") + bytes(40),  # text too long to peek at
], ids=["discovery", "no-target-name", "not-a-login", "not-utf8", "too-long"])
def test_what_names_no_target_is_served_by_the_parent(pdu):
    assert first_login(pdu) == FirstLogin(None)


def test_the_first_of_repeated_keys_counts():
    text = b"TargetName=iqn.2026-11.io.shoal.test:one\0TargetName=iqn.2026-11.io.shoal.test:two\0"
    assert first_login(login(text)) == FirstLogin("iqn.2026-11.io.shoal.test:one")


def parse(*argv: str):
    return cli.build_parser().parse_args(["target", *argv])


def test_luns_belong_to_the_iqn_before_them():
    args = parse("--lun", "a.img", "--iqn", "iqn.2026-11.io.x:one", "--lun", "b.img", "--iqn",
                 "iqn.2026-11.io.x:two", "--lun", "c.img", "--workers", "2")
    targets = cli.target_layout(args.layout)
    assert [(t.iqn, [lun.path for lun in t.luns]) for t in targets] == [
        ("iqn.2026-11.io.x:one", ["a.img", "b.img"]), ("iqn.2026-11.io.x:two", ["c.img"])]
    config = cli.target_config(args)
    assert config.iqn == "iqn.2026-11.io.x:one" and config.workers == 2 and len(config.targets) == 2


def test_without_iqn_the_default_target_takes_every_lun():
    targets = cli.target_layout(parse("--lun", "a.img", "--lun", "b.img").layout)
    assert [(t.iqn, len(t.luns)) for t in targets] == [(cli.DEFAULT_IQN, 2)]


@pytest.mark.parametrize("argv, message", [
    (("--lun", "a.img", "--workers", "2"), "--workers 2 needs at least 2 targets"),
    (("--iqn", "iqn.2026-11.io.x:one", "--lun", "a.img", "--iqn", "iqn.2026-11.io.x:one", "--lun", "b.img"),
     "given twice"),
    (("--iqn", "iqn.2026-11.io.x:one", "--lun", "a.img", "--iqn", "iqn.2026-11.io.x:ONE", "--lun", "b.img"),
     "given twice"),  # iSCSI names do not differ by case alone
    (("--iqn", "iqn.2026-11.io.x:one", "--lun", "a.img", "--iqn", "iqn.2026-11.io.x:two", "--lun", "a.img"),
     "served twice"),
    (("--iqn", "iqn.2026-11.io.x:one", "--lun", "a.img", "--iqn", "iqn.2026-11.io.x:two"), "needs at least one LUN"),
    (("--lun", "a.img", "--workers", "0"), "--workers must be 1 to 64"),
])
def test_bad_layouts_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.target_config(parse(*argv))


def test_targets_are_dealt_out_in_order():
    config = TargetConfig("iqn.2026-11.io.x:a", [LunSpec("a")], more_targets=[
        TargetSpec("iqn.2026-11.io.x:b", [LunSpec("b")]), TargetSpec("iqn.2026-11.io.x:c", [LunSpec("c")])],
        workers=2)
    specs = WorkerPool(config).specs()
    assert [[t.iqn for t in spec.targets] for spec in specs] == [
        ["iqn.2026-11.io.x:a", "iqn.2026-11.io.x:c"], ["iqn.2026-11.io.x:b"]]


def test_the_router_caps_and_times_out_connections_that_have_not_sent_their_first_pdu():
    """The parent of ``--workers`` holds a new connection until its first PDU names a target.  Like one
    process (``max_logins_per_peer``, ``login_timeout``), it holds at most so many per address, and drops
    one that sends nothing by the deadline: idle connections cannot use up its file descriptors."""
    import asyncio
    import socket

    from node_agent.iscsi.connection import ConnectionSettings

    async def scenario() -> None:
        config = TargetConfig("iqn.2026-11.io.shoal.test:t", [], connection=ConnectionSettings(
            login_timeout=0.5, max_logins_per_peer=2))
        pool = WorkerPool(config)
        pool._loop = asyncio.get_running_loop()
        served: list[socket.socket] = []
        listener = socket.create_server(("127.0.0.1", 0))
        clients, accepted = [], []
        try:
            for _ in range(3):
                clients.append(socket.create_connection(listener.getsockname()))
                conn, peer = listener.accept()
                conn.setblocking(False)
                accepted.append(conn)
                pool.route(conn, peer, lambda c, p: served.append(c))
            assert pool.peeking == {"127.0.0.1": 2}
            clients[2].settimeout(2)
            assert clients[2].recv(1) == b""  # the third was closed at once
            clients[1].sendall(login(NORMAL)[:30])  # half a header: still waiting
            await asyncio.sleep(0.8)
            assert pool.peeking == {}  # both dropped at the deadline, the one that sent part of a PDU too
            for client in clients[:2]:
                client.settimeout(2)
                try:
                    assert client.recv(1) == b""
                except ConnectionResetError:  # closed with bytes unread: a reset
                    pass
            # Drained: the next connection from the address is served again.
            clients.append(socket.create_connection(listener.getsockname()))
            conn, peer = listener.accept()
            conn.setblocking(False)
            accepted.append(conn)
            pool.route(conn, peer, lambda c, p: served.append(c))
            clients[-1].sendall(login(b"InitiatorName=iqn.2026-11.io.shoal.test:i\0SessionType=Discovery\0"))
            for _ in range(100):
                if served:
                    break
                await asyncio.sleep(0.01)
            assert served == [conn] and pool.peeking == {}
        finally:
            for sock in clients + accepted + [listener]:
                sock.close()

    asyncio.run(scenario())


def test_a_login_continued_in_the_next_pdu_routes_on_its_whole_pairs_only():
    """With C set the text goes on in the next PDU, so its last pair may be cut short: a TargetName cut in
    two must not send the connection to the wrong (or no) worker."""
    cut = b"InitiatorName=iqn.2026-11.io.shoal.test:i\0TargetName=iqn.2026-11.io.shoal.test:t"
    continued = bytearray(login(cut))
    continued[1] |= 0x40
    assert first_login(bytes(continued)) == FirstLogin(None)  # served here: it waits for the rest
    whole = bytearray(login(NORMAL + b"MaxRecvDataSegmentLength=26"))
    whole[1] |= 0x40
    assert first_login(bytes(whole)) == FirstLogin("iqn.2026-11.io.shoal.test:t")
