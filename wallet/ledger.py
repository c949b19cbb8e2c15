"""Double-entry ledger operations over the `account` and `ledger_transfer` tables.

The invariants live in SQL (migrations/0001_ledger.sql); this module names the movements.
Every function takes a connection that is already inside the caller's transaction, so a
movement and the business row that caused it commit together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import asyncpg
import msgspec

from wallet.errors import ErrorCode, WalletError

# The largest single amount the node accepts: 10 billion yuan. Far below BIGINT, so sums of
# many amounts cannot overflow either.
MAX_AMOUNT_FEN = 10**12

AccountKind = Literal[
    "personal", "funding", "institution", "quota", "due_to", "due_from", "payable", "receivable"
]
Phase = Literal["single", "pending", "post", "void"]


class Balance(msgspec.Struct, frozen=True):
    account_id: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int

    @property
    def available_fen(self) -> int:
        """What the owner can spend now: pessimistic about pending debits."""
        return self.credits_posted - self.debits_posted - self.debits_pending

    @property
    def posted_fen(self) -> int:
        return self.credits_posted - self.debits_posted


_INSERT_ACCOUNT = """
INSERT INTO account (kind, code, debits_must_not_exceed_credits) VALUES ($1, $2, $3)
RETURNING id
"""
_INSERT_TRANSFER = """
INSERT INTO ledger_transfer
    (debit_account_id, credit_account_id, amount_fen, phase, pending_id, purpose,
     settlement_id, refund_id, credit_batch_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id
"""
_SELECT_BALANCE = """
SELECT id AS account_id, debits_pending, debits_posted, credits_pending, credits_posted
FROM account WHERE id = $1
"""
_LOCK_ACCOUNTS = "SELECT id FROM account WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
_LOCK_BALANCES = """
SELECT id AS account_id, debits_pending, debits_posted, credits_pending, credits_posted
FROM account WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""


async def open_account(conn: asyncpg.Connection, kind: AccountKind, code: str) -> int:
    """Create an account; customer-like accounts (all but funding and clearing) never overdraw."""
    no_overdraft = kind in ("personal", "institution", "quota")
    account_id: int = await conn.fetchval(_INSERT_ACCOUNT, kind, code, no_overdraft)
    return account_id


async def account_id_by_code(conn: asyncpg.Connection, code: str) -> int | None:
    value: int | None = await conn.fetchval("SELECT id FROM account WHERE code = $1", code)
    return value


async def lock_accounts(conn: asyncpg.Connection, account_ids: Iterable[int]) -> None:
    """Lock accounts in id order: every multi-account transaction does this first, so two
    transactions over the same accounts always queue instead of deadlocking."""
    await conn.execute(_LOCK_ACCOUNTS, sorted(set(account_ids)))


async def lock_balances(conn: asyncpg.Connection, account_ids: Iterable[int]) -> dict[int, Balance]:
    """`lock_accounts`, returning each account's balance as it stands under the lock (one round
    trip instead of a lock and a read)."""
    rows = await conn.fetch(_LOCK_BALANCES, sorted(set(account_ids)))
    return {r["account_id"]: Balance(**dict(r)) for r in rows}


async def balance(conn: asyncpg.Connection, account_id: int) -> Balance:
    row = await conn.fetchrow(_SELECT_BALANCE, account_id)
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, f"account {account_id} does not exist")
    return Balance(**dict(row))


async def balances(conn: asyncpg.Connection, account_ids: Sequence[int]) -> dict[int, Balance]:
    rows = await conn.fetch(
        "SELECT id AS account_id, debits_pending, debits_posted, credits_pending, credits_posted "
        "FROM account WHERE id = ANY($1::bigint[])",
        list(account_ids),
    )
    return {r["account_id"]: Balance(**dict(r)) for r in rows}


