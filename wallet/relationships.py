"""Relationships between close relatives in the province (RULES 2-8).

OWNER NOTE: this module is being built out; `end_all_for_person` is a fixed contract used by
the roster (a status change away from normal ends every relationship of that person).
"""

from __future__ import annotations

import datetime as dt

import asyncpg

_END_ALL_FOR_PERSON = """
UPDATE relationship
SET state = 'ended', ended_at = $2, ended_by = 'system', end_reason = $3
WHERE (giver_person_id = $1 OR receiver_person_id = $1)
  AND state IN ('pending_confirmation', 'pending_review', 'active')
RETURNING id
"""


async def end_all_for_person(
    conn: asyncpg.Connection, person_id: int, *, reason: str, now: dt.datetime
) -> list[int]:
    """End every live relationship of a person (RULES 6); return the ids ended.

    Runs inside the caller's transaction, so the status change and the endings commit together.
    """
    rows = await conn.fetch(_END_ALL_FOR_PERSON, person_id, now, reason)
    return [r["id"] for r in rows]
