"""``shoal target --workers N``'s parent, without worker processes: which worker a login's TargetName reaches,
and what becomes of connections still waiting for their first PDU when the target stops."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from node_agent.iscsi.connection import ConnectionSettings
from node_agent.target_service import LunSpec, TargetConfig, TargetSpec
from node_agent.target_workers import WorkerPool, _Worker

A = "iqn.2026-11.io.shoal.test:Alpha"
B = "iqn.2026-11.io.shoal.test:beta"


def login(target: str) -> bytes:
    text = f"InitiatorName=iqn.2026-11.io.shoal.test:i\0TargetName={target}\0".encode()
    header = bytearray(48)
    header[0] = 0x43
    header[5:8] = len(text).to_bytes(3, "big")
    return bytes(header) + text + bytes(-len(text) % 4)


def pool_of_two() -> tuple[WorkerPool, list[_Worker]]:
    """A pool whose two workers are stand-ins (a control socket, a process already exited with 0)."""
    config = TargetConfig(A, [LunSpec("a")], more_targets=[TargetSpec(B, [LunSpec("b")])], workers=2,
                          connection=ConnectionSettings(login_timeout=5))
    pool = WorkerPool(config)
    workers = []
    for index, iqn in enumerate((A, B)):
        process = SimpleNamespace(pid=0, returncode=0, poll=lambda: 0, wait=lambda timeout=None: 0)
        worker = _Worker(index, process, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET), [iqn])
        workers.append(worker)
        pool.workers.append(worker)
        pool.owner[iqn] = worker
        pool.owner_by_key[iqn.lower()] = worker
    return pool, workers


def test_a_target_name_in_another_case_reaches_the_worker_serving_it():
    """RFC 7143 §4.2.7.2 (RFC 3722): ``IQN.…:ALPHA`` names the target ``iqn.…:Alpha``.  One process takes it
    (``TargetRegistry.find_target``); the router looked the name up as given, found no worker, and served
    the login itself, where the target is only known for discovery: "service unavailable", every retry."""
    pool, (alpha, beta) = pool_of_two()
    try:
        assert pool.owner_of(A) is alpha
        assert pool.owner_of(A.upper()) is alpha
        assert pool.owner_of("iqn.2026-11.io.shoal.test:BETA") is beta
        assert pool.owner_of("iqn.2026-11.io.shoal.test:gamma") is None
    finally:
        for worker in pool.workers:
            worker.control.close()


def test_the_start_keys_owners_by_their_normalized_name_too(monkeypatch):
    """``WorkerPool.start`` fills ``owner_by_key`` from the workers' targets (the other test fills it by hand)."""
    config = TargetConfig(A, [LunSpec("a")], more_targets=[TargetSpec(B, [LunSpec("b")])], workers=2)
    pool = WorkerPool(config)

    def spawn(spec):
        process = SimpleNamespace(pid=0, returncode=0, poll=lambda: 0, wait=lambda timeout=None: 0)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_end.send(b"ready")
        spawned.append(child_end)
        parent_end.setblocking(False)
        return _Worker(spec.index, process, parent_end, [t.iqn for t in spec.targets])

    spawned: list[socket.socket] = []
    monkeypatch.setattr(WorkerPool, "_spawn", staticmethod(spawn))

    async def scenario():
        await pool.start()
        try:
            assert pool.owner_of(A.upper()) is pool.workers[0]
            assert pool.owner_of(B.upper()) is pool.workers[1]
        finally:
            await pool.stop()

    try:
        asyncio.run(scenario())
    finally:
        for sock in spawned:
            sock.close()


