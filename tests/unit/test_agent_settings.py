"""AgentSettings, DiskSpec and the ``shoal agent`` command line."""

from __future__ import annotations

import certifi
import pytest

from node_agent.agent.settings import AgentSettings, DiskSpec, TlsFiles
from node_agent.cli import _agent_settings, build_parser

SYSTEM_CAS = certifi.where()  # a CA bundle that loads (certifi: the kubernetes client's dependency)


def test_defaults_derive_names_from_the_node_id():
    settings = AgentSettings(node_id="n1", data_dir="/tmp/x")
    assert settings.initiator_iqn == "iqn.2026-11.io.shoal:node:n1"
    assert settings.target_prefix == "iqn.2026-11.io.shoal:target:n1"
    assert [(d.name, d.path) for d in settings.effective_disks()] == [("data0", "/tmp/x/disks/data0")]


def test_the_default_node_id_is_a_valid_name():
    assert AgentSettings().node_id


@pytest.mark.parametrize("kwargs, message", [
    (dict(node_id="Node 1"), "node id"),
    (dict(node_id="n1", initiator_iqn="nope"), "not an iSCSI name"),
    (dict(node_id="n1", disks=(DiskSpec("d", "/a"), DiskSpec("d", "/b"))), "unique"),
    (dict(node_id="n1", server_tls=TlsFiles(ca="/ca.pem")), "certificate"),
    (dict(node_id="n1", iscsi_data_digest=("MD5",)), "a list of None and CRC32C"),
    (dict(node_id="n1", iscsi_header_digest=()), "a list of None and CRC32C"),
    (dict(node_id="n1", iscsi_nop_interval=-1), "iscsi nop interval"),
    (dict(node_id="n1", iscsi_nop_interval=float("nan")), "iscsi nop interval"),
    (dict(node_id="n1", iscsi_nop_timeout=0), "iscsi nop timeout"),
    (dict(node_id="n1", iscsi_nop_timeout=86401), "iscsi nop timeout"),
    (dict(node_id="n1", userspace_reconnect_timeout=0), "userspace reconnect timeout"),
    (dict(node_id="n1", userspace_reconnect_timeout=float("inf")), "userspace reconnect timeout"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgentSettings(**kwargs)


@pytest.mark.parametrize("text, expected", [
    ("data0=/srv/shoal", DiskSpec("data0", "/srv/shoal")),
    ("data0=/srv/shoal:100G", DiskSpec("data0", "/srv/shoal", 100 << 30)),
    ("d1=/mnt/a:b", DiskSpec("d1", "/mnt/a:b")),
])
def test_disk_spec_parse(text, expected):
    assert DiskSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["/srv/shoal", "BAD=/x", "d=", "d=/x:0"])
def test_bad_disk_specs(text):
    with pytest.raises(ValueError):
        DiskSpec.parse(text)


def test_tls_needs_a_certificate_and_its_key():
    with pytest.raises(ValueError, match="both"):
        TlsFiles(cert="/c.pem")


def test_the_agent_command_line_builds_settings():
    args = build_parser().parse_args([
        "agent", "--node-id", "n2", "--data-dir", "/var/tmp/a", "--disk", "data0=/srv/d0:1G", "--disk", "data1=/srv/d1",
        "--listen", "0.0.0.0:7071", "--advertise-address", "10.0.0.2:7071", "--portal", "0.0.0.0:3260",
        "--advertise-portal", "10.0.0.2:3260", "--controller", "10.0.0.1:7070", "--label", "zone=a",
        "--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--controller-ca", SYSTEM_CAS])
    settings = _agent_settings(args)
    assert settings.node_id == "n2" and settings.labels == {"zone": "a"}
    assert settings.disks == (DiskSpec("data0", "/srv/d0", 1 << 30), DiskSpec("data1", "/srv/d1"))
    assert settings.advertise_portals == ("10.0.0.2:3260",)
    assert settings.server_tls == TlsFiles("/c.pem", "/k.pem", "")
    assert settings.controller_tls == TlsFiles("", "", SYSTEM_CAS)
    assert settings.iscsi_header_digest == settings.iscsi_data_digest == ("None", "CRC32C")  # the default


def test_client_tls_files_that_do_not_load_stop_the_start():
    """The agent's files for its calls to the controller used to be read at the first heartbeat: a missing or
    broken one looked like a controller that is down (one INFO line), and the agent never registered."""
    for files, why in ((["--controller-ca", "/nonexistent/ca.pem"], "cannot be read"),
                       (["--controller-ca", SYSTEM_CAS, "--controller-cert", SYSTEM_CAS, "--controller-key",
                         SYSTEM_CAS], "not a PEM certificate chain and its unencrypted private key")):
        args = build_parser().parse_args(["agent", "--node-id", "n2", *files])
        with pytest.raises(ValueError, match=f"--controller-ca/--controller-cert/--controller-key: .*{why}"):
            _agent_settings(args)


def test_the_agent_digest_flags():
    args = build_parser().parse_args(["agent", "--node-id", "n2", "--iscsi-header-digest", "crc32c,none",
                                      "--iscsi-data-digest", "CRC32C"])
    settings = _agent_settings(args)
    assert settings.iscsi_header_digest == ("CRC32C", "None") and settings.iscsi_data_digest == ("CRC32C",)
    # Built directly, the values are spelt as negotiation compares them.
    assert AgentSettings(node_id="n1", iscsi_data_digest=("crc32c", "NONE")).iscsi_data_digest == ("CRC32C", "None")


def test_the_agent_ping_flags_reach_its_portal(tmp_path):
    """``--iscsi-nop-interval``/``--iscsi-nop-timeout`` (as ``shoal target --nop-interval/--nop-timeout``) end in
    the portal's connection settings; the defaults are the target's."""
    from node_agent.agent.daemon import Agent
    from node_agent.iscsi.connection import ConnectionSettings

    args = build_parser().parse_args(["agent", "--node-id", "n2", "--iscsi-nop-interval", "90",
                                      "--iscsi-nop-timeout", "120"])
    assert (_agent_settings(args).iscsi_nop_interval, _agent_settings(args).iscsi_nop_timeout) == (90, 120)
    default = _agent_settings(build_parser().parse_args(["agent", "--node-id", "n2"]))
    assert (default.iscsi_nop_interval, default.iscsi_nop_timeout) == (ConnectionSettings.nop_interval,
                                                                       ConnectionSettings.nop_timeout)
    settings = AgentSettings(node_id="n2", data_dir=str(tmp_path), portal_listen="127.0.0.1:0", listen="127.0.0.1:0",
                             controller="", iscsi_nop_interval=0, iscsi_nop_timeout=5)
    agent = Agent(settings)
    try:
        agent.start()
        assert agent.portal.service.portal_config.connection == ConnectionSettings(nop_interval=0, nop_timeout=5)
    finally:
        agent.stop()


def test_the_userspace_reconnect_timeout_reaches_the_userspace_connector(tmp_path):
    """``--userspace-reconnect-timeout`` ends in the userspace connector's settings, which its sessions
    retry for (``ClientSettings.reconnect_timeout``); the default is the connector's own."""
    from node_agent.agent.daemon import default_connectors
    from node_agent.host.userspace import UserspaceSettings

    args = build_parser().parse_args(["agent", "--node-id", "n2", "--userspace-reconnect-timeout", "7.5"])
    assert _agent_settings(args).userspace_reconnect_timeout == 7.5
    default = _agent_settings(build_parser().parse_args(["agent", "--node-id", "n2"]))
    assert default.userspace_reconnect_timeout == UserspaceSettings.reconnect_timeout
    settings = AgentSettings(node_id="n2", data_dir=str(tmp_path), controller="", userspace_reconnect_timeout=7.5)
    connector = default_connectors(settings)["userspace"]()
    assert connector.settings.reconnect_timeout == 7.5


@pytest.mark.parametrize("flag, value", [("--iscsi-nop-interval", "-1"), ("--iscsi-nop-timeout", "nan"),
                                         ("--iscsi-nop-interval", "1e9"), ("--userspace-reconnect-timeout", "-5")])
def test_bad_agent_ping_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["agent", flag, value])
    assert exit_info.value.code == 2 and "expected seconds" in capsys.readouterr().err


def test_a_bad_label_is_refused():
    args = build_parser().parse_args(["agent", "--node-id", "n2", "--label", "zone"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _agent_settings(args)
