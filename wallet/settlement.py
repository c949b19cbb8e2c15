"""Spending at designated institutions (RULES 17-19): payment codes and settlements
(refunds: wallet.refunds).

A patient shows a payment code from their own wallet (RULES 18): random, 18 digits,
short-lived, single-use, stored only as a digest. The institution submits it with the
amount, the category and its own reference. In ONE transaction the node

  1. consumes the code (guarded UPDATE: unused and unexpired, else used/expired),
  2. locks, in account-id order, one of the institution's accounts (it has several, see
     wallet.institutions), the patient's personal account, the personal accounts of every
     giver with an active relationship to the patient (the relationship rows are
     share-locked, so an ending waits for the payment) and the accounts of the patient's
     active cross-province quotas (share-locked likewise),
  3. reads the now stable balances and plans the deduction: own account first, then the
     givers and quotas in the province's order (RULES 19: `filing_order`,
     `giver_balance_desc`, `receiver_order`; `wallet.plt.quota.rank_shared_sources`),
  4. writes the settlement, one settlement_source row and one ledger transfer per source.

Steps 1-2 are one statement and step 4 another (`_TAKE`, `_RECORD`), which also writes the
`shared_money.spent` notification of each in-province giver who paid: with the key lookup,
BEGIN and COMMIT, a settlement is five round trips on one connection, whoever's money paid.

If the sources do not cover the amount, the payment is refused (`insufficient_funds`) and
nothing changes, the code included: a refused payment does not consume the code, so the
cashier can retry with less or with `allow_partial`. With `allow_partial` the covered part
is settled and `remainder_fen` says what the patient still owes; covering nothing is still
`insufficient_funds`.

Settlements (and refunds) are idempotent on (institution, reference): the same request
again returns what was stored (200), another request under the same reference is
`idempotency_conflict`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg
import msgspec

from wallet import audit, notification_stream
from wallet.context import WalletContext
from wallet.credentials import digest, new_numeric_code
from wallet.errors import ErrorCode, WalletError
from wallet.institutions import INSTITUTION_SLOTS, account_code
from wallet.ledger import MAX_AMOUNT_FEN
from wallet.notifications import Kind, lock_recipient
from wallet.plt import quota, spend_notices
from wallet.privacy import mask_name
from wallet.rules import FORBIDDEN_CATEGORIES, DeductionStrategy, ProvinceRules, SettlementCategory

PAYMENT_CODE_DIGITS = 18
# References travel in URLs (GET .../settlements/{reference}): no slashes, no spaces.
REFERENCE_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_REFERENCE = re.compile(REFERENCE_PATTERN)
_ISSUE_ATTEMPTS = 3
# Codes stay this long after they expire (used or not: every code expires ttl after issue),
# so a retry of a spent code soon after is still told `payment_code_used`/`_expired` rather
# than "unknown"; then the purge deletes them, at most PURGE_BATCH per pass (issue 14: the
# table grew forever), found through payment_code_expires_at_idx (migration 0009).
PAYMENT_CODE_RETENTION = dt.timedelta(hours=1)
PURGE_BATCH = 5000
PURGE_INTERVAL_S = 60.0

SourceKind = Literal["own", "giver", "quota"]


@dataclass(frozen=True)
class SettlingInstitution:
    """The institution behind an API key, as settlement needs it."""

    institution_id: int
    account_id: int
    categories: tuple[str, ...]
    # The institution's code names its sub-accounts (wallet.institutions.account_code).
    code: str


class PaymentCodeView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    expires_at: dt.datetime


class SourceView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where part of a settlement came from, in deduction order."""

    seq: int
    source: SourceKind
    amount_fen: int
    refunded_fen: int
    relationship_id: int | None
    giver_name_masked: str | None


class SettlementView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reference: str
    settlement_id: int
    category: SettlementCategory
    patient_name_masked: str
    requested_fen: int
    amount_fen: int
    remainder_fen: int
    refunded_fen: int
    sources: list[SourceView]
    created_at: dt.datetime


