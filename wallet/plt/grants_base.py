"""What both sides of a cross-province grant share: time, alerts, bodies, retries.

The grant code drives the pure state machines of `protocol.giver` and `protocol.receiver`:
load a row (locked), `step`, execute every effect and write the new row in ONE local
transaction (docs/plt-integration.md). This module holds the small pieces both sides use,
among them `execute_common_effect`: the effects A and B execute alike (each side's `_apply`
executes its hold and notification effects itself and hands the rest here).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import asyncpg
import structlog

from protocol.effects import Alert, Effect, Send, StopRetries, StoreEvidence
from protocol.messages import Body, MessageType, decode_body, encode_body
from wallet import audit
from wallet.plt import outbox

log = structlog.get_logger("wallet.plt.grants")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A transaction that lost an insert race (ON CONFLICT DO NOTHING found the key taken) is
# rolled back and run again; the second run finds the winner's row. Never more than this.
RACE_RETRIES = 3
# Ledger purposes (shown in the wallet's records, RULES 10).
PURPOSE_GRANT = "cross_province_grant"
PURPOSE_GRANT_RETURNED = "cross_province_grant_returned"
PURPOSE_QUOTA = "cross_province_quota"
PURPOSE_QUOTA_RETURNED = "cross_province_quota_returned"
PURPOSE_QUOTA_RELEASED = "cross_province_quota_released"

T = TypeVar("T")


class LostRace(Exception):
    """A concurrent transaction inserted the same key first: roll back and run again."""


def to_ms(at: dt.datetime) -> int:
    """Milliseconds since the Unix epoch (UTC), exactly (no float rounding)."""
    return (at - EPOCH) // dt.timedelta(milliseconds=1)


def from_ms(at_ms: int) -> dt.datetime:
    """The instant `at_ms` as an aware UTC datetime."""
    return EPOCH + dt.timedelta(milliseconds=at_ms)


def encode(body: Body | None) -> bytes | None:
    """Canonical bytes of an optional body (what the rows store)."""
    return None if body is None else encode_body(body)


def decode(typ: str | MessageType | None, raw: bytes | None) -> Body | None:
    """The body of stored canonical bytes (they were checked when they arrived or were made)."""
    if raw is None or typ is None:
        return None
    return decode_body(MessageType(typ), bytes(raw))


def grant_log_context(node: str, transfer_id: str) -> AbstractContextManager[None]:
    """Bind the node and the transfer id to every log line written inside (structlog
    contextvars): how one grant is followed across both nodes' logs."""
    return structlog.contextvars.bound_contextvars(node=node, transfer_id=transfer_id)


async def raise_alert(
    conn: asyncpg.Connection, alert: Alert, *, at: dt.datetime, subject: str, node: str
) -> None:
    """Log an operator alert and keep it in the audit trail, in the step's transaction.

    Everything but IN_DOUBT means a bug or an attack (protocol.effects.AlertKind).
    """
    log.error("plt_alert", kind=alert.kind.value, detail=alert.detail, subject=subject, node=node)
    await audit.record(
        conn,
        at=at,
        actor="plt",
        action=f"alert.{alert.kind.value.lower()}",
        subject=subject,
        request_id=None,
        detail=alert.detail,
    )


async def execute_common_effect(
    conn: asyncpg.Connection,
    effect: Effect,
    now: dt.datetime,
    *,
    subject: str,
    peer: str | None,
    node: str,
    side: str,
) -> None:
    """Execute one effect that A and B execute alike, in the step's transaction.

    Send: queue the body in the outbox under the transfer id `subject`. StopRetries: the
    outbox row (`peer`, typ, `subject`) needs no more attempts; `peer` is the grant's other
    node (None when the step has no row: then StopRetries is a bug). Alert: log it and keep it
    in the audit trail (`node` is this node). StoreEvidence: nothing (the body is in the row;
    the envelope is in plt_message). Any other effect is a bug at `side` ("A" or "B").
    """
    match effect:
        case Send():
            await outbox.enqueue(
                conn,
                to_node=effect.to_node,
                typ=effect.typ,
                key=subject,
                body=encode_body(effect.body),
                now=now,
            )
        case StopRetries():
            assert peer is not None
            await outbox.stop(conn, to_node=peer, typ=effect.typ, key=subject, now=now)
        case Alert():
            await raise_alert(conn, effect, at=now, subject=f"grant:{subject}", node=node)
        case StoreEvidence():
            pass
        case _:
            raise AssertionError(f"unexpected effect at {side}: {effect!r}")


async def audit_money(
    conn: asyncpg.Connection,
    *,
    at: dt.datetime,
    action: str,
    transfer_id: str,
    side: str,
    amount_fen: int,
    actor: str = "plt",
    **detail: object,
) -> None:
    """One money movement of a grant in the audit trail, in the step's transaction.

    `action`: grant.hold (A: the giver's amount; B: the pending quota), grant.commit (hold
    posted), grant.abort (hold voided), grant.release (B: unused quota back to clearing;
    A: back to the giver). The actor is `plt` (the protocol, on a peer's signed message or
    a worker), a person (`person:<id>`, an instruction) or the resolving operator.
    """
    await audit.record(
        conn,
        at=at,
        actor=actor,
        action=action,
        subject=f"grant:{transfer_id}",
        request_id=None,
        side=side,
        amount_fen=amount_fen,
        **detail,
    )


async def retry_lost_races(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run a transaction that may lose an insert race again, a bounded number of times."""
    for _ in range(RACE_RETRIES - 1):
        try:
            return await attempt()
        except LostRace:
            continue
    return await attempt()
