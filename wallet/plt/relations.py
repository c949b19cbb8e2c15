"""Cross-province relationships (RULES 5-8; DESIGN "Cross-province quota", step 1).

The giver files at the giver's node (A); A sends a signed REL_REQUEST to the node of the
relative's province (B, found through the peer directory, never through the ID number's
address code, RULES 22). B checks the receiver against its roster and answers REL_REPLY; the
receiver confirms or declines in their own app at B, which sends REL_CONFIRM or REL_DECLINE
back to A. Either party ends it at their own node, which sends REL_END to the other. A change
of insured status away from normal ends a person's relationships at their node (RULES 6).

    A (side 'giver')                                    B (side 'receiver')
    requested ---------- REL_REQUEST ---------------->  pending_confirmation | refused
              <--------- REL_REPLY OK | REFUSED -------   (3204 no open wallet, 5105 roster)
    refused   (on REFUSED)
    active    <--------- REL_CONFIRM -----------------  active        (receiver, password)
    declined  <--------- REL_DECLINE -----------------  declined      (receiver)
    ended     <-------- REL_END ---------------------->  ended         (either side, or status)

Every transition is a guarded UPDATE on a locked row, in the same transaction as the
outbox row of the message it causes and the audit event. Every received message is applied
once per (relationship, typ) and its reply stored (`cross_relationship_message`): a
duplicate gets the stored reply, the same relation id with another body gets 3106 and the
differing fields. A REL_END for a relation never seen leaves an `ended` tombstone, so a late
REL_REQUEST is refused instead of opening a relationship that its giver already ended.

When a relationship ends, the hooks in `ON_RELATION_ENDED` (receiver side, at B) and
`ON_GIVER_RELATION_ENDED` (giver side, at A) run inside the ending transaction: the grants
code closes unused quota there and queues RELEASE (RULES 7).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Literal

import asyncpg
import msgspec
import structlog

from protocol.errors import (
    ErrorCode,
    ModifiedRequest,
    UnknownPeer,
    ValidationFailed,
)
from protocol.ids import is_uuid7, uuid7
from protocol.messages import (
    Acceptance,
    Body,
    ErrorBody,
    GiverRef,
    MessageType,
    RelConfirm,
    RelDecline,
    RelEnd,
    RelReceiver,
    RelReply,
    RelRequest,
    body_hash,
    decode_body,
    differing_fields,
    encode_body,
)
from protocol.messages import RelationType as WireRelationType
from wallet import audit
from wallet.context import WalletContext
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.idnumber import normalize_id_number
from wallet.payment_password import verify_payment_password
from wallet.plt import outbox
from wallet.plt.dispatch import Incoming, handles
from wallet.privacy import mask_id_number, mask_name
from wallet.rules import RelationType

log = structlog.get_logger("wallet.plt.relations")

MAX_LISTED = 500
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
NAME_CHARS_MAX = 64  # RelReceiver.name on the wire


class CrossState(StrEnum):
    REQUESTED = "requested"  # giver side: filed, waiting for the receiver
    PENDING_CONFIRMATION = "pending_confirmation"  # receiver side: waiting for the receiver
    ACTIVE = "active"
    DECLINED = "declined"
    REFUSED = "refused"  # the receiver's node refused the request (3204, 5105, ...)
    ENDED = "ended"


Side = Literal["giver", "receiver"]
LIVE_STATES = ("requested", "pending_confirmation", "active")


class CrossRelation(msgspec.Struct, frozen=True):
    """One side's row of a cross-province relationship (what the grants code reads).

    Giver side: `person_id` is the giver, `other_ref` the receiver's wallet at B (set by
    REL_CONFIRM; PREPAREs address it). Receiver side: `person_id` is the receiver,
    `other_ref` the giver's account reference at A, `other_name` the giver's masked name.
    """

    id: int
    relation_id: str
    side: Side
    peer_node: str
    person_id: int | None
    other_name: str | None
    other_ref: str | None
    relation_type: str | None
    state: CrossState
    filed_at: dt.datetime
    confirmed_at: dt.datetime | None
    ended_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.state is CrossState.ACTIVE


class Refusal(msgspec.Struct, frozen=True):
    """Why the receiver's node refused the filing: the PLT/1 code and its text."""

    code: int
    text: str


class CrossRelationshipView(msgspec.Struct, frozen=True):
    """A cross-province relationship as one party sees it.

    Only the other party is shown, masked. The receiver's node never learns the giver's ID
    number, so `other_id_number_masked` is null in the receiver's view.
    """

    relation_id: str
    viewer: Side
    relation_type: RelationType | None
    state: CrossState
    other_node: str
    other_province: str | None
    other_name_masked: str | None
    other_id_number_masked: str | None
    evidence_ref: str | None
    refusal: Refusal | None
    filed_at: dt.datetime
    delivered_at: dt.datetime | None
    confirmed_at: dt.datetime | None
    declined_at: dt.datetime | None
    ended_at: dt.datetime | None
    ended_by: str | None
    end_reason: str | None


