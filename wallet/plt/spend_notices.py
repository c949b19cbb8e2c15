"""Spending notices between provinces (QUOTA_USED, NOTICE_ACK): the giver hears at once.

When a receiver at node B pays from a quota granted by a giver at node A, or an institution
refunds such a payment, B queues one signed QUOTA_USED per grant drawn on, in the
settlement's or refund's own transaction (a rolled-back payment tells nobody; a committed
one always does). A checks that the message names a grant A committed to the sender under
that relationship, and writes `shared_money.spent` / `shared_money.refunded` for the giver
with the relative's masked name and province, the amount and the category; then answers a
signed NOTICE_ACK, on which B stops retrying.

The notice is informational: it never moves money, and the monthly USAGE (wallet.plt.clearing)
stays the source of truth for amounts. Idempotent at A: the notification's event key is the
notice id, so a duplicate or replayed QUOTA_USED writes nothing new and is acknowledged again.
A notice A refuses (3208 unknown grant, 3100 another relationship or amount) is a permanent
error: B logs a `plt_alert` and stops retrying.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

import asyncpg
import structlog

from protocol.errors import ErrorClass, UnknownTransfer, ValidationFailed
from protocol.ids import uuid7
from protocol.messages import (
    Body,
    ErrorReply,
    MessageType,
    NoticeAck,
    QuotaUsed,
    encode_body,
)
from wallet.context import WalletContext
from wallet.notifications import Kind, Notice, record_many
from wallet.plt import outbox, transport
from wallet.plt.dispatch import Incoming, handles
from wallet.plt.grants_base import to_ms
from wallet.privacy import mask_name

log = structlog.get_logger("wallet.plt.spend_notices")

NoticeKind = Literal["spent", "refunded"]

_KINDS: dict[str, Kind] = {
    "spent": Kind.SHARED_MONEY_SPENT,
    "refunded": Kind.SHARED_MONEY_REFUNDED,
}

# B: the quotas among the given accounts, with what the receiver has used of each grant so
# far net of refunds (granted - released - what the quota still holds), read after the
# settlement's or refund's ledger rows moved the balances in this transaction.
_QUOTAS_USED = """
SELECT q.account_id, q.from_node, q.transfer_id, q.relation_id, s.category,
       q.granted_fen - q.released_fen - (a.credits_posted - a.debits_posted) AS used_total_fen
FROM quota q
JOIN account a ON a.id = q.account_id
CROSS JOIN settlement s
WHERE q.account_id = ANY($1::bigint[]) AND s.id = $2
"""
# A: the grant a notice names, with the giver and the relative as A knows them.
_GRANT = """
SELECT g.giver_person_id, g.to_node, g.state, g.relation_id, g.amount_fen,
       c.other_name, c.other_province
FROM grant_out g
LEFT JOIN cross_relationship c ON c.side = 'giver' AND c.relation_id = g.relation_id
WHERE g.transfer_id = $1
"""
# B: the outbox row of a notice A refused, by the body hash its ERROR names.
_OUTBOX_OF_HASH = """
SELECT dedup_key FROM plt_outbox
WHERE to_node = $1 AND typ = 'QUOTA_USED' AND done_at IS NULL
  AND encode(sha256(body), 'hex') = $2
"""


# --- B: queue the notices ----------------------------------------------------------------------


async def quotas_drawn(
    conn: asyncpg.Connection,
    kind: NoticeKind,
    drawn: Sequence[tuple[int, int]],
    now: dt.datetime,
    *,
    settlement_id: int,
    refund_id: int | None = None,
) -> None:
    """Queue one QUOTA_USED per quota among `drawn` (account id, fen), in the caller's
    transaction. Nothing drawn: no round trip (a settlement from own or in-province money
    pays nothing for this). The sender wakes when the transaction commits."""
    if not drawn:
        return
    fen_of = dict(drawn)
    rows = await conn.fetch(_QUOTAS_USED, list(fen_of), settlement_id)
    messages = []
    for r in rows:
        notice = QuotaUsed(
            notice_id=uuid7(),
            transfer_id=r["transfer_id"],
            relation_id=r["relation_id"],
            kind=kind,
            settlement_ref=str(settlement_id),
            refund_ref=None if refund_id is None else str(refund_id),
            amount_fen=fen_of[r["account_id"]],
            category=r["category"],
            used_total_fen=r["used_total_fen"],
            at_ms=to_ms(now),
        )
        messages.append(
            (r["from_node"], MessageType.QUOTA_USED, notice.notice_id, encode_body(notice))
        )
    await outbox.enqueue_many(conn, messages, now=now)


# --- A: tell the giver -------------------------------------------------------------------------


@handles(MessageType.QUOTA_USED)
async def on_quota_used(ctx: WalletContext, msg: Incoming) -> Body | None:
    """B's notice that its receiver spent (or got refunded) part of our grant: tell the giver,
    once per notice id; refuse a notice about a grant we did not commit to B's receiver."""
    notice = msg.body
    assert isinstance(notice, QuotaUsed)
    async with ctx.pool.acquire() as conn, conn.transaction():
        grant = _checked(await conn.fetchrow(_GRANT, notice.transfer_id), msg.from_node, notice)
        await record_many(conn, [_giver_notice(msg.from_node, notice, grant)], ctx.clock.now())
    log.info(
        "quota_used_notified",
        kind=notice.kind,
        notice_id=notice.notice_id,
        fen=notice.amount_fen,
    )
    return NoticeAck(notice_id=notice.notice_id, transfer_id=notice.transfer_id)


