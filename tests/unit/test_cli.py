"""`shoal target` command line: bad input gets a clear error and starts nothing."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from node_agent.cli import build_parser, main
from node_agent.iscsi.target import Credentials
from node_agent.target_service import LunSpec, parse_size


@pytest.mark.parametrize("args, message", [
    (["target"], "--lun"),
    (["target", "--lun", "x.img", "--listen", "nope"], "HOST:PORT"),
    (["target", "--lun", "x.img", "--iqn", "not-an-iqn"], "not an iSCSI name"),
    (["target", "--lun", "x.img", "--chap", "nocolon"], "USER:SECRET"),
    (["target", "--lun", "x.img", "--allow", "bogus"], "not an iSCSI name"),
    (["target", "--lun", "x.img", "--chap", "@/nonexistent/chap"], "No such file"),
    (["target", "--lun", "x.img", "--mutual-chap", "t:secret-123456"], "--mutual-chap needs --chap"),
    (["target", "--lun", "x.img", "--listen", "0.0.0.0:3260"], "refusing to serve without CHAP"),
    (["target", "--lun", "x.img", "--data-digest", "MD5"], "a list of None and CRC32C"),
    (["target", "--lun", "x.img", "--header-digest", "CRC32C,crc32c"], "each at most once"),
    (["target", "--lun", "x.img", "--nop-interval", "soon"], "could not convert"),
    (["target", "--lun", "x.img", "--nop-interval", "-1"], "expected seconds from 0 to 86400"),
    (["target", "--lun", "x.img", "--nop-timeout", "nan"], "expected seconds from 0 to 86400"),
    (["target", "--lun", "x.img", "--nop-timeout", "0"], "--nop-timeout must be more than 0"),
])
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_sizes_and_lun_specs():
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
    assert LunSpec.parse("/srv/a.img:1G") == LunSpec("/srv/a.img", 1 << 30)
    assert LunSpec.parse("/srv/a.img") == LunSpec("/srv/a.img")


def test_a_mistyped_lun_size_is_refused_and_leaves_no_file(tmp_path):
    """``--lun x.img:64Q`` used to take ``x.img:64Q`` as the path, create it empty, then fail "empty file and no
    size given"; a file made for a LUN that cannot be served is removed again."""
    assert parse_size("1.5G") == 3 << 29 and parse_size("0.5K") == 512
    for bad in ("64Q", "1.2.3G", "0.1"):
        with pytest.raises(ValueError, match="bad size"):
            LunSpec.parse(f"{tmp_path}/x.img:{bad}")
    by_path = "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2026-11.io.x:t-lun-0"  # a path's own colons
    assert LunSpec.parse(by_path) == LunSpec(by_path)
    for lun in (f"{tmp_path}/new.img", f"{tmp_path}/x.img:64Q", f"{tmp_path}/y.img:1000"):
        proc = subprocess.run([sys.executable, "-m", "node_agent.cli", "target", "--listen", "127.0.0.1:0",
                               "--lun", lun], capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused LUN left a file behind"


def test_chap_from_file_keeps_secret_out_of_repr(tmp_path):
    path = tmp_path / "chap"
    path.write_text("alice:a-long-secret-1\n")
    creds = Credentials.parse(f"@{path}")
    assert creds.user == "alice" and creds.secret == "a-long-secret-1"
    assert "a-long-secret-1" not in repr(creds)


def test_same_secret_for_both_directions_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "node_agent.cli", "target", "--listen", "127.0.0.1:0",
                           "--lun", f"{tmp_path}/d.img:1M", "--chap", "a:same-secret-123",
                           "--mutual-chap", "b:same-secret-123"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "must differ" in proc.stderr
    assert "same-secret-123" not in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "node_agent.cli", "target", "--listen", f"127.0.0.1:{port}",
                               "--lun", f"{tmp_path}/d.img:1M"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ping_timers_reach_the_connections():
    from node_agent.cli import target_config
    config = target_config(build_parser().parse_args(["target", "--lun", "a.img", "--nop-interval", "0",
                                                      "--nop-timeout", "120"]))
    assert config.connection.nop_interval == 0 and config.connection.nop_timeout == 120
    assert config.portal().connection is config.connection  # and through it every portal and worker
    default = target_config(build_parser().parse_args(["target", "--lun", "a.img"]))
    assert (default.connection.nop_interval, default.connection.nop_timeout) == (10.0, 30.0)


def test_parser_documents_every_option():
    text = build_parser().parse_args(["target", "--lun", "a.img"])
    assert text.listen == ("127.0.0.1", 3260)
