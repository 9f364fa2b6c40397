"""The controller's Prometheus metrics.

Gauges are read from the store when Prometheus scrapes (``StateCollector``),
never kept in step by hand: what ``/metrics`` says is what the store says.
Two things are only seen as they happen and are counted then: how long
``AttachVolume`` takes (``time_attach``, used by the admin servicer) and the
calls to node agents that failed (``agent_error``, the hook of
``GrpcAgentDirectory``).

Names (all prefixed ``shoal_controller_``):

* ``volumes{pool,state}``: every state of ``VOLUME_STATES`` for every pool, zeros included;
* ``pool_capacity_bytes``, ``pool_free_bytes``, ``pool_provisioned_bytes`` ``{pool}``
  (capacity and free space of the pool's disks, healthy or not; sizes its volumes promise);
* ``nodes{health}``: health as of the scrape (a node silent past the timeout is unhealthy);
* ``attachments{state,mode}``, ``exports``;
* ``attach_duration_seconds{mode,outcome}``: histogram; outcome is ``ok`` or the gRPC code answered;
* ``agent_rpc_errors_total{node,method,code}``: agent calls that failed after their retries.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from contextlib import contextmanager
from typing import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.api.errors import grpc_status
from controller.domain import placement
from controller.domain.model import ATTACHMENT_STATES, HEALTHY, MODES, UNHEALTHY, VOLUME_STATES
from controller.domain.service import ControllerService

PREFIX = "shoal_controller"
ATTACH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds: a loopback userspace attach takes a fraction of a second, a kernel one a few seconds,
and 120 s is the agent call's deadline (``AgentCallSettings.attach_timeout``)."""


class StateCollector(Collector):
    """Gauges computed from the controller's state at scrape time (one read of each table)."""

    def __init__(self, service: ControllerService):
        self.service = service

    def collect(self):
        service = self.service
        nodes = service.list_nodes()
        pools = service.list_pools()
        volumes = service.store.list_volumes()
        attachments = service.store.list_attachments()
        snapshots = service.store.list_snapshots()

        by_state = Tally((v.pool, v.state) for v in volumes)
        family = GaugeMetricFamily(f"{PREFIX}_volumes", "Volumes by pool and state.", labels=["pool", "state"])
        for pool in sorted({p.name for p in pools} | {v.pool for v in volumes}):
            for state in VOLUME_STATES:
                family.add_metric([pool, state], by_state[(pool, state)])
        yield family

        capacity = GaugeMetricFamily(f"{PREFIX}_pool_capacity_bytes", "Capacity of the pool's disks.",
                                     labels=["pool"])
        free = GaugeMetricFamily(f"{PREFIX}_pool_free_bytes", "Free space on the pool's disks.", labels=["pool"])
        provisioned = GaugeMetricFamily(f"{PREFIX}_pool_provisioned_bytes",
                                        "Sizes of the pool's volumes and their snapshots added up (thin ones included).",
                                        labels=["pool"])
        for pool in pools:
            usage = placement.usage(pool, nodes, volumes, snapshots)  # as ``shoalctl pool show``
            capacity.add_metric([pool.name], usage.capacity_bytes)
            free.add_metric([pool.name], usage.free_bytes)
            provisioned.add_metric([pool.name], usage.provisioned_bytes)
        yield capacity
        yield free
        yield provisioned

        health = Tally(n.health for n in nodes)
        family = GaugeMetricFamily(f"{PREFIX}_nodes", "Registered nodes by health.", labels=["health"])
        for state in sorted({HEALTHY, UNHEALTHY} | set(health)):
            family.add_metric([state], health[state])
        yield family

        by_state = Tally((a.state, a.mode) for a in attachments)
        family = GaugeMetricFamily(f"{PREFIX}_attachments", "Attachments by state and mode.",
                                   labels=["state", "mode"])
        for state, mode in sorted(set(by_state) | {(s, "userspace") for s in ATTACHMENT_STATES}):
            family.add_metric([state, mode], by_state[(state, mode)])
        yield family

        yield GaugeMetricFamily(f"{PREFIX}_exports", "Volumes exported to a node's initiator.",
                                value=len(service.store.list_exports()))


class ControllerMetrics:
    """The controller's metrics on ``registry`` (a private one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.attach_seconds = Histogram(f"{PREFIX}_attach_duration_seconds",
                                        "AttachVolume calls: seconds from request to answer.",
                                        ["mode", "outcome"], buckets=ATTACH_BUCKETS, registry=self.registry)
        self.agent_errors = Counter(f"{PREFIX}_agent_rpc_errors",
                                    "Calls to node agents that failed (after retries), by status code.",
                                    ["node", "method", "code"], registry=self.registry)

    def watch(self, service: ControllerService) -> None:
        """Export the state of ``service`` (call once)."""
        self.registry.register(StateCollector(service))

    @contextmanager
    def time_attach(self, mode: str, clock=time.monotonic) -> Iterator[None]:
        """Observe the block's duration; the outcome is ``ok`` or the gRPC code its exception becomes.

        A mode outside ``MODES`` (refused by the domain) is labelled ``other``: labels stay bounded."""
        mode = mode if mode in MODES else "other"
        started = clock()
        outcome = "ok"
        try:
            yield
        except Exception as exc:
            status = grpc_status(exc)
            outcome = status[0].name if status is not None else grpc.StatusCode.INTERNAL.name
            raise
        finally:
            self.attach_seconds.labels(mode, outcome).observe(clock() - started)

    def agent_error(self, node_id: str, method: str, code: grpc.StatusCode) -> None:
        """``GrpcAgentDirectory``'s error hook."""
        self.agent_errors.labels(node_id, method, code.name).inc()
