"""shoalctl's snapshot and clone verbs: what they send, the progress bar, -o json|yaml, a failed copy.

Boundary fake, as in test_shoalctl.py: ``FakeAdmin`` serves AdminService over
real gRPC on 127.0.0.1:0 with canned answers; here its snapshots and clones
are copied in the background and done after three looks.  The real controller
answers in tests/integration/test_snapshots_e2e.py.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from controller.cli import main, progress
from protos.shoal.v1 import admin_pb2, admin_pb2_grpc

GiB = 1 << 30


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self):
        self.requests: list[tuple[str, object]] = []
        self.looks = 0
        self.fail = False

    def _progress(self) -> tuple[str, float]:
        self.looks += 1
        if self.fail and self.looks >= 2:
            return "error", 0.5
        return ("ready", 1.0) if self.looks >= 3 else ("creating", self.looks / 3)

    def CreateSnapshot(self, request, context):
        self.requests.append(("CreateSnapshot", request))
        self.looks = 0
        return self._snapshot(request.name, request.volume)

    def GetSnapshot(self, request, context):
        self.requests.append(("GetSnapshot", request))
        return self._snapshot(request.name, "vol1")

    def _snapshot(self, name, volume):
        state, done = self._progress()
        return admin_pb2.Snapshot(name=name, volume=volume, size_bytes=GiB, state=state, progress=done,
                                  owner_node="node-a", disk="data0", message="copy failed: EIO" if state == "error"
                                  else "")

    def ListSnapshots(self, request, context):
        self.requests.append(("ListSnapshots", request))
        return admin_pb2.ListSnapshotsResponse(snapshots=[admin_pb2.Snapshot(
            name="snap1", volume="vol1", size_bytes=GiB, state="creating", progress=0.42, owner_node="node-a")])

    def DeleteSnapshot(self, request, context):
        self.requests.append(("DeleteSnapshot", request))
        return admin_pb2.DeleteSnapshotResponse()

    def CloneVolume(self, request, context):
        self.requests.append(("CloneVolume", request))
        self.looks = 0
        return self._volume(request.name)

    def GetVolume(self, request, context):
        self.requests.append(("GetVolume", request))
        return self._volume(request.name)

    def _volume(self, name):
        state, done = self._progress()
        return admin_pb2.Volume(name=name, id="id", size_bytes=GiB, pool="default", owner_node="node-a",
                                disk="data0", state="available" if state == "ready" else state, thin=True,
                                source="snapshot/snap1", progress=done if state == "creating" else 0.0)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.delenv("SHOAL_CONTROLLER", raising=False)
    monkeypatch.setenv("SHOAL_CONTEXT", str(tmp_path / "no-context.json"))
    monkeypatch.setattr(progress, "_sleep", lambda s: None)  # no waiting between looks
    servicer = FakeAdmin()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(None)


def run(fake, capsys, *args):
    code = main(["--controller", fake.address, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_volume_snapshot_waits_for_the_copy_with_a_progress_bar(fake, capsys):
    code, out, err = run(fake, capsys, "volume", "snapshot", "vol1", "--snapshot", "snap1")
    assert code == 0 and out == "snapshot snap1 of vol1: ready\n"
    assert "copying snapshot snap1: [##########--------------------]  33%" in err
    assert err.rstrip().endswith("100%")
    assert [m for m, _ in fake.requests] == ["CreateSnapshot", "GetSnapshot", "GetSnapshot"]
    assert (fake.requests[0][1].name, fake.requests[0][1].volume) == ("snap1", "vol1")


def test_volume_clone_json_has_no_bar_on_stdout(fake, capsys):
    code, out, err = run(fake, capsys, "volume", "clone", "vol2", "--from", "snap1", "--pool", "fast", "-o", "json")
    assert code == 0 and err == ""
    volume = json.loads(out)
    assert (volume["name"], volume["state"], volume["source"]) == ("vol2", "available", "snapshot/snap1")
    request = fake.requests[0][1]
    assert (request.name, request.source, request.pool) == ("vol2", "snap1", "fast")


def test_no_wait_returns_while_copying(fake, capsys):
    code, out, _ = run(fake, capsys, "volume", "clone", "vol2", "--from", "snap1", "--no-wait")
    assert code == 0 and "copying in the background (33%)" in out
    assert [m for m, _ in fake.requests] == ["CloneVolume"]


def test_a_failed_copy_exits_1_and_says_what_to_do(fake, capsys):
    fake.fail = True
    code, out, err = run(fake, capsys, "snapshot", "create", "snap1", "--volume", "vol1")
    assert code == 1 and "the copy failed (copy failed: EIO)" in err and "delete it" in err


def test_snapshot_list_and_delete(fake, capsys):
    code, out, _ = run(fake, capsys, "snapshot", "list", "--volume", "vol1")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "VOLUME", "SIZE", "STATE", "PROGRESS", "NODE"]
    assert out.splitlines()[1].split() == ["snap1", "vol1", "1.0", "GiB", "creating", "42%", "node-a"]
    assert fake.requests[0][1].volume == "vol1"
    code, out, _ = run(fake, capsys, "snapshot", "list", "-o", "yaml")
    assert yaml.safe_load(out)["snapshots"][0]["progress"] == 0.42
    code, out, _ = run(fake, capsys, "snapshot", "delete", "snap1")
    assert code == 0 and out == "snapshot snap1 deleted\n"


def test_usage_errors(fake, capsys):
    for args in (["volume", "clone", "vol2"], ["volume", "snapshot", "vol1"]):
        with pytest.raises(SystemExit) as exc:
            main(["--controller", fake.address, *args])
        assert exc.value.code == 2
    assert fake.requests == []


def test_the_bar_off_a_terminal_prints_a_line_per_tenth():
    answers = iter([admin_pb2.Snapshot(state="creating", progress=p) for p in (0.0, 0.05, 0.5, 0.55)]
                   + [admin_pb2.Snapshot(state="ready", progress=1.0)])
    out = io.StringIO()
    final = progress.wait(lambda: next(answers), "copying", out=out, sleep=lambda s: None)
    assert final.state == "ready"
    assert [line.split()[-1] for line in out.getvalue().splitlines()] == ["0%", "50%", "100%"]
    assert progress.bar(0.5, width=4) == "[##--]  50%"


def test_a_copy_without_progress_stops_the_wait_with_an_error(fake, capsys, monkeypatch):
    """A copy whose progress does not move for ``progress.STALL`` seconds (its owner stopped answering) ends the
    wait with exit 1 and a message saying the copy goes on and where to look; it used to wait for ever."""
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(progress, "_sleep", sleep)
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    monkeypatch.setattr(fake, "_progress", lambda: ("creating", 0.25))
    code, out, err = run(fake, capsys, "volume", "snapshot", "vol1", "--snapshot", "snap1")
    assert code == 1 and out == ""
    assert "copying snapshot snap1: no progress for 600 s (at 25%); it goes on in the background" in err
    assert now[0] == 600 and len(fake.requests) == 1 + 1200  # the create, then one look per 0.5 s until it gave up
