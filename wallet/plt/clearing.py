"""Monthly clearing between provinces (RULES 16, PROTOCOL b.10).

At the receiver's node (B), `run_clearing(month)` after the month is over and every window of
the month is reconciled, in one transaction: per grant, what B's receivers spent of the quota
in the month (settlements minus refunds, by their own dates) is booked from `due_from:<A>` to
`receivable:<A>`; the month is recorded (`clearing_run`: never twice); the month's windows
become INCLUDED_IN_CLEARING; and a signed USAGE per giver node is queued (in parts of at most
4,096 grants; an empty one when nothing was spent, so A knows).

At the giver's node (A), a USAGE is checked line by line against `grant_out` (a committed
grant of that amount to that peer; usage continuing the earlier months) and the used part
of each frozen amount is booked from `due_to:<B>` to `payable:<B>`; the signed RECON_REPLY
says how much was booked, and B checks it against its own sum.

Both sides then compute the same net per pair of provinces from their own books:
`clearing_report(month)`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Literal
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import structlog

from protocol.clock import DEFAULT_TZ
from protocol.errors import ModifiedRequest, ValidationFailed
from protocol.messages import (
    USAGE_LINES_MAX,
    Body,
    ErrorReply,
    MessageType,
    ReconReply,
    Usage,
    UsageLine,
    decode_body,
    differing_fields,
    encode_body,
    hash_body,
)
from wallet import audit, ledger
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.plt import outbox, statements, transport
from wallet.plt.dispatch import Incoming, handles
from wallet.plt.grants_base import to_ms
from wallet.plt.quota import (
    ClearingKind,
    clearing_code,
    clearing_slot,
    open_account_on_demand,
)

log = structlog.get_logger("wallet.plt.clearing")

PURPOSE_PAYABLE = "cross_province_payable"
PURPOSE_RECEIVABLE = "cross_province_receivable"
CLEARED_STATES = ("INCLUDED_IN_CLEARING", "SETTLED")

_RUN_EXISTS = "SELECT cleared_at FROM clearing_run WHERE month = $1"
_UNRECONCILED = """
SELECT peer, window_id, state FROM recon_window
WHERE window_id LIKE $1 || '-%' AND state IN ('OPEN', 'CLOSED')
ORDER BY window_id, peer
"""
# Per committed grant received here: spending from its quota by the settlements' dates minus
# refunds to it by the refunds' dates (B's clock, recorded on those rows).
_USAGE = """
WITH moves AS (
    SELECT lt.debit_account_id AS account_id, lt.amount_fen AS fen, st.created_at AS at
    FROM ledger_transfer lt JOIN settlement st ON st.id = lt.settlement_id
    JOIN quota q ON q.account_id = lt.debit_account_id
    WHERE lt.refund_id IS NULL
    UNION ALL
    SELECT lt.credit_account_id, -lt.amount_fen, r.created_at
    FROM ledger_transfer lt JOIN refund r ON r.id = lt.refund_id
    JOIN quota q ON q.account_id = lt.credit_account_id
)
SELECT q.from_node AS peer, q.transfer_id, q.granted_fen, q.released_fen,
       (coalesce(sum(m.fen) FILTER (WHERE m.at >= $1 AND m.at < $2), 0))::bigint AS used_fen,
       (coalesce(sum(m.fen) FILTER (WHERE m.at < $2), 0))::bigint AS used_total_fen
