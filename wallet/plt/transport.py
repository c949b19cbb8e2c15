"""The sender: delivers `plt_outbox` rows to peer nodes and hands their signed replies back.

One pass (`run_once`):

1. close rows past their `give_up_at` (PREPARE stops at decide_by; most rows never give up);
2. claim due rows with a lease (`UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`),
   so several replicas of a node never send the same row at the same moment, and a sender
   that dies mid-send leaves rows that come due again when the lease runs out;
3. group them per peer, in creation order, at most 256 envelopes (and a byte budget) per
   POST; seal each body with the key current *now* (a retry after a rotation is signed with
   the new key, its body hash unchanged);
4. POST the batch, open every reply (refresh-once on an unknown key), log both envelopes in
   `plt_message`, and `dispatch(..., is_reply=True)` each reply to its feature (a large
   batch in one transaction per 32+ replies, `apply_in_one_transaction`); two POSTs to one
   peer may be in flight, the rows about one thing always in the same one;
5. give every row its next attempt: 0.2 s, 0.5 s, 1 s, 2 s ... capped at 60 s, with jitter.

Before claiming, a pass looks (at most once a second) for peers whose rows wait because the
peer was unreachable, asks each such peer for its key set, and makes every waiting row to a
peer that answers due at once: after an outage, grants in flight do not wait out a backoff
that grew while the peer was down (up to a minute), only this probe interval.

The sender is woken by every committed outbox row (wallet.plt.wakeup), so a message leaves
as soon as the transaction that caused it commits; a DECISION committed while answering an
ACCEPT goes out at once, and its ACK (always a reply) comes back with it.

A row is finished only by its feature calling `outbox.stop` (StopRetries), when the answer it
waited for has arrived, or by step 1. A peer that is down, slow, or answers 5xx only delays
delivery: nothing is lost, and the same body is sent again. ERROR replies do not go through
`dispatch` (one handler per typ cannot serve every feature): the transport records them on
the row and calls the handler registered with `on_error_reply` for the original typ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import weakref
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import asyncpg
import httpx
import msgspec
import structlog

from protocol.clock import retry_delay_ms
from protocol.envelope import Envelope, Wire, encode_envelope
from protocol.errors import MalformedMessage, ProtocolError, UnknownPeer
from protocol.messages import (
    BATCH_MAX,
    DECODE_ERRORS,
    Body,
    ErrorReply,
    MessageType,
    body_hash,
    typ_of,
)
from wallet.context import WalletContext
from wallet.plt.dispatch import Incoming, NoHandler, dispatch, many_handler
from wallet.plt.node import KEYSET_PATH, MESSAGES_PATH, PltNode

log = structlog.get_logger("wallet.plt.transport")

CLAIM_ROWS_MAX = 1024  # rows claimed per round
ROUNDS_MAX = 16  # rounds per run_once: bounded even if features keep enqueueing
LEASE_MS = 30_000  # longer than a whole POST can take (connect + write + read timeouts)
POST_BYTES_MAX = 2 * 1024 * 1024  # below the receiving node's 4 MiB body limit
PEERS_IN_PARALLEL = 8
CHUNKS_IN_FLIGHT = 2  # POSTs to one peer at once (the 06:00 herd is thousands of DECISIONs)
# Transactions applying one batch side by side (`apply_in_one_transaction`, and messages
# applied alone), in and out; small against the pool so that app requests still get connections.
APPLY_IN_PARALLEL = 4
# A batch of this many messages or more is applied in one transaction per this many (at most
# BATCH_TRANSACTIONS_MAX side by side: with CHUNKS_IN_FLIGHT POSTs, APPLY_IN_PARALLEL
# connections in all); a smaller one message by message (`apply_in_one_transaction`).
MESSAGES_PER_TRANSACTION = 32
BATCH_TRANSACTIONS_MAX = APPLY_IN_PARALLEL // CHUNKS_IN_FLIGHT
SENDER_IDLE_S = 0.1  # the worker's pause when nothing was due (and no commit woke it)
PROBE_INTERVAL_MS = 1_000  # how often peers that were unreachable are asked whether they are back
PROBE_TIMEOUT_S = 2.0
UNREACHABLE = "unreachable"  # in last_error: no HTTP answer at all (connect error, timeout)
KEYSET_REFRESH_S = 600.0  # PROTOCOL b.11: refresh peers' key sets every 10 min
LAST_ERROR_CHARS_MAX = 500
WIRE: Wire = "msgpack"
CONTENT_TYPES: dict[Wire, str] = {"json": "application/json", "msgpack": "application/msgpack"}

ErrorReplyHandler = Callable[[WalletContext, Incoming, ErrorReply], Awaitable[None]]
_ERROR_REPLY_HANDLERS: dict[MessageType, ErrorReplyHandler] = {}
# Requests whose one typed reply is final: the transport closes their outbox row once such a
# reply (not an ERROR) was dispatched without an exception. `Incoming` does not say which row
# a reply answers, so these features could not close the row themselves. Other typs wait for
# their feature's `outbox.stop`.
DONE_ON_REPLY: set[MessageType] = {MessageType.STATUS_REQ, MessageType.RELEASE}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def on_error_reply(*typs: MessageType) -> Callable[[ErrorReplyHandler], ErrorReplyHandler]:
    """Register what to do when a peer answers a message of `typs` with a signed ERROR.

    The handler runs after the error is recorded on the outbox row (which keeps retrying
    unless the handler calls `outbox.stop`). Without one, the error is only logged.
    """

    def register(handler: ErrorReplyHandler) -> ErrorReplyHandler:
        for typ in typs:
            if _ERROR_REPLY_HANDLERS.get(typ, handler) is not handler:
                raise RuntimeError(f"ERROR replies to {typ} already have a handler")
            _ERROR_REPLY_HANDLERS[typ] = handler
        return handler

    return register


# --- the message log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """One envelope for `plt_message`, with its exact wire bytes."""

    direction: str  # 'in' | 'out'
    envelope: Envelope
    wire_bytes: bytes
    dedup_key: str | None


# One statement for a whole batch's envelopes (not one execution per envelope), in order.
_LOG = """
INSERT INTO plt_message
    (direction, from_node, to_node, typ, msg_id, dedup_key, body_hash, envelope, at)
