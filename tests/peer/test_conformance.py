"""libiscsi's conformance suite against ``shoal target``, tgtd beside it (issue 6).

``iscsi-test-cu --dataloss --test=ALL`` runs every test of libiscsi's suite
(two initiator names log in; the target's ACL admits both).  Tests that need
a particular logical unit run again, focused, against one (their outcome
replaces the skip of the whole run; a failure anywhere stays a failure):

- ``MultipathIO`` with a second URL through a second portal of the same
  portal group (``--listen`` twice).  It runs first, on the fresh medium:
  libiscsi 1.19's MultipathIO.CompareAndWrite zeroes LBAs 0-255 with WRITE
  SAME but compares LBA 256 too, so it only holds where LBA 256 is still zero.
- ``Sanitize.*`` with ``--allow-sanitize``.  Sanitize.Reset checks that a
  SANITIZE goes on through an ABORT TASK of it, resets and a new login (SBC-4
  §4.11), so it needs one that lasts: it runs against a target of its own
  (started beside the whole run, so its minute of waiting costs no time) whose
  16 MiB LUN is on the slow TEST device (0.5 s per I/O: the pass takes ~9 s),
  with ``--nop-interval 90``: the test then sleeps 60 s between TEST UNIT
  READYs in libiscsi's synchronous API, which answers no NOP-In meanwhile, and
  a target that drops such a connection (Shoal after 10 + 30 s by default)
  makes libiscsi log in again to a fresh unit attention every time.
- ``WriteAtomic16`` against a LUN that opts in (``PATH:SIZE:atomic``); the
  default LUN withdraws WRITE ATOMIC (see ``LunSettings.max_atomic_transfer_bytes``).
- ``ReadOnly`` against a write-protected LUN (``PATH:SIZE:ro``).
- ``PreventAllow`` and ``StartStopUnit`` against a removable medium
  (``PATH:SIZE:removable``, RMB=1): eject, load, PREVENT ALLOW MEDIUM REMOVAL.

Per-suite counts of passed/failed/skipped are printed with tgtd's from its run
of the whole suite in this same test.  No test may fail, and at least 218 of
the 230 must pass rather than skip.  The remaining skips and their reasons are
listed in the README's conformance section.
"""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from node_agent.iscsi.initiator.blockdev import LunDevice
from node_agent.iscsi.initiator.client import ClientSettings, CommandFailed, IscsiClient
from tests.conftest import require_tools
from tests.support.libiscsi_cu import SuiteResults, run_suite
from tests.support.shoal_target import LIBISCSI_INITIATORS, running_shoal_target
from tests.support.slow_target import slow_command
from tests.support.tgtd import running_tgtd

pytestmark = [pytest.mark.peer, pytest.mark.slow]

# Suites of commands Shoal implements: none of them may fail.
MUST_PASS = {
    "TestUnitReady", "Inquiry", "Mandatory", "ReadCapacity10", "ReadCapacity16",
    "Read6", "Read10", "Read12", "Read16", "Write10", "Write12", "Write16",
    "WriteVerify10", "WriteVerify12", "WriteVerify16", "Verify10", "Verify12", "Verify16",
    "Unmap", "WriteSame10", "WriteSame16", "ModeSense6", "ReportSupportedOpcodes",
    "StartStopUnit", "PreventAllow", "GetLBAStatus", "NoMedia",
    "iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF",
    "CompareAndWrite", "OrWrite", "Prefetch10", "Prefetch16", "ReadDefectData10", "ReadDefectData12",
    "PrinReadKeys", "PrinReportCapabilities", "PrinServiceactionRange", "ProutRegister", "ProutReserve",
    "ProutClear", "ProutPreempt", "Reserve6", "ExtendedCopy", "ReceiveCopyResults", "Sanitize",
    "MultipathIO", "WriteAtomic16", "ReadOnly",
}
# Every Sanitize test but Reset, which has a target of its own (see the module docstring).
SANITIZE_TESTS = ("BlockErase", "BlockEraseReserved", "CryptoErase", "CryptoEraseReserved", "ExitFailureMode",
                  "InvalidServiceAction", "Overwrite", "OverwriteReserved", "Readonly", "Reservations")
MIN_PASSED = 218


def sanitize_reset_results(tmp_path) -> SuiteResults:
    disk = tmp_path / "sanitize.img"
    with running_shoal_target(tmp_path, luns=((str(disk), 16 << 20),), allow=list(LIBISCSI_INITIATORS),
                              command=slow_command([disk], 0.5), extra_args=["--nop-interval", "90"]) as target:
        return run_suite(target.url(0), "ALL.Sanitize.Reset", extra=["--allow-sanitize"], timeout=400)


