"""``shoalctl node list|show|fence|unfence``.

``fence`` waits for the controller's answer (every owner cut the node off, or why not yet) and exits 0 only when
the node is fenced (1 while it is still "fencing": the controller's loop keeps trying; a repeat waits again).
"""

from __future__ import annotations

from controller.cli import output
from controller.cli.api import CliError
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2

LIST = (Column("ID", "id"), Column("HEALTH", "health"), Column("FENCE", "fence", lambda f: f or "-"),
        Column("AGENT", "agent_address"),
        Column("DISKS", "disks", lambda d: str(len(d or ()))), Column("CAPACITY", "capacity_bytes", output.size),
        Column("FREE", "free_bytes", output.size), Column("HEARTBEAT", "last_heartbeat_unix", output.age))
SHOW = (Column("ID", "id"), Column("Health", "health"), Column("Last heartbeat", "last_heartbeat_unix", output.age),
        Column("Fence", "fence", lambda f: f or "-"), Column("Fenced since", "fence_since_unix",
                                                            lambda t: output.age(t) if t else "-"),
        Column("Fence reason", "fence_reason", lambda r: r or "-"),
        Column("Fence steps", "fence_steps", lambda steps: "".join(f"\n  {s}" for s in steps) or "-"),
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
            "free_bytes": sum(d["free_bytes"] for d in disks), "last_heartbeat_unix": node.last_heartbeat_unix,
            "fence": node.fence, "fence_since_unix": node.fence_since_unix, "fence_reason": node.fence_reason,
            "fence_steps": list(node.fence_steps)}


def register(sub) -> None:
    noun = sub.add_parser("node", help="nodes and their disks").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("list", help="list the nodes")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_nodes)
    verb = noun.add_parser("show", help="one node in detail")
    verb.add_argument("id", help="node id")
    output.add_output_flag(verb)
    verb.set_defaults(func=show_node)
    verb = noun.add_parser("fence", help="cut a node off every target that exports to it (waits; exit 0 when fenced)")
    verb.add_argument("id", help="node id")
    verb.add_argument("--reason", default="", help="recorded with the fence (default: shoalctl node fence)")
    output.add_output_flag(verb)
    verb.set_defaults(func=fence_node)
    verb = noun.add_parser("unfence", help="let a fenced node back in (once the host is known clean)")
    verb.add_argument("id", help="node id")
    output.add_output_flag(verb)
    verb.set_defaults(func=unfence_node)


def list_nodes(api, args) -> None:
    nodes = api.call("ListNodes", admin_pb2.ListNodesRequest()).nodes
    output.emit_list([to_dict(n) for n in nodes], LIST, args.output, key="nodes")


def show_node(api, args) -> None:
    output.emit_object(to_dict(api.call("GetNode", admin_pb2.GetNodeRequest(id=args.id))), SHOW, args.output)


def fence_node(api, args) -> None:
    node = to_dict(api.call("FenceNode", admin_pb2.FenceNodeRequest(id=args.id, reason=args.reason)))
    if args.output != "table":
        output.emit_message("", node, args.output)
    else:
        print(f"node {node['id']} is {node['fence']} ({node['fence_reason']})")
        for step in node["fence_steps"]:
            print(f"  {step}")
    if node["fence"] != "fenced":
        raise CliError(f"node {node['id']} is not fenced yet: some owner has not answered (see the steps); the "
                       "controller keeps trying, shoalctl node show tells when it is done")


def unfence_node(api, args) -> None:
    node = to_dict(api.call("UnfenceNode", admin_pb2.UnfenceNodeRequest(id=args.id)))
    output.emit_message(f"node {node['id']} unfenced: volumes may be published to it again", node, args.output)