@dataclass(frozen=True)
class Candidate:
    """An account that may pay, with what it has available under the lock."""

    source: SourceKind
    account_id: int
    relationship_id: int | None
    available_fen: int


class _ReferenceTaken(Exception):
    """A concurrent request inserted the same (institution, reference) first."""


# --- statements ----------------------------------------------------------------------------

_PERSON_STATUS = "SELECT status FROM insured_person WHERE id = $1"
_INSERT_CODE = """
INSERT INTO payment_code (code_hash, person_id, created_at, expires_at) VALUES ($1, $2, $3, $4)
"""
# Everything the plan needs, locked, in ONE statement (each round trip costs the node more
# CPU than the statement costs PostgreSQL). Its parts run in this order, which is the lock
# order of every settlement:
#   1. the code is consumed (guarded: unused and unexpired) and its patient share-locked:
#      the patient's status cannot change under the payment, and a roster change that would
#      end their relationships waits here instead of crossing our relationship locks;
#   2. the givers who may pay now (RULES 1, 19): their relationship rows share-locked in id
#      order, so a concurrent ending waits until this payment commits (or sees it ended);
#   3. the patient's active cross-province quotas, share-locked likewise (a closing waits);
#   4. every account the payment may touch, locked FOR UPDATE in id order (as
#      wallet.ledger.lock_accounts), with the balances the plan is made from. The
#      institution is paid into one of its sub-accounts ($4, chosen by the caller), or its
#      main account ($3) while that sub-account is not opened yet.
# The patient row drives the outer scan; the ARRAY sub-selects are evaluated in select-list
# order when its one row is projected, each reading a MATERIALIZED CTE in full, so parts
# 2-4 run in order and only once the code was consumed (no row: nothing else is locked).
_TAKE = """
WITH code AS (
    UPDATE payment_code SET used_at = $2
    WHERE code_hash = $1 AND used_at IS NULL AND expires_at > $2
    RETURNING person_id),
patient AS MATERIALIZED (
    SELECT p.id, p.status, p.personal_account_id, p.name
    FROM insured_person p WHERE p.id = (SELECT person_id FROM code)
    FOR SHARE),
givers AS MATERIALIZED (
    SELECT r.id AS relationship_id, g.personal_account_id AS account_id, r.filed_at,
           r.receiver_priority, g.name, g.id AS person_id
    FROM relationship r
    JOIN insured_person g ON g.id = r.giver_person_id
    JOIN wallet w ON w.person_id = g.id
    WHERE r.receiver_person_id = (SELECT id FROM patient) AND r.state = 'active'
      AND g.scheme = 'employee' AND g.status = 'normal' AND w.state = 'open'
      AND g.personal_account_id IS NOT NULL
    ORDER BY r.id
    FOR SHARE OF r),
quotas AS MATERIALIZED (
    SELECT q.account_id, q.relation_id, q.from_node, q.created_at
    FROM quota q
    WHERE q.receiver_person_id = (SELECT id FROM patient) AND q.state = 'active'
    ORDER BY q.account_id
    FOR SHARE),
payee AS MATERIALIZED (
    SELECT coalesce((SELECT id FROM account WHERE code = $4 AND kind = 'institution'),
                    $3::bigint) AS id),
accounts AS MATERIALIZED (
    SELECT a.id, a.credits_posted - a.debits_posted - a.debits_pending AS available_fen
    FROM account a
    WHERE a.id = ANY(ARRAY(SELECT id FROM payee)
                     || ARRAY(SELECT personal_account_id FROM patient
                              WHERE personal_account_id IS NOT NULL)
                     || ARRAY(SELECT account_id FROM givers)
                     || ARRAY(SELECT account_id FROM quotas))
    ORDER BY a.id
    FOR UPDATE)
SELECT p.id, p.status, p.personal_account_id, p.name, (SELECT id FROM payee) AS payee,
       ARRAY(SELECT relationship_id FROM givers ORDER BY relationship_id) AS giver_relationships,
       ARRAY(SELECT account_id FROM givers ORDER BY relationship_id) AS giver_accounts,
       ARRAY(SELECT filed_at FROM givers ORDER BY relationship_id) AS giver_filed_at,
       ARRAY(SELECT receiver_priority FROM givers ORDER BY relationship_id) AS giver_priorities,
       ARRAY(SELECT name FROM givers ORDER BY relationship_id) AS giver_names,
       ARRAY(SELECT person_id FROM givers ORDER BY relationship_id) AS giver_persons,
       ARRAY(SELECT account_id FROM quotas ORDER BY account_id) AS quota_accounts,
       ARRAY(SELECT relation_id FROM quotas ORDER BY account_id) AS quota_relations,
       ARRAY(SELECT from_node FROM quotas ORDER BY account_id) AS quota_from_nodes,
       ARRAY(SELECT created_at FROM quotas ORDER BY account_id) AS quota_created_at,
       ARRAY(SELECT id FROM accounts ORDER BY id) AS account_ids,
       ARRAY(SELECT available_fen FROM accounts ORDER BY id) AS available_fen
FROM patient p
"""
_CODE_STATE = "SELECT used_at, expires_at FROM payment_code WHERE code_hash = $1"
_OPEN_SLOT = """
INSERT INTO account (kind, code, debits_must_not_exceed_credits) VALUES ('institution', $1, true)
ON CONFLICT (code) DO NOTHING
"""
# The settlement, its sources, their ledger transfers (the insert trigger moves the
# balances and refuses an overdraft, as for wallet.ledger.transfer), the audit event and the
# `shared_money.spent` notification of each in-province giver who paid ($17: the giver's
# person id per source, NULL for the others), in one statement. Sources and transfers are
# written in deduction order. Each giver's notification lock (wallet.notifications) is
# taken in ascending recipient order; it is the only lock here that can wait (the accounts,
# relationships and patient were locked by `_TAKE`), so, whatever order PostgreSQL runs the
# sub-statements in, it comes after every row lock of the settlement, as `record_many`'s
# callers take it. The streams are woken after the commit (`announce`).
_RECORD = f"""
WITH s AS (
    INSERT INTO settlement
        (institution_id, reference, request_hash, patient_person_id, category, requested_fen,
         amount_fen, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    RETURNING id),
plan AS (
    SELECT * FROM unnest($9::text[], $10::bigint[], $11::bigint[], $12::bigint[],
                         $17::bigint[])
        WITH ORDINALITY AS x(source, account_id, relationship_id, amount_fen, giver, n)),
src AS (
    INSERT INTO settlement_source
        (settlement_id, seq, source, account_id, relationship_id, amount_fen)
    SELECT s.id, plan.n - 1, plan.source, plan.account_id, plan.relationship_id, plan.amount_fen
    FROM s, plan ORDER BY plan.n),
moved AS (
    INSERT INTO ledger_transfer
        (debit_account_id, credit_account_id, amount_fen, phase, purpose, settlement_id)
    SELECT plan.account_id, $13, plan.amount_fen, 'single', $5, s.id
    FROM s, plan ORDER BY plan.n),
audited AS (
    INSERT INTO audit_event (at, actor, action, subject, request_id, detail)
    SELECT $8, $14, 'settlement.charge', 'settlement:' || s.id, $15, $16::jsonb FROM s),
givers AS (
    SELECT giver, relationship_id, amount_fen, n, {lock_recipient("giver")} AS locked
    FROM plan WHERE giver IS NOT NULL
    ORDER BY giver, n),
notified AS (
    INSERT INTO notification
        (person_id, kind, event_key, created_at, amount_fen, counterpart_name_masked, refs,
         detail, push_next_at)
    SELECT g.giver, '{Kind.SHARED_MONEY_SPENT.value}', 'settlement:' || s.id || ':' || (g.n - 1),
           $8, g.amount_fen, $18,
           jsonb_build_object('settlement_id', s.id::text,
                              'relationship_id', g.relationship_id::text),
           jsonb_build_object('category', $5::text), $8
    FROM s, givers g
    ON CONFLICT (person_id, event_key) DO NOTHING)
SELECT id FROM s
"""
_FIND_SETTLEMENT = """
SELECT id, request_hash FROM settlement WHERE institution_id = $1 AND reference = $2
"""
_SETTLEMENT_VIEW = """
SELECT s.id, s.reference, s.category, s.requested_fen, s.amount_fen, s.refunded_fen,
       s.created_at, p.name AS patient_name
FROM settlement s JOIN insured_person p ON p.id = s.patient_person_id
WHERE s.id = $1
"""
_SOURCES_VIEW = """
SELECT ss.seq, ss.source, ss.amount_fen, ss.refunded_fen, ss.relationship_id,
       coalesce(g.name, q.giver_masked_name) AS giver_name
FROM settlement_source ss
LEFT JOIN relationship r ON r.id = ss.relationship_id
LEFT JOIN insured_person g ON g.id = r.giver_person_id
LEFT JOIN quota q ON q.account_id = ss.account_id
WHERE ss.settlement_id = $1
ORDER BY ss.seq
"""

