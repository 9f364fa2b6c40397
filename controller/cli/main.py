"""shoalctl's command line: global flags, one subcommand per noun, exit codes.

Exit codes: 0 done; 1 the controller refused (its message printed) or could
not be reached; 2 bad usage (argparse's own code; nothing was sent).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from controller.cli import node, output, pool, snapshot, status, volume
from controller.cli.api import EXIT_OK, Api, CliError
from controller.cli.context import controller_address

NOUNS = (node, pool, volume, snapshot, status)


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+src"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0 and 86400")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoalctl", description="Administer a Shoal pool: nodes, pools, volumes, attachments.",
        epilog="The controller is --controller, else $SHOAL_CONTROLLER, else the address `shoal up` wrote to "
               "$SHOAL_CONTEXT (~/.config/shoal/context.json), else 127.0.0.1:7450.")
    parser.add_argument("--version", action="version", version=f"shoalctl {_version()}")
    parser.add_argument("--controller", metavar="HOST:PORT", help="the controller's address")
    parser.add_argument("--timeout", type=_positive, default=180.0, metavar="SECONDS",
                        help="deadline of one request (default %(default)g; attaching can take a while)")
    parser.add_argument("--tls-ca", default="", help="CA that signed the controller's certificate (enables TLS)")
    parser.add_argument("--tls-cert", default="", help="client certificate (controllers that require mTLS)")
    parser.add_argument("--tls-key", default="", help="key of --tls-cert")
    output.add_global_output_flag(parser)
    sub = parser.add_subparsers(dest="noun", required=True, metavar="{node,pool,volume,snapshot,status}")
    for noun in NOUNS:
        noun.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad usage
    address, source = controller_address(args.controller)
    api = None
    try:
        api = Api(address, source, timeout=args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                  tls_key=args.tls_key)
        args.func(api, args)
        return EXIT_OK
    except CliError as exc:
        print(f"shoalctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("shoalctl: interrupted (the controller may still finish the request)", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    finally:
        if api is not None:
            api.close()


if __name__ == "__main__":
    raise SystemExit(main())
