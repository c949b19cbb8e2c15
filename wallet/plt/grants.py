"""Cross-province quota grants at a province node: both roles, one public surface.

Every node is the giver's node (A) for its own givers and the receiver's node (B) for its
own receivers, so both roles are always registered with `wallet.plt.dispatch` (importing
this module does that):

    grants_giver     A: instruct, RECEIVED/DECLINE/ACCEPT/ACK, expiry sweeper, STATUS_REQ, RELEASE
    grants_receiver  B: PREPARE, accept/decline, DECISION, STATUS, in-doubt resolver, endings
    quota            clearing accounts per peer, quotas, closing and RELEASE, quota views
    receipts         signed receipts of committed grants, verifiable offline

Workers (`nodes.workers` runs them): `sweeper_run_once` at A, `resolver_run_once` at B.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from protocol.clock import DECISION_UNACKED_ALERT_MS
from protocol.effects import Alert, AlertKind
from protocol.errors import ErrorClass
from protocol.messages import ErrorReply, MessageType, RelReply
from wallet.context import WalletContext
from wallet.plt import grants_giver, grants_receiver, quota, relations, transport
from wallet.plt.dispatch import Incoming
from wallet.plt.grants_base import from_ms, raise_alert, to_ms
from wallet.plt.grants_giver import GrantView, grant_of_giver, grants_of_giver, instruct
from wallet.plt.grants_receiver import (
    IncomingGrantView,
    accept,
    decline,
    incoming_of_receiver,
    relation_ended,
)

SWEEP_INTERVAL_S = 10.0  # PROTOCOL b.7 / protocol.clock.SWEEP_INTERVAL_MS
# A grant is due once A's clock is past its decide_by (strictly): wake just after it.
SWEEP_AFTER_DEADLINE_S = 0.005
# A deadline already past after a pass: a row the pass skipped (locked by an ACCEPT deciding
# it right now, or by another replica's sweep). Look again soon, but never spin.
SWEEP_RECHECK_S = 1.0
_EARLIEST_DEADLINE = "SELECT min(decide_by) FROM grant_out WHERE state = 'PREPARED_A'"
RESOLVE_INTERVAL_S = 30.0

__all__ = [
    "GrantView",
    "InDoubt",
    "IncomingGrantView",
    "accept",
    "decline",
    "grant_of_giver",
    "grants_of_giver",
    "in_doubt",
    "incoming_of_receiver",
    "instruct",
    "relation_ended",
    "resolver_run_once",
    "sweeper_due_in",
    "sweeper_run_once",
]


async def _relation_ended_at_receiver(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    relation: relations.CrossRelation,
    now: dt.datetime,
) -> None:
    """ON_RELATION_ENDED at B: decline pending grants, close quotas, queue RELEASE."""
    await relation_ended(
        ctx, conn, giver_node=relation.peer_node, relation_id=relation.relation_id, now=now
    )


async def _release_answered(ctx: WalletContext, msg: Incoming, reply: RelReply) -> None:
    """A's REL_REPLY to our RELEASE: stop retrying it."""
    await quota.release_answered(ctx, msg.from_node, reply)


async def _refused(ctx: WalletContext, msg: Incoming, error: ErrorReply) -> None:
    """A peer answered one of our grant messages with a signed ERROR.

    The row keeps retrying (the transport's default): a PREPARE stops at its deadline and
    the sweeper aborts the grant; a DECISION, vote or RELEASE must get through eventually.
    A final (class F) refusal of our own bytes means a bug or an attack: page a human.
    """
    if error.error.class_ is not ErrorClass.F:
        return
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        await raise_alert(
            conn,
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"{msg.from_node} refused our {error.ref_typ}: "
                f"{int(error.error.code)} {error.error.text} {list(error.differs)}",
            ),
            at=now,
            subject=f"grant:{error.transfer_id}",
            node=ctx.node_id,
        )


