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


async def enqueue_many(
    conn: asyncpg.Connection,
    messages: Sequence[tuple[str, MessageType, str, bytes]],
    *,
    now: dt.datetime,
) -> None:
    """`enqueue` for (to_node, typ, key, body) messages at once, pipelined (a worker's batch)."""
    await conn.executemany(
        _ENQUEUE,
        [(to_node, typ.value, key, body, now, None) for to_node, typ, key, body in messages],
    )


async def stop_many(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, MessageType, str]], *, now: dt.datetime
) -> None:
    """`stop` for (to_node, typ, key) rows at once, pipelined."""
    await conn.executemany(_STOP, [(to_node, typ.value, key, now) for to_node, typ, key in rows])
