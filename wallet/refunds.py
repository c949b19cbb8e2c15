"""Refunds of settlements (RULES 20): back to the exact sources, last source first.

A refund goes back to the exact accounts a settlement came from, last source first, even
to a giver whose relationship has ended since: it is their money. It comes out of the
institution account the settlement was paid into (wallet.institutions: an institution has
several). A refund to a quota closed since then moves on to the giver's node at once (a new
RELEASE; `wallet.plt.quota.release_refund_to_closed_quota`). Refunds are idempotent on
(institution, reference) like settlements (wallet.settlement).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec

from wallet import audit, notices
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.ledger import lock_accounts, transfer
from wallet.plt import quota, spend_notices
from wallet.privacy import mask_name
from wallet.settlement import (
    SettlingInstitution,
    SourceKind,
    _check_amount,
    _check_reference,
    _connection,
    _hash,
    _ReferenceTaken,
)


class RefundSourceView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one refund gave back to one source of the settlement."""

    seq: int
    source: SourceKind
    amount_fen: int
    relationship_id: int | None
    giver_name_masked: str | None


class RefundView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reference: str
    refund_id: int
    settlement_reference: str
    amount_fen: int
    sources: list[RefundSourceView]
    created_at: dt.datetime


@dataclass(frozen=True)
class SourceToRefund:
    seq: int
    source: SourceKind
    account_id: int
    left_fen: int


# --- statements ----------------------------------------------------------------------------

_FIND_REFUND = "SELECT id, request_hash FROM refund WHERE institution_id = $1 AND reference = $2"
# Refunds of one settlement queue on its row: "what is left" is read under this lock.
_LOCK_SETTLEMENT = """
SELECT id, amount_fen, refunded_fen FROM settlement
WHERE institution_id = $1 AND reference = $2
FOR UPDATE
"""
# The institution account a settlement paid into (the same for all its sources), found
# from one source's transfer on that account's own index.
_PAID_INTO = """
SELECT credit_account_id FROM ledger_transfer
WHERE debit_account_id = $1 AND settlement_id = $2 AND refund_id IS NULL
LIMIT 1
"""
_REFUNDABLE_SOURCES = """
SELECT seq, source, account_id, amount_fen - refunded_fen AS left_fen FROM settlement_source
WHERE settlement_id = $1
ORDER BY seq DESC
"""
_ADD_REFUNDED = """
UPDATE settlement SET refunded_fen = refunded_fen + $2
WHERE id = $1 AND refunded_fen + $2 <= amount_fen
RETURNING id
"""
_ADD_SOURCE_REFUNDED = """
UPDATE settlement_source SET refunded_fen = refunded_fen + $3
WHERE settlement_id = $1 AND seq = $2 AND refunded_fen + $3 <= amount_fen
RETURNING seq
"""
_INSERT_REFUND = """
INSERT INTO refund (settlement_id, institution_id, reference, request_hash, amount_fen, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
"""
_REFUND_VIEW = """
SELECT f.id, f.reference, f.amount_fen, f.created_at, s.reference AS settlement_reference
FROM refund f JOIN settlement s ON s.id = f.settlement_id
WHERE f.id = $1
"""
# A settlement's sources have distinct accounts (own, one per giver), so the transfer's
# credited account names the source it went back to.
_REFUND_SOURCES_VIEW = """
SELECT ss.seq, ss.source, t.amount_fen, ss.relationship_id,
       coalesce(g.name, q.giver_masked_name) AS giver_name
FROM ledger_transfer t
JOIN settlement_source ss ON ss.settlement_id = t.settlement_id AND ss.account_id = t.credit_account_id
LEFT JOIN relationship r ON r.id = ss.relationship_id
LEFT JOIN insured_person g ON g.id = r.giver_person_id
LEFT JOIN quota q ON q.account_id = ss.account_id
WHERE t.refund_id = $1
ORDER BY ss.seq DESC
"""


# --- planning ----------------------------------------------------------------------------------


def plan_refund(
    amount_fen: int, sources_last_first: Sequence[SourceToRefund]
) -> list[tuple[SourceToRefund, int]]:
    """Give `amount_fen` back to the sources, last deducted first (RULES 20)."""
    plan: list[tuple[SourceToRefund, int]] = []
    remaining = amount_fen
    for source in sources_last_first:
        if remaining == 0:
            break
        take = min(remaining, source.left_fen)
        if take > 0:
            plan.append((source, take))
            remaining -= take
    if remaining:
        raise WalletError(
            ErrorCode.REFUND_EXCEEDS_SETTLEMENT, "the refund exceeds what is left to refund"
        )
    return plan


# --- refunds ---------------------------------------------------------------------------------


async def refund(
    ctx: WalletContext,
    institution: SettlingInstitution,
    settlement_reference: str,
    *,
    reference: str,
    amount_fen: int | None = None,
    conn: asyncpg.Connection | None = None,
) -> tuple[RefundView, bool]:
    """Give (part of) a settlement back to the exact accounts it came from (RULES 20).

    `amount_fen` defaults to everything not yet refunded. Returns the refund and whether it
    was made now (False: an identical earlier request is replayed).
    """
    _check_reference(settlement_reference, for_lookup=True)
    _check_reference(reference)
    if amount_fen is not None:
        _check_amount(amount_fen)
    request_hash = _hash(settlement_reference, amount_fen)
    async with _connection(ctx, conn) as db:
        replay = await _replay_refund(db, institution, reference, request_hash)
        if replay is not None:
            return replay, False
        try:
            view = await _refund_new(
                db, ctx, institution, settlement_reference, reference, amount_fen, request_hash
            )
        except _ReferenceTaken:
            replay = await _replay_refund(db, institution, reference, request_hash)
            if replay is None:  # pragma: no cover - the winner's row is committed
                raise
            return replay, False
        return view, True


