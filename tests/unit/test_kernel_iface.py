"""The kernel connector logs in with the agent's initiator name, and the agent announces it only with iscsid.

Every export's ACL admits one name, the agent's ``iqn.2026-11.io.shoal:node:<node>``.
open-iscsi's ``default`` iface presents the host's /etc/iscsi/initiatorname.iscsi
instead, so the connector keeps an iface record of its own (``-I shoal``) whose
``iface.initiatorname`` is the agent's name; iscsid takes a session's InitiatorName
from it (open-iscsi usr/initiator.c ``__session_create``; RFC 7143 §13.6 InitiatorName).
``FakeKernel`` (tests/unit/test_host_kernel.py) plays open-iscsi at our runner
boundary: its target admits only the agent's name, as the export's ACL does.
The same login runs for real in the Debian guest of tests/peer/test_kernel_connector.py,
whose /etc/iscsi/initiatorname.iscsi holds another name.
"""

from __future__ import annotations

import dataclasses
import socket
import uuid

import pytest

from node_agent.host.connector import PermanentConnectorError
from node_agent.host.kernel import KernelConnector, parse_sessions
from tests.unit.test_host_kernel import (
    AGENT_IQN,
    HOST_IQN,
    IFACE_SETUP,
    IQN,
    PORTAL,
    SESSION_P3,
    FakeKernel,
    FakeSession,
    any_node,
    iface,
    node,
    volume,
)


@pytest.fixture
def kernel(tmp_path):
    return FakeKernel(tmp_path, {0: "vol-a", 1: "vol-b"})


def connector_with(kernel: FakeKernel, **changes) -> KernelConnector:
    return KernelConnector(runner=kernel.runner, settings=dataclasses.replace(kernel.settings(), **changes))


# --------------------------------------------------------------------------- the iface record