def _checked(grant: asyncpg.Record | None, peer: str, notice: QuotaUsed) -> asyncpg.Record:
    """The grant a notice names, which must be one we committed to the sender, under that
    relationship, with the notice within it (a permanent refusal otherwise: sending it again
    cannot help)."""
    if grant is None or grant["to_node"] != peer:
        raise UnknownTransfer(f"no grant {notice.transfer_id} to {peer}")
    if grant["state"] != "COMMITTED" or grant["relation_id"] != notice.relation_id:
        raise ValidationFailed(
            f"grant {notice.transfer_id} is not a committed grant under {notice.relation_id}"
        )
    if max(notice.amount_fen, notice.used_total_fen) > grant["amount_fen"]:
        raise ValidationFailed(f"notice exceeds the {grant['amount_fen']} fen granted")
    return grant


def _giver_notice(peer: str, notice: QuotaUsed, grant: asyncpg.Record) -> Notice:
    """What the giver's app shows: the relative (masked, as A knows them), the amount, the
    category, the grant and B's references; keyed by the notice id (once per notice)."""
    refs = {
        "transfer_id": notice.transfer_id,
        "relation_id": notice.relation_id,
        "settlement_ref": notice.settlement_ref,
    }
    if notice.refund_ref is not None:
        refs["refund_ref"] = notice.refund_ref
    other = grant["other_name"]
    return Notice(
        person_id=grant["giver_person_id"],
        kind=_KINDS[notice.kind],
        event_key=f"quota_used:{peer}/{notice.notice_id}",
        amount_fen=notice.amount_fen,
        counterpart_name_masked=None if other is None else mask_name(other),
        counterpart_province=grant["other_province"],
        refs=refs,
        detail={
            "category": notice.category,
            "used_total_fen": notice.used_total_fen,
            "granted_fen": grant["amount_fen"],
        },
    )


# --- B: the answer -----------------------------------------------------------------------------


@handles(MessageType.NOTICE_ACK)
async def on_notice_ack(ctx: WalletContext, msg: Incoming) -> Body | None:
    """A told its giver: stop retrying the notice (only ever a reply)."""
    ack = msg.body
    assert isinstance(ack, NoticeAck)
    if msg.is_reply:
        await _stop(ctx, msg.from_node, ack.notice_id)
    return None


async def _notice_refused(ctx: WalletContext, msg: Incoming, error: ErrorReply) -> None:
    """A refused a notice. Permanent (class F): an alert for the operators, and no more
    retries; temporary: the outbox keeps retrying."""
    if error.error.class_ is not ErrorClass.F:
        return
    log.error(
        "plt_alert",
        kind="quota_notice_refused",
        peer=msg.from_node,
        code=int(error.error.code),
        text=error.error.text,
        transfer_id=error.transfer_id,
    )
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(_OUTBOX_OF_HASH, msg.from_node, error.ref_hash)
    if row is not None:
        await _stop(ctx, msg.from_node, row["dedup_key"])


async def _stop(ctx: WalletContext, peer: str, notice_id: str) -> None:
    async with ctx.pool.acquire() as conn:
        await outbox.stop(
            conn, to_node=peer, typ=MessageType.QUOTA_USED, key=notice_id, now=ctx.clock.now()
        )


transport.on_error_reply(MessageType.QUOTA_USED)(_notice_refused)