async def transfer(
    conn: asyncpg.Connection,
    *,
    debit_account_id: int,
    credit_account_id: int,
    amount_fen: int,
    purpose: str,
    phase: Phase = "single",
    pending_id: int | None = None,
    settlement_id: int | None = None,
    refund_id: int | None = None,
    credit_batch_id: str | None = None,
) -> int:
    """Record one movement. Raises `insufficient_funds` if the debit account would overdraw."""
    if not 0 < amount_fen <= MAX_AMOUNT_FEN:
        raise WalletError(ErrorCode.AMOUNT_INVALID, f"amount {amount_fen} fen is out of range")
    try:
        transfer_id: int = await conn.fetchval(
            _INSERT_TRANSFER,
            debit_account_id,
            credit_account_id,
            amount_fen,
            phase,
            pending_id,
            purpose,
            settlement_id,
            refund_id,
            credit_batch_id,
        )
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name == "account_no_overdraft":
            raise WalletError(
                ErrorCode.INSUFFICIENT_FUNDS, "the account does not have enough available"
            ) from exc
        raise
    return transfer_id


async def hold(
    conn: asyncpg.Connection,
    *,
    debit_account_id: int,
    credit_account_id: int,
    amount_fen: int,
    purpose: str,
) -> int:
    """Reserve `amount_fen`: the debit account can no longer spend it (a pending transfer)."""
    return await transfer(
        conn,
        debit_account_id=debit_account_id,
        credit_account_id=credit_account_id,
        amount_fen=amount_fen,
        purpose=purpose,
        phase="pending",
    )


# Post or void a hold in one round trip: the movement copies the hold's accounts (and its
# amount unless a part is given); no row when the hold does not exist.
_RESOLVE_HOLD = """
INSERT INTO ledger_transfer
    (debit_account_id, credit_account_id, amount_fen, phase, pending_id, purpose)
SELECT debit_account_id, credit_account_id, coalesce($2, amount_fen), $3, id, $4
FROM ledger_transfer WHERE id = $1
RETURNING id
"""


async def _resolve(
    conn: asyncpg.Connection, pending_id: int, phase: Phase, purpose: str, amount_fen: int | None
) -> int:
    if amount_fen is not None and not 0 < amount_fen <= MAX_AMOUNT_FEN:
        raise WalletError(ErrorCode.AMOUNT_INVALID, f"amount {amount_fen} fen is out of range")
    try:
        transfer_id: int | None = await conn.fetchval(
            _RESOLVE_HOLD, pending_id, amount_fen, phase, purpose
        )
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name == "account_no_overdraft":
            raise WalletError(
                ErrorCode.INSUFFICIENT_FUNDS, "the account does not have enough available"
            ) from exc
        raise
    except asyncpg.UniqueViolationError as exc:
        raise WalletError(
            ErrorCode.STATE_CONFLICT, f"hold {pending_id} was already posted or voided"
        ) from exc
    if transfer_id is None:
        raise WalletError(ErrorCode.NOT_FOUND, f"hold {pending_id} does not exist")
    return transfer_id


_RESOLVE_HOLDS = """
INSERT INTO ledger_transfer
    (debit_account_id, credit_account_id, amount_fen, phase, pending_id, purpose)
SELECT debit_account_id, credit_account_id, amount_fen, $2, id, $3
FROM ledger_transfer WHERE id = ANY($1::bigint[])
RETURNING pending_id
"""


async def void_holds(conn: asyncpg.Connection, pending_ids: Sequence[int], purpose: str) -> None:
    """`void_hold` for many holds in one statement (a worker's batch); the same errors."""
    try:
        done = await conn.fetch(_RESOLVE_HOLDS, list(pending_ids), "void", purpose)
    except asyncpg.UniqueViolationError as exc:
        raise WalletError(
            ErrorCode.STATE_CONFLICT, "a hold of the batch was already posted or voided"
        ) from exc
    missing = set(pending_ids) - {r["pending_id"] for r in done}
    if missing:
        raise WalletError(ErrorCode.NOT_FOUND, f"holds {sorted(missing)} do not exist")


async def post_hold(
    conn: asyncpg.Connection, pending_id: int, purpose: str, amount_fen: int | None = None
) -> int:
    """Turn a hold into a posted movement (all of it, or `amount_fen` of it)."""
    return await _resolve(conn, pending_id, "post", purpose, amount_fen)


