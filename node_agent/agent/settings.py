"""What an operator configures on a node agent (``shoal agent`` flags map onto these fields)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from node_agent.iscsi.keys import parse_digest_list
from node_agent.iscsi.names import check_iqn
from node_agent.peer_names import CONTROLLER_NAMES

IQN_PREFIX = "iqn.2026-11.io.shoal"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def default_node_id() -> str:
    """The host name, lowercased and cut to what an IQN and a disk name accept."""
    name = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip(".-")
    return name[:63] or "node"


def check_name(what: str, value: str) -> str:
    """Ids that end up in IQNs and file names: lowercase letters, digits, ``.``, ``_``, ``-``; up to 63."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


@dataclass(frozen=True)
class DiskSpec:
    """A disk offered to pools: a directory that holds the volumes' backing files."""

    name: str
    """Unique on this node (``data0``); the controller's pools name it."""
    path: str
    """The directory; created when missing the first time the agent sets the disk up.  Later a directory
    without the disk's marker (its disk not mounted yet, say) is left alone (volumes.py, "Disk identity")."""
    capacity: int | None = None
    """Bytes this disk offers; None takes the filesystem's size (statvfs).  Set it when several
    disks share a filesystem, or to give Shoal only part of one."""

    def __post_init__(self):
        check_name("disk name", self.name)
        if not self.path:
            raise ValueError(f"disk {self.name}: a path is required")
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError(f"disk {self.name}: capacity must be positive")

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        """``NAME=PATH[:CAPACITY]`` (capacity with units, e.g. ``data0=/srv/shoal:100G``)."""
        from node_agent.target_service import _SIZE_LIKE, parse_size

        name, sep, rest = text.partition("=")
        if not sep:
            raise ValueError(f"disk {text!r}: expected NAME=PATH[:CAPACITY]")
        path, colon, size = rest.rpartition(":")
        # As LunSpec.parse: a suffix that looks like a size is one, and a mistyped one (100GG, 10 G) is refused
        # rather than taken into the path; a path's own colons are followed by other text.
        if colon and _SIZE_LIKE.match(size):
            try:
                return cls(name, path, parse_size(size))
            except ValueError as exc:
                raise ValueError(f"disk {text!r}: {exc}") from None
        return cls(name, rest)


def check_disk_paths(disks: "tuple[DiskSpec, ...] | list[DiskSpec]") -> None:
    """``ValueError`` when two disks are one directory (after symlinks, ``..`` and a trailing ``/``) or one
    lies inside the other: a volume would then show up on both, the first one listed claiming it (so the
    repeat of its create on the other is refused), and the same space would be offered twice."""
    import os

    real = [(spec, os.path.realpath(spec.path)) for spec in disks]
    for i, (a, path_a) in enumerate(real):
        for b, path_b in real[i + 1:]:
            if path_a == path_b:
                raise ValueError(f"disks {a.name} ({a.path}) and {b.name} ({b.path}) are the same directory "
                                 f"{path_a}: give each disk its own directory")
            common = os.path.commonpath([path_a, path_b])  # whole components: /srv/d1 is not inside /srv/d
            if common in (path_a, path_b):
                inner, outer = (b, a) if common == path_a else (a, b)
                raise ValueError(f"disk {inner.name} ({inner.path}) lies inside disk {outer.name} ({outer.path}): "
                                 "give each disk its own directory, neither inside the other")


