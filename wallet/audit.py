"""The append-only audit trail (`audit_event`): who did what, when, to what, under which request.

Written inside the transaction of the action it records, so the trail and the change commit
together. Subjects name rows by id (`person:42`, `grant:<transfer id>`), never by ID number
or name. A trigger refuses every UPDATE and DELETE (migrations/0002).

The request id is the caller's when given, else the one bound to the structured-log context:
the HTTP middleware binds each request's id (echoed in `X-Request-ID` and problem details),
the console binds one per command (`cli-...`), so every event can be found from a log line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import structlog

from wallet.errors import ErrorCode, WalletError

_INSERT = """
INSERT INTO audit_event (at, actor, action, subject, request_id, detail)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""
# Newest first; on the (at, id) and (subject, at, id) indexes of migration 0007.
_LIST = """
SELECT id, at, actor, action, subject, request_id, detail::text AS detail
FROM audit_event
WHERE at >= $1 AND ($2::text IS NULL OR subject = $2) AND ($3::text IS NULL OR action LIKE $3)
ORDER BY at DESC, id DESC
LIMIT $4
"""
LIST_MAX = 10_000
_RELATIVE = re.compile(r"^(\d{1,6})([mhd])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: dt.datetime) -> dt.datetime:
    """`30m`, `24h`, `7d` (before now) or an ISO 8601 date or time (UTC unless it says).

    The result is an instant PostgreSQL can compare: one that would fall outside years
    1..9999 in UTC (`999999d`, `9999-12-31T23:59:59-23:59`) is refused, not passed on.
    """
    try:
        relative = _RELATIVE.match(value.strip())
        if relative:
            return now - dt.timedelta(seconds=int(relative[1]) * _UNIT_S[relative[2]])
        at = dt.datetime.fromisoformat(value.strip())
        return at.astimezone(dt.UTC) if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise WalletError(
            ErrorCode.INVALID_REQUEST,
            f"since {value!r}: give 30m, 24h, 7d, or an ISO date/time like 2026-03-16T08:00"
            " (within years 1..9999 in UTC)",
        ) from None


def current_request_id() -> str | None:
    """The request id bound to the logging context (an HTTP request or a console command)."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


async def record(
    conn: asyncpg.Connection,
    *,
    at: dt.datetime,
    actor: str,
    action: str,
    subject: str | None,
    request_id: str | None = None,
    **detail: object,
) -> None:
    """Append one audit event in the caller's transaction."""
    await conn.execute(
        _INSERT,
        at,
        actor,
        action,
        subject,
        request_id or current_request_id(),
        json.dumps(detail, default=str),
    )


async def record_many(
    conn: asyncpg.Connection,
    events: Sequence[tuple[dt.datetime, str, str, str | None, dict[str, object]]],
) -> None:
    """Append (at, actor, action, subject, detail) events in the caller's transaction, in one
    pipelined round trip (a worker's batch); the request id is the bound one, as in `record`."""
    request_id = current_request_id()
    await conn.executemany(
        _INSERT,
        [
            (at, actor, action, subject, request_id, json.dumps(detail, default=str))
            for at, actor, action, subject, detail in events
        ],
    )


class AuditEvent(msgspec.Struct, frozen=True):
    """One line of the trail."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    subject: str | None
    request_id: str | None
    detail: dict[str, Any]


async def list_events(
    pool: asyncpg.Pool,
    *,
    since: dt.datetime,
    subject: str | None = None,
    action_prefix: str | None = None,
    limit: int = 200,
) -> list[AuditEvent]:
    """Events at or after `since`, newest first; optionally one subject, one action family."""
    limit = max(1, min(limit, LIST_MAX))
    pattern = None
    if action_prefix:
        escaped = action_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = escaped + "%"
    rows = await pool.fetch(_LIST, since, subject, pattern, limit)
    return [
        AuditEvent(
            id=r["id"],
            at=r["at"],
            actor=r["actor"],
            action=r["action"],
            subject=r["subject"],
            request_id=r["request_id"],
            detail=json.loads(r["detail"]),
        )
        for r in rows
    ]
