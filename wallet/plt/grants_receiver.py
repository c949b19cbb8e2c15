"""Node B, the receiver's node: PREPARE, the receiver's answer, DECISION, STATUS, resolver.

B participates (PROTOCOL b.6, second table): on PREPARE it checks the receiver and the
relationship, holds a pending, unspendable quota and answers RECEIVED; the receiver accepts
or declines in the app, and B sends a binding ACCEPT or a DECLINE; B posts or voids only on
A's signed DECISION (or A's presumed ABORT in a signed STATUS while B holds no COMMIT). B
never expires a hold on its own: the in-doubt resolver asks A instead.

    on_prepare          PREPARE -> PENDING_ACCEPT (hold, RECEIVED) or DECLINED (DECLINE)
    accept / decline    the receiver in the app (payment password) -> ACCEPT / DECLINE queued
    on_decision         DECISION -> COMMITTED (quota spendable) or ABORTED (hold voided)
    on_status           the STATUS answering our STATUS_REQ: apply a signed decision in it
    resolve_once        STATUS_REQ for holds in doubt past accept_within + grace, backing off
    relation_ended      the relationship ended: decline pending grants, close quotas, RELEASE

Equivocation (A signed COMMIT and ABORT for one id): both are kept (`conflicting`), the
peer is frozen in `peer_link` (the transport stops trading with it) and an alert is raised.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import msgspec

from protocol import device_auth, receiver
from protocol.clock import (
    ACCEPT_MARGIN_MS,
    RESOLVER_GRACE_MS,
    accept_deadline_ms,
    resolver_delay_ms,
)
from protocol.effects import (
    Alert,
    Effect,
    FreezePeer,
    HoldQuota,
    NotifyReceiver,
    PostHold,
    QueryPeer,
    Reply,
    StoreEvidence,
    VoidHold,
)
from protocol.errors import ErrorClass, ErrorCode, ProtocolError
from protocol.ids import is_uuid7, uuid7
from protocol.messages import (
    BATCH_MAX,
    Accept,
    Acceptance,
    Ack,
    Body,
    Decision,
    Decline,
    ErrorBody,
    ErrorReply,
    MessageType,
    Prepare,
    Received,
    Status,
    StatusReq,
    body_hash,
    encode_body,
)
from protocol.receiver import ReceiverState, ReceiverTransfer
from wallet import devices, ledger
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.plt import notices, outbox, quota
from wallet.plt.dispatch import Incoming, handles, handles_many
from wallet.plt.grants_base import (
    PURPOSE_QUOTA,
    PURPOSE_QUOTA_RETURNED,
    LostRace,
    OutboxWrites,
    audit_money,
    decode,
    encode,
    execute_common_effect,
    from_ms,
    grant_log_context,
    log,
    raise_alert,
    retry_lost_races,
    save_with_outbox,
    to_ms,
)
from wallet.plt.links import RelationAtReceiver, open_peer_envelope, relation_at_receiver

RESOLVE_BATCH = 4 * BATCH_MAX  # rows per resolver run; STATUS_REQs carry BATCH_MAX ids each
STATUS_REQ_GIVE_UP_MS = 60_000  # the resolver asks again on its own schedule anyway
MAX_LISTED = 500
_IN_DOUBT = ("PENDING_ACCEPT", "ACCEPTED", "DECLINED_PENDING")

AppliedHook = Callable[
    [asyncpg.Connection, ReceiverTransfer | None, ReceiverTransfer | None], Awaitable[None]
]

# --- statements ------------------------------------------------------------------------------

_COLUMNS = """
from_node, transfer_id, state, received_at, relation_id, receiver_person_id, amount_fen,
accept_by, prepare, prepare_hash, prepare_reply_typ, prepare_reply, vote_typ, vote, vote_hash,
decision, decision_hash, ack, conflicting, presumed_abort, hold_ref, hold_id, quota_account_id,
next_status_at, status_attempts, version, decided_at
"""
_LOAD = f"SELECT {_COLUMNS} FROM grant_in WHERE from_node = $1 AND transfer_id = $2"
_LOAD_FOR_UPDATE = _LOAD + " FOR UPDATE"
_INSERT = """
INSERT INTO grant_in
    (from_node, transfer_id, state, received_at, relation_id, receiver_person_id, amount_fen,
     accept_by, prepare, prepare_hash, prepare_reply_typ, prepare_reply, decision,
     decision_hash, ack, hold_ref, hold_id, quota_account_id, next_status_at, decided_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
ON CONFLICT (from_node, transfer_id) DO NOTHING
RETURNING transfer_id
"""
_SAVE = """
UPDATE grant_in
SET state = $4, prepare = $5, prepare_hash = $6, prepare_reply_typ = $7, prepare_reply = $8,
    amount_fen = $9, relation_id = coalesce(relation_id, $10), vote_typ = $11, vote = $12,
    vote_hash = $13, decision = $14, decision_hash = $15, ack = $16, conflicting = $17,
    presumed_abort = $18, decided_at = $19
WHERE from_node = $1 AND transfer_id = $2 AND version = $3
RETURNING version
"""
_RECEIVER = """
SELECT p.status, w.state AS wallet_state FROM insured_person p
LEFT JOIN wallet w ON w.person_id = p.id WHERE p.id = $1
"""
_FREEZE = """
INSERT INTO peer_link (node, frozen_at, reason) VALUES ($1, $2, $3)
ON CONFLICT (node) DO NOTHING
"""
_OF_RECEIVER = f"""
SELECT {_COLUMNS} FROM grant_in WHERE receiver_person_id = $1
ORDER BY received_at DESC, transfer_id DESC LIMIT $2
"""
_FIND_FOR_RECEIVER = """
SELECT from_node, amount_fen FROM grant_in
WHERE transfer_id = $1 AND receiver_person_id = $2 LIMIT 2
"""
_DUE_FOR_STATUS = f"""
SELECT {_COLUMNS} FROM grant_in
WHERE state IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING') AND next_status_at <= $1
ORDER BY next_status_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
_RESCHEDULE = """
UPDATE grant_in SET next_status_at = $3, status_attempts = status_attempts + 1
WHERE from_node = $1 AND transfer_id = $2
"""
_OPEN_STATUS_REQ = """
SELECT dedup_key FROM plt_outbox
WHERE to_node = $1 AND typ = 'STATUS_REQ' AND body = $2 AND done_at IS NULL
"""
_PENDING_OF_RELATION = f"""
SELECT {_COLUMNS} FROM grant_in
WHERE from_node = $1 AND relation_id = $2 AND state = 'PENDING_ACCEPT'
ORDER BY transfer_id
FOR UPDATE
"""


# --- views -----------------------------------------------------------------------------------


class IncomingGrantView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A grant offered to the receiver, as the receiver sees it.

    `state` is B's protocol state. `accept_by` is when B stops offering acceptance (a margin
    before the giver node's deadline); `acceptable` says whether accepting is possible now.
    `code` is the PLT/1 code of a decline or an abort (3303 expired, 5104 declined, ...).
    """

    transfer_id: str
    from_node: str
    relation_id: str | None
    giver_name_masked: str | None
    amount_fen: int | None
    state: ReceiverState
    received_at: dt.datetime
    accept_by: dt.datetime | None
    acceptable: bool
    code: int | None
    decided_at: dt.datetime | None


def _incoming_view(row: asyncpg.Record, now: dt.datetime) -> IncomingGrantView:
    prepare = decode(MessageType.PREPARE, row["prepare"])
    assert prepare is None or isinstance(prepare, Prepare)
    code: int | None = None
    vote = decode(row["vote_typ"], row["vote"])
    decision = decode(MessageType.DECISION, row["decision"])
    reply = decode(row["prepare_reply_typ"], row["prepare_reply"])
    if isinstance(decision, Decision) and decision.reason is not None:
        code = int(decision.reason.code)
    elif isinstance(vote, Decline):
        code = int(vote.error.code)
    elif isinstance(reply, Decline):
        code = int(reply.error.code)
    state = ReceiverState(row["state"])
    accept_by: dt.datetime | None = row["accept_by"]
    return IncomingGrantView(
        transfer_id=row["transfer_id"],
        from_node=row["from_node"],
        relation_id=row["relation_id"],
        giver_name_masked=None if prepare is None else prepare.giver.masked_name,
        amount_fen=row["amount_fen"],
        state=state,
        received_at=row["received_at"],
        accept_by=accept_by,
        acceptable=state is ReceiverState.PENDING_ACCEPT
        and accept_by is not None
        and now <= accept_by,
        code=code,
        decided_at=row["decided_at"],
    )


async def incoming_of_receiver(ctx: WalletContext, person_id: int) -> list[IncomingGrantView]:
    """Grants offered to the receiver, newest first (at most MAX_LISTED)."""
    now = ctx.clock.now()
    rows = await ctx.pool.fetch(_OF_RECEIVER, person_id, MAX_LISTED)
    return [_incoming_view(r, now) for r in rows]


# --- rows <-> the state machine ----------------------------------------------------------------


def machine(row: asyncpg.Record) -> ReceiverTransfer:
    """The pure state of a grant_in row."""
    prepare = decode(MessageType.PREPARE, row["prepare"])
    reply = decode(row["prepare_reply_typ"], row["prepare_reply"])
    vote = decode(row["vote_typ"], row["vote"])
    decision = decode(MessageType.DECISION, row["decision"])
    ack = decode(MessageType.ACK, row["ack"])
    conflicting = tuple(decode(MessageType.DECISION, raw) for raw in row["conflicting"])
    assert prepare is None or isinstance(prepare, Prepare)
    assert reply is None or isinstance(reply, Received | Decline)
    assert vote is None or isinstance(vote, Accept | Decline)
    assert decision is None or isinstance(decision, Decision)
    assert ack is None or isinstance(ack, Ack)
    assert all(isinstance(d, Decision) for d in conflicting)
    return ReceiverTransfer(
        from_node=row["from_node"],
        transfer_id=row["transfer_id"],
        state=ReceiverState(row["state"]),
        received_at_ms=to_ms(row["received_at"]),
        prepare=prepare,
        prepare_hash=row["prepare_hash"],
        prepare_reply=reply,
        vote=vote,
        vote_hash=row["vote_hash"],
        decision=decision,
        decision_hash=row["decision_hash"],
        ack=ack,
        conflicting=conflicting,  # type: ignore[arg-type]  # checked just above
        presumed_abort=row["presumed_abort"],
    )


def _reply_typ(body: Body | None) -> str | None:
    if body is None:
        return None
    return "RECEIVED" if isinstance(body, Received) else "DECLINE"


def _vote_typ(body: Body | None) -> str | None:
    if body is None:
        return None
    return "ACCEPT" if isinstance(body, Accept) else "DECLINE"


async def _save(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    new: ReceiverTransfer,
    now: dt.datetime,
    writes: OutboxWrites,
) -> None:
    decided_at = row["decided_at"]
    if decided_at is None and (new.decision is not None or new.presumed_abort):
        decided_at = now
    args = (
        new.from_node,
        new.transfer_id,
        row["version"],
        new.state.value,
        encode(new.prepare),
        new.prepare_hash,
        _reply_typ(new.prepare_reply),
        encode(new.prepare_reply),
        None if new.prepare is None else new.prepare.amount_fen,
        None if new.prepare is None else new.prepare.relation.relation_id,
        _vote_typ(new.vote),
        encode(new.vote),
        new.vote_hash,
        encode(new.decision),
        new.decision_hash,
        encode(new.ack),
        [encode_body(d) for d in new.conflicting],
        new.presumed_abort,
        decided_at,
    )
    saved = await save_with_outbox(
        conn, _SAVE, args, writes, now, subject=new.transfer_id, peer=new.from_node
    )
    if saved is None:  # the row is locked FOR UPDATE: this cannot happen, so never trust it
        raise AssertionError(f"grant_in {new.from_node}/{new.transfer_id} changed under its lock")


async def _apply(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    row: asyncpg.Record | None,
    old: ReceiverTransfer | None,
    new: ReceiverTransfer | None,
    effects: tuple[Effect, ...],
    now: dt.datetime,
    *,
    subject: str,
    offer: notices.Offer | None = None,
) -> Body | None:
    """Execute a step's effects (not HoldQuota: PREPARE does that) and store the new state.

    `offer`: what the receiver's notices tell, when the row is not `row` (just inserted)."""
    reply: Body | None = None
    posted = False
    notify: list[str] = []
    peer = None if row is None else row["from_node"]  # the giver's node
    writes = OutboxWrites()  # written with the row, in one statement
    for effect in effects:
        if writes.take(effect):
            continue
        match effect:
            case PostHold():
                assert row is not None
                await ledger.post_hold(conn, row["hold_id"], PURPOSE_QUOTA)
                await quota.activate_quota(conn, row["quota_account_id"], now)
                await audit_money(
                    conn, at=now, action="grant.commit", transfer_id=subject, side="receiver",
                    amount_fen=row["amount_fen"], peer=row["from_node"],
                )  # fmt: skip
                posted = True
            case VoidHold():
                assert row is not None
                await ledger.void_hold(conn, row["hold_id"], PURPOSE_QUOTA_RETURNED)
                await quota.void_quota(conn, row["quota_account_id"])
                await audit_money(
                    conn, at=now, action="grant.abort", transfer_id=subject, side="receiver",
                    amount_fen=row["amount_fen"], peer=row["from_node"],
                )  # fmt: skip
            case FreezePeer():
                await conn.execute(_FREEZE, effect.node, now, f"equivocation on grant {subject}")
                log.error("plt_peer_frozen", node=effect.node, transfer_id=subject)
            case NotifyReceiver():
                notify.append(effect.kind)  # last: it holds the receiver's lock to the commit
            case Reply():
                reply = effect.body
            case _:  # Alert, StoreEvidence
                await execute_common_effect(
                    conn, effect, now, subject=subject, node=ctx.node_id, side="B"
                )
    if row is not None and new is not None and new != old:
        await _save(conn, row, new, now, writes)
    else:
        await writes.execute(conn, now, subject=subject, peer=peer)
    if posted and row is not None:
        await _close_if_relation_ended(ctx, conn, row, now)
    if notify:
        assert new is not None
        offer = offer or _offer(row, new)
    for kind in notify:
        assert new is not None
        await notices.to_receiver(ctx, conn, offer, kind, now, plt_code=_code_of(new))
    return reply


def _offer(row: asyncpg.Record | None, new: ReceiverTransfer) -> notices.Offer | None:
    """The receiver's notices' facts of a stored grant_in row; None without a receiver of
    ours (a tombstone, a refused PREPARE)."""
    if row is None or row["receiver_person_id"] is None:
        return None
    return notices.Offer(
        from_node=new.from_node,
        transfer_id=new.transfer_id,
        receiver_person_id=row["receiver_person_id"],
        amount_fen=row["amount_fen"],
        accept_by=row["accept_by"],
        relation_id=row["relation_id"],
        giver_masked_name=None if new.prepare is None else new.prepare.giver.masked_name,
    )


def _code_of(state: ReceiverTransfer) -> int | None:
    """The PLT/1 code of the giver node's ABORT, if it gave one (3303 expired, ...)."""
    reason = None if state.decision is None else state.decision.reason
    return None if reason is None else int(reason.code)


async def _close_if_relation_ended(
    ctx: WalletContext, conn: asyncpg.Connection, row: asyncpg.Record, now: dt.datetime
) -> None:
    """A COMMIT for a grant accepted before its relationship ended: release it at once.

    ACCEPT is binding, so an ending waits for the DECISION (PROTOCOL d); the quota becomes
    final and is closed in the same transaction, so it is never spendable (RULES 7).
    """
    relation = await relation_at_receiver(conn, row["from_node"], row["relation_id"])
    if relation is None or not relation.active:
        await quota.close_quotas_of_relation(
            ctx, conn, from_node=row["from_node"], relation_id=row["relation_id"], now=now
        )


# --- PREPARE -----------------------------------------------------------------------------------


@handles(MessageType.PREPARE)
async def on_prepare(ctx: WalletContext, msg: Incoming) -> Body | None:
    """A giver node offers a grant: check, hold an unspendable quota, answer RECEIVED."""
    prepare = msg.body
    assert isinstance(prepare, Prepare)
    if prepare.giver.node != msg.from_node:
        return ErrorReply(
            ref_typ=MessageType.PREPARE,
            ref_hash=msg.body_hash,
            transfer_id=prepare.transfer_id,
            error=ErrorBody.of(ErrorCode.VALIDATION, "giver.node is not the sender"),
        )
    try:  # before holding anything: a node cannot invent a grant its user never signed
        device_auth.check_prepare_auth(prepare, msg.from_node)
    except device_auth.DeviceAuthError as exc:
        log.warning("grant_user_auth_refused", transfer_id=prepare.transfer_id, reason=exc.reason)
        return ErrorReply(
            ref_typ=MessageType.PREPARE,
            ref_hash=msg.body_hash,
            transfer_id=prepare.transfer_id,
            error=ErrorBody.of(ErrorCode.VALIDATION, f"user_auth: {exc}"[:500], ErrorClass.F),
            differs=tuple(f"user_auth.{d}" for d in exc.differs),
        )

    async def attempt() -> Body | None:
        async with ctx.pool.acquire() as conn, conn.transaction():
            return await _prepare_once(ctx, conn, msg, prepare)

    reply = await retry_lost_races(attempt)
    return None if msg.is_reply else reply


async def _prepare_once(
    ctx: WalletContext, conn: asyncpg.Connection, msg: Incoming, prepare: Prepare
) -> Body | None:
    now = ctx.clock.now()
    now_ms = to_ms(now)
    tid = prepare.transfer_id
    row = await conn.fetchrow(_LOAD_FOR_UPDATE, msg.from_node, tid)
    old = None if row is None else machine(row)
    relation: RelationAtReceiver | None = None
    rejection: ErrorCode | None = None
    if old is None:
        relation, rejection = await _check_prepare(conn, msg.from_node, prepare)
    event = receiver.PrepareArrived(
        from_node=msg.from_node,
        prepare=prepare,
        prepare_hash=msg.body_hash,
        b_hold_id=uuid7(),
        now_ms=now_ms,
        rejection=rejection,
    )
    new, effects = receiver.step(old, event)
    if old is not None:
        return await _apply(ctx, conn, row, old, new, effects, now, subject=tid)
    assert new is not None
    account_id: int | None = None
    hold_id: int | None = None
    for effect in effects:
        if isinstance(effect, HoldQuota):
            account_id, hold_id = await quota.open_pending_quota(
                conn, from_node=msg.from_node, transfer_id=tid, amount_fen=effect.amount_fen
            )
            await audit_money(
                conn, at=now, action="grant.hold", transfer_id=tid, side="receiver",
                amount_fen=effect.amount_fen, peer=msg.from_node,
                relation_id=prepare.relation.relation_id,
            )  # fmt: skip
    received = new.prepare_reply
    accept_by = from_ms(accept_deadline_ms(now_ms, prepare.accept_within_ms, ACCEPT_MARGIN_MS))
    offer = (
        None
        if relation is None
        else notices.Offer(
            from_node=msg.from_node,
            transfer_id=tid,
            receiver_person_id=relation.receiver_person_id,
            amount_fen=prepare.amount_fen,
            accept_by=accept_by,
            relation_id=prepare.relation.relation_id,
            giver_masked_name=prepare.giver.masked_name,
        )
    )
    inserted = await conn.fetchval(
        _INSERT,
        msg.from_node,
        tid,
        new.state.value,
        now,
        prepare.relation.relation_id,
        None if relation is None else relation.receiver_person_id,
        prepare.amount_fen,
        accept_by,
        encode_body(prepare),
        msg.body_hash,
        _reply_typ(received),
        encode(received),
        None,
        None,
        None,
        received.b_hold_id if isinstance(received, Received) else None,
        hold_id,
        account_id,
        from_ms(now_ms + prepare.accept_within_ms + RESOLVER_GRACE_MS),
        None,
    )
    if inserted is None:
        raise LostRace  # the same PREPARE is being applied concurrently; replay theirs
    if account_id is not None:
        assert relation is not None
        await quota.insert_quota(
            conn,
            account_id=account_id,
            from_node=msg.from_node,
            transfer_id=tid,
            relation_id=prepare.relation.relation_id,
            receiver_person_id=relation.receiver_person_id,
            giver_masked_name=prepare.giver.masked_name,
            granted_fen=prepare.amount_fen,
            now=now,
        )
    rest = tuple(e for e in effects if not isinstance(e, HoldQuota))
    reply = await _apply(ctx, conn, None, None, new, rest, now, subject=tid, offer=offer)
    log.info(
        "grant_prepared",
        transfer_id=tid,
        from_node=msg.from_node,
        amount_fen=prepare.amount_fen,
        state=new.state.value,
        code=None if rejection is None else int(rejection),
    )
    return reply


async def _check_prepare(
    conn: asyncpg.Connection, from_node: str, prepare: Prepare
) -> tuple[RelationAtReceiver | None, ErrorCode | None]:
    """B's checks (RULES 12: fails at once without an open wallet or normal status)."""
    relation = await relation_at_receiver(conn, from_node, prepare.relation.relation_id)
    if relation is None or not relation.active:
        return relation, ErrorCode.GIVER_PERMISSION
    if relation.relation_type != prepare.relation.type.value:
        return relation, ErrorCode.VALIDATION
    if relation.receiver_account_ref != prepare.receiver.account_id:
        return relation, ErrorCode.RECEIVER_WALLET_NOT_OPEN
    person = await conn.fetchrow(_RECEIVER, relation.receiver_person_id)
    if person is None or person["wallet_state"] != "open":
        return relation, ErrorCode.RECEIVER_WALLET_NOT_OPEN
    if person["status"] != "normal":
        return relation, ErrorCode.RECEIVER_CHECK_FAILED
    return relation, None


# --- DECISION ----------------------------------------------------------------------------------


@handles(MessageType.DECISION)
async def on_decision(ctx: WalletContext, msg: Incoming) -> Body | None:
    """A's decision, as a request from its outbox or as the reply to our ACCEPT/DECLINE."""
    decision = msg.body
    assert isinstance(decision, Decision)
    # A's request usually comes after the reply to our ACCEPT has been applied.
    reply = await apply_decision(
        ctx, msg.from_node, decision, msg.body_hash, answer_if_applied=not msg.is_reply
    )
    return None if msg.is_reply else reply


async def apply_decision(
    ctx: WalletContext,
    from_node: str,
    decision: Decision,
    decision_hash: str,
    *,
    on_applied: AppliedHook | None = None,
    answer_if_applied: bool = False,
) -> Body | None:
    """Step B's machine with a verified DECISION; return the ACK (or ERROR) to answer with.

    `on_applied(conn, old, new)` runs inside the step's transaction (an operator's audit
    record commits with the change it records). `answer_if_applied`: first look whether the
    DECISION is applied already (`_answer_applied_decision`), for one that likely is."""
    if answer_if_applied and on_applied is None:
        answer = await _answer_applied_decision(ctx, from_node, decision, decision_hash)
        if answer is not None:
            return answer

    async def attempt() -> Body | None:
        now = ctx.clock.now()
        async with ctx.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_LOAD_FOR_UPDATE, from_node, decision.transfer_id)
            old = None if row is None else machine(row)
            event = receiver.DecisionArrived(
                from_node=from_node,
                decision=decision,
                decision_hash=decision_hash,
                now_ms=to_ms(now),
            )
            new, effects = receiver.step(old, event)
            if row is None and new is not None:
                await _insert_tombstone(conn, new, now)
            reply = await _apply(
                ctx, conn, row, old, new, effects, now, subject=decision.transfer_id
            )
            if on_applied is not None:
                await on_applied(conn, old, new)
        if new is not None and (old is None or new.state != old.state):
            log.info(
                "grant_decided_at_receiver",
                transfer_id=decision.transfer_id,
                from_node=from_node,
                state=new.state.value,
            )
        return reply

    return await retry_lost_races(attempt)


