"""``shoalctl volume connect|disconnect``: what a hypervisor needs to use a volume from a node.

``connect NAME --node NODE --format qemu|libvirt`` publishes the volume to NODE without logging in
(AttachVolume with ``publish_only``: the owner exports it to NODE's initiator IQN with the volume's CHAP
credentials, NODE's agent records it), then writes the CHAP secret (GetPublishSecret) to ``--secret-file``,
mode 0600, by write-temp, fsync, rename, and prints how QEMU's iSCSI driver or libvirt reaches the LUN *as
NODE* (the target's ACL admits only NODE's initiator name).  The secret is in that file only: never on stdout,
in an argument list or a log; QEMU reads it through a ``secret`` object (``format=raw``: the file holds the
secret without a newline), libvirt through ``virsh secret-set-value --file``.

``--format device`` is a plain attach (NODE's agent logs in) and prints the device.
``--shared`` asks for a second writer on purpose (live migration); without it a volume another node has is
refused.  ``disconnect`` is ``detach``.

Nothing is published when the secret cannot be written: the directory is tried (a temporary file created and
removed) before AttachVolume, and when writing still fails after publishing, a publish this command made is
undone (DetachVolume) before the one-line error.

The renderers (``qemu_connection``, ``libvirt_connection``) are pure functions of the attachment, so the tests
check their output without a controller.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from controller.cli import output
from controller.cli.api import EXIT_USAGE, CliError
from controller.domain.model import MODES
from protos.shoal.v1 import admin_pb2

FORMATS = ("qemu", "libvirt", "device")


def register(noun) -> None:
    verb = noun.add_parser("connect", help="publish a volume to a node and print what a hypervisor needs",
                           description="qemu/libvirt: publish without login (QEMU logs in as the node) and write "
                                       "the CHAP secret to --secret-file only; device: attach and print the device.")
    verb.add_argument("name")
    verb.add_argument("--node", required=True, help="the node (hypervisor host) that uses it")
    verb.add_argument("--format", choices=FORMATS, required=True, dest="fmt", help="what to print")
    verb.add_argument("--shared", action="store_true",
                      help="allow a second node at the same time (live migration, multi-writer raw block)")
    verb.add_argument("--secret-file", default="", metavar="PATH",
                      help="where to write the CHAP secret (mode 0600; required for qemu and libvirt)")
    verb.add_argument("--mode", choices=MODES, default="userspace",
                      help="--format device: the node's connector (default %(default)s)")
    output.add_output_flag(verb)
    verb.set_defaults(func=connect_volume)
    verb = noun.add_parser("disconnect", help="unpublish a volume from a node (= detach; repeat: OK)")
    verb.add_argument("name")
    verb.add_argument("--node", required=True)
    output.add_output_flag(verb)
    verb.set_defaults(func=disconnect_volume)


def connect_volume(api, args) -> None:
    if args.fmt == "device":
        if args.secret_file:
            raise CliError("--secret-file is for --format qemu or libvirt (a device needs no secret)", EXIT_USAGE)
        request = admin_pb2.AttachVolumeRequest(name=args.name, node=args.node, mode=args.mode, shared=args.shared)
        attachment = api.call("AttachVolume", request)
        data = {"volume": attachment.volume, "node": attachment.node, "format": "device", "shared": attachment.shared,
                "device": attachment.device_path}
        output.emit_message(attachment.device_path, data, args.output)
        return
    if not args.secret_file:
        raise CliError(f"--format {args.fmt} needs --secret-file PATH: the CHAP secret is written there (mode "
                       "0600), never printed", EXIT_USAGE)
    secret_file = os.path.abspath(args.secret_file)
    check_secret_file(secret_file, args.secret_file)
    # whether NODE had it already (a repeated connect): only a publish made here is undone on failure
    volume = api.call("GetVolume", admin_pb2.GetVolumeRequest(name=args.name))
    published_before = args.node in volume.attached_nodes
    request = admin_pb2.AttachVolumeRequest(name=args.name, node=args.node, publish_only=True, shared=args.shared)
    attachment = api.call("AttachVolume", request)
    try:
        if not attachment.export.target_iqn:
            raise CliError(f"the controller did not say how {args.node} reaches volume {args.name}; try again")
        secret = api.call("GetPublishSecret", admin_pb2.GetPublishSecretRequest(name=args.name, node=args.node))
        write_secret(secret_file, secret.chap_secret)
    except CliError as exc:
        raise _after_publishing(api, args, exc, undo=not published_before) from None
    data = connection(attachment, args.fmt, secret_file)
    if args.output != "table":
        output.emit_message("", data, args.output)
    elif args.fmt == "qemu":
        print(" ".join(shlex.quote(arg) for arg in data["qemu_args"]))
    else:
        print(data["disk_xml"])
        print()
        print(data["secret_xml"])
        print()
        print(f"# virsh secret-define the <secret> above, then: virsh secret-set-value --secret UUID "
              f"--file {shlex.quote(secret_file)} (the CHAP secret is in that file only)")


def _after_publishing(api, args, exc: CliError, *, undo: bool) -> CliError:
    """``exc`` (a failure once AttachVolume published the volume), saying what became of the publish."""
    if not undo:
        return CliError(f"{exc}; volume {args.name} stays published to {args.node} as it was before", exc.code)
    try:
        api.call("DetachVolume", admin_pb2.DetachVolumeRequest(name=args.name, node=args.node))
    except CliError as undo_error:
        return CliError(f"{exc}; volume {args.name} is still published to {args.node} (undoing it failed: "
                        f"{undo_error}): run shoalctl volume disconnect {args.name} --node {args.node}", exc.code)
    return CliError(f"{exc}; the publish to {args.node} was undone", exc.code)


def disconnect_volume(api, args) -> None:
    detach(api, args, "disconnect")


def detach(api, args, verb: str) -> None:
    """``volume detach`` / ``volume disconnect``: DetachVolume succeeds whatever it finds (idempotent, as CSI
    needs), so whether NODE had the volume is asked first; a volume that does not exist is NOT_FOUND, as for
    ``volume show``."""
    volume = api.call("GetVolume", admin_pb2.GetVolumeRequest(name=args.name))
    api.call("DetachVolume", admin_pb2.DetachVolumeRequest(name=args.name, node=args.node))
    # "NODE (attaching)": an attach that failed for a while left its row, which the detach removed
    had = any(shown.partition(" (")[0] == args.node for shown in volume.attached_nodes)
    output.emit_detached(args.name, args.node, had, args.output, verb=verb)


def check_secret_file(path: str, given: str) -> None:
    """A usage error, before anything is published, when no secret can be written at ``path``."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise CliError(f"--secret-file {given}: its directory does not exist", EXIT_USAGE)
    if os.path.isdir(path):
        raise CliError(f"--secret-file {given}: is a directory", EXIT_USAGE)
    try:  # os.access says yes to root on a read-only or pseudo file system (/proc): try for real
        fd, tmp = tempfile.mkstemp(prefix=".shoal-secret-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CliError(f"--secret-file {given}: cannot create a file in {directory}: {exc.strerror}",
                       EXIT_USAGE) from None


