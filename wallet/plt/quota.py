"""Clearing accounts per peer and the receiver's quotas (RULES 7, 11, 16; PROTOCOL b.1).

Ledger picture of one grant of X fen from a giver at node A to a receiver at node B:

    A  PREPARE   giver personal  --X pending-->  due_to:B:<slot>
       COMMIT    posted: the giver can no longer spend X; A owes it to B's receiver
       RELEASE   due_to:B:<slot> --released-->  giver personal   (the unused part comes back)
    B  PREPARE   due_from:A:<slot> --X pending--> quota (credits pending: not spendable)
       COMMIT    posted: the quota is spendable (available counts posted credits only)
       spend     quota --> institution           (settlement, own account first)
       close     quota --unused--> due_from:A:<slot>, quota closed, RELEASE to A

`due_to`/`due_from` are split into CLEARING_SLOTS sub-accounts by a hash of the transfer id
(the same slot on both sides), opened on demand; their sum is the position with the peer.
At rest, A's `due_to:B` (credit balance) equals B's `due_from:A` (debit balance).

RELEASE is cumulative per grant: each ReleasedGrant says how much of that grant B has
released in total so far (granted - used). A applies only the increase over what it already
returned, so a duplicate, late or reordered RELEASE never returns anything twice. A refund
to a quota that is already closed goes to the quota account (RULES 20: back to the exact
source) and is released at once by a new RELEASE with the larger cumulative amount.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
from collections.abc import Sequence
from typing import Literal

import asyncpg
import msgspec

from protocol.effects import Alert, AlertKind
from protocol.ids import uuid7
from protocol.messages import (
    BATCH_MAX,
    MessageType,
    Release,
    ReleasedGrant,
    RelReply,
    encode_body,
    hash_body,
)
from wallet import ledger
from wallet.context import WalletContext
from wallet.plt import outbox, relations
from wallet.plt.grants_base import (
    PURPOSE_QUOTA,
    PURPOSE_QUOTA_RELEASED,
    audit_money,
    log,
    raise_alert,
    to_ms,
)
from wallet.rules import DeductionStrategy

CLEARING_SLOTS = 16
ClearingKind = Literal["due_to", "due_from"]

# --- statements ------------------------------------------------------------------------------

_ACCOUNT_BY_CODE = "SELECT id FROM account WHERE code = $1"
# Opened on demand; a concurrent opener makes ours a no-op, then the SELECT finds theirs.
_OPEN_ACCOUNT = """
INSERT INTO account (kind, code, debits_must_not_exceed_credits) VALUES ($1, $2, $3)
ON CONFLICT (code) DO NOTHING
RETURNING id
"""
_CLEARING_POSITION = """
SELECT coalesce(sum(credits_posted - debits_posted), 0)::bigint AS posted_fen,
       coalesce(sum(credits_pending - debits_pending), 0)::bigint AS pending_fen
FROM account WHERE code = ANY($1::text[])
"""
_INSERT_QUOTA = """
INSERT INTO quota (account_id, from_node, transfer_id, relation_id, receiver_person_id,
                   giver_masked_name, granted_fen, state, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8)
"""
_ACTIVATE_QUOTA = """
UPDATE quota SET state = 'active', activated_at = $2
WHERE account_id = $1 AND state = 'pending'
RETURNING account_id
"""
_VOID_QUOTA = """
UPDATE quota SET state = 'void' WHERE account_id = $1 AND state = 'pending' RETURNING account_id
"""
# The open quotas of one relationship, locked in account order (the ledger's lock order).
_LOCK_OPEN_QUOTAS = """
SELECT q.account_id, q.transfer_id, q.granted_fen, q.from_node
FROM quota q
WHERE q.from_node = $1 AND q.relation_id = $2 AND q.state = 'active'
ORDER BY q.account_id
FOR UPDATE
"""
_CLOSE_QUOTA = """
UPDATE quota SET state = 'closed', closed_at = $2, released_fen = $3
WHERE account_id = $1 AND state = 'active'
RETURNING account_id
"""
_ADD_RELEASED = """
UPDATE quota SET released_fen = released_fen + $2
WHERE account_id = $1 AND state = 'closed' AND released_fen + $2 <= granted_fen
RETURNING released_fen, granted_fen, transfer_id, relation_id, from_node
"""
_QUOTA_OF_ACCOUNT = """
SELECT q.account_id, q.state, q.from_node, q.transfer_id, q.relation_id, q.granted_fen
FROM quota q WHERE q.account_id = $1
FOR UPDATE
"""
_INSERT_RELEASE_OUT = """
INSERT INTO grant_release (direction, release_id, peer_node, relation_id, body, body_hash,
                           returned_fen, created_at)
