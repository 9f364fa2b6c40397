"""Receive pacing (``node_agent.iscsi.server._Pacer``): when a connection alone on its event loop waits a
little after a receive that gathered sequential writes.

The pacer is driven here with a simulated stream whose rate depends on whether it waits, as a real
initiator's does (tests/perf/README.md has the measured rates: waiting helps at queue depth 16-64 and
hurts at 4-8); the clock is the test's.  The bookkeeping of connections per event loop is checked on a
real ``PortalServer`` with real sockets."""

from __future__ import annotations

import asyncio
import socket

from node_agent.iscsi import server as S
from node_agent.iscsi.keys import TargetSettings
from tests.protocol.conftest import make_registry

P = S._Pacer


def drive(pacer: S._Pacer, rate_waiting: float, rate_not: float, until: float, *, start: float = 0.0,
          per_receive: int = 4) -> list[tuple[float, float]]:
    """Receives of ``per_receive`` gathered writes from ``start`` to ``until``, spaced as a stream running at
    ``rate_waiting`` writes/s while the pacer waits and ``rate_not`` while it does not; (time, wait) each."""
    now, seen = start, []
    while now < until:
        wait = pacer.wait(per_receive, now)
        seen.append((now, wait))
        now += per_receive / (rate_waiting if wait else rate_not)
    return seen


def waits_between(seen, start: float, end: float) -> set[float]:
    return {wait for when, wait in seen if start <= when < end}


def test_nothing_waits_without_two_gathered_writes():
    pacer = P()
    assert pacer.wait(0, 0.0) == 0.0
    seen = drive(pacer, 200_000, 10_000, 12.0, per_receive=1)  # waiting would "help", but one command each
    assert waits_between(seen, 0.0, 12.0) == {0.0}


def test_waits_once_the_trials_show_waiting_carries_more():
    pacer = P()
    seen = drive(pacer, 90_000, 80_000, 3.0)
    trials = 2 * P.TRIAL
    assert waits_between(seen, 0.0, P.TRIAL * 0.9) == {0.0}  # the first trial window does not wait ...
    assert waits_between(seen, P.TRIAL * 1.1, trials * 0.95) == {P.WAIT}  # ... the second does
    assert pacer.on
    assert waits_between(seen, trials * 1.1, 3.0) == {P.WAIT}


def test_does_not_wait_when_waiting_carries_less_or_barely_more():
    for waiting, not_waiting in ((56_000, 68_000), (81_000, 80_000)):  # the second: within GAIN
        pacer = P()
        seen = drive(pacer, waiting, not_waiting, 3.0)
        assert not pacer.on, (waiting, not_waiting)
        assert waits_between(seen, 2 * P.TRIAL * 1.1, 3.0) == {0.0}


def test_tries_again_every_period_the_other_way_round_and_follows_a_change():
    pacer = P()
    seen = drive(pacer, 56_000, 68_000, P.PERIOD)  # depth 8: waiting costs
    assert not pacer.on
    again = 2 * P.TRIAL + P.PERIOD
    # The next trials begin with the waiting window; the stream has become one that gains by waiting.
    seen = drive(pacer, 92_000, 80_000, again + 2 * P.TRIAL + 0.5, start=seen[-1][0] + 4 / 68_000)
    assert waits_between(seen, again * 1.005, again + P.TRIAL * 0.9) == {P.WAIT}
    assert pacer.on
    assert waits_between(seen, again + 2 * P.TRIAL * 1.1, again + 2 * P.TRIAL + 0.5) == {P.WAIT}


def test_a_pause_ends_the_stream_and_the_next_one_starts_with_trials():
    pacer = P()
    seen = drive(pacer, 90_000, 80_000, 1.0)
    assert pacer.on
    later = seen[-1][0] + P.IDLE * 2
    assert pacer.wait(4, later) == (P.WAIT if pacer.first_on else 0.0)  # a trial window, not the old decision
    assert not pacer.on and pacer.phase == 1


def test_each_event_loop_counts_its_open_connections():
    """The pacer is asked only while its connection is the only one on its loop: the count follows
    connections as they come and go, and a closed portal leaves none behind."""
    async def scenario():
        loop = asyncio.get_running_loop()
        server = S.PortalServer(make_registry(), TargetSettings(), "127.0.0.1", 0)
        await server.start()
        seen = []
        try:
            first = socket.create_connection(server.address)
            second = socket.create_connection(server.address)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if S._CHANNELS_ON_LOOP[loop] == 2:
                    break
            seen.append(S._CHANNELS_ON_LOOP[loop])
            second.close()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if S._CHANNELS_ON_LOOP[loop] == 1:
                    break
            seen.append(S._CHANNELS_ON_LOOP[loop])
        finally:
            await server.close()
        first.close()
        seen.append(loop in S._CHANNELS_ON_LOOP)
        return seen

    assert asyncio.run(scenario()) == [2, 1, False]
