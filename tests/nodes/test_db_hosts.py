"""A `DATABASE_URL` with several hosts: the node uses the first writable one, answers 503
(never 500) while no host is writable, and carries on without a restart once one is again,
as after a failover (the standby promoted). A real server plays both roles here: a database
made read-only (`default_transaction_read_only`) looks to the client exactly as a standby
does; the container tier's failover drill does it with a real standby."""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
from litestar.testing import AsyncTestClient

from nodes.app import create_app
from nodes.settings import Settings
from tests.conftest import TEST_SCRYPT_N
from tests.support import OPERATOR, person
from wallet.clock import ManualClock
from wallet.otp import RecordingOtpSender


def dead_port() -> int:
    """A local port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_dead_host_first(dsn: str) -> str:
    """`dsn` with a host that refuses connections before the real one."""
    parts = urlsplit(dsn)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@127.0.0.1:{dead_port()},{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


async def read_only(db: asyncpg.Connection, on: bool) -> None:
    """Make the test's database look like a standby (on) or a primary (off), and end every
    session of the node on it, as the old primary's death does."""
    name = await db.fetchval("SELECT current_database()")
    action = (
        "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
    )
    await db.execute(f'ALTER DATABASE "{name}" {action}')
    pids = await db.fetch(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
    # pg_terminate_backend only signals: wait until those sessions are really gone (the
    # node's pool opens new ones at once; they are not waited for).
    for _ in range(100):
        alive = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])",
            [r["pid"] for r in pids],
        )
        if alive == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the node's sessions did not end")


async def ready_within(http: AsyncTestClient[Any], seconds: float) -> bool:
    """Whether /ready answers 200 within `seconds`. Right at a promotion the pool may still
    meet a session that the failover ended (a connect in flight while it happened): that
    request answers 503, as a request during the failover does, and the next one gets a new
    session. CI once saw exactly that."""
    for _ in range(int(seconds / 0.1)):
        if (await http.get("/ready")).status_code == 200:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_the_node_finds_the_writable_host_and_carries_on_after_a_failover(
    settings: Settings, db: asyncpg.Connection, clock: ManualClock, otp: RecordingOtpSender
) -> None:
    multi = msgspec.structs.replace(
        settings,
        database_url=with_dead_host_first(settings.database_url or ""),
        workers_enabled=False,
    )
    assert multi.db_target_session_attrs == "read-write"
    app = create_app(multi, clock=clock, otp_sender=otp, scrypt_n=TEST_SCRYPT_N)
    async with AsyncTestClient(app=app) as http:
        assert (await http.get("/ready")).status_code == 200

        await read_only(db, True)  # the primary is gone; only a standby answers
        down = await http.get("/ready")
        assert (down.status_code, down.json()["code"]) == (503, "service_unavailable")
        assert down.headers["content-type"].startswith("application/problem+json")
        roster = await http.post(
            "/operator/v1/roster", json={"persons": [person(1, "张三丰")]}, headers=OPERATOR
        )
        assert (roster.status_code, roster.json()["code"]) == (503, "service_unavailable")

        await read_only(db, False)  # the standby is promoted
        assert await ready_within(http, seconds=5.0)
        roster = await http.post(
            "/operator/v1/roster", json={"persons": [person(1, "张三丰")]}, headers=OPERATOR
        )
        assert roster.status_code == 200, roster.text
