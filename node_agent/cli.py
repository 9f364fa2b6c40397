"""``shoal``: the daemons of a Shoal node, one subcommand each.

``shoal target`` serves backing files as LUNs of one iSCSI target; it is a
thin shell over ``node_agent.target_service``.  ``shoal agent`` is the node
agent (``node_agent.agent``): volumes on this node's disks, their exports,
attachments here, registration with the controller.  ``shoal controller`` is
the controller daemon (``controller.daemon``); ``shoal up`` runs a controller
and one agent on this machine for trying Shoal out (``controller.up``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import sys

from node_agent import eventloop
from node_agent.agent.settings import parse_seconds
from node_agent.iscsi.connection import ConnectionSettings
from node_agent.iscsi.initiator import tools as iscsi_tools
from node_agent.iscsi.keys import TargetSettings, parse_digest_list
from node_agent.peer_names import CONTROLLER_NAMES, parse_names
from node_agent.iscsi.target import Credentials
from node_agent.target_service import LunSpec, TargetConfig, TargetSpec, check_iqn, serve

DEFAULT_IQN = "iqn.2026-11.io.shoal:target"


# What stops ``shoal target`` and ``shoal agent`` cleanly (LUNs flushed, sessions logged out, port and ready files
# removed): Ctrl-C, kill, and a closed terminal (SIGHUP), whose default would end the process on the spot.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

def _listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, an IPv6 host in brackets (``[::1]:3260``): a bare ``::1`` would read as host ``:``
    and port 1, and ``fd00::1:3260`` could be an address without a port as well as one with it."""
    expected = f"{text!r}: expected HOST:PORT (an IPv6 address as [ADDR]:PORT)"
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(expected)
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]") and ":" in host):
            raise argparse.ArgumentTypeError(expected)
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(expected)
    return host or "0.0.0.0", int(port)


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 host in brackets: the form ``--listen`` and ``shoal iscsi`` take."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_file_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` at once (readers see the old file or the whole new one).

    The temporary file is a fresh one of an unguessable name, made with O_EXCL|O_NOFOLLOW beside ``path``:
    a fixed ``PATH.tmp`` would be opened through whatever another user of a shared directory (/tmp) put
    there first, a symlink to a file of ours included, and that file overwritten.  Its mode is 0666 less the
    umask, as ``open(path, "w")`` gives (the file holds addresses only; readers may be other users)."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"no free temporary name for {path}")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_file(path: str | None) -> None:
    """Remove a port or ready file (gone already is fine): a stale one would name a port nobody serves."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _ListenAction(argparse.Action):
    """The first ``--listen`` replaces the default portal; each further one adds a portal (``more_listen``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if namespace.listen is self.default:
            namespace.listen = value
        else:
            namespace.more_listen = [*namespace.more_listen, value]


class _LayoutAction(argparse.Action):
    """``--iqn`` and ``--lun`` in the order given (``layout``): each ``--lun`` belongs to the ``--iqn`` before
    it, and LUNs given before any ``--iqn`` to the first target."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.layout = [*(getattr(namespace, "layout", None) or []), (self.dest, value)]


def target_layout(layout: list[tuple[str, object]]) -> list[TargetSpec]:
    """The targets ``shoal target``'s ``--iqn``/``--lun`` options describe, in order."""
    names = [value for kind, value in layout if kind == "iqn"] or [DEFAULT_IQN]
    targets = [TargetSpec(str(name), []) for name in names]
    current = -1  # LUNs before the first --iqn belong to the first target
    for kind, value in layout:
        if kind == "iqn":
            current += 1
        else:
            targets[max(current, 0)].luns.append(value)  # type: ignore[arg-type]
    return targets


def _typed(parse):
    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, OSError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


_NODE_COMMANDS = ("target", "iscsi", "agent")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``shoal`` command line.  ``command``, the subcommand about to be parsed: for one of
    ``_NODE_COMMANDS`` the ``controller`` and ``up`` subcommands are left out, since their module
    imports gRPC and the Kubernetes client (some 42,000 objects, each one scanned by every full
    garbage collection of a ``shoal target``, and ~40 MiB of its memory)."""
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal node daemons.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    target = sub.add_parser("target", help="serve files as LUNs of an iSCSI target",
                            description="Serve each --lun file as a LUN (0, 1, …) of an iSCSI target; give "
                                        "--iqn again to start a further target, whose LUNs are the --lun "
                                        "options after it.")
    target.add_argument("--listen", type=_listen, action=_ListenAction, default=("127.0.0.1", 3260), metavar="HOST:PORT",
                        help="portal address (default 127.0.0.1:3260; port 0 picks a free one); repeat it for "
                             "more portals of the same portal group (multipath to the same LUNs)")
    target.set_defaults(more_listen=[])
    target.add_argument("--iqn", type=_typed(check_iqn), action=_LayoutAction, default=DEFAULT_IQN,
                        help=f"target name (default {DEFAULT_IQN}); repeat it to serve more targets, each "
                             "followed by its --lun options")
    target.set_defaults(layout=[])
    target.add_argument("--lun", type=_typed(LunSpec.parse), action=_LayoutAction, required=True,
                        metavar="PATH[:SIZE][:ro][:atomic][:removable]",
                        help="backing file; a sparse file of SIZE (e.g. 1G) is created when it does not exist; "
                             ":ro serves it write-protected; :removable as a removable medium initiators may eject; "
                             ":atomic offers WRITE ATOMIC(16) (only where a write to the file cannot tear on "
                             "power loss, e.g. a battery-backed cache)")
    target.add_argument("--chap", type=_typed(Credentials.parse), metavar="USER:SECRET",
                        help="initiators must authenticate with CHAP as USER with SECRET "
                             "(@FILE reads USER:SECRET from FILE, keeping it out of the process list)")
    target.add_argument("--mutual-chap", type=_typed(Credentials.parse), metavar="USER:SECRET",
                        help="the target authenticates itself to initiators (needs --chap; @FILE as for --chap)")
    target.add_argument("--allow", type=_typed(check_iqn), action="append", metavar="IQN",
                        help="admit only these initiator names (repeatable; default: any)")
    target.add_argument("--allow-anonymous", action="store_true",
                        help="serve without CHAP on an address other than loopback (refused otherwise)")
    for key in ("header", "data"):
        target.add_argument(f"--{key}-digest", type=_typed(parse_digest_list), default=("CRC32C", "None"),
                            metavar="LIST", help=f"{key.capitalize()}Digest values accepted, in order of preference "
                            "(default CRC32C,None: the initiator's choice); CRC32C alone requires digests: logins "
                            "without them fail")
    target.add_argument("--loops", type=int, default=1, metavar="N",
                        help="event loops (threads) serving connections, each pinned to one (default 1: "
                             "the GIL keeps the Python work on one core; more loops overlap only system calls)")
    target.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes serving sessions, to use N cores (default 1); each target is served by "
                             "one of them (needs at least N targets); this process routes logins to them")
    target.add_argument("--nop-interval", type=_typed(parse_seconds), default=ConnectionSettings.nop_interval,
                        metavar="SECONDS", help="ping an initiator silent this long with a NOP-In (default "
                        "%(default)g; 0: never ping, so a dead initiator's session lasts until TCP notices)")
    target.add_argument("--nop-timeout", type=_typed(parse_seconds), default=ConnectionSettings.nop_timeout,
                        metavar="SECONDS", help="drop a connection whose initiator leaves a ping unanswered this "
                        "long (default %(default)g); raise both for initiators that stop reading while idle")
    target.add_argument("--port-file", metavar="FILE",
                        help="write HOST:PORT of each portal here (one a line, the first --listen first) once listening")
    iscsi_tools.build_parser(sub)
    _agent_parser(sub)
    if command not in _NODE_COMMANDS:
        _controller_parsers(sub)
    return parser


def _controller_parsers(sub) -> None:
    from controller import daemon, up

    daemon.add_parser(sub)
    up.add_parser(sub)


def _agent_parser(sub) -> None:
    from node_agent.agent.settings import DiskSpec

    agent = sub.add_parser("agent", help="run the node agent (AgentService, iSCSI portal, registration)",
                           description="Serve this node's disks to the pool: AgentService over gRPC, one iSCSI "
                                       "target per exported volume, registration with the controller.")
    agent.add_argument("--node-id", help="this node's id (default: the host name)")
    agent.add_argument("--data-dir", default="/var/lib/shoal/agent", help="records and state (default %(default)s)")
    agent.add_argument("--disk", type=_typed(DiskSpec.parse), action="append", metavar="NAME=PATH[:CAPACITY]",
                       help="a directory offered to pools (repeatable; default: data0 under --data-dir)")
    agent.add_argument("--listen", default="127.0.0.1:7451", metavar="HOST:PORT",
                       help="AgentService address (default %(default)s; port 0 picks one)")
    agent.add_argument("--advertise-address", default="", metavar="HOST:PORT",
                       help="AgentService address sent to the controller (default: --listen)")
    agent.add_argument("--portal", default="127.0.0.1:3260", metavar="HOST:PORT",
                       help="iSCSI portal address (default %(default)s); keep the port fixed across restarts")
    agent.add_argument("--advertise-portal", action="append", default=[], metavar="IP:PORT",
                       help="portal address written into exports (repeatable; default: --portal)")
    agent.add_argument("--controller", default="127.0.0.1:7450", metavar="HOST:PORT",
                       help="controller address (default %(default)s; '' to run without one)")
    agent.add_argument("--initiator-iqn", default="", help="initiator name (default iqn.2026-11.io.shoal:node:ID)")
    agent.add_argument("--target-prefix", default="", help="export IQN prefix (default iqn.2026-11.io.shoal:target:ID)")
    agent.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="topology label (repeatable)")
    agent.add_argument("--tls-cert", default="", help="PEM certificate for AgentService (enables TLS)")
    agent.add_argument("--tls-key", default="", help="PEM key for --tls-cert")
    agent.add_argument("--tls-client-ca", default="", help="require client certificates signed by this CA")
    # No default value: given without --tls-client-ca it is refused rather than ignored
    agent.add_argument("--tls-controller-names", metavar="NAME[,NAME...]",
                       help="with --tls-client-ca: the client certificate names (CN or DNS SAN) AgentService admits, "
                            f"the controller's (default {','.join(CONTROLLER_NAMES)})")
    agent.add_argument("--controller-ca", default="", help="CA that signed the controller's certificate (TLS)")
    agent.add_argument("--controller-cert", default="", help="client certificate towards the controller (mTLS)")
    agent.add_argument("--controller-key", default="", help="key for --controller-cert")
    agent.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                       help="serve Prometheus /metrics over HTTP here (default: off; e.g. 127.0.0.1:9451)")
    agent.add_argument("--csi-endpoint", default="", metavar="unix:///PATH",
                       help="serve CSI Identity and Node on this unix socket (default: no CSI)")
    agent.add_argument("--csi-driver-name", default="csi.shoal.io", metavar="NAME",
                       help="the CSI driver name GetPluginInfo reports (default %(default)s)")
    for key in ("header", "data"):
        agent.add_argument(f"--iscsi-{key}-digest", type=_typed(parse_digest_list), default=("None", "CRC32C"),
                           metavar="LIST", help=f"{key.capitalize()}Digest on this node's iSCSI: accepted by its "
                           "exports, offered by its attachments, in order of preference (default None,CRC32C: "
                           "digests only where the other side insists; CRC32C,None prefers them; CRC32C requires "
                           "them)")
    agent.add_argument("--iscsi-nop-interval", type=_typed(parse_seconds), default=ConnectionSettings.nop_interval,
                       metavar="SECONDS", help="ping an initiator of this node's exports silent this long with a "
                       "NOP-In (default %(default)g; 0: never ping)")
    agent.add_argument("--iscsi-nop-timeout", type=_typed(parse_seconds), default=ConnectionSettings.nop_timeout,
                       metavar="SECONDS", help="drop an export's connection whose initiator leaves a ping unanswered "
                       "this long (default %(default)g, more than 0)")
    agent.add_argument("--userspace-reconnect-timeout", type=_typed(parse_seconds), default=30.0, metavar="SECONDS",
                       help="retry a userspace attachment's lost session this long before its I/O fails with EIO "
                       "(default %(default)g, more than 0)")
    agent.add_argument("--ready-file", metavar="FILE",
                       help="write {\"agent\": HOST:PORT, \"portal\": HOST:PORT, \"metrics\": HOST:PORT} as JSON "
                            "here once serving")


def _agent_settings(args: argparse.Namespace):
    from node_agent.agent.settings import AgentSettings, TlsFiles

    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r}: expected KEY=VALUE")
        labels[key] = value
    names = CONTROLLER_NAMES if args.tls_controller_names is None else parse_names(args.tls_controller_names)
    if args.tls_controller_names is not None and not args.tls_client_ca:  # only client certificates carry names
        raise ValueError("--tls-controller-names needs --tls-client-ca")
    if args.tls_client_ca and not (args.tls_cert or args.tls_key):  # else AgentService would serve plaintext
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    server_tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert or args.tls_key else None
    controller_tls = None
    if args.controller_ca or args.controller_cert or args.controller_key:
        controller_tls = TlsFiles(args.controller_cert, args.controller_key, args.controller_ca)
        from node_agent.tls_reload import require_client_files  # (gRPC's: not for `shoal target`)

        require_client_files(controller_tls.cert, controller_tls.key, controller_tls.ca,
                             "--controller-ca/--controller-cert/--controller-key")
    extra = {"node_id": args.node_id} if args.node_id else {}
    return AgentSettings(data_dir=args.data_dir, disks=tuple(args.disk or ()), listen=args.listen,
                         advertise_address=args.advertise_address, portal_listen=args.portal,
                         advertise_portals=tuple(args.advertise_portal), controller=args.controller,
                         initiator_iqn=args.initiator_iqn, target_prefix=args.target_prefix, labels=labels,
                         server_tls=server_tls, controller_names=names,
                         controller_tls=controller_tls, metrics_listen=args.metrics_listen,
                         csi_endpoint=args.csi_endpoint, csi_driver_name=args.csi_driver_name,
                         iscsi_header_digest=args.iscsi_header_digest, iscsi_data_digest=args.iscsi_data_digest,
                         iscsi_nop_interval=args.iscsi_nop_interval, iscsi_nop_timeout=args.iscsi_nop_timeout,
                         userspace_reconnect_timeout=args.userspace_reconnect_timeout, **extra)


def _run_agent(args: argparse.Namespace, settings) -> int:
    import json
    import threading

    from node_agent.agent.daemon import Agent

    agent = Agent(settings)
    stop = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    remove_file(args.ready_file)  # a previous run's would name ports nobody serves
    agent.start()
    eventloop.freeze_startup_objects()
    try:
        if args.ready_file:
            write_file_atomically(args.ready_file, json.dumps({"agent": agent.agent_address,
                                                               "portal": agent.portal_address,
                                                               "metrics": agent.metrics_address}))
        while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        agent.stop()
    remove_file(args.ready_file)
    logging.getLogger("shoal.agent").info("stopped: exports closed, data synced")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _write_port_file(path: str, addresses: list[tuple[str, int]]) -> None:
    """``HOST:PORT`` of every portal, one a line, the first ``--listen`` first; an IPv6 host in brackets, so
    that each line is what ``--listen`` and ``shoal iscsi`` take."""
    write_file_atomically(path, "".join(f"{join_host_port(host, port)}\n" for host, port in addresses))


def target_config(args: argparse.Namespace) -> TargetConfig:
    """``shoal target``'s options as a validated ``TargetConfig`` (ValueError: what is wrong)."""
    host, port = args.listen
    first, *more = target_layout(args.layout)
    config = TargetConfig(iqn=first.iqn, luns=first.luns, host=host, port=port, more_portals=args.more_listen,
                          chap=args.chap, mutual_chap=args.mutual_chap, allowed_initiators=args.allow,
                          loops=args.loops, more_targets=more, workers=args.workers,
                          settings=TargetSettings(header_digest=args.header_digest, data_digest=args.data_digest),
                          connection=ConnectionSettings(nop_interval=args.nop_interval, nop_timeout=args.nop_timeout))
    config.validate()
    return config


async def _run_target(args: argparse.Namespace, config: TargetConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)

    def ready(addresses: list[tuple[str, int]]) -> None:
        names = ", ".join(f"{t.iqn} ({len(t.luns)} LUN(s))" for t in config.targets)
        logging.getLogger("shoal.target").info(
            "serving %s on %s%s%s", names, ", ".join(join_host_port(h, p) for h, p in addresses),
            f" with {config.workers} worker processes" if config.workers > 1 else "",
            " (CHAP required)" if args.chap else "")
        if args.port_file:
            _write_port_file(args.port_file, addresses)
        eventloop.freeze_startup_objects()

    # A port file left by an earlier run would name a port nobody serves (a script waiting for the file would
    # read it at once): removed before starting, and again once stopped.
    remove_file(args.port_file)
    try:
        await serve(config, ready=ready, stop=stop)
    finally:
        remove_file(args.port_file)
    logging.getLogger("shoal.target").info("stopped: sessions closed, data synced")
    return 0


def _run(coro) -> int:
    return eventloop.run(coro)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: its ``error`` prints that command's usage, not ``shoal``'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))  # -v is the only option before it
    # Logging is set up before the options are parsed: parsing them may warn already (a CHAP secret given on
    # the command line, or in a file others can read), and that warning should look like every other line.
    configured_here = not logging.getLogger().handlers  # (a caller's own logging set-up is left as it is)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    if args.verbose and configured_here:
        logging.getLogger().setLevel(logging.DEBUG)
    if args.command == "target":
        usage = _subparser(parser, "target")
        if args.mutual_chap and not args.chap:
            usage.error("--mutual-chap needs --chap")
        hosts = [args.listen[0]] + [h for h, _ in args.more_listen]
        host = next((h for h in hosts if not _is_loopback(h)), hosts[0])
        if not args.chap and not args.allow_anonymous and not _is_loopback(host):
            usage.error(f"refusing to serve without CHAP on {host} (not loopback): give --chap USER:SECRET, "
                        "or --allow-anonymous to accept that risk")
        try:
            config = target_config(args)
        except ValueError as exc:  # two targets of one name, a file served twice, --workers beyond the targets
            usage.error(str(exc))
        try:
            return _run(_run_target(args, config))
        except (OSError, ValueError, RuntimeError) as exc:  # a busy port, a bad LUN file, a worker's death
            print(f"shoal target: {exc}", file=sys.stderr)
            return 1
    if args.command == "iscsi":
        return iscsi_tools.run(args)
    # Bad settings are usage errors (exit 2, as argparse's own, which a supervisor need not retry: see
    # RestartPreventExitStatus in deploy/systemd); what fails while starting or serving exits 1.
    if args.command == "agent":
        try:
            settings = _agent_settings(args)
        except ValueError as exc:
            print(f"shoal agent: {exc}", file=sys.stderr)
            return 2
        try:
            return _run_agent(args, settings)
        except (OSError, ValueError) as exc:  # a busy port, a bad disk: say so, no traceback
            print(f"shoal agent: {exc}", file=sys.stderr)
            return 1
    if args.command in ("controller", "up"):
        from controller import daemon, up

        if args.command == "controller":
            try:
                daemon.settings_from_args(args)  # (run() takes them again: this only sorts out usage errors)
            except ValueError as exc:
                print(f"shoal controller: {exc}", file=sys.stderr)
                return 2
        try:
            return (daemon.run if args.command == "controller" else up.run)(args)
        except (OSError, ValueError) as exc:  # a busy port, an unreadable state file: say so, no traceback
            print(f"shoal {args.command}: {exc}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