RelationEndedHook = Callable[
    [WalletContext, asyncpg.Connection, CrossRelation, dt.datetime], Awaitable[None]
]
# Run inside the transaction that ends a relationship (by a party, by a REL_END from the
# peer, by a status change, by the giver's node refusing a confirmation). Receiver side, at
# B: close unused quota and queue RELEASE. Giver side, at A: whatever A must do.
ON_RELATION_ENDED: list[RelationEndedHook] = []
ON_GIVER_RELATION_ENDED: list[RelationEndedHook] = []

ReplyHook = Callable[[WalletContext, Incoming, RelReply], Awaitable[None]]
# REL_REPLY also answers RELEASE (PROTOCOL preamble): its handler is registered here, since
# dispatch takes one handler per typ.
REPLY_HOOKS: dict[MessageType, ReplyHook] = {}


def on_rel_reply(ref_typ: MessageType) -> Callable[[ReplyHook], ReplyHook]:
    """Register the handler of REL_REPLYs answering `ref_typ` (e.g. RELEASE)."""

    def register(hook: ReplyHook) -> ReplyHook:
        if REPLY_HOOKS.get(ref_typ, hook) is not hook:
            raise RuntimeError(f"REL_REPLY to {ref_typ} already has a handler")
        REPLY_HOOKS[ref_typ] = hook
        return hook

    return register


def giver_account_ref(person_id: int) -> str:
    """The giver's account as A names it to peers (opaque: no ID number leaves A)."""
    return f"p-{person_id}"


def receiver_account_ref(person_id: int) -> str:
    """The receiver's wallet as B names it in REL_CONFIRM; PREPAREs address it."""
    return f"w-{person_id}"


# --- SQL -------------------------------------------------------------------------------------

_COLUMNS = """
id, relation_id, side, peer_node, person_id, other_name, other_id_number, other_ref,
other_province, relation_type, evidence_ref, state, request_hash, refusal_code, refusal_text,
filed_at, delivered_at, confirmed_at, declined_at, ended_at, ended_by, end_reason
"""
_LOCK_GIVER = """
SELECT p.id, p.name, p.id_number, p.scheme, p.status, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id = $1
FOR NO KEY UPDATE OF p
"""
# RULES 4 counts every live receiver of the giver, in-province and cross-province.
_COUNT_LIVE_RECEIVERS = """
SELECT (SELECT count(*) FROM relationship
        WHERE giver_person_id = $1 AND state IN ('pending_confirmation', 'pending_review', 'active'))
     + (SELECT count(*) FROM cross_relationship
        WHERE side = 'giver' AND person_id = $1 AND state IN ('requested', 'active'))
"""
_INSERT_GIVER_SIDE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, person_id, other_name, other_id_number, other_province,
     relation_type, evidence_ref, state, request_hash, filed_at)
VALUES ($1, 'giver', $2, $3, $4, $5, $6, $7, $8, 'requested', $9, $10)
RETURNING id
"""
_RECEIVER_ON_ROSTER = """
SELECT p.id, p.name, p.status, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id_number = $1
FOR SHARE OF p
"""
_LIVE_RECEIVER_PAIR = """
SELECT 1 FROM cross_relationship
WHERE side = 'receiver' AND peer_node = $1 AND other_ref = $2 AND person_id = $3
  AND state IN ('pending_confirmation', 'active')
