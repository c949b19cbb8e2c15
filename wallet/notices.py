"""The in-province events that notify app users, one call from each state change.

Each function runs inside the caller's transaction (see `wallet.notifications`), reads what
the phone screen needs from rows the change just wrote, and records one notice per
recipient. Event keys name the change, so a replay notifies nobody twice. Cross-province
grant and relationship events are in `wallet.plt.grant_notices`; a settlement's
`shared_money.spent` is written by the settlement's own statement (`wallet.settlement`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

import asyncpg

from wallet.notifications import Kind, Notice, record_many
from wallet.privacy import mask_name

Recipients = Literal["giver", "receiver", "both"]

_RELATIONSHIPS = """
SELECT r.id, r.giver_person_id, r.receiver_person_id, r.relation_type, r.state, r.ended_by,
       g.name AS giver_name, v.name AS receiver_name
FROM relationship r
JOIN insured_person g ON g.id = r.giver_person_id
JOIN insured_person v ON v.id = r.receiver_person_id
WHERE r.id = ANY($1::bigint[])
ORDER BY r.id
"""
_CREDITED = """
SELECT p.id AS person_id, c.amount_fen
FROM unnest($1::bigint[], $2::bigint[]) AS c(account_id, amount_fen)
JOIN insured_person p ON p.personal_account_id = c.account_id
"""


async def relationships_changed(
    conn: asyncpg.Connection,
    relationship_ids: Sequence[int],
    kind: Kind,
    recipients: Recipients,
    now: dt.datetime,
) -> None:
    """An in-province relationship was filed, confirmed, declined or ended: tell `recipients`
    (each sees the other party's masked name)."""
    notices: list[Notice] = []
    for r in await conn.fetch(_RELATIONSHIPS, list(relationship_ids)):
        sides = ("giver", "receiver") if recipients == "both" else (recipients,)
        for side in sides:
            other = "receiver" if side == "giver" else "giver"
            notices.append(
                Notice(
                    person_id=r[f"{side}_person_id"],
                    kind=kind,
                    event_key=f"relationship:{r['id']}:{kind.value}",
                    counterpart_name_masked=mask_name(r[f"{other}_name"]),
                    refs={"relationship_id": str(r["id"])},
                    detail={"relation_type": r["relation_type"], "as": side, "state": r["state"]}
                    | ({"ended_by": r["ended_by"]} if r["ended_by"] else {}),
                )
            )
    await record_many(conn, notices, now)


async def credits_arrived(
    conn: asyncpg.Connection,
    batch_id: str,
    month: str,
    account_ids: Sequence[int],
    amounts_fen: Sequence[int],
    now: dt.datetime,
) -> None:
    """A monthly credit batch was posted: tell each credited person their amount."""
    rows = await conn.fetch(_CREDITED, list(account_ids), list(amounts_fen))
    notices = [
        Notice(
            person_id=r["person_id"],
            kind=Kind.CREDIT_ARRIVED,
            event_key=f"credit:{batch_id}",
            amount_fen=r["amount_fen"],
            refs={"batch_id": batch_id},
            detail={"month": month},
        )
        for r in rows
    ]
    await record_many(conn, notices, now)


async def wallet_locked(
    conn: asyncpg.Connection, person_id: int, locked_until: dt.datetime, now: dt.datetime
) -> None:
    """Too many wrong payment passwords or device signatures locked the wallet."""
    notice = Notice(
        person_id=person_id,
        kind=Kind.WALLET_LOCKED,
        event_key=f"wallet:locked:{locked_until.isoformat()}",
        deadline=locked_until,
    )
    await record_many(conn, [notice], now)


# The in-province givers whose money paid part of a settlement, for its refunds.
_SPENT = """
SELECT s.seq, s.amount_fen, r.giver_person_id, p.name AS patient_name, st.category,
       st.patient_person_id, r.id AS relationship_id
FROM settlement_source s
JOIN settlement st ON st.id = s.settlement_id
JOIN relationship r ON r.id = s.relationship_id
JOIN insured_person p ON p.id = st.patient_person_id
WHERE s.settlement_id = $1 AND s.source = 'giver'
ORDER BY s.seq
"""


async def shared_money_refunded(
    conn: asyncpg.Connection,
    settlement_id: int,
    refund_id: int,
    refunded: Sequence[tuple[int, int]],
    now: dt.datetime,
) -> None:
    """A refund gave back to in-province givers' accounts: `refunded` is (source seq, fen)."""
    by_seq = dict(refunded)
    notices = [
        Notice(
            person_id=r["giver_person_id"],
            kind=Kind.SHARED_MONEY_REFUNDED,
            event_key=f"refund:{refund_id}:{r['seq']}",
            amount_fen=by_seq[r["seq"]],
            counterpart_name_masked=mask_name(r["patient_name"]),
            refs={
                "settlement_id": str(settlement_id),
                "refund_id": str(refund_id),
                "relationship_id": str(r["relationship_id"]),
            },
            detail={"category": r["category"]},
        )
        for r in await conn.fetch(_SPENT, settlement_id)
        if r["seq"] in by_seq
    ]
    await record_many(conn, notices, now)
