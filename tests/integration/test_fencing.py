"""Fencing end to end: a real controller and three real agents on 127.0.0.1, Shoal's own initiator as hosts.

Volume vm1 lives on agent A.  Host B (an initiator logging in as node B's IQN, with the credentials of
``shoalctl volume connect``) registers a persistent reservation key with APTPL and keeps writes in flight,
each block a numbered record; host C is published ``--shared`` (a live migration target) and registers its own
key.  ``shoalctl node fence node-b`` returns fenced, with one step per owner; then: B's session is gone and its
re-login is refused, C's READ KEYS no longer shows B's key (C got REGISTRATIONS PREEMPTED's counterpart: the
generation moved), and no record B submitted after the fence returned is on A's disk.  Publishing to B is
refused while fenced; ``unfence`` lets it back in (publish, login).  SPC-4 §5.13.11.5 (PREEMPT AND ABORT),
RFC 7143 §6.3.5 (sessions).  Mocks: none.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient
from node_agent.iscsi.initiator.core import LoginError
from protos.shoal.v1 import agent_pb2
from tests.integration.conftest import stub_for
from tests.integration.test_connect import backing_file, ctl, wait_nodes
from tests.support.controller_process import running, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MiB = 1 << 20
BLOCK = 512
K_B, K_C = 0xB0B0_0000_0000_000B, 0xC0C0_0000_0000_000C
MAGIC = b"SHOALREC"


def prout_register(key: int, aptpl: bool) -> tuple[bytes, bytes]:
    cdb = bytes([0x5F, 0x06, 0, 0, 0, 0, 0, 0, 24, 0])  # REGISTER AND IGNORE EXISTING KEY
    data = bytes(8) + key.to_bytes(8, "big") + bytes(4) + bytes([0x01 if aptpl else 0]) + bytes(3)
    return cdb, data


async def read_keys(client: IscsiClient) -> tuple[int, list[int]]:
    done = await client.execute(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_length=4096)
    data = bytes(done.data)
    count = int.from_bytes(data[4:8], "big") // 8
    return int.from_bytes(data[:4], "big"), [int.from_bytes(data[8 + 8 * i:16 + 8 * i], "big") for i in range(count)]


def record(seq: int) -> bytes:
    return (MAGIC + seq.to_bytes(8, "big")).ljust(BLOCK, b"\xee")


def write10(lba: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, 1, 0])


class HostB(threading.Thread):
    """Node B's host: registers, then writes records 1, 2, ... (8 in flight) until told to stop."""

    def __init__(self, portal: str, target: str, iqn: str, chap: tuple[str, str]):
        super().__init__(daemon=True)
        self.portal, self.target, self.iqn, self.chap = portal, target, iqn, chap
        self.registered = threading.Event()
        self.fence_returned = threading.Event()
        self.stop = threading.Event()
        self.acked: list[int] = []
        self.after_fence: set[int] = set()  # records submitted once the fence had returned
        self.failures: list[str] = []

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        host, port = self.portal.rsplit(":", 1)
        settings = ClientSettings(initiator_iqn=self.iqn, reconnect_timeout=1.0, login_timeout=5.0)
        client = IscsiClient(host, int(port), self.target, settings=settings, chap=self.chap)
        await client.connect()
        cdb, data = prout_register(K_B, aptpl=True)
        await client.execute(cdb, data_out=data)
        self.registered.set()
        seq = 0
        while not self.stop.is_set():
            batch = []
            for _ in range(8):
                seq += 1
                if self.fence_returned.is_set():
                    self.after_fence.add(seq)
                batch.append(self._write(client, seq))
            await asyncio.gather(*batch)
            if self.failures:
                await asyncio.sleep(0.05)
        try:
            await client.close()
        except Exception:  # noqa: BLE001 - the session is gone already
            pass

    async def _write(self, client: IscsiClient, seq: int) -> None:
        try:
            await client.execute(write10(1000 + seq % 100_000), data_out=record(seq))
            self.acked.append(seq)
        except Exception as exc:  # noqa: BLE001 - what the fence does to B's commands
            self.failures.append(type(exc).__name__)


