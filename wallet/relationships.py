"""Relationships between close relatives in the province (RULES 1-8).

A relationship is a directed pair giver -> receiver. Its life:

    pending_confirmation --receiver confirms--> active
                         --receiver confirms, review required--> pending_review
                                   --operator approves--> active
                                   --operator rejects--> rejected
                         --receiver declines--> declined
    any live state --either party ends (or the roster ends it, RULES 6)--> ended

Every transition is one guarded UPDATE (`... WHERE state = <expected> RETURNING id`): two
racing requests cannot both win, and a miss is explained afterwards as not_found or
state_conflict. Views show the other party's masked name and ID number only.

Filing checks the parties (RULES 1-2, 4): an employee-scheme giver in normal status with an
open wallet; a receiver of any scheme in normal status on this province's roster; not
oneself; a relation type the province accepts; at most `max_receivers_per_giver` live
receivers. A receiver insured in another province is the cross-province flow (PLT/1) and
is refused here for now with `relationship_not_allowed` (reason `receiver_in_other_province`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from enum import StrEnum
from typing import Literal
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import structlog

from wallet import audit, devices, notices
from wallet.context import WalletContext
from wallet.devices import DeviceSignature, filing_ids
from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import age_on, normalize_id_number
from wallet.notifications import Kind
from wallet.privacy import mask_id_number, mask_name
from wallet.rules import ProvinceRules, RelationType

# Relationship ids are BIGINT: anything outside cannot exist (and must not reach asyncpg).
MAX_ROW_ID = 2**63 - 1
# Caps on list answers (TIGER_STYLE: a limit on everything).
MAX_LISTED = 500
# Minors' relationships are filed by a guardian (RULES 5); we record the age at filing.
GUARDIAN_AGE = 16


class RelationshipState(StrEnum):
    PENDING_CONFIRMATION = "pending_confirmation"
    PENDING_REVIEW = "pending_review"
    ACTIVE = "active"
    DECLINED = "declined"
    REJECTED = "rejected"
    ENDED = "ended"


Role = Literal["giver", "receiver"]


class RelationshipView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A relationship as one party (or an operator) sees it.

    A party sees only the other side, masked: the giver's own name and ID number fields
    are null in the giver's view, the receiver's in the receiver's. An operator sees both
    sides, masked, and the evidence reference.
    """

    id: int
    viewer: Literal["giver", "receiver", "operator"]
    relation_type: RelationType
    state: RelationshipState
    giver_name_masked: str | None
    giver_id_number_masked: str | None
    receiver_name_masked: str | None
    receiver_id_number_masked: str | None
    receiver_under_16_at_filing: bool
    receiver_priority: int | None
    evidence_ref: str | None
    filed_at: dt.datetime
    confirmed_at: dt.datetime | None
    reviewed_at: dt.datetime | None
    ended_at: dt.datetime | None
    ended_by: str | None


_END_ALL_FOR_PERSON = """
UPDATE relationship
SET state = 'ended', ended_at = $2, ended_by = 'system', end_reason = $3
WHERE (giver_person_id = $1 OR receiver_person_id = $1)
  AND state IN ('pending_confirmation', 'pending_review', 'active')
RETURNING id
"""

# Filing: the giver's row is locked so that concurrent filings by one giver queue and the
# receiver limit (RULES 4) is counted over committed rows only. NO KEY UPDATE does not
# block rows elsewhere that merely reference the person.
_LOCK_GIVER = """
SELECT p.id, p.scheme, p.status, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id = $1
FOR NO KEY UPDATE OF p
"""
_RECEIVER_BY_ID_NUMBER = "SELECT id, name, status FROM insured_person WHERE id_number = $1"
_INSERT = """
INSERT INTO relationship
    (giver_person_id, receiver_person_id, relation_type, evidence_ref, state, filed_at)
VALUES ($1, $2, $3, $4, 'pending_confirmation', $5)
RETURNING id
"""
_LIVE_PAIR = """
SELECT id, relation_type, evidence_ref FROM relationship
WHERE giver_person_id = $1 AND receiver_person_id = $2
  AND state IN ('pending_confirmation', 'pending_review', 'active')
"""
_COUNT_LIVE_RECEIVERS = """
SELECT count(*) FROM relationship
WHERE giver_person_id = $1 AND state IN ('pending_confirmation', 'pending_review', 'active')
"""

