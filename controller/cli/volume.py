"""``shoalctl volume create|list|show|expand|delete|attach|detach|connect|disconnect|snapshot|clone``."""

from __future__ import annotations

import argparse

from controller.cli import connect, output, snapshot
from controller.domain.model import MODES  # the attach modes the controller accepts
from controller.cli.output import Column
from controller.cli.sizes import parse_size
from protos.shoal.v1 import admin_pb2

LIST = (Column("NAME", "name"), Column("SIZE", "size_bytes", output.size), Column("POOL", "pool"),
        Column("STATE", "state"), Column("NODE", "owner_node"),
        Column("ATTACHED TO", "attached_nodes", output.joined),
        Column("PROVISIONING", "thin", lambda thin: "thin" if thin else "thick"))
SHOW = (Column("Name", "name"), Column("ID", "id"), Column("Size", "size_bytes", output.size),
        Column("Bytes", "size_bytes"), Column("Pool", "pool"), Column("State", "state"),
        Column("Node", "owner_node"), Column("Disk", "disk"),
        Column("Provisioning", "thin", lambda thin: "thin" if thin else "thick"),
        Column("Attached to", "attached_nodes", output.joined), Column("Source", "source", lambda s: s or "-"),
        Column("Copied", "progress", lambda p: f"{p * 100:.0f}%" if p else "-"))


def to_dict(volume: admin_pb2.Volume) -> dict:
    return {"name": volume.name, "id": volume.id, "size_bytes": volume.size_bytes, "pool": volume.pool,
            "owner_node": volume.owner_node, "disk": volume.disk, "state": volume.state, "thin": volume.thin,
            "attached_nodes": list(volume.attached_nodes), "source": volume.source, "progress": volume.progress}


def attachment_dict(attachment: admin_pb2.Attachment) -> dict:
    return {"volume": attachment.volume, "node": attachment.node, "device_path": attachment.device_path,
            "state": attachment.state, "shared": attachment.shared}


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. zone=a")
    return key, value


def register(sub) -> None:
    noun = sub.add_parser("volume", help="block volumes").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("create", help="create a volume (idempotent by name)")
    verb.add_argument("name")
    verb.add_argument("--size", type=size, required=True, help="e.g. 64MiB, 1GiB, 1G or bytes")
    verb.add_argument("--pool", default="",
                      help="pool to place it in (default: the controller's default pool, usually \"default\")")
    verb.add_argument("--thick", action="store_true", help="allocate it fully now (default: thin)")
    verb.add_argument("--constraint", type=label, action="append", default=[], metavar="KEY=VALUE",
                      help="a label its node must have (repeatable)")
    output.add_output_flag(verb)
    verb.set_defaults(func=create_volume)
    verb = noun.add_parser("list", help="list the volumes")
    verb.add_argument("--pool", default="", help="only this pool's")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_volumes)
    verb = noun.add_parser("show", help="one volume in detail")
    verb.add_argument("name")
    output.add_output_flag(verb)
    verb.set_defaults(func=show_volume)
    verb = noun.add_parser("expand", help="grow a volume (never shrinks)")
    verb.add_argument("name")
    verb.add_argument("--size", type=size, required=True, help="the new size, e.g. 2GiB")
    output.add_output_flag(verb)
    verb.set_defaults(func=expand_volume)
    verb = noun.add_parser("delete", help="delete a detached volume (deleting what is gone succeeds)")
    verb.add_argument("name")
    output.add_output_flag(verb)
    verb.set_defaults(func=delete_volume)
    verb = noun.add_parser("attach", help="attach a volume to a node; prints its device there")
    verb.add_argument("name")
    verb.add_argument("--node", required=True, help="the node that uses it")
    verb.add_argument("--mode", choices=MODES, default="userspace",
                      help="userspace: Shoal's initiator + a loop device; kernel: open-iscsi (default %(default)s)")
    verb.add_argument("--shared", action="store_true",
                      help="allow a second node at the same time (live migration, multi-writer raw block)")
    output.add_output_flag(verb)
    verb.set_defaults(func=attach_volume)
    verb = noun.add_parser("detach", help="detach a volume from a node (repeat: OK)")
    verb.add_argument("name")
    verb.add_argument("--node", required=True)
    output.add_output_flag(verb)
    verb.set_defaults(func=detach_volume)
    connect.register(noun)
    snapshot.register_volume_verbs(noun)


def create_volume(api, args) -> None:
    request = admin_pb2.CreateVolumeRequest(name=args.name, size_bytes=args.size, pool=args.pool, thick=args.thick,
                                            constraints=dict(args.constraint))
    volume = to_dict(api.call("CreateVolume", request))
    output.emit_message(f"volume {volume['name']} ready: {output.size(volume['size_bytes'])} "
                        f"{'thin' if volume['thin'] else 'thick'} in pool {volume['pool']}, on "
                        f"{volume['owner_node']}/{volume['disk']}", volume, args.output)


def list_volumes(api, args) -> None:
    volumes = api.call("ListVolumes", admin_pb2.ListVolumesRequest(pool=args.pool)).volumes
    output.emit_list([to_dict(v) for v in volumes], LIST, args.output, key="volumes")


def show_volume(api, args) -> None:
    volume = api.call("GetVolume", admin_pb2.GetVolumeRequest(name=args.name))
    output.emit_object(to_dict(volume), SHOW, args.output)


def expand_volume(api, args) -> None:
    volume = to_dict(api.call("ExpandVolume", admin_pb2.ExpandVolumeRequest(name=args.name, size_bytes=args.size)))
    output.emit_message(f"volume {volume['name']} is {output.size(volume['size_bytes'])}", volume, args.output)


def delete_volume(api, args) -> None:
    # the call is idempotent (deleting what is gone succeeds, as CSI needs); the message tells a typo apart
    existed = api.exists("GetVolume", admin_pb2.GetVolumeRequest(name=args.name))
    api.call("DeleteVolume", admin_pb2.DeleteVolumeRequest(name=args.name))
    output.emit_deleted("volume", args.name, existed, args.output)


def attach_volume(api, args) -> None:
    request = admin_pb2.AttachVolumeRequest(name=args.name, node=args.node, mode=args.mode, shared=args.shared)
    attachment = attachment_dict(api.call("AttachVolume", request))
    output.emit_message(f"volume {attachment['volume']} attached to {attachment['node']} at "
                        f"{attachment['device_path']}", attachment, args.output)


def detach_volume(api, args) -> None:
    connect.detach(api, args, "detach")