def check_address(text: str, what: str, *, bind: bool = False, ip: bool = False,
                  empty_host: str = "") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or ``ValueError`` naming ``what``; checked before anything is written, so a
    mistyped address is a usage error rather than a daemon that set up its state and then failed.

    An IPv6 host goes in brackets (``[fd00::1]:7451``).  An IPv4 address may be bracketed too (``[10.0.0.1]:7451``,
    as Go's ``net.SplitHostPort`` takes it): that lets one template, the chart's ``[$(NODE_IP)]:PORT``, give a
    correct address whichever family the node's IP is.  Unbracketed, the port is whatever follows the last ``:``
    and the host before it must itself be an IPv6 address (``fd00::1:7451`` is host ``fd00::1``, port 7451; kept
    for addresses written that way before), so ``::1`` alone (host ``:``, port 1) is refused.  A port is always
    required, so that rule is the only reading; write ``[ADDR]:PORT`` to leave no doubt.  ``bind``: an address to
    listen on: port 0 picks a free one, and a host that is
    not an IP address must resolve now (the bind would fail on it later).  Otherwise an address to dial, its
    port 1-65535 (without a port, gRPC would dial 443).  ``ip``: the host must be an IP address, not a
    wildcard (a portal written into exports, which initiators connect to).  ``empty_host``: what an empty
    host means (``:7451``); "" refuses it."""
    expected = f"{what} {text!r}: expected HOST:PORT (an IPv6 address as [ADDR]:PORT)"
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(expected)
    least = 0 if bind else 1
    if not least <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: the port must be {least} to 65535")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(expected)
        host = host[1:-1]
        if _ip(host) is None:
            raise ValueError(f"{what} {text!r}: {host!r} in brackets is not an IP address")
    elif ":" in host and _ip(host) is None:
        raise ValueError(expected)
    host = host or empty_host
    if not host:
        raise ValueError(expected)
    if ip:
        address = _ip(host)
        if address is None or address.is_unspecified:
            raise ValueError(f"{what} {text!r}: {host!r} is not an IP address initiators can connect to")
    elif bind and _ip(host) is None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            raise ValueError(f"{what} {text!r}: cannot resolve {host!r} ({exc})") from None
    return host, int(port)


#: gRPC target URIs (``dns:///controller:7450``, ``unix:/run/shoal.sock``): the controller address may be one.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _ip(text: str):
    import ipaddress

    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for gRPC TLS."""

    cert: str = ""
    """This side's certificate chain (a server needs it; a client gives it for mutual TLS)."""
    key: str = ""
    """Its private key (kept 0600 by whoever deploys it)."""
    ca: str = ""
    """CA bundle: a server then requires client certificates signed by it (mutual TLS); a client
    checks the server with it (empty: the system's roots)."""

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS needs both a certificate and its key")


DAY = 86400.0


def parse_seconds(text: str, least: float = 0.0, most: float = DAY) -> float:
    """A command line's seconds, from ``least`` to ``most``; ``ValueError`` otherwise.  nan and inf are refused
    too (a plain "<= 0" check lets both through: a nan interval spins a loop, an infinite one ends it)."""
    expected = f"{text!r}: expected seconds from {least:g} to {most:g}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{expected} (could not convert it to a number)") from None
    if not least <= value <= most:
        raise ValueError(expected)
    return value


def check_pems(cert: str, key: str, ca: str = "") -> None:
    """Raise ``ValueError`` naming the file unless ``cert`` and ``key`` are a PEM certificate chain and its
    unencrypted private key, and ``ca`` (when given) holds PEM certificates.

    gRPC reads them only when it binds the port, and then says no more than that it could not bind.
    """
    import ssl

    for path in (cert, key, ca):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"cannot read the TLS file {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key fails here instead of prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        why = f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""
        raise ValueError(f"TLS certificate {cert} and key {key}: not a PEM certificate chain and its "
                         f"unencrypted private key{why}") from None
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError:
            raise ValueError(f"TLS CA {ca}: no PEM certificate in it") from None
    refused = _key_grpc_refuses(key)
    if refused:
        raise ValueError(f"TLS key {key}: {refused}, which gRPC cannot use (it takes RSA, ECDSA on P-256, "
                         "P-384 or P-521, and Ed25519 keys)")


# DER of the object identifiers that tell a private key's type (RFC 8017, 5480, 8410).
_OID_RSA_PSS = bytes.fromhex("06092a864886f70d01010a")
_OID_EC = bytes.fromhex("06072a8648ce3d0201")
_OID_ED448 = bytes.fromhex("06032b6571")
_OID_X_KEYS = (bytes.fromhex("06032b656e"), bytes.fromhex("06032b656f"))  # X25519, X448: no signing keys
_EC_CURVES_GRPC_TAKES = (bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06052b81040022"),
                         bytes.fromhex("06052b81040023"))  # P-256, P-384, P-521


