"""Push notifications to phones, sent from the notification table by a worker.

The `notification` table is the outbox: every row starts `pending` and `run_once` (the
`notifications-push` worker) hands it to the node's `PushSender`. A pass claims a batch with
`FOR UPDATE SKIP LOCKED` and moves each claimed row's `push_next_at` forward by a lease in
the claiming transaction, so replicas share the work and a process that dies mid-send leaves
rows that simply come due again; the sends happen outside any transaction, so a slow or
dead push service never holds a lock or a pool connection, and never blocks the node. A
failed send is retried with exponential backoff (`push_backoff_s_min` doubling up to
`push_backoff_s_max`) and given up (`failed`) after `push_attempts_max` attempts.

Senders (`push_sender`):

* `log`: development; each push is one structured log line (`notification_pushed`);
* `webhook`: POST of the JSON `PushMessage` to the province's push vendor, signed with
  HMAC-SHA256 (see `signature` and docs/notifications.md); any 2xx is delivered;
* `none`: nothing is pushed (rows are marked sent at once).

Delivery is at least once: a push that reached the vendor but whose answer was lost is sent
again with the same `X-PLT-Delivery` id, which the vendor uses to drop the duplicate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import time
import weakref
from typing import Protocol

import asyncpg
import httpx
import msgspec
import structlog

from wallet import notifications
from wallet.context import WalletContext
from wallet.notification_settings import NotificationSettings

log = structlog.get_logger("wallet.push")

IDLE_S = 1.0  # the worker's pause while there is nothing due
LEASE_S = 60.0  # a claimed row comes due again after this if its sender never reported
ERROR_MAX_CHARS = 500
SIGNATURE_HEADER = "X-PLT-Signature"
DELIVERY_HEADER = "X-PLT-Delivery"


class PushMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What goes to the push vendor: the notification (masked) and an opaque recipient.

    `recipient` is the wallet's app handle at this node (`person-<id>`), never a name, a
    phone or an ID number; the vendor maps it to the phones the app registered with it.
    """

    recipient: str
    node: str
    notification: notifications.NotificationView


class PushFailed(Exception):
    """The push service did not take the message (it is retried)."""


class PushSender(Protocol):
    async def send(self, message: PushMessage) -> None:
        """Deliver one push or raise (PushFailed, OSError, httpx errors): it is retried."""
        ...


class LogPushSender:
    """Development: log each push (no personal data beyond the masked name in it)."""

    async def send(self, message: PushMessage) -> None:
        n = message.notification
        log.info(
            "notification_pushed",
            node=message.node,
            recipient=message.recipient,
            notification_id=n.id,
            kind=n.kind,
            amount_fen=n.amount_fen,
            counterpart=n.counterpart_name_masked,
            refs=n.refs,
        )


class NoPushSender:
    async def send(self, message: PushMessage) -> None:
        return None


def signature(key: bytes, timestamp_s: int, body: bytes) -> str:
    """The `X-PLT-Signature` value: `t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>." + body)>`.

    The timestamp is signed with the body, so a vendor can refuse old replays."""
    mac = hmac.new(key, str(timestamp_s).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={mac}"


class WebhookPushSender:
    """POST each push, HMAC-signed, to the province's push vendor."""

    def __init__(self, url: str, key: bytes, timeout_s: float) -> None:
        self._url = url
        self._key = key
        self._timeout_s = timeout_s

    async def send(self, message: PushMessage) -> None:
        body = msgspec.json.encode(message)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature(self._key, int(time.time()), body),
            DELIVERY_HEADER: f"{message.node}:{message.notification.id}",
        }
        async with httpx.AsyncClient(timeout=self._timeout_s) as http:
            response = await http.post(self._url, content=body, headers=headers)
        if not response.is_success:
            raise PushFailed(f"push service answered {response.status_code}")


def sender_for(config: NotificationSettings) -> PushSender:
    """The sender `push_sender` names (a webhook needs its URL and key)."""
    if config.push_sender == "webhook":
        if not config.push_webhook_url or not config.push_hmac_key:
            raise ValueError("push_sender = webhook needs push_webhook_url and push_hmac_key_file")
        return WebhookPushSender(
            config.push_webhook_url, config.push_hmac_key, config.push_timeout_s
        )
    if config.push_sender == "none":
        return NoPushSender()
    return LogPushSender()


# Per context, like the stream hubs: tests may install their own sender (`use_sender`).
_SENDERS: dict[int, PushSender] = {}


def use_sender(ctx: WalletContext, sender: PushSender) -> None:
    """Send this node's pushes through `sender` from now on."""
    if id(ctx) not in _SENDERS:
        weakref.finalize(ctx, _SENDERS.pop, id(ctx), None)
    _SENDERS[id(ctx)] = sender


def sender_of(ctx: WalletContext) -> PushSender:
    """The node's sender, made from its settings on first use."""
    if id(ctx) not in _SENDERS:
        use_sender(ctx, sender_for(ctx.notifications))
    return _SENDERS[id(ctx)]


