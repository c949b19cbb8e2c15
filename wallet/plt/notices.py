"""The cross-province events that notify app users: grants and relationships with a relative
insured in another province.

Each node notifies only its own insured persons: the receiver's node (B) tells the receiver
(a grant offered, spendable, returned; a relationship requested), the giver's node (A) tells
the giver (accepted, declined, expired; unused quota returned; a relationship confirmed or
declined), and both tell their own party when a relationship ends. Every function runs in the
transaction of the protocol step that causes it (`wallet.notifications`); event keys name the
grant or relationship and the outcome, so a replayed message notifies nobody twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

import asyncpg
import msgspec

from protocol.errors import ErrorCode
from wallet.context import WalletContext
from wallet.notifications import Kind, Notice, record_many
from wallet.plt.relations_store import CrossRelation
from wallet.privacy import mask_name

Side = Literal["giver", "receiver"]

# B's NotifyReceiver kinds (protocol.receiver) -> what the receiver's app is told.
_RECEIVER_KINDS = {
    "GRANT_OFFERED": Kind.GRANT_OFFERED,
    "GRANT_COMMITTED": Kind.GRANT_COMMITTED,
    "GRANT_RETURNED": Kind.GRANT_RETURNED,
}
# A's outcome for the giver, by the DECISION's reason (none: committed).
_ABORT_KINDS = {
    int(ErrorCode.EXPIRED): Kind.GRANT_EXPIRED,
    int(ErrorCode.RECEIVER_DECLINED): Kind.GRANT_DECLINED,
}

_GRANTS_OUT = """
SELECT g.transfer_id, g.giver_person_id, g.amount_fen, g.relation_id, g.to_node,
       c.other_name, c.other_province
FROM grant_out g
LEFT JOIN cross_relationship c ON c.side = 'giver' AND c.relation_id = g.relation_id
WHERE g.transfer_id = ANY($1::text[])
"""
_RELATION = """
SELECT person_id, peer_node, state, other_name, other_province, relation_type, ended_by,
       refusal_code
FROM cross_relationship WHERE side = $1 AND relation_id = $2
"""


def _province(ctx: WalletContext, node: str) -> str | None:
    return None if ctx.plt is None else ctx.plt.province_of(node)


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """What B's notices tell about a grant of one of our persons (the step that notifies has
    its grant_in row at hand)."""

    from_node: str
    transfer_id: str
    receiver_person_id: int
    amount_fen: int
    accept_by: dt.datetime
    relation_id: str
    giver_masked_name: str | None


async def to_receiver(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    offer: Offer | None,
    kind: str,
    now: dt.datetime,
    *,
    plt_code: int | None = None,
) -> None:
    """B's `NotifyReceiver`: the receiver's grant was offered (with the time to accept by),
    became spendable, or went back to the giver."""
    if offer is None:
        return  # a tombstone or a refused PREPARE: nobody of ours to tell
    notice_kind = _RECEIVER_KINDS[kind]
    from_node, transfer_id = offer.from_node, offer.transfer_id
    notice = Notice(
        person_id=offer.receiver_person_id,
        kind=notice_kind,
        event_key=f"grant:{from_node}/{transfer_id}:{notice_kind.value}",
        amount_fen=offer.amount_fen,
        counterpart_name_masked=offer.giver_masked_name,
        counterpart_province=_province(ctx, from_node),
        deadline=offer.accept_by if notice_kind is Kind.GRANT_OFFERED else None,
        refs={"transfer_id": transfer_id, "relation_id": offer.relation_id},
        detail={} if plt_code is None else {"plt_code": plt_code},
    )
    await record_many(conn, [notice], now)


async def to_givers(
    conn: asyncpg.Connection,
    outcomes: Sequence[tuple[str, str, int | None]],
    now: dt.datetime,
) -> None:
    """A's `NotifyGiver` for (transfer id, COMMITTED | ABORTED, reason code) of one step or a
    whole sweep batch: accepted (and committed), declined, expired, or aborted otherwise."""
    if not outcomes:
        return
    rows = {r["transfer_id"]: r for r in await conn.fetch(_GRANTS_OUT, [t for t, _, _ in outcomes])}
    notices: list[Notice] = []
    for transfer_id, state, code in outcomes:
        row = rows[transfer_id]
        kind = (
            Kind.GRANT_ACCEPTED
            if state == "COMMITTED"
            else _ABORT_KINDS.get(code or 0, Kind.GRANT_ABORTED)
        )
        notices.append(
            Notice(
                person_id=row["giver_person_id"],
                kind=kind,
                event_key=f"grant:{transfer_id}:{kind.value}",
                amount_fen=row["amount_fen"],
                counterpart_name_masked=None
                if row["other_name"] is None
                else mask_name(row["other_name"]),
                counterpart_province=row["other_province"],
                refs={"transfer_id": transfer_id, "relation_id": row["relation_id"]},
                detail={} if code is None else {"plt_code": code},
            )
        )
    await record_many(conn, notices, now)


async def quota_returned(
    conn: asyncpg.Connection,
    transfer_id: str,
    returned_fen: int,
    released_fen: int,
    now: dt.datetime,
) -> None:
    """A returned the unused part of a quota to the giver (B's RELEASE after the
    relationship ended); `released_fen` is the grant's cumulative release (the event)."""
    row = (await conn.fetch(_GRANTS_OUT, [transfer_id]))[0]
    notice = Notice(
        person_id=row["giver_person_id"],
        kind=Kind.QUOTA_RETURNED,
        event_key=f"grant:{transfer_id}:released:{released_fen}",
        amount_fen=returned_fen,
        counterpart_name_masked=None if row["other_name"] is None else mask_name(row["other_name"]),
        counterpart_province=row["other_province"],
        refs={"transfer_id": transfer_id, "relation_id": row["relation_id"]},
        detail={"granted_fen": row["amount_fen"], "released_fen": released_fen},
    )
    await record_many(conn, [notice], now)


