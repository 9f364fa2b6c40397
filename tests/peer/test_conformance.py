"""libiscsi's conformance suite against ``shoal target`` (issue 2, check 3).

``iscsi-test-cu --dataloss --test=ALL`` runs every test of libiscsi's suite
(two initiator names log in; the target's ACL admits both). Per-suite counts of
passed/failed/skipped are printed. No test may fail, and the suites of the
commands issue 2 lists (and the reservations, COMPARE AND WRITE, ORWRITE and
PRE-FETCH Shoal implements besides) must not have any failure in particular.
On this machine tgtd passes 160, skips 62 and fails 8 of the 230 tests; Shoal
must pass more. (Skips left: EXTENDED COPY/RECEIVE COPY RESULTS, SANITIZE which
needs --allow-sanitize, multipath which needs a second portal, removable-medium
and write-protect tests, and WRITE ATOMIC, which Shoal offers only on opt-in.)
"""

from __future__ import annotations

import pytest

from tests.conftest import require_tools
from tests.support.libiscsi_cu import run_suite
from tests.support.shoal_target import LIBISCSI_INITIATORS, running_shoal_target

pytestmark = [pytest.mark.peer, pytest.mark.slow]

# Suites whose commands issue 2 implements (SPC-4/SBC-3 commands it lists, and RFC 7143 behaviour).
MUST_PASS = {
    "TestUnitReady", "Inquiry", "Mandatory", "ReadCapacity10", "ReadCapacity16",
    "Read6", "Read10", "Read12", "Read16", "Write10", "Write12", "Write16",
    "WriteVerify10", "WriteVerify12", "WriteVerify16", "Verify10", "Verify12", "Verify16",
    "Unmap", "WriteSame10", "WriteSame16", "ModeSense6", "ReportSupportedOpcodes",
    "StartStopUnit", "PreventAllow", "GetLBAStatus", "NoMedia",
    "iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF",
    "CompareAndWrite", "OrWrite", "Prefetch10", "Prefetch16", "ReadDefectData10", "ReadDefectData12",
    "PrinReadKeys", "PrinReportCapabilities", "PrinServiceactionRange", "ProutRegister", "ProutReserve",
    "ProutClear", "ProutPreempt", "Reserve6",
}
TGTD_PASSED = 160


def test_libiscsi_conformance_suite(tmp_path):
    require_tools("iscsi-test-cu")
    with running_shoal_target(tmp_path, luns=(("cu", 128 << 20),), allow=list(LIBISCSI_INITIATORS)) as target:
        results = run_suite(target.url(0), "ALL", timeout=1800)
    print("\niscsi-test-cu --dataloss --test=ALL against shoal target:")
    print(results.table())
    counts = results.counts()
    assert results.outcomes, f"no test results parsed:\n{results.output[-4000:]}"
    must = [name for name in results.failed() if name.split(".")[0] in MUST_PASS]
    assert not must, f"failed: {must}\n{results.output[-6000:]}"
    assert not results.failed(), results.failed()
    assert counts["passed"] > TGTD_PASSED, results.table()
