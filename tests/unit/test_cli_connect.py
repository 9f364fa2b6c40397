"""``shoalctl volume connect`` renderers and secret file (controller/cli/connect.py), without a controller:
the JSON contract of ``--format qemu``, well-formed libvirt XML (xml.etree), the secret written 0600 and only
there.  The real QEMU run against an agent's target is tests/integration/test_connect.py."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET

import pytest

from controller.cli import connect
from controller.cli.api import EXIT_USAGE
from controller.cli.main import main
from protos.shoal.v1 import admin_pb2, common_pb2

TARGET = "iqn.2024-01.io.shoal:node-a:0b5e"
NODE_IQN = "iqn.2024-01.io.shoal:node-b"


def attachment(shared=False):
    return admin_pb2.Attachment(
        volume="vm-disk", node="node-b", state="published", shared=shared, initiator_iqn=NODE_IQN,
        export=common_pb2.ExportInfo(target_iqn=TARGET, portals=["127.0.0.1:3260", "10.0.0.1:3260"], lun=0,
                                     serial="0b5e", chap_user="shoal-0b5e"))


def test_qemu_json_fields_exactly():
    data = connect.qemu_connection(attachment(shared=True), "/run/shoal/vm-disk.secret")
    assert list(data) == ["volume", "node", "format", "shared", "portal", "portals", "target_iqn", "lun",
                          "initiator_iqn", "chap_user", "secret_file", "secret_id", "node_name", "url", "qemu_args"]
    assert data["url"] == f"iscsi://shoal-0b5e@127.0.0.1:3260/{TARGET}/0"
    assert data["qemu_args"] == [
        "-object", "secret,id=shoal-secret-vm-disk,format=raw,file=/run/shoal/vm-disk.secret",
        "-blockdev", f"driver=iscsi,node-name=shoal-vm-disk,transport=tcp,portal=127.0.0.1:3260,target={TARGET},"
                     f"lun=0,user=shoal-0b5e,password-secret=shoal-secret-vm-disk,initiator-name={NODE_IQN},"
                     "cache.direct=on"]
    assert (data["shared"], data["initiator_iqn"], data["portals"][1]) == (True, NODE_IQN, "10.0.0.1:3260")


def test_libvirt_xml_is_well_formed_and_names_the_node_and_the_secret_by_usage():
    data = connect.libvirt_connection(attachment(), "/s")
    disk = ET.fromstring(data["disk_xml"])
    source = disk.find("source")
    assert (disk.get("type"), source.get("protocol"), source.get("name")) == ("network", "iscsi", f"{TARGET}/0")
    assert [(h.get("name"), h.get("port")) for h in source.findall("host")] == [("127.0.0.1", "3260"),
                                                                               ("10.0.0.1", "3260")]
    assert source.find("initiator/iqn").get("name") == NODE_IQN
    assert source.find("auth").get("username") == "shoal-0b5e"
    assert source.find("auth/secret").attrib == {"type": "iscsi", "usage": "shoal-vm-disk"}
    secret = ET.fromstring(data["secret_xml"])
    assert secret.find("usage").get("type") == "iscsi" and secret.find("usage/target").text == "shoal-vm-disk"
    assert secret.find("value") is None  # no secret in the XML


def test_secret_file_is_0600_without_newline_and_replaced_atomically(tmp_path):
    path = tmp_path / "s"
    path.write_text("old")
    connect.write_secret(str(path), "Zx9-secret")
    assert path.read_bytes() == b"Zx9-secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize("args, message", [
    (["--format", "qemu"], "needs --secret-file"),
    (["--format", "libvirt", "--secret-file", "/nonexistent/dir/s"], "directory does not exist"),
    (["--format", "device", "--secret-file", "/tmp/s"], "is for --format qemu or libvirt"),
])
def test_usage_errors_send_nothing(args, message, capsys, monkeypatch):
    monkeypatch.setattr("controller.cli.api.Api.call", lambda *a, **k: pytest.fail("nothing may be sent"))
    rc = main(["--controller", "127.0.0.1:1", "volume", "connect", "vm-disk", "--node", "node-b", *args])
    assert rc == EXIT_USAGE
    assert message in capsys.readouterr().err