SELECT m.direction, m.from_node, m.to_node, m.typ, m.msg_id, m.dedup_key, m.body_hash,
       m.envelope, $9
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::bytea[]) WITH ORDINALITY
    AS m(direction, from_node, to_node, typ, msg_id, dedup_key, body_hash, envelope, n)
ORDER BY m.n
ON CONFLICT (direction, msg_id) DO NOTHING
"""


def dedup_key_of(body: Body) -> str | None:
    """What a message is about, for `plt_message.dedup_key`: transfer, relation or release id."""
    for name in ("transfer_id", "release_id", "relation_id"):
        value = getattr(body, name, None)
        if isinstance(value, str):
            return value
    return None


async def log_messages(
    executor: asyncpg.Pool | asyncpg.Connection, entries: Sequence[Logged], at: dt.datetime
) -> None:
    """Append envelopes to `plt_message` (a duplicate msg_id in one direction is kept once)."""
    if not entries:
        return
    await executor.execute(
        _LOG,
        [e.direction for e in entries],
        [e.envelope.from_node for e in entries],
        [e.envelope.to_node for e in entries],
        [str(e.envelope.typ) for e in entries],
        [e.envelope.msg_id for e in entries],
        [e.dedup_key for e in entries],
        [body_hash(e.envelope.body) for e in entries],
        [e.wire_bytes for e in entries],
        at,
    )


# --- batches on the wire -----------------------------------------------------------------------

_json_items = msgspec.json.Decoder(list[msgspec.Raw])
_msgpack_items = msgspec.msgpack.Decoder(list[msgspec.Raw])


def split_batch(raw: bytes, wire: Wire) -> list[bytes]:
    """The items of a batch as their exact wire bytes; MalformedMessage for a bad array."""
    try:
        items = _json_items.decode(raw) if wire == "json" else _msgpack_items.decode(raw)
    except DECODE_ERRORS as exc:  # bad UTF-8 and too-deep nesting too
        raise MalformedMessage(f"batch: {exc}") from None
    if len(items) > BATCH_MAX:
        raise MalformedMessage(f"a batch holds at most {BATCH_MAX} envelopes, got {len(items)}")
    return [bytes(item) for item in items]


def join_batch(items: Sequence[bytes], wire: Wire) -> bytes:
    """A batch from item wire bytes (the same bytes `encode_batch` would produce)."""
    if wire == "json":
        return b"[" + b",".join(items) + b"]"
    count = len(items)
    header = bytes([0x90 | count]) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
    return header + b"".join(items)


def wire_of(content_type: str | None) -> Wire | None:
    """`json` or `msgpack` from a Content-Type header; None when it is neither."""
    value = (content_type or "").split(";", 1)[0].strip().lower()
    if value in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        return "msgpack"
    if value == "application/json" or value.endswith("+json"):
        return "json"
    return None


# --- the sender ------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What one `run_once` did."""

    claimed: int = 0
    delivered: int = 0  # a signed reply came back, opened, and was handed to its feature
    failed: int = 0  # no usable reply: rescheduled with backoff
    gave_up: int = 0  # closed because give_up_at passed

    def __bool__(self) -> bool:
        # A worker runs the next pass at once while there was something to send.
        return self.claimed > 0

    def add(self, other: SendReport) -> None:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.failed += other.failed
        self.gave_up += other.gave_up