relations.ON_RELATION_ENDED.append(_relation_ended_at_receiver)
transport.on_error_reply(
    MessageType.PREPARE,
    MessageType.ACCEPT,
    MessageType.DECLINE,
    MessageType.DECISION,
    MessageType.STATUS_REQ,
    MessageType.RELEASE,
)(_refused)
relations.on_rel_reply(MessageType.RELEASE)(_release_answered)


async def sweeper_run_once(ctx: WalletContext) -> int:
    """A: abort every PREPARED_A grant past its deadline (batches of 1,000, SKIP LOCKED)."""
    return await grants_giver.run_sweeper_once(ctx)


async def sweeper_due_in(ctx: WalletContext) -> float | None:
    """Seconds until the earliest pending grant's deadline has passed (None: none pending).

    The sweeper's idle pause ends then (`nodes.workers`), so the 06:00 herd is swept from
    06:00 on, not up to SWEEP_INTERVAL_S later; the pause never exceeds SWEEP_INTERVAL_S,
    so a grant instructed meanwhile is seen as before. A deadline the last pass left behind
    (a row it skipped as locked) is looked at again after SWEEP_RECHECK_S. One index read
    (grant_out_due)."""
    earliest: dt.datetime | None = await ctx.pool.fetchval(_EARLIEST_DEADLINE)
    if earliest is None:
        return None
    ahead = (earliest - ctx.clock.now()).total_seconds()
    return ahead + SWEEP_AFTER_DEADLINE_S if ahead >= 0 else SWEEP_RECHECK_S


async def resolver_run_once(ctx: WalletContext) -> int:
    """B: ask giver nodes about holds in doubt, and apply the signed answers."""
    return await grants_receiver.resolve_once(ctx)


class InDoubt(msgspec.Struct, frozen=True):
    """A grant an operator should look at: undecided past its time, or decided but unacked."""

    side: str  # 'giver' (A) or 'receiver' (B)
    transfer_id: str
    peer: str
    state: str
    amount_fen: int | None
    since: dt.datetime
    why: str


_A_OVERDUE = """
SELECT transfer_id, to_node, state, amount_fen, decide_by AS since, 'past decide_by, not swept' AS why
FROM grant_out WHERE state = 'PREPARED_A' AND decide_by < $1
UNION ALL
SELECT transfer_id, to_node, state, amount_fen, decided_at, 'decision not acknowledged'
FROM grant_out WHERE state IN ('COMMITTED', 'ABORTED') AND NOT acked AND decided_at < $2
ORDER BY since LIMIT $3
"""
_B_IN_DOUBT = """
SELECT transfer_id, from_node, state, amount_fen, received_at AS since,
       CASE WHEN status_attempts > 0 THEN 'waiting for the giver node (asked '
                 || status_attempts || ' times)'
            ELSE 'waiting for the giver node' END AS why
FROM grant_in
WHERE state IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING') AND next_status_at <= $1
ORDER BY received_at LIMIT $2
"""


async def in_doubt(ctx: WalletContext, limit: int = 500) -> list[InDoubt]:
    """Grants an operator should look at (`plt-node grants in-doubt`)."""
    now = ctx.clock.now()
    unacked_before = from_ms(to_ms(now) - DECISION_UNACKED_ALERT_MS)
    out: list[InDoubt] = []
    async with ctx.pool.acquire() as conn:
        for r in await conn.fetch(_A_OVERDUE, now, unacked_before, limit):
            out.append(
                InDoubt(
                    "giver",
                    r["transfer_id"],
                    r["to_node"],
                    r["state"],
                    r["amount_fen"],
                    r["since"],
                    r["why"],
                )
            )
        # B: due for a STATUS query means older than accept_within + grace.
        for r in await conn.fetch(_B_IN_DOUBT, now, limit):
            out.append(
                InDoubt(
                    "receiver",
                    r["transfer_id"],
                    r["from_node"],
                    r["state"],
                    r["amount_fen"],
                    r["since"],
                    r["why"],
                )
            )
    return out
