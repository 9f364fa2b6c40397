"""Fence and unfence of a node that has a volume attached through the userspace connector, as on ``make up``.

The ``make up`` shape: one agent, node "vm", owning volume c2 and attaching it to itself (Shoal's initiator,
FUSE, a loop device).  ``shoalctl node fence vm`` cuts vm's initiator off vm's own target; the agent's
session to it then reconnects, refused, until its reconnect timeout (30 s) ends.  Before the fix the agent
detached the volumes its heartbeat answer named on the heartbeat thread, where the flush waited for that
reconnect: no heartbeat for 30 s, so the node was marked unhealthy and the next attach refused; and ``node
unfence`` waited as long for its own DetachVolume to the agent.  Now heartbeats go on throughout, unfence
returns within ``controller.domain.fencing.FORGET_WAIT`` (plus shoalctl's start), and the volume attaches
again.  Mocks: none (a real controller and agent, shoalctl).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from controller.domain.fencing import FORGET_WAIT
from tests.conftest import require_loop_and_fuse
from tests.integration.test_connect import ctl, wait_nodes
from tests.support.controller_process import running, start_agent, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HEARTBEAT_TIMEOUT = 8.0  # the controller's: well below the 30 s a flush on the cut-off session waits


class HealthWatch(threading.Thread):
    """Polls ``node list`` and keeps every health seen for node vm, until stopped."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address = address
        self.seen: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.3):
            nodes = json.loads(ctl(self.address, "node", "list", "-o", "json").stdout)["nodes"]
            self.seen += [n["health"] for n in nodes if n["id"] == "vm"]

    def stop(self) -> list[str]:
        self.halt.set()
        self.join(30)
        return self.seen


def test_fence_and_unfence_of_a_node_using_its_own_volume(tmp_path):
    require_loop_and_fuse("losetup")
    controller = start_controller(tmp_path / "controller", heartbeat_interval=0.5,
                                  heartbeat_timeout=HEARTBEAT_TIMEOUT)
    with running(controller), running(start_agent(tmp_path / "vm", "vm", controller.address)) as agent:
        address = controller.address
        wait_nodes(address, 1)
        ctl(address, "volume", "create", "c2", "--size", "16MiB")
        device = json.loads(ctl(address, "volume", "attach", "c2", "--node", "vm", "-o", "json").stdout)
        assert device["state"] == "attached" and device["device_path"].startswith("/dev/loop")
        try:
            watch = HealthWatch(address)
            watch.start()
            try:
                fenced = json.loads(ctl(address, "node", "fence", "vm", "-o", "json").stdout)
                assert fenced["fence"] == "fenced"
                # Heartbeats (every 0.5 s) answered "drop c2" meanwhile: the agent's drop now waits on the refused
                # reconnect.  The node is still healthy: unfence asks its agent to detach c2.
                time.sleep(1.5)
                started = time.monotonic()
                unfenced = json.loads(ctl(address, "node", "unfence", "vm", "-o", "json").stdout)
                took = time.monotonic() - started
                time.sleep(HEARTBEAT_TIMEOUT + 2)  # the drop may still wait: the node stays healthy meanwhile
            finally:
                seen = watch.stop()
            assert unfenced["fence"] == ""
            assert took < FORGET_WAIT + 5 and seen and set(seen) == {"healthy"}, \
                f"unfence took {took:.1f} s; node vm was {sorted(set(seen))} while fenced or after"
            assert "heartbeat failed" not in agent.log()
            again = json.loads(ctl(address, "volume", "attach", "c2", "--node", "vm", "-o", "json").stdout)
            assert again["state"] == "attached" and again["device_path"].startswith("/dev/loop")
        finally:
            ctl(address, "volume", "detach", "c2", "--node", "vm")
        assert json.loads(ctl(address, "volume", "show", "c2", "-o", "json").stdout)["attached_nodes"] == []
