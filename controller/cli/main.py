"""shoalctl's command line: global flags, one subcommand per noun, exit codes.

Exit codes: 0 done; 1 the controller refused (its message printed) or could
not be reached; 2 bad usage (argparse's own code, or an argument that is not
valid UTF-8; nothing was sent); 130 interrupted; 141 stdout closed early
(``shoalctl volume list | head -1``: 128 + SIGPIPE, as a shell reports a
command killed by it; nothing printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from controller.cli import node, output, pool, snapshot, status, volume
from controller.cli.api import EXIT_OK, EXIT_USAGE, Api, CliError
from controller.cli.context import controller_address

NOUNS = (node, pool, volume, snapshot, status)
EXIT_PIPE = 141  # 128 + SIGPIPE: stdout was closed before everything was printed


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


def _argument_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """dest -> how the usage names it (``--node``, ``name``), over the parsers this command went through."""
    names: dict[str, str] = {}
    while parser is not None:
        chosen = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None))
            else:
                names[action.dest] = action.option_strings[-1] if action.option_strings else (action.metavar or
                                                                                              action.dest)
        parser = chosen
    return names


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates (surrogateescape)
        return True
    return False


def _check_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every string argument must be UTF-8 (names go to the controller as protobuf strings): a usage error
    naming the argument, not a UnicodeEncodeError traceback."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        strings = [s for v in values for s in (v if isinstance(v, tuple) else (v,)) if isinstance(s, str)]
        bad = next((s for s in strings if _not_utf8(s)), None)
        if bad is not None:
            shown = repr(bad.encode("utf-8", "surrogateescape"))[1:]  # 'bad\xff', ASCII only
            name = _argument_names(parser, args).get(dest, dest)
            raise CliError(f"argument {name}: {shown} is not valid UTF-8", EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    api = None
    try:
        _check_utf8(parser, args)
        address, source = controller_address(args.controller)
        if _not_utf8(address):
            raise CliError(f"the controller address from {source} is not valid UTF-8", EXIT_USAGE)
        api = Api(address, source, timeout=args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                  tls_key=args.tls_key)
        args.func(api, args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is reported below, not by the interpreter
        return EXIT_OK
    except BrokenPipeError:
        # The reader went away (`| head -1`): say nothing, as `cat` killed by SIGPIPE does.  stdout now points
        # at /dev/null, so the interpreter's own flush at exit has nowhere to fail.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (embedded): nothing to redirect
            pass
        return EXIT_PIPE
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