def shoal_results(tmp_path) -> SuiteResults:
    luns = (("cu", 128 << 20), ("atomic", 16 << 20, "atomic"), ("ro", 16 << 20, "ro"),
            ("removable", 16 << 20, "removable"))
    with ThreadPoolExecutor(1) as beside, \
            running_shoal_target(tmp_path, luns=luns, allow=list(LIBISCSI_INITIATORS),
                                 listen=["127.0.0.1:0", "127.0.0.1:0"]) as target:
        sanitize_reset = beside.submit(sanitize_reset_results, tmp_path / "sanitize-reset")
        multipath = run_suite(target.url(0), "ALL.MultipathIO", multipath_url=target.url(0, portal=1), timeout=600)
        results = run_suite(target.url(0), "ALL", timeout=1800)
        for name in SANITIZE_TESTS:
            results = results.overlay(run_suite(target.url(0), f"ALL.Sanitize.{name}", timeout=300,
                                                extra=["--allow-sanitize"]))
        results = results.overlay(multipath)
        results = results.overlay(run_suite(target.url(1), "ALL.WriteAtomic16", timeout=300))
        results = results.overlay(run_suite(target.url(2), "ALL.ReadOnly", timeout=300))
        for suite in ("PreventAllow", "StartStopUnit"):
            results = results.overlay(run_suite(target.url(3), f"ALL.{suite}", timeout=300))
        results = results.overlay(sanitize_reset.result())
    return results


def tgtd_results(tmp_path) -> SuiteResults:
    with running_tgtd(tmp_path, luns=(("cu", 128 << 20),)) as tgtd:
        return run_suite(tgtd.url(1), "ALL", timeout=1800)


def side_by_side(shoal: SuiteResults, tgtd: SuiteResults) -> str:
    ours, theirs = shoal.by_suite(), tgtd.by_suite()
    lines = [f"{'suite':<24} {'shoal pass/fail/skip':>22}   {'tgtd pass/fail/skip':>21}"]
    for suite in sorted(set(ours) | set(theirs)):
        a, b = ours.get(suite, {}), theirs.get(suite, {})
        lines.append(f"{suite:<24} {_cell(a):>22}   {_cell(b):>21}")
    lines.append(f"{'TOTAL':<24} {_cell(shoal.counts()):>22}   {_cell(tgtd.counts()):>21}")
    return "\n".join(lines)


def _cell(counts) -> str:
    return f"{counts.get('passed', 0)}/{counts.get('failed', 0)}/{counts.get('skipped', 0)}"


def test_libiscsi_conformance_suite(tmp_path):
    require_tools("iscsi-test-cu", "tgtd", "tgtadm")
    shoal = shoal_results(tmp_path / "shoal")
    tgtd = tgtd_results(tmp_path / "tgtd")
    print("\niscsi-test-cu --dataloss --test=ALL: shoal target (with focused runs) and tgtd")
    print(side_by_side(shoal, tgtd))
    print("shoal skips:", ", ".join(sorted(n for n, o in shoal.outcomes.items() if o == "skipped")))
    counts = shoal.counts()
    assert shoal.outcomes and tgtd.outcomes, f"no test results parsed:\n{shoal.output[-4000:]}"
    must = [name for name in shoal.failed() if name.split(".")[0] in MUST_PASS]
    assert not must, f"failed: {must}\n{shoal.output[-6000:]}"
    assert not shoal.failed(), shoal.failed()
    assert counts["passed"] >= MIN_PASSED, shoal.table()
    assert counts["passed"] > tgtd.counts()["passed"], side_by_side(shoal, tgtd)


def test_reservation_holds_across_portals_and_a_restart(tmp_path):
    """Issue 6: A registers with APTPL=1 and reserves Write Exclusive through portal 1; B, through
    portal 2, sees the same logical unit (NAA) and reservation and its WRITE conflicts; after the
    target process restarts on the same file, the reservation still holds (SPC-4 §5.13.5)."""
    backing = tmp_path / "pr.img"

    async def client(target, portal: int, name: str):
        host, port = (target.host, target.port) if portal == 0 else target.more_portals[portal - 1]
        c = await IscsiClient(host, port, target.iqn, settings=ClientSettings(initiator_iqn=name)).connect()
        return c, LunDevice(c, 0)

    async def conflicting_write(device) -> int:
        for _ in range(3):  # unit attentions (power on, reservation changes) come first
            try:
                await device.write(0, b"b" * 512)
                return 0
            except CommandFailed as exc:
                if exc.done.status != 0x02 or exc.sense_key != 0x6:
                    return exc.done.status
        return -1

    async def first(target):
        (a, da), (b, db) = await client(target, 0, "iqn.2026-11.io.shoal.test:a"), \
            await client(target, 1, "iqn.2026-11.io.shoal.test:b")
        try:
            params = struct.pack(">QQ4xB3x", 0, 0xA1, 0x01)  # REGISTER key A1h, APTPL=1
            cdb = bytes([0x5F, 0x00, 0, 0, 0]) + len(params).to_bytes(4, "big") + b"\0"
            await a.execute(cdb, 0, data_out=params)
            await da.reserve(0xA1, 1)
            assert (await da.identity())[0] == (await db.identity())[0]
            assert await db.read_reservation() == (0xA1, 1)
            assert await conflicting_write(db) == 0x18
        finally:
            await a.close(), await b.close()

    async def after_restart(target):
        b, db = await client(target, 1, "iqn.2026-11.io.shoal.test:b")
        try:
            assert await db.read_reservation() == (0xA1, 1)
            assert await conflicting_write(db) == 0x18
        finally:
            await b.close()

    listen = ["127.0.0.1:0", "127.0.0.1:0"]
    with running_shoal_target(tmp_path, luns=((str(backing), 8 << 20),), listen=listen) as target:
        asyncio.run(first(target))
    with running_shoal_target(tmp_path, luns=((str(backing), 0),), listen=listen) as target:
        asyncio.run(after_restart(target))