def test_connections_waiting_for_their_first_pdu_are_closed_at_the_stop_not_routed():
    """At the stop the parent closes the workers' control sockets, but a connection whose first PDU had not
    all come kept being watched: when the rest came it was handed to a closed control socket ("dropped:
    [Errno 9] Bad file descriptor") or to the closed front portal.  It is closed with the stop now, and one
    accepted after the stop began is not routed at all."""

    async def scenario() -> None:
        pool, workers = pool_of_two()
        pool._loop = asyncio.get_running_loop()
        served: list[socket.socket] = []
        listener = socket.create_server(("127.0.0.1", 0))
        clients, accepted = [], []
        try:
            for _ in range(2):
                clients.append(socket.create_connection(listener.getsockname()))
                conn, peer = listener.accept()
                conn.setblocking(False)
                accepted.append(conn)
            pool.route(accepted[0], ("127.0.0.1", 1), lambda c, p: served.append(c))
            clients[0].sendall(login(B)[:30])  # part of the first PDU
            await asyncio.sleep(0.05)
            assert pool.peeking == {"127.0.0.1": 1}
            handed: list[object] = []
            pool.hand_over = lambda *args: handed.append(args)  # type: ignore[method-assign]
            await pool.stop()
            assert accepted[0].fileno() == -1 and pool.peeking == {} and not pool._peeks
            try:  # the rest comes after the stop: nobody looks any more
                clients[0].sendall(login(B)[30:])
            except ConnectionResetError:  # it was closed with bytes unread: a reset
                pass
            await asyncio.sleep(0.05)
            assert handed == [] and served == []
            pool.route(accepted[1], ("127.0.0.1", 2), lambda c, p: served.append(c))  # a portal still open
            assert accepted[1].fileno() == -1 and pool.peeking == {} and served == []
        finally:
            for sock in clients + accepted + [listener]:
                sock.close()
            for worker in workers:
                worker.control.close()

    asyncio.run(scenario())


def test_connections_a_worker_cannot_take_are_warned_of_once_a_minute(caplog, monkeypatch):
    """A worker that takes no connections (gone, or its control socket full under a flood) made one WARNING per
    connection, each retried by its initiator: now the first is a warning, the rest within a minute debug
    lines, and the next warning says how many went meanwhile.  Each connection is closed all the same."""
    from node_agent import target_workers

    now = [1000.0]
    monkeypatch.setattr(target_workers.time, "monotonic", lambda: now[0])
    pool, workers = pool_of_two()  # unconnected control sockets: every hand-over fails
    caplog.set_level("DEBUG", logger=target_workers.log.name)
    try:
        conns = []
        for second in (0, 1, 2, 30, 61, 62):
            now[0] = 1000.0 + second
            a, b = socket.socketpair()
            conns.append(a)
            b.close()
            pool.hand_over(a, ("192.0.2.1", 40000 + second), workers[0], now[0])
        pool.hand_over(socket.socket(), ("192.0.2.2", 1), workers[1], now[0])  # another worker: its own count
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 3, warnings
        assert "192.0.2.1:40000 to worker 0 dropped" in warnings[0] and "more since" not in warnings[0]
        assert "192.0.2.1:40061 to worker 0 dropped" in warnings[1] and "(3 more since the last warning)" in warnings[1]
        assert "to worker 1 dropped" in warnings[2] and "more since" not in warnings[2]
        assert len([r for r in caplog.records if r.levelname == "DEBUG" and "dropped" in r.getMessage()]) == 4
        assert all(conn.fileno() == -1 for conn in conns)  # closed: the initiator retries
    finally:
        for worker in workers:
            worker.control.close()


def test_a_death_already_logged_is_not_logged_again_at_the_stop(caplog):
    """A worker killed while serving was logged twice as an ERROR: "exited while serving (status -9)" when it
    died, then "exited with status -9" by the stop that followed."""

    async def scenario() -> None:
        pool, workers = pool_of_two()
        pool._loop = asyncio.get_running_loop()
        dead = workers[1]
        dead.process = SimpleNamespace(pid=4242, returncode=-9, poll=lambda: -9, wait=lambda timeout=None: -9)
        dead.control.close()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dead.control = a
        a.setblocking(False)
        b.close()  # its end is gone: the control socket reads b""
        pool._loop.add_reader(a.fileno(), pool._control_readable, dead)
        await asyncio.sleep(0.05)
        assert pool.failed.is_set()
        await pool.stop()
        for worker in workers:
            worker.control.close()

    with caplog.at_level("ERROR", logger="shoal.target.workers"):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "exited while serving (status -9)" in errors[0], errors