FROM quota q JOIN moves m ON m.account_id = q.account_id
GROUP BY q.account_id, q.from_node, q.transfer_id, q.granted_fen, q.released_fen
HAVING coalesce(sum(m.fen) FILTER (WHERE m.at >= $1 AND m.at < $2), 0) <> 0
ORDER BY q.from_node, q.transfer_id
"""
# Every peer with a committed grant either way gets a USAGE (maybe empty): then each side
# of a pair knows when it has heard everything.
_PEERS = """
SELECT from_node AS peer FROM grant_in WHERE state = 'COMMITTED'
UNION SELECT to_node FROM grant_out WHERE state = 'COMMITTED'
"""
_INSERT_RUN = """
INSERT INTO clearing_run (month, windows, grants, cleared_at, actor) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (month) DO NOTHING
RETURNING month
"""
_INCLUDE_WINDOWS = """
UPDATE recon_window SET state = 'INCLUDED_IN_CLEARING', clearing_month = $1
WHERE window_id LIKE $1 || '-%' AND state = 'RECONCILED'
"""
_INSERT_RECEIVABLE = """
INSERT INTO clearing_receivable
    (month, peer, transfer_id, granted_fen, used_fen, ledger_transfer_id, booked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
_INSERT_USAGE = """
INSERT INTO clearing_usage
    (direction, peer, month, part, parts, body, body_hash, used_fen, envelope, reply,
     booked_fen, created_at, replied_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
"""
_USAGE_IN = """
SELECT body, body_hash, reply FROM clearing_usage
WHERE direction = 'in' AND peer = $1 AND month = $2 AND part = $3
FOR UPDATE
"""
_GRANTS_OUT = """
SELECT transfer_id, to_node, state, amount_fen FROM grant_out WHERE transfer_id = ANY($1::text[])
"""
_PAYABLE_SO_FAR = """
SELECT transfer_id, sum(used_fen)::bigint AS used_fen FROM clearing_payable
WHERE transfer_id = ANY($1::text[]) AND month < $2 GROUP BY transfer_id
"""
_INSERT_PAYABLE = """
INSERT INTO clearing_payable
    (month, transfer_id, peer, granted_fen, used_fen, ledger_transfer_id, booked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
_USAGE_REPLIED = """
UPDATE clearing_usage SET reply = $3, booked_fen = $4, replied_at = $5
WHERE direction = 'out' AND peer = $1 AND body_hash = $2 AND reply IS NULL
RETURNING month, part, used_fen
"""
_USAGE_OUT_OF_HASH = """
SELECT month, part FROM clearing_usage WHERE direction = 'out' AND peer = $1 AND body_hash = $2
"""
_PAIR_TOTALS = """
SELECT peer, sum(owes)::bigint AS we_owe_fen, sum(owed)::bigint AS owed_to_us_fen FROM (
    SELECT peer, used_fen AS owes, 0 AS owed FROM clearing_payable WHERE month = $1
    UNION ALL
    SELECT peer, 0, used_fen FROM clearing_receivable WHERE month = $1
) t GROUP BY peer
"""
_USAGE_PARTS = """
SELECT direction, peer, part, parts, used_fen, booked_fen FROM clearing_usage WHERE month = $1
"""
_SETTLE = """
UPDATE recon_window SET state = 'SETTLED'
WHERE clearing_month = $1 AND state = 'INCLUDED_IN_CLEARING'
"""


# --- months ----------------------------------------------------------------------------------


def month_bounds(month: str, tz: str = DEFAULT_TZ) -> tuple[dt.datetime, dt.datetime]:
    """Start and end (exclusive) of a calendar month in `tz`; WalletError if not YYYY-MM."""
    try:
        start = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=ZoneInfo(tz))
    except ValueError:
        raise WalletError(
            ErrorCode.INVALID_REQUEST, f"month {month!r} is not YYYY-MM", reason="bad_month"
        ) from None
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def _month_over(month: str, now: dt.datetime) -> bool:
    return now >= month_bounds(month)[1]


# --- B: run the month --------------------------------------------------------------------------


class ClearingRun(msgspec.Struct, frozen=True):
    """What `run_clearing` booked and sent."""

    month: str
    windows: int
    grants: int
    receivable_fen: dict[str, int]  # per giver node
    usage_parts: dict[str, int]  # per giver node


async def run_clearing(
    ctx: WalletContext,
    month: str,
    *,
    actor: str = "operator-cli",
    progress: Callable[[int, int], None] | None = None,
) -> ClearingRun:
    """Clear `month` at this node (B side for every giver node), once.

    Refused, with nothing changed: a month not over yet, a month already cleared, a month
    with a window not reconciled with its peer (each is named).
    """
    now = ctx.clock.now()
    start, end = month_bounds(month)
    if now < end:
        raise WalletError(
            ErrorCode.STATE_CONFLICT,
            f"month {month} is still open at {ctx.node_id} (it ends {end.isoformat()})",
            reason="month_open",
        )
    async with ctx.pool.acquire() as conn:
        await statements.discover_windows(conn, now, since=start - dt.timedelta(days=1))
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_RUN_EXISTS, month) is not None:
            raise WalletError(
                ErrorCode.ALREADY_EXISTS, f"month {month} is already cleared", reason="cleared"
            )
        open_windows = await conn.fetch(_UNRECONCILED, month)
        if open_windows:
            named = ", ".join(f"{r['peer']} {r['window_id']} ({r['state']})" for r in open_windows)
            raise WalletError(
                ErrorCode.STATE_CONFLICT,
                f"month {month} has {len(open_windows)} window(s) not reconciled: {named[:400]}",
                reason="windows_not_reconciled",
                windows=[f"{r['peer']}/{r['window_id']}" for r in open_windows[:100]],
            )
        rows = await conn.fetch(_USAGE, start, end)
        windows = int((await conn.execute(_INCLUDE_WINDOWS, month)).split()[-1])
        inserted = await conn.fetchval(_INSERT_RUN, month, windows, len(rows), now, actor)
        if inserted is None:  # a concurrent run won: this one rolls back
            raise WalletError(
                ErrorCode.ALREADY_EXISTS, f"month {month} is already cleared", reason="cleared"
            )
        lines: dict[str, list[UsageLine]] = {p: [] for p in await _peers(conn)}
        receivable: dict[str, int] = {p: 0 for p in lines}
        for i, row in enumerate(rows):
            peer = row["peer"]
            line = UsageLine(
                transfer_id=row["transfer_id"],
                granted_fen=row["granted_fen"],
                used_fen=row["used_fen"],
                used_total_fen=row["used_total_fen"],
                released_fen=row["released_fen"],
            )
            lines.setdefault(peer, []).append(line)
            receivable[peer] = receivable.get(peer, 0) + line.used_fen
            moved = await _book(
                conn, "due_from", "receivable", peer, line.transfer_id, -line.used_fen
            )
            await conn.execute(
                _INSERT_RECEIVABLE,
                month,
                peer,
                line.transfer_id,
                line.granted_fen,
                line.used_fen,
                moved,
                now,
            )
            if progress is not None:
                progress(i + 1, len(rows))
        parts = {
            peer: await _send_usage(conn, peer, month, peer_lines, now)
            for peer, peer_lines in sorted(lines.items())
        }
        await audit.record(
            conn,
            at=now,
            actor=actor,
            action="clearing.run",
            subject=month,
            request_id=None,
            windows=windows,
            grants=len(rows),
            receivable_fen=receivable,
        )
    log.info("month_cleared", month=month, grants=len(rows), windows=windows)
    return ClearingRun(month, windows, len(rows), receivable, parts)


async def _peers(conn: asyncpg.Connection) -> list[str]:
    return sorted(r["peer"] for r in await conn.fetch(_PEERS))


async def _book(
    conn: asyncpg.Connection,
    clearing_kind: ClearingKind,
    kind: Literal["payable", "receivable"],
    peer: str,
    transfer_id: str,
    fen: int,
) -> int:
    """One clearing movement between the grant's clearing sub-account and `kind:<peer>`:
    `fen` > 0 credits `kind` (A's payable), `fen` < 0 debits it (B's receivable)."""
    slot_code = clearing_code(clearing_kind, peer, clearing_slot(transfer_id))
    slot = await open_account_on_demand(conn, clearing_kind, slot_code)
    other = await open_account_on_demand(conn, kind, f"{kind}:{peer}")
    debit, credit = (slot, other) if fen > 0 else (other, slot)
    purpose = PURPOSE_PAYABLE if kind == "payable" else PURPOSE_RECEIVABLE
    return await ledger.transfer(
        conn, debit_account_id=debit, credit_account_id=credit, amount_fen=abs(fen), purpose=purpose
    )


async def _send_usage(
    conn: asyncpg.Connection, peer: str, month: str, lines: list[UsageLine], now: dt.datetime
) -> int:
    chunks = [lines[i : i + USAGE_LINES_MAX] for i in range(0, len(lines), USAGE_LINES_MAX)] or [[]]
    for part, chunk in enumerate(chunks, start=1):
        usage = Usage(
            month=month,
            part=part,
            parts=len(chunks),
            lines=tuple(chunk),
            used_fen=sum(line.used_fen for line in chunk),
            cleared_at_ms=to_ms(now),
        )
        body = encode_body(usage)
        await conn.execute(
            _INSERT_USAGE,
            "out",
            peer,
            month,
            part,
            len(chunks),
            body,
            hash_body(usage),
            usage.used_fen,
            None,
            None,
            None,
            now,
            None,
        )
        await outbox.enqueue(
            conn, to_node=peer, typ=MessageType.USAGE, key=f"{month}/{part}", body=body, now=now
        )
    return len(chunks)


# --- A: apply a USAGE ------------------------------------------------------------------------------


@handles(MessageType.USAGE)
async def on_usage(ctx: WalletContext, msg: Incoming) -> Body | None:
    """B's signed USAGE for a month: book the used parts as payables, once; answer BOOKED.

    The same USAGE again gets the stored answer; another body for the same (month, part)
    is 3106; a month still open here, or a line that is not a committed grant of that
    amount to the sender (or does not continue the earlier months) refuses it whole.
    """
    usage = msg.body
    assert isinstance(usage, Usage)
    now = ctx.clock.now()
    peer = msg.from_node
    if not _month_over(usage.month, now):
        raise ValidationFailed(f"month {usage.month} is still open at {ctx.node_id}")
    try:
        async with ctx.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchrow(_USAGE_IN, peer, usage.month, usage.part)
            if stored is not None:
                if stored["body_hash"] != msg.body_hash:
                    old = decode_body(MessageType.USAGE, bytes(stored["body"]))
                    raise ModifiedRequest(differing_fields(old, usage))
                reply = decode_body(MessageType.RECON_REPLY, bytes(stored["reply"]))
                return reply
            await _check_lines(conn, peer, usage)
            for line in usage.lines:
                moved = await _book(
                    conn, "due_to", "payable", peer, line.transfer_id, line.used_fen
                )
                await conn.execute(
                    _INSERT_PAYABLE,
                    usage.month,
                    line.transfer_id,
                    peer,
                    line.granted_fen,
                    line.used_fen,
                    moved,
                    now,
                )
            answer = ReconReply(
                ref_typ=MessageType.USAGE,
                ref_hash=msg.body_hash,
                subject=f"{usage.month}/{usage.part}",
                outcome="BOOKED",
                booked_fen=usage.used_fen,
                replied_at_ms=to_ms(now),
            )
            await conn.execute(
                _INSERT_USAGE,
                "in",
                peer,
                usage.month,
                usage.part,
                usage.parts,
                encode_body(usage),
                msg.body_hash,
                usage.used_fen,
                msg.envelope,
                encode_body(answer),
                usage.used_fen,
                now,
                now,
            )
    except asyncpg.CheckViolationError as exc:  # a SQL invariant: refuse the whole USAGE
        raise ValidationFailed(f"usage refused: {exc}") from None
    log.info("usage_booked", peer=peer, month=usage.month, part=usage.part, fen=usage.used_fen)
    return answer


async def _check_lines(conn: asyncpg.Connection, peer: str, usage: Usage) -> None:
    ids = [line.transfer_id for line in usage.lines]
    grants = {r["transfer_id"]: r for r in await conn.fetch(_GRANTS_OUT, ids)}
    before = {
        r["transfer_id"]: r["used_fen"] for r in await conn.fetch(_PAYABLE_SO_FAR, ids, usage.month)
    }
    for line in usage.lines:
        g = grants.get(line.transfer_id)
        if g is None or g["to_node"] != peer or g["state"] != "COMMITTED":
            raise ValidationFailed(f"usage of {line.transfer_id}: no committed grant to {peer}")
        if g["amount_fen"] != line.granted_fen:
            raise ValidationFailed(
                f"usage of {line.transfer_id}: granted {line.granted_fen} fen, "
                f"but the grant is {g['amount_fen']} fen"
            )
        if before.get(line.transfer_id, 0) + line.used_fen != line.used_total_fen:
            raise ValidationFailed(
                f"usage of {line.transfer_id}: {line.used_fen} fen in {usage.month} does not "
                f"continue the {before.get(line.transfer_id, 0)} fen cleared before "
                f"(total {line.used_total_fen})"
            )


@handles(MessageType.RECON_REPLY)
async def on_recon_reply(ctx: WalletContext, msg: Incoming) -> Body | None:
    """The peer's signed answer to our STATEMENT or USAGE (only ever a reply)."""
    reply = msg.body
    assert isinstance(reply, ReconReply)
    if not msg.is_reply:
        return None
    if reply.ref_typ is MessageType.STATEMENT:
        log.info(
            "statement_answered",
            peer=msg.from_node,
            window_id=reply.subject,
            outcome=reply.outcome,
            buckets=len(reply.buckets),
        )
        return None
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            _USAGE_REPLIED, msg.from_node, reply.ref_hash, encode_body(reply), reply.booked_fen, now
        )
    if row is not None and row["used_fen"] != reply.booked_fen:
        log.error(
            "plt_alert",
            kind="usage_booked_differs",
            peer=msg.from_node,
            month=row["month"],
            sent_fen=row["used_fen"],
            booked_fen=reply.booked_fen,
        )
    return None


