"""The initiator core's ``completions_per_pass``: a large receive is completed a few commands at a time.

``IscsiClient`` sets it so that the commands the first completions let in are sent
before the rest of the receive is processed (client and target then overlap instead
of taking turns).  Stopping part-way must change nothing else: every PDU is still
handled once, in order, with all its checks (DataSN, offsets, StatSN, CmdSN window),
and bytes that arrive while held are processed after the ones held back.
"""

from __future__ import annotations

import os
import struct

from node_agent.iscsi.initiator import core as C
from node_agent.iscsi.keys import InitiatorSettings
from tests.protocol.conftest import INITIATOR, TARGET

BLOCKS_PER_READ = 8  # 4 KiB reads


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def deliver(initiator: C.InitiatorConnection, data: bytes) -> None:
    """Hand ``data`` to the initiator as few receives as its buffers allow (one, for small replies)."""
    view = memoryview(data)
    while view:
        space = initiator.get_buffer()
        count = min(len(space), len(view))
        space[:count] = view[:count]
        view = view[count:]
        initiator.buffer_updated(count)


def target_reply(target, initiator: C.InitiatorConnection) -> bytes:
    target.receive(b"".join(bytes(p) for p in initiator.take_output()))
    return b"".join(os.pread(p.fd, p.length, p.offset) if isinstance(p, tuple) else bytes(p)
                    for p in target.take_output())


def settle(target, initiator: C.InitiatorConnection) -> list:
    events = []
    for _ in range(100):
        reply = target_reply(target, initiator)
        if reply:
            deliver(initiator, reply)
        while True:
            events += initiator.take_events()
            if not initiator.held:
                break
            initiator.resume()
        if not reply:
            return events
    raise AssertionError("the conversation did not settle")


def connect(make_initiator, per_pass: int):
    target = make_initiator().conn
    initiator = C.InitiatorConnection(InitiatorSettings(INITIATOR, TARGET), isid=C.random_isid(),
                                      completions_per_pass=per_pass)
    initiator.start_login()
    assert isinstance(settle(target, initiator)[0], C.LoggedIn)
    initiator.submit(bytes(6))  # TEST UNIT READY takes the power-on unit attention
    settle(target, initiator)
    return target, initiator


def test_one_receive_of_many_responses_completes_a_few_per_pass(make_initiator):
    target, initiator = connect(make_initiator, per_pass=4)
    payload = os.urandom(12 * BLOCKS_PER_READ * 512)
    initiator.submit(write16(0, 12 * BLOCKS_PER_READ), data_out=payload)
    assert [e.status for e in settle(target, initiator)] == [0]
    itts = [initiator.submit(read16(i * BLOCKS_PER_READ, BLOCKS_PER_READ), read_length=4096) for i in range(12)]
    deliver(initiator, target_reply(target, initiator))  # all twelve responses in one receive
    passes = []
    while True:
        passes.append(initiator.take_events())
        if not initiator.held:
            break
        initiator.resume()
    assert [len(p) for p in passes] == [4, 4, 4]
    done = [e for p in passes for e in p]
    assert [e.itt for e in done] == itts
    for i, event in enumerate(done):
        assert event.status == 0 and bytes(event.data) == payload[i * 4096:(i + 1) * 4096]
    assert initiator.resume() is None and initiator.take_events() == []  # nothing left: a no-op


def test_bytes_arriving_while_held_queue_behind_the_held_ones(make_initiator):
    target, initiator = connect(make_initiator, per_pass=2)
    first = [initiator.submit(read16(i * BLOCKS_PER_READ, BLOCKS_PER_READ), read_length=4096) for i in range(5)]
    deliver(initiator, target_reply(target, initiator))
    assert initiator.held and [e.itt for e in initiator.take_events()] == first[:2]
    second = [initiator.submit(read16(0, BLOCKS_PER_READ), read_length=4096) for _ in range(3)]
    deliver(initiator, target_reply(target, initiator))  # more arrives before resume(): processed in order
    done = [e.itt for e in initiator.take_events()]
    while initiator.held:
        initiator.resume()
        done += [e.itt for e in initiator.take_events()]
    assert done == first[2:] + second


def test_zero_completes_everything_received(make_initiator):
    target, initiator = connect(make_initiator, per_pass=0)
    itts = [initiator.submit(read16(i * BLOCKS_PER_READ, BLOCKS_PER_READ), read_length=4096) for i in range(12)]
    deliver(initiator, target_reply(target, initiator))
    assert not initiator.held and [e.itt for e in initiator.take_events()] == itts