async def _answer_applied_decision(
    ctx: WalletContext, from_node: str, decision: Decision, decision_hash: str
) -> Body | None:
    """The stored answer to a DECISION this node has applied already, read without a
    transaction; None when the step would do anything but answer (the caller then applies it
    under the row's lock).

    Every DECISION that commits a grant comes twice: as the reply to our ACCEPT, and as A's
    request, which alone gets the ACK back to A. The second finds the grant decided; the
    answer is then a pure function of the committed row (a decided grant with the same
    DECISION answers its stored ACK, whatever happens next), so it needs no row lock, and no
    commit to flush. A DECISION that finds the grant undecided, a different one, or no row
    at all, goes the locked way."""
    row = await ctx.pool.fetchrow(_LOAD, from_node, decision.transfer_id)
    if row is None:
        return None
    old = machine(row)
    event = receiver.DecisionArrived(
        from_node=from_node,
        decision=decision,
        decision_hash=decision_hash,
        now_ms=to_ms(ctx.clock.now()),
    )
    new, effects = receiver.step(old, event)
    answer = _plain_answer(effects)
    return answer.body if answer is not None and new == old else None


async def _insert_tombstone(
    conn: asyncpg.Connection, new: ReceiverTransfer, now: dt.datetime
) -> None:
    """ABORT for an id never seen: remember it, so a late PREPARE is declined (PROTOCOL d.7)."""
    inserted = await conn.fetchval(
        _INSERT,
        new.from_node,
        new.transfer_id,
        new.state.value,
        now,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        encode(new.decision),
        new.decision_hash,
        encode(new.ack),
        None,
        None,
        None,
        None,
        now,
    )
    if inserted is None:
        raise LostRace


