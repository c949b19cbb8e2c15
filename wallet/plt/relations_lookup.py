"""Reading cross-province relationships: a party's views (app) and the grants code's lookups.

The views mask the other party; the receiver's node never learns the giver's ID number.
The lookups take the caller's connection and share-lock the row unless `lock=False`, so an
ending waits for the caller's transaction and then sees (and releases) what it created.
"""

from __future__ import annotations

import asyncpg

from protocol.ids import is_uuid7
from wallet.context import WalletContext
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.plt.relations_store import (
    COLUMNS,
    CrossRelation,
    CrossRelationshipView,
    CrossState,
    Refusal,
    Side,
    check_relation_id,
    relation_from_row,
)
from wallet.privacy import mask_id_number, mask_name
from wallet.rules import RelationType

MAX_LISTED = 500

_VIEW_ONE = f"SELECT {COLUMNS} FROM cross_relationship WHERE relation_id = $1 AND person_id = $2"
_VIEWS_OF_PERSON = f"""
SELECT {COLUMNS} FROM cross_relationship
WHERE person_id = $1 AND ($2::text IS NULL OR side = $2::text) AND ($3::text IS NULL OR state = $3::text)
ORDER BY filed_at, id
LIMIT $4
"""
_ACTIVE_FOR_GRANT = f"""
SELECT {COLUMNS} FROM cross_relationship
WHERE side = 'giver' AND relation_id = $1 AND person_id = $2
"""
_RECEIVER_SIDE = f"""
SELECT {COLUMNS} FROM cross_relationship
WHERE side = 'receiver' AND relation_id = $1 AND peer_node = $2
"""
_ACTIVE_OF_RECEIVER = f"""
SELECT {COLUMNS} FROM cross_relationship
WHERE side = 'receiver' AND person_id = $1 AND state = 'active'
ORDER BY filed_at, id
"""
_FOR_SHARE = " FOR SHARE"


# --- for the app ---------------------------------------------------------------------------


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
    return [view_from_row(ctx, r) for r in rows]


async def get_for_person(
    ctx: WalletContext, person_id: int, relation_id: str
) -> CrossRelationshipView:
    """One of the person's cross-province relationships."""
    check_relation_id(relation_id)
    async with ctx.pool.acquire() as conn:
        return await load_view(conn, ctx, relation_id, person_id)


async def load_view(
    conn: asyncpg.Connection, ctx: WalletContext, relation_id: str, person_id: int
) -> CrossRelationshipView:
    """The person's view of `relation_id` on the caller's connection; 404 if not theirs."""
    row = await conn.fetchrow(_VIEW_ONE, relation_id, person_id)
    if row is None:
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )
    return view_from_row(ctx, row)


def view_from_row(ctx: WalletContext, r: asyncpg.Record) -> CrossRelationshipView:
    """A `cross_relationship` row (`COLUMNS`) as its party sees it, the other party masked."""
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
    return relation_from_row(row)


async def receiver_side(
    conn: asyncpg.Connection, from_node: str, relation_id: str, *, lock: bool = True
) -> CrossRelation | None:
    """At B: the receiver-side row of `relation_id` filed at `from_node`, in any state
    (check `.active`). Share-locked by default, like `active_relation_for_grant`."""
    if not is_uuid7(relation_id):
        return None
    row = await conn.fetchrow(_RECEIVER_SIDE + (_FOR_SHARE if lock else ""), relation_id, from_node)
    return None if row is None else relation_from_row(row)


async def active_for_receiver(
    conn: asyncpg.Connection, receiver_person_id: int
) -> list[CrossRelation]:
    """At B: the receiver's active cross-province relationships, in filing order (RULES 19)."""
    return [relation_from_row(r) for r in await conn.fetch(_ACTIVE_OF_RECEIVER, receiver_person_id)]