# --- payment codes ---------------------------------------------------------------------------


async def issue_payment_code(ctx: WalletContext, person_id: int) -> PaymentCodeView:
    """A fresh single-use payment code for the patient's own use (RULES 18)."""
    status = await ctx.pool.fetchval(_PERSON_STATUS, person_id)
    if status != "normal":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE, "the person is not in normal insured status"
        )
    now = ctx.clock.now()
    expires_at = now + dt.timedelta(seconds=ctx.rules.payment_code_ttl_s)
    for attempt in range(_ISSUE_ATTEMPTS):
        code = new_numeric_code(PAYMENT_CODE_DIGITS)
        try:
            await ctx.pool.execute(_INSERT_CODE, digest(code), person_id, now, expires_at)
        except asyncpg.UniqueViolationError:
            # 10**18 codes: a clash is all but impossible, but never a 500.
            if attempt + 1 == _ISSUE_ATTEMPTS:
                raise
            continue
        return PaymentCodeView(code=code, expires_at=expires_at)
    raise AssertionError("unreachable")


# Bounded, and SKIP LOCKED: replicas (or worker processes) purging at once take disjoint
# rows instead of queueing on each other; a code being used right now is locked and left.
_PURGE_CODES = """
DELETE FROM payment_code WHERE code_hash IN (
    SELECT code_hash FROM payment_code WHERE expires_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED)
"""


