"""Reconciliation windows and signed STATEMENTs between two province nodes (PROTOCOL b.10).

A window is one hour (Asia/Shanghai) of decisions, stamped by the giver's node into each
DECISION; both sides read it from the stored DECISION bytes (`decision_window_id`, a
generated column). One `recon_window` row per (peer, window) covers every transfer between
this node and the peer decided in that window, in both directions.

    OPEN ──(hour over + delay, own decisions acked, nothing in doubt)──> CLOSED
         our STATEMENT built from our rows, stored, queued to the peer (one transaction)
    CLOSED ──(peer's STATEMENT equal to ours)──────────────────────────> RECONCILED
    CLOSED ──(drill-down: no transfer differs, current hashes equal)──> RECONCILED
    RECONCILED ──> INCLUDED_IN_CLEARING ──> SETTLED                     (wallet.plt.clearing)

A mismatch is drilled down (`reconcile`): the buckets whose hashes differ are asked for
with STATEMENT_DETAIL_REQ, and the answer is compared transfer by transfer with our rows;
each difference is stored in `recon_difference` and reported by transfer id.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Literal
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import msgspec
import structlog

from protocol.clock import DEFAULT_TZ
from protocol.clock import window_id as window_of
from protocol.errors import ModifiedRequest, ProtocolError, ValidationFailed
from protocol.messages import (
    Body,
    Decision,
    ErrorReply,
    MessageType,
    Outcome,
    Prepare,
    ReconReply,
    Statement,
    StatementDetail,
    StatementDetailReq,
    StatementEntry,
    StatementLine,
    body_hash,
    build_statement,
    decode_body,
    differing_buckets,
    differing_fields,
    encode_body,
    hash_body,
    statement_bucket,
    statement_line_hash,
)
from wallet.context import WalletContext
from wallet.plt import outbox, transport
from wallet.plt.dispatch import Incoming, handles
from wallet.plt.grants_base import to_ms
from wallet.plt.transport import EPOCH

log = structlog.get_logger("wallet.plt.statements")

CLOSE_DELAY = dt.timedelta(hours=1)  # a statement an hour after the window ends [cfg]
# The worker looks for new windows among decisions of the last few days; `clearing run`
# looks over the whole month (a worker that was down longer is caught up there).
DISCOVER_LOOKBACK = dt.timedelta(days=3)
CLOSE_BATCH = 256  # windows closed per worker pass
CLOSE_PER_PEER = 48  # of which at most this many with one peer
DRILL_BATCH = 16  # mismatched windows drilled down per worker pass
DRILL_INTERVAL = dt.timedelta(minutes=10)  # between two drill-downs of one window
STATEMENTS_INTERVAL_S = 60.0
IN_DOUBT_STATES = ("PENDING_ACCEPT", "ACCEPTED", "DECLINED_PENDING")

# Statements and USAGE are answered with a typed RECON_REPLY: then the outbox row is done.
transport.DONE_ON_REPLY.update({MessageType.STATEMENT, MessageType.USAGE})

_DISCOVER = """
INSERT INTO recon_window (peer, window_id, opened_at)
SELECT to_node, decision_window_id, $1::timestamptz FROM grant_out
WHERE decision_window_id IS NOT NULL AND decided_at >= $2
UNION
SELECT from_node, decision_window_id, $1::timestamptz FROM grant_in
WHERE decision_window_id IS NOT NULL AND decided_at >= $2
ON CONFLICT (peer, window_id) DO NOTHING
"""
# Oldest first, at most $3 per peer: a peer whose windows wait (doubts, missing ACKs) does
# not hold up the others.
_OPEN_WINDOWS = """
SELECT peer, window_id FROM (
    SELECT peer, window_id, row_number() OVER (PARTITION BY peer ORDER BY window_id) AS n
    FROM recon_window WHERE state = 'OPEN' AND window_id < $2
) w
WHERE n <= $3
ORDER BY window_id, peer LIMIT $1
"""
_WINDOW = """
SELECT peer, window_id, state, our_statement, our_hash, peer_statement, peer_hash,
       differing_buckets, resolution, clearing_month, closed_at, reconciled_at
