"""``shoalctl snapshot create|list|delete`` (the controller may answer that it does not do snapshots yet)."""

from __future__ import annotations

from controller.cli import output
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2

LIST = (Column("NAME", "name"), Column("VOLUME", "volume"), Column("SIZE", "size_bytes", output.size),
        Column("STATE", "state"), Column("PROGRESS", "progress", lambda p: f"{p * 100:.0f}%"))


def to_dict(snapshot: admin_pb2.Snapshot) -> dict:
    return {"name": snapshot.name, "volume": snapshot.volume, "size_bytes": snapshot.size_bytes,
            "state": snapshot.state, "progress": snapshot.progress}


def register(sub) -> None:
    noun = sub.add_parser("snapshot", help="snapshots of volumes").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("create", help="snapshot a volume (idempotent by name)")
    verb.add_argument("name")
    verb.add_argument("--volume", required=True)
    output.add_output_flag(verb)
    verb.set_defaults(func=create_snapshot)
    verb = noun.add_parser("list", help="list snapshots")
    verb.add_argument("--volume", default="", help="only this volume's")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_snapshots)
    verb = noun.add_parser("delete", help="delete a snapshot (repeat: OK)")
    verb.add_argument("name")
    verb.set_defaults(func=delete_snapshot)


def create_snapshot(api, args) -> None:
    snapshot = to_dict(api.call("CreateSnapshot", admin_pb2.CreateSnapshotRequest(name=args.name,
                                                                                  volume=args.volume)))
    output.emit_message(f"snapshot {snapshot['name']} of {snapshot['volume']}: {snapshot['state']}", snapshot,
                        args.output)


def list_snapshots(api, args) -> None:
    snapshots = api.call("ListSnapshots", admin_pb2.ListSnapshotsRequest(volume=args.volume)).snapshots
    output.emit_list([to_dict(s) for s in snapshots], LIST, args.output, key="snapshots")


def delete_snapshot(api, args) -> None:
    api.call("DeleteSnapshot", admin_pb2.DeleteSnapshotRequest(name=args.name))
    print(f"snapshot {args.name} deleted")
