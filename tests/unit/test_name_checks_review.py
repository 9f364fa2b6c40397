"""Names, ids and IQNs that end in a newline (or hold control characters) are refused everywhere.

Python's ``re.match(r"^...$")`` also matches just before a trailing newline, so a volume ``evil\\n`` used to
become the file ``evil\\n.img`` and an IQN and VPD serial with a newline on the agent, a second volume ``vol\\n``
beside ``vol`` on the controller, and lines injected into logs and ``shoalctl`` tables. The checks now match
the whole string. Sizes a file offset cannot hold are refused as bad input, not an internal error.
"""

from __future__ import annotations

import os

import pytest

from controller.domain import validation as check
from controller.domain.errors import InvalidArgument as ControllerInvalid
from controller.k8s_nodes import KubernetesNodeLabels
from node_agent.agent.errors import InvalidArgument
from node_agent.agent.settings import DiskSpec, check_name
from node_agent.agent.volumes import VolumeManager
from node_agent.iscsi.names import check_iqn, normalize_name

MiB = 1 << 20


@pytest.mark.parametrize("value", ["vol\n", "vol\r", "vol\x00", "\nvol"])
def test_agent_ids_with_a_newline_or_control_character_are_refused(value):
    with pytest.raises(ValueError):
        check_name("volume_id", value)


@pytest.mark.parametrize("value", ["iqn.2026-11.io.x:c\n", "iqn.2026-11.io.x:c\r", "iqn.2026-11.io.x:a b",
                                   "iqn.2026-11.io.x:a\x00b", "eui.0123456789abcdef\n"])
def test_iscsi_names_with_whitespace_or_control_characters_are_refused(value):
    with pytest.raises(ValueError):
        check_iqn(value)
    with pytest.raises(ControllerInvalid):
        check.iqn(value)


def test_ordinary_iscsi_names_still_pass():
    for value in ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test", "iqn.2026-11.io.shoal:node:node-a",
                  "eui.0123456789abcdef", "naa.60014051234567890123456789abcdef"):
        assert check_iqn(value) == value
        assert check.iqn(value) == value


@pytest.mark.parametrize("checker, value", [
    (check.name, "vol\n"), (check.node_id, "node-a\n"), (check.disk_name, "data0\n"),
    (lambda v: check.address(v, "portal"), "127.0.0.1:3260\n"),
])
def test_controller_names_with_a_trailing_newline_are_refused(checker, value):
    with pytest.raises(ControllerInvalid):
        checker(value)


def test_labels_and_constraints_with_a_trailing_newline_are_refused():
    with pytest.raises(ControllerInvalid, match="value"):
        check.labels({"zone": "a\n"})
    with pytest.raises(ControllerInvalid, match="key"):
        check.labels({"zone\n": "a"})


def test_a_kubernetes_node_name_with_a_newline_is_not_looked_up():
    class NoApi:
        def read_node(self, name):  # pragma: no cover - must not be reached
            raise AssertionError(f"looked up {name!r}")
    from kubernetes.client import ApiClient
    labels = KubernetesNodeLabels(ApiClient())
    labels.core = NoApi()
    assert labels.node_labels("node-a\n") == {}


@pytest.fixture
def manager(tmp_path):
    return VolumeManager([DiskSpec("data0", str(tmp_path / "d0"))])


def test_a_volume_id_with_a_newline_creates_no_file(manager, tmp_path):
    with pytest.raises(InvalidArgument):
        manager.create("evil\n", MiB, "data0")
    assert manager.list() == []
    assert not any("\n" in name for _, _, names in os.walk(tmp_path) for name in names)


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 512])
def test_a_size_no_file_can_have_is_invalid_argument_not_an_internal_error(manager, size):
    with pytest.raises(InvalidArgument, match="larger than any file"):
        manager.create("big", size, "data0")
    assert manager.list() == []
    manager.create("small", MiB, "data0")
    with pytest.raises(InvalidArgument, match="larger than any file"):
        manager.expand("small", size)
    assert manager.get("small").size == MiB


def test_a_port_beyond_loopback_without_mutual_tls_is_warned_about():
    from node_agent.peer_names import exposure_warning
    for listen in ("127.0.0.1:7450", "[::1]:7450", "localhost:7450"):
        assert exposure_warning(listen, False, False, "S", "--tls") == ""
    assert exposure_warning("0.0.0.0:7450", True, True, "S", "--tls") == ""
    plain = exposure_warning("0.0.0.0:7450", False, False, "AdminService", "--tls-cert")
    assert "AdminService listens on 0.0.0.0:7450 (plaintext): anyone who reaches" in plain
    assert "(TLS without client certificates)" in exposure_warning("10.0.0.5:7451", True, False, "S", "--tls")
    assert exposure_warning("node-a.example:7451", False, False, "S", "--tls")  # a name: not known to be local


@pytest.mark.parametrize("given, normalized", [
    ("IQN.2026-11.IO.Shoal:Node-A", "iqn.2026-11.io.shoal:node-a"),  # B.2: case folded
    ("eui.02004567A425678D", "eui.02004567a425678d"),
    ("iqn.2026-11.io.shoal:\ufb01le\u00ad", "iqn.2026-11.io.shoal:file"),  # NFKC (the fi ligature); B.1 (soft hyphen)
    ("iqn.2026-11.io.shoal:\uff28\uff2f\uff33\uff34", "iqn.2026-11.io.shoal:host"),  # full-width letters
    ("iqn.2026-11.io.shoal:stra\u00dfe", "iqn.2026-11.io.shoal:strasse"),
])
def test_iscsi_names_compare_in_the_form_rfc_3722_normalizes_them_to(given, normalized):
    """RFC 7143 §4.2.7.2: names go through RFC 3722's stringprep (RFC 3454 B.1, B.2, NFKC) before they are
    compared; a name differing in anything else stays another name."""
    assert normalize_name(given) == normalized
    assert normalize_name(normalized) == normalized
    assert normalize_name("iqn.2026-11.io.shoal:node-b") != normalize_name("IQN.2026-11.IO.Shoal:Node-A")


def test_a_target_whose_name_differs_only_by_case_is_refused():
    """Logins find targets case-blind (``find_target``): two such targets would make a login's target a guess."""
    from node_agent.iscsi.target import TargetNode, TargetRegistry
    from node_agent.scsi.device import LunMap

    registry = TargetRegistry([TargetNode("iqn.2026-11.io.x:one", LunMap({}))])
    assert registry.add_target(TargetNode("iqn.2026-11.io.x:one", LunMap({}))).iqn == "iqn.2026-11.io.x:one"
    with pytest.raises(ValueError, match="differs from it only by case"):
        registry.add_target(TargetNode("iqn.2026-11.io.x:ONE", LunMap({})))
    assert list(registry.targets) == ["iqn.2026-11.io.x:one"]
