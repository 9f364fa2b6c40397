"""Generate the Python code of the .proto files under protos/ (checked in; tests check it is current).

Run from anywhere: ``python protos/generate.py [--check]``. Needs grpcio-tools (a test extra).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOS = sorted((REPO / "protos").rglob("*.proto"))


def generate(out: Path) -> None:
    from grpc_tools import protoc

    # the well-known types (descriptor, timestamp, wrappers: csi.proto imports them) come with grpc_tools
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{REPO}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    args += [str(p.relative_to(REPO)) for p in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*") if p.suffix in (".py", ".pyi")
                  and p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))


#: The grpcio-tools release that generated a ``_pb2_grpc.py`` file (its code then refuses an older grpcio at
#: import). A newer grpcio-tools patch release changes only this stamp, so ``check`` does not count it: CI installs
#: the newest grpcio-tools, and the stamp checked in stays the oldest grpcio the code was generated for.
_STAMP = re.compile(rb"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def _same(fresh: Path, checked_in: Path) -> bool:
    if not checked_in.exists():
        return False
    if fresh.name.endswith("_pb2_grpc.py"):
        return _STAMP.sub(b"", fresh.read_bytes()) == _STAMP.sub(b"", checked_in.read_bytes())
    return filecmp.cmp(fresh, checked_in, shallow=False)


def check() -> list[str]:
    """Paths whose checked-in code differs from what the .proto files generate (the grpc version stamp aside)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        stale = [str(p) for p in fresh if not _same(Path(tmp) / p, REPO / p)]
        extra = [str(p) for p in generated_files(REPO) if p not in fresh]
        return stale + extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the checked-in code is stale")
    if parser.parse_args().check:
        stale = check()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    generate(REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