async def purge_payment_codes(ctx: WalletContext, limit: int = PURGE_BATCH) -> int:
    """Delete up to `limit` codes that expired more than PAYMENT_CODE_RETENTION ago (used or
    not); return how many. A worker pass: it runs again at once while it finds work."""
    cutoff = ctx.clock.now() - PAYMENT_CODE_RETENTION
    status: str = await ctx.pool.execute(_PURGE_CODES, cutoff, limit)
    return int(status.split()[-1])


# --- pure planning ---------------------------------------------------------------------------


def plan_deduction(amount_fen: int, candidates: Sequence[Candidate]) -> list[tuple[Candidate, int]]:
    """Take from each candidate in turn until `amount_fen` is covered (or they run out)."""
    plan: list[tuple[Candidate, int]] = []
    remaining = amount_fen
    for candidate in candidates:
        if remaining == 0:
            break
        take = min(remaining, candidate.available_fen)
        if take > 0:
            plan.append((candidate, take))
            remaining -= take
    return plan


def check_category(
    rules: ProvinceRules, institution_categories: Sequence[str], category: str
) -> SettlementCategory:
    """May this institution charge this category to personal and shared money? (RULES 17)"""
    try:
        checked = SettlementCategory(category)
    except ValueError as exc:
        raise WalletError(ErrorCode.INVALID_REQUEST, f"unknown category {category!r}") from exc
    if checked in FORBIDDEN_CATEGORIES:
        raise WalletError(
            ErrorCode.CATEGORY_FORBIDDEN,
            f"personal and shared money never pay for {checked.value} (RULES 17)",
            category=checked.value,
        )
    if checked is SettlementCategory.HEALTH_CHECKUP and not rules.health_checkups_allowed:
        raise WalletError(
            ErrorCode.CATEGORY_FORBIDDEN,
            "health check-ups are not payable from personal accounts in this province",
            category=checked.value,
        )
    if checked.value not in institution_categories:
        raise WalletError(
            ErrorCode.FORBIDDEN,
            f"this institution is not designated for {checked.value}",
            category=checked.value,
        )
    return checked