_CONFIRM = """
UPDATE relationship
SET state = CASE WHEN $3 THEN 'pending_review' ELSE 'active' END, confirmed_at = $4
WHERE id = $1 AND receiver_person_id = $2 AND state = 'pending_confirmation'
RETURNING id
"""
_DECLINE = """
UPDATE relationship SET state = 'declined'
WHERE id = $1 AND receiver_person_id = $2 AND state = 'pending_confirmation'
RETURNING id
"""
_END = """
UPDATE relationship
SET state = 'ended', ended_at = $3, end_reason = $4,
    ended_by = CASE WHEN giver_person_id = $2 THEN 'giver' ELSE 'receiver' END
WHERE id = $1 AND (giver_person_id = $2 OR receiver_person_id = $2)
  AND state IN ('pending_confirmation', 'pending_review', 'active')
RETURNING id
"""
_REVIEW = """
UPDATE relationship
SET state = CASE WHEN $2 THEN 'active' ELSE 'rejected' END, reviewed_at = $3
WHERE id = $1 AND state = 'pending_review'
RETURNING id
"""
# Rows are locked in id order before the reordering UPDATE, which would lock them in scan
# order and could deadlock with a payment share-locking them in id order.
_LOCK_RECEIVING = """
SELECT id FROM relationship
WHERE receiver_person_id = $1 AND state IN ('pending_confirmation', 'pending_review', 'active')
ORDER BY id
FOR UPDATE
"""
# The receiver's order of their givers: listed relationships get their 1-based position,
# the others none (they come after, in filing order).
_SET_ORDER = """
UPDATE relationship SET receiver_priority = array_position($2::bigint[], id)
WHERE receiver_person_id = $1 AND state IN ('pending_confirmation', 'pending_review', 'active')
RETURNING id
"""
# Where a relationship is when a transition did not apply: to tell an absent row, a replay
# of an action that already took effect, and a state that contradicts the action.
_FOUND = "SELECT state, confirmed_at, reviewed_at FROM relationship"
_STATE_FOR_PARTY = _FOUND + " WHERE id = $1 AND (giver_person_id = $2 OR receiver_person_id = $2)"
_STATE_FOR_RECEIVER = _FOUND + " WHERE id = $1 AND receiver_person_id = $2"
_STATE = _FOUND + " WHERE id = $1"

_VIEW_COLUMNS = """
SELECT r.id, r.relation_type, r.state, r.evidence_ref, r.receiver_priority, r.filed_at,
       r.confirmed_at, r.reviewed_at, r.ended_at, r.ended_by,
       r.giver_person_id, g.name AS giver_name, g.id_number AS giver_id_number,
       r.receiver_person_id, v.name AS receiver_name, v.id_number AS receiver_id_number
FROM relationship r
JOIN insured_person g ON g.id = r.giver_person_id
JOIN insured_person v ON v.id = r.receiver_person_id
"""
_VIEW_BY_ID = _VIEW_COLUMNS + "WHERE r.id = $1"
_VIEWS_OF_PERSON = (
    _VIEW_COLUMNS
    + """
WHERE ((r.giver_person_id = $1 AND $2::text IS DISTINCT FROM 'receiver')
    OR (r.receiver_person_id = $1 AND $2::text IS DISTINCT FROM 'giver'))
  AND ($3::text IS NULL OR r.state = $3::text)
ORDER BY r.id
LIMIT $4
"""
)
_VIEWS_PENDING_REVIEW = _VIEW_COLUMNS + "WHERE r.state = 'pending_review' ORDER BY r.id LIMIT $1"


async def end_all_for_person(
    conn: asyncpg.Connection, person_id: int, *, reason: str, now: dt.datetime
) -> list[int]:
    """End every live relationship of a person (RULES 6); return the ids ended.

    Runs inside the caller's transaction, so the status change and the endings commit together.
    """
    rows = await conn.fetch(_END_ALL_FOR_PERSON, person_id, now, reason)
    ended = [r["id"] for r in rows]
    await notices.relationships_changed(
        conn, ended, Kind.RELATIONSHIP_ENDED_AUTOMATICALLY, "both", now
    )
    return ended


# --- filing ----------------------------------------------------------------------------


