"""What a wallet shows its holder: balances, and every record in and out (RULES 10).

A record is one ledger transfer, so the transfer id is a stable cursor for paging. The
holder sees the transfers of their own personal account (`source` "own"), and the transfers
by which a giver's account or a cross-province quota paid for the holder's own care at an
institution (`source` "giver" / "quota"), so a receiver sees who shared with them.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

import asyncpg
import msgspec

from wallet import ledger
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.privacy import mask_id_number, mask_name

MAX_PAGE = 200
DEFAULT_PAGE = 50

Direction = Literal["in", "out"]
RecordSource = Literal["own", "giver", "quota"]


class AccountBalance(msgspec.Struct, frozen=True):
    """A personal account as its holder sees it, in fen."""

    # What can be spent now: posted money minus what is frozen.
    available_fen: int
    # Frozen by holds (a pending grant, a settlement in progress).
    pending_fen: int
    # Posted money, frozen or not.
    posted_fen: int

    @classmethod
    def of(cls, balance: ledger.Balance) -> AccountBalance:
        return cls(
            available_fen=balance.available_fen,
            pending_fen=balance.debits_pending,
            posted_fen=balance.posted_fen,
        )


class PersonSummary(msgspec.Struct, frozen=True):
    id_number_masked: str
    name: str
    scheme: str
    status: str
    province_code: str


class WalletState(msgspec.Struct, frozen=True):
    state: str
    opened_via: str
    opened_at: dt.datetime


class WalletView(msgspec.Struct, frozen=True):
    person: PersonSummary
    wallet: WalletState | None
    # None when the person has no personal account (resident scheme).
    personal_account: AccountBalance | None


class Record(msgspec.Struct, frozen=True):
    id: int
    # In or out of the paying account: the holder's own, or the giver's / quota for `source`.
    direction: Direction
    source: RecordSource
    # single: a plain movement; pending: frozen; post: the frozen amount paid; void: released.
    phase: str
    amount_fen: int
    purpose: str
    created_at: dt.datetime
    # Who is on the other side: "province fund", an institution's name, a masked name, ...
    counterpart: str
    # province_fund, institution, person, cross_province or quota.
    counterpart_kind: str
    settlement_id: int | None = None
    # When the holder paid for a relative's care: whose (masked), and the relation filed.
    patient_name_masked: str | None = None
    # When a giver paid for the holder's care: who (masked).
    giver_name_masked: str | None = None
    # The relationship's type as filed by the giver (what the receiver is to the giver).
    relation_type: str | None = None


class RecordPage(msgspec.Struct, frozen=True):
    records: list[Record]
    # Pass as `before_id` for the next (older) page; None on the last page.
    next_before_id: int | None


_PERSONAL_ACCOUNT = "SELECT personal_account_id FROM insured_person WHERE id = $1"
_PERSON = """
SELECT p.id_number, p.name, p.scheme, p.status, p.personal_account_id,
       w.state AS wallet_state, w.opened_via, w.opened_at
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id = $1
"""

# $1 personal account (may be NULL), $2 person, $3 before id, $4 page size + 1,
# $5 direction, $6 purpose, $7 since, $8 until. Each branch walks an index newest first
# ((debit_account_id, id), (credit_account_id, id), settlement (patient_person_id, id)) and
# stops at the page size; the outer query only decorates at most three pages of rows.
_RECORDS = """
WITH picked AS (
    (SELECT t.id, 'out'::text AS direction, 'own'::text AS source, NULL::bigint AS relationship_id,
            t.credit_account_id AS other_account_id
     FROM ledger_transfer t
     WHERE t.debit_account_id = $1 AND t.id < $3 AND ($5::text IS NULL OR $5 = 'out')
       AND ($6::text IS NULL OR t.purpose = $6)
       AND ($7::timestamptz IS NULL OR t.created_at >= $7)
       AND ($8::timestamptz IS NULL OR t.created_at < $8)
     ORDER BY t.id DESC LIMIT $4)
    UNION ALL
    (SELECT t.id, 'in', 'own', NULL, t.debit_account_id
     FROM ledger_transfer t
     WHERE t.credit_account_id = $1 AND t.id < $3 AND ($5::text IS NULL OR $5 = 'in')
       AND ($6::text IS NULL OR t.purpose = $6)
       AND ($7::timestamptz IS NULL OR t.created_at >= $7)
       AND ($8::timestamptz IS NULL OR t.created_at < $8)
     ORDER BY t.id DESC LIMIT $4)
    UNION ALL
    (SELECT shared.* FROM (
        SELECT t.id,
               CASE WHEN t.debit_account_id = src.account_id THEN 'out' ELSE 'in' END AS direction,
               src.source, src.relationship_id,
               CASE WHEN t.debit_account_id = src.account_id
                    THEN t.credit_account_id ELSE t.debit_account_id END AS other_account_id
        FROM settlement s
        JOIN ledger_transfer t ON t.settlement_id = s.id
        JOIN LATERAL (
            SELECT ss.account_id, ss.source, ss.relationship_id FROM settlement_source ss
            WHERE ss.settlement_id = s.id AND ss.source <> 'own'
              AND ss.account_id IN (t.debit_account_id, t.credit_account_id)
            ORDER BY ss.seq LIMIT 1
        ) src ON true
        WHERE s.patient_person_id = $2 AND t.id < $3
          AND ($6::text IS NULL OR t.purpose = $6)
          AND ($7::timestamptz IS NULL OR t.created_at >= $7)
          AND ($8::timestamptz IS NULL OR t.created_at < $8)
     ) shared
     WHERE $5::text IS NULL OR shared.direction = $5
     ORDER BY shared.id DESC LIMIT $4)
)
SELECT t.id, m.direction, m.source, t.phase, t.amount_fen, t.purpose, t.created_at,
       coalesce(t.settlement_id, rf.settlement_id) AS settlement_id,
       oa.kind AS other_kind, oa.code AS other_code, i.name AS institution_name,
       other_person.name AS other_person_name,
       CASE WHEN s.patient_person_id <> $2 THEN patient.name END AS patient_name,
       giver.name AS giver_name,
       coalesce(r.relation_type, own_r.relation_type) AS relation_type