"""
_INSERT_RECEIVER_SIDE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, person_id, other_name, other_ref, relation_type,
     evidence_ref, state, request_hash, refusal_code, refusal_text, filed_at)
VALUES ($1, 'receiver', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (side, relation_id) DO NOTHING
RETURNING id
"""
_INSERT_END_TOMBSTONE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, state, filed_at, ended_at, ended_by, end_reason)
VALUES ($1, 'receiver', $2, 'ended', $3, $3, $4, $5)
ON CONFLICT (side, relation_id) DO NOTHING
RETURNING id
"""
_IS_OURS = "SELECT 1 FROM cross_relationship WHERE side = 'giver' AND relation_id = $1"
_LOCK_SIDE = (
    f"SELECT {_COLUMNS} FROM cross_relationship WHERE side = $1 AND relation_id = $2 FOR UPDATE"
)
_STORED_MESSAGE = """
SELECT body, body_hash, reply FROM cross_relationship_message
WHERE relationship_id = $1 AND typ = $2
"""
_STORE_MESSAGE = """
INSERT INTO cross_relationship_message (relationship_id, typ, body, body_hash, reply, received_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
_CONFIRMED_AT_GIVER = """
UPDATE cross_relationship SET state = 'active', confirmed_at = $2, other_ref = $3,
    delivered_at = coalesce(delivered_at, $2)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""
_DECLINED_AT_GIVER = """
UPDATE cross_relationship SET state = 'declined', declined_at = $2,
    delivered_at = coalesce(delivered_at, $2)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""
_END_ROW = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $2, ended_by = $3, end_reason = $4
WHERE id = $1 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {_COLUMNS}
"""
_DELIVERED = """
UPDATE cross_relationship SET delivered_at = $2 WHERE id = $1 AND delivered_at IS NULL
"""
_REFUSED_AT_GIVER = """
UPDATE cross_relationship SET state = 'refused', refusal_code = $2, refusal_text = $3,
    delivered_at = coalesce(delivered_at, $4)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""
_OUTBOX_BODY = "SELECT body FROM plt_outbox WHERE to_node = $1 AND typ = $2 AND dedup_key = $3"
_CONFIRM_AT_RECEIVER = f"""
UPDATE cross_relationship SET state = 'active', confirmed_at = $3
WHERE side = 'receiver' AND relation_id = $1 AND person_id = $2 AND state = 'pending_confirmation'
RETURNING {_COLUMNS}
"""
_DECLINE_AT_RECEIVER = f"""
UPDATE cross_relationship SET state = 'declined', declined_at = $3
WHERE side = 'receiver' AND relation_id = $1 AND person_id = $2 AND state = 'pending_confirmation'
RETURNING {_COLUMNS}
"""
_END_BY_PARTY = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $3, ended_by = side, end_reason = $4
WHERE relation_id = $1 AND person_id = $2 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {_COLUMNS}
"""
_END_ALL_OF_PERSON = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $2, ended_by = 'system', end_reason = $3
WHERE person_id = $1 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {_COLUMNS}
"""
_STATE_OF_PARTY = "SELECT state FROM cross_relationship WHERE relation_id = $1 AND person_id = $2"
_STATE_OF_RECEIVER = """
SELECT state FROM cross_relationship WHERE relation_id = $1 AND person_id = $2 AND side = 'receiver'
"""
_VIEW_ONE = f"SELECT {_COLUMNS} FROM cross_relationship WHERE relation_id = $1 AND person_id = $2"
_VIEWS_OF_PERSON = f"""
SELECT {_COLUMNS} FROM cross_relationship
WHERE person_id = $1 AND ($2::text IS NULL OR side = $2::text) AND ($3::text IS NULL OR state = $3::text)
ORDER BY filed_at, id
LIMIT $4
"""
_ACTIVE_FOR_GRANT = f"""
SELECT {_COLUMNS} FROM cross_relationship
WHERE side = 'giver' AND relation_id = $1 AND person_id = $2
"""
_RECEIVER_SIDE = f"""
SELECT {_COLUMNS} FROM cross_relationship
WHERE side = 'receiver' AND relation_id = $1 AND peer_node = $2
"""
_ACTIVE_OF_RECEIVER = f"""
SELECT {_COLUMNS} FROM cross_relationship
WHERE side = 'receiver' AND person_id = $1 AND state = 'active'
ORDER BY filed_at, id
"""
_FOR_SHARE = " FOR SHARE"


def _to_ms(instant: dt.datetime) -> int:
    return (instant - EPOCH) // dt.timedelta(milliseconds=1)


def _relation(row: asyncpg.Record) -> CrossRelation:
    return CrossRelation(
        id=row["id"],
        relation_id=row["relation_id"],
        side=row["side"],
        peer_node=row["peer_node"],
        person_id=row["person_id"],
        other_name=row["other_name"],
        other_ref=row["other_ref"],
        relation_type=row["relation_type"],
        state=CrossState(row["state"]),
        filed_at=row["filed_at"],
        confirmed_at=row["confirmed_at"],
        ended_at=row["ended_at"],
    )


# --- for the grants code ---------------------------------------------------------------------


async def active_relation_for_grant(
    conn: asyncpg.Connection, relation_id: str, giver_person_id: int, *, lock: bool = True
) -> CrossRelation | None:
    """At A: the giver's ACTIVE relationship `relation_id`, or None (unknown, not the
    giver's, or not active). Share-locked by default, so an ending waits for the caller's
    transaction and then sees (and releases) what it created."""
    if not is_uuid7(relation_id):
        return None
    row = await conn.fetchrow(
        _ACTIVE_FOR_GRANT + (_FOR_SHARE if lock else ""), relation_id, giver_person_id
    )
    if row is None or row["state"] != CrossState.ACTIVE:
        return None
    return _relation(row)


async def receiver_side(
    conn: asyncpg.Connection, from_node: str, relation_id: str, *, lock: bool = True
) -> CrossRelation | None:
    """At B: the receiver-side row of `relation_id` filed at `from_node`, in any state
    (check `.active`). Share-locked by default, like `active_relation_for_grant`."""
    if not is_uuid7(relation_id):
        return None
    row = await conn.fetchrow(_RECEIVER_SIDE + (_FOR_SHARE if lock else ""), relation_id, from_node)
    return None if row is None else _relation(row)


async def active_for_receiver(
    conn: asyncpg.Connection, receiver_person_id: int
) -> list[CrossRelation]:
    """At B: the receiver's active cross-province relationships, in filing order (RULES 19)."""
    return [_relation(r) for r in await conn.fetch(_ACTIVE_OF_RECEIVER, receiver_person_id)]


# --- filing, at the giver's node -----------------------------------------------------------


async def file(
    ctx: WalletContext,
    giver_person_id: int,
    *,
    receiver_province: str,
    receiver_id_number: str,
    receiver_name: str,
    relation_type: RelationType,
    evidence_ref: str,
    payment_password: str,
) -> CrossRelationshipView:
    """The giver files a relationship with a relative insured in another province.

    All eight close-relative types are accepted: the province's in-province list (RULES 2
    `[cfg]`) does not apply across provinces. The request goes to the receiver's node in
    the same transaction that records the filing.
    """
    if ctx.plt is None:
        raise WalletError(
            WalletCode.SERVICE_UNAVAILABLE, "this node is not connected to other provinces"
        )
    id_number = normalize_id_number(receiver_id_number)
    name = receiver_name.strip()
    if not 1 <= len(name) <= NAME_CHARS_MAX:
        raise WalletError(
            WalletCode.INVALID_REQUEST, f"the name has 1 to {NAME_CHARS_MAX} characters"
        )
    if receiver_province == ctx.province_code:
        raise WalletError(
            WalletCode.RELATIONSHIP_NOT_ALLOWED,
            "the relative is insured in this province: file at /app/v1/relationships",
            reason="same_province",
        )
    try:
        peer = ctx.plt.node_for_province(receiver_province)
    except UnknownPeer:
        raise WalletError(
            WalletCode.RELATIONSHIP_NOT_ALLOWED,
            f"province {receiver_province} is not connected to this node for mutual aid",
            reason="province_not_connected",
        ) from None
    await verify_payment_password(ctx, giver_person_id, payment_password)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        giver = await conn.fetchrow(_LOCK_GIVER, giver_person_id)
        _check_giver(giver)
        assert giver is not None
        if giver["id_number"] == id_number:
            raise WalletError(
                WalletCode.RELATIONSHIP_NOT_ALLOWED,
                "a person cannot share with themselves",
                reason="self",
            )
        limit = ctx.rules.max_receivers_per_giver
        if (
            limit is not None
            and await conn.fetchval(_COUNT_LIVE_RECEIVERS, giver_person_id) >= limit
        ):
            raise WalletError(
                WalletCode.RELATIONSHIP_NOT_ALLOWED,
                f"a giver may share with at most {limit} receivers (RULES 4)",
                reason="receiver_limit",
                limit=limit,
            )
        relation_id = uuid7(_to_ms(now))
        request = RelRequest(
            relation_id=relation_id,
            giver=GiverRef(
                node=ctx.node_id,
                account_ref=giver_account_ref(giver_person_id),
                masked_name=mask_name(giver["name"])[:NAME_CHARS_MAX],
            ),
            receiver=RelReceiver(id_number=id_number, name=name),
            relation_type=WireRelationType(relation_type.value),
            evidence_ref=evidence_ref,
            filed_at_ms=_to_ms(now),
        )
        raw = encode_body(request)
        try:
            await conn.fetchval(
                _INSERT_GIVER_SIDE,
                relation_id,
                peer,
                giver_person_id,
                name,
                id_number,
                receiver_province,
                relation_type.value,
                evidence_ref,
                body_hash(raw),
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            raise WalletError(
                WalletCode.ALREADY_EXISTS,
                "a live relationship with this relative already exists",
            ) from exc
        await outbox.enqueue(
            conn, to_node=peer, typ=MessageType.REL_REQUEST, key=relation_id, body=raw, now=now
        )
        await _audit(
            conn,
            now,
            f"person:{giver_person_id}",
            "cross_relationship.file",
            relation_id,
            peer=peer,
        )
        view = await _view(conn, ctx, relation_id, giver_person_id)
    log.info("cross_relationship_filed", relation_id=relation_id, peer=peer)
    return view


def _check_giver(row: asyncpg.Record | None) -> None:
    if row is None:
        raise WalletError(WalletCode.NOT_FOUND, "the giver is not on the roster")
    if row["scheme"] != "employee":
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE,
            "only members of the employee scheme can share their personal account (RULES 1)",
        )
    if row["status"] != "normal":
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE, "the giver is not in normal insured status"
        )
    if row["wallet_state"] != "open":
        raise WalletError(WalletCode.PERSON_NOT_ELIGIBLE, "the giver has no open wallet")