async def file(
    ctx: WalletContext,
    giver_person_id: int,
    *,
    receiver_id_number: str,
    receiver_name: str,
    relation_type: RelationType,
    evidence_ref: str,
    payment_password: str | None = None,
    receiver_province: str | None = None,
    device: DeviceSignature | None = None,
) -> RelationshipView:
    """The giver files a relationship with a close relative (RULES 1-5); it then waits for
    the receiver's confirmation."""
    id_number = normalize_id_number(receiver_id_number)
    _check_relation_type(ctx.rules, relation_type)
    if receiver_province is not None and receiver_province != ctx.province_code:
        raise WalletError(
            ErrorCode.RELATIONSHIP_NOT_ALLOWED,
            f"the receiver is insured in province {receiver_province}; cross-province "
            "relationships are not available at this node yet",
            reason="receiver_in_other_province",
        )
    # The password or device signature is checked (and a failure counted) before the
    # action's transaction.
    await devices.authorise(
        ctx, giver_person_id, payment_password=payment_password, device=device,
        action="relation.file", ids=filing_ids(ctx.province_code, id_number, relation_type),
    )  # fmt: skip
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        _check_giver(await conn.fetchrow(_LOCK_GIVER, giver_person_id))
        receiver_id = await _find_receiver(conn, id_number, receiver_name, giver_person_id)
        live = await conn.fetchrow(_LIVE_PAIR, giver_person_id, receiver_id)
        if live is not None:
            if (live["relation_type"], live["evidence_ref"]) != (relation_type, evidence_ref):
                raise WalletError(
                    ErrorCode.ALREADY_EXISTS,
                    "a live relationship with this receiver already exists",
                )
            # The same filing again (its first answer lost): answer where it stands now.
            return await _view(conn, ctx, live["id"], giver_person_id)
        try:
            relationship_id: int = await conn.fetchval(
                _INSERT, giver_person_id, receiver_id, relation_type.value, evidence_ref, now
            )
        except asyncpg.UniqueViolationError as exc:
            raise WalletError(
                ErrorCode.ALREADY_EXISTS,
                "a live relationship with this receiver already exists",
            ) from exc
        # Counted after the insert, under the giver's lock: the new row is included.
        await _check_receiver_limit(conn, ctx.rules, giver_person_id)
        view = await _view(conn, ctx, relationship_id, giver_person_id)
        await _audit(
            conn,
            now,
            f"person:{giver_person_id}",
            "relationship.file",
            relationship_id,
            relation_type=relation_type.value,
            receiver_under_16=view.receiver_under_16_at_filing,
        )
        await notices.relationships_changed(
            conn, [relationship_id], Kind.RELATIONSHIP_REQUESTED, "receiver", now
        )
    return view


def _check_relation_type(rules: ProvinceRules, relation_type: RelationType) -> None:
    if relation_type not in rules.allowed_relation_types:
        allowed = ", ".join(t.value for t in rules.allowed_relation_types)
        raise WalletError(
            ErrorCode.RELATIONSHIP_NOT_ALLOWED,
            f"this province accepts only these relation types: {allowed}",
            reason="relation_type_not_accepted",
        )


def _check_giver(row: asyncpg.Record | None) -> None:
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, "the giver is not on the roster")
    if row["scheme"] != "employee":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE,
            "only members of the employee scheme can share their personal account (RULES 1)",
        )
    if row["status"] != "normal":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE, "the giver is not in normal insured status"
        )
    if row["wallet_state"] != "open":
        raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "the giver has no open wallet")


async def _find_receiver(
    conn: asyncpg.Connection, id_number: str, name: str, giver_person_id: int
) -> int:
    row = await conn.fetchrow(_RECEIVER_BY_ID_NUMBER, id_number)
    # Unknown number and wrong name give the same answer: the roster is not a lookup service.
    if row is None or row["name"].strip() != name.strip():
        raise WalletError(
            ErrorCode.NOT_FOUND,
            "no one on this province's roster has that ID number and name; a receiver "
            "insured in another province needs `receiver_province`",
        )
    receiver_id: int = row["id"]
    if receiver_id == giver_person_id:
        raise WalletError(
            ErrorCode.RELATIONSHIP_NOT_ALLOWED,
            "a person cannot share with themselves",
            reason="self",
        )
    if row["status"] != "normal":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE, "the receiver is not in normal insured status"
        )
    return receiver_id


async def _check_receiver_limit(
    conn: asyncpg.Connection, rules: ProvinceRules, giver_person_id: int
) -> None:
    limit = rules.max_receivers_per_giver
    if limit is None:
        return
    live: int = await conn.fetchval(_COUNT_LIVE_RECEIVERS, giver_person_id)
    if live > limit:
        raise WalletError(
            ErrorCode.RELATIONSHIP_NOT_ALLOWED,
            f"a giver may share with at most {limit} receivers in this province (RULES 4)",
            reason="receiver_limit",
            limit=limit,
        )


# --- the receiver's answer, ending, ordering ---------------------------------------------