# --- settlement ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connection(
    ctx: WalletContext, conn: asyncpg.Connection | None
) -> AsyncIterator[asyncpg.Connection]:
    """The request's own connection if it has one (the API's: the key lookup ran on it), else
    one from the pool: one connection per request."""
    if conn is not None:
        yield conn
        return
    async with ctx.pool.acquire() as acquired:
        yield acquired


async def settle(
    ctx: WalletContext,
    institution: SettlingInstitution,
    *,
    payment_code: str,
    amount_fen: int,
    category: str,
    reference: str,
    allow_partial: bool = False,
    conn: asyncpg.Connection | None = None,
) -> tuple[SettlementView, bool]:
    """Charge a patient's accounts for a payment at an institution; return the settlement and
    whether it was made now (False: an identical earlier request is replayed).

    A new payment is tried first; only when it cannot be made (the reference is taken, the
    code is used, anything refused) is a stored settlement under the reference looked for:
    if there is one it answers (the replay, or `idempotency_conflict`), as if it had been
    looked up first. A first request, by far the most frequent, so skips a round trip.
    """
    _check_amount(amount_fen)
    _check_reference(reference)
    code_hash = digest(payment_code)
    request_hash = _hash(amount_fen, category, allow_partial, code_hash.hex())
    async with _connection(ctx, conn) as db:
        try:
            check_category(ctx.rules, institution.categories, category)
            view = await _settle_new(
                db,
                ctx,
                institution,
                code_hash,
                amount_fen,
                category,
                reference,
                allow_partial,
                request_hash,
            )
        except _ReferenceTaken:
            replay = await _replay_settlement(db, institution, reference, request_hash)
            if replay is None:  # pragma: no cover - the winner's row is committed
                raise
            return replay, False
        except WalletError:
            # Refused as new; an identical earlier request (e.g. one that won the race to the
            # code) is a replay, another one under this reference a conflict.
            replay = await _replay_settlement(db, institution, reference, request_hash)
            if replay is not None:
                return replay, False
            raise
        return view, True


async def get_settlement(
    ctx: WalletContext,
    institution_id: int,
    reference: str,
    conn: asyncpg.Connection | None = None,
) -> SettlementView:
    """One of the institution's settlements; others' are not found."""
    _check_reference(reference, for_lookup=True)
    async with _connection(ctx, conn) as db:
        row = await db.fetchrow(_FIND_SETTLEMENT, institution_id, reference)
        if row is None:
            raise WalletError(ErrorCode.NOT_FOUND, f"no settlement has reference {reference}")
        return await _settlement_view(db, row["id"])