FROM picked m
JOIN ledger_transfer t ON t.id = m.id
JOIN account oa ON oa.id = m.other_account_id
-- An institution account is `institution:<code>` or one of its sub-accounts
-- `institution:<code>:<slot>` (wallet.institutions); codes never contain ':'.
LEFT JOIN institution i ON oa.kind = 'institution' AND i.code = split_part(oa.code, ':', 2)
LEFT JOIN insured_person other_person ON other_person.personal_account_id = oa.id
LEFT JOIN refund rf ON rf.id = t.refund_id
LEFT JOIN settlement s ON s.id = coalesce(t.settlement_id, rf.settlement_id)
LEFT JOIN insured_person patient ON patient.id = s.patient_person_id
-- The holder paid for someone else's care: through which relationship.
LEFT JOIN LATERAL (
    SELECT ss.relationship_id FROM settlement_source ss
    WHERE ss.settlement_id = s.id AND ss.account_id = $1 AND s.patient_person_id <> $2
    ORDER BY ss.seq LIMIT 1
) own_src ON true
LEFT JOIN relationship own_r ON own_r.id = own_src.relationship_id
LEFT JOIN relationship r ON r.id = m.relationship_id
LEFT JOIN insured_person giver ON giver.id = r.giver_person_id
ORDER BY t.id DESC
LIMIT $4
"""

_KIND_NAMES = {"quota": "cross-province quota", "institution": "institution", "personal": "person"}

# The first page: every transfer id is below the largest BIGINT.
_NO_CURSOR = 2**63 - 1


async def wallet_view(ctx: WalletContext, person_id: int) -> WalletView:
    """The holder's person summary, wallet state and personal account balance."""
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(_PERSON, person_id)
        if row is None:
            raise WalletError(ErrorCode.NOT_FOUND, "the person does not exist")
        account = None
        if row["personal_account_id"] is not None:
            account = AccountBalance.of(await ledger.balance(conn, row["personal_account_id"]))
    wallet = None
    if row["wallet_state"] is not None:
        wallet = WalletState(
            state=row["wallet_state"], opened_via=row["opened_via"], opened_at=row["opened_at"]
        )
    person = PersonSummary(
        id_number_masked=mask_id_number(row["id_number"]),
        name=row["name"],
        scheme=row["scheme"],
        status=row["status"],
        province_code=ctx.province_code,
    )
    return WalletView(person=person, wallet=wallet, personal_account=account)


async def list_records(
    ctx: WalletContext,
    person_id: int,
    *,
    limit: int = DEFAULT_PAGE,
    before_id: int | None = None,
    direction: Direction | None = None,
    purpose: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> RecordPage:
    """The holder's records, newest first, `limit` per page, older than `before_id`.

    `since` is inclusive and `until` exclusive; both compare with the transfer's time.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise WalletError(ErrorCode.INVALID_REQUEST, f"limit must be 1..{MAX_PAGE}")
    if direction not in (None, "in", "out"):
        raise WalletError(ErrorCode.INVALID_REQUEST, "direction must be `in` or `out`")
    if any(t is not None and t.utcoffset() is None for t in (since, until)):
        raise WalletError(ErrorCode.INVALID_REQUEST, "since and until need a UTC offset")
    async with ctx.pool.acquire() as conn:
        account_id = await conn.fetchval(_PERSONAL_ACCOUNT, person_id)
        rows = await conn.fetch(
            _RECORDS,
            account_id,
            person_id,
            _NO_CURSOR if before_id is None else before_id,
            limit + 1,
            direction,
            purpose,
            since,
            until,
        )
    records = [_record(row) for row in rows[:limit]]
    next_before_id = records[-1].id if len(rows) > limit else None
    return RecordPage(records=records, next_before_id=next_before_id)


def _record(row: asyncpg.Record) -> Record:
    counterpart_kind, counterpart = _counterpart(row)
    return Record(
        id=row["id"],
        direction=row["direction"],
        source=row["source"],
        phase=row["phase"],
        amount_fen=row["amount_fen"],
        purpose=row["purpose"],
        created_at=row["created_at"],
        counterpart_kind=counterpart_kind,
        counterpart=counterpart,
        settlement_id=row["settlement_id"],
        patient_name_masked=_masked(row["patient_name"]),
        giver_name_masked=_masked(row["giver_name"]),
        relation_type=row["relation_type"],
    )


def _counterpart(row: asyncpg.Record) -> tuple[str, str]:
    kind: str = row["other_kind"]
    if kind == "funding":
        return "province_fund", "province fund"
    if kind == "institution" and row["institution_name"] is not None:
        return "institution", row["institution_name"]
    if kind == "personal" and row["other_person_name"] is not None:
        return "person", mask_name(row["other_person_name"])
    if kind in ("due_to", "due_from"):
        # A clearing account's code names the peer province (`due_to:<province>`).
        return "cross_province", row["other_code"]
    # Other codes may carry identifiers of people elsewhere: show only what the account is.
    return kind, _KIND_NAMES.get(kind, kind)


def _masked(name: str | None) -> str | None:
    return None if name is None else mask_name(name)