# --- DECISIONs in sets (the 06:00 herd's ABORTs) ------------------------------------------------

_LOCK_MANY = f"""
SELECT {_COLUMNS} FROM grant_in
WHERE (from_node, transfer_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY from_node, transfer_id
FOR UPDATE
"""
# The same rows `_insert_tombstone` writes, many at once.
_INSERT_TOMBSTONES = """
INSERT INTO grant_in
    (from_node, transfer_id, state, received_at, decision, decision_hash, ack, decided_at)
SELECT t.from_node, t.transfer_id, t.state, $7, t.decision, t.decision_hash, t.ack, $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
    AS t(from_node, transfer_id, state, decision, decision_hash, ack)
ON CONFLICT (from_node, transfer_id) DO NOTHING
RETURNING transfer_id
"""


def _plain_answer(effects: tuple[Effect, ...]) -> Reply | None:
    """The Reply of a DECISION step that does nothing else but keep its evidence (a
    tombstone, or a decision applied before); None for any other step."""
    replies = [e for e in effects if isinstance(e, Reply)]
    others = [e for e in effects if not isinstance(e, Reply | StoreEvidence)]
    return replies[0] if len(replies) == 1 and not others else None


@handles_many(MessageType.DECISION)
async def on_decisions(ctx: WalletContext, messages: Sequence[Incoming]) -> dict[int, Body | None]:
    """A's DECISIONs of a large batch, in two statements: lock the rows, insert the
    tombstones of ABORTs for grants never seen (PROTOCOL d.7), answer replays with the ACK
    stored. Each is stepped through the same machine as `apply_decision`; a DECISION that
    moves money, notifies or alerts is left to it (one at a time)."""
    now = ctx.clock.now()
    taken: dict[int, Body | None] = {}
    tombstones: list[ReceiverTransfer] = []
    async with ctx.pool.acquire() as conn:
        keys = [(m.from_node, m.body.transfer_id) for m in messages if isinstance(m.body, Decision)]
        locked = await conn.fetch(_LOCK_MANY, [n for n, _ in keys], [t for _, t in keys])
        rows = {(r["from_node"], r["transfer_id"]): r for r in locked}
        seen: set[tuple[str, str]] = set()
        for position, msg in enumerate(messages):
            decision = msg.body
            assert isinstance(decision, Decision)
            key = (msg.from_node, decision.transfer_id)
            if key in seen:  # a repeated id goes alone, after these
                continue
            seen.add(key)
            row = rows.get(key)
            old = None if row is None else machine(row)
            event = receiver.DecisionArrived(
                from_node=msg.from_node,
                decision=decision,
                decision_hash=msg.body_hash,
                now_ms=to_ms(now),
            )
            new, effects = receiver.step(old, event)
            reply = _plain_answer(effects)
            if reply is None or new is None or (old is not None and new != old):
                continue
            if old is None:
                tombstones.append(new)
            taken[position] = None if msg.is_reply else reply.body
        await _insert_tombstones(conn, tombstones, now)
    for new in tombstones:
        log.info(
            "grant_decided_at_receiver",
            transfer_id=new.transfer_id,
            from_node=new.from_node,
            state=new.state.value,
        )
    return taken