async def _settle_new(
    conn: asyncpg.Connection,
    ctx: WalletContext,
    institution: SettlingInstitution,
    code_hash: bytes,
    amount_fen: int,
    category: str,
    reference: str,
    allow_partial: bool,
    request_hash: bytes,
) -> SettlementView:
    now = ctx.clock.now()
    async with conn.transaction():
        patient = await _take(conn, institution, code_hash, now)
        candidates, names = await _rank_sources(conn, ctx.rules, patient)
        plan = plan_deduction(amount_fen, candidates)
        covered_fen = sum(take for _, take in plan)
        if covered_fen == 0 or (covered_fen < amount_fen and not allow_partial):
            # Raising rolls back the transaction: the payment code stays unused.
            raise WalletError(
                ErrorCode.INSUFFICIENT_FUNDS,
                "the patient's own and shared accounts do not cover the amount",
            )
        patient_id: int = patient["id"]
        giver_persons = _giver_persons(plan, patient)
        settlement_id = await _record(
            conn,
            institution,
            now=now,
            reference=reference,
            request_hash=request_hash,
            patient_id=patient_id,
            category=category,
            requested_fen=amount_fen,
            covered_fen=covered_fen,
            plan=plan,
            payee_account_id=patient["payee"],
            giver_persons=giver_persons,
            patient_name=patient["name"],
        )
        # Cross-province givers hear from their own node (QUOTA_USED, one per quota drawn on).
        drawn = [(c.account_id, fen) for c, fen in plan if c.source == "quota"]
        await spend_notices.quotas_drawn(conn, "spent", drawn, now, settlement_id=settlement_id)
        if any(c.source == "quota" for c, _ in plan):
            # A quota's giver is named by the quota row: read the view as a replay would.
            view = await _settlement_view(conn, settlement_id)
        else:
            view = _new_view(
                reference, settlement_id, category, patient["name"], amount_fen, plan, names, now
            )
    # The givers' notifications committed with the settlement: wake their event streams.
    notification_stream.announce(ctx, [p for p in giver_persons if p is not None])
    if patient["payee"] == institution.account_id and code_hash[0] % INSTITUTION_SLOTS:
        # Paid into the main account: this slot's sub-account was not opened yet (an
        # institution registered before sub-accounts). Open it for the next payments; the
        # payment is committed, so a failure here is not the payment's.
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute(_OPEN_SLOT, _payee_code(institution, code_hash))
    return view


def _new_view(
    reference: str,
    settlement_id: int,
    category: str,
    patient_name: str,
    amount_fen: int,
    plan: list[tuple[Candidate, int]],
    names: dict[int, str],
    now: dt.datetime,
) -> SettlementView:
    """The view of a settlement just written, from what was written (as `_settlement_view`
    would read it back)."""
    covered_fen = sum(take for _, take in plan)
    return SettlementView(
        reference=reference,
        settlement_id=settlement_id,
        category=SettlementCategory(category),
        patient_name_masked=mask_name(patient_name),
        requested_fen=amount_fen,
        amount_fen=covered_fen,
        remainder_fen=amount_fen - covered_fen,
        refunded_fen=0,
        sources=[
            SourceView(
                seq=seq,
                source=c.source,
                amount_fen=take,
                refunded_fen=0,
                relationship_id=c.relationship_id,
                giver_name_masked=(
                    None if c.relationship_id is None else mask_name(names[c.relationship_id])
                ),
            )
            for seq, (c, take) in enumerate(plan)
        ],
        created_at=now,
    )


def _giver_persons(plan: list[tuple[Candidate, int]], taken: asyncpg.Record) -> list[int | None]:
    """Per source of the plan, the person id of the in-province giver who pays it (None for
    the patient's own account and quotas: their givers are told by their own node)."""
    person_of = dict(zip(taken["giver_relationships"], taken["giver_persons"], strict=True))
    return [
        person_of[c.relationship_id] if c.source == "giver" and c.relationship_id else None
        for c, _ in plan
    ]


def _payee_code(institution: SettlingInstitution, code_hash: bytes) -> str:
    """The institution account this payment goes to: a slot by the payment code, so one
    institution's concurrent payments mostly lock different account rows."""
    return account_code(institution.code, code_hash[0] % INSTITUTION_SLOTS)