async def login(portal: str, target: str, iqn: str, chap: tuple[str, str]) -> IscsiClient:
    host, port = portal.rsplit(":", 1)
    settings = ClientSettings(initiator_iqn=iqn, reconnect_timeout=1.0, login_timeout=5.0)
    return await IscsiClient(host, int(port), target, settings=settings, chap=chap).connect()


def records_on_disk(path: Path) -> set[int]:
    data = path.read_bytes()
    found, at = set(), data.find(MAGIC)
    while at >= 0:
        if at % BLOCK == 0:
            found.add(int.from_bytes(data[at + 8:at + 16], "big"))
        at = data.find(MAGIC, at + 1)
    return found


def test_fence_cuts_a_writing_host_off_and_unfence_lets_it_back(tmp_path):
    controller = start_controller(tmp_path / "controller")
    with running(controller), \
            running(start_agent(tmp_path / "a", "node-a", controller.address)), \
            running(start_agent(tmp_path / "b", "node-b", controller.address)) as agent_b, \
            running(start_agent(tmp_path / "c", "node-c", controller.address)):
        address = controller.address
        wait_nodes(address, 3)
        ctl(address, "pool", "create", "vms", "--member", "node-a/data0")
        ctl(address, "volume", "create", "vm1", "--size", "64MiB", "--pool", "vms")
        b = json.loads(ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu",
                           "--secret-file", str(tmp_path / "b.secret"), "-o", "json").stdout)
        c = json.loads(ctl(address, "volume", "connect", "vm1", "--node", "node-c", "--format", "qemu", "--shared",
                           "--secret-file", str(tmp_path / "c.secret"), "-o", "json").stdout)
        chap = (b["chap_user"], (tmp_path / "b.secret").read_text())
        chap_c = (c["chap_user"], (tmp_path / "c.secret").read_text())
        assert chap[1] != chap_c[1]  # each node has its own secret for the volume
        portal, target = b["portal"], b["target_iqn"]

        host_b = HostB(portal, target, b["initiator_iqn"], chap)
        host_b.start()
        loop = asyncio.new_event_loop()
        try:
            assert host_b.registered.wait(20)
            client_c = loop.run_until_complete(login(portal, target, c["initiator_iqn"], chap_c))
            cdb, data = prout_register(K_C, aptpl=True)
            loop.run_until_complete(client_c.execute(cdb, data_out=data))
            generation, keys = loop.run_until_complete(read_keys(client_c))
            assert sorted(keys) == sorted([K_B, K_C])
            deadline = time.monotonic() + 20
            while len(host_b.acked) < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(host_b.acked) >= 200, "host B's writes do not go through"

            channel, stub = stub_for(agent_b.address)
            try:  # B's agent recorded the publish (the hypervisor logged in, not the agent)
                assert len(stub.GetState(agent_pb2.GetStateRequest()).attachments) == 1
            finally:
                channel.close()

            # The fence, while B writes.
            fenced = ctl(address, "node", "fence", "node-b", "--reason", "test: host B lost")
            host_b.fence_returned.set()
            assert "node node-b is fenced (test: host B lost)" in fenced.stdout
            assert "node-a: fenced: 1 target(s) no longer admit" in fenced.stdout
            assert "1 session(s) closed, 1 reservation registration(s) removed" in fenced.stdout
            time.sleep(3)  # B keeps submitting: its client reconnects, is refused, and gives up
            host_b.stop.set()
            host_b.join(30)
            assert host_b.failures and host_b.after_fence, "B's writes after the fence must have been tried"

            # B's key is gone (C, still admitted, sees it), B cannot log in again.
            generation_after, keys = loop.run_until_complete(read_keys(client_c))
            assert keys == [K_C] and generation_after > generation
            with pytest.raises(LoginError):
                loop.run_until_complete(login(portal, target, b["initiator_iqn"], chap))
            # Nor under C's name, which the target still admits: B's secret is B's alone.
            with pytest.raises(Exception, match="authentication failed"):
                loop.run_until_complete(login(portal, target, c["initiator_iqn"], chap))
            # No record B submitted after the fence returned reached A's disk; those acked before did.
            on_disk = records_on_disk(backing_file(tmp_path / "a", 64 * MiB))
            assert not on_disk & host_b.after_fence
            assert set(host_b.acked) - host_b.after_fence <= on_disk  # fewer than 100000 records: none overwritten

            # B's agent, heartbeating while fenced, is told to forget its attachment of vm1.
            channel, stub = stub_for(agent_b.address)
            try:
                deadline = time.monotonic() + 20
                while stub.GetState(agent_pb2.GetStateRequest()).attachments and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert list(stub.GetState(agent_pb2.GetStateRequest()).attachments) == []
            finally:
                channel.close()

            shown = json.loads(ctl(address, "node", "show", "node-b", "-o", "json").stdout)
            assert shown["fence"] == "fenced" and shown["fence_steps"][0].startswith("node-a: fenced")
            text = ctl(address, "node", "show", "node-b").stdout
            assert "Fence:" in text and "node-a: fenced" in text
            # Nothing is published to B while fenced; its volume may go elsewhere without --shared.
            refused = ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu", "--shared",
                          "--secret-file", str(tmp_path / "b2.secret"), rc=1)
            assert "node-b is fenced" in refused.stderr
            loop.run_until_complete(client_c.close())
            ctl(address, "volume", "disconnect", "vm1", "--node", "node-c")
            ctl(address, "volume", "connect", "vm1", "--node", "node-c", "--format", "qemu",
                "--secret-file", str(tmp_path / "c.secret"))
            ctl(address, "node", "unfence", "node-b", rc=0)
            assert json.loads(ctl(address, "node", "show", "node-b", "-o", "json").stdout)["fence"] == ""

            # Back in: published again (shared with C), B logs in.
            ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu", "--shared",
                "--secret-file", str(tmp_path / "b.secret"))
            client_b = loop.run_until_complete(login(portal, target, b["initiator_iqn"], chap))
            loop.run_until_complete(client_b.close())
        finally:
            host_b.stop.set()
            loop.close()