async def _insert_tombstones(
    conn: asyncpg.Connection, tombstones: Sequence[ReceiverTransfer], now: dt.datetime
) -> None:
    """`_insert_tombstone` for many in one statement; LostRace if any id was taken
    meanwhile (the caller's savepoint is rolled back and each goes alone)."""
    if not tombstones:
        return
    inserted = await conn.fetch(
        _INSERT_TOMBSTONES,
        [t.from_node for t in tombstones],
        [t.transfer_id for t in tombstones],
        [t.state.value for t in tombstones],
        [encode(t.decision) for t in tombstones],
        [t.decision_hash for t in tombstones],
        [encode(t.ack) for t in tombstones],
        now,
    )
    if len(inserted) != len(tombstones):
        raise LostRace


# --- STATUS and the in-doubt resolver ----------------------------------------------------------


@handles(MessageType.STATUS)
async def on_status(ctx: WalletContext, msg: Incoming) -> Body | None:
    """A's answer to our STATUS_REQ: apply each signed decision (or presumed abort) in it."""
    status = msg.body
    assert isinstance(status, Status)
    await _status_request_answered(ctx, msg.from_node, status)
    for item in status.items:
        decision: Decision | None = None
        decision_hash: str | None = None
        if item.decision is not None:
            verified = await verified_decision(ctx, msg.from_node, item.transfer_id, item.decision)
            if isinstance(verified, str):
                log.error(
                    "grant_status_decision_unverified",
                    transfer_id=item.transfer_id,
                    from_node=msg.from_node,
                    error=verified,
                )
                continue
            decision, decision_hash = verified
        now_ms = to_ms(ctx.clock.now())
        event = receiver.event_for_status(msg.from_node, item, decision, decision_hash, now_ms)
        with grant_log_context(ctx.node_id, item.transfer_id):
            if isinstance(event, receiver.DecisionArrived):
                await apply_decision(ctx, msg.from_node, event.decision, event.decision_hash)
            elif isinstance(event, receiver.PresumedAbort):
                await step_existing(ctx, msg.from_node, item.transfer_id, event)
    return None