async def _take(
    conn: asyncpg.Connection, institution: SettlingInstitution, code_hash: bytes, now: dt.datetime
) -> asyncpg.Record:
    """Consume the code and lock the patient, givers, quotas and accounts (`_TAKE`); return
    its one row. Refused: an unknown, used or expired code, a patient not in normal status."""
    taken: asyncpg.Record | None = await conn.fetchrow(
        _TAKE, code_hash, now, institution.account_id, _payee_code(institution, code_hash)
    )
    if taken is not None:
        if taken["status"] != "normal":
            raise WalletError(
                ErrorCode.PERSON_NOT_ELIGIBLE, "the patient is not in normal insured status"
            )
        return taken
    row = await conn.fetchrow(_CODE_STATE, code_hash)
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, "unknown payment code")
    if row["used_at"] is not None:
        raise WalletError(ErrorCode.PAYMENT_CODE_USED, "the payment code was already used")
    raise WalletError(ErrorCode.PAYMENT_CODE_EXPIRED, "the payment code has expired")


def _rank_givers(
    strategy: DeductionStrategy, givers: Sequence[quota.SharedSource]
) -> list[quota.SharedSource]:
    """The in-province givers in the province's order (RULES 19), by the balances read under
    the account locks: `filing_order` by relationship id, `giver_balance_desc` the larger
    available balance first, `receiver_order` the receiver's priorities (unset last); ties
    by relationship id."""

    def key(g: quota.SharedSource) -> tuple[int, int, int]:
        relationship_id = g.relationship_id or 0
        if strategy == "giver_balance_desc":
            return 0, -g.available_fen, relationship_id
        if strategy == "receiver_order" and g.priority is not None:
            return 0, g.priority, relationship_id
        if strategy == "receiver_order":
            return 1, 0, relationship_id
        return 0, 0, relationship_id

    return sorted(givers, key=key)


async def _rank_sources(
    conn: asyncpg.Connection, rules: ProvinceRules, taken: asyncpg.Record
) -> tuple[list[Candidate], dict[int, str]]:
    """Rank the sources by the balances `_take` read under its locks: own account first,
    then givers and quotas by the province's strategy. Also returns the givers' names by
    relationship."""
    available = dict(zip(taken["account_ids"], taken["available_fen"], strict=True))
    own_account_id: int | None = taken["personal_account_id"]
    candidates: list[Candidate] = []
    if own_account_id is not None:
        candidates.append(Candidate("own", own_account_id, None, available[own_account_id]))
    givers = [
        quota.SharedSource("giver", account_id, relationship_id, available[account_id], filed, prio)
        for relationship_id, account_id, filed, prio in zip(
            taken["giver_relationships"],
            taken["giver_accounts"],
            taken["giver_filed_at"],
            taken["giver_priorities"],
            strict=True,
        )
    ]
    quotas = [
        quota.SpendableQuota(
            account_id=account_id, relation_id=relation_id, from_node=from_node, created_at=at
        )
        for account_id, relation_id, from_node, at in zip(
            taken["quota_accounts"],
            taken["quota_relations"],
            taken["quota_from_nodes"],
            taken["quota_created_at"],
            strict=True,
        )
    ]
    # Cross-province quotas go among the givers by the same strategy (RULES 19).
    quota_sources = await quota.quota_sources(conn, taken["id"], quotas)
    candidates.extend(
        Candidate(s.source, s.account_id, s.relationship_id, s.available_fen)
        for s in quota.rank_shared_sources(
            rules.deduction_strategy, _rank_givers(rules.deduction_strategy, givers), quota_sources
        )
    )
    # Refunds find their source by account: each account may appear once.
    assert len({c.account_id for c in candidates}) == len(candidates), "a source account repeats"
    return candidates, dict(zip(taken["giver_relationships"], taken["giver_names"], strict=True))


