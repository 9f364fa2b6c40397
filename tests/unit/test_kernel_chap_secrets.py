"""CHAP secrets reach open-iscsi through its node record file, never through a command line.

``iscsiadm -o update -n node.session.auth.password -v SECRET`` (what os-brick runs) puts the
secret in iscsiadm's argv, which every local user reads in /proc/PID/cmdline while it runs.
The kernel connector sets only the method with iscsiadm and writes the credential lines into
the record's file itself (``Runner.write_private``: mode 0600, replaced atomically, no symlink
followed), where usr/idbm.c ``idbm_rec_read`` looks, then has ``-o show`` read them back.

``FakeKernel`` (tests/unit/test_host_kernel.py) keeps node records as files in iscsiadm's format
and its target requires the CHAP credentials the record holds at login.  The last test runs the
connector's record setup against the real iscsiadm of this machine in a private mount and network
namespace (its own /etc/iscsi and /run/lock, no iscsid reachable), and the real login with CHAP
runs in the Debian guest of tests/peer/test_kernel_connector.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.host.connector import PermanentConnectorError, TemporaryConnectorError
from node_agent.host.kernel import KernelConnector, parse_records, with_credentials
from node_agent.host.runner import Hidden, RecordingRunner, SubprocessRunner
from tests.unit.test_host_kernel import (
    AGENT_IQN,
    IQN,
    NODE_DIR,
    FakeKernel,
    node,
    record_path,
    render_record,
    volume,
)

REPO = Path(__file__).resolve().parents[2]
OLD = {"node.session.auth.authmethod": "CHAP", "node.session.auth.username": "alice",
       "node.session.auth.password": "old-secret-0001", "node.session.auth.username_in": "tgt",
       "node.session.auth.password_in": "old-target-0002"}
"""The credentials an earlier attach left in a record."""


@pytest.fixture
def kernel(tmp_path):
    kernel = FakeKernel(tmp_path, {0: "vol-a", 1: "vol-b"})
    kernel.ifaces["shoal"] = {"iface.transport_name": "tcp", "iface.initiatorname": AGENT_IQN}
    return kernel


def connector_with(kernel: FakeKernel, **changes) -> KernelConnector:
    return KernelConnector(runner=kernel.runner, settings=dataclasses.replace(kernel.settings(), **changes))


def auth_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("node.session.auth.")]


# --------------------------------------------------------------------------- records left by earlier attaches

def test_a_record_left_with_another_secret_gets_the_new_one(kernel):
    """The volume's secret was rotated (or the record is an older attach's): the login must use the new one."""
    kernel.add_record(**OLD)
    kernel.chap = ("alice", "new-secret-0003")
    assert kernel.connector().attach(volume(0, chap=kernel.chap)).path.endswith("sda")
    assert auth_lines(kernel.runner.files[record_path()]) == [
        "node.session.auth.authmethod = CHAP", "node.session.auth.username = alice",
        "node.session.auth.password = new-secret-0003", "node.session.auth.chap_algs = MD5"]
    assert not [argv for argv in kernel.runner.calls if any("secret" in arg for arg in argv)]


def test_a_record_without_chap_keeps_no_credential_lines(kernel):
    """CHAP turned off: no stale user or secret stays in the file (nor would a mutual challenge be made)."""
    kernel.add_record(**OLD)
    kernel.connector().attach(volume(0))
    text = kernel.runner.files[record_path()]
    assert auth_lines(text) == ["node.session.auth.authmethod = None", "node.session.auth.chap_algs = MD5"]
    assert "old-secret-0001" not in text and "old-target-0002" not in text


def test_a_record_already_holding_the_credentials_is_not_rewritten(kernel):
    kernel.chap = ("alice", "initiator-secret-1")
    kernel.add_record(**{"node.session.auth.authmethod": "CHAP", "node.session.auth.username": "alice",
                         "node.session.auth.password": "initiator-secret-1"})
    kernel.connector().attach(volume(0, chap=kernel.chap))
    assert kernel.runner.file_writes == []
    assert kernel.runner.calls.count(node("-o", "show")) == 1  # the record as shown is the check


def test_a_record_with_a_tpgt_is_written_in_its_iface_file(kernel):
    """Discovery makes ``ADDR,PORT,TPGT/IFACE`` records; the temporary file is made in the target's directory,
    where open-iscsi takes no entry without a comma for a record."""
    path = kernel.add_record(tpgt=1)
    assert path == f"{NODE_DIR}/{IQN}/10.99.0.1,3260,1/shoal"
    kernel.chap = ("alice", "initiator-secret-1")
    writes = []

    def write_private(where, text, *, temp_dir=None):
        writes.append((where, temp_dir))
        RecordingRunner.write_private(kernel.runner, where, text, temp_dir=temp_dir)

    kernel.runner.write_private = write_private
    kernel.connector().attach(volume(0, chap=kernel.chap))
    assert writes == [(path, f"{NODE_DIR}/{IQN}")]
    assert kernel.record()["node.session.auth.password"] == "initiator-secret-1"


def test_records_under_var_lib_iscsi_are_found(kernel):
    """Fedora, RHEL and SUSE build open-iscsi with /var/lib/iscsi/nodes."""
    path = kernel.add_record(root="/var/lib/iscsi/nodes")
    kernel.chap = ("alice", "initiator-secret-1")
    kernel.connector().attach(volume(0, chap=kernel.chap))
    assert [p for _, p in kernel.runner.file_writes] == [path]


# --------------------------------------------------------------------------- nothing unchecked

def test_no_record_file_where_iscsiadm_keeps_them_fails_before_any_login(kernel):
    with pytest.raises(TemporaryConnectorError, match="no file of the node record"):
        connector_with(kernel, node_dirs=("/elsewhere/nodes",)).attach(volume(0, chap=("alice", "s3cret-value")))
    assert node("--login") not in kernel.runner.calls
    assert not kernel.records and not kernel.runner.files  # the half-configured record was deleted


def test_credentials_iscsiadm_does_not_read_back_fail_the_attach(kernel):
    """``-o show`` is the proof that iscsiadm reads the file written: a show without the secret fails."""
    kernel.runner.on(*node("-o", "show"), call=lambda argv: (0, render_record(
        {**kernel.record(), "node.session.auth.password": ""}, show=True)))
    with pytest.raises(TemporaryConnectorError, match="does not show the CHAP settings"):
        kernel.connector().attach(volume(0, chap=("alice", "s3cret-value")))
    assert node("--login") not in kernel.runner.calls and not kernel.records


def test_a_file_that_is_not_the_shown_record_is_not_written(kernel):
    """The file where the record should be names another one (another iface's): it is left alone."""
    kernel.add_record()
    shown = kernel.record()
    kernel.runner.on(*node("-o", "show"), call=lambda argv: (0, render_record(shown, show=True)))
    path = record_path()
    kernel.runner.files[path] = kernel.runner.files[path].replace("iscsi_ifacename = shoal", "iscsi_ifacename = iser")
    with pytest.raises(TemporaryConnectorError, match="is not the node record"):
        kernel.connector().attach(volume(0, chap=("alice", "s3cret-value")))
    assert kernel.runner.file_writes == []


@pytest.mark.parametrize("secret", ["trailing-blank ", " leading-blank", "x" * 256])
def test_secrets_open_iscsi_would_read_back_otherwise_are_refused(kernel, secret):
    """open-iscsi strips record lines and keeps 255 bytes: such a secret would fail every login, unexplained."""
    with pytest.raises(PermanentConnectorError, match="cannot go into a node record"):
        kernel.connector().attach(volume(0, chap=("alice", secret)))
    assert kernel.runner.file_writes == [] and node("--login") not in kernel.runner.calls


def test_credential_lines_are_replaced_where_iscsiadm_writes_them():
    text = "# BEGIN RECORD 2.1.8\nnode.name = x\nnode.session.auth.authmethod = CHAP\n" \
           "node.session.auth.password = old\n  node.session.auth.username=bob\nnode.tpgt = -1\n# END RECORD\n"
    assert with_credentials(text, {"node.session.auth.username": "alice", "node.session.auth.password": "new",
                                   "node.session.auth.username_in": "", "node.session.auth.password_in": ""}) == (
        "# BEGIN RECORD 2.1.8\nnode.name = x\nnode.session.auth.authmethod = CHAP\n"
        "node.session.auth.username = alice\nnode.session.auth.password = new\nnode.tpgt = -1\n# END RECORD\n")


def test_shown_records_are_split_at_their_begin_lines():
    text = render_record({"node.name": IQN, "node.tpgt": "1"}, show=True) + \
        render_record({"node.name": IQN, "node.tpgt": "2"}, show=True)
    assert [(r["node.tpgt"], r["node.session.auth.password"]) for r in parse_records(text)] == [("1", ""), ("2", "")]


# --------------------------------------------------------------------------- the runner's private files

def test_write_private_replaces_the_file_with_mode_0600(tmp_path):
    path = tmp_path / "record"
    path.write_text("old\n")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        SubprocessRunner().write_private(str(path), Hidden("new secret\n"))
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["record"]


def test_write_private_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (tmp_path / "d").mkdir()
    link = tmp_path / "d" / "record"
    link.symlink_to(victim)
    SubprocessRunner().write_private(str(link), Hidden("secret\n"))
    assert victim.read_text() == "untouched\n"
    assert not link.is_symlink() and link.read_text() == "secret\n"


def test_write_private_refuses_a_symlinked_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        SubprocessRunner().write_private(str(tmp_path / "linked" / "record"), Hidden("secret\n"))
    assert os.listdir(tmp_path / "real") == []


def test_write_private_leaves_no_temporary_file_when_it_fails(tmp_path):
    """The temporary file is made in ``temp_dir`` under a name without a comma, and removed on failure."""
    (tmp_path / "target").mkdir()
    busy = tmp_path / "target" / "10.0.0.1,3260,1"
    (busy / "shoal").mkdir(parents=True)  # a non-empty directory: rename() over it fails
    with pytest.raises(OSError):
        SubprocessRunner().write_private(str(busy), Hidden("secret\n"), temp_dir=str(tmp_path / "target"))
    assert sorted(os.listdir(tmp_path / "target")) == ["10.0.0.1,3260,1"]


def test_write_private_takes_the_text_as_hidden(tmp_path):
    for runner in (SubprocessRunner(), RecordingRunner()):
        with pytest.raises(TypeError):
            runner.write_private(str(tmp_path / "f"), "plain secret")
    assert not (tmp_path / "f").exists()


def test_read_private_reads_regular_files_only(tmp_path):
    runner = SubprocessRunner()
    (tmp_path / "record").write_text("node.name = x\n")
    assert runner.read_private(str(tmp_path / "record")) == "node.name = x\n"
    assert runner.read_private(str(tmp_path / "absent")) is None
    (tmp_path / "link").symlink_to(tmp_path / "record")
    with pytest.raises(OSError):
        runner.read_private(str(tmp_path / "link"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        runner.read_private(str(tmp_path / "fifo"))  # and does not wait for a writer


# --------------------------------------------------------------------------- the real iscsiadm

#: Runs in a private mount and network namespace: its own /etc/iscsi and /run/lock, and no iscsid reachable
#: (the abstract socket is per network namespace).  Prints one JSON object.
REAL_DRIVER = r'''
import json, os, stat, subprocess, sys

from node_agent.host.connector import VolumeTarget
from node_agent.host.kernel import KernelConnector, KernelSettings
from node_agent.host.runner import SubprocessRunner, plain

work = sys.argv[1]
IQN = "iqn.2026-11.io.shoal.test:chap-file"


class Recording(SubprocessRunner):
    argvs = []

    def run(self, argv, **kwargs):
        self.argvs.append(plain(argv))
        return super().run(argv, **kwargs)


def run(*argv):
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


os.makedirs(f"{work}/etc")
for name in ("iscsid.conf", "initiatorname.iscsi"):
    run("cp", f"/etc/iscsi/{name}", f"{work}/etc/")
run("mount", "--bind", f"{work}/etc", "/etc/iscsi")
run("mount", "-t", "tmpfs", "tmpfs", "/run/lock")
run("iscsiadm", "-m", "iface", "-I", "shoal", "-o", "new")
runner = Recording(timeout=30)
connector = KernelConnector(runner=runner, settings=KernelSettings(initiator_iqn="iqn.2026-11.io.shoal:node:n"))
out = {}
steps = [("chap", "10.99.0.1:3260", ("alice", "secret-one-1111"), None),
         ("rotated", "10.99.0.1:3260", ("alice", "secret-two-2222"), ("tgt", "target-three-33")),
         ("off", "10.99.0.1:3260", None, None),
         ("ipv6", "[fd00::1]:3260", ("bob", "secret-four-444"), None),
         ("tpgt", "10.99.0.2:3260", ("carol", "secret-five-555"), None)]
run("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.99.0.2:3260,1", "-I", "shoal", "-o", "new")
for step, portal, chap, mutual in steps:
    target = VolumeTarget(portals=(portal,), target_iqn=IQN, lun=0, volume_id="v", expected_naa=None,
                          expected_serial="v", chap=chap, mutual_chap=mutual)
    connector._configure_node(target, portal)
    node = ["iscsiadm", "-m", "node", "-T", IQN, "-p", portal, "-I", "shoal"]
    secrets = run(*node, "-o", "show", "-S")  # iscsiadm's own reading of the record, secrets unmasked
    out[step] = {"read": [l for l in secrets.splitlines() if l.startswith("node.session.auth.")]}
files = {}
for root, _, names in os.walk("/etc/iscsi/nodes"):
    for name in names:
        path = os.path.join(root, name)
        with open(path) as f:
            files[os.path.relpath(path, "/etc/iscsi/nodes")] = {
                "mode": stat.S_IMODE(os.lstat(path).st_mode), "text": f.read()}
out["files"] = files
out["argvs"] = runner.argvs
print(json.dumps(out))
'''


def real_iscsiadm_missing() -> str:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace)"
    for tool in ("iscsiadm", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.isdir("/etc/iscsi") or not os.path.isdir("/run/lock"):
        return "open-iscsi's /etc/iscsi or /run/lock is missing"
    return ""


@pytest.mark.skipif(bool(real_iscsiadm_missing()), reason=real_iscsiadm_missing() or "-")
def test_the_real_iscsiadm_reads_the_credentials_written_and_never_saw_them_in_argv(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--",
                           sys.executable, "-c", REAL_DRIVER, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    auth = "node.session.auth."
    assert out["chap"]["read"] == [f"{auth}authmethod = CHAP", f"{auth}username = alice",
                                   f"{auth}password = secret-one-1111", f"{auth}username_in = <empty>",
                                   f"{auth}password_in = <empty>", f"{auth}chap_algs = MD5"]
    assert out["rotated"]["read"][1:5] == [f"{auth}username = alice", f"{auth}password = secret-two-2222",
                                           f"{auth}username_in = tgt", f"{auth}password_in = target-three-33"]
    assert out["off"]["read"][:5] == [f"{auth}authmethod = None", f"{auth}username = <empty>",
                                      f"{auth}password = <empty>", f"{auth}username_in = <empty>",
                                      f"{auth}password_in = <empty>"]
    assert out["ipv6"]["read"][2] == f"{auth}password = secret-four-444"
    assert out["tpgt"]["read"][2] == f"{auth}password = secret-five-555"
    files = out["files"]
    iqn = "iqn.2026-11.io.shoal.test:chap-file"
    assert sorted(files) == [f"{iqn}/10.99.0.1,3260", f"{iqn}/10.99.0.2,3260,1/shoal", f"{iqn}/fd00::1,3260"]
    assert all(f["mode"] == 0o600 for f in files.values())
    assert f"{auth}authmethod = CHAP\n{auth}username = bob\n{auth}password = secret-four-444\n" in \
        files[f"{iqn}/fd00::1,3260"]["text"]
    assert auth + "password" not in files[f"{iqn}/10.99.0.1,3260"]["text"]  # CHAP off: no stale secret
    secrets = ("secret-one", "secret-two", "target-three", "secret-four", "secret-five")
    assert not [argv for argv in out["argvs"] if any(s in arg for s in secrets for arg in argv)]
    assert len([argv for argv in out["argvs"] if f"{auth}authmethod" in argv]) == len(out) - 2  # one a step
