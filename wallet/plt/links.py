"""What grants need from the rest of `wallet.plt`: relationships, keys, key sets.

One narrow seam, so the grant code reads the cross-province relationships
(`wallet.plt.relations`, migrations/0004) and the node's keys (`wallet.plt.node`) in one
place only (docs/plt-integration.md, "Requests"). At A the lookup tells "unknown" (404)
from "not active" (4300) apart, which `relations.active_relation_for_grant` does not, so
it reads the giver-side row itself.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from protocol.envelope import Opened, encode_envelope
from protocol.messages import MessageType
from wallet.context import WalletContext
from wallet.plt import relations
from wallet.plt.grants_base import to_ms

# Share-locked: an ending of the relationship waits until the grant step commits, and then
# sees the grant rows it has to decline or close (ON_RELATION_ENDED).
_AT_GIVER = """
SELECT relation_id, person_id, peer_node, other_ref, relation_type, state, filed_at
FROM cross_relationship
WHERE side = 'giver' AND relation_id = $1
FOR SHARE
"""


class RelationAtGiver(msgspec.Struct, frozen=True):
    """A cross-province relationship as the giver's node (A) knows it."""

    relation_id: str
    giver_person_id: int
    receiver_node: str
    receiver_account_ref: str
    relation_type: str
    active: bool
    filed_at: dt.datetime


class RelationAtReceiver(msgspec.Struct, frozen=True):
    """A cross-province relationship as the receiver's node (B) knows it."""

    relation_id: str
    giver_node: str
    receiver_person_id: int
    receiver_account_ref: str
    relation_type: str
    active: bool
    filed_at: dt.datetime


async def relation_at_giver(conn: asyncpg.Connection, relation_id: str) -> RelationAtGiver | None:
    """The giver-side row of a relationship (None if unknown or not confirmed yet)."""
    return giver_relation_of(await conn.fetchrow(_AT_GIVER, relation_id))


def giver_relation_of(row: asyncpg.Record | None) -> RelationAtGiver | None:
    """A giver-side row (the columns of `_AT_GIVER`, read by another statement too) as a
    RelationAtGiver; None if there is no row or the relationship is not confirmed yet."""
    if row is None or row["other_ref"] is None or row["relation_type"] is None:
        return None
    return RelationAtGiver(
        relation_id=row["relation_id"],
        giver_person_id=row["person_id"],
        receiver_node=row["peer_node"],
        receiver_account_ref=row["other_ref"],
        relation_type=row["relation_type"],
        active=row["state"] == "active",
        filed_at=row["filed_at"],
    )


async def relation_at_receiver(
    conn: asyncpg.Connection, giver_node: str, relation_id: str
) -> RelationAtReceiver | None:
    """The receiver-side row of a relationship filed at `giver_node` (share-locked)."""
    row = await relations.receiver_side(conn, giver_node, relation_id)
    if row is None or row.person_id is None or row.relation_type is None:
        return None
    return RelationAtReceiver(
        relation_id=row.relation_id,
        giver_node=row.peer_node,
        receiver_person_id=row.person_id,
        receiver_account_ref=relations.receiver_account_ref(row.person_id),
        relation_type=row.relation_type,
        active=row.active,
        filed_at=row.filed_at,
    )


async def sealed_envelope(
    ctx: WalletContext, typ: MessageType, to_node: str, body: bytes
) -> bytes | None:
    """`body` signed now for `to_node`, as msgpack wire bytes (None without node keys)."""
    if ctx.plt is None:
        return None
    env = ctx.plt.seal(typ, to_node, bytes(body), to_ms(ctx.clock.now()))
    return encode_envelope(env, "msgpack")


async def open_peer_envelope(ctx: WalletContext, raw: bytes) -> Opened:
    """Verify an envelope addressed to us (refreshing the sender's key set once)."""
    if ctx.plt is None:
        raise RuntimeError("this node has no PLT/1 keys")
    return await ctx.plt.open(bytes(raw), to_ms(ctx.clock.now()))