async def verified_decision(
    ctx: WalletContext, from_node: str, transfer_id: str, raw: bytes
) -> tuple[Decision, str] | str:
    """A DECISION envelope `from_node` signed for us about `transfer_id`: (body, body hash),
    or why it is not one (a STATUS item's decision, or evidence an operator hands in)."""
    try:
        opened = await open_peer_envelope(ctx, raw)
    except ProtocolError as exc:
        return exc.message
    env, body = opened.envelope, opened.body
    if env.typ is not MessageType.DECISION or not isinstance(body, Decision):
        return f"the envelope is a {env.typ}, not a DECISION"
    if env.from_node != from_node:
        return f"the DECISION is signed by {env.from_node}, not by {from_node}"
    if body.transfer_id != transfer_id:
        return f"the DECISION is about {body.transfer_id}, not {transfer_id}"
    return body, body_hash(env.body)


async def _status_request_answered(ctx: WalletContext, peer: str, status: Status) -> None:
    """Stop retrying the STATUS_REQ this STATUS answers: its items are in request order, so
    the request's canonical bytes are known (Incoming does not name the outbox row)."""
    if not status.items:
        return
    asked = encode_body(StatusReq(transfer_ids=tuple(i.transfer_id for i in status.items)))
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        for key in await conn.fetch(_OPEN_STATUS_REQ, peer, asked):
            await outbox.stop(
                conn, to_node=peer, typ=MessageType.STATUS_REQ, key=key["dedup_key"], now=now
            )