@dataclass
class _Row:
    id: int
    to_node: str
    typ: str
    dedup_key: str
    body: bytes
    attempts: int
    # Filled in after the attempt.
    error: str | None = None


_GIVE_UP = """
UPDATE plt_outbox SET done_at = $1, last_error = 'gave up: give_up_at passed'
WHERE id IN (
    SELECT id FROM plt_outbox
    WHERE done_at IS NULL AND give_up_at IS NOT NULL AND give_up_at <= $1
    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING id, to_node, typ, dedup_key
"""
# Rows to a frozen peer (peer_link, an equivocating node) wait until an operator lifts it.
_CLAIM = """
UPDATE plt_outbox AS o SET next_attempt_at = $2, attempts = o.attempts + 1
FROM (
    SELECT id FROM plt_outbox
    WHERE done_at IS NULL AND next_attempt_at <= $1
      AND (give_up_at IS NULL OR give_up_at > $1)
      AND NOT EXISTS (SELECT 1 FROM peer_link f WHERE f.node = plt_outbox.to_node)
    ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) AS due
WHERE o.id = due.id
RETURNING o.id, o.to_node, o.typ, o.dedup_key, o.body, o.attempts
"""
# `last_error` always tells the latest attempt; the next attempt is set only on rows still
# open (a feature may have stopped one while its reply was being handled).
_RESCHEDULE = """
UPDATE plt_outbox AS o
SET next_attempt_at = CASE WHEN o.done_at IS NULL THEN u.next_at ELSE o.next_attempt_at END,
    last_error = u.error
FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS u(id, next_at, error)
WHERE o.id = u.id
"""
_DONE = "UPDATE plt_outbox SET done_at = $2, last_error = NULL WHERE id = $1 AND done_at IS NULL"

_rng = random.Random()


def _ms(instant: dt.datetime) -> int:
    # Exact integer arithmetic: no float rounding of the instant.
    return (instant - EPOCH) // dt.timedelta(milliseconds=1)


def require_plt(ctx: WalletContext) -> PltNode:
    """The node's PLT/1 identity; RuntimeError when the node has no keys."""
    if ctx.plt is None:
        raise RuntimeError("this node has no PLT/1 keys (plt-node keys init)")
    return ctx.plt


async def run_once(
    ctx: WalletContext, *, rng: random.Random | None = None, wire: Wire = WIRE
) -> SendReport:
    """Send everything due now, handle the replies, reschedule; return the counts.

    Deterministic enough for tests: with a ManualClock, every row due at the call is tried
    exactly once (a tried row is due again only after its backoff).
    """
    node = require_plt(ctx)
    report = SendReport()
    for _ in range(ROUNDS_MAX):
        now = ctx.clock.now()
        await wake_returned_peers(ctx, node, now)
        async with ctx.pool.acquire() as conn:
            gave_up = await conn.fetch(_GIVE_UP, now, CLAIM_ROWS_MAX)
            rows = [
                _Row(**dict(r))
                for r in await conn.fetch(
                    _CLAIM, now, now + dt.timedelta(milliseconds=LEASE_MS), CLAIM_ROWS_MAX
                )
            ]
        for g in gave_up:
            log.warning("plt_outbox_gave_up", to=g["to_node"], typ=g["typ"], key=g["dedup_key"])
        report.gave_up += len(gave_up)
        if not rows:
            break
        report.add(await _send_rows(ctx, node, rows, now, rng or _rng, wire))
    return report


