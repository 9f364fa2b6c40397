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