async def void_hold(conn: asyncpg.Connection, pending_id: int, purpose: str) -> int:
    """Release a hold: the debit account can spend the amount again."""
    return await _resolve(conn, pending_id, "void", purpose, None)


class BooksCheck(msgspec.Struct, frozen=True):
    """What a bank-style checker reads off one province's ledger."""

    accounts: int
    transfers: int
    total_debits_posted: int
    total_credits_posted: int
    total_debits_pending: int
    total_credits_pending: int
    overdrawn_accounts: list[int]
    accounts_not_matching_transfers: list[int]

    @property
    def balanced(self) -> bool:
        return (
            self.total_debits_posted == self.total_credits_posted
            and self.total_debits_pending == self.total_credits_pending
            and not self.overdrawn_accounts
            and not self.accounts_not_matching_transfers
        )


_CHECK_TOTALS = """
SELECT count(*) AS accounts,
       coalesce(sum(debits_posted), 0)::bigint  AS total_debits_posted,
       coalesce(sum(credits_posted), 0)::bigint AS total_credits_posted,
       coalesce(sum(debits_pending), 0)::bigint AS total_debits_pending,
       coalesce(sum(credits_pending), 0)::bigint AS total_credits_pending
FROM account
"""
_CHECK_OVERDRAWN = """
SELECT id FROM account
WHERE debits_must_not_exceed_credits AND debits_posted + debits_pending > credits_posted
ORDER BY id
"""
# Recompute every account's columns from the immutable transfers and compare.
_CHECK_RECOMPUTE = """
WITH legs AS (
    SELECT t.debit_account_id AS account_id,
           CASE WHEN t.phase IN ('single', 'post') THEN t.amount_fen ELSE 0 END AS d_posted,
           CASE t.phase WHEN 'pending' THEN t.amount_fen
                        WHEN 'post' THEN -h.amount_fen WHEN 'void' THEN -h.amount_fen ELSE 0 END AS d_pending,
           0::bigint AS c_posted, 0::bigint AS c_pending
    FROM ledger_transfer t LEFT JOIN ledger_transfer h ON h.id = t.pending_id
    UNION ALL
    SELECT t.credit_account_id, 0, 0,
           CASE WHEN t.phase IN ('single', 'post') THEN t.amount_fen ELSE 0 END,
           CASE t.phase WHEN 'pending' THEN t.amount_fen
                        WHEN 'post' THEN -h.amount_fen WHEN 'void' THEN -h.amount_fen ELSE 0 END
    FROM ledger_transfer t LEFT JOIN ledger_transfer h ON h.id = t.pending_id
), sums AS (
    SELECT account_id, sum(d_posted) AS dp, sum(d_pending) AS dq, sum(c_posted) AS cp, sum(c_pending) AS cq
    FROM legs GROUP BY account_id
)
SELECT a.id FROM account a LEFT JOIN sums s ON s.account_id = a.id
WHERE a.debits_posted <> coalesce(s.dp, 0) OR a.debits_pending <> coalesce(s.dq, 0)
   OR a.credits_posted <> coalesce(s.cp, 0) OR a.credits_pending <> coalesce(s.cq, 0)
ORDER BY a.id
"""


async def check_books(conn: asyncpg.Connection) -> BooksCheck:
    """Verify the whole ledger: balanced, nothing overdrawn, columns equal their transfers."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        totals = await conn.fetchrow(_CHECK_TOTALS)
        transfers = await conn.fetchval("SELECT count(*) FROM ledger_transfer")
        overdrawn = [r["id"] for r in await conn.fetch(_CHECK_OVERDRAWN)]
        mismatched = [r["id"] for r in await conn.fetch(_CHECK_RECOMPUTE)]
    return BooksCheck(
        transfers=transfers,
        overdrawn_accounts=overdrawn,
        accounts_not_matching_transfers=mismatched,
        **dict(totals),
    )
