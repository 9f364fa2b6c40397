"""A real etcd + kube-apiserver (Kubernetes 1.20.2) on 127.0.0.1 for the tests of the Kubernetes backend.

Where the API server comes from: Debian ships the Kubernetes source (package ``kubernetes``, 1.20.2 with its
``vendor/``) but no kube-apiserver binary. The first test that needs it downloads the source package with apt's
ordinary client and builds ``cmd/kube-apiserver`` offline with Debian's ``golang-go`` in GOPATH mode (about 5 minutes
on 2 cores), after two small fixes to the vendored code that Kubernetes itself made later for newer Go (1.20's tree
built as it is with Go 1.19 crashes on the first CustomResource, and refuses empty strings in them: see
``patch_for_new_go``); the binary is cached in the repo's ``.cache/kube-apiserver/`` and the build tree deleted.
The build runs under an exclusive file lock (``.cache/kube-apiserver/.lock``), so parallel test processes build
once, and the binary is moved into place atomically, so a half-written one is never used.

The deb-src entries apt needs are derived at run time from the machine's own apt sources (one-line ``deb`` entries
of ``/etc/apt/sources.list`` and ``Types: deb`` stanzas of ``/etc/apt/sources.list.d/*.sources``) and written into
a temporary directory that apt is pointed at (``Dir::Etc::SourceList``, ``Dir::Etc::SourceParts``,
``Dir::State::Lists``): /etc/apt is never modified and no mirror is named here.

etcd is Debian's ``etcd-server`` (3.4). Each ``running_kube_apiserver`` gets its own etcd (data in /dev/shm when
there is one: etcd fsyncs every write), a CA and a serving certificate made with ``openssl`` (clients verify TLS),
an RSA key for service-account tokens, and a static token file: ``admin`` is in ``system:masters``, the other users
(``DEFAULT_USERS``, or the ``users`` given) have no rights until a test grants them some with RBAC
(``--authorization-mode=Node,RBAC``). ``--insecure-port=0``: 1.20 otherwise serves unauthenticated on 8080.
Both processes are stopped by PID (SIGTERM, then SIGKILL), also when a test fails.

Use the session fixture ``kube_apiserver`` (import it into a test module or a conftest) or the context manager
``running_kube_apiserver(tmp, users=...)`` for a private instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "kube-apiserver"
BINARY = CACHE / "kube-apiserver"
SOURCE_PACKAGE = "kubernetes"
KUBERNETES_VERSION = "v1.20.2"
ETCD = "/usr/bin/etcd"
BUILD_TIMEOUT = 1080.0  # per step; the build itself takes ~5 min on 2 cores (~10 under a loaded make test)
BUILD_TEST_TIMEOUT = 1200  # pytest timeout for a test whose setup may build the binary (CI's first run)
START_TIMEOUT = 60.0

ADMIN = "admin"
# Users with a token from the start (the token file is read once, at start): the controllers of the Lease tests,
# the store tests' user (given the chart's controller RBAC), a node agent, and a user with no rights at all.
DEFAULT_USERS: Mapping[str, Sequence[str]] = {
    ADMIN: ("system:masters",),
    "controller": (),
    "controller-2": (),
    "store": (),
    "node-agent": (),
    "nobody": (),
}


class KubeApiServerError(RuntimeError):
    """etcd or kube-apiserver did not start, or the binary could not be built."""


# ---------------------------------------------------------------------------------------------- the binary

def kube_apiserver_binary() -> Path:
    """The cached kube-apiserver, building it first if needed (skips only when go, make or rsync is missing)."""
    if _usable(BINARY):
        return BINARY
    missing = [tool for tool in ("go", "make", "rsync", "apt-get") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building kube-apiserver needs {', '.join(missing)} (make deps installs golang-go, rsync)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _usable(BINARY):
            with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
                built = _build(Path(tmp))
                staged = CACHE / ".kube-apiserver.new"
                shutil.copy2(built, staged)
                staged.chmod(0o755)
                os.rename(staged, BINARY)
    return BINARY


def _usable(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def _build(work: Path) -> Path:
    """apt-get source → extract into a GOPATH → ``make WHAT=cmd/kube-apiserver``; returns the binary in ``work``."""
    tarball = _download_source(work / "apt")
    unpacked = work / "unpacked"
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="tar")
    # The orig tarball holds one top directory (kubernetes-1.20.2/); GOPATH mode wants the tree at k8s.io/kubernetes.
    roots = [path.parent.parent for path in unpacked.glob("*/cmd/kube-apiserver")] or [unpacked]
    gopath = work / "gopath"
    tree = gopath / "src" / "k8s.io" / "kubernetes"
    tree.parent.mkdir(parents=True)
    os.rename(roots[0], tree)
    patch_for_new_go(tree)
    env = dict(os.environ, GOPATH=str(gopath), GOCACHE=str(work / "gocache"), CGO_ENABLED="0", GOFLAGS="",
               GOPROXY="off", GO111MODULE="off")
    _run(["make", "WHAT=cmd/kube-apiserver"], cwd=tree, env=env, what="make WHAT=cmd/kube-apiserver")
    for candidate in (tree / "_output" / "bin" / "kube-apiserver",
                      tree / "_output" / "local" / "bin" / "linux" / "amd64" / "kube-apiserver"):
        if candidate.is_file():
            return candidate
    raise KubeApiServerError(f"make WHAT=cmd/kube-apiserver succeeded but left no binary under {tree}/_output")


def patch_for_new_go(tree: Path) -> None:
    """Two fixes Kubernetes itself made after 1.20, for building 1.20's tree with Debian 12's Go 1.19.

    Each edit checks that it found the text it replaces, so another vendored version fails loudly instead of
    building something else.
    """
    _patch_reflect2(tree / "vendor" / "github.com" / "modern-go" / "reflect2")
    # Go 1.16 made reflect.Zero share one zero value, so this check (DeepEqual of two reflect.Values, always false
    # before) became true for "", 0 and false: a CustomResource with an empty string field was refused as "null".
    # kube-openapi dropped the check (kubernetes/kube-openapi#230, in Kubernetes 1.21); so do we, in both copies.
    for copy in (tree / "vendor" / "k8s.io" / "kube-openapi" / "pkg" / "validation" / "validate" / "type.go",
                 tree / "vendor" / "github.com" / "go-openapi" / "validate" / "type.go"):
        copy.write_text(_replace_once(
            copy.read_text(),
            "if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {",
            "if data == nil {", copy))


def _patch_reflect2(vendored: Path) -> None:
    """Kubernetes 1.20's vendored reflect2 v1.0.1 with Go >= 1.18.

    reflect2 reaches into the runtime with ``//go:linkname mapiterinit reflect.mapiterinit``. Go 1.18 changed that
    function from returning a new iterator to filling one the caller allocates; built as it is, kube-apiserver
    crashes (SIGSEGV in ``mapiterinit``) the first time it encodes a map with json-iterator, i.e. on the first
    CustomResource it creates. reflect2 v1.0.2 fixed it the same way: the caller allocates the whole ``hiter`` (so
    the struct must have the runtime's full layout, Go 1.18-1.21) and passes it in.
    """
    link = vendored / "unsafe_link.go"
    text = link.read_text()
    text = _replace_once(text, "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter\n",
                         "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)\n", link)
    start = text.index("type hiter struct {")
    end = text.index("}", start) + 1
    text = text[:start] + _HITER + text[end:]
    link.write_text(text)
    iterate = vendored / "unsafe_map.go"
    iterate.write_text(_replace_once(
        iterate.read_text(),
        "\treturn &UnsafeMapIterator{\n\t\thiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),\n",
        "\tit := new(hiter)\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), it)\n"
        "\treturn &UnsafeMapIterator{\n\t\thiter:      it,\n", iterate))


# runtime.hiter of Go 1.18-1.21 (src/runtime/map.go), field for field: the runtime writes all of it.
_HITER = """type hiter struct {
\tkey         unsafe.Pointer
\tvalue       unsafe.Pointer
\tt           unsafe.Pointer
\th           unsafe.Pointer
\tbuckets     unsafe.Pointer
\tbptr        unsafe.Pointer
\toverflow    unsafe.Pointer
\toldoverflow unsafe.Pointer
\tstartBucket uintptr
\toffset      uint8
\twrapped     bool
\tB           uint8
\ti           uint8
\tbucket      uintptr
\tcheckBucket uintptr
}"""


def _replace_once(text: str, old: str, new: str, path: Path) -> str:
    if text.count(old) != 1:
        raise KubeApiServerError(f"{path}: expected Kubernetes 1.20's vendored text {old.strip()!r} once")
    return text.replace(old, new)


def _download_source(work: Path) -> Path:
    """``apt-get source --download-only kubernetes`` with deb-src entries derived from this machine's apt sources."""
    lists = work / "lists"
    (lists / "partial").mkdir(parents=True)
    parts = work / "parts"
    parts.mkdir()
    one_line, deb822 = deb_src_entries(Path("/etc/apt"))
    if not one_line and not deb822:
        raise KubeApiServerError("no `deb` entries in /etc/apt/sources.list or sources.list.d/*.sources "
                                 "to derive deb-src entries from")
    (work / "sources.list").write_text("".join(line + "\n" for line in one_line))
    if deb822:
        (parts / "shoal-test-src.sources").write_text("\n".join(deb822))
    apt = ["apt-get", "-q", "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
           "-o", f"Dir::Etc::SourceParts={parts}", "-o", f"Dir::State::Lists={lists}"]
    _run(apt + ["update"], cwd=work, what="apt-get update (deb-src)")
    _run(apt + ["source", "--download-only", SOURCE_PACKAGE], cwd=work, what=f"apt-get source {SOURCE_PACKAGE}")
    tarballs = sorted(work.glob(f"{SOURCE_PACKAGE}_*.orig.tar.*"))
    if len(tarballs) != 1:
        raise KubeApiServerError(f"apt-get source left {len(tarballs)} orig tarballs in {work}, expected 1")
    return tarballs[0]


def deb_src_entries(etc_apt: Path) -> tuple[list[str], list[str]]:
    """The machine's ``deb`` sources as ``deb-src``: (one-line entries, deb822 stanzas)."""
    one_line = []
    sources_list = etc_apt / "sources.list"
    if sources_list.is_file():
        for line in sources_list.read_text().splitlines():
            words = line.split()
            if words and words[0] == "deb":
                one_line.append(" ".join(["deb-src", *words[1:]]))
    stanzas = []
    parts = etc_apt / "sources.list.d"
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else ():
        for stanza in path.read_text().split("\n\n"):
            lines = [line for line in stanza.splitlines() if not line.lstrip().startswith("#")]
            types = [line.split(":", 1)[1].split() for line in lines if line.lower().startswith("types:")]
            enabled = [line.split(":", 1)[1].strip().lower() for line in lines if line.lower().startswith("enabled:")]
            if not types or "deb" not in types[0] or (enabled and enabled[0] == "no"):
                continue
            rewritten = ["Types: deb-src" if line.lower().startswith("types:") else line for line in lines]
            stanzas.append("\n".join(rewritten) + "\n")
    return one_line, stanzas


def _run(argv: list[str], *, cwd: Path, what: str, env: Mapping[str, str] | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT, check=False)
    if result.returncode != 0:
        raise KubeApiServerError(f"{what} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")


# ---------------------------------------------------------------------------------------------- the servers

@dataclass
class KubeApiServer:
    """A running kube-apiserver: its URL, its CA, and a token per user."""

    url: str
    ca_file: Path
    tokens: dict[str, str] = field(repr=False)
    pid: int
    etcd_pid: int
    log_path: Path = field(repr=False)

    def token(self, user: str = ADMIN) -> str:
        """The bearer token of ``user`` (KeyError for a user the server was not started with)."""
        return self.tokens[user]

    def kubeconfig(self, path: Path, user: str = ADMIN) -> Path:
        """Write a kubeconfig for ``user`` to ``path`` (mode 0600: it holds the token) and return ``path``."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": self.token(user)}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        }
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(config, out)
        return path

    def client(self, user: str = ADMIN):
        """A ``kubernetes.client.ApiClient`` for ``user``, verifying the server's certificate."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.verify_ssl = True
        configuration.api_key = {"authorization": self.token(user)}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(configuration)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_kube_apiserver(tmp: Path, users: Mapping[str, Sequence[str]] = DEFAULT_USERS) -> Iterator[KubeApiServer]:
    """Start etcd and kube-apiserver with state under ``tmp``; ``users`` maps user name → groups."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"needs {ETCD} (Debian etcd-server, installed by make deps)")
    binary = kube_apiserver_binary()
    if ADMIN not in users:
        users = {ADMIN: ("system:masters",), **users}
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    pki = _make_pki(tmp / "pki")
    tokens = {user: secrets.token_hex(16) for user in users}
    token_file = tmp / "tokens.csv"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        for uid, (user, groups) in enumerate(users.items()):
            out.write(f'{tokens[user]},{user},uid-{uid},"{",".join(groups)}"\n')
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="shoal-etcd-", dir=shm if os.access(shm, os.W_OK) else tmp) as data:
        etcd, etcd_url = _start_etcd(Path(data), tmp)
        try:
            apiserver, url = _start_apiserver(binary, tmp, etcd_url, pki, token_file, tokens[ADMIN])
            try:
                yield KubeApiServer(url, pki["ca.crt"], tokens, apiserver.pid, etcd.pid, tmp / "kube-apiserver.log")
            finally:
                _stop(apiserver)
        finally:
            _stop(etcd)


def _make_pki(pki: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1/localhost signed by it, and the service-account key."""
    pki.mkdir(parents=True, exist_ok=True)
    paths = {name: pki / name for name in ("ca.crt", "ca.key", "server.crt", "server.key", "server.csr",
                                           "server.ext", "sa.key")}
    openssl = ["openssl"]
    _openssl(openssl + ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", "/CN=shoal-test-ca",
                        "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                        "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.crt"])])
    _openssl(openssl + ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
                        "-keyout", str(paths["server.key"]), "-out", str(paths["server.csr"])])
    paths["server.ext"].write_text("basicConstraints=critical,CA:FALSE\n"
                                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                   "extendedKeyUsage=serverAuth\n"
                                   "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")
    _openssl(openssl + ["x509", "-req", "-days", "7", "-in", str(paths["server.csr"]), "-CA", str(paths["ca.crt"]),
                        "-CAkey", str(paths["ca.key"]), "-CAcreateserial", "-extfile", str(paths["server.ext"]),
                        "-out", str(paths["server.crt"])])
    _openssl(openssl + ["genrsa", "-out", str(paths["sa.key"]), "2048"])
    return paths


def _openssl(argv: list[str]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (installed by make deps)")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise KubeApiServerError(f"{' '.join(argv[:3])} failed: {result.stderr.strip()[-2000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_etcd(data: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """etcd on two free ports, retried when another process took one of them before etcd bound it."""
    errors = []
    for attempt in range(4):
        client_url = f"http://127.0.0.1:{_free_port()}"
        peer_url = f"http://127.0.0.1:{_free_port()}"
        data_dir = data / f"etcd-{attempt}"
        log_path = tmp / f"etcd-{attempt}.log"
        argv = [ETCD, "--name", "test", "--data-dir", str(data_dir),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"test={peer_url}", "--log-level", "warn", "--logger", "zap"]
        process = _spawn(argv, log_path)
        try:
            if _wait(process, lambda: _etcd_healthy(client_url), START_TIMEOUT):
                return process, client_url
        except BaseException:
            _stop(process)
            raise
        _stop(process)
        errors.append(log_path.read_text(errors="replace")[-3000:])
    raise KubeApiServerError("etcd did not start:\n" + "\n---\n".join(errors))


def _etcd_healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
            return json.load(response).get("health") == "true"
    except (OSError, ValueError):
        return False


def _start_apiserver(binary: Path, tmp: Path, etcd_url: str, pki: Mapping[str, Path], token_file: Path,
                     admin_token: str) -> tuple[subprocess.Popen, str]:
    errors = []
    context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    for attempt in range(3):
        port = _free_port()
        url = f"https://127.0.0.1:{port}"
        log_path = tmp / "kube-apiserver.log"
        argv = [str(binary),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
                "--insecure-port=0",
                f"--tls-cert-file={pki['server.crt']}", f"--tls-private-key-file={pki['server.key']}",
                f"--cert-dir={tmp / 'certs'}",
                f"--token-auth-file={token_file}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki['sa.key']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                "--api-audiences=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--allow-privileged=true",  # the chart's node DaemonSet is privileged (helm install tests)
                "--enable-priority-and-fairness=false",
                "--v=1"]
        process = _spawn(argv, log_path)
        try:
            if _wait(process, lambda: _ready(url, context, admin_token), START_TIMEOUT):
                return process, url
        except BaseException:
            _stop(process)
            raise
        _stop(process)
        errors.append(log_path.read_text(errors="replace")[-4000:])
    raise KubeApiServerError("kube-apiserver did not become ready:\n" + "\n---\n".join(errors))


def _ready(url: str, context: ssl.SSLContext, token: str) -> bool:
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait(process: subprocess.Popen, ready, timeout: float) -> bool:
    """True once ``ready()``; False when the process exited or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.2)
    return False


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM by PID, wait, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)


# ---------------------------------------------------------------------------------------------- the fixture

@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory) -> Iterator[KubeApiServer]:
    """One etcd + kube-apiserver for the whole session, with ``DEFAULT_USERS``.

    Tests share it: each test cleans up what it creates (or uses its own namespace / names). The first use may
    build the binary (~6 min): mark such test modules ``pytest.mark.timeout(BUILD_TEST_TIMEOUT)``.
    """
    with running_kube_apiserver(tmp_path_factory.mktemp("kube-apiserver")) as server:
        yield server
