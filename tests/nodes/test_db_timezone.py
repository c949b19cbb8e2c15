"""Every pooled connection computes in UTC, however often it is reused, on a server whose
own time zone is not UTC (issue 14: a `SET` in the pool's init was undone by the reset
asyncpg runs when a connection goes back to the pool)."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

import asyncpg

from nodes.db import open_pool
from nodes.settings import Settings

# 20:00 UTC on 1 January is already 2 January in Shanghai (+08).
LATE_EVENING = dt.datetime(2026, 1, 1, 20, 0, tzinfo=dt.UTC)


async def test_time_zone_survives_the_pool_reset(admin_dsn: str, database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'Asia/Shanghai'")
    finally:
        await admin.close()
    direct = await asyncpg.connect(database_url)
    try:  # the database really is in Shanghai for a plain session
        assert await direct.fetchval("SHOW timezone") == "Asia/Shanghai"
        assert await direct.fetchval("SELECT $1::timestamptz::date", LATE_EVENING) == dt.date(
            2026, 1, 2
        )
    finally:
        await direct.close()

    settings = Settings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    async with open_pool(settings) as pool:
        seen = []
        for _ in range(3):  # one connection, acquired and released (reset) three times
            async with pool.acquire() as conn:
                seen.append(
                    (
                        await conn.fetchval("SHOW timezone"),
                        await conn.fetchval("SELECT $1::timestamptz::date", LATE_EVENING),
                        await conn.fetchval(
                            "SELECT date_trunc('day', $1::timestamptz)", LATE_EVENING
                        ),
                        conn.get_server_pid(),
                    )
                )
        assert len({pid for *_, pid in seen}) == 1  # really the same connection each time
        assert [s[:3] for s in seen] == [
            ("UTC", dt.date(2026, 1, 1), dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        ] * 3
        # A session-level SET by some caller is undone on release, back to UTC, not Shanghai.
        async with pool.acquire() as conn:
            await conn.execute("SET TIME ZONE 'America/New_York'")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW timezone") == "UTC"