FROM recon_window WHERE peer = $1 AND window_id = $2
"""
_WINDOW_FOR_UPDATE = _WINDOW + " FOR UPDATE"
_ENSURE_WINDOW = """
INSERT INTO recon_window (peer, window_id, opened_at) VALUES ($1, $2, $3)
ON CONFLICT (peer, window_id) DO NOTHING
"""
# Our decided transfers with a peer in a window, both directions; aborts count 0 fen.
_ENTRIES = """
SELECT transfer_id, $3::text AS giver,
       CASE WHEN state = 'COMMITTED' THEN amount_fen ELSE 0 END AS amount_fen,
       CASE WHEN state = 'COMMITTED' THEN 'COMMIT' ELSE 'ABORT' END AS outcome
FROM grant_out WHERE to_node = $1 AND decision_window_id = $2
UNION ALL
SELECT transfer_id, from_node AS giver,
       CASE WHEN state = 'COMMITTED' THEN amount_fen ELSE 0 END AS amount_fen,
       CASE WHEN state = 'COMMITTED' THEN 'COMMIT' ELSE 'ABORT' END AS outcome
FROM grant_in WHERE from_node = $1 AND decision_window_id = $2
ORDER BY transfer_id
"""
_UNACKED = """
SELECT count(*) FROM grant_out WHERE to_node = $1 AND decision_window_id = $2 AND NOT acked
"""
_IN_DOUBT = """
SELECT count(*) FROM grant_in
WHERE from_node = $1 AND state = ANY($2::text[]) AND received_at < $3
"""
_CLOSE = """
UPDATE recon_window SET state = 'CLOSED', our_statement = $3, our_hash = $4, closed_at = $5
WHERE peer = $1 AND window_id = $2 AND state = 'OPEN'
"""
_STORE_PEER = """
UPDATE recon_window SET peer_statement = $3, peer_hash = $4, peer_envelope = $5
WHERE peer = $1 AND window_id = $2 AND peer_statement IS NULL
"""
_RECONCILED = """
UPDATE recon_window
SET state = 'RECONCILED', resolution = $3, reconciled_at = $4, differing_buckets = '{}'
WHERE peer = $1 AND window_id = $2 AND state = 'CLOSED'
"""
_MISMATCH = """
UPDATE recon_window SET differing_buckets = $3 WHERE peer = $1 AND window_id = $2
"""
_TO_DRILL = """
SELECT peer, window_id FROM recon_window
WHERE state = 'CLOSED' AND peer_statement IS NOT NULL AND (drilled_at IS NULL OR drilled_at < $2)
ORDER BY window_id, peer LIMIT $1
"""
_DRILLED = "UPDATE recon_window SET drilled_at = $3 WHERE peer = $1 AND window_id = $2"
_CLEAR_DIFFERENCES = "DELETE FROM recon_difference WHERE peer = $1 AND window_id = $2"
_INSERT_DIFFERENCE = """
INSERT INTO recon_difference
    (peer, window_id, transfer_id, giver, ours, theirs, evidence, found_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""
_DIFFERENCES = """
SELECT transfer_id, giver, ours, theirs, evidence FROM recon_difference
WHERE peer = $1 AND window_id = $2 ORDER BY transfer_id
"""
_EVIDENCE_OUT = """
SELECT amount_fen, state, prepare, prepare_hash, decision FROM grant_out WHERE transfer_id = $1
"""
_EVIDENCE_IN = """
SELECT amount_fen, state, prepare, prepare_hash, decision FROM grant_in
WHERE from_node = $1 AND transfer_id = $2
"""
_LOGGED = """
SELECT 1 FROM plt_message WHERE dedup_key = $1 AND typ = $2 AND body_hash = $3 LIMIT 1
"""
_WINDOW_OF_HASH = "SELECT window_id FROM recon_window WHERE peer = $1 AND our_hash = $2"
_MISMATCHED = """
SELECT window_id FROM recon_window
WHERE peer = $1 AND state = 'CLOSED' AND peer_statement IS NOT NULL
ORDER BY window_id
"""
_LIST = """
SELECT peer, window_id, state, our_statement, peer_statement, differing_buckets, resolution,
       clearing_month
FROM recon_window
WHERE ($1::text IS NULL OR peer = $1) AND ($2::text IS NULL OR window_id LIKE $2 || '%')
ORDER BY window_id, peer
LIMIT $3
"""


class UnknownWindow(ValidationFailed):
    """A window this node cannot state: not an hour of the calendar, or not over yet."""


# --- windows ---------------------------------------------------------------------------------


def window_bounds(window_id: str, tz: str = DEFAULT_TZ) -> tuple[dt.datetime, dt.datetime]:
    """Start and end (exclusive) of an hourly window, as aware datetimes; UnknownWindow if
    `window_id` names no hour of the calendar."""
    try:
        start = dt.datetime.strptime(window_id, "%Y-%m-%dT%H").replace(tzinfo=ZoneInfo(tz))
    except ValueError:
        raise UnknownWindow(f"unknown window {window_id!r}: not an hour of the calendar") from None
    return start, start + dt.timedelta(hours=1)


def require_closed(window_id: str, now: dt.datetime, node_id: str) -> None:
    """UnknownWindow unless the window's hour is over at `now` (this node's clock)."""
    _, end = window_bounds(window_id)
    if end > now:
        raise UnknownWindow(
            f"unknown window {window_id}: still open at {node_id} (it ends {end.isoformat()})"
        )


def _entry(row: asyncpg.Record) -> StatementEntry:
    return StatementEntry(row["transfer_id"], row["amount_fen"], "CNY", Outcome(row["outcome"]))


def _line(row: asyncpg.Record) -> StatementLine:
    return StatementLine(
        transfer_id=row["transfer_id"],
        giver=row["giver"],
        amount_fen=row["amount_fen"],
        outcome=Outcome(row["outcome"]),
    )


async def current_lines(
    conn: asyncpg.Connection, node_id: str, peer: str, window_id: str
) -> list[StatementLine]:
    """Our decided transfers with `peer` in the window, now, sorted by transfer id."""
    return [_line(r) for r in await conn.fetch(_ENTRIES, peer, window_id, node_id)]


async def discover_windows(
    conn: asyncpg.Connection, now: dt.datetime, since: dt.datetime | None = None
) -> None:
    """Open a window row for every (peer, window) with a decision since `since` (default:
    the last `DISCOVER_LOOKBACK`)."""
    await conn.execute(_DISCOVER, now, since if since is not None else now - DISCOVER_LOOKBACK)


async def _ready(conn: asyncpg.Connection, peer: str, window_id: str, now: dt.datetime) -> bool:
    """Over (plus the delay), every decision we stamped in it acked, nothing from the peer
    still in doubt that was received before its end (its decision may carry this window)."""
    _, end = window_bounds(window_id)
    if now < end + CLOSE_DELAY:
        return False
    if await conn.fetchval(_UNACKED, peer, window_id):
        return False
    return not await conn.fetchval(_IN_DOUBT, peer, list(IN_DOUBT_STATES), end)


Comparison = Literal["MATCH", "MISMATCH", "PENDING"]


async def _compare(
    conn: asyncpg.Connection, peer: str, window_id: str, now: dt.datetime
) -> Comparison:
    """Compare the two stored statements; RECONCILED when equal. MATCH/MISMATCH/PENDING."""
    row = await conn.fetchrow(_WINDOW, peer, window_id)
    if row["our_statement"] is None or row["peer_statement"] is None:
        return "PENDING"
    if row["state"] != "CLOSED":
        return "MATCH" if row["resolution"] is not None else "MISMATCH"
    if row["our_hash"] == row["peer_hash"]:
        await conn.execute(_RECONCILED, peer, window_id, "statements_equal", now)
        return "MATCH"
    ours = decode_body(MessageType.STATEMENT, bytes(row["our_statement"]))
    theirs = decode_body(MessageType.STATEMENT, bytes(row["peer_statement"]))
    assert isinstance(ours, Statement) and isinstance(theirs, Statement)
    await conn.execute(_MISMATCH, peer, window_id, differing_buckets(ours, theirs))
    return "MISMATCH"


async def close_window(ctx: WalletContext, peer: str, window_id: str) -> bool:
    """Close one ready window: build, store and queue our STATEMENT (one transaction)."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_WINDOW_FOR_UPDATE, peer, window_id)
        if row is None or row["state"] != "OPEN" or not await _ready(conn, peer, window_id, now):
            return False
        rows = await conn.fetch(_ENTRIES, peer, window_id, ctx.node_id)
        statement = build_statement(window_id, (_entry(r) for r in rows))
        body = encode_body(statement)
        await conn.execute(_CLOSE, peer, window_id, body, hash_body(statement), now)
        await outbox.enqueue(
            conn, to_node=peer, typ=MessageType.STATEMENT, key=window_id, body=body, now=now
        )
        outcome = await _compare(conn, peer, window_id, now)
    log.info(
        "statement_sent", peer=peer, window_id=window_id, count=statement.count, outcome=outcome
    )
    return True


async def run_once(ctx: WalletContext, *, full: bool = False) -> int:
    """The statements worker: open windows for new decisions (of the last few days, or of
    all time when `full`), close the ready ones; returns how many were closed."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        await discover_windows(conn, now, EPOCH if full else None)
        # Windows whose hour ended at least CLOSE_DELAY ago (ids sort like their hours).
        cutoff = window_of(to_ms(now - CLOSE_DELAY))
        candidates = await conn.fetch(_OPEN_WINDOWS, CLOSE_BATCH, cutoff, CLOSE_PER_PEER)
    closed = 0
    for row in candidates:
        closed += await close_window(ctx, row["peer"], row["window_id"])
    await drill_down_once(ctx)
    return closed


async def drill_down_once(ctx: WalletContext) -> int:
    """Drill down the windows whose statements differ (each at most every DRILL_INTERVAL):
    a stale statement heals itself (RECONCILED, rows agree); a real difference is stored and
    alerted. A peer that cannot be reached is tried again next time."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        due = await conn.fetch(_TO_DRILL, DRILL_BATCH, now - DRILL_INTERVAL)
    done = 0
    for row in due:
        try:
            report = await reconcile_window(ctx, row["peer"], row["window_id"])
            done += report.problem is None
        except Exception as exc:  # the peer is down or refuses: keep the others going
            log.warning(
                "drill_down_failed", peer=row["peer"], window_id=row["window_id"], error=repr(exc)
            )
        async with ctx.pool.acquire() as conn:
            await conn.execute(_DRILLED, row["peer"], row["window_id"], now)
    return done


# --- messages --------------------------------------------------------------------------------


@handles(MessageType.STATEMENT)
async def on_statement(ctx: WalletContext, msg: Incoming) -> Body | None:
    """A peer's signed STATEMENT: store it once (evidence), compare with ours, answer.

    The same statement again gets the same kind of answer and changes nothing; another body
    for a window already stated is 3106 with `differs`; a window that is not over here (or
    no hour at all) is refused as unknown, and nothing is stored.
    """
    statement = msg.body
    assert isinstance(statement, Statement)
    now = ctx.clock.now()
    window_id = statement.window_id
    require_closed(window_id, now, ctx.node_id)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(_ENSURE_WINDOW, msg.from_node, window_id, now)
        row = await conn.fetchrow(_WINDOW_FOR_UPDATE, msg.from_node, window_id)
        if row["peer_hash"] is not None and row["peer_hash"] != msg.body_hash:
            stored = decode_body(MessageType.STATEMENT, bytes(row["peer_statement"]))
            raise ModifiedRequest(differing_fields(stored, statement))
        if row["peer_hash"] is None:
            body = encode_body(statement)
            await conn.execute(
                _STORE_PEER, msg.from_node, window_id, body, msg.body_hash, msg.envelope
            )
        outcome = await _compare(conn, msg.from_node, window_id, now)
        buckets = (await conn.fetchrow(_WINDOW, msg.from_node, window_id))["differing_buckets"]
    log.info("statement_received", peer=msg.from_node, window_id=window_id, outcome=outcome)
    return ReconReply(
        ref_typ=MessageType.STATEMENT,
        ref_hash=msg.body_hash,
        subject=window_id,
        outcome=outcome,
        buckets=tuple(buckets) if outcome == "MISMATCH" else (),
        replied_at_ms=to_ms(now),
    )


@handles(MessageType.STATEMENT_DETAIL_REQ)
async def on_detail_request(ctx: WalletContext, msg: Incoming) -> Body | None:
    """Drill-down from a peer: our current lines of a closed window in the asked buckets."""
    request = msg.body
    assert isinstance(request, StatementDetailReq)
    require_closed(request.window_id, ctx.clock.now(), ctx.node_id)
    async with ctx.pool.acquire() as conn:
        lines = await current_lines(conn, ctx.node_id, msg.from_node, request.window_id)
    wanted = set(request.buckets)
    return StatementDetail(
        window_id=request.window_id,
        buckets=request.buckets,
        lines=tuple(line for line in lines if statement_bucket(line.transfer_id) in wanted),
        ids_hash=statement_line_hash(lines),
    )


async def _statement_refused(ctx: WalletContext, msg: Incoming, error: ErrorReply) -> None:
    """A peer refused our STATEMENT: 3106 is final (stop and say so); others are retried."""
    log.warning(
        "statement_refused",
        peer=msg.from_node,
        code=int(error.error.code),
        text=error.error.text,
        differs=list(error.differs),
    )
    if not error.differs:
        return
    async with ctx.pool.acquire() as conn:
        window_id = await conn.fetchval(_WINDOW_OF_HASH, msg.from_node, error.ref_hash)
        if window_id is not None:
            await outbox.stop(
                conn,
                to_node=msg.from_node,
                typ=MessageType.STATEMENT,
                key=window_id,
                now=ctx.clock.now(),
            )


# --- drill-down ------------------------------------------------------------------------------


class Difference(msgspec.Struct, frozen=True):
    """One transfer the two sides book differently in a window, and what our own evidence
    says about our row."""

    transfer_id: str
    giver: str
    ours: str
    theirs: str
    evidence: str = ""


class WindowReport(msgspec.Struct, frozen=True):
    """What a reconciliation found for one window."""

    peer: str
    window_id: str
    state: str
    buckets: tuple[int, ...]
    differences: tuple[Difference, ...]
    problem: str | None = None


def _describe(line: StatementLine | None) -> str:
    return "missing" if line is None else f"{line.outcome} {line.amount_fen}"


def compare_lines(
    ours: Sequence[StatementLine], theirs: Sequence[StatementLine]
) -> list[Difference]:
    """Transfer-by-transfer differences between two sides' lines (sorted by id)."""
    mine = {line.transfer_id: line for line in ours}
    other = {line.transfer_id: line for line in theirs}
    out = []
    for tid in sorted(mine.keys() | other.keys()):
        a, b = mine.get(tid), other.get(tid)
        if a != b:
            giver = a.giver if a is not None else other[tid].giver
            out.append(Difference(tid, giver, _describe(a), _describe(b)))
    return out


async def our_evidence(conn: asyncpg.Connection, node_id: str, peer: str, diff: Difference) -> str:
    """Check our row of a differing transfer against the PREPARE and DECISION we hold: does
    the row say what the signed messages say? (The repair path, b.9.5, starts here.)"""
    if diff.giver == node_id:
        row = await conn.fetchrow(_EVIDENCE_OUT, diff.transfer_id)
    else:
        row = await conn.fetchrow(_EVIDENCE_IN, peer, diff.transfer_id)
    if row is None:
        return "no row here"
    if row["prepare"] is None:
        return "an ABORT tombstone here: no PREPARE ever arrived"
    raw = bytes(row["prepare"])
    found = []
    if body_hash(raw) != row["prepare_hash"]:
        found.append("the stored PREPARE does not match its hash")
    elif await conn.fetchval(_LOGGED, diff.transfer_id, "PREPARE", row["prepare_hash"]) is None:
        found.append("the PREPARE is not in the message log")
    prepare = decode_body(MessageType.PREPARE, raw)
    assert isinstance(prepare, Prepare)
    if prepare.amount_fen != row["amount_fen"]:
        found.append(f"our row says {row['amount_fen']}, the PREPARE {prepare.amount_fen}")
    if row["decision"] is not None:
        decision = decode_body(MessageType.DECISION, bytes(row["decision"]))
        assert isinstance(decision, Decision)
        committed = row["state"] == "COMMITTED"
        if committed != (decision.outcome is Outcome.COMMIT):
            found.append(f"our row says {row['state']}, the DECISION {decision.outcome}")
    return "; ".join(found) or "our row agrees with the PREPARE and DECISION we hold"


async def reconcile_window(ctx: WalletContext, peer: str, window_id: str) -> WindowReport:
    """Compare one window with the peer; on a mismatch drill down by bucket, store and
    report the differing transfers; RECONCILED when the current rows agree after all."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(_WINDOW, peer, window_id)
    if row is None:
        window_bounds(window_id)
        raise UnknownWindow(f"unknown window {window_id}: nothing decided with {peer} in it")
    if row["state"] == "OPEN" or row["peer_statement"] is None:
        problem = "still open here" if row["state"] == "OPEN" else f"no statement from {peer} yet"
        return WindowReport(peer, window_id, row["state"], (), (), problem)
    if row["state"] != "CLOSED":
        async with ctx.pool.acquire() as conn:
            found = await conn.fetch(_DIFFERENCES, peer, window_id)
        return WindowReport(
            peer, window_id, row["state"], (), tuple(Difference(**dict(r)) for r in found)
        )
    async with ctx.pool.acquire() as conn, conn.transaction():
        await _compare(conn, peer, window_id, now)
        row = await conn.fetchrow(_WINDOW, peer, window_id)
    if row["state"] != "CLOSED":
        return WindowReport(peer, window_id, row["state"], (), ())
    buckets = tuple(row["differing_buckets"]) or tuple(range(256))
    try:
        reply = await transport.call(
            ctx, peer, StatementDetailReq(window_id=window_id, buckets=buckets)
        )
    except (httpx.HTTPError, ProtocolError, RuntimeError) as exc:
        problem = f"{peer} could not be asked: {exc!r}"[:300]
        return WindowReport(peer, window_id, "CLOSED", buckets, (), problem)
    if isinstance(reply.body, ErrorReply):
        problem = f"{peer} refused: {int(reply.body.error.code)} {reply.body.error.text}"
        return WindowReport(peer, window_id, "CLOSED", buckets, (), problem)
    detail = reply.body
    if not isinstance(detail, StatementDetail) or detail.window_id != window_id:
        return WindowReport(peer, window_id, "CLOSED", buckets, (), f"{peer}: unexpected reply")
    wanted = set(buckets)
    async with ctx.pool.acquire() as conn, conn.transaction():
        # One drill-down at a time per window (replicas, the worker and an operator).
        locked = await conn.fetchrow(_WINDOW_FOR_UPDATE, peer, window_id)
        if locked["state"] != "CLOSED":
            return WindowReport(peer, window_id, locked["state"], buckets, ())
        mine = await current_lines(conn, ctx.node_id, peer, window_id)
        ours = [line for line in mine if statement_bucket(line.transfer_id) in wanted]
        differences = [
            msgspec.structs.replace(d, evidence=await our_evidence(conn, ctx.node_id, peer, d))
            for d in compare_lines(ours, detail.lines)
        ]
        await conn.execute(_DRILLED, peer, window_id, now)
        await conn.execute(_CLEAR_DIFFERENCES, peer, window_id)
        await conn.executemany(
            _INSERT_DIFFERENCE,
            [
                (peer, window_id, d.transfer_id, d.giver, d.ours, d.theirs, d.evidence, now)
                for d in differences
            ],
        )
        state = "CLOSED"
        if not differences and detail.ids_hash == statement_line_hash(mine):
            await conn.execute(_RECONCILED, peer, window_id, "rows_agree", now)
            state = "RECONCILED"
    if differences:
        log.error(
            "plt_alert",
            kind="reconciliation_differs",
            peer=peer,
            window_id=window_id,
            transfers=[d.transfer_id for d in differences[:20]],
            differences=len(differences),
        )
    else:
        log.info("window_drilled", peer=peer, window_id=window_id, state=state)
    return WindowReport(peer, window_id, state, buckets, tuple(differences))


async def reconcile(
    ctx: WalletContext,
    peer: str,
    window_id: str | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[WindowReport]:
    """Reconcile one window, or every closed, unreconciled window with `peer`."""
    if window_id is not None:
        return [await reconcile_window(ctx, peer, window_id)]
    async with ctx.pool.acquire() as conn:
        windows = [r["window_id"] for r in await conn.fetch(_MISMATCHED, peer)]
    reports = []
    for i, wid in enumerate(windows):
        reports.append(await reconcile_window(ctx, peer, wid))
        if progress is not None:
            progress(i + 1, len(windows))
    return reports


class WindowView(msgspec.Struct, frozen=True):
    """One window as the console lists it."""

    peer: str
    window_id: str
    state: str
    our_count: int | None
    our_sum_fen: int | None
    peer_count: int | None
    peer_sum_fen: int | None
    differing_buckets: tuple[int, ...]
    resolution: str | None
    clearing_month: str | None


def _totals(raw: bytes | None) -> tuple[int | None, int | None]:
    if raw is None:
        return None, None
    body = decode_body(MessageType.STATEMENT, bytes(raw))
    assert isinstance(body, Statement)
    return body.count, body.sum_by_currency.get("CNY", 0)


async def list_windows(
    ctx: WalletContext, peer: str | None = None, prefix: str | None = None, limit: int = 1_000
) -> list[WindowView]:
    """Windows with their statements' counts and sums (`prefix`: e.g. a month `2026-03`)."""
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(_LIST, peer, prefix, limit)
    out = []
    for r in rows:
        our_count, our_sum = _totals(r["our_statement"])
        peer_count, peer_sum = _totals(r["peer_statement"])
        out.append(
            WindowView(
                r["peer"],
                r["window_id"],
                r["state"],
                our_count,
                our_sum,
                peer_count,
                peer_sum,
                tuple(r["differing_buckets"]),
                r["resolution"],
                r["clearing_month"],
            )
        )
    return out


transport.on_error_reply(MessageType.STATEMENT)(_statement_refused)
