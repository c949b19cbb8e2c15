"""The node's database: a given server (`DATABASE_URL`) or one of our own, migrated at start."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from nodes.embedded_pg import EmbeddedPostgres
from nodes.migrate import migrate
from nodes.settings import Settings

EMBEDDED_DATABASE = "plt"


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database `name` if it does not exist (idempotent, race-safe)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _check_durability(conn: asyncpg.Connection) -> None:
    """Refuse to run a ledger on a server that may lose committed transactions (PROTOCOL b.12)."""
    fsync = await conn.fetchval("SHOW fsync")
    sync_commit = await conn.fetchval("SHOW synchronous_commit")
    if fsync != "on" or sync_commit not in ("on", "remote_write", "remote_apply"):
        raise RuntimeError(
            f"refusing to run: fsync={fsync}, synchronous_commit={sync_commit}; "
            "a ledger needs durable commits"
        )


# Sent in every connection's startup packet, so these are the session's defaults, whatever a
# reset on release does (a `SET` in the pool's `init` would be undone by a `RESET ALL`, and the
# session would fall back to the server's or database's own time zone, issue 14); dates
# computed in SQL (calendar days, windows, months) are UTC.
SERVER_SETTINGS: dict[str, str] = {"timezone": "UTC"}


async def release_as_is(conn: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's reset query.

    The default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) is one
    more round trip per acquire: 5-7 % of a node's CPU in the grant-cycle profile and the 7th
    round trip of a settlement. The node leaves nothing in a session for it to undo: settings
    come in the startup packet (`SERVER_SETTINGS`), `SET` is only ever `SET LOCAL`, advisory
    locks are transaction-scoped (the migration lock is released in `finally`), no cursor
    outlives its transaction, and the LISTEN holders (`wallet.plt.wakeup`,
    `wallet.notification_stream`) UNLISTEN when they let go. asyncpg still rolls back a
    transaction left open before this runs, and a connection that died is dropped, not
    reused.

    One safety net costs nothing: the server reports a changed time zone to the client
    (a `ParameterStatus` message), and a connection whose reported zone is no longer UTC gets
    the full reset, so dates computed in SQL can never silently move to another zone (issue
    14). tests/nodes/test_db_pool.py holds the pool to all of this."""
    if conn.get_settings().TimeZone != SERVER_SETTINGS["timezone"]:
        await conn.execute(conn.get_reset_query())


def connect_options(settings: Settings) -> dict[str, Any]:
    """Arguments of every connection the node opens to its ledger (pool or single).

    With several hosts in the URL, asyncpg tries them in order within the connect timeout
    each and keeps the first that matches `target_session_attrs`: after a failover, a new
    connection (the pool replaces each one that died with the old primary) goes to the
    promoted standby without a restart or a new URL."""
    return {
        "server_settings": SERVER_SETTINGS,
        "timeout": settings.db_connect_timeout_s,
        "target_session_attrs": settings.db_target_session_attrs,
    }


async def prepare_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The DSN to use, starting our embedded server if no URL is given and migrating the
    database. Returns the server too if this call started it (the caller stops it).

    `plt-node serve` with several worker processes calls this once in the parent; the
    workers then get the DSN as their `DATABASE_URL` (their own migration check finds
    nothing to apply)."""
    server: EmbeddedPostgres | None = None
    dsn = settings.database_url
    if not dsn:
        server = EmbeddedPostgres(settings.embedded_data_dir)
        was_running = server.is_running()
        server.start()
        await ensure_database(server.dsn(), EMBEDDED_DATABASE)
        dsn = server.dsn(EMBEDDED_DATABASE)
        if was_running:
            server = None  # somebody else started it; they stop it
    try:
        conn = await asyncpg.connect(dsn, **connect_options(settings))
        try:
            await _check_durability(conn)
            await migrate(conn)
        finally:
            await conn.close()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return dsn, server


@contextlib.asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """Start (if embedded) and migrate the database, and yield a connection pool."""
    dsn, server = await prepare_database(settings)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            reset=release_as_is,
            **connect_options(settings),
        )
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        if server is not None:
            server.stop()


async def analyze(pool: asyncpg.Pool, tables: tuple[str, ...]) -> None:
    """Refresh the planner's statistics after a bulk load (roster import, credit batch).

    A fresh database is planned as if its tables were empty until autovacuum gets to them,
    so settlements scanned `insured_person` and `account` sequentially and slowed down as
    they grew (issue 14). ANALYZE samples a bounded number of rows: seconds at most."""
    for table in tables:
        await pool.execute(f"ANALYZE {table}")
