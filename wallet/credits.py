"""Monthly credits (个人账户划入): the province fund pays into employees' personal accounts.

A batch is one transaction: every row is checked first and a single bad row refuses the
whole batch, naming its line. The batch id is an idempotency key: the same batch again is
answered from the stored result, another batch under the same id is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import asyncpg
import msgspec
import structlog

from wallet import audit, ledger, notices
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import normalize_id_number
from wallet.operator_files import RowFile, read_rows, row_error
from wallet.roster import IdNumberText

log = structlog.get_logger("wallet.credits")

BATCH_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MONTH_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
# One batch is one transaction; larger payrolls go in several batches.
MAX_BATCH_ROWS = 200_000
PURPOSE = "monthly_credit"
# The province fund is the account `funding` (migration 0001) and its sub-accounts
# `funding:1`, `funding:2`, ... (kind funding). Updating one row again and again inside one
# transaction makes PostgreSQL walk every version made so far, so a batch that debited one
# account per row would cost O(rows²): 10k rows took 5.7 s, against 1 s spread like this.
FUNDING_ACCOUNT_CODE = "funding"
ROWS_PER_FUNDING_ACCOUNT = 200

AmountFen = Annotated[int, msgspec.Meta(gt=0, le=ledger.MAX_AMOUNT_FEN)]


class CreditRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id_number: IdNumberText
    amount_fen: AmountFen


class BatchResult(msgspec.Struct, frozen=True):
    batch_id: str
    month: str
    row_count: int
    total_fen: int
    # False when this answers a replay of a batch already posted.
    created: bool


class _BatchContent(msgspec.Struct, frozen=True):
    """What the request hash covers: equal content, equal hash."""

    month: str
    credits: list[CreditRow]


_CLAIM = """
INSERT INTO credit_batch (batch_id, request_hash, month, row_count, total_fen, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (batch_id) DO NOTHING
RETURNING batch_id
"""
_STORED = "SELECT request_hash, month, row_count, total_fen FROM credit_batch WHERE batch_id = $1"
_ACCOUNTS = """
SELECT p.id AS person_id, p.scheme, p.personal_account_id
FROM unnest($1::text[]) WITH ORDINALITY AS u(id_number, ord)
LEFT JOIN insured_person p ON p.id_number = u.id_number
ORDER BY u.ord
"""
# The fund's accounts never overdraw-check: their debits exceed their credits by design.
_OPEN_FUNDING = """
INSERT INTO account (kind, code, debits_must_not_exceed_credits)
SELECT 'funding', u.code, false FROM unnest($1::text[]) AS u(code)
ON CONFLICT (code) DO NOTHING
"""
_FUNDING_IDS = "SELECT code, id FROM account WHERE kind = 'funding' AND code = ANY($1::text[])"
# One statement for the whole batch; the trigger applies each transfer to its two accounts.
_INSERT_CREDITS = """
INSERT INTO ledger_transfer
    (debit_account_id, credit_account_id, amount_fen, phase, purpose, credit_batch_id)
SELECT u.funding_id, u.account_id, u.amount_fen, 'single', $1, $2
FROM unnest($3::bigint[], $4::bigint[], $5::bigint[])
     WITH ORDINALITY AS u(funding_id, account_id, amount_fen, ord)
ORDER BY u.ord
"""

_BATCH_ID = re.compile(BATCH_ID_PATTERN)
_MONTH = re.compile(MONTH_PATTERN)


def read_credit_file(path: Path) -> RowFile[CreditRow]:
    """Read and check a credit file (CSV `id_number,amount_fen`, or JSON `{"credits": [...]}`).

    Raises `roster_file_invalid` with the `line` of the first bad row. Pass the result's
    `lines` to `post_batch` so that refusals found there (unknown person) carry file lines.
    """
    found = read_rows(path, "credits", CreditRow)
    return RowFile(rows=validate_rows(found.rows, found.lines), lines=found.lines)


def parse_credit_file(path: Path) -> list[CreditRow]:
    """The checked rows of a credit file (see `read_credit_file`)."""
    return read_credit_file(path).rows


def validate_rows(rows: Sequence[CreditRow], lines: Sequence[int]) -> list[CreditRow]:
    """Rows with canonical ID numbers, or the first bad row's refusal (with its line)."""
    if not 1 <= len(rows) <= MAX_BATCH_ROWS:
        raise WalletError(ErrorCode.INVALID_REQUEST, f"a batch holds 1..{MAX_BATCH_ROWS} credits")
    seen: dict[str, int] = {}
    valid: list[CreditRow] = []
    for row, line in zip(rows, lines, strict=True):
        try:
            id_number = normalize_id_number(row.id_number)
        except WalletError as exc:
            raise row_error(line, exc.detail) from exc
        if not 0 < row.amount_fen <= ledger.MAX_AMOUNT_FEN:
            raise WalletError(
                ErrorCode.AMOUNT_INVALID,
                f"line {line}: the amount must be 1..{ledger.MAX_AMOUNT_FEN} fen",
                line=line,
            )
        if id_number in seen:
            raise row_error(line, f"the person already has a credit on line {seen[id_number]}")
        seen[id_number] = line
        valid.append(CreditRow(id_number=id_number, amount_fen=row.amount_fen))
    return valid


def _check_batch_key(batch_id: str, month: str) -> None:
    if not _BATCH_ID.match(batch_id):
        raise WalletError(ErrorCode.INVALID_REQUEST, f"a batch id matches {BATCH_ID_PATTERN}")
    if not _MONTH.match(month):
        raise WalletError(ErrorCode.INVALID_REQUEST, "the month is written YYYY-MM")


def request_hash(month: str, rows: Sequence[CreditRow]) -> bytes:
    content = _BatchContent(month=month, credits=list(rows))
    return hashlib.sha256(msgspec.json.encode(content)).digest()


async def post_batch(
    ctx: WalletContext,
    batch_id: str,
    month: str,
    rows: Sequence[CreditRow],
    *,
    lines: Sequence[int] | None = None,
    actor: str = "operator",
    request_id: str | None = None,
) -> BatchResult:
    """Credit every row's personal account from the funding account, all or nothing.

    A refused row names its `line` (`lines[i]` if given, else its 1-based position).
    """
    _check_batch_key(batch_id, month)
    positions = lines if lines is not None else range(1, len(rows) + 1)
    valid = validate_rows(rows, positions)
    digest = request_hash(month, valid)
    total_fen = sum(row.amount_fen for row in valid)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        # Claiming the id first makes a concurrent duplicate wait here, then see our row.
        claimed = await conn.fetchval(_CLAIM, batch_id, digest, month, len(valid), total_fen, now)
        if claimed is None:
            return await _replay(conn, batch_id, digest)
        accounts = await _personal_accounts(conn, valid, positions)
        funding = await _funding_accounts(conn, len(valid))
        await ledger.lock_accounts(conn, [*funding, *accounts])
        debits = [funding[i // ROWS_PER_FUNDING_ACCOUNT] for i in range(len(valid))]
        amounts = [row.amount_fen for row in valid]
        await conn.execute(_INSERT_CREDITS, PURPOSE, batch_id, debits, accounts, amounts)
        await audit.record(
            conn,
            at=now,
            actor=actor,
            action="credit_batch.post",
            subject=f"credit_batch:{batch_id}",
            request_id=request_id,
            month=month,
            row_count=len(valid),
            total_fen=total_fen,
        )
        await notices.credits_arrived(conn, batch_id, month, accounts, amounts, now)
    log.info("credit_batch_posted", batch_id=batch_id, rows=len(valid), total_fen=total_fen)
    return BatchResult(batch_id, month, len(valid), total_fen, created=True)


async def _replay(conn: asyncpg.Connection, batch_id: str, digest: bytes) -> BatchResult:
    stored = await conn.fetchrow(_STORED, batch_id)
    if stored["request_hash"] != digest:
        raise WalletError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            f"batch {batch_id} was already posted with other content",
        )
    return BatchResult(
        batch_id, stored["month"], stored["row_count"], stored["total_fen"], created=False
    )


def funding_codes(row_count: int) -> list[str]:
    """The fund's accounts a batch of `row_count` rows debits, `ROWS_PER_FUNDING_ACCOUNT` each."""
    count = -(-row_count // ROWS_PER_FUNDING_ACCOUNT)
    return [FUNDING_ACCOUNT_CODE] + [f"{FUNDING_ACCOUNT_CODE}:{i}" for i in range(1, count)]


async def _funding_accounts(conn: asyncpg.Connection, row_count: int) -> list[int]:
    """Ids of the fund's accounts for this batch, opening the sub-accounts not yet there."""
    codes = funding_codes(row_count)
    await conn.execute(_OPEN_FUNDING, codes[1:])
    ids = {r["code"]: r["id"] for r in await conn.fetch(_FUNDING_IDS, codes)}
    assert len(ids) == len(codes), "migration 0001 creates the funding account"
    return [ids[code] for code in codes]


async def _personal_accounts(
    conn: asyncpg.Connection, rows: list[CreditRow], lines: Sequence[int]
) -> list[int]:
    """Each row's personal account, or the first row naming no eligible person."""
    found = await conn.fetch(_ACCOUNTS, [row.id_number for row in rows])
    accounts: list[int] = []
    for person, line in zip(found, lines, strict=True):
        if person["person_id"] is None:
            raise WalletError(
                ErrorCode.NOT_FOUND, f"line {line}: no insured person has this ID number", line=line
            )
        if person["scheme"] != "employee" or person["personal_account_id"] is None:
            raise WalletError(
                ErrorCode.PERSON_NOT_ELIGIBLE,
                f"line {line}: only employee-scheme persons have a personal account",
                line=line,
            )
        accounts.append(person["personal_account_id"])
    return accounts