def _key_grpc_refuses(path: str) -> str:
    """What kind of key in ``path`` gRPC (BoringSSL) would refuse though Python's OpenSSL loads it ("" for one
    it takes, or one this cannot tell).  gRPC then only fails to bind, or, at a renewal, keeps serving the
    old certificate while the new one looked loaded."""
    import base64
    import re

    with open(path, "rb") as handle:
        text = handle.read()
    found = re.search(rb"-----BEGIN (RSA |EC |)PRIVATE KEY-----(.*?)-----END", text, re.S)
    if found is None or found.group(1) == b"RSA ":
        return ""
    try:
        der = base64.b64decode(b"".join(found.group(2).split()), validate=True)
    except ValueError:
        return ""
    if found.group(1) == b"EC " or _OID_EC in der[:32]:  # SEC1, or PKCS#8 with an EC algorithm
        return "" if any(curve in der for curve in _EC_CURVES_GRPC_TAKES) else "an ECDSA key on another curve"
    head = der[:32]  # PKCS#8: the algorithm identifier comes right after the version
    if _OID_RSA_PSS in head:
        return "an RSA-PSS key"
    if _OID_ED448 in head:
        return "an Ed448 key"
    if any(oid in head for oid in _OID_X_KEYS):
        return "a key-agreement (X25519/X448) key"
    return ""


