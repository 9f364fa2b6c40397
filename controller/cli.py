"""shoalctl: the admin CLI (a stub until the controller exists)."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoalctl", description="Administer a Shoal pool.")
    parser.add_argument("--version", action="version", version=f"shoalctl {_version()}")
    parser.parse_args(argv)
    print(f"shoalctl {_version()}: the controller API arrives with the pool issue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