async def step_existing(
    ctx: WalletContext,
    from_node: str,
    transfer_id: str,
    event: receiver.ReceiverEvent,
    *,
    on_applied: AppliedHook | None = None,
) -> Body | None:
    """Step an existing row with an event that never creates one."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOAD_FOR_UPDATE, from_node, transfer_id)
        if row is None:
            return None
        old = machine(row)
        new, effects = receiver.step(old, event)
        reply = await _apply(ctx, conn, row, old, new, effects, now, subject=transfer_id)
        if on_applied is not None:
            await on_applied(conn, old, new)
        return reply


async def resolve_once(ctx: WalletContext, limit: int = RESOLVE_BATCH) -> int:
    """Ask the giver nodes about holds in doubt past their due time (PROTOCOL b.9.3).

    Each row is rescheduled with back-off (1 min doubling to 5 min); the STATUS that comes
    back is applied by `on_status`. SKIP LOCKED lets several replicas share the work.
    """
    now = ctx.clock.now()
    now_ms = to_ms(now)
    asked: dict[str, list[str]] = defaultdict(list)
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_DUE_FOR_STATUS, now, limit)
        for row in rows:
            _, effects = receiver.step(machine(row), receiver.ResolverTick(now_ms=now_ms))
            for effect in effects:
                if isinstance(effect, QueryPeer):
                    asked[effect.to_node].append(effect.transfer_id)
                elif isinstance(effect, Alert):
                    with grant_log_context(ctx.node_id, row["transfer_id"]):
                        await raise_alert(
                            conn,
                            effect,
                            at=now,
                            subject=f"grant:{row['transfer_id']}",
                            node=ctx.node_id,
                        )
            delay_ms = resolver_delay_ms(row["status_attempts"])
            await conn.execute(
                _RESCHEDULE, row["from_node"], row["transfer_id"], from_ms(now_ms + delay_ms)
            )
        for node, ids in asked.items():
            for start in range(0, len(ids), BATCH_MAX):
                request = StatusReq(transfer_ids=tuple(ids[start : start + BATCH_MAX]))
                await outbox.enqueue(
                    conn,
                    to_node=node,
                    typ=MessageType.STATUS_REQ,
                    key=uuid7(),
                    body=encode_body(request),
                    now=now,
                    give_up_at=from_ms(now_ms + STATUS_REQ_GIVE_UP_MS),
                )
    if rows:
        log.info("grants_in_doubt_queried", rows=len(rows), peers=sorted(asked))
    return len(rows)


# --- the receiver in the app -------------------------------------------------------------------


async def _locate(ctx: WalletContext, person_id: int, transfer_id: str) -> tuple[str, int]:
    """The giver node and the amount of a grant offered to this person."""
    rows = (
        await ctx.pool.fetch(_FIND_FOR_RECEIVER, transfer_id, person_id)
        if is_uuid7(transfer_id)
        else []
    )
    if not rows:
        raise WalletError(WalletCode.NOT_FOUND, f"no grant {transfer_id} offered to you")
    if len(rows) > 1:  # two giver nodes used one id: refuse rather than guess
        raise WalletError(WalletCode.STATE_CONFLICT, "ambiguous grant id; contact support")
    return rows[0]["from_node"], rows[0]["amount_fen"]


async def accept(
    ctx: WalletContext,
    person_id: int,
    transfer_id: str,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> IncomingGrantView:
    """The receiver accepts (a device signature, or the payment password): B sends a binding
    ACCEPT to the giver node; a device's signed acceptance travels in it for A to check."""
    from_node, amount_fen = await _locate(ctx, person_id, transfer_id)
    verified = await devices.authorise(
        ctx, person_id, payment_password=payment_password, device=device,
        action="grant.accept", ids={"transfer_id": transfer_id}, amount_fen=amount_fen,
        person=devices.receiver_ref(person_id),
    )  # fmt: skip
    acceptance = (
        Acceptance(method="pin", ref=f"pin-{person_id}-{to_ms(ctx.clock.now())}")
        if verified is None
        else Acceptance(method="device", ref=verified.proof.kid, device=verified.proof)
    )
    with grant_log_context(ctx.node_id, transfer_id):
        return await _receiver_answers(
            ctx, from_node, transfer_id, accepts=True, acceptance=acceptance
        )


