"""A session ending does not stall the others: the garbage collections ``shoal target`` runs while it
serves scan only what came after startup (issue 7, fair to every session).

When a connection closes, the portal's next tick runs a full collection (the connection's core and
channel refer to each other; only the collector frees them).  Such a collection runs on the event
loop that serves every session, and it takes time in proportion to the objects it scans: on this
machine 10 ms for the 32,000 objects of ``shoal target``'s modules and 40 ms when the command line
still imported the controller, gRPC and the Kubernetes client.  So the target (1) loads none of
those, and (2) hides its startup objects from the collector once it serves
(``eventloop.freeze_startup_objects``).

The figures are the collector's own, not times: a real ``shoal target`` process runs with a
``sitecustomize`` from this test on its path that appends, at the start of every full collection,
the number of objects the collection will scan, the number frozen, and whether gRPC or the
Kubernetes client are loaded.  libiscsi's ``iscsi-inq`` (a real initiator) logs in and out twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.conftest import require_tools
from tests.support.shoal_target import running_shoal_target

pytestmark = pytest.mark.peer

SITECUSTOMIZE = """
import gc, json, sys

def _on_collection(phase, info):
    if phase == "start" and info["generation"] == 2:
        record = {"scanned": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                  "heavy": sorted(m for m in ("grpc", "kubernetes", "controller") if m in sys.modules)}
        with open(LOG, "a") as handle:
            handle.write(json.dumps(record) + "\\n")

gc.callbacks.append(_on_collection)
"""


def test_collections_while_serving_scan_only_what_came_after_startup(tmp_path, monkeypatch):
    require_tools("iscsi-inq")
    log = tmp_path / "collections.jsonl"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"LOG = {str(log)!r}\n" + SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with running_shoal_target(tmp_path / "target", luns=(("disk0", 16 << 20),)) as target:
        for _ in range(2):  # each session's end sets the next tick's full collection going
            result = subprocess.run(["iscsi-inq", target.url(0)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "Vendor:SHOAL" in result.stdout
            time.sleep(1.5)  # the portal ticks every second
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    serving = [r for r in records if r["frozen"]]
    assert serving, f"no full collection ran after the target froze its startup objects: {records}"
    assert all(r["frozen"] > 10_000 for r in serving), serving  # startup's modules and settings (~32,000)
    assert max(r["scanned"] for r in serving) < 5_000, serving  # 32,000+ before the freeze
    assert not any(r["heavy"] for r in records), records  # ``shoal target`` loads no gRPC or Kubernetes client
