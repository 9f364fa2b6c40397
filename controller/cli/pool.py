"""``shoalctl pool create|list|show|delete``."""

from __future__ import annotations

import argparse

from controller.cli import output
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2


def _members(value) -> str:
    return ",".join(f"{m['node_id']}/{m['disk']}" for m in value) if value else "every disk"


LIST = (Column("NAME", "name"), Column("MEMBERS", "members", _members),
        Column("OVERCOMMIT", "overcommit_ratio", lambda r: f"{r:g}"),
        Column("CAPACITY", "capacity_bytes", output.size), Column("PROVISIONED", "provisioned_bytes", output.size))
SHOW = (Column("Name", "name"), Column("Members", "members", _members),
        Column("Overcommit", "overcommit_ratio", lambda r: f"{r:g}"),
        Column("Capacity", "capacity_bytes", output.size), Column("Provisioned", "provisioned_bytes", output.size))


def to_dict(pool: admin_pb2.Pool) -> dict:
    return {"name": pool.name, "members": [{"node_id": m.node_id, "disk": m.disk} for m in pool.members],
            "overcommit_ratio": pool.overcommit_ratio, "capacity_bytes": pool.capacity_bytes,
            "provisioned_bytes": pool.provisioned_bytes}


def member(text: str) -> admin_pb2.PoolMember:
    node, sep, disk = text.partition("/")
    if not sep or not node or not disk:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NODE/DISK, e.g. node-a/data0")
    return admin_pb2.PoolMember(node_id=node, disk=disk)


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 1.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1 (no overcommit) or more")
    return value


def register(sub) -> None:
    noun = sub.add_parser("pool", help="pools of node disks").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("create", help="create a pool (idempotent by name)")
    verb.add_argument("name")
    verb.add_argument("--member", type=member, action="append", default=[], metavar="NODE/DISK",
                      help="a disk of a node (repeatable; none: every disk of every node)")
    verb.add_argument("--overcommit", type=ratio, default=1.0, metavar="RATIO",
                      help="how far thin volumes may promise beyond capacity (default 1: not at all)")
    output.add_output_flag(verb)
    verb.set_defaults(func=create_pool)
    verb = noun.add_parser("list", help="list the pools")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_pools)
    verb = noun.add_parser("show", help="one pool in detail")
    verb.add_argument("name")
    output.add_output_flag(verb)
    verb.set_defaults(func=show_pool)
    verb = noun.add_parser("delete", help="delete a pool without volumes (deleting what is gone succeeds)")
    verb.add_argument("name")
    output.add_output_flag(verb)
    verb.set_defaults(func=delete_pool)


def create_pool(api, args) -> None:
    pool = to_dict(api.call("CreatePool", admin_pb2.CreatePoolRequest(name=args.name, members=args.member,
                                                                      overcommit_ratio=args.overcommit)))
    output.emit_message(f"pool {pool['name']} ready ({_members(pool['members'])}, "
                        f"{output.size(pool['capacity_bytes'])})", pool, args.output)


def list_pools(api, args) -> None:
    pools = api.call("ListPools", admin_pb2.ListPoolsRequest()).pools
    output.emit_list([to_dict(p) for p in pools], LIST, args.output, key="pools")


def show_pool(api, args) -> None:
    output.emit_object(to_dict(api.call("GetPool", admin_pb2.GetPoolRequest(name=args.name))), SHOW, args.output)


def delete_pool(api, args) -> None:
    existed = api.exists("GetPool", admin_pb2.GetPoolRequest(name=args.name))
    api.call("DeletePool", admin_pb2.DeletePoolRequest(name=args.name))
    output.emit_deleted("pool", args.name, existed, args.output)