async def confirm(
    ctx: WalletContext,
    receiver_person_id: int,
    relationship_id: int,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> RelationshipView:
    """The receiver agrees from their own wallet (RULES 5). Under-16s confirm from the wallet
    a guardian opened for them. Becomes active, or pending review where the province asks."""
    await devices.authorise(
        ctx, receiver_person_id, payment_password=payment_password, device=device,
        action="relation.confirm", ids={"relationship_id": str(relationship_id)},
    )  # fmt: skip
    now = ctx.clock.now()
    review = ctx.rules.relationship_review_required
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await _guarded(
            conn,
            _CONFIRM,
            (_row_id(relationship_id), receiver_person_id, review, now),
            _STATE_FOR_RECEIVER,
            receiver_person_id,
            done=_confirmed,
        ):
            await _audit(
                conn, now, f"person:{receiver_person_id}", "relationship.confirm", relationship_id
            )
            await notices.relationships_changed(
                conn, [relationship_id], Kind.RELATIONSHIP_CONFIRMED, "giver", now
            )
        return await _view(conn, ctx, relationship_id, receiver_person_id)


async def decline(
    ctx: WalletContext, receiver_person_id: int, relationship_id: int
) -> RelationshipView:
    """The receiver refuses a filed relationship; nothing is shared."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await _guarded(
            conn,
            _DECLINE,
            (_row_id(relationship_id), receiver_person_id),
            _STATE_FOR_RECEIVER,
            receiver_person_id,
            done=_in_state(RelationshipState.DECLINED),
        ):
            await _audit(
                conn, now, f"person:{receiver_person_id}", "relationship.decline", relationship_id
            )
            await notices.relationships_changed(
                conn, [relationship_id], Kind.RELATIONSHIP_DECLINED, "giver", now
            )
        return await _view(conn, ctx, relationship_id, receiver_person_id)


async def end(
    ctx: WalletContext,
    person_id: int,
    relationship_id: int,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> RelationshipView:
    """Either party ends the relationship at any time (RULES 6): no new sharing afterwards;
    nothing already spent is reversed (RULES 7)."""
    await devices.authorise(
        ctx, person_id, payment_password=payment_password, device=device,
        action="relation.end", ids={"relationship_id": str(relationship_id)},
    )  # fmt: skip
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await _guarded(
            conn,
            _END,
            (_row_id(relationship_id), person_id, now, "ended by a party"),
            _STATE_FOR_PARTY,
            person_id,
            done=_in_state(RelationshipState.ENDED),
        ):
            await _audit(conn, now, f"person:{person_id}", "relationship.end", relationship_id)
            await notices.relationships_changed(
                conn, [relationship_id], Kind.RELATIONSHIP_ENDED, "both", now
            )
        return await _view(conn, ctx, relationship_id, person_id)


async def set_receiver_order(
    ctx: WalletContext, receiver_person_id: int, relationship_ids: list[int]
) -> list[RelationshipView]:
    """The receiver orders their givers (used when the strategy is `receiver_order`).

    Every listed id must be one of the receiver's live relationships; unlisted ones lose
    their place and come after the listed ones, in filing order.
    """
    if len(set(relationship_ids)) != len(relationship_ids):
        raise WalletError(ErrorCode.INVALID_REQUEST, "a relationship is listed twice")
    wanted = [_row_id(i) for i in relationship_ids]
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(_LOCK_RECEIVING, receiver_person_id)
        rows = await conn.fetch(_SET_ORDER, receiver_person_id, wanted)
        missing = set(wanted) - {r["id"] for r in rows}
        if missing:
            # Raising rolls the whole reordering back.
            raise WalletError(
                ErrorCode.NOT_FOUND,
                f"not live relationships of yours as receiver: {sorted(missing)}",
            )
        records = await conn.fetch(
            _VIEWS_OF_PERSON, receiver_person_id, "receiver", None, MAX_LISTED
        )
    return [_to_view(r, receiver_person_id, ctx.rules.timezone) for r in records]


# --- reading -------------------------------------------------------------------------------


async def list_for_person(
    ctx: WalletContext,
    person_id: int,
    *,
    role: Role | None = None,
    state: RelationshipState | None = None,
) -> list[RelationshipView]:
    """A person's relationships, as giver, receiver or both, optionally in one state."""
    records = await ctx.pool.fetch(
        _VIEWS_OF_PERSON, person_id, role, state.value if state else None, MAX_LISTED
    )
    return [_to_view(r, person_id, ctx.rules.timezone) for r in records]


# --- operator review (RULES 5, `relationship_review_required`) --------------------------


async def list_pending_review(ctx: WalletContext) -> list[RelationshipView]:
    """Confirmed relationships waiting for an operator, oldest first."""
    records = await ctx.pool.fetch(_VIEWS_PENDING_REVIEW, MAX_LISTED)
    return [_to_view(r, None, ctx.rules.timezone) for r in records]


async def review(
    ctx: WalletContext, relationship_id: int, *, approve: bool, actor: str
) -> RelationshipView:
    """An operator approves (-> active) or rejects (-> rejected) a relationship under review;
    the decision, its audit record and both parties' notifications commit together."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        done = _approved if approve else _in_state(RelationshipState.REJECTED)
        args = (_row_id(relationship_id), approve, now)
        if await _guarded(conn, _REVIEW, args, _STATE, None, done=done):
            action = "relationship.approve" if approve else "relationship.reject"
            await _audit(conn, now, actor, action, relationship_id)
            kind = Kind.RELATIONSHIP_APPROVED if approve else Kind.RELATIONSHIP_REJECTED
            await notices.relationships_changed(conn, [relationship_id], kind, "both", now)
        return await _view(conn, ctx, relationship_id, None)


# --- helpers -------------------------------------------------------------------------------


def _row_id(value: int) -> int:
    if not 0 < value <= MAX_ROW_ID:
        raise WalletError(ErrorCode.NOT_FOUND, f"relationship {value} does not exist")
    return value


def _confirmed(row: asyncpg.Record) -> bool:
    return row["confirmed_at"] is not None


def _approved(row: asyncpg.Record) -> bool:
    return row["reviewed_at"] is not None and row["state"] != RelationshipState.REJECTED


def _in_state(state: RelationshipState) -> Callable[[asyncpg.Record], bool]:
    return lambda row: row["state"] == state


async def _guarded(
    conn: asyncpg.Connection,
    statement: str,
    args: tuple[object, ...],
    explain: str,
    person_id: int | None,
    *,
    done: Callable[[asyncpg.Record], bool],
) -> bool:
    """Run a guarded transition: True if it applied, False if `done` says the same action
    already took effect (a replay, answered with the current state); else say whether the
    row is absent or in a state that contradicts the action."""
    if await conn.fetchval(statement, *args) is not None:
        return True
    relationship_id = args[0]
    lookup = (relationship_id,) if person_id is None else (relationship_id, person_id)
    row = await conn.fetchrow(explain, *lookup)
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, f"relationship {relationship_id} does not exist")
    if done(row):
        return False
    state = row["state"]
    raise WalletError(
        ErrorCode.STATE_CONFLICT,
        f"relationship {relationship_id} is {state}; this action is not possible now",
        state=state,
    )


async def _view(
    conn: asyncpg.Connection,
    ctx: WalletContext,
    relationship_id: int,
    viewer_person_id: int | None,
) -> RelationshipView:
    record = await conn.fetchrow(_VIEW_BY_ID, relationship_id)
    if record is None:
        raise WalletError(ErrorCode.NOT_FOUND, f"relationship {relationship_id} does not exist")
    return _to_view(record, viewer_person_id, ctx.rules.timezone)


def _to_view(r: asyncpg.Record, viewer_person_id: int | None, timezone: str) -> RelationshipView:
    viewer: Literal["giver", "receiver", "operator"]
    if viewer_person_id is None:
        viewer = "operator"
    elif viewer_person_id == r["giver_person_id"]:
        viewer = "giver"
    else:
        viewer = "receiver"
    filed_day = r["filed_at"].astimezone(ZoneInfo(timezone)).date()
    return RelationshipView(
        id=r["id"],
        viewer=viewer,
        relation_type=RelationType(r["relation_type"]),
        state=RelationshipState(r["state"]),
        giver_name_masked=None if viewer == "giver" else mask_name(r["giver_name"]),
        giver_id_number_masked=None if viewer == "giver" else mask_id_number(r["giver_id_number"]),
        receiver_name_masked=None if viewer == "receiver" else mask_name(r["receiver_name"]),
        receiver_id_number_masked=None
        if viewer == "receiver"
        else mask_id_number(r["receiver_id_number"]),
        receiver_under_16_at_filing=age_on(r["receiver_id_number"], filed_day) < GUARDIAN_AGE,
        receiver_priority=r["receiver_priority"],
        # The evidence (a hukou or birth-certificate number) is the giver's filing.
        evidence_ref=None if viewer == "receiver" else r["evidence_ref"],
        filed_at=r["filed_at"],
        confirmed_at=r["confirmed_at"],
        reviewed_at=r["reviewed_at"],
        ended_at=r["ended_at"],
        ended_by=r["ended_by"],
    )


async def _audit(
    conn: asyncpg.Connection,
    now: dt.datetime,
    actor: str,
    action: str,
    relationship_id: int,
    **detail: object,
) -> None:
    await audit.record(
        conn,
        at=now,
        actor=actor,
        action=action,
        subject=f"relationship:{relationship_id}",
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        **detail,
    )