# Peers with rows waiting (not due yet) because the peer did not answer at all.
_WAITING_PEERS = """
SELECT DISTINCT to_node FROM plt_outbox
WHERE done_at IS NULL AND next_attempt_at > $1 AND last_error LIKE $2
"""
# Due now. A row another replica has claimed this very moment may be sent twice: harmless,
# every handler is idempotent (and only after an outage).
_DUE_NOW = """
UPDATE plt_outbox SET next_attempt_at = $2
WHERE to_node = $1 AND done_at IS NULL AND next_attempt_at > $2 AND last_error LIKE $3
"""
# When each node (context, by id: it is unhashable) last looked for returned peers.
_last_probe_ms: dict[int, int] = {}


async def wake_returned_peers(ctx: WalletContext, node: PltNode, now: dt.datetime) -> int:
    """Make every row waiting for a peer that answers again due now; return how many.

    At most once per PROBE_INTERVAL_MS (on the node's clock): one query over the open rows
    (partial index), and a key set request to each peer that was unreachable.
    """
    now_ms = _ms(now)
    last_ms = _last_probe_ms.get(id(ctx))
    if last_ms is not None and now_ms - last_ms < PROBE_INTERVAL_MS:
        return 0
    if last_ms is None:
        weakref.finalize(ctx, _last_probe_ms.pop, id(ctx), None)
    _last_probe_ms[id(ctx)] = now_ms
    pattern = f"send to %: {UNREACHABLE}: %"
    peers = [r["to_node"] for r in await ctx.pool.fetch(_WAITING_PEERS, now, pattern)]
    woken = 0
    for peer in peers:
        try:
            response = await node.http.get(node.url_of(peer) + KEYSET_PATH, timeout=PROBE_TIMEOUT_S)
        except (httpx.HTTPError, UnknownPeer):
            continue
        if response.status_code != 200:
            continue
        status = await ctx.pool.execute(_DUE_NOW, peer, now, f"send to {peer}: {UNREACHABLE}: %")
        count = int(status.split()[-1])
        woken += count
        log.info("plt_peer_back", peer=peer, rows_due_now=count)
    return woken


