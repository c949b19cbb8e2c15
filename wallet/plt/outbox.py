"""The transactional outbox: enqueue a message in the same transaction as the state change.

Features call `enqueue` and `stop` with the connection of their own transaction; the sender
worker (`wallet.plt.transport`) claims due rows, seals them with the node's current key and
sends them in batches per peer. Nothing here does I/O beyond that connection. Enqueueing
wakes the senders when the transaction commits (PostgreSQL NOTIFY, see wallet.plt.wakeup).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import asyncpg

from protocol.messages import MessageType

# The NOTIFY is part of the enqueueing transaction: it reaches the senders (wallet.plt.wakeup)
# when the row commits, never before, and never for a row that was rolled back. One round trip.
_ENQUEUE = """
WITH queued AS (
    INSERT INTO plt_outbox
        (to_node, typ, dedup_key, body, created_at, next_attempt_at, give_up_at)
    VALUES ($1, $2, $3, $4, $5, $5, $6)
    ON CONFLICT (to_node, typ, dedup_key) DO NOTHING
    RETURNING id
)
SELECT id, pg_notify('plt_outbox', '') FROM queued
"""
_STOP = """
UPDATE plt_outbox SET done_at = $4
WHERE to_node = $1 AND typ = $2 AND dedup_key = $3 AND done_at IS NULL
RETURNING id
"""


async def enqueue(
    conn: asyncpg.Connection,
    *,
    to_node: str,
    typ: MessageType,
    key: str,
    body: bytes,
    now: dt.datetime,
    give_up_at: dt.datetime | None = None,
) -> bool:
    """Queue `body` (canonical bytes) for `to_node`; False if this message was already queued.

    The same (peer, typ, key) is queued once: executing an effect twice sends once.
    """
    row_id = await conn.fetchval(_ENQUEUE, to_node, typ.value, key, body, now, give_up_at)
    return row_id is not None


async def stop(
    conn: asyncpg.Connection, *, to_node: str, typ: MessageType, key: str, now: dt.datetime
) -> bool:
    """Stop retrying a queued message (its answer arrived); False if nothing was pending."""
    row_id = await conn.fetchval(_STOP, to_node, typ.value, key, now)
    return row_id is not None


# A worker's batch (the 06:00 sweep: a thousand DECISIONs) as one statement each, not a
# thousand executions: same rows, same conflicts ignored, one notification.
_ENQUEUE_MANY = """
WITH queued AS (
    INSERT INTO plt_outbox (to_node, typ, dedup_key, body, created_at, next_attempt_at)
    SELECT m.to_node, m.typ, m.dedup_key, m.body, $5, $5
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY
        AS m(to_node, typ, dedup_key, body, n)
    ORDER BY m.n
    ON CONFLICT (to_node, typ, dedup_key) DO NOTHING
    RETURNING id
)
SELECT pg_notify('plt_outbox', '') FROM (SELECT 1 FROM queued LIMIT 1) AS any_queued
"""
_STOP_MANY = """
UPDATE plt_outbox AS o SET done_at = $4
FROM unnest($1::text[], $2::text[], $3::text[]) AS s(to_node, typ, dedup_key)
WHERE o.to_node = s.to_node AND o.typ = s.typ AND o.dedup_key = s.dedup_key
  AND o.done_at IS NULL
"""


async def enqueue_many(
    conn: asyncpg.Connection,
    messages: Sequence[tuple[str, MessageType, str, bytes]],
    *,
    now: dt.datetime,
) -> None:
    """`enqueue` for (to_node, typ, key, body) messages at once, in one statement."""
    await conn.execute(
        _ENQUEUE_MANY,
        [to_node for to_node, _, _, _ in messages],
        [typ.value for _, typ, _, _ in messages],
        [key for _, _, key, _ in messages],
        [body for _, _, _, body in messages],
        now,
    )


async def stop_many(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, MessageType, str]], *, now: dt.datetime
) -> None:
    """`stop` for (to_node, typ, key) rows at once, in one statement."""
    await conn.execute(
        _STOP_MANY,
        [to_node for to_node, _, _ in rows],
        [typ.value for _, typ, _ in rows],
        [key for _, _, key in rows],
        now,
    )