async def _usage_refused(ctx: WalletContext, msg: Incoming, error: ErrorReply) -> None:
    """The giver's node refused our USAGE: a dispute for the operators (`plt_alert`). 3106
    (another body under the same month and part) is final; anything else is retried, so a
    repaired row at the peer lets it through."""
    log.error(
        "plt_alert",
        kind="usage_refused",
        peer=msg.from_node,
        code=int(error.error.code),
        text=error.error.text,
        differs=list(error.differs),
    )
    if not error.differs:
        return
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(_USAGE_OUT_OF_HASH, msg.from_node, error.ref_hash)
        if row is not None:
            await outbox.stop(
                conn,
                to_node=msg.from_node,
                typ=MessageType.USAGE,
                key=f"{row['month']}/{row['part']}",
                now=ctx.clock.now(),
            )


transport.on_error_reply(MessageType.USAGE)(_usage_refused)


# --- the report --------------------------------------------------------------------------------


class PairLine(msgspec.Struct, frozen=True):
    """The clearing of one pair of provinces for a month, the same at both nodes."""

    month: str
    node_a: str  # the lower node id of the pair
    node_b: str
    a_owes_b_fen: int  # what B's receivers spent of A's givers' quotas
    b_owes_a_fen: int
    net_payer: str | None  # None when the pair is even
    net_payee: str | None
    net_fen: int
    complete: bool  # both USAGE directions exchanged and booked as sent
    status: str