def test_the_controller_fences_a_silent_node_after_the_grace(tmp_path):
    """``shoal controller --fence-grace``: a node whose agent died is fenced by the controller's loop, its
    volume's export to it removed at the owner, and the volume may be published elsewhere."""
    controller = start_controller(tmp_path / "controller", heartbeat_timeout=2.0,
                                  extra_args=["--fence-grace", "3"])
    with running(controller), \
            running(start_agent(tmp_path / "a", "node-a", controller.address)) as agent_a, \
            running(start_agent(tmp_path / "b", "node-b", controller.address)) as agent_b, \
            running(start_agent(tmp_path / "c", "node-c", controller.address)):
        address = controller.address
        wait_nodes(address, 3)
        ctl(address, "pool", "create", "vms", "--member", "node-a/data0")
        ctl(address, "volume", "create", "vm1", "--size", "16MiB", "--pool", "vms")
        ctl(address, "volume", "connect", "vm1", "--node", "node-b", "--format", "qemu",
            "--secret-file", str(tmp_path / "b.secret"))
        agent_b.kill()  # the host dies
        deadline = time.monotonic() + 60
        node = {}
        while time.monotonic() < deadline:
            node = json.loads(ctl(address, "node", "show", "node-b", "-o", "json").stdout)
            if node["fence"] == "fenced":
                break
            time.sleep(0.3)
        assert node["fence"] == "fenced", node
        assert "no heartbeat for" in node["fence_reason"] and node["fence_steps"][0].startswith("node-a: fenced")
        channel, stub = stub_for(agent_a.address)
        try:
            exports = stub.GetState(agent_pb2.GetStateRequest()).exports
            assert all(node["initiator_iqn"] not in e.initiators for e in exports)
        finally:
            channel.close()
        ctl(address, "volume", "connect", "vm1", "--node", "node-c", "--format", "qemu",
            "--secret-file", str(tmp_path / "c.secret"))
