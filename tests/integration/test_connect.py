"""``shoalctl volume connect`` end to end: a real controller and three real agents on 127.0.0.1, and QEMU.

The volume lives on agent A.  ``connect --format qemu --node node-b`` publishes it to B without a login and
writes the CHAP secret to a 0600 file; QEMU's own iSCSI driver (``qemu-img info`` / ``qemu-io`` from
qemu-utils + qemu-block-extra, libiscsi inside) opens it with exactly the printed arguments, logging in as
node B, writes a pattern; the pattern is then read back through another path (A's backing file).  A second
node is refused without ``--shared`` and accepted with it; ``--format libvirt`` prints well-formed XML;
the secret shows in no output, argument list or log.  Mocks: none.
"""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.support.controller_process import running, shoalctl, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MiB = 1 << 20
PATTERN = 0x5A


def ctl(address: str, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    result = shoalctl(address, *args)
    assert result.returncode == rc, f"shoalctl {' '.join(args)}: rc {result.returncode}\n{result.stderr}"
    return result


def wait_nodes(address: str, count: int) -> None:
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = json.loads(ctl(address, "node", "list", "-o", "json").stdout)["nodes"]
        if sum(n["health"] == "healthy" for n in nodes) == count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} healthy nodes expected")


def backing_file(root: Path, size: int) -> Path:
    [path] = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size == size
              and not p.name.endswith((".json", ".pr", ".sanitize"))]
    return path


def test_connect_qemu_libvirt_and_second_writer(tmp_path):
    require_tools("qemu-io", "qemu-img")
    controller = start_controller(tmp_path / "controller")
    with running(controller), \
            running(start_agent(tmp_path / "a", "node-a", controller.address)) as agent_a, \
            running(start_agent(tmp_path / "b", "node-b", controller.address)) as agent_b, \
            running(start_agent(tmp_path / "c", "node-c", controller.address)) as agent_c:
        address = controller.address
        wait_nodes(address, 3)
        ctl(address, "pool", "create", "vms", "--member", "node-a/data0")
        ctl(address, "volume", "create", "vm1", "--size", "64MiB", "--pool", "vms")
        secret_file = tmp_path / "vm1-b.secret"
        outputs = []

        # A usage error sends nothing; the qemu connection info, as JSON.
        result = ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu", rc=2)
        assert "--secret-file" in result.stderr
        result = ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu",
                     "--secret-file", str(secret_file), "-o", "json")
        outputs += [result.stdout, result.stderr]
        info = json.loads(result.stdout)
        node_b = json.loads(ctl(address, "node", "show", "node-b", "-o", "json").stdout)
        assert (info["node"], info["format"], info["shared"], info["lun"]) == ("node-b", "qemu", False, 0)
        assert info["initiator_iqn"] == node_b["initiator_iqn"] and info["portal"] == info["portals"][0]
        assert info["url"] == f"iscsi://{info['chap_user']}@{info['portal']}/{info['target_iqn']}/0"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text()
        assert len(secret) >= 16 and "\n" not in secret
        shown = json.loads(ctl(address, "volume", "show", "vm1", "-o", "json").stdout)
        assert shown["attached_nodes"] == ["node-b"]
        text = ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu",
                   "--secret-file", str(secret_file)).stdout  # a repeat, ready-to-paste text
        outputs.append(text)
        assert "-blockdev" in text and "password-secret=" in text

        # QEMU opens it with exactly those arguments (as node B), writes; A's disk has the pattern.
        object_arg, blockdev = info["qemu_args"][1], info["qemu_args"][3]
        image = subprocess.run(["qemu-img", "info", "--object", object_arg, "--image-opts", blockdev],
                               capture_output=True, text=True, timeout=60)
        assert image.returncode == 0, image.stderr
        assert f"virtual size: 64 MiB ({64 * MiB} bytes)" in image.stdout
        io = subprocess.run(["qemu-io", "--object", object_arg, "--image-opts", blockdev,
                             "-c", f"write -P {PATTERN} 1M 64k", "-c", f"read -P {PATTERN} 1M 64k"],
                            capture_output=True, text=True, timeout=60)
        assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr
        with open(backing_file(tmp_path / "a", 64 * MiB), "rb") as handle:
            handle.seek(MiB)
            assert handle.read(64 * 1024) == bytes([PATTERN]) * 64 * 1024

        # As another initiator name (node C's, not admitted), QEMU is refused.
        wrong = blockdev.replace(info["initiator_iqn"], info["initiator_iqn"].replace("node-b", "node-c"))
        assert wrong != blockdev
        refused = subprocess.run(["qemu-img", "info", "--object", object_arg, "--image-opts", wrong],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0

        # A second node: refused without --shared (nothing changes), accepted with it.
        secret_c = tmp_path / "vm1-c.secret"
        result = ctl(address, "volume", "connect", "vm1", "--node", "node-c", "--format", "libvirt",
                     "--secret-file", str(secret_c), rc=1)
        assert "published to node-b" in result.stderr and "--shared" in result.stderr
        assert "FAILED_PRECONDITION" in result.stderr and not secret_c.exists()
        result = ctl(address, "volume", "connect", "vm1", "--node", "node-c", "--format", "libvirt", "--shared",
                     "--secret-file", str(secret_c), "-o", "json")
        outputs += [result.stdout, result.stderr]
        xml = json.loads(result.stdout)
        disk = ET.fromstring(xml["disk_xml"])
        assert disk.find("source/initiator/iqn").get("name").endswith("node-c")
        assert ET.fromstring(xml["secret_xml"]).find("usage/target").text == "shoal-vm1"
        assert secret_c.read_text() != secret  # each node its own secret for the volume (chap.py)
        secrets = [secret, secret_c.read_text()]
        assert json.loads(ctl(address, "volume", "show", "vm1", "-o", "json").stdout)["attached_nodes"] == \
            ["node-b", "node-c"]

        ctl(address, "volume", "disconnect", "vm1", "--node", "node-c")
        ctl(address, "volume", "disconnect", "vm1", "--node", "node-c")  # a repeat: OK
        ctl(address, "volume", "disconnect", "vm1", "--node", "node-b")
        assert json.loads(ctl(address, "volume", "show", "vm1", "-o", "json").stdout)["attached_nodes"] == []

        logs = [controller.log(), agent_a.log(), agent_b.log(), agent_c.log()]
    for text in outputs + logs:
        assert not any(value in text for value in secrets)