def write_secret(path: str, secret: str) -> None:
    """``secret`` into ``path`` (mode 0600, no newline: QEMU's raw secret is the file's bytes), atomically."""
    directory = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".shoal-secret-", dir=directory)  # mkstemp: mode 0600, O_EXCL
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise CliError(f"cannot write --secret-file {path}: {exc.strerror}") from None


def connection(attachment: admin_pb2.Attachment, fmt: str, secret_file: str) -> dict[str, Any]:
    if fmt == "qemu":
        return qemu_connection(attachment, secret_file)
    return libvirt_connection(attachment, secret_file)


def _base(attachment: admin_pb2.Attachment, fmt: str) -> dict[str, Any]:
    export = attachment.export
    portals = list(export.portals)
    return {"volume": attachment.volume, "node": attachment.node, "format": fmt, "shared": attachment.shared,
            "portal": portals[0] if portals else "", "portals": portals, "target_iqn": export.target_iqn,
            "lun": export.lun, "initiator_iqn": attachment.initiator_iqn, "chap_user": export.chap_user}


def qemu_connection(attachment: admin_pb2.Attachment, secret_file: str) -> dict[str, Any]:
    """The JSON object of ``--format qemu``: QEMU 7.2's ``iscsi`` blockdev (BlockdevOptionsIscsi) logging in as
    the node, its password in a ``secret`` object read from ``secret_file``."""
    data = _base(attachment, "qemu")
    secret_id, node_name = f"shoal-secret-{attachment.volume}", f"shoal-{attachment.volume}"
    blockdev = ",".join([
        "driver=iscsi", f"node-name={node_name}", "transport=tcp", f"portal={data['portal']}",
        f"target={data['target_iqn']}", f"lun={data['lun']}", f"user={data['chap_user']}",
        f"password-secret={secret_id}", f"initiator-name={data['initiator_iqn']}", "cache.direct=on"])
    data.update(secret_file=secret_file, secret_id=secret_id, node_name=node_name,
                url=f"iscsi://{data['chap_user']}@{data['portal']}/{data['target_iqn']}/{data['lun']}",
                qemu_args=["-object", f"secret,id={secret_id},format=raw,file={_qemu_option(secret_file)}",
                           "-blockdev", blockdev])
    return data


def _qemu_option(value: str) -> str:
    """A value in a QEMU option string: a comma is written twice."""
    return value.replace(",", ",,")


def libvirt_connection(attachment: admin_pb2.Attachment, secret_file: str) -> dict[str, Any]:
    """The ``<disk>`` (network, iSCSI, logging in as the node) and the ``<secret>`` (no value) for libvirt."""
    data = _base(attachment, "libvirt")
    usage = f"shoal-{attachment.volume}"
    hosts = []
    for portal in data["portals"]:
        host, _, port = portal.rpartition(":")
        hosts.append(f"    <host name={quoteattr(host.strip('[]'))} port={quoteattr(port)}/>")
    disk = "\n".join([
        "<disk type='network' device='disk'>",
        "  <driver name='qemu' type='raw' cache='none' io='native'/>",
        f"  <source protocol='iscsi' name={quoteattr(data['target_iqn'] + '/' + str(data['lun']))}>",
        *hosts,
        f"    <initiator><iqn name={quoteattr(data['initiator_iqn'])}/></initiator>",
        f"    <auth username={quoteattr(data['chap_user'])}>",
        f"      <secret type='iscsi' usage={quoteattr(usage)}/>",
        "    </auth>",
        "  </source>",
        "  <target dev='vdb' bus='virtio'/>",
        f"  <serial>{escape(attachment.export.serial or attachment.volume)}</serial>",
        "</disk>"])
    secret = "\n".join([
        "<secret ephemeral='no' private='yes'>",
        f"  <description>CHAP secret of Shoal volume {escape(attachment.volume)}</description>",
        "  <usage type='iscsi'>",
        f"    <target>{escape(usage)}</target>",
        "  </usage>",
        "</secret>"])
    data.update(secret_file=secret_file, secret_usage=usage, disk_xml=disk, secret_xml=secret)
    return data
