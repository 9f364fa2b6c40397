"""The node agent's Prometheus metrics, computed at scrape time.

``AgentCollector`` reads the running agent when Prometheus scrapes: the I/O
counters each exported LUN keeps (``LogicalUnit.io_counters``: plain integers
bumped on the READ/WRITE path), read on the portal's loop thread like every
other look at its logical units; exports, attachments, volumes and disks from
their managers.  Nothing is kept in step by hand.

Names (all prefixed ``shoal_agent_``):

* ``lun_read_commands_total``, ``lun_read_bytes_total``, ``lun_write_commands_total``,
  ``lun_write_bytes_total`` ``{volume}``: READ/WRITE commands that reached the medium and their
  bytes, per exported volume.  They count from when the export's LUN was opened (agent start or
  export), so they restart at zero after a restart or a re-export: Prometheus's ``rate()``
  handles such counter resets;
* ``lun_sanitize{volume, state}``: 1 for the state the volume's LUN is in as to SANITIZE, ``running``
  or ``failed`` (SBC-4 §4.11: media access ends with SANITIZE COMMAND FAILED until a sanitize completes or
  EXIT FAILURE MODE; the state outlives a restart), else 0: the one to alert on, as the guest sees only
  I/O errors;
* ``iscsi_sessions``: logged-in iSCSI sessions on this node's portal;
* ``exports``, ``export_initiators``: exported volumes, and initiators admitted over all of them;
* ``exports_unserved{volume}``: 1 for each export kept but not served since the agent started (its volume
  was missing, or serving it failed: ``ExportManager.unserved``; the log says why), until the controller's
  repeat of the export serves it: its consumers cannot log in meanwhile, so this is one to alert on;
* ``attachments{mode}``: volumes this node attached for its own use;
* ``volumes``; ``disk_capacity_bytes{disk}``, ``disk_free_bytes{disk}``.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node_agent.agent.attachments import MODES

if TYPE_CHECKING:
    from node_agent.agent.daemon import Agent
    from node_agent.target_service import TargetService

log = logging.getLogger("shoal.agent.metrics")

PREFIX = "shoal_agent"
SNAPSHOT_TIMEOUT = 5.0
"""Seconds a scrape waits for the portal's loop; a scrape must not hang behind a stuck loop."""

_IO = (("read_commands", "READ commands"), ("read_bytes", "bytes read"),
       ("write_commands", "WRITE commands"), ("write_bytes", "bytes written"))
_SANITIZE_STATES = ("running", "failed")


def portal_snapshot(service: TargetService) -> tuple[list[tuple[str, tuple[int, int, int, int], str]], int]:
    """(volume id, I/O counters, sanitize state) per logical unit, and the session count; run on the
    portal's loop."""
    units = [(unit.identity.volume_id, unit.io_counters(),
              "running" if unit.sanitizing else "failed" if unit.sanitize_failed else "") for unit in service.units]
    sessions = len(service.registry.sessions) if service.registry is not None else 0
    return units, sessions


class AgentCollector(Collector):
    """The agent's metrics; parts of the agent that are not running are left out."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        yield from self._portal()
        yield from self._state()

    def _portal(self):
        portal = self.agent.portal
        if portal is None:
            return
        try:
            units, sessions = portal.call_within(SNAPSHOT_TIMEOUT, portal_snapshot, portal.service)
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.warning("metrics: the iSCSI portal did not answer: %s", exc)
            return
        families = [CounterMetricFamily(f"{PREFIX}_lun_{name}", f"{text} on the volume's exported LUN.",
                                        labels=["volume"]) for name, text in _IO]
        totals: dict[str, list[int]] = {}
        sanitize: dict[str, set[str]] = {}
        for volume_id, counters, state in units:  # one LUN per volume; summed should a volume ever have more
            total = totals.setdefault(volume_id, [0, 0, 0, 0])
            for i, value in enumerate(counters):
                total[i] += value
            sanitize.setdefault(volume_id, set()).add(state)
        states = GaugeMetricFamily(f"{PREFIX}_lun_sanitize", "1 while the volume's LUN runs a SANITIZE (running) "
                                   "or refuses media access after one failed (failed).", labels=["volume", "state"])
        for volume_id in sorted(totals):
            for family, value in zip(families, totals[volume_id]):
                family.add_metric([volume_id], value)
            for state in _SANITIZE_STATES:
                states.add_metric([volume_id, state], int(state in sanitize[volume_id]))
        yield from families
        yield states
        yield GaugeMetricFamily(f"{PREFIX}_iscsi_sessions", "iSCSI sessions logged in to this node's portal.",
                                value=sessions)

    def _state(self):
        agent = self.agent
        if agent.exports is not None:
            records = agent.exports.records()
            yield GaugeMetricFamily(f"{PREFIX}_exports", "Volumes this node exports.", value=len(records))
            yield GaugeMetricFamily(f"{PREFIX}_export_initiators",
                                    "Initiators admitted, over all exports.",
                                    value=sum(len(r.initiators) for r in records))
            unserved = GaugeMetricFamily(f"{PREFIX}_exports_unserved", "1 for an export kept but not served "
                                         "(its volume missing at start, or serving it failed).", labels=["volume"])
            for volume_id in sorted(agent.exports.unserved()):
                unserved.add_metric([volume_id], 1)
            yield unserved
        if agent.attachments is not None:
            modes = Tally(a.mode for a in agent.attachments.list())
            family = GaugeMetricFamily(f"{PREFIX}_attachments", "Volumes attached on this node, by mode.",
                                       labels=["mode"])
            for mode in sorted(set(MODES) | set(modes)):
                family.add_metric([mode], modes[mode])
            yield family
        if agent.volumes is not None:
            yield GaugeMetricFamily(f"{PREFIX}_volumes", "Volumes on this node's disks.",
                                    value=len(agent.volumes.list()))
            capacity = GaugeMetricFamily(f"{PREFIX}_disk_capacity_bytes", "Capacity offered to pools.",
                                         labels=["disk"])
            free = GaugeMetricFamily(f"{PREFIX}_disk_free_bytes", "Free space on the disk.", labels=["disk"])
            for disk in agent.volumes.disks():
                capacity.add_metric([disk.name], disk.capacity)
                free.add_metric([disk.name], disk.free)
            yield capacity
            yield free
