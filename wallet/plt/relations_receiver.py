"""The receiver's side of a cross-province relationship, at the receiver's node (B).

B answers a REL_REQUEST after checking the receiver against its roster (RULES 1, 9, 12):
pending confirmation, or refused at once. The receiver then confirms (payment password) or
declines in their own app at B, which queues REL_CONFIRM or REL_DECLINE to the giver's node
in the same transaction.
"""

from __future__ import annotations

import asyncpg

from protocol.errors import ErrorCode, ValidationFailed
from protocol.messages import (
    Acceptance,
    ErrorBody,
    MessageType,
    RelConfirm,
    RelDecline,
    RelReply,
    RelRequest,
    encode_body,
)
from wallet import devices
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.plt import outbox
from wallet.plt.dispatch import Incoming
from wallet.plt.relations_lookup import load_view
from wallet.plt.relations_store import (
    COLUMNS,
    CONFIRMED,
    LOCK_SIDE,
    CrossRelationshipView,
    CrossState,
    check_relation_id,
    from_ms,
    guarded_transition,
    log,
    receiver_account_ref,
    record_audit,
    reply_to,
    store_reply,
    stored_reply,
    to_ms,
)

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
_IS_OURS = "SELECT 1 FROM cross_relationship WHERE side = 'giver' AND relation_id = $1"
_CONFIRM_AT_RECEIVER = f"""
UPDATE cross_relationship SET state = 'active', confirmed_at = $3
WHERE side = 'receiver' AND relation_id = $1 AND person_id = $2 AND state = 'pending_confirmation'
RETURNING {COLUMNS}
"""
_DECLINE_AT_RECEIVER = f"""
UPDATE cross_relationship SET state = 'declined', declined_at = $3
WHERE side = 'receiver' AND relation_id = $1 AND person_id = $2 AND state = 'pending_confirmation'
RETURNING {COLUMNS}
"""
_STATE_OF_RECEIVER = """
SELECT state, confirmed_at FROM cross_relationship
WHERE relation_id = $1 AND person_id = $2 AND side = 'receiver'
"""


# --- the receiver's answer, at the receiver's node -----------------------------------------------


async def confirm(
    ctx: WalletContext,
    receiver_person_id: int,
    relation_id: str,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> CrossRelationshipView:
    """The receiver agrees from their own wallet (RULES 5): active here, REL_CONFIRM to A.

    Grants become possible once A has applied the confirmation.
    """
    check_relation_id(relation_id)
    await devices.authorise(
        ctx, receiver_person_id, payment_password=payment_password, device=device,
        action="relation.confirm", ids={"relation_id": relation_id},
    )  # fmt: skip
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await guarded_transition(
            conn, _CONFIRM_AT_RECEIVER, _STATE_OF_RECEIVER, relation_id, receiver_person_id, now,
            done=CONFIRMED,
        )  # fmt: skip
        if row is None:
            return await load_view(conn, ctx, relation_id, receiver_person_id)
        body = RelConfirm(
            relation_id=relation_id,
            request_hash=row["request_hash"],
            receiver_account_id=receiver_account_ref(receiver_person_id),
            confirmed_at_ms=to_ms(now),
            acceptance=Acceptance(method="pin", ref=f"pin:{receiver_person_id}:{to_ms(now)}"),
        )
        await outbox.enqueue(
            conn,
            to_node=row["peer_node"],
            typ=MessageType.REL_CONFIRM,
            key=relation_id,
            body=encode_body(body),
            now=now,
        )
        await record_audit(
            conn, now, f"person:{receiver_person_id}", "cross_relationship.confirm", relation_id
        )
        return await load_view(conn, ctx, relation_id, receiver_person_id)


async def decline(
    ctx: WalletContext, receiver_person_id: int, relation_id: str
) -> CrossRelationshipView:
    """The receiver refuses a filing made for them: declined here, REL_DECLINE to A."""
    check_relation_id(relation_id)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await guarded_transition(
            conn, _DECLINE_AT_RECEIVER, _STATE_OF_RECEIVER, relation_id, receiver_person_id, now,
            done=CrossState.DECLINED,
        )  # fmt: skip
        if row is None:
            return await load_view(conn, ctx, relation_id, receiver_person_id)
        body = RelDecline(
            relation_id=relation_id,
            request_hash=row["request_hash"],
            error=ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
            declined_at_ms=to_ms(now),
        )
        await outbox.enqueue(
            conn,
            to_node=row["peer_node"],
            typ=MessageType.REL_DECLINE,
            key=relation_id,
            body=encode_body(body),
            now=now,
        )
        await record_audit(
            conn, now, f"person:{receiver_person_id}", "cross_relationship.decline", relation_id
        )
        return await load_view(conn, ctx, relation_id, receiver_person_id)


# --- the giver's node asks, at the receiver's node -------------------------------------------


async def on_request(conn: asyncpg.Connection, msg: Incoming, body: RelRequest) -> RelReply:
    """REL_REQUEST from the giver's node, at the receiver's node: check the receiver, record
    the row (pending confirmation, or refused) and answer."""
    if body.giver.node != msg.from_node:
        raise ValidationFailed(
            f"a REL_REQUEST from {msg.from_node} names giver node {body.giver.node}"
        )
    if await conn.fetchval(_IS_OURS, body.relation_id):
        raise ValidationFailed(f"relation id {body.relation_id} was made by this node")
    person = await conn.fetchrow(_RECEIVER_ON_ROSTER, body.receiver.id_number)
    error = await _receiver_check(conn, msg.from_node, body, person)
    now = from_ms(msg.now_ms)
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
    reply = reply_to(msg, body.relation_id, error)
    log.info(
        "cross_relationship_requested",
        relation_id=body.relation_id,
        peer=msg.from_node,
        outcome=reply.outcome,
        code=None if error is None else int(error.code),
    )
    return await store_reply(conn, row_id, msg, reply)


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
    row = await conn.fetchrow(LOCK_SIDE, "receiver", body.relation_id)
    assert row is not None, "ON CONFLICT saw a committed row"
    if row["peer_node"] != msg.from_node:
        raise ValidationFailed(f"relation id {body.relation_id} belongs to another node")
    stored = await stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    # An `ended` tombstone: the giver ended it before this request arrived.
    error = ErrorBody.of(ErrorCode.GIVER_PERMISSION, "the relationship was already ended")
    return await store_reply(conn, row["id"], msg, reply_to(msg, body.relation_id, error))
