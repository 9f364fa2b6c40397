"""``shoalctl status``: the pool at a glance."""

from __future__ import annotations

from controller.cli import output
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2

FIELDS = (Column("Controller", "controller"), Column("Nodes", "nodes"), Column("Healthy nodes", "healthy_nodes"),
          Column("Volumes", "volumes"), Column("Attachments", "attachments"),
          Column("Capacity", "capacity_bytes", output.size), Column("Free", "free_bytes", output.size),
          Column("Provisioned", "provisioned_bytes", output.size))


def register(sub) -> None:
    verb = sub.add_parser("status", help="nodes, volumes and capacity at a glance")
    output.add_output_flag(verb)
    verb.set_defaults(func=show_status)


def show_status(api, args) -> None:
    status = api.call("GetStatus", admin_pb2.GetStatusRequest())
    data = {"controller": api.address, "nodes": status.nodes, "healthy_nodes": status.healthy_nodes,
            "volumes": status.volumes, "attachments": status.attachments, "capacity_bytes": status.capacity_bytes,
            "free_bytes": status.free_bytes, "provisioned_bytes": status.provisioned_bytes}
    output.emit_object(data, FIELDS, args.output)
