"""Notifications for app users: written with the change that causes them, read three ways.

Every event an app user must act on or should know about is one `notification` row per
recipient, inserted by `record` (or `record_many` on bulk paths) *inside the transaction of
the state change*: a rolled-back change notifies no one, a committed one always does, and
the unique key (recipient, event identity) makes a replayed handler notify once.

The same statement runs `pg_notify(CHANNEL, person_id)`, delivered only if the row commits:
open event streams (`wallet.notification_stream`) wake at once, on every replica. Before it
draws its id the statement takes a transaction-scoped advisory lock on the recipient, so one
recipient's ids commit in increasing order and a stream that reads `id > Last-Event-ID`
never skips a row that commits late. Call `record` late in a transaction (it holds that lock
until the commit), and notify several people in one call (locked in ascending order).

A hot path may instead write its rows inside the statement that writes its own change (the
settlement's, `wallet.settlement`), taking the same lock (`lock_recipient`) in ascending
recipient order, and wake the streams after the commit (`notification_stream.announce`)
rather than with `pg_notify` in the transaction: PostgreSQL serialises the commits of all
transactions that NOTIFY (a database-wide lock held across the commit's WAL flush), which
costs a busy node its group commits. The wake-up is only a wake-up: a stream also re-reads
at every heartbeat, so a wake lost to a crash right after a commit only delays the event.

Nothing personal beyond a masked name and a province ever goes into a row: the rows are
pushed to a vendor's service (`wallet.push`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import asyncpg
import msgspec

from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError

CHANNEL = "wallet_notification"
# Namespace of the advisory lock serialising one recipient's writers (any constant that no
# other advisory lock of this database uses).
_LOCK_SPACE = 0x4E4F54  # 'NOT'
PAGE_MAX = 100


class Kind(StrEnum):
    """What happened. The string is stable: apps switch on it (docs/notifications.md)."""

    GRANT_OFFERED = "grant.offered"  # receiver: accept before `deadline`
    GRANT_COMMITTED = "grant.committed"  # receiver: the quota is spendable
    GRANT_RETURNED = "grant.returned"  # receiver: an offered grant went back to the giver
    GRANT_ACCEPTED = "grant.accepted"  # giver: accepted, the amount moved (committed)
    GRANT_DECLINED = "grant.declined"  # giver: declined, the amount is back
    GRANT_EXPIRED = "grant.expired"  # giver: not accepted by the deadline, the amount is back
    GRANT_ABORTED = "grant.aborted"  # giver: refused or aborted for another reason
    QUOTA_RETURNED = "quota.returned"  # giver: the unused quota came back
    RELATIONSHIP_REQUESTED = "relationship.requested"
    RELATIONSHIP_CONFIRMED = "relationship.confirmed"
    RELATIONSHIP_DECLINED = "relationship.declined"
    RELATIONSHIP_APPROVED = "relationship.approved"  # both: an operator's review let it in
    RELATIONSHIP_REJECTED = "relationship.rejected"  # both: an operator's review refused it
    RELATIONSHIP_ENDED = "relationship.ended"
    RELATIONSHIP_ENDED_AUTOMATICALLY = "relationship.ended_automatically"
    SHARED_MONEY_SPENT = "shared_money.spent"  # giver: a relative spent my money
    SHARED_MONEY_REFUNDED = "shared_money.refunded"
    CREDIT_ARRIVED = "credit.arrived"
    WALLET_LOCKED = "wallet.locked"  # too many wrong payment passwords


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """One notification to write: who, what, and what a phone screen shows."""

    person_id: int
    kind: Kind
    # The event's identity, unique per recipient: a replay of the same change adds nothing.
    event_key: str
    amount_fen: int | None = None
    counterpart_name_masked: str | None = None
    counterpart_province: str | None = None
    deadline: dt.datetime | None = None
    refs: dict[str, str] = msgspec.field(default_factory=dict)
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class NotificationView(msgspec.Struct, frozen=True, kw_only=True):
    """A notification as the app (list, stream) and the push gateway see it.

    `id` is increasing per recipient (the stream's `Last-Event-ID`); `refs` holds the ids to
    open (`transfer_id`, `relation_id`, `settlement_id`, ...); `detail` small extras
    (`category`, `plt_code`, ...). Names are masked; there is never an ID number.
    """

    id: int
    kind: str
    created_at: dt.datetime
    read: bool
    amount_fen: int | None
    counterpart_name_masked: str | None
    counterpart_province: str | None
    deadline: dt.datetime | None
    refs: dict[str, str]
    detail: dict[str, Any]


class NotificationPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of the list, newest first; `next_before` fetches the next (older) page."""

    items: list[NotificationView]
    unread_count: int
    next_before: int | None


class MarkedRead(msgspec.Struct, frozen=True, kw_only=True):
    marked: int
    unread_count: int


# --- writing ---------------------------------------------------------------------------------


def lock_recipient(person_id_sql: str) -> str:
    """The SQL expression that takes the transaction-scoped lock serialising one recipient's
    writers (see the module doc). Evaluate it in ascending recipient order, before the row's
    id is drawn: e.g. in the select list of a query ordered by the recipient, whose volatile
    expressions PostgreSQL evaluates after the sort."""
    return f"pg_advisory_xact_lock({_LOCK_SPACE}, (({person_id_sql}) % 2147483647)::integer)"


# Input rows sorted by recipient, each locked before its id is drawn (see the module doc).
_WRITE = f"""
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                         $6::text[], $7::timestamptz[], $8::jsonb[], $9::jsonb[])
        WITH ORDINALITY AS u(person_id, kind, event_key, amount_fen, name_masked, province,
                             deadline, refs, detail, n)
    ORDER BY person_id, n
), locked AS (
    SELECT input.*, {lock_recipient("person_id")} AS lock
    FROM input
), inserted AS (
    INSERT INTO notification
        (person_id, kind, event_key, created_at, amount_fen, counterpart_name_masked,
         counterpart_province, deadline, refs, detail, push_next_at)
    SELECT person_id, kind, event_key, $10, amount_fen, name_masked, province, deadline,
           refs, detail, $10
    FROM locked
    ON CONFLICT (person_id, event_key) DO NOTHING
    RETURNING id, person_id
)
"""
_RECORD = _WRITE + f"SELECT id, pg_notify('{CHANNEL}', person_id::text) FROM inserted"
_RECORD_QUIETLY = _WRITE + "SELECT id, person_id FROM inserted"


def _json(value: dict[str, Any]) -> str:
    return msgspec.json.encode(value).decode()


async def record_many(
    conn: asyncpg.Connection, notices: Sequence[Notice], now: dt.datetime, *, notify: bool = True
) -> list[int]:
    """Write `notices` in the caller's transaction, once per (recipient, event): the ids of
    the rows written (an event already recorded for its recipient adds nothing).

    `notify=False` leaves out the `pg_notify` (see the module doc): the caller then wakes the
    streams of the recipients after its commit (`notification_stream.announce`)."""
    if not notices:
        return []
    rows = await conn.fetch(
        _RECORD if notify else _RECORD_QUIETLY,
        [n.person_id for n in notices],
        [n.kind.value for n in notices],
        [n.event_key for n in notices],
        [n.amount_fen for n in notices],
        [n.counterpart_name_masked for n in notices],
        [n.counterpart_province for n in notices],
        [n.deadline for n in notices],
        [_json(n.refs) for n in notices],
        [_json(n.detail) for n in notices],
        now,
    )
    return sorted(r["id"] for r in rows)


async def record(conn: asyncpg.Connection, notice: Notice, now: dt.datetime) -> int | None:
    """Write one notice in the caller's transaction; its id, or None if already recorded."""
    ids = await record_many(conn, [notice], now)
    return ids[0] if ids else None


# --- retention -------------------------------------------------------------------------------

PURGE_BATCH = 5000
PURGE_INTERVAL_S = 600.0
# Notifications are deleted from the old end of the primary key: ids follow the insert order
# (and so `created_at`, up to a transaction's length), so the oldest rows whose push is done
# are the first ids that are not pending. A pass reads the batch it deletes, the few pushes
# still pending among the oldest rows (never deleted before they are sent or given up), and
# at most one batch of rows not old enough yet (the last pass of a backlog); an idle pass
# reads one row (`_OLDEST_DONE`). SKIP LOCKED: replicas purging at once take disjoint rows,
# and a row someone holds (a push claim, a mark-read) is left for the next pass.
_OLDEST_DONE = """
SELECT created_at FROM notification WHERE push_state <> 'pending' ORDER BY id LIMIT 1
"""
_PURGE = """
DELETE FROM notification WHERE id IN (
    SELECT id FROM notification
    WHERE id IN (SELECT id FROM notification WHERE push_state <> 'pending' ORDER BY id LIMIT $2)
      AND created_at < $1
    FOR UPDATE SKIP LOCKED)
"""


async def purge_expired(ctx: WalletContext, limit: int = PURGE_BATCH) -> int:
    """Delete up to `limit` notifications older than the retention
    (`notification_retention_days`) whose push was sent or given up; return how many. A
    worker pass: it runs again at once while it finds work."""
    cutoff = ctx.clock.now() - dt.timedelta(days=ctx.notifications.notification_retention_days)
    async with ctx.pool.acquire() as conn:
        oldest: dt.datetime | None = await conn.fetchval(_OLDEST_DONE)
        if oldest is None or oldest >= cutoff:
            return 0
        status: str = await conn.execute(_PURGE, cutoff, limit)
    return int(status.split()[-1])


# --- reading ---------------------------------------------------------------------------------

COLUMNS = """
id, kind, created_at, read_at, amount_fen, counterpart_name_masked, counterpart_province,
deadline, refs, detail
"""
_PAGE = f"""
SELECT {COLUMNS} FROM notification
WHERE person_id = $1 AND id < $2 AND ($3 OR read_at IS NULL)
ORDER BY id DESC LIMIT $4
"""
_AFTER = f"SELECT {COLUMNS} FROM notification WHERE person_id = $1 AND id > $2 ORDER BY id LIMIT $3"
_UNREAD = "SELECT count(*) FROM notification WHERE person_id = $1 AND read_at IS NULL"
_MARK_READ = """
UPDATE notification SET read_at = $3
WHERE person_id = $1 AND id = ANY($2::bigint[]) AND read_at IS NULL
"""
_MARK_ALL_READ = """
UPDATE notification SET read_at = $3 WHERE person_id = $1 AND id <= $2 AND read_at IS NULL
"""
_OWNERS = "SELECT id FROM notification WHERE person_id = $1 AND id = ANY($2::bigint[])"
# The last id drawn, from the identity's sequence rather than the rows: the retention purge
# may have deleted the newest rows of a quiet node, and their ids were issued all the same.
_NEWEST = """
SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('notification', 'id')::regclass), 0)
"""
_NEWEST_OF = "SELECT coalesce(max(id), 0) FROM notification WHERE person_id = $1"
ID_MAX = 2**63 - 1


def view_of(row: asyncpg.Record) -> NotificationView:
    return NotificationView(
        id=row["id"],
        kind=row["kind"],
        created_at=row["created_at"],
        read=row["read_at"] is not None,
        amount_fen=row["amount_fen"],
        counterpart_name_masked=row["counterpart_name_masked"],
        counterpart_province=row["counterpart_province"],
        deadline=row["deadline"],
        refs=msgspec.json.decode(row["refs"]),
        detail=msgspec.json.decode(row["detail"]),
    )


async def page(
    pool: asyncpg.Pool,
    person_id: int,
    *,
    before: int | None,
    limit: int,
    unread_only: bool = False,
) -> NotificationPage:
    """The person's notifications older than `before` (all if None), newest first; one
    more row than asked is read to know whether another page follows."""
    limit = min(limit, PAGE_MAX)
    async with pool.acquire() as conn:
        rows = await conn.fetch(_PAGE, person_id, before or ID_MAX, not unread_only, limit + 1)
        unread = await conn.fetchval(_UNREAD, person_id)
    items = [view_of(r) for r in rows[:limit]]
    more = len(rows) > limit
    return NotificationPage(
        items=items, unread_count=unread, next_before=items[-1].id if more else None
    )


async def after(
    pool: asyncpg.Pool, person_id: int, cursor: int, limit: int
) -> list[NotificationView]:
    """The person's notifications after `cursor`, oldest first (the event stream)."""
    return [view_of(r) for r in await pool.fetch(_AFTER, person_id, cursor, limit)]


async def newest_id(pool: asyncpg.Pool) -> int:
    """The highest notification id this node ever drew (0 if none): a `Last-Event-ID` above
    it was never issued here."""
    newest: int = await pool.fetchval(_NEWEST)
    return newest


async def newest_of(pool: asyncpg.Pool, person_id: int) -> int:
    """The person's newest notification id (0 if none): where a new stream starts."""
    newest: int = await pool.fetchval(_NEWEST_OF, person_id)
    return newest


async def mark_read(
    pool: asyncpg.Pool,
    person_id: int,
    now: dt.datetime,
    *,
    ids: Sequence[int] = (),
    up_to: int | None = None,
) -> MarkedRead:
    """Mark the person's notifications read: these `ids`, or every one up to `up_to`.

    An id that is not the person's own is refused as not found (whether it exists elsewhere
    is nobody else's business), and then nothing is marked.
    """
    async with pool.acquire() as conn, conn.transaction():
        if ids:
            owned = {r["id"] for r in await conn.fetch(_OWNERS, person_id, list(ids))}
            missing = sorted(set(ids) - owned)
            if missing:
                raise WalletError(
                    ErrorCode.NOT_FOUND, f"no notification {missing[0]} of yours", ids=missing
                )
            status = await conn.execute(_MARK_READ, person_id, list(ids), now)
        else:
            assert up_to is not None
            status = await conn.execute(_MARK_ALL_READ, person_id, up_to, now)
        unread = await conn.fetchval(_UNREAD, person_id)
    return MarkedRead(marked=int(status.split()[-1]), unread_count=unread)