async def _send_rows(
    ctx: WalletContext,
    node: PltNode,
    rows: list[_Row],
    now: dt.datetime,
    rng: random.Random,
    wire: Wire,
) -> SendReport:
    by_peer: dict[str, list[_Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.id):
        by_peer[row.to_node].append(row)
    limit = asyncio.Semaphore(PEERS_IN_PARALLEL)

    async def one_peer(peer: str, peer_rows: list[_Row]) -> None:
        async with limit:
            chunks = iter(_chunks(peer_rows))
            # A few POSTs to one peer in flight: each waits mostly for the peer's commit and
            # for our handling of its replies, not for CPU.
            await asyncio.gather(
                *(_send_chunks(ctx, node, peer, chunks, wire) for _ in range(CHUNKS_IN_FLIGHT))
            )

    await asyncio.gather(*(one_peer(p, r) for p, r in by_peer.items()))
    report = SendReport(claimed=len(rows))
    ids, next_at, errors = [], [], []
    for row in rows:
        if row.error is None:
            report.delivered += 1
        else:
            report.failed += 1
        delay_ms = retry_delay_ms(row.attempts - 1, rng.random() * 0.999)
        ids.append(row.id)
        next_at.append(ctx.clock.now() + dt.timedelta(milliseconds=delay_ms))
        errors.append(None if row.error is None else row.error[:LAST_ERROR_CHARS_MAX])
    await ctx.pool.execute(_RESCHEDULE, ids, next_at, errors)
    return report


async def _send_chunks(
    ctx: WalletContext, node: PltNode, peer: str, chunks: Iterator[list[_Row]], wire: Wire
) -> None:
    """Send chunks taken from `chunks` (shared by the POSTs in flight) until none is left."""
    for chunk in chunks:
        await _send_chunk(ctx, node, peer, chunk, wire)


def _chunks(rows: list[_Row]) -> list[list[_Row]]:
    """At most BATCH_MAX rows and about POST_BYTES_MAX of bodies per POST; the rows about one
    thing (dedup_key) in one POST, in id order, since POSTs to a peer overlap."""
    by_key: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        by_key[row.dedup_key].append(row)
    chunks: list[list[_Row]] = []
    current: list[_Row] = []
    size = 0
    for group in by_key.values():
        group_size = sum(len(row.body) + 256 for row in group)  # + envelope overhead
        full = len(current) + len(group) > BATCH_MAX or size + group_size > POST_BYTES_MAX
        if current and full:
            chunks.append(current)
            current, size = [], 0
        current.extend(group)
        size += group_size
    if current:
        chunks.append(current)
    return chunks


async def _send_chunk(
    ctx: WalletContext, node: PltNode, peer: str, rows: list[_Row], wire: Wire
) -> None:
    now_ms = _ms(ctx.clock.now())
    sealed: list[tuple[_Row, Envelope, bytes]] = []
    for row in rows:
        try:
            env = node.seal(MessageType(row.typ), peer, row.body, now_ms)
        except (ValueError, ProtocolError) as exc:  # unknown typ, no usable key
            row.error = f"cannot seal: {exc}"
            continue
        sealed.append((row, env, encode_envelope(env, wire)))
    if not sealed:
        return
    try:
        replies = await _post(node, peer, [item for _, _, item in sealed], wire)
    except httpx.TransportError as exc:  # no answer at all: the probe watches for its return
        for row, _, _ in sealed:
            row.error = f"send to {peer}: {UNREACHABLE}: {exc!r}"
        log.info("plt_send_failed", peer=peer, rows=len(sealed), error=repr(exc))
        return
    except (httpx.HTTPError, UnknownPeer, MalformedMessage, _PeerAnswer) as exc:
        for row, _, _ in sealed:
            row.error = f"send to {peer}: {exc!r}"
        log.info("plt_send_failed", peer=peer, rows=len(sealed), error=repr(exc))
        return
    await _handle_replies(ctx, node, peer, sealed, replies, wire)


class _PeerAnswer(Exception):
    """The peer answered, but not with a reply batch we can use (a 4xx/5xx, a short batch)."""


async def _post(node: PltNode, peer: str, items: list[bytes], wire: Wire) -> list[bytes]:
    response = await node.http.post(
        node.url_of(peer) + MESSAGES_PATH,
        content=join_batch(items, wire),
        headers={"content-type": CONTENT_TYPES[wire], "accept": CONTENT_TYPES[wire]},
    )
    if response.status_code != 200:
        raise _PeerAnswer(f"HTTP {response.status_code}: {response.text[:200]}")
    reply_wire = wire_of(response.headers.get("content-type")) or wire
    replies = split_batch(response.content, reply_wire)
    if len(replies) != len(items):
        raise _PeerAnswer(f"{len(replies)} replies to {len(items)} envelopes")
    return replies


async def _handle_replies(
    ctx: WalletContext,
    node: PltNode,
    peer: str,
    sealed: list[tuple[_Row, Envelope, bytes]],
    replies: list[bytes],
    wire: Wire,
) -> None:
    now = ctx.clock.now()
    logged: list[Logged] = []
    handled: list[tuple[_Row, Incoming]] = []
    for (row, env, item), raw_reply in zip(sealed, replies, strict=True):
        logged.append(Logged("out", env, item, row.dedup_key))
        try:
            opened = await node.open(raw_reply, _ms(now), wire=wire)
        except ProtocolError as exc:
            row.error = f"reply from {peer} refused: {exc.code} {exc.message}"
            log.warning("plt_reply_refused", peer=peer, typ=row.typ, error=exc.message)
            continue
        reply_env = opened.envelope
        if reply_env.from_node != peer:
            row.error = f"reply signed by {reply_env.from_node}, sent to {peer}"
            log.warning("plt_reply_from_other_node", peer=peer, signer=reply_env.from_node)
            continue
        logged.append(Logged("in", reply_env, raw_reply, dedup_key_of(opened.body)))
        incoming = Incoming(
            from_node=peer,
            typ=reply_env.typ,
            body=opened.body,
            body_hash=body_hash(reply_env.body),
            envelope=raw_reply,
            msg_id=reply_env.msg_id,
            now_ms=_ms(now),
            is_reply=True,
        )
        handled.append((row, incoming))
    # Evidence first: the envelopes are on record before any feature acts on them.
    await log_messages(ctx.pool, logged, now)
    await apply_in_one_transaction(
        ctx, [_reply_step(ctx, row, incoming) for row, incoming in handled]
    )


async def in_order_per_key(
    steps: Sequence[tuple[str | None, Callable[[], Awaitable[None]]]],
    parallel: int = APPLY_IN_PARALLEL,
) -> None:
    """Run `steps` (each its own transaction), at most `parallel` at once, those with the same
    key (transfer, relation or release id; None is one key) one after another in their order.

    Steps about different things commit side by side (one WAL flush serves several), instead
    of one fsync after the other; steps about one thing keep their batch order.
    """
    groups: dict[str | None, list[Callable[[], Awaitable[None]]]] = defaultdict(list)
    for key, step in steps:
        groups[key].append(step)
    if len(groups) <= 1:
        for _, step in steps:
            await step()
        return
    limit = asyncio.Semaphore(parallel)

    async def run(group: list[Callable[[], Awaitable[None]]]) -> None:
        for step in group:
            async with limit:
                await step()

    await asyncio.gather(*(run(group) for group in groups.values()))


# --- a batch of messages in one transaction ------------------------------------------------------


class OneConnection:
    """What a batch's handlers see as `ctx.pool`: every use goes to the batch's connection.

    `acquire()` yields that connection, so a handler's own `conn.transaction()` opens a
    savepoint inside the batch's transaction, and its statements commit with its
    neighbours' in the batch's one commit. Every other pool method (fetch, execute, ...)
    runs on the connection too."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """The batch's connection (never released here: the batch owns it)."""
        yield self._conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@dataclass(frozen=True)
class Apply:
    """One message's application, for `apply_in_one_transaction`."""

    key: str | None  # what it is about (transfer, relation or release id): kept in order
    # With the batch's context (its pool is the batch's connection); raises on any failure.
    # None: this message is only ever applied alone.
    together: Callable[[WalletContext], Awaitable[None]] | None
    alone: Callable[[], Awaitable[None]]  # in its own transactions, as before; never raises
    # For a set-oriented handler (`dispatch.handles_many`): the message, and what to do with
    # its answer when that handler applied it (instead of `together`).
    message: Incoming | None = None
    answered: Callable[[Body | None], None] | None = None


async def apply_in_one_transaction(
    ctx: WalletContext,
    steps: Sequence[Apply],
    parallel: int = APPLY_IN_PARALLEL,
    together_from: int = MESSAGES_PER_TRANSACTION,
) -> None:
    """Apply a batch's messages in one transaction with one commit, each in a savepoint
    (a large batch in up to BATCH_TRANSACTIONS_MAX such transactions side by side,
    MESSAGES_PER_TRANSACTION or more each: the statements of one transaction run one after
    another).

    A message whose handler raises is rolled back to its savepoint (its neighbours keep
    their work) and applied again alone after the commit, by `in_order_per_key`, exactly as
    without batching: its error answer comes from the same code as ever. So do the later
    messages about the same thing, which keeps their order. If the batch cannot commit,
    every message is applied alone (handlers are idempotent, so a commit that did happen
    before the connection broke is only repeated). In each such transaction the messages of
    a type with a set-oriented handler go to it first (`_apply_sets`).

    A batch of fewer than `together_from` messages is applied alone, message by message, up
    to `parallel` side by side: measured on two cores, the savepoints cost more round trips
    than the saved commits are worth until batches grow large (bench/README.md)."""
    if len(steps) < max(2, together_from):
        left = list(steps)
    else:
        wanted = -(-len(steps) // MESSAGES_PER_TRANSACTION)
        groups = _by_key(steps, min(BATCH_TRANSACTIONS_MAX, wanted))
        done = await asyncio.gather(*(_together(ctx, group) for group in groups))
        left = [step for group_left in done for step in group_left]
    await in_order_per_key([(step.key, step.alone) for step in left], parallel)


def _by_key(steps: Sequence[Apply], count: int) -> list[list[Apply]]:
    """`steps` in `count` groups of about equal size, all steps of one key in one group."""
    groups: list[list[Apply]] = [[] for _ in range(max(1, count))]
    group_of: dict[str | None, int] = {}
    for step in steps:
        index = group_of.setdefault(step.key, len(group_of) % len(groups))
        groups[index].append(step)
    return [group for group in groups if group]


# A batch's transaction holds its locks (a grant row, the funding account) until its one
# commit; a message that would wait longer than this for a lock gives up in the batch and is
# applied alone after the commit. A lock cycle with a single-message transaction (the same
# DECISION arriving as a request and as a reply) is broken at once, not after PostgreSQL's
# one-second deadlock check.
BATCH_LOCK_TIMEOUT_MS = 50
_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = {BATCH_LOCK_TIMEOUT_MS}"
_SAVEPOINT = "SAVEPOINT plt_message"
_RELEASE = "RELEASE SAVEPOINT plt_message"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT plt_message"


async def _together(ctx: WalletContext, steps: Sequence[Apply]) -> list[Apply]:
    """Run `steps` in one transaction; return those to apply alone afterwards.

    Steps go in the order of their keys (stable: one key's steps keep their batch order), so
    two batches lock the rows of the things they share in the same order."""
    left: list[Apply] = []
    failed_keys: set[str | None] = set()
    try:
        async with ctx.pool.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK_TIMEOUT)
            shared = dataclasses.replace(ctx, pool=cast(asyncpg.Pool, OneConnection(conn)))
            applied = await _apply_sets(shared, conn, steps)
            for step in sorted(steps, key=lambda s: s.key or ""):
                if id(step) in applied:
                    continue
                if step.together is None or step.key in failed_keys:
                    failed_keys.add(step.key)
                    left.append(step)
                    continue
                # Our own savepoint, released explicitly: a handler that swallowed a
                # database error cannot leave the batch's transaction aborted (the RELEASE
                # fails, and the step is rolled back like one that raised).
                await conn.execute(_SAVEPOINT)
                try:
                    await step.together(shared)
                    await conn.execute(_RELEASE)
                except Exception as exc:
                    await conn.execute(_ROLLBACK_TO)
                    log.info("plt_apply_alone", key=step.key, error=repr(exc))
                    failed_keys.add(step.key)
                    left.append(step)
    except Exception as exc:  # no connection, lost connection, failed commit
        log.warning("plt_batch_not_committed", messages=len(steps), error=repr(exc))
        return list(steps)
    return left


async def _apply_sets(
    ctx: WalletContext, conn: asyncpg.Connection, steps: Sequence[Apply]
) -> set[int]:
    """Hand the batch's messages of each type with a set-oriented handler to that handler,
    in a savepoint per type; return the ids of the steps it applied.

    Only a message whose key is its own in the batch goes this way (the others keep their
    order through the one-message path). A handler that raises is rolled back to its
    savepoint, and its messages go the one-message way like the rest."""
    keys = Counter(step.key for step in steps)
    groups: dict[MessageType, list[Apply]] = defaultdict(list)
    for step in steps:
        message = step.message
        if message is None or step.answered is None or keys[step.key] > 1:
            continue
        if many_handler(message.typ) is not None:
            groups[message.typ].append(step)
    applied: set[int] = set()
    for typ, group in groups.items():
        handler = many_handler(typ)
        assert handler is not None
        await conn.execute(_SAVEPOINT)
        try:
            with structlog.contextvars.bound_contextvars(node=ctx.node_id, plt_typ=typ.value):
                answers = await handler(ctx, [s.message for s in group if s.message is not None])
            for position, answer in answers.items():
                answered = group[position].answered
                assert answered is not None
                answered(answer)
            await conn.execute(_RELEASE)
        except Exception as exc:
            await conn.execute(_ROLLBACK_TO)
            log.info("plt_apply_set_failed", typ=typ.value, messages=len(group), error=repr(exc))
            continue
        applied.update(id(group[position]) for position in answers)
    return applied


def _reply_step(ctx: WalletContext, row: _Row, incoming: Incoming) -> Apply:
    """A reply as a step of its batch's transaction (ERROR replies are handled alone)."""
    if isinstance(incoming.body, ErrorReply):
        return Apply(row.dedup_key, None, partial(_hand_over, ctx, row, incoming))
    together = partial(_apply_reply, row, incoming)
    alone = partial(_hand_over, ctx, row, incoming)
    if MessageType(row.typ) in DONE_ON_REPLY:  # its row is closed by `_apply_reply`
        return Apply(row.dedup_key, together, alone)
    return Apply(row.dedup_key, together, alone, incoming, _reply_applied)


def _reply_applied(answer: Body | None) -> None:
    """A reply applied by a set-oriented handler: a reply is never answered."""


async def _apply_reply(row: _Row, incoming: Incoming, ctx: WalletContext) -> None:
    """Hand a (non-ERROR) reply to its feature; close the row if the reply is final."""
    await dispatch(ctx, incoming)
    if MessageType(row.typ) in DONE_ON_REPLY:
        await ctx.pool.execute(_DONE, row.id, ctx.clock.now())


async def _hand_over(ctx: WalletContext, row: _Row, incoming: Incoming) -> None:
    body = incoming.body
    if isinstance(body, ErrorReply):
        if body.ref_hash is not None and body.ref_hash != body_hash(row.body):
            row.error = "ERROR reply for another body"
            return
        row.error = f"peer refused: {int(body.error.code)} {body.error.class_} {body.error.text}"
        log.warning(
            "plt_error_reply",
            peer=incoming.from_node,
            typ=row.typ,
            key=row.dedup_key,
            code=int(body.error.code),
            error_class=str(body.error.class_),
            differs=list(body.differs),
        )
        handler = _ERROR_REPLY_HANDLERS.get(MessageType(row.typ))
        if handler is not None:
            try:
                await handler(ctx, incoming, body)
            except Exception as exc:  # a feature bug must not stop the sender
                log.error("plt_error_handler_failed", typ=row.typ, error=repr(exc), exc_info=exc)
        return
    try:
        await _apply_reply(row, incoming, ctx)
    except NoHandler:
        row.error = f"no handler for reply {incoming.typ}"
        log.error("plt_reply_unhandled", typ=str(incoming.typ), peer=incoming.from_node)
    except ProtocolError as exc:
        row.error = f"reply not applied: {exc.code} {exc.message}"
        log.warning("plt_reply_not_applied", typ=str(incoming.typ), error=exc.message)
    except Exception as exc:  # a feature bug must not stop the sender; the row is retried
        row.error = f"reply handler failed: {exc!r}"
        log.error("plt_reply_handler_failed", typ=str(incoming.typ), error=repr(exc), exc_info=exc)


async def call(ctx: WalletContext, to_node: str, body: Body, *, wire: Wire = WIRE) -> Incoming:
    """Send one message now, outside the outbox, and return its verified reply.

    For queries whose answer is only useful now (a STATUS_REQ from a user's screen). Both
    envelopes are logged. Raises httpx.HTTPError, ProtocolError or RuntimeError; nothing
    is retried and the reply is not dispatched.
    """
    node = require_plt(ctx)
    now = ctx.clock.now()
    env = node.seal(typ_of(body), to_node, body, _ms(now))
    item = encode_envelope(env, wire)
    try:
        raw_reply = (await _post(node, to_node, [item], wire))[0]
    except _PeerAnswer as exc:
        raise RuntimeError(str(exc)) from None
    opened = await node.open(raw_reply, _ms(ctx.clock.now()), wire=wire)
    if opened.envelope.from_node != to_node:
        raise RuntimeError(f"reply signed by {opened.envelope.from_node}, sent to {to_node}")
    await log_messages(
        ctx.pool,
        [
            Logged("out", env, item, dedup_key_of(body)),
            Logged("in", opened.envelope, raw_reply, dedup_key_of(opened.body)),
        ],
        now,
    )
    return Incoming(
        from_node=to_node,
        typ=opened.envelope.typ,
        body=opened.body,
        body_hash=body_hash(opened.envelope.body),
        envelope=raw_reply,
        msg_id=opened.envelope.msg_id,
        now_ms=_ms(now),
        is_reply=True,
    )


# --- worker passes (run repeatedly by nodes.workers) ---------------------------------------------


async def refresh_keysets_once(ctx: WalletContext) -> int:
    """Reload our own keys if `plt-node keys` changed them, and refresh every peer's key set
    (PROTOCOL b.11: every 10 minutes). Returns 0: there is never more to do at once."""
    node = require_plt(ctx)
    node.reload_own_keys()
    await node.refresh_all(_ms(ctx.clock.now()))
    return 0
