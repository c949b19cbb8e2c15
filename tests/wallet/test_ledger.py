"""The ledger's invariants, held by SQL (migrations/0001_ledger.sql) and named by wallet.ledger."""

from __future__ import annotations

import asyncpg
import pytest

from wallet import ledger
from wallet.errors import ErrorCode, WalletError


async def _funded_personal(db: asyncpg.Connection, code: str, amount_fen: int) -> int:
    funding = await ledger.account_id_by_code(db, "funding")
    assert funding is not None
    account = await ledger.open_account(db, "personal", code)
    await ledger.transfer(
        db,
        debit_account_id=funding,
        credit_account_id=account,
        amount_fen=amount_fen,
        purpose="monthly_credit",
    )
    return account


async def _columns(db: asyncpg.Connection, account_id: int) -> tuple[int, int, int, int]:
    b = await ledger.balance(db, account_id)
    return (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)


async def test_transfers_cannot_be_updated(db: asyncpg.Connection) -> None:
    await _funded_personal(db, "personal:a", 100)
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("UPDATE ledger_transfer SET amount_fen = 1")
    assert await db.fetchval("SELECT amount_fen FROM ledger_transfer") == 100


async def test_transfers_cannot_be_deleted(db: asyncpg.Connection) -> None:
    await _funded_personal(db, "personal:a", 100)
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("DELETE FROM ledger_transfer")
    assert await db.fetchval("SELECT count(*) FROM ledger_transfer") == 1


async def test_transfers_cannot_be_truncated(db: asyncpg.Connection) -> None:
    await _funded_personal(db, "personal:a", 100)
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("TRUNCATE ledger_transfer CASCADE")
    assert await db.fetchval("SELECT count(*) FROM ledger_transfer") == 1


async def test_overdraft_of_a_personal_account_is_refused_and_changes_nothing(
    db: asyncpg.Connection,
) -> None:
    payer = await _funded_personal(db, "personal:a", 100)
    payee = await ledger.open_account(db, "institution", "institution:x")
    with pytest.raises(WalletError) as caught:
        await ledger.transfer(
            db,
            debit_account_id=payer,
            credit_account_id=payee,
            amount_fen=101,
            purpose="settlement",
        )
    assert caught.value.code is ErrorCode.INSUFFICIENT_FUNDS
    assert (await ledger.balance(db, payer)).available_fen == 100
    assert await _columns(db, payee) == (0, 0, 0, 0)


async def test_a_hold_freezes_and_its_post_pays(db: asyncpg.Connection) -> None:
    payer = await _funded_personal(db, "personal:a", 1_000)
    payee = await ledger.open_account(db, "institution", "institution:x")
    hold_id = await ledger.hold(
        db, debit_account_id=payer, credit_account_id=payee, amount_fen=600, purpose="grant"
    )
    frozen = await ledger.balance(db, payer)
    assert (frozen.available_fen, frozen.posted_fen, frozen.debits_pending) == (400, 1_000, 600)
    await ledger.post_hold(db, hold_id, "grant", amount_fen=250)
    assert await _columns(db, payer) == (0, 250, 0, 1_000)
    assert await _columns(db, payee) == (0, 0, 0, 250)


async def test_a_voided_hold_releases_the_whole_amount(db: asyncpg.Connection) -> None:
    payer = await _funded_personal(db, "personal:a", 1_000)
    payee = await ledger.open_account(db, "institution", "institution:x")
    hold_id = await ledger.hold(
        db, debit_account_id=payer, credit_account_id=payee, amount_fen=600, purpose="grant"
    )
    await ledger.void_hold(db, hold_id, "grant")
    assert (await ledger.balance(db, payer)).available_fen == 1_000
    assert await _columns(db, payer) == (0, 0, 0, 1_000)
    assert await _columns(db, payee) == (0, 0, 0, 0)


async def test_a_hold_is_resolved_at_most_once(db: asyncpg.Connection) -> None:
    payer = await _funded_personal(db, "personal:a", 1_000)
    payee = await ledger.open_account(db, "institution", "institution:x")
    hold_id = await ledger.hold(
        db, debit_account_id=payer, credit_account_id=payee, amount_fen=600, purpose="grant"
    )
    await ledger.post_hold(db, hold_id, "grant")
    with pytest.raises(WalletError) as caught:
        await ledger.void_hold(db, hold_id, "grant")
    assert caught.value.code is ErrorCode.STATE_CONFLICT
    assert await _columns(db, payer) == (0, 600, 0, 1_000)


async def test_a_post_beyond_the_amount_held_is_refused(db: asyncpg.Connection) -> None:
    payer = await _funded_personal(db, "personal:a", 1_000)
    payee = await ledger.open_account(db, "institution", "institution:x")
    hold_id = await ledger.hold(
        db, debit_account_id=payer, credit_account_id=payee, amount_fen=600, purpose="grant"
    )
    with pytest.raises(asyncpg.CheckViolationError, match="exceeds the 600 fen held"):
        await ledger.post_hold(db, hold_id, "grant", amount_fen=601)
    assert await _columns(db, payer) == (600, 0, 0, 1_000)


async def test_books_balance_after_credits_holds_posts_and_voids(db: asyncpg.Connection) -> None:
    a = await _funded_personal(db, "personal:a", 5_000)
    b = await _funded_personal(db, "personal:b", 3_000)
    shop = await ledger.open_account(db, "institution", "institution:x")
    await ledger.transfer(
        db, debit_account_id=a, credit_account_id=shop, amount_fen=1_200, purpose="settlement"
    )
    posted = await ledger.hold(
        db, debit_account_id=b, credit_account_id=shop, amount_fen=900, purpose="grant"
    )
    await ledger.post_hold(db, posted, "grant", amount_fen=700)
    voided = await ledger.hold(
        db, debit_account_id=a, credit_account_id=shop, amount_fen=300, purpose="grant"
    )
    await ledger.void_hold(db, voided, "grant")
    await ledger.hold(
        db, debit_account_id=a, credit_account_id=shop, amount_fen=100, purpose="grant"
    )

    books = await ledger.check_books(db)

    assert books.balanced
    assert books.transfers == 8
    assert books.total_debits_posted == books.total_credits_posted == 5_000 + 3_000 + 1_200 + 700
    assert books.total_debits_pending == books.total_credits_pending == 100
    assert (await ledger.balance(db, a)).available_fen == 5_000 - 1_200 - 100