# --- the worker pass ---------------------------------------------------------------------------

_CLAIM = f"""
WITH due AS (
    SELECT id FROM notification
    WHERE push_state = 'pending' AND push_next_at <= $1
    ORDER BY push_next_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE notification n SET push_next_at = $1 + make_interval(secs => $3::float8)
FROM due WHERE n.id = due.id
RETURNING n.person_id, n.push_attempts, {", ".join("n." + c.strip() for c in notifications.COLUMNS.split(","))}
"""
# Every row of a pass that was delivered, in one statement (a round trip per row cost the
# node more than the push itself when the gateway is fast).
_SENT = """
UPDATE notification SET push_state = 'sent', push_done_at = $2, push_attempts = push_attempts + 1,
    push_last_error = NULL
WHERE id = ANY($1::bigint[]) AND push_state = 'pending'
"""
_FAILED = """
UPDATE notification
SET push_attempts = push_attempts + 1, push_last_error = $3,
    push_next_at = $2::timestamptz + make_interval(secs => $4::float8),
    push_state = CASE WHEN push_attempts + 1 >= $5 THEN 'failed' ELSE 'pending' END,
    push_done_at = CASE WHEN push_attempts + 1 >= $5 THEN $2 END
WHERE id = $1 AND push_state = 'pending'
"""


def backoff_s(config: NotificationSettings, attempts: int) -> float:
    """The pause after the `attempts`-th failure: min doubling per attempt, capped at max."""
    pause: float = config.push_backoff_s_min * 2 ** max(0, attempts - 1)
    return min(config.push_backoff_s_max, pause)


async def run_once(ctx: WalletContext) -> int:
    """Push every due notification of one batch; the number of rows handled."""
    config = ctx.notifications
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_CLAIM, now, config.push_batch_max, LEASE_S)
    if not rows:
        return 0
    sender = sender_of(ctx)
    results = await asyncio.gather(*(_push(ctx, sender, row) for row in rows))
    # Each row's outcome stands alone: no transaction around them, one statement for all the
    # delivered ones (the usual case) and one per failure.
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        sent = [row["id"] for row, error in zip(rows, results, strict=True) if error is None]
        if sent:
            await conn.execute(_SENT, sent, now)
        for row, error in zip(rows, results, strict=True):
            if error is not None:
                await _failed(conn, config, row, error, now)
    return len(rows)


async def _push(ctx: WalletContext, sender: PushSender, row: asyncpg.Record) -> str | None:
    """Send one row; None when delivered, else why not."""
    message = PushMessage(
        recipient=f"person-{row['person_id']}",
        node=ctx.node_id,
        notification=notifications.view_of(row),
    )
    try:
        await asyncio.wait_for(sender.send(message), timeout=ctx.notifications.push_timeout_s)
    except (PushFailed, OSError, httpx.HTTPError, TimeoutError) as exc:
        return (repr(exc) or type(exc).__name__)[:ERROR_MAX_CHARS]
    return None


async def _failed(
    conn: asyncpg.Connection,
    config: NotificationSettings,
    row: asyncpg.Record,
    error: str,
    now: dt.datetime,
) -> None:
    """Record a failed push: retried after the backoff, or given up after the last attempt."""
    attempts = row["push_attempts"] + 1
    await conn.execute(
        _FAILED, row["id"], now, error, backoff_s(config, attempts), config.push_attempts_max
    )
    log.warning(
        "notification_push_failed",
        notification_id=row["id"],
        attempts=attempts,
        gave_up=attempts >= config.push_attempts_max,
        error=error,
    )


# --- gauges for /metrics -----------------------------------------------------------------------

_GAUGES = """
SELECT count(*) FILTER (WHERE push_state = 'pending') AS backlog,
       count(*) FILTER (WHERE push_state = 'pending' AND push_attempts > 0) AS retrying,
       min(created_at) FILTER (WHERE push_state = 'pending') AS oldest
FROM notification WHERE push_state = 'pending'
"""
_GAVE_UP = "SELECT count(*) FROM notification WHERE push_state = 'failed'"


async def gauges(conn: asyncpg.Connection, now: dt.datetime) -> list[tuple[str, str, float]]:
    """(name, help, value) of the push gauges: the backlog, its oldest age, the rows being
    retried after failures, and the rows given up."""
    row = await conn.fetchrow(_GAUGES)
    gave_up: int = await conn.fetchval(_GAVE_UP)
    oldest: dt.datetime | None = row["oldest"]
    age_s = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return [
        ("plt_push_backlog", "Notifications not yet pushed.", row["backlog"]),
        (
            "plt_push_oldest_unsent_age_seconds",
            "Age of the oldest notification not yet pushed (0 when none).",
            age_s,
        ),
        (
            "plt_push_retrying",
            "Notifications whose push failed at least once and is being retried.",
            row["retrying"],
        ),
        (
            "plt_push_failed",
            "Notifications whose push was given up after push_attempts_max failures.",
            gave_up,
        ),
    ]
