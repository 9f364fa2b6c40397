"""Controller fixes found in review that span the service, placement and snapshots (both stores).

What each test pins down: a thick volume's free space is not promised twice between two heartbeats; a pool
deleted while a create or clone is being decided is never left holding the new volume.  Agents are
``FakeAgents``, as in tests/unit/test_controller_service.py.
"""

from __future__ import annotations

import pytest

from controller.domain.errors import NotFound, ResourceExhausted
from controller.domain.model import AVAILABLE, Disk
from tests.unit.test_controller_service import GiB, env, iqn  # noqa: F401 (env: the fixture)


def test_two_thick_volumes_between_heartbeats_are_not_promised_the_same_free_space(env):
    env.svc.register_node("node-a", iqn("node-a"), "127.0.0.1:7000", ["127.0.0.1:3260"], {"zone": "a"},
                          [Disk("data0", "/srv/data0", 100 * GiB, 10 * GiB)])
    env.svc.create_pool("one", [("node-a", "data0")])
    env.clock.now += 1
    env.svc.create_volume("thick-1", 8 * GiB, pool="one", thin=False)
    with pytest.raises(ResourceExhausted, match=r"8.0 GiB free \(thick: real free space\) .*2.0 GiB"):
        env.svc.create_volume("thick-2", 8 * GiB, pool="one", thin=False)  # no heartbeat since the first
    assert env.store.get_volume("thick-2") is None
    assert env.svc.create_volume("thick-2", 2 * GiB, pool="one", thin=False).state == AVAILABLE
    # The next heartbeat says what is free now, the thick volumes made counted (other files went meanwhile).
    env.clock.now += 1
    env.svc.heartbeat("node-a", [Disk("data0", "/srv/data0", 100 * GiB, 9 * GiB)])
    assert env.svc.create_volume("thick-3", 8 * GiB, pool="one", thin=False).owner_node == "node-a"
    with pytest.raises(ResourceExhausted, match=r"largest: node-a/data0 1.0 GiB"):
        env.svc.create_volume("thick-4", 8 * GiB, pool="one", thin=False)


def _delete_pool_while_deciding(env, pool):
    """Make the first look at ``pool`` be followed at once by another caller's delete_pool (the create or
    clone holds no lock yet there: nothing stops that delete)."""
    real = env.svc.get_pool
    done = []

    def get_pool(name):
        record = real(name)
        if name == pool and not done:
            done.append(name)
            env.svc.delete_pool(name)
        return record

    env.svc.get_pool = get_pool
    return done


def test_a_pool_deleted_while_a_volume_is_placed_in_it_is_not_used(env):
    env.svc.create_pool("fast", [("node-a", "data0")])
    interleaved = _delete_pool_while_deciding(env, "fast")
    with pytest.raises(NotFound, match="pool fast does not exist"):
        env.svc.create_volume("v", GiB, pool="fast")
    assert interleaved == ["fast"]
    assert env.store.get_volume("v") is None and env.store.get_pool("fast") is None
    assert env.agents.count("create_volume") == 0


def test_a_pool_deleted_while_a_clone_is_placed_in_it_is_not_used(env):
    source = env.svc.create_volume("vol-1", GiB)
    env.svc.create_pool("here", [(source.owner_node, source.disk)])
    interleaved = _delete_pool_while_deciding(env, "here")
    with pytest.raises(NotFound, match="pool here does not exist"):
        env.svc.clone_volume("vol-c", "vol-1", pool="here")
    assert interleaved == ["here"]
    assert env.store.get_volume("vol-c") is None and env.store.get_pool("here") is None
    assert env.agents.count("clone_volume") == 0
