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
    if not os.path.isdir(os.path.dirname(secret_file)):
        raise CliError(f"--secret-file {args.secret_file}: its directory does not exist", EXIT_USAGE)
    request = admin_pb2.AttachVolumeRequest(name=args.name, node=args.node, publish_only=True, shared=args.shared)
    attachment = api.call("AttachVolume", request)
    if not attachment.export.target_iqn:
        raise CliError(f"the controller did not say how {args.node} reaches volume {args.name}; try again")
    secret = api.call("GetPublishSecret", admin_pb2.GetPublishSecretRequest(name=args.name, node=args.node))
    write_secret(secret_file, secret.chap_secret)
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


def disconnect_volume(api, args) -> None:
    api.call("DetachVolume", admin_pb2.DetachVolumeRequest(name=args.name, node=args.node))
    print(f"volume {args.name} disconnected from {args.node}")


def write_secret(path: str, secret: str) -> None:
    """``secret`` into ``path`` (mode 0600, no newline: QEMU's raw secret is the file's bytes), atomically."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".shoal-secret-", dir=directory)  # mkstemp: mode 0600, O_EXCL
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
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
