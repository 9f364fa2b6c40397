"""The benchmark's pure helpers (tests/perf/bench_targets.py, tests/support/istgt.py), without running anything.

The benchmark itself is run by hand (tests/perf/README.md); what is checked
here is what would silently skew its numbers: reading the clients' output
(iscsi-perf's closing line among its ``\\r`` progress lines, iperf3's JSON,
/proc/PID/status), the istgt config it writes, and the verdicts against issue
7's goals. The client outputs below are copied from real runs on this machine.
"""

from __future__ import annotations

import json

import pytest

from tests.perf import bench_report as report
from tests.perf import bench_targets as bench
from tests.support.istgt import IstgtError, render_config

MiB = 1 << 20

ISCSI_PERF_OUTPUT = (
    "iscsi-perf version 0.1 - (c) 2014-2015 by Peter Lieven <pl@\u0138amp.de>\n\n"
    "connected to iscsi://127.0.0.1:13260/iqn.2026-11.io.shoal.test:istgt/0\n"
    "capacity is 131072 blocks or 67108864 byte (64 MB)\n"
    "performing RANDOM READ with 32 parallel requests\n"
    "FIXED transfer size of 8 blocks (4096 byte)\n"
    "will run for 3 seconds.\n\n"
    "\r00:00:02 - lba 127582, iops current 14088 (55 MB/s), iops average 14088 (55 MB/s), in_flight 32, busy 0"
    "        \r00:00:01 - lba 65184, iops current 13436 (52 MB/s), iops average 13762 (53 MB/s), in_flight 32, "
    "busy 0        \riops average 13132 (51 MB/s)                                                        \n\n"
    "finished.\n"
)


def test_iscsi_perf_closing_average_not_a_progress_line():
    count, seconds, client_us = bench.parse_iscsi_perf(ISCSI_PERF_OUTPUT, 3)
    assert (count, seconds, client_us) == (13132 * 3, 3, None)


def test_iscsi_perf_output_without_closing_line_is_an_error():
    aborted = ISCSI_PERF_OUTPUT.split("\riops average 13132")[0] + "\nABORTED!\n"
    with pytest.raises(ValueError, match="iscsi-perf"):
        bench.parse_iscsi_perf(aborted, 3)


def test_iperf3_json_counts_received_bytes_in_mib():
    output = json.dumps({"end": {
        "sum_sent": {"bytes": 1397227520, "seconds": 2.000033, "retransmits": 2},
        "sum_received": {"start": 0, "end": 2.000114, "seconds": 2.000114, "bytes": 1393426432,
                         "bits_per_second": 5573388044.881442, "sender": True}}})
    count, seconds, _ = bench.parse_iperf3(output)
    assert count == pytest.approx(1393426432 / MiB)
    assert seconds == pytest.approx(2.000114)
    with pytest.raises(ValueError, match="iperf3"):
        bench.parse_iperf3('{"error": "unable to connect to server"}')


def test_qemu_img_bench_time():
    out = ("Sending 20000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 4096)\n"
           "Run completed in 1.695 seconds.\n")
    assert bench.parse_qemu_img_bench(out, 20000) == (20000, 1.695, None)
    with pytest.raises(ValueError):
        bench.parse_qemu_img_bench("qemu-img: Could not open", 20000)


def test_status_memory_lines():
    status = "Name:\tistgt\nVmPeak:\t  300000 kB\nVmHWM:\t    9216 kB\nVmRSS:\t    8192 kB\nThreads:\t7\n"
    assert bench.parse_status_memory(status) == (8192, 9216)
    assert bench.parse_status_memory("Name:\tkthreadd\nThreads:\t1\n") == (0, 0)


def test_istgt_config_has_tuned_limits_portal_and_lun(tmp_path):
    text = render_config(tmp_path, ("127.0.0.1", 3261), [(tmp_path / "a.img", 256 * MiB)])
    lines = [line.strip() for line in text.splitlines()]
    for expected in ("MaxRecvDataSegmentLength 262144", "MaxBurstLength 1048576", "FirstBurstLength 262144",
                     "Portal DA1 127.0.0.1:3261", "Netmask 127.0.0.1", "[UnitControl]", "AuthMethod None",
                     f'LUN0 Storage "{tmp_path / "a.img"}" 256MB', f'PidFile "{tmp_path / "istgt.pid"}"'):
        assert expected in lines, f"{expected!r} missing from:\n{text}"
    assert not any(line.startswith("MaxXmitDataSegmentLength") for line in lines)  # not an istgt key
    assert not any(line.startswith("Portal UC") for line in lines)  # the unit controller listens nowhere


@pytest.mark.parametrize("bad", [
    dict(luns=[("/tmp/a\".img", 64 * MiB)]),
    dict(luns=[("/tmp/a\n[Global].img", 64 * MiB)]),
    dict(luns=[("/tmp/a.img", 64 * MiB + 512)]),
    dict(luns=[]),
    dict(portal=("127.0.0.1", 0)),
    dict(queue_depth=256),
])
def test_istgt_config_refuses_what_it_cannot_write(tmp_path, bad):
    kwargs = dict(portal=("127.0.0.1", 3261), luns=[(tmp_path / "a.img", 64 * MiB)]) | bad
    portal, luns = kwargs.pop("portal"), kwargs.pop("luns")
    with pytest.raises(IstgtError):
        render_config(tmp_path, portal, luns, **kwargs)


def _row(workload: str, disturbed: bool = False, **sides) -> dict:
    row = {"workload": workload, "disturbed": disturbed}
    for side, (iops, cpu) in sides.items():
        row[side] = {"median": {"iops": iops, "mb_per_s": iops * 4096 / 1e6, "target_cpu_us_per_io": cpu}}
    return row


