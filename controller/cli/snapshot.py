"""``shoalctl snapshot list|delete|create``, and the snapshot and clone verbs of ``shoalctl volume``.

``volume snapshot NAME --snapshot SNAP`` and ``volume clone NEW --from SOURCE``
return once the copy is done: at once where the node's filesystem reflinks,
else after a full copy in the background, shown as a progress bar on stderr
(``--no-wait`` returns while it runs; ``snapshot list`` and ``volume show``
tell its progress).
"""

from __future__ import annotations

from controller.cli import output, progress
from controller.cli.api import CliError
from controller.cli.output import Column
from protos.shoal.v1 import admin_pb2

LIST = (Column("NAME", "name"), Column("VOLUME", "volume"), Column("SIZE", "size_bytes", output.size),
        Column("STATE", "state"), Column("PROGRESS", "progress", lambda p: f"{p * 100:.0f}%"),
        Column("NODE", "owner_node"))


def to_dict(snapshot: admin_pb2.Snapshot) -> dict:
    return {"name": snapshot.name, "id": snapshot.id, "volume": snapshot.volume, "size_bytes": snapshot.size_bytes,
            "state": snapshot.state, "progress": snapshot.progress, "owner_node": snapshot.owner_node,
            "disk": snapshot.disk, "message": snapshot.message}


def register(sub) -> None:
    noun = sub.add_parser("snapshot", help="snapshots of volumes").add_subparsers(dest="verb", required=True)
    verb = noun.add_parser("list", help="list snapshots, with the progress of copies still running")
    verb.add_argument("--volume", default="", help="only this volume's")
    output.add_output_flag(verb)
    verb.set_defaults(func=list_snapshots)
    verb = noun.add_parser("delete", help="delete a snapshot (repeat: OK; refused while a clone copies from it)")
    verb.add_argument("name")
    output.add_output_flag(verb)
    verb.set_defaults(func=delete_snapshot)
    verb = noun.add_parser("create", help="snapshot a volume (the same as volume snapshot VOLUME --snapshot NAME)")
    verb.add_argument("snapshot", metavar="name")
    verb.add_argument("--volume", dest="name", required=True)
    add_wait_flags(verb)
    verb.set_defaults(func=create_snapshot)


def register_volume_verbs(noun) -> None:
    """``volume snapshot`` and ``volume clone`` (called by controller.cli.volume)."""
    verb = noun.add_parser("snapshot", help="take a read-only point-in-time snapshot of a volume "
                                            "(idempotent by snapshot name)")
    verb.add_argument("name", help="the volume")
    verb.add_argument("--snapshot", required=True, help="the new snapshot's name")
    add_wait_flags(verb)
    verb.set_defaults(func=create_snapshot)
    verb = noun.add_parser("clone", help="a new volume from a snapshot or a volume, on its node "
                                         "(idempotent by name)")
    verb.add_argument("name", help="the new volume")
    verb.add_argument("--from", dest="source", required=True, metavar="VOLUME_OR_SNAPSHOT",
                      help="NAME, or snapshot/NAME or volume/NAME when both exist")
    verb.add_argument("--pool", default="", help="pool of the clone (default: the source volume's); it must "
                                                 "include the source's disk")
    add_wait_flags(verb)
    verb.set_defaults(func=clone_volume)


def add_wait_flags(verb) -> None:
    verb.add_argument("--no-wait", action="store_true", help="return while a background copy still runs")
    output.add_output_flag(verb)


def create_snapshot(api, args) -> None:
    answer = api.call("CreateSnapshot", admin_pb2.CreateSnapshotRequest(name=args.snapshot, volume=args.name))
    if not args.no_wait and answer.state == progress.CREATING:
        answer = _waited(lambda: api.call("GetSnapshot", admin_pb2.GetSnapshotRequest(name=args.snapshot)),
                         f"copying snapshot {args.snapshot}", answer, args)
    snapshot = to_dict(answer)
    _fail_on_error("snapshot", snapshot)
    output.emit_message(_sentence("snapshot", snapshot["name"], f"of {snapshot['volume']}", snapshot), snapshot,
                        args.output)


def clone_volume(api, args) -> None:
    from controller.cli.volume import to_dict as volume_dict

    request = admin_pb2.CloneVolumeRequest(name=args.name, source=args.source, pool=args.pool)
    answer = api.call("CloneVolume", request)
    if not args.no_wait and answer.state == progress.CREATING:
        answer = _waited(lambda: api.call("GetVolume", admin_pb2.GetVolumeRequest(name=args.name)),
                         f"copying {args.source} to {args.name}", answer, args)
    volume = volume_dict(answer)
    _fail_on_error("volume", volume)
    output.emit_message(_sentence("volume", volume["name"], f"cloned from {volume['source']}, on "
                                  f"{volume['owner_node']}/{volume['disk']}", volume), volume, args.output)


def _waited(fetch, what: str, first, args):
    """``progress.wait``; a stalled copy is an error that says the copy goes on and how to look at it."""
    try:
        return progress.wait(fetch, what, first=first, show=args.output == "table")
    except progress.Stalled as exc:
        raise CliError(f"{exc}; it goes on in the background: see `shoalctl snapshot list` or `shoalctl volume "
                       "show`, and whether its owner node is healthy (`shoalctl node list`)") from None


def _sentence(kind: str, name: str, detail: str, record: dict) -> str:
    if record["state"] == progress.CREATING:
        return f"{kind} {name} {detail}: copying in the background ({record['progress'] * 100:.0f}%)"
    return f"{kind} {name} {detail}: {record['state']}"


def _fail_on_error(kind: str, record: dict) -> None:
    if record["state"] == "error":
        why = record.get("message") or "see the controller's log"
        raise CliError(f"{kind} {record['name']}: the copy failed ({why}); delete it, or repeat the command to "
                       "try again")


def list_snapshots(api, args) -> None:
    snapshots = api.call("ListSnapshots", admin_pb2.ListSnapshotsRequest(volume=args.volume)).snapshots
    output.emit_list([to_dict(s) for s in snapshots], LIST, args.output, key="snapshots")


def delete_snapshot(api, args) -> None:
    existed = api.exists("GetSnapshot", admin_pb2.GetSnapshotRequest(name=args.name))
    api.call("DeleteSnapshot", admin_pb2.DeleteSnapshotRequest(name=args.name))
    output.emit_deleted("snapshot", args.name, existed, args.output)
