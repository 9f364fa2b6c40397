"""A LUN's backing file deleted while it is served (``server.check_backing_files``, run on every portal tick).

The LUN goes on serving the open file, as tgtd and LIO do, but the file has no name any more and all of its
data goes when the LUN closes: the portal says so once, as an ERROR naming where the data can still be copied
from.  Real files on the test's temporary directory; no mock.
"""

from __future__ import annotations

import logging
import os

from node_agent.iscsi.server import check_backing_files
from node_agent.iscsi.target import TargetNode, TargetRegistry
from node_agent.scsi.device import LogicalUnit, LunIdentity, LunMap
from node_agent.storage.backing import FileBackingStore

IQN = "iqn.2026-12.io.shoal.test:deleted"
MiB = 1 << 20


def registry_of(*stores) -> tuple[TargetRegistry, list[LogicalUnit]]:
    units = [LogicalUnit(store, LunIdentity(volume_id=f"vol-{n}"), target_name=IQN) for n, store in enumerate(stores)]
    return TargetRegistry([TargetNode(IQN, LunMap(dict(enumerate(units))))]), units


def test_a_deleted_backing_file_is_reported_once_and_still_served(tmp_path, caplog):
    kept, deleted = FileBackingStore(str(tmp_path / "kept.img"), size=MiB), FileBackingStore(
        str(tmp_path / "deleted.img"), size=MiB)
    registry, (_, unit) = registry_of(kept, deleted)
    try:
        assert check_backing_files(registry) == []
        os.unlink(tmp_path / "deleted.img")
        caplog.set_level(logging.ERROR, logger="shoal.iscsi.server")
        assert check_backing_files(registry) == [unit]
        [record] = caplog.records
        message = record.getMessage()
        assert f"LUN 1 of {IQN}" in message and str(tmp_path / "deleted.img") in message
        assert f"/proc/{os.getpid()}/fd/{deleted.fd}" in message  # where its data can still be copied from
        assert check_backing_files(registry) == [] and len(caplog.records) == 1  # once, not on every tick
        deleted.write(4096, b"\x5a" * 512)  # still served: reads and writes go on (and the copy holds them)
        assert deleted.read(4096, 512) == b"\x5a" * 512
        with open(f"/proc/self/fd/{deleted.fd}", "rb") as copy:
            copy.seek(4096)
            assert copy.read(512) == b"\x5a" * 512
    finally:
        kept.close()
        deleted.close()


def test_a_renamed_or_closed_backing_file_is_not_reported(tmp_path, caplog):
    """Renamed, the file keeps its data under another name; closed (a LUN removed), there is nothing to say."""
    moved, closed = FileBackingStore(str(tmp_path / "a.img"), size=MiB), FileBackingStore(
        str(tmp_path / "b.img"), size=MiB)
    registry, _ = registry_of(moved, closed)
    try:
        os.rename(tmp_path / "a.img", tmp_path / "a2.img")
        closed.close()
        os.unlink(tmp_path / "b.img")
        caplog.set_level(logging.ERROR, logger="shoal.iscsi.server")
        assert check_backing_files(registry) == [] and caplog.records == []
    finally:
        moved.close()