# --- the receiver's answer, at the receiver's node -----------------------------------------------


async def confirm(
    ctx: WalletContext, receiver_person_id: int, relation_id: str, *, payment_password: str
) -> CrossRelationshipView:
    """The receiver agrees from their own wallet (RULES 5): active here, REL_CONFIRM to A.

    Grants become possible once A has applied the confirmation.
    """
    _check_id(relation_id)
    await verify_payment_password(ctx, receiver_person_id, payment_password)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _guarded(
            conn, _CONFIRM_AT_RECEIVER, _STATE_OF_RECEIVER, relation_id, receiver_person_id, now
        )
        body = RelConfirm(
            relation_id=relation_id,
            request_hash=row["request_hash"],
            receiver_account_id=receiver_account_ref(receiver_person_id),
            confirmed_at_ms=_to_ms(now),
            acceptance=Acceptance(method="pin", ref=f"pin:{receiver_person_id}:{_to_ms(now)}"),
        )
        await outbox.enqueue(
            conn,
            to_node=row["peer_node"],
            typ=MessageType.REL_CONFIRM,
            key=relation_id,
            body=encode_body(body),
            now=now,
        )
        await _audit(
            conn, now, f"person:{receiver_person_id}", "cross_relationship.confirm", relation_id
        )
        return await _view(conn, ctx, relation_id, receiver_person_id)


