"""Topology from Kubernetes Node labels (``--store kubernetes``).

In a cluster the agents register with the Kubernetes node name as their Shoal node id (the chart passes
``spec.nodeName``), so the controller can read the core/v1 Node of that name at registration and merge its
topology labels into the labels the agent sent.

The rule (``merge_labels``):

* only *topology* keys are taken from the Node: ``topology.kubernetes.io/*`` (zone, region),
  ``kubernetes.io/hostname`` and Shoal's own ``topology.shoal.io/*`` (``TOPOLOGY_KEYS``); other Node labels
  (roles, instance types, whatever else an operator keeps there) are not placement constraints and stay out;
* for those keys the Node wins over the agent's ``--label``: the Node object is what the scheduler and the CSI
  sidecars see, so placement must agree with it;
* every other label the agent sent is kept.

The labels are read when an agent registers (at its start, and when a heartbeat finds its node unknown), not on
every heartbeat: a Node relabelled later is picked up at the agent's next registration.
A node id that cannot be a Kubernetes object name, or a Node that does not exist (an agent outside the cluster),
contributes nothing; any other failure to read the Node is ``Unavailable`` (the agent retries its registration).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import urllib3
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.rest import ApiException

from controller.domain.errors import Unavailable

log = logging.getLogger("shoal.controller.nodes")

TOPOLOGY_KEYS: tuple[str, ...] = ("topology.kubernetes.io/", "kubernetes.io/hostname", "topology.shoal.io/")
"""Label keys taken from the Node: a key matches an entry ending in '/' by prefix, any other entry exactly."""

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_topology_key(key: str, keys: tuple[str, ...] = TOPOLOGY_KEYS) -> bool:
    return any(key.startswith(k) if k.endswith("/") else key == k for k in keys)


def merge_labels(agent: Mapping[str, str], node: Mapping[str, str],
                 keys: tuple[str, ...] = TOPOLOGY_KEYS) -> dict[str, str]:
    """The agent's labels with the Node's topology labels on top (the Node wins for those keys)."""
    merged = dict(agent)
    merged.update({k: v for k, v in node.items() if is_topology_key(k, keys)})
    return merged


class KubernetesNodeLabels:
    """``labels(node_id, agent_labels)``: the merged labels for a registering node (see the module docstring)."""

    def __init__(self, api: ApiClient, keys: tuple[str, ...] = TOPOLOGY_KEYS, timeout: float = 10.0):
        self.core = CoreV1Api(api)
        self.keys = keys
        self.timeout = timeout

    def node_labels(self, node_id: str) -> dict[str, str]:
        """The Node's labels ({} when there is no Node of that name)."""
        if not isinstance(node_id, str) or len(node_id) > 253 or not _DNS_SUBDOMAIN.fullmatch(node_id):
            return {}
        try:
            node = self.core.read_node(node_id, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                log.info("node %s: no Kubernetes Node of that name, using the agent's labels only", node_id)
                return {}
            raise Unavailable(f"cannot read Kubernetes Node {node_id} for its topology labels: "
                              f"{exc.status} {exc.reason}; retry") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"cannot read Kubernetes Node {node_id} for its topology labels: {exc}; retry") \
                from None
        return dict(node.metadata.labels or {})

    def __call__(self, node_id: str, agent_labels: Mapping[str, str]) -> dict[str, str]:
        return merge_labels(agent_labels, self.node_labels(node_id), self.keys)
