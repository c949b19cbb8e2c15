"""The node's pool returns connections without asyncpg's reset round trip (nodes.db.
release_as_is), and the node leaves nothing in a session that the reset used to undo."""

from __future__ import annotations

import asyncpg

from nodes.db import open_pool
from nodes.settings import Settings


def _queries(conn: asyncpg.Connection) -> int:
    """Statements this connection has sent (asyncpg's own count, one per round trip)."""
    return int(conn._con._protocol.queries_count)  # type: ignore[attr-defined]


async def test_a_connection_goes_back_without_a_round_trip(database_url: str) -> None:
    settings = Settings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    async with open_pool(settings) as pool:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = 50")
                await conn.fetchval("SELECT pg_advisory_xact_lock(42)")
            sent = _queries(conn)
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same connection
            assert _queries(conn) == sent  # nothing was sent on release
            assert await conn.fetchval("SHOW lock_timeout") == "0"
            advisory = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            assert await conn.fetchval(advisory) == 0


async def test_a_listener_leaves_nothing_behind(database_url: str) -> None:
    settings = Settings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    async with open_pool(settings) as pool:

        def heard(*_: object) -> None:
            pass

        async with pool.acquire() as conn:
            await conn.add_listener("plt_outbox", heard)
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 1
            await conn.remove_listener("plt_outbox", heard)
        async with pool.acquire() as conn:
            listening = await conn.fetchval("SELECT count(*) FROM pg_listening_channels()")
        assert listening == 0


async def test_a_transaction_left_open_is_rolled_back(database_url: str) -> None:
    settings = Settings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    async with open_pool(settings) as pool:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE pool_probe (n int)")
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO pool_probe VALUES (1)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pool_probe") == 0