@dataclass
class AgentSettings:
    """Everything a node agent needs; the defaults run a single node on loopback."""

    node_id: str = field(default_factory=default_node_id)
    """This node's id at the controller; defaults to the host name."""
    data_dir: str = "/var/lib/shoal/agent"
    """The agent's own records (exports, attachments, secrets 0600) and the userspace connector's state."""
    disks: tuple[DiskSpec, ...] = ()
    """Disks offered to pools; none given means one disk ``data0`` under ``<data_dir>/disks/data0``."""
    listen: str = "127.0.0.1:7451"
    """Where AgentService listens (``HOST:PORT``; port 0 picks a free one)."""
    advertise_address: str = ""
    """The AgentService address the controller dials; empty: ``listen`` (with the bound port)."""
    portal_listen: str = "127.0.0.1:3260"
    """The iSCSI portal (``HOST:PORT``).  Keep the port fixed: exports name it, consumers reconnect to it."""
    advertise_portals: tuple[str, ...] = ()
    """Portals written into ExportInfo (``IP:PORT``); empty: ``portal_listen`` (needs a specific IP)."""
    controller: str = "127.0.0.1:7450"
    """The controller's RegistrationService (``HOST:PORT``); empty: do not register (tests, standalone)."""
    initiator_iqn: str = ""
    """The name this node's initiators log in with; empty: ``iqn.2026-11.io.shoal:node:<node_id>`` (the kernel
    connector through its own open-iscsi iface ``shoal``, never the host's /etc/iscsi/initiatorname.iscsi)."""
    target_prefix: str = ""
    """Exports are targets ``<prefix>:<volume_id>``; empty: ``iqn.2026-11.io.shoal:target:<node_id>``."""
    labels: dict[str, str] = field(default_factory=dict)
    """Topology labels sent at registration (``zone=a``)."""
    server_tls: TlsFiles | None = None
    """TLS for AgentService; None serves plaintext (loopback / ``shoal up`` only)."""
    controller_names: tuple[str, ...] = CONTROLLER_NAMES
    """With ``server_tls.ca`` (mutual TLS): the client certificate names AgentService admits, the controller's
    (``node_agent.peer_names``): a node's certificate signed by the same CA is refused."""
    controller_tls: TlsFiles | None = None
    """TLS towards the controller (``ca`` checks it; ``cert``/``key`` for mutual TLS); None: plaintext."""
    register_timeout: float = 10.0
    """Deadline of one Register/Heartbeat call, seconds."""
    max_register_backoff: float = 30.0
    """Longest wait between registration attempts while the controller is unreachable."""
    default_heartbeat_interval: float = 10.0
    """Heartbeat interval when the controller's answer gives none."""
    grpc_workers: int = 16
    """Threads serving AgentService calls (attach/detach block on logins)."""
    metrics_listen: str = ""
    """Where ``/metrics`` is served over plain HTTP for Prometheus (``HOST:PORT``); empty: not served.
    Off by default, like the controller's: the page names volumes (``shoal up`` serves it on loopback)."""
    csi_endpoint: str = ""
    """``unix:///path/node.sock``: serve CSI Identity and Node there (kubelet's and node-driver-registrar's
    socket); empty: no CSI."""
    csi_driver_name: str = "csi.shoal.io"
    """The CSI driver name GetPluginInfo reports; the same as the controller's (``--csi-driver-name``)."""
    iscsi_header_digest: tuple[str, ...] = ("None", "CRC32C")
    iscsi_data_digest: tuple[str, ...] = ("None", "CRC32C")
    """CRC32C digests on this node's iSCSI connections (RFC 7143 §13.1), as a preference list: its exports
    accept these values and its attachments offer them.  The default goes without digests unless the
    other side insists; ``("CRC32C", "None")`` prefers them; ``("CRC32C",)`` requires them (a login
    without them fails, both ways)."""
    iscsi_nop_interval: float = 10.0
    """Seconds an initiator of this node's exports may be silent before the portal pings it (NOP-In,
    RFC 7143 §11.19); 0: never ping (a dead initiator's session lasts until TCP notices)."""
    iscsi_nop_timeout: float = 30.0
    """Seconds a ping may go unanswered before the portal drops the connection (more than 0).  Raise both for
    initiators that stop reading while idle."""
    userspace_reconnect_timeout: float = 30.0
    """Seconds a userspace attachment's lost session is retried before its I/O fails with EIO (more than 0;
    ``UserspaceSettings.reconnect_timeout``): what ``replacement_timeout`` is to the kernel's initiator.
    Longer rides out a longer outage of the owner; shorter fails I/O sooner (a multipath layer above, or a
    database that must not wait)."""

    def __post_init__(self):
        check_name("node id", self.node_id)
        # Every address now, before the agent writes its data directory and disk markers (Agent.start).
        check_address(self.listen, "--listen", bind=True, empty_host="0.0.0.0")
        check_address(self.portal_listen, "--portal", bind=True, empty_host="0.0.0.0")
        if self.metrics_listen:
            check_address(self.metrics_listen, "--metrics-listen", bind=True)
        if self.advertise_address:
            check_address(self.advertise_address, "--advertise-address")
        for portal in self.advertise_portals:
            check_address(portal, "--advertise-portal", ip=True)
        if self.controller and not self.controller.startswith(_GRPC_SCHEMES):  # a gRPC target URI: gRPC's to read
            check_address(self.controller, "--controller")
        if not self.initiator_iqn:
            self.initiator_iqn = f"{IQN_PREFIX}:node:{self.node_id}"
        if not self.target_prefix:
            self.target_prefix = f"{IQN_PREFIX}:target:{self.node_id}"
        check_iqn(self.initiator_iqn)
        # As negotiation spells them (None, CRC32C); ValueError for anything else or a value twice.
        self.iscsi_header_digest = parse_digest_list(",".join(self.iscsi_header_digest))
        self.iscsi_data_digest = parse_digest_list(",".join(self.iscsi_data_digest))
        check_iqn(f"{self.target_prefix}:volume")
        for name, value, least in (("iscsi nop interval", self.iscsi_nop_interval, 0),
                                   ("iscsi nop timeout", self.iscsi_nop_timeout, 1e-9),
                                   ("userspace reconnect timeout", self.userspace_reconnect_timeout, 1e-9)):
            if not least <= value <= 86400:  # also refuses nan and inf
                raise ValueError(f"{name} {value!r}: expected seconds from {'0' if least == 0 else 'more than 0'} "
                                 f"to 86400")
        if self.server_tls is not None and not self.server_tls.cert:
            raise ValueError("server TLS needs a certificate and key")
        if self.csi_endpoint:
            from controller.csi.server import socket_path

            socket_path(self.csi_endpoint)  # ValueError now for a relative path, not at start()
        from controller.csi.identity import check_driver_name

        check_driver_name(self.csi_driver_name)
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            raise ValueError(f"disk names must be unique: {names}")
        check_disk_paths(self.disks)

    def effective_disks(self) -> tuple[DiskSpec, ...]:
        import os

        return self.disks or (DiskSpec("data0", os.path.join(self.data_dir, "disks", "data0")),)