VALUES ('out', $1, $2, $3, $4, $5, $6, $7)
"""
_QUOTAS_OF_RECEIVER = """
SELECT q.account_id, q.from_node, q.transfer_id, q.relation_id, q.giver_masked_name,
       q.granted_fen, q.state, q.released_fen, q.created_at, q.activated_at, q.closed_at,
       a.credits_posted - a.debits_posted - a.debits_pending AS available_fen
FROM quota q JOIN account a ON a.id = q.account_id
WHERE q.receiver_person_id = $1 AND ($2::text IS NULL OR q.state = $2)
ORDER BY q.created_at, q.account_id
LIMIT $3
"""
# Spendable quotas of a patient, for the deduction order (RULES 19). `created_at` orders
# quotas of one relationship; `relation_filed_at` comes from the relationship (filing order).
_SPENDABLE_QUOTAS = """
SELECT q.account_id, q.relation_id, q.from_node, q.created_at
FROM quota q
WHERE q.receiver_person_id = $1 AND q.state = 'active'
ORDER BY q.account_id
"""

# --- clearing accounts -------------------------------------------------------------------------


def clearing_slot(transfer_id: str) -> int:
    """The sub-account of a transfer: the same on both nodes, spread evenly."""
    return hashlib.sha256(transfer_id.encode()).digest()[0] % CLEARING_SLOTS


def clearing_code(kind: ClearingKind, node: str, slot: int) -> str:
    """`due_to:prov-13:07`."""
    return f"{kind}:{node}:{slot:02d}"


async def open_account_on_demand(
    conn: asyncpg.Connection, kind: ledger.AccountKind, code: str, *, new_expected: bool = False
) -> int:
    """The id of account `code`, opened now if it does not exist yet (race-safe).

    `new_expected`: try to open it first (one round trip for an account that is new almost
    every time, a grant's quota; a replayed step finds it with a second)."""
    if not new_expected:
        found: int | None = await conn.fetchval(_ACCOUNT_BY_CODE, code)
        if found is not None:
            return found
    no_overdraft = kind in ("personal", "institution", "quota")
    opened: int | None = await conn.fetchval(_OPEN_ACCOUNT, kind, code, no_overdraft)
    if opened is not None:
        return opened
    existing: int | None = await conn.fetchval(_ACCOUNT_BY_CODE, code)
    assert existing is not None, f"account {code} vanished"
    return existing


async def clearing_account(
    conn: asyncpg.Connection, kind: ClearingKind, node: str, transfer_id: str
) -> int:
    """The clearing sub-account with `node` that carries `transfer_id`."""
    return await open_account_on_demand(
        conn, kind, clearing_code(kind, node, clearing_slot(transfer_id))
    )


class ClearingPosition(msgspec.Struct, frozen=True):
    """Net of the clearing sub-accounts with one peer: credits minus debits, in fen."""

    posted_fen: int
    pending_fen: int


async def clearing_position(
    conn: asyncpg.Connection, kind: ClearingKind, node: str
) -> ClearingPosition:
    """Sum over the sub-accounts (A's due_to is positive, B's due_from negative)."""
    codes = [clearing_code(kind, node, slot) for slot in range(CLEARING_SLOTS)]
    row = await conn.fetchrow(_CLEARING_POSITION, codes)
    return ClearingPosition(posted_fen=row["posted_fen"], pending_fen=row["pending_fen"])


# --- quotas --------------------------------------------------------------------------------------


def quota_code(from_node: str, transfer_id: str) -> str:
    """The ledger code of the quota account of one grant."""
    return f"quota:{from_node}:{transfer_id}"


async def open_pending_quota(
    conn: asyncpg.Connection,
    *,
    from_node: str,
    transfer_id: str,
    amount_fen: int,
) -> tuple[int, int]:
    """B on PREPARE: open the grant's quota account and hold X from due_from:A into it.

    Returns (quota account id, hold id). The quota row itself is written after the grant
    row (it references it) by `insert_quota`.
    """
    account_id = await open_account_on_demand(
        conn, "quota", quota_code(from_node, transfer_id), new_expected=True
    )
    due_from = await clearing_account(conn, "due_from", from_node, transfer_id)
    hold_id = await ledger.hold(
        conn,
        debit_account_id=due_from,
        credit_account_id=account_id,
        amount_fen=amount_fen,
        purpose=PURPOSE_QUOTA,
    )
    return account_id, hold_id


async def insert_quota(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    from_node: str,
    transfer_id: str,
    relation_id: str,
    receiver_person_id: int,
    giver_masked_name: str,
    granted_fen: int,
    now: dt.datetime,
) -> None:
    """The quota's link row, pending until A commits."""
    await conn.execute(
        _INSERT_QUOTA,
        account_id,
        from_node,
        transfer_id,
        relation_id,
        receiver_person_id,
        giver_masked_name,
        granted_fen,
        now,
    )


async def activate_quota(conn: asyncpg.Connection, account_id: int, now: dt.datetime) -> None:
    """A committed: the posted quota is spendable."""
    if await conn.fetchval(_ACTIVATE_QUOTA, account_id, now) is None:
        raise AssertionError(f"quota {account_id} was not pending")


async def void_quota(conn: asyncpg.Connection, account_id: int) -> None:
    """A aborted: the hold was voided; the quota never was spendable."""
    if await conn.fetchval(_VOID_QUOTA, account_id) is None:
        raise AssertionError(f"quota {account_id} was not pending")


async def close_quotas_of_relation(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    *,
    from_node: str,
    relation_id: str,
    now: dt.datetime,
) -> list[ReleasedGrant]:
    """The relationship ended (RULES 7): close every active quota under it, durably, now.

    The unused part of each quota goes back to due_from:A (so nothing is spendable twice),
    and one or more RELEASE messages to A are queued in the same transaction. Nothing
    already spent is reversed. Returns what was released.
    """
    rows = await conn.fetch(_LOCK_OPEN_QUOTAS, from_node, relation_id)
    if not rows:
        return []
    await ledger.lock_accounts(conn, [r["account_id"] for r in rows])
    released: list[ReleasedGrant] = []
    for r in rows:
        unused = (await ledger.balance(conn, r["account_id"])).available_fen
        if unused > 0:
            await ledger.transfer(
                conn,
                debit_account_id=r["account_id"],
                credit_account_id=await clearing_account(
                    conn, "due_from", from_node, r["transfer_id"]
                ),
                amount_fen=unused,
                purpose=PURPOSE_QUOTA_RELEASED,
            )
        if await conn.fetchval(_CLOSE_QUOTA, r["account_id"], now, unused) is None:
            raise AssertionError(f"quota {r['account_id']} changed under its lock")
        await audit_money(
            conn, at=now, action="grant.release", transfer_id=r["transfer_id"],
            side="receiver", amount_fen=unused, peer=from_node, relation_id=relation_id,
            used_fen=r["granted_fen"] - unused,
        )  # fmt: skip
        released.append(
            ReleasedGrant(
                transfer_id=r["transfer_id"],
                granted_fen=r["granted_fen"],
                used_fen=r["granted_fen"] - unused,
                released_fen=unused,
            )
        )
        log.info(
            "quota_closed",
            transfer_id=r["transfer_id"],
            from_node=from_node,
            released_fen=unused,
            used_fen=r["granted_fen"] - unused,
        )
    await send_release(conn, to_node=from_node, relation_id=relation_id, grants=released, now=now)
    return released


async def send_release(
    conn: asyncpg.Connection,
    *,
    to_node: str,
    relation_id: str,
    grants: Sequence[ReleasedGrant],
    now: dt.datetime,
) -> list[str]:
    """Queue RELEASE messages (at most BATCH_MAX grants each); return their release ids."""
    ids: list[str] = []
    for start in range(0, len(grants), BATCH_MAX):
        chunk = tuple(grants[start : start + BATCH_MAX])
        release = Release(
            release_id=uuid7(),
            relation_id=relation_id,
            grants=chunk,
            closed_at_ms=to_ms(now),
        )
        raw = encode_body(release)
        await conn.execute(
            _INSERT_RELEASE_OUT,
            release.release_id,
            to_node,
            relation_id,
            raw,
            hash_body(release),
            sum(g.released_fen for g in chunk),
            now,
        )
        await outbox.enqueue(
            conn,
            to_node=to_node,
            typ=MessageType.RELEASE,
            key=release.release_id,
            body=raw,
            now=now,
        )
        ids.append(release.release_id)
    return ids


async def release_refund_to_closed_quota(
    conn: asyncpg.Connection, account_id: int, amount_fen: int, now: dt.datetime
) -> bool:
    """After a refund credited a quota account: if the quota is closed, release the refund.

    The refund first lands on the quota (RULES 20: the exact source); a closed quota must
    hold nothing, so the amount moves on to due_from:A and A learns the new cumulative
    release of that grant. Returns True when it did so. Runs in the refund's transaction.
    """
    row = await conn.fetchrow(_QUOTA_OF_ACCOUNT, account_id)
    if row is None or row["state"] != "closed":
        return False
    await ledger.transfer(
        conn,
        debit_account_id=account_id,
        credit_account_id=await clearing_account(
            conn, "due_from", row["from_node"], row["transfer_id"]
        ),
        amount_fen=amount_fen,
        purpose=PURPOSE_QUOTA_RELEASED,
    )
    updated = await conn.fetchrow(_ADD_RELEASED, account_id, amount_fen)
    if updated is None:
        raise AssertionError(f"refund to quota {account_id} exceeds what was granted")
    released = updated["released_fen"]
    grant = ReleasedGrant(
        transfer_id=updated["transfer_id"],
        granted_fen=updated["granted_fen"],
        used_fen=updated["granted_fen"] - released,
        released_fen=released,
    )
    await send_release(
        conn,
        to_node=updated["from_node"],
        relation_id=updated["relation_id"],
        grants=[grant],
        now=now,
    )
    await audit_money(
        conn, at=now, action="grant.release", transfer_id=grant.transfer_id, side="receiver",
        amount_fen=amount_fen, peer=updated["from_node"], released_fen=released, refund=True,
    )  # fmt: skip
    log.info("quota_refund_released", transfer_id=grant.transfer_id, amount_fen=amount_fen)
    return True


_RELEASE_SENT = """
SELECT release_id FROM grant_release
WHERE direction = 'out' AND peer_node = $1 AND body_hash = $2
"""


async def release_answered(ctx: WalletContext, from_node: str, reply: RelReply) -> None:
    """A answered a RELEASE: stop its retries; a refusal is a bug or an attack (alert)."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        release_id = await conn.fetchval(_RELEASE_SENT, from_node, reply.ref_hash)
        if release_id is None:
            log.warning("release_reply_unmatched", from_node=from_node, ref_hash=reply.ref_hash)
            return
        await outbox.stop(conn, to_node=from_node, typ=MessageType.RELEASE, key=release_id, now=now)
        if reply.error is not None:
            await raise_alert(
                conn,
                Alert(
                    kind=AlertKind.MODIFIED_REQUEST,
                    detail=f"RELEASE {release_id} refused by {from_node}: {reply.error.text}",
                ),
                at=now,
                subject=f"release:{release_id}",
                node=ctx.node_id,
            )


# --- views -----------------------------------------------------------------------------------

QuotaState = Literal["pending", "active", "void", "closed"]
MAX_LISTED = 500


class QuotaView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One quota as its receiver sees it. `used_fen` is what was spent (net of refunds)."""

    transfer_id: str
    from_node: str
    giver_name_masked: str
    state: QuotaState
    granted_fen: int
    used_fen: int
    available_fen: int
    released_fen: int
    created_at: dt.datetime
    activated_at: dt.datetime | None
    closed_at: dt.datetime | None


class QuotaSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The receiver's quotas and their totals (active quotas only in the totals)."""

    granted_fen: int
    used_fen: int
    available_fen: int
    quotas: list[QuotaView]


async def quotas_of(
    ctx: WalletContext, person_id: int, state: QuotaState | None = None
) -> QuotaSummary:
    """The quotas granted to `person_id` by givers in other provinces (RULES 10)."""
    rows = await ctx.pool.fetch(_QUOTAS_OF_RECEIVER, person_id, state, MAX_LISTED)
    views = [_view(r) for r in rows]
    active = [v for v in views if v.state == "active"]
    return QuotaSummary(
        granted_fen=sum(v.granted_fen for v in active),
        used_fen=sum(v.used_fen for v in active),
        available_fen=sum(v.available_fen for v in active),
        quotas=views,
    )


def _view(r: asyncpg.Record) -> QuotaView:
    state: QuotaState = r["state"]
    granted = r["granted_fen"]
    if state == "active":
        available = r["available_fen"]
        used = granted - available
    elif state == "closed":
        available, used = 0, granted - r["released_fen"]
    else:  # pending or void: nothing spendable, nothing spent
        available, used = 0, 0
    return QuotaView(
        transfer_id=r["transfer_id"],
        from_node=r["from_node"],
        giver_name_masked=r["giver_masked_name"],
        state=state,
        granted_fen=granted,
        used_fen=used,
        available_fen=available,
        released_fen=r["released_fen"],
        created_at=r["created_at"],
        activated_at=r["activated_at"],
        closed_at=r["closed_at"],
    )


class SharedSource(msgspec.Struct, frozen=True):
    """A source after the patient's own account: an in-province giver or a quota (RULES 19).

    `filed_at` is when the relationship was filed (a quota: its cross-province
    relationship's); `priority` is the receiver's own order (in-province givers only).
    """

    source: Literal["giver", "quota"]
    account_id: int
    relationship_id: int | None
    available_fen: int
    filed_at: dt.datetime
    priority: int | None = None


def rank_shared_sources(
    strategy: DeductionStrategy,
    givers: Sequence[SharedSource],
    quotas: Sequence[SharedSource],
) -> list[SharedSource]:
    """Merge quotas into the in-province givers' order without reordering the givers.

    `filing_order` (the default): earliest relationship first, a giver before a quota filed
    at the same instant. `giver_balance_desc`: the larger available balance first.
    `receiver_order`: the givers the receiver ordered first, then the rest and the quotas
    by filing order (a receiver cannot order cross-province quotas yet).
    """

    def key(s: SharedSource) -> tuple[int, float]:
        if strategy == "giver_balance_desc":
            return 0, float(-s.available_fen)
        if strategy == "receiver_order" and s.priority is not None:
            return 0, float(s.priority)
        return 1, s.filed_at.timestamp()

    ordered_quotas = sorted(quotas, key=lambda q: (key(q), q.account_id))
    # heapq.merge keeps each input's own order: the givers stay exactly as settlement
    # ranked them; only where the quotas go is decided here.
    return list(heapq.merge(givers, ordered_quotas, key=key))


async def quota_sources(
    conn: asyncpg.Connection, person_id: int, quotas: Sequence[SpendableQuota]
) -> list[SharedSource]:
    """The spendable quotas with balances read now (call after locking their accounts)."""
    if not quotas:
        return []
    found = await ledger.balances(conn, [q.account_id for q in quotas])
    filed = {
        r.relation_id: r.filed_at for r in await relations.active_for_receiver(conn, person_id)
    }
    return [
        SharedSource(
            source="quota",
            account_id=q.account_id,
            relationship_id=None,
            available_fen=found[q.account_id].available_fen,
            filed_at=filed.get(q.relation_id, q.created_at),
        )
        for q in quotas
    ]


class SpendableQuota(msgspec.Struct, frozen=True):
    """An active quota that may pay for its receiver (settlement's deduction order)."""

    account_id: int
    relation_id: str
    from_node: str
    created_at: dt.datetime


async def spendable_quotas(conn: asyncpg.Connection, person_id: int) -> list[SpendableQuota]:
    """Active quotas of a patient, locked FOR SHARE so a closing waits for the payment."""
    rows = await conn.fetch(_SPENDABLE_QUOTAS + " FOR SHARE", person_id)
    return [
        SpendableQuota(
            account_id=r["account_id"],
            relation_id=r["relation_id"],
            from_node=r["from_node"],
            created_at=r["created_at"],
        )
        for r in rows
    ]