def test_the_login_presents_the_agents_name_through_the_connectors_own_iface(kernel):
    """The export's ACL admits only the agent's name: the login must not use the host's (``default`` iface)."""
    device = kernel.connector().attach(volume(0))
    calls, _ = kernel.take()
    assert calls[1:5] == IFACE_SETUP                     # before the node record copies the iface
    assert calls.index(IFACE_SETUP[-1]) < calls.index(node("-o", "new")) < calls.index(node("--login"))
    assert kernel.ifaces["shoal"] == {"iface.transport_name": "tcp", "iface.initiatorname": AGENT_IQN}
    assert kernel.records == {PORTAL: "shoal"}
    session = kernel.sessions[PORTAL]
    assert (session.iface, session.initiator) == ("shoal", AGENT_IQN)
    assert device.path.endswith("sda")
    login = [c for c in calls if "--login" in c]
    assert login == [["iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "-I", "shoal", "--login"]]
    assert not any("default" in c for c in calls)


def test_an_iface_that_already_carries_the_name_is_only_read(kernel):
    """Idempotent: the next login (a later attach, a restarted agent) changes nothing in the iface record."""
    kernel.connector().attach(volume(0))
    kernel.connector().detach(volume(0))
    kernel.take()
    kernel.connector().attach(volume(0))
    calls, _ = kernel.take()
    assert [c for c in calls if c[:3] == ["iscsiadm", "-m", "iface"]] == [iface("-o", "show")]


def test_an_iface_with_another_name_is_updated_not_recreated(kernel):
    """``-o new`` would reset an existing record to defaults: an existing iface only gets ``-o update``."""
    kernel.ifaces["shoal"] = {"iface.transport_name": "tcp", "iface.initiatorname": "iqn.2026-11.io.shoal:node:old"}
    kernel.connector().attach(volume(0))
    calls, _ = kernel.take()
    assert [c for c in calls if c[:3] == ["iscsiadm", "-m", "iface"]] == [
        iface("-o", "show"), iface("-o", "update", "-n", "iface.initiatorname", "-v", AGENT_IQN)]
    assert kernel.sessions[PORTAL].initiator == AGENT_IQN


def test_an_iface_with_another_transport_is_switched_to_tcp(kernel):
    kernel.ifaces["shoal"] = {"iface.transport_name": "iser", "iface.initiatorname": AGENT_IQN}
    kernel.connector().attach(volume(0))
    calls, _ = kernel.take()
    assert [c for c in calls if c[:3] == ["iscsiadm", "-m", "iface"]] == [
        iface("-o", "show"), iface("-o", "update", "-n", "iface.transport_name", "-v", "tcp")]


def test_without_an_initiator_name_nothing_logs_in(kernel):
    """No silent fallback to /etc/iscsi/initiatorname.iscsi: a connector without the agent's name refuses."""
    with pytest.raises(PermanentConnectorError, match="initiator name"):
        connector_with(kernel, initiator_iqn=None).attach(volume(0))
    calls, _ = kernel.take()
    assert calls == [SESSION_P3] and not kernel.sessions and not kernel.ifaces


@pytest.mark.parametrize("builtin", ["default", "iser"])
def test_open_iscsis_builtin_ifaces_are_refused(kernel, builtin):
    """``default`` and ``iser`` cannot be updated (usr/iface.c), so they cannot carry the agent's name."""
    with pytest.raises(PermanentConnectorError, match="built into open-iscsi"):
        connector_with(kernel, iface=builtin).attach(volume(0))
    assert not kernel.sessions


def test_iface_records_are_parsed():
    from node_agent.host.kernel import parse_record

    text = ("# BEGIN RECORD 2.1.8\niface.iscsi_ifacename = shoal\niface.transport_name = tcp\n"
            "iface.initiatorname = <empty>\n# END RECORD\n")
    assert parse_record(text) == {"iface.iscsi_ifacename": "shoal", "iface.transport_name": "tcp",
                                  "iface.initiatorname": ""}


# --------------------------------------------------------------------------- sessions of an older Shoal

def legacy_session(kernel: FakeKernel, luns: dict[int, str]) -> FakeSession:
    """A session an older Shoal logged in through the ``default`` iface (the host's name)."""
    session = FakeSession(kernel.next_sid, kernel.next_host, PORTAL, iface="default", initiator=HOST_IQN)
    kernel.next_sid, kernel.next_host = kernel.next_sid + 1, kernel.next_host + 1
    kernel.sessions[PORTAL] = session
    kernel.add_record(iface_name="default")
    for lun, volume_id in luns.items():
        disk = "sd" + chr(ord("a") + kernel.next_disk)
        kernel.next_disk += 1
        session.luns[lun] = disk
        kernel.add_disk(session, lun, disk, volume_id)
    return session


def test_a_session_made_through_the_default_iface_still_counts_and_is_reused(kernel):
    """Sessions are matched by target and portal, whatever their iface: the LUN attached before the upgrade is
    found, a second LUN joins the same session, and nothing logs in again."""
    legacy_session(kernel, {0: "vol-a"})
    connector = kernel.connector()
    assert connector.attach(volume(0)).path.endswith("sda")
    assert connector.attach(volume(1, "vol-b")).path.endswith("sdb")
    calls, _ = kernel.take()
    assert calls == [SESSION_P3, SESSION_P3]
    assert connector.registry.holders(volume(0).session_key) == {0, 1}


def test_detaching_the_last_lun_of_a_default_iface_session_logs_it_out_and_deletes_its_record(kernel):
    legacy_session(kernel, {0: "vol-a"})
    kernel.connector().detach(volume(0))
    calls, _ = kernel.take()
    assert calls[-2:] == [any_node("--logout"), any_node("-o", "delete")]  # no -I: every iface
    assert not kernel.sessions and not kernel.records


def test_the_session_listing_parser_reads_sessions_of_either_iface():
    text = "\n".join([
        "iSCSI Transport Class version 2.0-870", "version 2.1.8", f"Target: {IQN} (non-flash)",
        f"\tCurrent Portal: {PORTAL},1", f"\tPersistent Portal: {PORTAL},1",
        "\t\t**********", "\t\tInterface:", "\t\t**********", "\t\tIface Name: default",
        f"\t\tIface Initiatorname: {HOST_IQN}", "\t\tSID: 1", "\t\tHost Number: 2\tState: running",
        "\t\tscsi2 Channel 00 Id 0 Lun: 0", "\t\t\tAttached scsi disk sda\t\tState: running",
        "", "\t\t**********", "\t\tInterface:", "\t\t**********", "\t\tIface Name: shoal",
        f"\t\tIface Initiatorname: {AGENT_IQN}", "\t\tSID: 2", "\t\tHost Number: 3\tState: running",
        "\t\tscsi3 Channel 00 Id 0 Lun: 1", "\t\t\tAttached scsi disk sdb\t\tState: running", ""])
    assert [(s.sid, s.portal, s.host, s.disk(s.luns[0].lun)) for s in parse_sessions(text)] == [
        (1, PORTAL, 2, "sda"), (2, PORTAL, 3, "sdb")]


# --------------------------------------------------------------------------- the agent's wiring

def test_the_agents_kernel_connector_carries_the_agents_initiator_name(tmp_path):
    from node_agent.agent.daemon import KERNEL, default_connectors
    from node_agent.agent.settings import AgentSettings

    settings = AgentSettings(node_id="node-k", data_dir=str(tmp_path))
    connector = default_connectors(settings)[KERNEL]()
    assert connector.settings.initiator_iqn == settings.initiator_iqn == "iqn.2026-11.io.shoal:node:node-k"


# --------------------------------------------------------------------------- which connector the agent announces

@pytest.fixture
def kernel_host(tmp_path):
    """A /sys/module with iscsi_tcp loaded."""
    (tmp_path / "iscsi_tcp").mkdir()
    return str(tmp_path)


def test_kernel_is_announced_only_where_iscsid_answers(kernel_host):
    from node_agent.host.connector import preferred_connector

    assert preferred_connector(kernel_host, iscsiadm="/sbin/iscsiadm", iscsid=lambda: True) == "kernel"
    # iscsi_tcp and iscsiadm alone do not log in: without iscsid every login would fail (exit 20)
    assert preferred_connector(kernel_host, iscsiadm="/sbin/iscsiadm", iscsid=lambda: False) == "userspace"


def test_iscsid_is_not_asked_where_the_kernel_initiator_cannot_run(kernel_host, tmp_path):
    from node_agent.host.connector import preferred_connector

    def never():
        raise AssertionError("iscsid probed although iscsi_tcp or iscsiadm is missing")

    assert preferred_connector(kernel_host, iscsiadm="", iscsid=never) == "userspace"
    assert preferred_connector(str(tmp_path / "none"), iscsiadm="/sbin/iscsiadm", iscsid=never) == "userspace"


def test_the_iscsid_probe_connects_to_an_abstract_socket():
    """``iscsid_reachable`` is what iscsiadm's ``ipc_connect`` does first: connect to the abstract socket."""
    from node_agent.host.connector import ISCSID_SOCKET, iscsid_reachable

    assert ISCSID_SOCKET == "\0ISCSIADM_ABSTRACT_NAMESPACE"  # usr/mgmt_ipc.h ISCSIADM_NAMESPACE
    address = f"\0shoal-test-iscsid-{uuid.uuid4().hex}"
    assert iscsid_reachable(address) is False                # nobody listens: ECONNREFUSED
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(address)
        listener.listen(1)
        assert iscsid_reachable(address) is True
    assert iscsid_reachable(address) is False
