"""The command-line entry points (``shoal target``/``agent``/``controller``/``up``/``iscsi``): regressions found by
a review of them (F1-F14 of its report, and the systemd unit's restart policy).

What they drive: ``node_agent.cli.main`` in this process for arguments that are refused before anything starts,
``LunSpec``/``TargetConfig``/``open_lun``/``serve`` on real files under ``tmp_path``, and ``serve`` against a
real busy socket on 127.0.0.1.  Processes (a target that serves, stops, or serves IPv6) are started in
tests/integration/test_cli_entry_processes.py.  Mocks: none.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from node_agent import cli
from node_agent.agent.settings import AgentSettings, check_address
from node_agent.iscsi.initiator.tools import IscsiUrl, masked_url
from node_agent.iscsi.target import Credentials
from node_agent.target_service import LunSpec, TargetConfig, TargetSpec, open_lun, serve
from tests.support.shoal_target import REPO

SECRET = "S3cretSecretXY"
IQN = "iqn.2026-11.io.shoal.test:entry"


def _refused(argv: list[str], capsys) -> str:
    """``main(argv)`` ends with exit status 2 (argparse's SystemExit or a returned 2); its stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# -- F1: a :ro LUN is opened read-only: never created, extended or written --------------------------------
def test_read_only_lun_is_opened_read_only_and_never_created_or_grown(tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(OSError, match="does not exist"):
        open_lun(LunSpec.parse(f"{missing}:1M:ro"), IQN)
    assert not missing.exists()

    small = tmp_path / "small.img"
    small.write_bytes(b"x" * (1 << 20))
    with pytest.raises(OSError, match="read-only file smaller"):
        open_lun(LunSpec.parse(f"{small}:2M:ro"), IQN)
    assert small.stat().st_size == 1 << 20

    small.chmod(0o444)  # (root could write it anyway: the open mode below is what counts)
    unit = open_lun(LunSpec.parse(f"{small}:ro"), IQN)
    try:
        assert unit.read_only and unit.backing.read_only
        assert fcntl.fcntl(unit.backing.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        unit.close()


def test_a_missing_lun_without_size_says_so(tmp_path):
    with pytest.raises(OSError, match="does not exist, and no size was given"):
        open_lun(LunSpec(str(tmp_path / "nope.img")), IQN)
    assert list(tmp_path.iterdir()) == []


# -- F2: port and ready files are written through a fresh private temporary file -------------------------
def _plant(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A victim file and a symlink to it at the fixed ``NAME.tmp`` name the writers once used."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / f"{name}.tmp").symlink_to(victim)
    return victim, tmp_path / name


def test_port_file_never_writes_through_a_planted_temporary_name(tmp_path):
    victim, port_file = _plant(tmp_path, "port")
    cli._write_port_file(str(port_file), [("127.0.0.1", 3260)])
    assert victim.read_text() == "precious\n"
    assert not port_file.is_symlink() and port_file.read_text() == "127.0.0.1:3260\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["port", "port.tmp", "victim"]  # no temporary left


def test_controller_ready_file_never_writes_through_a_planted_name(tmp_path):
    """(The agent's ``--ready-file``: tests/integration/test_cli_entry_processes.py.)"""
    from controller import daemon

    victim, ready = _plant(tmp_path, "controller.ready")
    daemon._write_json(str(ready), {"controller": "127.0.0.1:1"})
    assert victim.read_text() == "precious\n" and json.loads(ready.read_text()) == {"controller": "127.0.0.1:1"}
    assert (ready.stat().st_mode & 0o777) == 0o666 & ~_umask()  # as open(path, "w") made it


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


# -- F3: the same file twice, through a hard link --------------------------------------------------------
def test_a_hard_link_to_a_served_file_is_refused(tmp_path):
    image = tmp_path / "same.img"
    image.write_bytes(bytes(1 << 20))
    os.link(image, tmp_path / "same-link.img")
    config = TargetConfig(IQN, [LunSpec(str(image)), LunSpec(str(tmp_path / "same-link.img"))])
    with pytest.raises(ValueError, match="served twice"):
        config.validate()
    other = TargetConfig(IQN, [LunSpec(str(image))],
                         more_targets=[TargetSpec(IQN + "2", [LunSpec(str(tmp_path / "same-link.img"))])])
    with pytest.raises(ValueError, match="served twice"):
        other.validate()


# -- F5: an option left in the path ----------------------------------------------------------------------
@pytest.mark.parametrize("text, why", [
    ("a.img:ro:1M", "options go after SIZE"),
    ("a.img:atomic:1M:ro", "options go after SIZE"),
    ("a.img:removable:64M", "options go after SIZE"),
    ("d.img:1G:RO", "options are lower case"),
    ("d.img:Atomic", "options are lower case"),
    ("d.img:REMOVABLE", "options are lower case"),
])
def test_an_option_left_in_the_lun_path_is_refused(text, why, tmp_path, capsys):
    with pytest.raises(ValueError, match=why):
        LunSpec.parse(text)
    err = _refused(["target", "--listen", "127.0.0.1:0", "--lun", str(tmp_path / text)], capsys)
    assert why in err
    assert list(tmp_path.iterdir()) == []


def test_lun_options_after_the_size_still_parse():
    spec = LunSpec.parse("/srv/a.img:1M:ro:removable")
    assert (spec.path, spec.size, spec.settings.read_only, spec.settings.removable) == ("/srv/a.img", 1 << 20,
                                                                                        True, True)
    assert LunSpec.parse("/srv/a.img:ro").path == "/srv/a.img"
    by_path = "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2026-11.io.x:t-lun-0"  # a path's own colons
    assert LunSpec.parse(by_path + ":ro").path == by_path


# -- F4: a failed start leaves the LUN files as they were ------------------------------------------------
def _serve_on(port: int, config: TargetConfig) -> None:
    config.host, config.port = "127.0.0.1", port
    asyncio.run(serve(config, stop=asyncio.Event()))


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_a_start_on_a_busy_port_removes_what_it_created_and_shrinks_what_it_grew(tmp_path, busy_port):
    grown = tmp_path / "existing.img"
    grown.write_bytes(b"\x5a" * (1 << 20))
    config = TargetConfig(IQN, [LunSpec(str(tmp_path / "new.img"), 1 << 30), LunSpec(str(grown), 1 << 30)])
    with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{busy_port}: Address already in use"):
        _serve_on(busy_port, config)  # the address named: which of several targets holds it is the question
    assert not (tmp_path / "new.img").exists()
    assert grown.stat().st_size == 1 << 20 and grown.read_bytes() == b"\x5a" * (1 << 20)


def test_a_bad_later_lun_removes_the_files_of_the_earlier_ones(tmp_path):
    (tmp_path / "adir").mkdir()
    config = TargetConfig(IQN, [LunSpec(str(tmp_path / "first.img"), 64 << 20), LunSpec(str(tmp_path / "adir"))])
    with pytest.raises(OSError):
        _serve_on(0, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]

    config = TargetConfig(IQN, [LunSpec(str(tmp_path / "t1.img"), 1 << 20)],
                          more_targets=[TargetSpec(IQN + "2", [LunSpec(str(tmp_path / "t2.img"))])])
    with pytest.raises(OSError):
        _serve_on(0, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_a_failed_start_keeps_a_file_that_holds_data_past_its_old_end(tmp_path):
    """The undo only ever drops what surely holds nothing: a file someone wrote meanwhile is kept."""
    from node_agent.target_service import lun_files_before, undo_lun_files

    new, grown = tmp_path / "new.img", tmp_path / "grown.img"
    grown.write_bytes(bytes(4096))
    config = TargetConfig(IQN, [LunSpec(str(new), 1 << 20), LunSpec(str(grown), 1 << 20)])
    before = lun_files_before(config)
    with open(new, "wb") as handle:
        handle.truncate(1 << 20)
        handle.write(b"data")
    with open(grown, "r+b") as handle:
        handle.truncate(1 << 20)
        handle.seek(512 << 10)
        handle.write(b"data")
    undo_lun_files(before)
    assert new.stat().st_size == 1 << 20 and grown.stat().st_size == 1 << 20


# -- F9 and F8: shoal iscsi URLs --------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    f"iscsi://alice%{SECRET}@127.0.0.1:3260/{IQN}/x",
    f"iscsi://alice:{SECRET}@127.0.0.1:3260/{IQN}",
    f"iscsi://alice%{SECRET}@127.0.0.1:0/{IQN}/0",
    f"iscsi://127.0.0.1/{IQN}/zero?target_user=t&target_password={SECRET}",
    f"http://alice%{SECRET}@127.0.0.1/{IQN}/0",
])
def test_url_errors_never_show_a_secret(url, capsys):
    with pytest.raises(ValueError) as exc:
        IscsiUrl.parse(url)
    assert SECRET not in str(exc.value) and "***" in str(exc.value)
    err = _refused(["iscsi", "inquiry", url], capsys)
    assert SECRET not in err and "***" in err


def test_masked_url():
    assert masked_url(f"iscsi://a%{SECRET}@h:1/i/0?target_user=t&target_password={SECRET}&x=1") == \
        "iscsi://a%***@h:1/i/0?target_user=t&target_password=***&x=1"
    assert masked_url(f"iscsi://a:{SECRET}@[::1]/i/0") == "iscsi://a:***@[::1]/i/0"
    assert masked_url("iscsi://h/i/0") == "iscsi://h/i/0"


@pytest.mark.parametrize("url, chap, mutual", [
    ("iscsi://alice:secret@h/i/0", ("alice", "secret"), None),  # ':' separates as libiscsi's does
    ("iscsi://alice%se:cret@h/i/0", ("alice", "se:cret"), None),  # '%' first: the rest is the secret
    ("iscsi://alice@h/i/0", None, None),  # no secret: no CHAP (libiscsi logs in without)
    ("iscsi://%secret@h/i/0", None, None),  # no user: no CHAP
    ("iscsi://u%s%25cret@h/i/0", ("u", "s%cret"), None),  # decoded after the split ...
    ("iscsi://u%abc123@h/i/0", ("u", "abc123"), None),  # ... so a secret may start with hex digits
    ("iscsi://u%12%2540@h/i/0", ("u", "12%40"), None),
    ("iscsi://h/i/0?target_user=t&target_password=a+b%2Bc", None, ("t", "a+b+c")),  # '+' is no space
])
def test_urls_parse_as_libiscsi_parses_them(url, chap, mutual):
    parsed = IscsiUrl.parse(url)
    assert (parsed.chap, parsed.mutual_chap) == (chap, mutual)


def test_url_port_zero_lun_range_and_half_mutual_chap_are_refused():
    for url, message in (("iscsi://h:0/i/0", "port 0"), ("iscsi://h/i/16384", "LUN"),
                         ("iscsi://h/i/\u0661", "LUN"),
                         ("iscsi://h/i/0?target_user=t", "go together"),
                         ("iscsi://h/i/0?target_password=p", "go together")):
        with pytest.raises(ValueError, match=message):
            IscsiUrl.parse(url)
    assert IscsiUrl.parse("iscsi://[fe80::1%25eth0]:3261/i/0").host == "fe80::1%eth0"


# -- F11/F13: IPv6 in --listen and the port file ---------------------------------------------------------
def test_port_file_brackets_ipv6(tmp_path):
    path = tmp_path / "port"
    cli._write_port_file(str(path), [("::1", 3260), ("127.0.0.1", 3261)])
    assert path.read_text() == "[::1]:3260\n127.0.0.1:3261\n"
    assert IscsiUrl.parse(f"iscsi://{path.read_text().split()[0]}", need_lun=False).host == "::1"


@pytest.mark.parametrize("text", ["::1", "fd00::1:3260", "[::1", "::1]:3260", "[nope]:3260", "[::1]"])
def test_listen_needs_brackets_for_ipv6(text, tmp_path, capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._listen(text)
    err = _refused(["target", "--listen", text, "--lun", str(tmp_path / "d.img:1M")], capsys)
    assert "[ADDR]:PORT" in err


def test_listen_forms_that_stay():
    assert cli._listen("[::1]:3260") == ("::1", 3260)
    assert cli._listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert cli._listen(":3260") == ("0.0.0.0", 3260)


# -- F10: CHAP secrets open to other users are warned about ----------------------------------------------
def test_chap_secret_warnings(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "shoal.iscsi.target")
    secret_file = tmp_path / "chap"
    secret_file.write_text(f"alice:{SECRET}\n")
    secret_file.chmod(0o600)
    assert Credentials.parse(f"@{secret_file}").secret == SECRET
    assert not caplog.records

    secret_file.chmod(0o644)
    Credentials.parse(f"@{secret_file}")
    assert len(caplog.records) == 1 and "open to other users (mode 0644)" in caplog.records[0].getMessage()

    caplog.clear()
    Credentials.parse(f"alice:{SECRET}")
    assert len(caplog.records) == 1 and "command line" in caplog.records[0].getMessage()
    assert SECRET not in caplog.text


# -- F6/F7: agent and controller addresses, checked before any state is written -------------------------
@pytest.mark.parametrize("field, value, message", [
    ("controller", "localhost", "expected HOST:PORT"),
    ("controller", "127.0.0.1:0", "the port must be 1 to 65535"),
    ("advertise_portals", ("nope",), "expected HOST:PORT"),
    ("advertise_portals", ("nope:3260",), "not an IP address"),
    ("advertise_portals", ("0.0.0.0:3260",), "not an IP address"),
    ("advertise_address", "10.0.0.1", "expected HOST:PORT"),
    ("portal_listen", "127.0.0.1", "expected HOST:PORT"),
    ("portal_listen", "999.1.1.1:0", "cannot resolve"),
    ("metrics_listen", "bogus", "expected HOST:PORT"),
    ("listen", "::1", "expected HOST:PORT"),
])
def test_agent_settings_refuse_bad_addresses(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        AgentSettings(node_id="n1", data_dir=str(tmp_path / "data"), **{field: value})


def test_agent_settings_keep_the_address_forms_in_use():
    settings = AgentSettings(node_id="n1", listen="0.0.0.0:7071", advertise_address="node1.example:7071",
                             portal_listen="fd00::1:3260", advertise_portals=("10.0.0.2:3260", "[fd00::2]:3260"),
                             controller="shoal-controller.shoal.svc:7450", metrics_listen="localhost:0")
    assert settings.controller == "shoal-controller.shoal.svc:7450"
    for target in ("dns:///shoal-controller:7450", "unix:///run/shoal/controller.sock"):  # gRPC target URIs
        assert AgentSettings(node_id="n1", controller=target).controller == target
    assert check_address(":7451", "--listen", bind=True, empty_host="0.0.0.0") == ("0.0.0.0", 7451)


@pytest.mark.parametrize("extra", [["--portal", "127.0.0.1"], ["--metrics-listen", "bogus"],
                                   ["--controller", "localhost"], ["--advertise-portal", "nope"]])
def test_shoal_agent_refuses_bad_addresses_in_its_settings(extra, tmp_path):
    """The settings ``shoal agent`` builds before starting anything refuse them (the process, its exit status 2
    and the data directory it no longer creates: tests/integration/test_cli_entry_processes.py)."""
    args = cli.build_parser("agent").parse_args(["agent", "--node-id", "n1", "--data-dir", str(tmp_path / "data"),
                                                 "--listen", "127.0.0.1:0", *extra])
    with pytest.raises(ValueError, match=extra[0]):
        cli._agent_settings(args)


@pytest.mark.parametrize("extra", [["--label", "novalue"], ["--tls-client-ca", "ca.pem"],
                                   ["--node-id", "BAD_ID"]])
def test_shoal_agent_settings_errors_exit_2(extra, tmp_path, capsys):
    err = _refused(["agent", "--node-id", "n1", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
                    *extra], capsys)
    assert err.startswith("shoal agent: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--metrics-listen", "127.0.0.1"], ["--listen", "999.1.1.1:0"],
                                   ["--listen", "127.0.0.1"], ["--health-listen", "nohost.invalid:0"],
                                   ["--tls-client-ca", "ca.pem"]])
def test_shoal_controller_usage_errors_exit_2_and_create_no_db(extra, tmp_path, capsys):
    err = _refused(["controller", "--db", str(tmp_path / "c" / "db"), *extra], capsys)
    assert err.startswith("shoal controller: ")
    assert list(tmp_path.iterdir()) == []


# -- F14: exit codes and messages --------------------------------------------------------------------------
def test_target_config_errors_print_the_target_usage(tmp_path, capsys):
    image = tmp_path / "a.img"
    err = _refused(["target", "--lun", f"{image}:1M", "--lun", f"{image}:1M"], capsys)
    assert "usage: shoal target" in err and "shoal target: error:" in err and "served twice" in err


@pytest.mark.parametrize("verb, message", [
    (["read", "--lba", str(1 << 64), "--blocks", "1"], "beyond the last possible LBA"),
    (["read", "--lba", "x", "--blocks", "1"], "'x' is not a whole number"),
    (["write", "--lba", "-1"], "is not a whole number"),
    (["bench", "--size", ""], "positive multiple of 512"),
    (["bench", "--size", "k"], "positive multiple of 512"),
    (["bench", "--size", "100"], "positive multiple of 512"),
    (["bench", "--seconds", "nan"], "expected seconds"),
    (["bench", "--seconds", "inf"], "expected seconds"),
    (["bench", "--seconds", "0"], "expected seconds"),
    (["bench", "--seconds", "-1"], "expected seconds"),
    (["bench", "--seconds", "1e9"], "expected seconds"),
])
def test_iscsi_arguments_are_usage_errors(verb, message, capsys):
    url = f"iscsi://127.0.0.1:1/{IQN}/0"
    args = ["iscsi", verb[0], url, *verb[1:]]
    assert message in _refused(args, capsys)


def test_iscsi_read_past_the_last_lba_is_a_usage_error(capsys):
    err = _refused(["iscsi", "read", f"iscsi://127.0.0.1:1/{IQN}/0", "--lba", str((1 << 64) - 1),
                    "--blocks", "2"], capsys)
    assert "past the last possible LBA" in err


@pytest.mark.parametrize("extra, message", [
    (["--disk-size", "10X"], "--disk-size"),
    (["--agent", "127.0.0.1"], "--agent"),
    (["--portal", "::1"], "--portal"),
    (["--agent-metrics", "nope"], "--agent-metrics"),
    (["--timeout", "nan"], "--timeout"),
])
def test_shoal_up_checks_its_arguments_before_starting_anything(extra, message, tmp_path, capsys):
    err = _refused(["up", "--data-dir", str(tmp_path / "state"), *extra], capsys)
    assert message in err
    assert list(tmp_path.iterdir()) == []


# -- the systemd unit ----------------------------------------------------------------------------------------
def test_systemd_unit_does_not_restart_usage_errors():
    unit = (REPO / "deploy" / "systemd" / "shoal-target@.service").read_text()
    service = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    assert "\nRestartPreventExitStatus=2\n" in service and "\nRestart=on-failure\n" in service


def test_shoal_iscsi_names_the_portal_it_cannot_reach(capsys):
    """A refused connection says where: "[Errno 111] Connection refused" alone left the user guessing."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once closed
    code = cli.main(["iscsi", "inquiry", f"iscsi://127.0.0.1:{port}/{IQN}/0"])
    err = capsys.readouterr().err
    assert code == 1 and f"shoal iscsi: 127.0.0.1:{port}: Connection refused" in err, err
