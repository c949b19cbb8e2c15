"""Designated institutions: registered by the operator, paid through their own account.

Each institution has ledger accounts (never overdrawn) that settlements credit and refunds
debit: `institution:<code>` (the one `institution.account_id` names) and, so that a busy
institution's payments do not all queue on one account row, INSTITUTION_SLOTS - 1
sub-accounts `institution:<code>:<slot>`, summed when read (like the clearing
sub-accounts), a list of categories it may charge (only those of
RULES 17 that shared money may ever pay) and an API key. The key is shown once, when it is
made, and stored as a SHA-256 digest; rotating it invalidates the old one at once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Literal

import asyncpg
import msgspec
import structlog

from wallet import audit
from wallet.context import WalletContext
from wallet.credentials import digest, new_token
from wallet.errors import ErrorCode, WalletError
from wallet.ledger import open_account
from wallet.rules import FORBIDDEN_CATEGORIES, SettlementCategory

InstitutionKind = Literal["hospital", "clinic", "pharmacy", "agency"]
INSTITUTION_KINDS: tuple[str, ...] = ("hospital", "clinic", "pharmacy", "agency")
CODE_PATTERN = r"^[A-Za-z0-9_.-]{1,32}$"
_CODE = re.compile(CODE_PATTERN)
NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"
_NAME = re.compile(NAME_PATTERN)
MAX_LISTED = 1000
# Settlements spread over this many accounts of an institution (slot 0 is the main one).
INSTITUTION_SLOTS = 8


def account_code(code: str, slot: int = 0) -> str:
    """The ledger code of an institution's account in `slot` (0: its main account)."""
    return f"institution:{code}" if slot == 0 else f"institution:{code}:{slot}"


class InstitutionView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    name: str
    kind: InstitutionKind
    categories: list[SettlementCategory]
    state: Literal["active", "suspended"]
    # What settlements have paid in, less refunds: the province owes it to the institution.
    balance_fen: int
    created_at: dt.datetime


_INSERT = """
INSERT INTO institution (code, name, kind, categories, api_key_hash, account_id, created_at)
VALUES ($1, $2, $3, $4::text[], $5, $6, $7)
RETURNING id
"""
_VIEW_COLUMNS = f"""
SELECT i.code, i.name, i.kind, i.categories, i.state, i.created_at,
       (SELECT coalesce(sum(a.credits_posted - a.debits_posted - a.debits_pending), 0)::bigint
        FROM account a
        WHERE a.id = i.account_id
           OR a.code = ANY(ARRAY(SELECT 'institution:' || i.code || ':' || slot
                                 FROM generate_series(1, {INSTITUTION_SLOTS - 1}) slot))
       ) AS balance_fen
FROM institution i
"""
_VIEW_BY_CODE = _VIEW_COLUMNS + "WHERE i.code = $1"
_VIEW_ALL = _VIEW_COLUMNS + "ORDER BY i.code LIMIT $1"
_SET_STATE = """
UPDATE institution SET state = $2 WHERE code = $1 AND state = $3 RETURNING id
"""
_ROTATE_KEY = "UPDATE institution SET api_key_hash = $2 WHERE code = $1 RETURNING id"


def check_categories(categories: Sequence[str]) -> list[SettlementCategory]:
    """The categories an institution may charge: known, none forbidden (RULES 17), no repeats."""
    if not categories:
        raise WalletError(ErrorCode.INVALID_REQUEST, "an institution needs at least one category")
    checked: list[SettlementCategory] = []
    for raw in categories:
        try:
            category = SettlementCategory(raw)
        except ValueError as exc:
            raise WalletError(ErrorCode.INVALID_REQUEST, f"unknown category {raw!r}") from exc
        if category in FORBIDDEN_CATEGORIES:
            raise WalletError(
                ErrorCode.CATEGORY_FORBIDDEN,
                f"shared money never pays for {category.value} (RULES 17)",
                category=category.value,
            )
        if category not in checked:
            checked.append(category)
    return checked


def _check_fields(code: str, name: str, kind: str) -> None:
    if not _CODE.match(code):
        raise WalletError(
            ErrorCode.INVALID_REQUEST, "an institution code is 1-32 letters, digits, _ . -"
        )
    if not _NAME.match(name) or not name.strip():
        raise WalletError(ErrorCode.INVALID_REQUEST, "an institution name is 1-200 characters")
    if kind not in INSTITUTION_KINDS:
        raise WalletError(ErrorCode.INVALID_REQUEST, f"kind must be one of {INSTITUTION_KINDS}")


