"""`outbox.enqueue_many` and `outbox.stop_many`: a sweeper's batch as one statement each.

Same rows as `enqueue`/`stop` one at a time: an already queued (peer, typ, key) is kept as it
was, only open rows are stopped, and the queued rows keep the batch's order.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from protocol.messages import MessageType
from tests.conftest import START
from wallet.plt import outbox

LATER = START + dt.timedelta(minutes=1)
_ROWS = "SELECT id, to_node, typ, dedup_key, body, created_at, done_at FROM plt_outbox ORDER BY id"


async def test_a_batch_is_queued_and_stopped_like_one_at_a_time(db: asyncpg.Connection) -> None:
    prepare, decision = MessageType.PREPARE, MessageType.DECISION
    async with db.transaction():
        assert await outbox.enqueue(
            db, to_node="prov-31", typ=decision, key="t1", body=b"old", now=START
        )
        await outbox.enqueue_many(
            db,
            [
                ("prov-31", decision, "t2", b"b2"),
                ("prov-31", decision, "t1", b"new"),  # already queued: kept as it was
                ("prov-44", decision, "t3", b"b3"),
            ],
            now=LATER,
        )
        await outbox.enqueue_many(db, [], now=LATER)  # nothing: no rows, no error
    rows = [tuple(r)[1:6] for r in await db.fetch(_ROWS)]
    assert rows == [
        ("prov-31", "DECISION", "t1", b"old", START),
        ("prov-31", "DECISION", "t2", b"b2", LATER),
        ("prov-44", "DECISION", "t3", b"b3", LATER),
    ]

    await outbox.stop_many(
        db,
        [("prov-31", decision, "t1"), ("prov-31", prepare, "t2"), ("prov-44", decision, "t3")],
        now=LATER,
    )
    await outbox.stop_many(db, [("prov-31", decision, "t1")], now=LATER + LATER.resolution)
    done = {r["dedup_key"]: r["done_at"] for r in await db.fetch(_ROWS)}
    assert done == {"t1": LATER, "t2": None, "t3": LATER}  # t2's PREPARE was never queued