async def decline(
    ctx: WalletContext, receiver_person_id: int, relation_id: str
) -> CrossRelationshipView:
    """The receiver refuses a filing made for them: declined here, REL_DECLINE to A."""
    _check_id(relation_id)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _guarded(
            conn, _DECLINE_AT_RECEIVER, _STATE_OF_RECEIVER, relation_id, receiver_person_id, now
        )
        body = RelDecline(
            relation_id=relation_id,
            request_hash=row["request_hash"],
            error=ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
            declined_at_ms=_to_ms(now),
        )
        await outbox.enqueue(
            conn,
            to_node=row["peer_node"],
            typ=MessageType.REL_DECLINE,
            key=relation_id,
            body=encode_body(body),
            now=now,
        )
        await _audit(
            conn, now, f"person:{receiver_person_id}", "cross_relationship.decline", relation_id
        )
        return await _view(conn, ctx, relation_id, receiver_person_id)


async def end(
    ctx: WalletContext, person_id: int, relation_id: str, *, payment_password: str
) -> CrossRelationshipView:
    """Either party ends it at their own node, at any time (RULES 6): REL_END to the other.

    Nothing already spent is reversed; unused quota goes back (RULES 7, through the hooks).
    """
    _check_id(relation_id)
    await verify_payment_password(ctx, person_id, payment_password)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _guarded(
            conn, _END_BY_PARTY, _STATE_OF_PARTY, relation_id, person_id, now, "ended by a party"
        )
        relation = _relation(row)
        await _send_end(conn, relation, relation.side, "ended by a party", now)
        await _run_end_hooks(ctx, conn, relation, now)
        await _audit(conn, now, f"person:{person_id}", "cross_relationship.end", relation_id)
        view = await _view(conn, ctx, relation_id, person_id)
    log.info("cross_relationship_ended", relation_id=relation_id, side=relation.side, by="party")
    return view


async def end_cross_for_person(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    person_id: int,
    *,
    reason: str,
    now: dt.datetime,
) -> list[str]:
    """End every live cross-province relationship of a person (RULES 6: status change, death,
    leaving the pooling region); the peers are told with REL_END. Runs in the caller's
    transaction; returns the relation ids ended."""
    ended = [
        _relation(r) for r in await conn.fetch(_END_ALL_OF_PERSON, person_id, now, reason[:500])
    ]
    for relation in ended:
        await _send_end(conn, relation, "system", reason, now)
        await _run_end_hooks(ctx, conn, relation, now)
        await _audit(
            conn, now, "system", "cross_relationship.end", relation.relation_id, reason=reason
        )
    if ended:
        log.info("cross_relationships_ended_by_status", count=len(ended))
    return [r.relation_id for r in ended]


async def _send_end(
    conn: asyncpg.Connection,
    relation: CrossRelation,
    ended_by: Literal["giver", "receiver", "system"],
    reason: str,
    now: dt.datetime,
) -> None:
    body = RelEnd(
        relation_id=relation.relation_id,
        ended_by=ended_by,
        reason=reason[:500],
        ended_at_ms=_to_ms(now),
    )
    await outbox.enqueue(
        conn,
        to_node=relation.peer_node,
        typ=MessageType.REL_END,
        key=relation.relation_id,
        body=encode_body(body),
        now=now,
    )


async def _run_end_hooks(
    ctx: WalletContext, conn: asyncpg.Connection, relation: CrossRelation, now: dt.datetime
) -> None:
    hooks = ON_RELATION_ENDED if relation.side == "receiver" else ON_GIVER_RELATION_ENDED
    for hook in hooks:
        await hook(ctx, conn, relation, now)


async def _guarded(
    conn: asyncpg.Connection,
    statement: str,
    explain: str,
    relation_id: str,
    person_id: int,
    *args: object,
) -> asyncpg.Record:
    """Run a guarded transition; on a miss say whether the row is absent or in another state
    (`explain` finds the row the caller may act on)."""
    row = await conn.fetchrow(statement, relation_id, person_id, *args)
    if row is not None:
        return row
    state = await conn.fetchval(explain, relation_id, person_id)
    if state is None:
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )
    raise WalletError(
        WalletCode.STATE_CONFLICT,
        f"cross-province relationship {relation_id} is {state}; this action is not possible now",
        state=state,
    )