async def register(
    ctx: WalletContext,
    *,
    code: str,
    name: str,
    kind: str,
    categories: Sequence[str],
    actor: str,
) -> tuple[InstitutionView, str]:
    """Register a designated institution; return it and its API key (shown this once)."""
    _check_fields(code, name, kind)
    checked = check_categories(categories)
    api_key = new_token("inst")
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        try:
            account_id = await open_account(conn, "institution", account_code(code))
            for slot in range(1, INSTITUTION_SLOTS):
                await open_account(conn, "institution", account_code(code, slot))
            await conn.fetchval(
                _INSERT,
                code,
                name.strip(),
                kind,
                [c.value for c in checked],
                digest(api_key),
                account_id,
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            raise WalletError(
                ErrorCode.ALREADY_EXISTS, f"institution {code} is already registered"
            ) from exc
        await _audit(conn, now, actor, "institution.register", code, kind=kind)
        view = await _view(conn, code)
    return view, api_key


async def list_institutions(ctx: WalletContext) -> list[InstitutionView]:
    """Every registered institution, by code."""
    records = await ctx.pool.fetch(_VIEW_ALL, MAX_LISTED)
    return [_to_view(r) for r in records]


async def get(ctx: WalletContext, code: str) -> InstitutionView:
    _known_code(code)
    async with ctx.pool.acquire() as conn:
        return await _view(conn, code)


async def suspend(ctx: WalletContext, code: str, *, actor: str) -> InstitutionView:
    """Stop an institution from settling or refunding (its API key is refused)."""
    return await _change_state(ctx, code, "suspended", "active", actor)


async def reactivate(ctx: WalletContext, code: str, *, actor: str) -> InstitutionView:
    """Let a suspended institution settle again."""
    return await _change_state(ctx, code, "active", "suspended", actor)


async def rotate_api_key(
    ctx: WalletContext, code: str, *, actor: str
) -> tuple[InstitutionView, str]:
    """Replace the API key; the old one stops working when this commits."""
    _known_code(code)
    api_key = new_token("inst")
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_ROTATE_KEY, code, digest(api_key)) is None:
            raise WalletError(ErrorCode.NOT_FOUND, f"institution {code} does not exist")
        await _audit(conn, now, actor, "institution.rotate_api_key", code)
        view = await _view(conn, code)
    return view, api_key


async def _change_state(
    ctx: WalletContext, code: str, new_state: str, from_state: str, actor: str
) -> InstitutionView:
    _known_code(code)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_SET_STATE, code, new_state, from_state) is None:
            current = await _view(conn, code)  # raises not_found
            if current.state == new_state:
                return current  # the same request again: it took effect
            raise WalletError(
                ErrorCode.STATE_CONFLICT,
                f"institution {code} is {current.state}",
                state=current.state,
            )
        await _audit(conn, now, actor, f"institution.{new_state}", code)
        return await _view(conn, code)


def _known_code(code: str) -> None:
    """A code that cannot be registered cannot exist (and must not reach the database)."""
    if not _CODE.match(code):
        raise WalletError(ErrorCode.NOT_FOUND, "no institution has that code")


async def _view(conn: asyncpg.Connection, code: str) -> InstitutionView:
    record = await conn.fetchrow(_VIEW_BY_CODE, code)
    if record is None:
        raise WalletError(ErrorCode.NOT_FOUND, f"institution {code} does not exist")
    return _to_view(record)


def _to_view(r: asyncpg.Record) -> InstitutionView:
    return InstitutionView(
        code=r["code"],
        name=r["name"],
        kind=r["kind"],
        categories=[SettlementCategory(c) for c in r["categories"]],
        state=r["state"],
        balance_fen=r["balance_fen"],
        created_at=r["created_at"],
    )


async def _audit(
    conn: asyncpg.Connection,
    now: dt.datetime,
    actor: str,
    action: str,
    code: str,
    **detail: object,
) -> None:
    await audit.record(
        conn,
        at=now,
        actor=actor,
        action=action,
        subject=f"institution:{code}",
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        **detail,
    )