async def relation_changed(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    side: Side,
    relation_id: str,
    now: dt.datetime,
) -> None:
    """Our party's side of a cross-province relationship is in a state to tell them about:
    requested (the receiver, at B), confirmed or declined (the giver, at A), ended by either
    party or automatically (both nodes). Called after each message or ending is applied;
    any other state tells nobody."""
    row = await conn.fetchrow(_RELATION, side, relation_id)
    kind = None if row is None else _relation_kind(side, row["state"], row["ended_by"])
    if row is None or row["person_id"] is None or kind is None:
        return
    # The giver's node knows the receiver's full name (masked here); B only a masked one.
    other: str | None = row["other_name"]
    if other is not None and side == "giver":
        other = mask_name(other)
    notice = Notice(
        person_id=row["person_id"],
        kind=kind,
        event_key=f"cross_relationship:{side}:{relation_id}:{kind.value}",
        counterpart_name_masked=other,
        counterpart_province=row["other_province"] or _province(ctx, row["peer_node"]),
        refs={"relation_id": relation_id},
        detail=_relation_detail(side, row),
    )
    await record_many(conn, [notice], now)


def _relation_detail(side: Side, row: asyncpg.Record) -> dict[str, object]:
    detail: dict[str, object] = {"relation_type": row["relation_type"], "as": side}
    if row["ended_by"]:
        detail["ended_by"] = row["ended_by"]
    if row["refusal_code"] is not None:
        detail["plt_code"] = row["refusal_code"]
    return detail


def _relation_kind(side: Side, state: str, ended_by: str | None) -> Kind | None:
    match side, state:
        case "receiver", "pending_confirmation":
            return Kind.RELATIONSHIP_REQUESTED
        case "giver", "active":
            return Kind.RELATIONSHIP_CONFIRMED
        case "giver", "declined" | "refused":  # refused: by the receiver's node (plt_code)
            return Kind.RELATIONSHIP_DECLINED
        case _, "ended":
            automatic = ended_by == "system"
            return Kind.RELATIONSHIP_ENDED_AUTOMATICALLY if automatic else Kind.RELATIONSHIP_ENDED
    return None


async def relation_ended(
    ctx: WalletContext, conn: asyncpg.Connection, relation: CrossRelation, now: dt.datetime
) -> None:
    """Tell our party the relationship ended (both nodes, whoever ended it), after the
    ending's other hooks: a notification holds its recipient's lock until the commit."""
    await relation_changed(ctx, conn, relation.side, relation.relation_id, now)
