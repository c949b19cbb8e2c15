"""The append-only audit trail (`audit_event`): who did what, when, to what, under which request.

Written inside the transaction of the action it records, so the trail and the change commit
together. Subjects name rows by id (`person:42`), never by ID number or name.
"""

from __future__ import annotations

import datetime as dt
import json

import asyncpg

_INSERT = """
INSERT INTO audit_event (at, actor, action, subject, request_id, detail)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""


async def record(
    conn: asyncpg.Connection,
    *,
    at: dt.datetime,
    actor: str,
    action: str,
    subject: str | None,
    request_id: str | None,
    **detail: object,
) -> None:
    """Append one audit event in the caller's transaction."""
    await conn.execute(_INSERT, at, actor, action, subject, request_id, json.dumps(detail))
