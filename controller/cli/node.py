"""``shoalctl node list|show``."""

from __future__ import annotations

from controller.cli import output
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2

LIST = (Column("ID", "id"), Column("HEALTH", "health"), Column("AGENT", "agent_address"),
        Column("DISKS", "disks", lambda d: str(len(d or ()))), Column("CAPACITY", "capacity_bytes", output.size),
        Column("FREE", "free_bytes", output.size), Column("HEARTBEAT", "last_heartbeat_unix", output.age))
SHOW = (Column("ID", "id"), Column("Health", "health"), Column("Last heartbeat", "last_heartbeat_unix", output.age),
        Column("Agent", "agent_address"), Column("Initiator", "initiator_iqn"),
        Column("Portals", "portals", output.joined),
        Column("Labels", "labels", lambda d: ",".join(f"{k}={v}" for k, v in (d or {}).items()) or "-"),
        Column("Disks", "disks", lambda disks: "; ".join(
            f"{d['name']} {d['path']} {output.size(d['free_bytes'])} free of {output.size(d['capacity_bytes'])}"
            for d in disks) or "-"))


def to_dict(node: admin_pb2.Node) -> dict:
    disks = [{"name": d.name, "path": d.path, "capacity_bytes": d.capacity_bytes, "free_bytes": d.free_bytes}
             for d in node.disks]
    return {"id": node.id, "health": node.health, "agent_address": node.agent_address,
            "initiator_iqn": node.initiator_iqn, "portals": list(node.portals), "labels": dict(node.labels),
            "disks": disks, "capacity_bytes": sum(d["capacity_bytes"] for d in disks),
            "free_bytes": sum(d["free_bytes"] for d in disks), "last_heartbeat_unix": node.last_heartbeat_unix}


def register(sub) -> None:
    noun = sub.add_parser("node", help="nodes and their disks").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("list", help="list the nodes")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_nodes)
    verb = noun.add_parser("show", help="one node in detail")
    verb.add_argument("id", help="node id")
    output.add_output_flag(verb)
    verb.set_defaults(func=show_node)


def list_nodes(api, args) -> None:
    nodes = api.call("ListNodes", admin_pb2.ListNodesRequest()).nodes
    output.emit_list([to_dict(n) for n in nodes], LIST, args.output, key="nodes")


def show_node(api, args) -> None:
    output.emit_object(to_dict(api.call("GetNode", admin_pb2.GetNodeRequest(id=args.id))), SHOW, args.output)