async def _record(
    conn: asyncpg.Connection,
    institution: SettlingInstitution,
    *,
    now: dt.datetime,
    reference: str,
    request_hash: bytes,
    patient_id: int,
    category: str,
    requested_fen: int,
    covered_fen: int,
    plan: list[tuple[Candidate, int]],
    payee_account_id: int,
    giver_persons: list[int | None],
    patient_name: str,
) -> int:
    """Write the settlement, its sources, transfers, audit event and the notifications of
    the in-province givers who paid (one round trip; `giver_persons` by source)."""
    detail = {
        "reference": reference,
        "patient": f"person:{patient_id}",
        "category": category,
        "requested_fen": requested_fen,
        "amount_fen": covered_fen,
        "sources": [
            {"source": c.source, "account_id": c.account_id, "amount_fen": take} for c, take in plan
        ],
    }
    try:
        settlement_id: int = await conn.fetchval(
            _RECORD,
            institution.institution_id,
            reference,
            request_hash,
            patient_id,
            category,
            requested_fen,
            covered_fen,
            now,
            [c.source for c, _ in plan],
            [c.account_id for c, _ in plan],
            [c.relationship_id for c, _ in plan],
            [take for _, take in plan],
            payee_account_id,
            f"institution:{institution.institution_id}",
            audit.current_request_id(),
            json.dumps(detail),
            giver_persons,
            mask_name(patient_name),
        )
    except asyncpg.UniqueViolationError as exc:
        raise _ReferenceTaken from exc
    except asyncpg.CheckViolationError as exc:
        # Balances were read under the locks, so this cannot happen; never a 500 if it does.
        if exc.constraint_name == "account_no_overdraft":
            raise WalletError(
                ErrorCode.INSUFFICIENT_FUNDS, "the account does not have enough available"
            ) from exc
        raise
    return settlement_id


async def _replay_settlement(
    conn: asyncpg.Connection,
    institution: SettlingInstitution,
    reference: str,
    request_hash: bytes,
) -> SettlementView | None:
    row = await conn.fetchrow(_FIND_SETTLEMENT, institution.institution_id, reference)
    if row is None:
        return None
    if row["request_hash"] != request_hash:
        raise WalletError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            f"reference {reference} was already used for another settlement",
        )
    return await _settlement_view(conn, row["id"])


async def _settlement_view(conn: asyncpg.Connection, settlement_id: int) -> SettlementView:
    s = await conn.fetchrow(_SETTLEMENT_VIEW, settlement_id)
    sources = [
        SourceView(
            seq=r["seq"],
            source=r["source"],
            amount_fen=r["amount_fen"],
            refunded_fen=r["refunded_fen"],
            relationship_id=r["relationship_id"],
            giver_name_masked=None if r["giver_name"] is None else mask_name(r["giver_name"]),
        )
        for r in await conn.fetch(_SOURCES_VIEW, settlement_id)
    ]
    return SettlementView(
        reference=s["reference"],
        settlement_id=s["id"],
        category=SettlementCategory(s["category"]),
        patient_name_masked=mask_name(s["patient_name"]),
        requested_fen=s["requested_fen"],
        amount_fen=s["amount_fen"],
        remainder_fen=s["requested_fen"] - s["amount_fen"],
        refunded_fen=s["refunded_fen"],
        sources=sources,
        created_at=s["created_at"],
    )


# --- input checks ----------------------------------------------------------------------------


def _check_amount(amount_fen: int) -> None:
    if not 0 < amount_fen <= MAX_AMOUNT_FEN:
        raise WalletError(
            ErrorCode.AMOUNT_INVALID,
            f"an amount is a whole number of fen from 1 to {MAX_AMOUNT_FEN}",
        )


def _check_reference(reference: str, *, for_lookup: bool = False) -> None:
    if _REFERENCE.match(reference):
        return
    if for_lookup:  # a reference that cannot be stored was never stored
        raise WalletError(ErrorCode.NOT_FOUND, "no settlement has that reference")
    raise WalletError(ErrorCode.INVALID_REQUEST, "a reference is 1-64 letters, digits and _ . : -")


def _hash(*fields: object) -> bytes:
    """Canonical digest of a request's meaningful fields, for idempotent replays."""
    return hashlib.sha256(msgspec.json.encode(list(fields))).digest()
