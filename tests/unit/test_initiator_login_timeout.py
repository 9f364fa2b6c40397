"""A login that times out leaves nothing behind: no "Future exception was never retrieved".

The client awaits its login future through ``asyncio.shield``; after a timeout nobody
awaits it, and the connection's later loss sets its exception.  The peer here is a plain
TCP socket on 127.0.0.1 that accepts and never answers (our own boundary: what is checked
is the client's bookkeeping, not a target's behaviour).
"""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

from node_agent.iscsi.initiator.client import ClientSettings, IscsiClient


def test_a_timed_out_login_reports_no_unretrieved_exception():
    reports: list[dict] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reports.append(context))
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            client = IscsiClient("127.0.0.1", port, "iqn.2026-11.io.shoal.test:silent",
                                 settings=ClientSettings(initiator_iqn="iqn.2026-11.io.shoal.test:i",
                                                         login_timeout=0.2, reconnect_timeout=0.2))
            with pytest.raises((asyncio.TimeoutError, OSError)):
                await client.connect()
            conn, _ = server.accept()
            conn.close()  # the connection is lost after the timeout: the login future gets its exception
            await asyncio.sleep(0.1)
            del client
            gc.collect()
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert not [r for r in reports if "never retrieved" in str(r.get("message", ""))], reports
