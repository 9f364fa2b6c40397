"""The chart's CRDs and the controller's RBAC, installed into the test kube-apiserver without ``helm install``.

The store, leader-election and HA tests run Shoal as a token user against the session's API server. What that user
may do must be exactly what the chart grants the controller, so the objects come from ``helm template`` of the
chart (under the test's own API group, release and namespace, so tests sharing the session API server and a real
``helm install`` of the chart do not collide):

- every CRD of ``templates/crds.yaml``, waited for until Established;
- the namespace;
- the controller's ClusterRole and Role of ``templates/rbac-controller.yaml``, bound to the test's users.

Everything cluster-scoped that was created is deleted again at the end (the namespace stays: without a
controller-manager a deleted namespace never finishes terminating).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from tests.support.k8s_tools import helm_env, k8s_tools

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "shoal"


def render(helm_home: Path, template: str, *, release: str, namespace: str, group: str) -> list[dict]:
    """The objects ``helm template`` renders for one template of the chart."""
    result = subprocess.run(
        [str(k8s_tools().helm), "template", release, str(CHART), "--namespace", namespace, "--kube-version",
         "1.30.0", "--set", f"apiGroup={group}", "--show-only", template],
        env=helm_env(helm_home), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def wait_established(extensions, names: Sequence[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pending = [name for name in names
                   if not any(c.type == "Established" and c.status == "True"
                              for c in extensions.read_custom_resource_definition(name).status.conditions or ())]
        if not pending:
            return
        assert time.monotonic() < deadline, f"CRDs not Established after {timeout} s: {pending}"
        time.sleep(0.1)


@contextlib.contextmanager
def controller_access(admin, helm_home: Path, *, release: str, namespace: str, group: str,
                      users: Sequence[str]) -> Iterator[list[dict]]:
    """Install the CRDs, the namespace and the controller's RBAC bound to ``users``; yield the CRDs."""
    from kubernetes import client

    extensions, rbac = client.ApiextensionsV1Api(admin), client.RbacAuthorizationV1Api(admin)
    names = dict(release=release, namespace=namespace, group=group)
    crds = render(helm_home, "templates/crds.yaml", **names)
    for crd in crds:
        extensions.create_custom_resource_definition(crd)
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
    roles = [o for o in render(helm_home, "templates/rbac-controller.yaml", **names)
             if o["kind"] in ("ClusterRole", "Role") and o["metadata"]["name"] == f"{release}-controller"]
    assert sorted(o["kind"] for o in roles) == ["ClusterRole", "Role"]
    subjects = [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"} for user in users]
    binding_name = f"{release}-users"
    for role in roles:
        binding = {"metadata": {"name": binding_name}, "subjects": subjects,
                   "roleRef": {"kind": role["kind"], "name": role["metadata"]["name"],
                               "apiGroup": "rbac.authorization.k8s.io"}}
        if role["kind"] == "ClusterRole":
            rbac.create_cluster_role(role)
            rbac.create_cluster_role_binding(binding)
        else:
            rbac.create_namespaced_role(namespace, role)
            rbac.create_namespaced_role_binding(namespace, binding)
    wait_established(extensions, [crd["metadata"]["name"] for crd in crds])
    try:
        yield crds
    finally:
        rbac.delete_cluster_role_binding(binding_name)
        rbac.delete_cluster_role(f"{release}-controller")
        for crd in crds:
            extensions.delete_custom_resource_definition(crd["metadata"]["name"])