def _check_id(relation_id: str) -> None:
    if not is_uuid7(relation_id):
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )


# --- messages from the peer ------------------------------------------------------------------


@handles(
    MessageType.REL_REQUEST,
    MessageType.REL_CONFIRM,
    MessageType.REL_DECLINE,
    MessageType.REL_END,
    MessageType.REL_REPLY,
)
async def on_relation_message(ctx: WalletContext, msg: Incoming) -> Body | None:
    """Apply a relationship message from a peer node; answer it with a signed REL_REPLY."""
    body = msg.body
    if isinstance(body, RelReply):
        if not msg.is_reply:
            raise ValidationFailed("REL_REPLY is only ever a reply")
        await _on_reply(ctx, msg, body)
        return None
    if msg.is_reply:
        raise ValidationFailed(f"{msg.typ} is a request, not a reply")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if isinstance(body, RelRequest):
            return await _on_request(conn, msg, body)
        if isinstance(body, RelConfirm | RelDecline):
            return await _on_answer(conn, msg, body)
        if isinstance(body, RelEnd):
            return await _on_end(ctx, conn, msg, body)
    raise ValidationFailed(f"{msg.typ} is not a relationship message")


def _reply(msg: Incoming, relation_id: str, error: ErrorBody | None = None) -> RelReply:
    return RelReply(
        relation_id=relation_id,
        ref_typ=msg.typ,
        ref_hash=msg.body_hash,
        outcome="OK" if error is None else "REFUSED",
        error=error,
        replied_at_ms=msg.now_ms,
    )


async def _stored_reply(
    conn: asyncpg.Connection, relationship_id: int, msg: Incoming
) -> RelReply | None:
    """The reply already given to this (relationship, typ); 3106 if the body differs."""
    stored = await conn.fetchrow(_STORED_MESSAGE, relationship_id, str(msg.typ))
    if stored is None:
        return None
    if stored["body_hash"] != msg.body_hash:
        old = decode_body(msg.typ, bytes(stored["body"]))
        raise ModifiedRequest(differing_fields(old, msg.body) or ["body"])
    reply = decode_body(MessageType.REL_REPLY, bytes(stored["reply"]))
    assert isinstance(reply, RelReply)
    return reply


async def _store(
    conn: asyncpg.Connection, relationship_id: int, msg: Incoming, reply: RelReply
) -> RelReply:
    await conn.execute(
        _STORE_MESSAGE,
        relationship_id,
        str(msg.typ),
        encode_body(msg.body),
        msg.body_hash,
        encode_body(reply),
        _from_ms(msg.now_ms),
    )
    return reply


def _from_ms(at_ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=at_ms)


async def _on_request(conn: asyncpg.Connection, msg: Incoming, body: RelRequest) -> RelReply:
    if body.giver.node != msg.from_node:
        raise ValidationFailed(
            f"a REL_REQUEST from {msg.from_node} names giver node {body.giver.node}"
        )
    if await conn.fetchval(_IS_OURS, body.relation_id):
        raise ValidationFailed(f"relation id {body.relation_id} was made by this node")
    person = await conn.fetchrow(_RECEIVER_ON_ROSTER, body.receiver.id_number)
    error = await _receiver_check(conn, msg.from_node, body, person)
    now = _from_ms(msg.now_ms)
    row_id = await conn.fetchval(
        _INSERT_RECEIVER_SIDE,
        body.relation_id,
        msg.from_node,
        None if person is None else person["id"],
        body.giver.masked_name,
        body.giver.account_ref,
        str(body.relation_type),
        body.evidence_ref,
        "pending_confirmation" if error is None else "refused",
        msg.body_hash,
        None if error is None else int(error.code),
        None if error is None else error.text,
        now,
    )
    if row_id is None:
        return await _request_again(conn, msg, body)
    reply = _reply(msg, body.relation_id, error)
    log.info(
        "cross_relationship_requested",
        relation_id=body.relation_id,
        peer=msg.from_node,
        outcome=reply.outcome,
        code=None if error is None else int(error.code),
    )
    return await _store(conn, row_id, msg, reply)


async def _receiver_check(
    conn: asyncpg.Connection, from_node: str, body: RelRequest, person: asyncpg.Record | None
) -> ErrorBody | None:
    """B's checks of the receiver (RULES 1, 9, 12): on the roster under that name, in normal
    status, with an open wallet, and not already related to this giver."""
    if person is None or person["name"].strip() != body.receiver.name.strip():
        # One answer for "unknown number" and "wrong name": the roster is not a lookup service.
        return ErrorBody.of(
            ErrorCode.RECEIVER_CHECK_FAILED,
            "no one on this province's roster has that ID number and name",
        )
    if person["status"] != "normal":
        return ErrorBody.of(
            ErrorCode.RECEIVER_CHECK_FAILED, "the receiver is not in normal insured status"
        )
    if person["wallet_state"] != "open":
        return ErrorBody.of(ErrorCode.RECEIVER_WALLET_NOT_OPEN)
    if await conn.fetchval(_LIVE_RECEIVER_PAIR, from_node, body.giver.account_ref, person["id"]):
        return ErrorBody.of(
            ErrorCode.VALIDATION, "a live relationship between these two people already exists"
        )
    return None


