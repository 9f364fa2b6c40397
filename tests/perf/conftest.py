"""tests/perf holds benchmarks, run by hand (see README.md); pytest collects nothing here."""

collect_ignore_glob = ["*.py"]
