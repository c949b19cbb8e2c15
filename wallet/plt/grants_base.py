"""What both sides of a cross-province grant share: time, alerts, bodies, retries.

The grant code drives the pure state machines of `protocol.giver` and `protocol.receiver`:
load a row (locked), `step`, execute every effect and write the new row in ONE local
transaction (docs/plt-integration.md). This module holds the small pieces both sides use,
among them the effects A and B execute alike (each side's `_apply` executes its hold and
notification effects itself): the outbox ones with the row (`OutboxWrites`,
`save_with_outbox`), alerts and evidence in `execute_common_effect`.
"""

from __future__ import annotations

import datetime as dt
import functools
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
    node: str,
    side: str,
) -> None:
    """Execute one effect that A and B execute alike, in the step's transaction, other than
    the outbox ones (`OutboxWrites` takes those).

    Alert: log it and keep it in the audit trail under the transfer id `subject` (`node` is
    this node). StoreEvidence: nothing (the body is in the row; the envelope is in
    plt_message). Any other effect is a bug at `side` ("A" or "B").
    """
    match effect:
        case Alert():
            await raise_alert(conn, effect, at=now, subject=f"grant:{subject}", node=node)
        case StoreEvidence():
            pass
        case _:
            raise AssertionError(f"unexpected effect at {side}: {effect!r}")


# --- a step's row and its outbox rows in one statement ------------------------------------------


class OutboxWrites:
    """A step's Send and StopRetries effects, written with its row by `save_with_outbox`
    (one statement, not one per effect) when the step saves a row, and one by one by
    `execute` when it does not."""

    def __init__(self) -> None:
        self.sends: list[Send] = []
        self.stops: list[StopRetries] = []

    def take(self, effect: Effect) -> bool:
        """Keep `effect` if it is a Send or a StopRetries; False for any other effect."""
        match effect:
            case Send():
                self.sends.append(effect)
            case StopRetries():
                self.stops.append(effect)
            case _:
                return False
        return True

    async def execute(
        self, conn: asyncpg.Connection, now: dt.datetime, *, subject: str, peer: str | None
    ) -> None:
        """Write them without a row to save: StopRetries ends the outbox row (`peer`, typ,
        `subject`), `peer` being the grant's other node (None when the step has no row: then
        StopRetries is a bug); Send queues the body under `subject`."""
        for stop in self.stops:
            assert peer is not None
            await outbox.stop(conn, to_node=peer, typ=stop.typ, key=subject, now=now)
        for send in self.sends:
            await outbox.enqueue(
                conn,
                to_node=send.to_node,
                typ=send.typ,
                key=subject,
                body=encode_body(send.body),
                now=now,
            )


@functools.cache
def _with_outbox(save_sql: str, save_params: int) -> str:
    """`save_sql` (an UPDATE ... RETURNING version with $1..$save_params) wrapped with the
    outbox writes of `outbox.stop` and `outbox.enqueue` for the same key, as one statement."""
    p = [f"${save_params + i}" for i in range(1, 8)]
    stop_typs, stop_node, send_nodes, send_typs, send_bodies, key, now = p
    return f"""
WITH saved AS ({save_sql.strip()}),
stopped AS (
    UPDATE plt_outbox SET done_at = {now}
    WHERE to_node = {stop_node} AND typ = ANY({stop_typs}::text[]) AND dedup_key = {key}
      AND done_at IS NULL
),
queued AS (
    INSERT INTO plt_outbox (to_node, typ, dedup_key, body, created_at, next_attempt_at)
    SELECT q.to_node, q.typ, {key}, q.body, {now}, {now}
    FROM unnest({send_nodes}::text[], {send_typs}::text[], {send_bodies}::bytea[])
        WITH ORDINALITY AS q(to_node, typ, body, n)
    ORDER BY q.n
    ON CONFLICT (to_node, typ, dedup_key) DO NOTHING
    RETURNING id
)
SELECT (SELECT version FROM saved) AS version,
       (SELECT count(pg_notify('plt_outbox', '')) FROM queued) AS queued
"""


async def save_with_outbox(
    conn: asyncpg.Connection,
    save_sql: str,
    save_args: tuple[object, ...],
    writes: OutboxWrites,
    now: dt.datetime,
    *,
    subject: str,
    peer: str | None,
) -> int | None:
    """Run `save_sql` with `save_args` and return its version (None: no row), writing the
    step's outbox rows (under the key `subject`; stops are for `peer`) in the same statement.
    The rows are those of `outbox.enqueue` and `outbox.stop`, the NOTIFY that wakes the
    senders included."""
    if not writes.sends and not writes.stops:
        version: int | None = await conn.fetchval(save_sql, *save_args)
        return version
    assert not writes.stops or peer is not None
    row = await conn.fetchrow(
        _with_outbox(save_sql, len(save_args)),
        *save_args,
        [s.typ.value for s in writes.stops],
        peer,
        [s.to_node for s in writes.sends],
        [s.typ.value for s in writes.sends],
        [encode_body(s.body) for s in writes.sends],
        subject,
        now,
    )
    assert row is not None
    saved: int | None = row["version"]
    return saved


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
