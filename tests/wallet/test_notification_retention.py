"""Notifications past the retention (`notification_retention_days`) are deleted in bounded
passes, oldest first, that replicas may run at once; recent ones, and ones whose push is
still pending, stay."""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec

from nodes.workers import WORKERS
from tests.wallet.service_context import wallet_context
from tests.wallet.test_settlement import Client, member
from wallet import notifications
from wallet.clock import ManualClock
from wallet.notifications import Kind, Notice
from wallet.otp import RecordingOtpSender

DAY_S = 86_400
RETENTION_DAYS = 400
DONE = """
UPDATE notification SET push_state = $2, push_done_at = created_at
WHERE event_key = ANY($1::text[])
"""


async def _write(
    db: asyncpg.Connection, person_id: int, keys: list[str], clock: ManualClock
) -> None:
    notices = [
        Notice(person_id=person_id, kind=Kind.CREDIT_ARRIVED, event_key=k, amount_fen=1)
        for k in keys
    ]
    async with db.transaction():
        await notifications.record_many(db, notices, clock.now())


async def _keys(db: asyncpg.Connection) -> set[str]:
    return {r["event_key"] for r in await db.fetch("SELECT event_key FROM notification")}


async def test_old_pushed_notifications_are_purged_in_bounded_passes(
    client: Client,
    otp: RecordingOtpSender,
    clock: ManualClock,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    await member(client, otp, 1, "王五")
    person_id = await db.fetchval("SELECT id FROM insured_person")
    before = await _keys(db)  # the wallet's own first notifications, push still pending
    await _write(db, person_id, [f"old:{i}" for i in range(6)], clock)
    await db.execute(DONE, [f"old:{i}" for i in range(4)], "sent")
    await db.execute(DONE, ["old:4"], "failed")  # given up: may go too
    # old:5 is still waiting for its push: it stays, however old.
    clock.advance(seconds=(RETENTION_DAYS - 1) * DAY_S)
    await _write(db, person_id, ["recent"], clock)
    await db.execute(DONE, ["recent"], "sent")

    async with wallet_context(database_url, clock, otp) as ctx:
        assert ctx.notifications.notification_retention_days == RETENTION_DAYS
        assert await notifications.purge_expired(ctx) == 0  # 399 days: nothing is old enough
        clock.advance(seconds=DAY_S + 1)
        assert await notifications.purge_expired(ctx, limit=2) == 2
        assert await notifications.purge_expired(ctx, limit=2) == 2
        assert await notifications.purge_expired(ctx, limit=2) == 1
        assert await notifications.purge_expired(ctx, limit=2) == 0
        assert await _keys(db) == before | {"old:5", "recent"}

        # A shorter retention setting reaches the recent one too.
        ctx.notifications = msgspec.structs.replace(
            ctx.notifications, notification_retention_days=1
        )
        assert await notifications.purge_expired(ctx) == 1
        # The newest row is gone, but its id was issued: a stream may still resume after it.
        issued = await db.fetchval("SELECT id FROM notification ORDER BY id DESC LIMIT 1")
        assert await notifications.newest_id(ctx.pool) == issued + 1
    assert await _keys(db) == before | {"old:5"}


async def test_concurrent_purges_take_disjoint_rows(
    client: Client,
    otp: RecordingOtpSender,
    clock: ManualClock,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    await member(client, otp, 1, "王五")
    person_id = await db.fetchval("SELECT id FROM insured_person")
    before = await _keys(db)
    keys = [f"n:{i}" for i in range(300)]
    await _write(db, person_id, keys, clock)
    await db.execute(DONE, keys, "sent")
    clock.advance(seconds=(RETENTION_DAYS + 1) * DAY_S)
    async with wallet_context(database_url, clock, otp) as ctx:
        purged = await asyncio.gather(
            *(notifications.purge_expired(ctx, limit=40) for _ in range(4))
        )
        assert all(0 <= n <= 40 for n in purged) and sum(purged) >= 40  # nobody waited
        while await notifications.purge_expired(ctx, limit=40):
            pass
    assert await _keys(db) == before


def test_the_purge_runs_as_a_node_worker_without_plt_keys() -> None:
    worker = next(w for w in WORKERS if w.name == "notifications-purge")
    assert worker.run_once is notifications.purge_expired
    assert not worker.needs_plt
    assert worker.interval_s == notifications.PURGE_INTERVAL_S