async def _request_again(conn: asyncpg.Connection, msg: Incoming, body: RelRequest) -> RelReply:
    """A REL_REQUEST for a relation id this node already has a row for."""
    row = await conn.fetchrow(_LOCK_SIDE, "receiver", body.relation_id)
    assert row is not None, "ON CONFLICT saw a committed row"
    if row["peer_node"] != msg.from_node:
        raise ValidationFailed(f"relation id {body.relation_id} belongs to another node")
    stored = await _stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    # An `ended` tombstone: the giver ended it before this request arrived.
    error = ErrorBody.of(ErrorCode.GIVER_PERMISSION, "the relationship was already ended")
    return await _store(conn, row["id"], msg, _reply(msg, body.relation_id, error))


async def _on_answer(
    conn: asyncpg.Connection, msg: Incoming, body: RelConfirm | RelDecline
) -> RelReply:
    """REL_CONFIRM or REL_DECLINE from the receiver's node, at the giver's node."""
    row = await conn.fetchrow(_LOCK_SIDE, "giver", body.relation_id)
    if row is None or row["peer_node"] != msg.from_node:
        return _reply(
            msg, body.relation_id, ErrorBody.of(ErrorCode.UNKNOWN_TRANSFER, "unknown relationship")
        )
    stored = await _stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    now = _from_ms(msg.now_ms)
    state = row["state"]
    error: ErrorBody | None = None
    if body.request_hash != row["request_hash"]:
        error = ErrorBody.of(ErrorCode.VALIDATION, "the answer does not match the request filed")
    elif isinstance(body, RelConfirm):
        if (
            await conn.fetchval(_CONFIRMED_AT_GIVER, row["id"], now, body.receiver_account_id)
            is None
        ):
            error = ErrorBody.of(ErrorCode.GIVER_PERMISSION, f"the relationship is {state} here")
    elif state == CrossState.REQUESTED:
        await conn.fetchval(_DECLINED_AT_GIVER, row["id"], now)
    elif state == CrossState.ACTIVE:
        error = ErrorBody.of(ErrorCode.VALIDATION, "the relationship was already confirmed")
    # A decline of a relationship already over changes nothing and is taken.
    log.info(
        "cross_relationship_answered",
        relation_id=body.relation_id,
        typ=str(msg.typ),
        outcome="OK" if error is None else "REFUSED",
    )
    return await _store(conn, row["id"], msg, _reply(msg, body.relation_id, error))


async def _on_end(
    ctx: WalletContext, conn: asyncpg.Connection, msg: Incoming, body: RelEnd
) -> RelReply:
    """REL_END from the other node: end our side (or leave a tombstone if we never saw it)."""
    now = _from_ms(msg.now_ms)
    row = await conn.fetchrow(_LOCK_SIDE, "giver", body.relation_id)
    if row is None or row["peer_node"] != msg.from_node:
        row = await conn.fetchrow(_LOCK_SIDE, "receiver", body.relation_id)
    if row is None:
        row_id = await conn.fetchval(
            _INSERT_END_TOMBSTONE, body.relation_id, msg.from_node, now, body.ended_by, body.reason
        )
        if row_id is None:  # a concurrent REL_REQUEST made the row: the sender retries
            raise RuntimeError("relationship row appeared concurrently")
        log.info(
            "cross_relationship_end_tombstone", relation_id=body.relation_id, peer=msg.from_node
        )
        return await _store(conn, row_id, msg, _reply(msg, body.relation_id))
    if row["peer_node"] != msg.from_node:
        raise ValidationFailed(f"relation id {body.relation_id} belongs to another node")
    stored = await _stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    ended = await conn.fetchrow(_END_ROW, row["id"], now, body.ended_by, body.reason)
    if ended is not None:
        relation = _relation(ended)
        await _run_end_hooks(ctx, conn, relation, now)
        log.info(
            "cross_relationship_ended", relation_id=body.relation_id, side=relation.side, by="peer"
        )
    return await _store(conn, row["id"], msg, _reply(msg, body.relation_id))


