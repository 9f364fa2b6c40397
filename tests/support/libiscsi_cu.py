"""Run libiscsi's conformance suite (``iscsi-test-cu``) and count its results.

CUnit counts a skipped test as passed; a test that printed ``[SKIPPED]`` is a
skip here.  Results are grouped by suite (``ALL.<Suite>.<Test>``).

Some tests need a particular logical unit to run at all (a write-protected
one, one offering WRITE ATOMIC, a second portal); ``SuiteResults.overlay``
folds a run of those tests against such a unit into the run of the whole
suite: a test the whole run skipped takes the focused run's outcome, and a
failure in either run stays a failure.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^  Test: (\S+) \.\.\.")
# The verdict CUnit prints after "Test: Name ..."; "[FAILED] ..." lines inside a test are messages.
_END = re.compile(r"(?<!\[)\b(passed|FAILED)\b(?!\])")


@dataclass
class SuiteResults:
    outcomes: dict[str, str] = field(default_factory=dict)  # "Suite.Test" -> passed / failed / skipped
    output: str = ""
    returncode: int = 0

    def counts(self) -> Counter:
        return Counter(self.outcomes.values())

    def by_suite(self) -> dict[str, Counter]:
        table: dict[str, Counter] = defaultdict(Counter)
        for name, outcome in self.outcomes.items():
            table[name.split(".")[0]][outcome] += 1
        return dict(sorted(table.items()))

    def overlay(self, other: "SuiteResults") -> "SuiteResults":
        """These results with ``other``'s outcomes for the tests skipped here (failures always kept)."""
        merged = dict(self.outcomes)
        for name, outcome in other.outcomes.items():
            mine = merged.get(name)
            if mine is None or mine == "skipped" or outcome == "failed":
                merged[name] = outcome
        return SuiteResults(merged, self.output + other.output, self.returncode or other.returncode)

    def failed(self) -> list[str]:
        return sorted(name for name, outcome in self.outcomes.items() if outcome == "failed")

    def table(self) -> str:
        lines = [f"{'suite':<28} {'passed':>6} {'failed':>6} {'skipped':>7}"]
        for suite, c in self.by_suite().items():
            lines.append(f"{suite:<28} {c['passed']:>6} {c['failed']:>6} {c['skipped']:>7}")
        total = self.counts()
        lines.append(f"{'TOTAL':<28} {total['passed']:>6} {total['failed']:>6} {total['skipped']:>7}")
        return "\n".join(lines)


def parse(output: str) -> dict[str, str]:
    """Outcome of every test in iscsi-test-cu's normal (verbose) output."""
    outcomes: dict[str, str] = {}
    suite = "?"
    current: str | None = None
    skipped = False
    for line in output.splitlines():
        match = _SUITE.match(line)
        if match:
            suite, current = match.group(1), None
            continue
        match = _TEST.match(line)
        if match:
            current = f"{suite}.{match.group(1)}"
            skipped = False
            line = line[match.end():]
        if current is None:
            continue
        end = _END.search(line)
        if "[SKIPPED]" in (line[: end.start()] if end else line):
            skipped = True
        if end:
            outcomes[current] = "failed" if end.group(1) == "FAILED" else ("skipped" if skipped else "passed")
            current = None
    return outcomes


def run_suite(url: str, test: str = "ALL", *, dataloss: bool = True, timeout: float = 1800,
              extra: list[str] | None = None, multipath_url: str | None = None) -> SuiteResults:
    """``iscsi-test-cu --test=TEST [--dataloss] [EXTRA...] URL [MULTIPATH-URL]``; ``test`` may be a glob."""
    args = ["iscsi-test-cu", f"--test={test}"]
    if dataloss:
        args.append("--dataloss")
    args += extra or []
    args.append(url)
    if multipath_url:
        args.append(multipath_url)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, errors="replace")
    output = proc.stdout + proc.stderr
    return SuiteResults(parse(output), output, proc.returncode)
