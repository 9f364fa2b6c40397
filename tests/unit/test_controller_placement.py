"""Placement rules (controller/domain/placement.py): pure functions, no store, no agents."""

from __future__ import annotations

import pytest

from controller.domain import placement
from controller.domain.errors import ResourceExhausted
from controller.domain.model import AVAILABLE, HEALTHY, UNHEALTHY, Disk, Node, Pool, Volume

GiB = 1 << 30


def node(node_id, *disks, health=HEALTHY, **labels):
    return Node(node_id, f"iqn.2024-01.io.shoal:{node_id}", "127.0.0.1:1", ("127.0.0.1:3260",), labels,
                tuple(Disk(name, f"/d/{name}", cap * GiB, free * GiB) for name, cap, free in disks), health, 0.0)


def vol(name, node_id, disk, size_gib, thin=True, pool="default"):
    return Volume(name, f"id-{name}", int(size_gib * GiB), pool, node_id, disk, AVAILABLE, thin, 0.0)


ALL = Pool("default", ())


def place(size_gib, nodes, volumes=(), pool=ALL, thin=True, **constraints):
    return placement.place(placement.Request(int(size_gib * GiB), thin, constraints), pool, nodes, volumes)


def test_spreads_by_provisioned_bytes_then_count_then_name():
    nodes = [node("node-b", ("data0", 100, 100)), node("node-a", ("data0", 100, 100))]
    assert place(1, nodes) == ("node-a", "data0")  # a tie: by node id
    assert place(1, nodes, [vol("v1", "node-a", "data0", 5)]) == ("node-b", "data0")
    # Same bytes promised: the disk with fewer volumes.
    volumes = [vol("v1", "node-a", "data0", 4), vol("v2", "node-b", "data0", 2), vol("v3", "node-b", "data0", 2)]
    assert place(1, nodes, volumes) == ("node-a", "data0")


def test_only_healthy_nodes_and_pool_members():
    nodes = [node("node-a", ("data0", 100, 100), health=UNHEALTHY),
             node("node-b", ("data0", 100, 100), ("data1", 100, 100))]
    assert place(1, nodes) == ("node-b", "data0")
    assert place(1, nodes, pool=Pool("p", (("node-b", "data1"),))) == ("node-b", "data1")
    with pytest.raises(ResourceExhausted, match=r"no healthy, unfenced node \(node-a \(unhealthy\)\)"):
        place(1, nodes, pool=Pool("p", (("node-a", "data0"),)))


@pytest.mark.parametrize("fence", ["fencing", "fenced"])
def test_no_new_volume_goes_to_a_fenced_node(fence):
    """A fenced node may keep sending heartbeats (healthy), but the operator has not known it clean since:
    nothing new is placed on it (a pool of only its disks has no room), until it is unfenced."""
    import dataclasses

    fenced = dataclasses.replace(node("node-a", ("data0", 100, 100)), fence=fence)
    nodes = [fenced, node("node-b", ("data0", 10, 10))]
    assert place(1, nodes) == ("node-b", "data0")
    with pytest.raises(ResourceExhausted, match=f"no healthy, unfenced node \\(node-a \\({fence}\\)\\)"):
        place(1, nodes, pool=Pool("p", (("node-a", "data0"),)))
    assert place(1, [dataclasses.replace(fenced, fence=""), nodes[1]]) == ("node-a", "data0")


def test_thin_overcommit_ratio():
    nodes = [node("node-a", ("data0", 10, 10))]
    full = [vol("v1", "node-a", "data0", 10)]
    with pytest.raises(ResourceExhausted):
        place(1, nodes, full)
    assert place(5, nodes, full, pool=Pool("default", (), 1.5)) == ("node-a", "data0")
    with pytest.raises(ResourceExhausted, match=r"largest: node-a/data0 5.0 GiB"):
        place(6, nodes, full, pool=Pool("default", (), 1.5))


def test_thick_needs_real_free_space():
    nodes = [node("node-a", ("data0", 10, 3))]
    assert place(3, nodes, thin=False) == ("node-a", "data0")
    with pytest.raises(ResourceExhausted, match=r"4.0 GiB free \(thick.*largest: node-a/data0 3.0 GiB"):
        place(4, nodes, thin=False)
    assert place(4, nodes, thin=True) == ("node-a", "data0")


def test_thick_volumes_the_last_report_cannot_count_are_taken_off_its_free_space():
    """A disk reported 10 GiB free (heartbeat at t=100); a thick 8 GiB volume placed at t=101 takes its space
    only when its agent makes it: a second thick 8 GiB one must not be promised the same bytes."""
    from dataclasses import replace

    from controller.domain.model import CREATING

    reported = [replace(node("node-a", ("data0", 100, 10)), last_heartbeat=100.0)]
    thick = replace(vol("t1", "node-a", "data0", 8, thin=False), created_at=101.0)
    with pytest.raises(ResourceExhausted, match=r"\(thick: real free space\) \(largest: node-a/data0 2.0 GiB"):
        place(8, reported, [thick], thin=False)
    assert place(2, reported, [thick], thin=False) == ("node-a", "data0")
    assert place(8, reported, [replace(thick, thin=True)], thin=False) == ("node-a", "data0")  # thin: no space
    # A report after it counts it: what the disk says is free is what is free.
    later = [replace(reported[0], last_heartbeat=102.0)]
    assert place(8, later, [thick], thin=False) == ("node-a", "data0")
    # Not made yet ("creating"): no report counts it, however late.
    with pytest.raises(ResourceExhausted):
        place(8, later, [replace(thick, state=CREATING)], thin=False)
    room = placement.candidate(reported[0], reported[0].disks[0], [thick])
    assert (room.unreported_thick_bytes, room.headroom(ALL, thin=False)) == (8 * GiB, 2 * GiB)


def test_topology_constraints():
    nodes = [node("node-a", ("data0", 10, 10), zone="a"), node("node-b", ("data0", 10, 10), zone="b", ssd="yes")]
    assert place(1, nodes, zone="b") == ("node-b", "data0")
    assert place(1, nodes, zone="b", ssd="yes") == ("node-b", "data0")
    with pytest.raises(ResourceExhausted, match="no healthy node has labels zone=c"):
        place(1, nodes, zone="c")


def test_nothing_fits_message_names_the_largest():
    nodes = [node("node-a", ("data0", 4, 4)), node("node-b", ("data0", 3, 3))]
    with pytest.raises(ResourceExhausted) as info:
        place(10, nodes)
    assert str(info.value).startswith("pool default: no healthy node with 10.0 GiB free "
                                      "(largest: node-a/data0 4.0 GiB")


def test_empty_pool_says_so():
    with pytest.raises(ResourceExhausted, match="pool default: no disks"):
        place(1, [])


def test_usage_counts_every_disk_and_the_pools_volumes():
    nodes = [node("node-a", ("data0", 10, 7), health=UNHEALTHY), node("node-b", ("data0", 5, 5))]
    volumes = [vol("v1", "node-a", "data0", 3), vol("v2", "node-b", "data0", 1, pool="other")]
    usage = placement.usage(ALL, nodes, volumes)
    assert (usage.capacity_bytes, usage.free_bytes, usage.provisioned_bytes) == (15 * GiB, 12 * GiB, 3 * GiB)