async def decline(
    ctx: WalletContext,
    person_id: int,
    transfer_id: str,
    *,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> IncomingGrantView:
    """The receiver declines (device signature or payment password): B sends DECLINE; the
    hold waits for A."""
    from_node, amount_fen = await _locate(ctx, person_id, transfer_id)
    await devices.authorise(
        ctx, person_id, payment_password=payment_password, device=device,
        action="grant.decline", ids={"transfer_id": transfer_id}, amount_fen=amount_fen,
        person=devices.receiver_ref(person_id),
    )  # fmt: skip
    with grant_log_context(ctx.node_id, transfer_id):
        return await _receiver_answers(ctx, from_node, transfer_id, accepts=False, acceptance=None)


async def _receiver_answers(
    ctx: WalletContext,
    from_node: str,
    transfer_id: str,
    *,
    accepts: bool,
    acceptance: Acceptance | None,
) -> IncomingGrantView:
    now = ctx.clock.now()
    now_ms = to_ms(now)
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOAD_FOR_UPDATE, from_node, transfer_id)
        assert row is not None
        if row["vote_typ"] == ("ACCEPT" if accepts else "DECLINE"):
            # The same answer again (the app lost the first reply): it took effect, and the
            # grant may have moved on since (committed, released); say where it is now.
            return _incoming_view(row, now)
        old = machine(row)
        event: receiver.ReceiverEvent = (
            receiver.ReceiverAccepts(acceptance=acceptance, now_ms=now_ms)
            if accepts and acceptance is not None
            else receiver.ReceiverDeclines(now_ms=now_ms)
        )
        new, effects = receiver.step(old, event)
        for effect in effects:
            if isinstance(effect, Reply) and isinstance(effect.body, ErrorReply):
                raise _app_refusal(effect.body)
        await _apply(ctx, conn, row, old, new, effects, now, subject=transfer_id)
        stored = await conn.fetchrow(_LOAD, from_node, transfer_id)
    log.info(
        "grant_receiver_answered",
        transfer_id=transfer_id,
        from_node=from_node,
        accepted=accepts,
    )
    return _incoming_view(stored, now)