async def _on_reply(ctx: WalletContext, msg: Incoming, body: RelReply) -> None:
    """The peer's REL_REPLY to something we sent: stop retrying it, apply a refusal."""
    if body.ref_typ not in (
        MessageType.REL_REQUEST,
        MessageType.REL_CONFIRM,
        MessageType.REL_DECLINE,
        MessageType.REL_END,
    ):
        hook = REPLY_HOOKS.get(body.ref_typ)
        if hook is not None:
            await hook(ctx, msg, body)
        return
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        sent = await conn.fetchval(_OUTBOX_BODY, msg.from_node, str(body.ref_typ), body.relation_id)
        if sent is None or body_hash(bytes(sent)) != body.ref_hash:
            log.warning(
                "cross_relationship_reply_unmatched",
                relation_id=body.relation_id,
                typ=str(body.ref_typ),
            )
            return
        if body.ref_typ is MessageType.REL_REQUEST:
            await _request_answered(conn, body, now)
        elif body.ref_typ is MessageType.REL_CONFIRM and body.error is not None:
            await _confirmation_refused(ctx, conn, msg.from_node, body, now)
        await outbox.stop(
            conn, to_node=msg.from_node, typ=body.ref_typ, key=body.relation_id, now=now
        )


async def _request_answered(conn: asyncpg.Connection, body: RelReply, now: dt.datetime) -> None:
    row = await conn.fetchrow(_LOCK_SIDE, "giver", body.relation_id)
    if row is None:
        return
    if body.error is None:
        await conn.execute(_DELIVERED, row["id"], now)
        return
    await conn.fetchval(_REFUSED_AT_GIVER, row["id"], int(body.error.code), body.error.text, now)
    log.info("cross_relationship_refused", relation_id=body.relation_id, code=int(body.error.code))


async def _confirmation_refused(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    from_node: str,
    body: RelReply,
    now: dt.datetime,
) -> None:
    """A will not take our confirmation (it ended or lost the filing): end it here too."""
    row = await conn.fetchrow(_LOCK_SIDE, "receiver", body.relation_id)
    if row is None or row["peer_node"] != from_node:
        return
    assert body.error is not None
    reason = f"the giver's node refused the confirmation: {body.error.text}"[:500]
    ended = await conn.fetchrow(_END_ROW, row["id"], now, "system", reason)
    if ended is not None:
        await _run_end_hooks(ctx, conn, _relation(ended), now)
        log.info(
            "cross_relationship_ended", relation_id=body.relation_id, side="receiver", by="refusal"
        )


# --- reading -------------------------------------------------------------------------------


async def list_for_person(
    ctx: WalletContext,
    person_id: int,
    *,
    role: Side | None = None,
    state: CrossState | None = None,
) -> list[CrossRelationshipView]:
    """A person's cross-province relationships, as giver, receiver or both, in filing order."""
    rows = await ctx.pool.fetch(
        _VIEWS_OF_PERSON, person_id, role, None if state is None else state.value, MAX_LISTED
    )
    return [_to_view(ctx, r) for r in rows]


async def get_for_person(
    ctx: WalletContext, person_id: int, relation_id: str
) -> CrossRelationshipView:
    """One of the person's cross-province relationships."""
    _check_id(relation_id)
    async with ctx.pool.acquire() as conn:
        return await _view(conn, ctx, relation_id, person_id)


async def _view(
    conn: asyncpg.Connection, ctx: WalletContext, relation_id: str, person_id: int
) -> CrossRelationshipView:
    row = await conn.fetchrow(_VIEW_ONE, relation_id, person_id)
    if row is None:
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )
    return _to_view(ctx, row)


def _to_view(ctx: WalletContext, r: asyncpg.Record) -> CrossRelationshipView:
    giver_view = r["side"] == "giver"
    other_province = r["other_province"]
    if other_province is None and ctx.plt is not None:
        other_province = ctx.plt.province_of(r["peer_node"])
    return CrossRelationshipView(
        relation_id=r["relation_id"],
        viewer=r["side"],
        relation_type=None if r["relation_type"] is None else RelationType(r["relation_type"]),
        state=CrossState(r["state"]),
        other_node=r["peer_node"],
        other_province=other_province,
        other_name_masked=None if r["other_name"] is None else mask_name(r["other_name"]),
        other_id_number_masked=None
        if r["other_id_number"] is None
        else mask_id_number(r["other_id_number"]),
        # The evidence (hukou or birth-certificate number) is the giver's filing.
        evidence_ref=r["evidence_ref"] if giver_view else None,
        refusal=None
        if r["refusal_code"] is None
        else Refusal(code=r["refusal_code"], text=r["refusal_text"] or ""),
        filed_at=r["filed_at"],
        delivered_at=r["delivered_at"],
        confirmed_at=r["confirmed_at"],
        declined_at=r["declined_at"],
        ended_at=r["ended_at"],
        ended_by=r["ended_by"],
        end_reason=r["end_reason"],
    )


async def _audit(
    conn: asyncpg.Connection,
    now: dt.datetime,
    actor: str,
    action: str,
    relation_id: str,
    **detail: object,
) -> None:
    await audit.record(
        conn,
        at=now,
        actor=actor,
        action=action,
        subject=f"cross_relationship:{relation_id}",
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        **detail,
    )
