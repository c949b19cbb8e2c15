"""`transport.apply_in_one_transaction`: a batch's messages in one transaction, one commit.

Each message runs in a savepoint with the batch's connection as its pool; one that fails
(raises, swallows a database error, or waits too long for a lock) is rolled back alone and
applied again by itself after the commit, with the later messages about the same thing.
Batches below 32 messages are applied message by message (the tests lower that bound).
Real PostgreSQL: each row records the id of the transaction that wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from tests.wallet.service_context import wallet_context
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender
from wallet.plt.transport import Apply, apply_in_one_transaction

# `x`: the top transaction's id (a savepoint's rows have their own xmin, not this).
_PROBE = """
CREATE TABLE batch_probe (
    key text NOT NULL, n int NOT NULL, how text NOT NULL,
    x bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint)
"""
_INSERT = "INSERT INTO batch_probe (key, n, how) VALUES ($1, $2, $3)"


@pytest.fixture
async def ctx(
    database_url: str, db: asyncpg.Connection, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    await db.execute(_PROBE)
    async with wallet_context(database_url, clock, otp) as context:
        yield context


def _step(
    ctx: WalletContext,
    key: str,
    n: int,
    fail: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> Apply:
    """Writes (key, n, 'batch') in the batch, or (key, n, 'alone') on its own; `fail` runs
    after the batch write (and may raise)."""

    async def together(shared: WalletContext) -> None:
        async with shared.pool.acquire() as conn, conn.transaction():
            await conn.execute(_INSERT, key, n, "batch")
            if fail is not None:
                await fail(conn)

    async def alone() -> None:
        await ctx.pool.execute(_INSERT, key, n, "alone")

    return Apply(key, together, alone)


async def _rows(db: asyncpg.Connection) -> list[tuple[str, int, str, int]]:
    rows = await db.fetch("SELECT key, n, how, x FROM batch_probe")
    return sorted((r["key"], r["n"], r["how"], r["x"]) for r in rows)


async def _raise(_: asyncpg.Connection) -> None:
    raise RuntimeError("handler failed")


async def _swallow(conn: asyncpg.Connection) -> None:
    # A handler bug: the transaction is aborted, and nobody raised.
    with contextlib.suppress(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1 / 0")


async def test_messages_commit_together_and_a_failing_one_is_applied_alone_with_its_key(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    steps = [
        _step(ctx, "c", 1),
        _step(ctx, "b", 1, _raise),
        _step(ctx, "a", 1),
        _step(ctx, "b", 2),  # fine in itself, but after b1: applied alone, after it
        _step(ctx, "d", 1, _swallow),
    ]
    await apply_in_one_transaction(ctx, steps, together_from=2)

    rows = await _rows(db)
    assert [r[:3] for r in rows] == [
        ("a", 1, "batch"),
        ("b", 1, "alone"),
        ("b", 2, "alone"),
        ("c", 1, "batch"),
        ("d", 1, "alone"),
    ]
    together = {r[3] for r in rows if r[2] == "batch"}
    assert len(together) == 1  # a1 and c1: one transaction
    alone = [r[3] for r in rows if r[2] == "alone"]
    assert len(set(alone)) == 3 and together.isdisjoint(alone)
    b_rows = [r for r in rows if r[0] == "b"]
    assert b_rows[0][3] < b_rows[1][3]  # b1 committed before b2


async def test_a_message_waiting_on_a_lock_is_applied_alone_and_its_neighbours_commit(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE batch_lock (id int PRIMARY KEY)")
    await db.execute("INSERT INTO batch_lock VALUES (1)")

    async def lock_row(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT id FROM batch_lock WHERE id = 1 FOR UPDATE")

    held = db.transaction()
    await held.start()
    await db.execute("SELECT id FROM batch_lock WHERE id = 1 FOR UPDATE")
    try:
        await apply_in_one_transaction(
            ctx,
            [_step(ctx, "a", 1), _step(ctx, "b", 1, lock_row), _step(ctx, "c", 1)],
            together_from=2,
        )
    finally:
        await held.rollback()

    rows = await _rows(db)
    assert [r[:3] for r in rows] == [("a", 1, "batch"), ("b", 1, "alone"), ("c", 1, "batch")]
    assert rows[0][3] == rows[2][3] != rows[1][3]


async def test_a_small_batch_is_applied_message_by_message_as_before(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    # Below MESSAGES_PER_TRANSACTION (32): each message in its own transactions.
    await apply_in_one_transaction(ctx, [_step(ctx, k, 1) for k in "abc"])
    rows = await _rows(db)
    assert [r[:3] for r in rows] == [("a", 1, "alone"), ("b", 1, "alone"), ("c", 1, "alone")]
    assert len({r[3] for r in rows}) == 3


async def test_a_large_batch_is_split_over_parallel_transactions_one_key_in_one(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    # 70 messages (two per key): more than 32, so BATCH_TRANSACTIONS_MAX = 2 transactions,
    # each key's pair in one.
    steps = [_step(ctx, f"k{i:02d}", n) for n in (1, 2) for i in range(35)]
    await apply_in_one_transaction(ctx, steps)

    rows = await _rows(db)
    assert len(rows) == 70 and {r[2] for r in rows} == {"batch"}
    assert len({r[3] for r in rows}) == 2
    by_key: dict[str, set[int]] = {}
    for key, _, _, x in rows:
        by_key.setdefault(key, set()).add(x)
    assert all(len(xs) == 1 for xs in by_key.values())