def test_verdict_4k_read_passes_only_when_every_goal_holds():
    good = report.verdict(_row("4k-read", shoal=(100_000, 8.0), tgtd=(37_000, 28.0), istgt=(40_000, 25.0)))
    assert good["status"] == "PASS", good
    slow = report.verdict(_row("4k-read", shoal=(80_000, 8.0), tgtd=(37_000, 28.0), istgt=(40_000, 25.0)))
    assert slow["status"] == "FAIL" and "shoal/tgtd 2.16 (goal >= 2.5) ✗" in slow["text"]
    costly = report.verdict(_row("4k-read", shoal=(100_000, 12.0), tgtd=(37_000, 28.0), istgt=(40_000, 25.0)))
    assert costly["status"] == "FAIL" and "12.0 µs CPU/IO (goal <= 10) ✗" in costly["text"]
    behind_istgt = report.verdict(_row("1m-read", shoal=(3000, 900.0), tgtd=(1000, 900.0), istgt=(3100, 900.0)))
    assert behind_istgt["status"] == "FAIL" and "shoal/istgt 0.97 (goal > 1) ✗" in behind_istgt["text"]


def test_verdict_of_a_missed_1m_ratio_names_the_loopback_baseline_and_still_fails():
    row = _row("1m-write", shoal=(2549, 359.0), tgtd=(1370, 856.0), istgt=(1473, 529.0))
    for side in ("shoal", "tgtd", "istgt"):  # 1 MiB per I/O
        row[side]["median"]["mb_per_s"] = row[side]["median"]["iops"] * MiB / 1e6
    missed = report.verdict(row, tcp_mb_s=2434.0)
    assert missed["status"] == "FAIL", missed
    assert "[2.5x tgtd is 3,591 MB/s; one TCP stream over loopback carried 2,434 MB/s in this run]" in missed["text"]
    assert "loopback" not in report.verdict(row)["text"]  # no baseline in the run: nothing to say
    row["shoal"]["median"]["client_cpu_us_per_io"] = 333.0  # the client's thread bounds what any target gets
    bound = report.verdict(row, tcp_mb_s=2434.0)
    assert bound["status"] == "FAIL", bound
    assert bound["text"].endswith("carried 2,434 MB/s in this run; the client's one thread, at 333 µs CPU per "
                                  "I/O, could issue at most 3,149 MB/s]"), bound
    assert "at most 3,149 MB/s]" in report.verdict(row)["text"]
    met = report.verdict(_row("1m-read", shoal=(3000, 200.0), tgtd=(900, 900.0), istgt=(1500, 500.0)), tcp_mb_s=2434.0)
    assert met["status"] == "PASS" and "loopback" not in met["text"]


def test_verdict_of_a_missed_4k_row_names_the_client_bound_and_how_busy_both_sides_were():
    row = _row("4k-write", shoal=(70_280, 12.32), tgtd=(42_379, 26.6), istgt=(52_781, 21.4))
    plain = report.verdict(row)
    assert plain["status"] == "FAIL" and "[" not in plain["text"], plain  # no client figure: nothing to add
    row["shoal"]["median"]["client_cpu_us_per_io"] = 14.12
    bound = report.verdict(row)
    assert bound["status"] == "FAIL", bound
    assert bound["text"].endswith("[2x tgtd is 84,758 IOPS; the client's one thread, at 14.1 µs CPU per I/O, "
                                  "could issue at most 70,822 IOPS; target 0.87 and client 0.99 cores busy]"), bound
    cheap = _row("4k-write", shoal=(90_000, 12.0), tgtd=(42_000, 26.6), istgt=(52_000, 21.4))
    cheap["shoal"]["median"]["client_cpu_us_per_io"] = 11.0  # ratio met, CPU goal missed: only the cores
    assert report.verdict(cheap)["text"].endswith("✗ [target 1.08 and client 0.99 cores busy]")
    met = _row("4k-read", shoal=(100_000, 8.0), tgtd=(37_000, 28.0), istgt=(40_000, 25.0))
    met["shoal"]["median"]["client_cpu_us_per_io"] = 9.0
    assert "[" not in report.verdict(met)["text"]


def test_verdict_needs_all_three_targets_and_flags_disturbed_rows():
    assert report.verdict(_row("4k-write", shoal=(1, 1.0), tgtd=(1, 1.0)))["status"] == "n/a"
    noisy = report.verdict(_row("4k-write", True, shoal=(90_000, 9.0), tgtd=(34_000, 30.0), istgt=(32_000, 30.0)))
    assert noisy["status"] == "PASS" and noisy["text"].endswith("[disturbed: rerun on a quiet machine]")


def test_verdict_digests_within_fifteen_percent():
    assert report.verdict(_row("hd-4k-read", off=(100_000, 8.0), on=(86_000, 9.0)))["status"] == "PASS"
    late = report.verdict(_row("hdd-4k-write", off=(100_000, 8.0), on=(84_000, 9.0)))
    assert late["status"] == "FAIL" and "on/off IOPS 0.84" in late["text"]


def test_verdict_tcp_baseline_is_information():
    row = {"workload": "tcp-loopback", "disturbed": False,
           "tcp": {"median": {"iops": 2800.0, "mb_per_s": 2936.0, "target_cpu_us_per_io": 200.0}}}
    result = report.verdict(row, shoal_1m_read_mb_s=1468.0)
    assert result["status"] == "info" and "50% of it" in result["text"]