async def _refund_new(
    conn: asyncpg.Connection,
    ctx: WalletContext,
    institution: SettlingInstitution,
    settlement_reference: str,
    reference: str,
    amount_fen: int | None,
    request_hash: bytes,
) -> RefundView:
    now = ctx.clock.now()
    async with conn.transaction():
        settlement = await conn.fetchrow(
            _LOCK_SETTLEMENT, institution.institution_id, settlement_reference
        )
        if settlement is None:
            raise WalletError(
                ErrorCode.NOT_FOUND, f"no settlement has reference {settlement_reference}"
            )
        settlement_id: int = settlement["id"]
        left_fen = settlement["amount_fen"] - settlement["refunded_fen"]
        refund_fen = left_fen if amount_fen is None else amount_fen
        if refund_fen == 0 or refund_fen > left_fen:
            raise WalletError(
                ErrorCode.REFUND_EXCEEDS_SETTLEMENT,
                f"only {left_fen} fen of settlement {settlement_reference} can still be refunded",
                refundable_fen=left_fen,
            )
        sources = [
            SourceToRefund(r["seq"], r["source"], r["account_id"], r["left_fen"])
            for r in await conn.fetch(_REFUNDABLE_SOURCES, settlement_id)
        ]
        plan = plan_refund(refund_fen, sources)
        # The refund comes out of the institution account the settlement paid into: it has
        # received the settlement and only this settlement's refunds take it out again, so
        # it always holds what is left to refund.
        payee: int = await conn.fetchval(_PAID_INTO, sources[-1].account_id, settlement_id)
        await lock_accounts(conn, [payee, *(s.account_id for s, _ in plan)])
        try:
            refund_id: int = await conn.fetchval(
                _INSERT_REFUND,
                settlement_id,
                institution.institution_id,
                reference,
                request_hash,
                refund_fen,
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            raise _ReferenceTaken from exc
        await _guard(conn, _ADD_REFUNDED, settlement_id, refund_fen)
        for source, take in plan:
            await _guard(conn, _ADD_SOURCE_REFUNDED, settlement_id, source.seq, take)
            await transfer(
                conn,
                debit_account_id=payee,
                credit_account_id=source.account_id,
                amount_fen=take,
                purpose="refund",
                settlement_id=settlement_id,
                refund_id=refund_id,
            )
            # A quota closed since the payment holds nothing: the refund moves on home.
            await quota.release_refund_to_closed_quota(conn, source.account_id, take, now)
        await audit.record(
            conn,
            at=now,
            actor=f"institution:{institution.institution_id}",
            action="settlement.refund",
            subject=f"settlement:{settlement_id}",
            reference=reference,
            refund_id=refund_id,
            amount_fen=refund_fen,
            sources=[{"account_id": s.account_id, "amount_fen": take} for s, take in plan],
        )
        # Only the sources that are relatives' money tell anyone: no statement for the rest.
        refunded = [(s.seq, take) for s, take in plan if s.source == "giver"]
        if refunded:
            await notices.shared_money_refunded(conn, settlement_id, refund_id, refunded, now)
        drawn = [(s.account_id, fen) for s, fen in plan if s.source == "quota"]
        await spend_notices.quotas_drawn(
            conn, "refunded", drawn, now, settlement_id=settlement_id, refund_id=refund_id
        )
        return await _refund_view(conn, refund_id)


async def _guard(conn: asyncpg.Connection, statement: str, *args: object) -> None:
    """A guarded refunded_fen increase; the settlement lock makes a miss impossible, so a
    miss is refused rather than trusted."""
    if await conn.fetchval(statement, *args) is None:
        raise WalletError(
            ErrorCode.REFUND_EXCEEDS_SETTLEMENT, "the refund exceeds what is left to refund"
        )


async def _replay_refund(
    conn: asyncpg.Connection,
    institution: SettlingInstitution,
    reference: str,
    request_hash: bytes,
) -> RefundView | None:
    row = await conn.fetchrow(_FIND_REFUND, institution.institution_id, reference)
    if row is None:
        return None
    if row["request_hash"] != request_hash:
        raise WalletError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            f"reference {reference} was already used for another refund",
        )
    return await _refund_view(conn, row["id"])


async def _refund_view(conn: asyncpg.Connection, refund_id: int) -> RefundView:
    f = await conn.fetchrow(_REFUND_VIEW, refund_id)
    sources = [
        RefundSourceView(
            seq=r["seq"],
            source=r["source"],
            amount_fen=r["amount_fen"],
            relationship_id=r["relationship_id"],
            giver_name_masked=None if r["giver_name"] is None else mask_name(r["giver_name"]),
        )
        for r in await conn.fetch(_REFUND_SOURCES_VIEW, refund_id)
    ]
    return RefundView(
        reference=f["reference"],
        refund_id=f["id"],
        settlement_reference=f["settlement_reference"],
        amount_fen=f["amount_fen"],
        sources=sources,
        created_at=f["created_at"],
    )