def _app_refusal(error: ErrorReply) -> WalletError:
    code = error.error.code
    if code is ErrorCode.EXPIRED:
        return WalletError(
            WalletCode.STATE_CONFLICT,
            "the acceptance period is over; the amount goes back to the giver",
            plt_code=int(code),
        )
    if code is ErrorCode.UNKNOWN_TRANSFER:
        return WalletError(WalletCode.NOT_FOUND, "no such grant", plt_code=int(code))
    return WalletError(WalletCode.STATE_CONFLICT, error.error.text, plt_code=int(code))


# --- the relationship ends ---------------------------------------------------------------------


async def relation_ended(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    *,
    giver_node: str,
    relation_id: str,
    now: dt.datetime,
) -> None:
    """RULES 7, DESIGN step 4, inside the transaction that ends the relationship at B.

    Pending grants are declined (DECLINE 4300; A aborts and the giver gets the amount
    back); accepted ones wait for A's decision (ACCEPT is binding) and are closed when the
    COMMIT lands; active quotas are closed now and their unused part released to A.
    """
    now_ms = to_ms(now)
    for row in await conn.fetch(_PENDING_OF_RELATION, giver_node, relation_id):
        old = machine(row)
        new, effects = receiver.step(old, receiver.RelationEnded(now_ms=now_ms))
        await _apply(ctx, conn, row, old, new, effects, now, subject=row["transfer_id"])
    await quota.close_quotas_of_relation(
        ctx, conn, from_node=giver_node, relation_id=relation_id, now=now
    )
    log.info("grants_relation_ended", relation_id=relation_id, giver_node=giver_node)
