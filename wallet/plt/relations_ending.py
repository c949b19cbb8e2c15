"""The end of a cross-province relationship (RULES 6-7), on either side.

A relationship ends by a party at their own node (REL_END to the other), by a change of
insured status (`end_cross_for_person`, from `wallet/roster.py`), by a REL_END from the
peer (or an `ended` tombstone for a relation never seen, so a late REL_REQUEST is refused),
or at B when A refuses B's confirmation. The hooks in `ON_RELATION_ENDED` (receiver side)
and `ON_GIVER_RELATION_ENDED` (giver side) run inside the ending transaction: the grants
code closes unused quota there and queues RELEASE (RULES 7).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Literal

import asyncpg

from protocol.errors import ValidationFailed
from protocol.messages import MessageType, RelEnd, RelReply, encode_body
from wallet import devices
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.plt import notices, outbox
from wallet.plt.dispatch import Incoming
from wallet.plt.relations_lookup import load_view
from wallet.plt.relations_store import (
    COLUMNS,
    LOCK_SIDE,
    CrossRelation,
    CrossRelationshipView,
    CrossState,
    check_relation_id,
    from_ms,
    guarded_transition,
    log,
    record_audit,
    relation_from_row,
    reply_to,
    store_reply,
    stored_reply,
    to_ms,
)

RelationEndedHook = Callable[
    [WalletContext, asyncpg.Connection, CrossRelation, dt.datetime], Awaitable[None]
]
# Run inside the transaction that ends a relationship (by a party, by a REL_END from the
# peer, by a status change, by the giver's node refusing a confirmation). Receiver side, at
# B: close unused quota and queue RELEASE. Giver side, at A: whatever A must do.
ON_RELATION_ENDED: list[RelationEndedHook] = []
ON_GIVER_RELATION_ENDED: list[RelationEndedHook] = []

_INSERT_END_TOMBSTONE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, state, filed_at, ended_at, ended_by, end_reason)
VALUES ($1, 'receiver', $2, 'ended', $3, $3, $4, $5)
ON CONFLICT (side, relation_id) DO NOTHING
RETURNING id
"""
_END_ROW = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $2, ended_by = $3, end_reason = $4
WHERE id = $1 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {COLUMNS}
"""
_END_BY_PARTY = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $3, ended_by = side, end_reason = $4
WHERE relation_id = $1 AND person_id = $2 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {COLUMNS}
"""
_END_ALL_OF_PERSON = f"""
UPDATE cross_relationship SET state = 'ended', ended_at = $2, ended_by = 'system', end_reason = $3
WHERE person_id = $1 AND state IN ('requested', 'pending_confirmation', 'active')
RETURNING {COLUMNS}
"""
_STATE_OF_PARTY = """
SELECT state, confirmed_at FROM cross_relationship WHERE relation_id = $1 AND person_id = $2
"""


# --- ended by a party or by a status change, at their own node ---------------------------------


async def end(
    ctx: WalletContext,
    person_id: int,
    relation_id: str,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> CrossRelationshipView:
    """Either party ends it at their own node, at any time (RULES 6): REL_END to the other.

    Nothing already spent is reversed; unused quota goes back (RULES 7, through the hooks).
    """
    check_relation_id(relation_id)
    await devices.authorise(
        ctx, person_id, payment_password=payment_password, device=device,
        action="relation.end", ids={"relation_id": relation_id},
    )  # fmt: skip
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await guarded_transition(
            conn, _END_BY_PARTY, _STATE_OF_PARTY, relation_id, person_id, now, "ended by a party",
            done=CrossState.ENDED,
        )  # fmt: skip
        if row is None:
            return await load_view(conn, ctx, relation_id, person_id)
        relation = relation_from_row(row)
        await _send_end(conn, relation, relation.side, "ended by a party", now)
        await _run_end_hooks(ctx, conn, relation, now)
        await record_audit(conn, now, f"person:{person_id}", "cross_relationship.end", relation_id)
        view = await load_view(conn, ctx, relation_id, person_id)
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
        relation_from_row(r)
        for r in await conn.fetch(_END_ALL_OF_PERSON, person_id, now, reason[:500])
    ]
    for relation in ended:
        await _send_end(conn, relation, "system", reason, now)
        await _run_end_hooks(ctx, conn, relation, now)
        await record_audit(
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
        ended_at_ms=to_ms(now),
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
    await notices.relation_ended(ctx, conn, relation, now)


# --- ended by the peer ------------------------------------------------------------------------


async def on_end(
    ctx: WalletContext, conn: asyncpg.Connection, msg: Incoming, body: RelEnd
) -> RelReply:
    """REL_END from the other node: end our side (or leave a tombstone if we never saw it)."""
    now = from_ms(msg.now_ms)
    row = await conn.fetchrow(LOCK_SIDE, "giver", body.relation_id)
    if row is None or row["peer_node"] != msg.from_node:
        row = await conn.fetchrow(LOCK_SIDE, "receiver", body.relation_id)
    if row is None:
        row_id = await conn.fetchval(
            _INSERT_END_TOMBSTONE, body.relation_id, msg.from_node, now, body.ended_by, body.reason
        )
        if row_id is None:  # a concurrent REL_REQUEST made the row: the sender retries
            raise RuntimeError("relationship row appeared concurrently")
        log.info(
            "cross_relationship_end_tombstone", relation_id=body.relation_id, peer=msg.from_node
        )
        return await store_reply(conn, row_id, msg, reply_to(msg, body.relation_id))
    if row["peer_node"] != msg.from_node:
        raise ValidationFailed(f"relation id {body.relation_id} belongs to another node")
    stored = await stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    ended = await conn.fetchrow(_END_ROW, row["id"], now, body.ended_by, body.reason)
    if ended is not None:
        relation = relation_from_row(ended)
        await _run_end_hooks(ctx, conn, relation, now)
        log.info(
            "cross_relationship_ended", relation_id=body.relation_id, side=relation.side, by="peer"
        )
    return await store_reply(conn, row["id"], msg, reply_to(msg, body.relation_id))


async def confirmation_refused(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    from_node: str,
    body: RelReply,
    now: dt.datetime,
) -> None:
    """A will not take our confirmation (it ended or lost the filing): end it here too."""
    row = await conn.fetchrow(LOCK_SIDE, "receiver", body.relation_id)
    if row is None or row["peer_node"] != from_node:
        return
    assert body.error is not None
    reason = f"the giver's node refused the confirmation: {body.error.text}"[:500]
    ended = await conn.fetchrow(_END_ROW, row["id"], now, "system", reason)
    if ended is not None:
        await _run_end_hooks(ctx, conn, relation_from_row(ended), now)
        log.info(
            "cross_relationship_ended", relation_id=body.relation_id, side="receiver", by="refusal"
        )