class ClearingReport(msgspec.Struct, frozen=True):
    """A month's clearing as this node sees it."""

    month: str
    node: str
    cleared: bool
    pairs: tuple[PairLine, ...]


async def clearing_report(ctx: WalletContext, month: str) -> ClearingReport:
    """Net per pair of provinces for `month`, from this node's own books."""
    month_bounds(month)
    me = ctx.node_id
    async with ctx.pool.acquire() as conn:
        cleared = await conn.fetchval(_RUN_EXISTS, month) is not None
        totals = {r["peer"]: r for r in await conn.fetch(_PAIR_TOTALS, month)}
        parts = await conn.fetch(_USAGE_PARTS, month)
    peers = set(totals) | {r["peer"] for r in parts}
    pairs = []
    for peer in sorted(peers):
        t = totals.get(peer)
        we_owe = t["we_owe_fen"] if t else 0
        owed = t["owed_to_us_fen"] if t else 0
        sent = [r for r in parts if r["peer"] == peer and r["direction"] == "out"]
        got = [r for r in parts if r["peer"] == peer and r["direction"] == "in"]
        problems = []
        if not cleared:
            problems.append(f"{me} has not cleared {month}")
        elif not sent or any(r["booked_fen"] is None for r in sent):
            problems.append(f"{peer} has not booked {me}'s usage yet")
        elif any(r["booked_fen"] != r["used_fen"] for r in sent):
            problems.append(f"{peer} booked another sum than {me} sent")
        if not got or len(got) != got[0]["parts"]:
            problems.append(f"{me} has not received all of {peer}'s usage")
        a, b = sorted((me, peer))
        a_owes_b, b_owes_a = (we_owe, owed) if a == me else (owed, we_owe)
        net = a_owes_b - b_owes_a
        payer, payee = (a, b) if net > 0 else (b, a) if net < 0 else (None, None)
        pairs.append(
            PairLine(
                month=month,
                node_a=a,
                node_b=b,
                a_owes_b_fen=a_owes_b,
                b_owes_a_fen=b_owes_a,
                net_payer=payer,
                net_payee=payee,
                net_fen=abs(net),
                complete=not problems,
                status="; ".join(problems) or "agreed",
            )
        )
    return ClearingReport(month=month, node=me, cleared=cleared, pairs=tuple(pairs))


async def settle_month(ctx: WalletContext, month: str, *, actor: str = "operator-cli") -> int:
    """Mark the month's windows SETTLED once every pair is complete (the operator confirms
    the net payments were made); returns the windows marked."""
    report = await clearing_report(ctx, month)
    if not report.cleared or not all(p.complete for p in report.pairs):
        pending = "; ".join(p.status for p in report.pairs if not p.complete)
        raise WalletError(
            ErrorCode.STATE_CONFLICT,
            f"month {month} cannot be settled yet: {pending or 'not cleared'}",
            reason="clearing_incomplete",
        )
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        settled = int((await conn.execute(_SETTLE, month)).split()[-1])
        await audit.record(
            conn,
            at=now,
            actor=actor,
            action="clearing.settle",
            subject=month,
            request_id=None,
            windows=settled,
            net_fen={f"{p.node_a}/{p.node_b}": p.net_fen for p in report.pairs},
        )
    return settled
