"""Node A, the giver's node: instructions, B's replies and votes, expiry, status, RELEASE.

A coordinates (PROTOCOL b.5-b.6): it holds the giver's amount and sends PREPARE in one
transaction, commits if and only if B's binding ACCEPT is recorded by `decide_by` on A's
own clock (the next 06:00 in the province's timezone, RULES 12), otherwise aborts. Each
function below loads the grant row locked, steps `protocol.giver`, executes the effects and
writes the row in one transaction:

    instruct        client instruction  -> PREPARED_A (hold, PREPARE queued) or REJECTED
    on_reply        RECEIVED / DECLINE / ACCEPT / ACK from B
    sweep_once      PREPARED_A past decide_by -> ABORTED 3303, in batches (SKIP LOCKED)
    on_status_req   B's resolver asks; the stored signed DECISION goes back
    on_release      B closed quotas (relationship ended): the unused part goes home

Rules checked at instruction (RULES 12-15, `ctx.rules`): the relationship is a confirmed,
active cross-province one of this giver; amount <= grant_max_fen; at most
grants_per_giver_per_day grants per calendar day in the province's timezone, counting
pending and committed ones (rejected and aborted ones do not count); no grants in the
blackout hours; no new grant on a pair while one is pending; the giver's personal account
covers the amount. Received quota cannot be granted onward (RULES 15) by construction: a
grant holds the giver's *personal* account only, and quotas are separate accounts of kind
'quota' (`allow_regrant` has nothing to switch on until quotas may be a grant's source).

A giver's instructions are serialised by a transaction-scoped advisory lock on the giver,
so the daily count, the pair rule and the balance are judged over committed rows; the
unique partial index on pending pairs and the no-overdraft CHECK hold them in SQL anyway.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from protocol import device_auth, giver
from protocol.clock import next_0600, window_id
from protocol.effects import (
    Alert,
    AlertKind,
    Effect,
    HoldGiver,
    NotifyGiver,
    PostHold,
    Reply,
    ReportStatus,
    Send,
    StopRetries,
    StoreEvidence,
    VoidHold,
)
from protocol.errors import ErrorClass, ErrorCode
from protocol.giver import GiverState, GiverTransfer
from protocol.ids import is_uuid7, uuid7
from protocol.messages import (
    Accept,
    Ack,
    Body,
    Decision,
    Decline,
    ErrorBody,
    ErrorReply,
    GiverRef,
    MessageType,
    Prepare,
    Received,
    ReceiverRef,
    RelationRef,
    RelationType,
    Release,
    RelReply,
    Status,
    StatusItem,
    StatusReq,
    UserAuth,
    encode_body,
)
from wallet import devices, ledger, metrics
from wallet.audit import current_request_id
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.plt import grants_sweep, notices, outbox, relations
from wallet.plt.dispatch import Incoming, handles, handles_many
from wallet.plt.grants_base import (
    PURPOSE_GRANT,
    PURPOSE_GRANT_RETURNED,
    PURPOSE_QUOTA_RELEASED,
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
from wallet.plt.links import giver_relation_of, sealed_envelope
from wallet.plt.quota import clearing_account, clearing_slot
from wallet.privacy import mask_name
from wallet.rules import ProvinceRules

SWEEP_BATCH = 1_000  # rows per sweeper statement (PROTOCOL b.7: the 06:00 herd)
SWEEP_BATCHES_MAX = 1_000  # a bound on one run: 1M rows
MAX_LISTED = 500
_ADVISORY_CLASS = 0x4752  # "GR": the giver lock's key space, apart from other advisory locks

# --- statements ------------------------------------------------------------------------------

_COLUMNS = """
transfer_id, request_hash, relation_id, giver_person_id, to_node, receiver_account_ref,
amount_fen, state, reject_code, local_day, decide_by, hold_ref, hold_id, prepare, prepare_hash,
b_seen, vote_typ, vote, vote_hash, decision, decision_hash, acked, window_id, released_fen,
version, created_at, decided_at
"""
_LOAD = f"SELECT {_COLUMNS} FROM grant_out WHERE transfer_id = $1"
_LOAD_FOR_UPDATE = _LOAD + " FOR UPDATE"
_LOAD_MANY = f"SELECT {_COLUMNS} FROM grant_out WHERE transfer_id = ANY($1::text[])"
# An instruction is five round trips: this lock (with any grant already under the id), the
# context, the accounts' lock, the write, and COMMIT.
_LOCK_GIVER = f"""
SELECT g.* FROM (SELECT pg_advisory_xact_lock($2, $3)) AS locked
LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM grant_out WHERE transfer_id = $1 FOR UPDATE
) AS g ON true
"""
# Read after the giver's lock (a statement of its own, so its snapshot sees every grant of
# the giver committed before): the giver, the relationship (share-locked), and what the rules
# of RULES 13 count. `due_to` is the clearing sub-account's id if it exists (its code as
# `quota.clearing_code` writes it; missing, it is opened on demand).
_CONTEXT = """
SELECT p.scheme, p.status, p.name, p.personal_account_id, w.state AS wallet_state,
       r.relation_id, r.person_id, r.peer_node, r.other_ref, r.relation_type, r.state,
       r.filed_at,
       EXISTS (SELECT 1 FROM peer_link f WHERE f.node = r.peer_node) AS peer_frozen,
       (SELECT count(*) FROM grant_out g
        WHERE g.giver_person_id = $1 AND g.local_day = $3
          AND g.state IN ('PREPARED_A', 'COMMITTED')) AS today,
       EXISTS (SELECT 1 FROM grant_out g
               WHERE g.giver_person_id = $1 AND g.to_node = r.peer_node
                 AND g.receiver_account_ref = r.other_ref AND g.state = 'PREPARED_A')
           AS pair_pending,
       (SELECT a.id FROM account a WHERE a.code = 'due_to:' || r.peer_node || ':' || $4)
           AS due_to
FROM (SELECT $1::bigint AS id) AS me
LEFT JOIN insured_person p ON p.id = me.id
LEFT JOIN wallet w ON w.person_id = p.id
LEFT JOIN LATERAL (
    SELECT relation_id, person_id, peer_node, other_ref, relation_type, state, filed_at
    FROM cross_relationship WHERE side = 'giver' AND relation_id = $2
    FOR SHARE
) AS r ON true
"""
# The grant, its hold (guarded by the no-overdraft CHECK; under the accounts' lock and the
# balance read there it cannot miss), the hold's audit event and the PREPARE, in one
# statement; nothing is held or sent for a rejected one ($17 and $23 NULL). The hold is in
# the ledger before the grant_out row's checks run (at the end of the statement). A lost race
# for the id (no row returned) is rolled back whole by the caller.
_WRITE = f"""
WITH hold AS (
    INSERT INTO ledger_transfer (debit_account_id, credit_account_id, amount_fen, phase, purpose)
    SELECT $17, $18, $7, 'pending', $19 WHERE $17::bigint IS NOT NULL
    RETURNING id
), audited AS (
    INSERT INTO audit_event (at, actor, action, subject, request_id, detail)
    SELECT $16, $20, 'grant.hold', 'grant:' || $1, $21, $22::jsonb FROM hold
), inserted AS (
    INSERT INTO grant_out
        (transfer_id, request_hash, relation_id, giver_person_id, to_node, receiver_account_ref,
         amount_fen, state, reject_code, local_day, decide_by, hold_ref, hold_id, prepare,
         prepare_hash, window_id, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, (SELECT id FROM hold), $13,
            $14, $15, $16)
    ON CONFLICT (transfer_id) DO NOTHING
    RETURNING {_COLUMNS}
), queued AS (
    INSERT INTO plt_outbox
        (to_node, typ, dedup_key, body, created_at, next_attempt_at, give_up_at)
    SELECT $5, 'PREPARE', $1, $23, $16, $16, $11 FROM inserted WHERE $23::bytea IS NOT NULL
    ON CONFLICT (to_node, typ, dedup_key) DO NOTHING
    RETURNING id
)
SELECT i.*, (SELECT count(pg_notify('plt_outbox', '')) FROM queued) AS queued
FROM inserted AS i
"""
_SAVE = """
UPDATE grant_out
SET state = $3, b_seen = $4, vote_typ = $5, vote = $6, vote_hash = $7, decision = $8,
    decision_hash = $9, acked = $10, decided_at = $11
WHERE transfer_id = $1 AND version = $2
RETURNING version
"""
_DUE = f"""
SELECT {_COLUMNS} FROM grant_out
WHERE state = 'PREPARED_A' AND decide_by < $1
ORDER BY decide_by
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
_HOLD_ACCOUNTS = """
SELECT debit_account_id, credit_account_id FROM ledger_transfer WHERE id = ANY($1::bigint[])
"""
_STORED_DECISION = """
SELECT envelope FROM plt_message
WHERE dedup_key = $1 AND typ = 'DECISION' AND direction = 'out' AND to_node = $2
ORDER BY id LIMIT 1
"""
_LOAD_RELEASE = """
SELECT body_hash, reply FROM grant_release WHERE direction = 'in' AND release_id = $1
"""
_INSERT_RELEASE_IN = """
INSERT INTO grant_release (direction, release_id, peer_node, relation_id, body, body_hash,
                           reply, returned_fen, created_at)
VALUES ('in', $1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (direction, release_id) DO NOTHING
RETURNING release_id
"""
_LOCK_RELEASED_GRANTS = f"""
SELECT {_COLUMNS} FROM grant_out WHERE transfer_id = ANY($1::text[]) ORDER BY transfer_id FOR UPDATE
"""
_ADD_RELEASED = """
UPDATE grant_out SET released_fen = $3
WHERE transfer_id = $1 AND released_fen = $2 AND state = 'COMMITTED' AND $3 <= amount_fen
RETURNING transfer_id
"""
_GIVER_ACCOUNT = "SELECT personal_account_id FROM insured_person WHERE id = $1"
_OF_GIVER = f"""
SELECT {_COLUMNS} FROM grant_out WHERE giver_person_id = $1
ORDER BY created_at DESC, transfer_id DESC LIMIT $2
"""


# --- views -----------------------------------------------------------------------------------


class GrantView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A grant as its giver sees it.

    `state` is A's protocol state: PREPARED_A (waiting for the receiver), COMMITTED (the
    receiver has the quota), ABORTED (declined, expired or refused by B: the amount is back),
    REJECTED (refused at instruction: nothing was held). `code` is the PLT/1 error code of a
    rejection or an abort (3303 expired, 5104 declined, ...).
    """

    transfer_id: str
    relation_id: str
    to_node: str
    amount_fen: int
    state: GiverState
    code: int | None
    decide_by: dt.datetime
    created_at: dt.datetime
    decided_at: dt.datetime | None
    receiver_seen: bool
    acknowledged: bool
    released_fen: int


def _view(row: asyncpg.Record) -> GrantView:
    code: int | None = row["reject_code"]
    if row["decision"] is not None:
        decision = decode(MessageType.DECISION, row["decision"])
        assert isinstance(decision, Decision)
        if decision.reason is not None:
            code = int(decision.reason.code)
    return GrantView(
        transfer_id=row["transfer_id"],
        relation_id=row["relation_id"],
        to_node=row["to_node"],
        amount_fen=row["amount_fen"],
        state=GiverState(row["state"]),
        code=code,
        decide_by=row["decide_by"],
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        receiver_seen=row["b_seen"],
        acknowledged=row["acked"],
        released_fen=row["released_fen"],
    )


async def grant_of_giver(ctx: WalletContext, person_id: int, transfer_id: str) -> GrantView:
    """One of the giver's grants; other people's grants are not found."""
    row = await ctx.pool.fetchrow(_LOAD, transfer_id) if is_uuid7(transfer_id) else None
    if row is None or row["giver_person_id"] != person_id:
        raise WalletError(WalletCode.NOT_FOUND, f"no grant {transfer_id} of yours")
    return _view(row)


async def grants_of_giver(ctx: WalletContext, person_id: int) -> list[GrantView]:
    """The giver's grants, newest first (at most MAX_LISTED)."""
    return [_view(r) for r in await ctx.pool.fetch(_OF_GIVER, person_id, MAX_LISTED)]


# --- rows <-> the state machine ----------------------------------------------------------------


def machine(row: asyncpg.Record) -> GiverTransfer:
    """The pure state of a grant_out row."""
    prepare = decode(MessageType.PREPARE, row["prepare"])
    assert isinstance(prepare, Prepare)
    vote = decode(row["vote_typ"], row["vote"])
    decision = decode(MessageType.DECISION, row["decision"])
    assert vote is None or isinstance(vote, Accept | Decline)
    assert decision is None or isinstance(decision, Decision)
    return GiverTransfer(
        transfer_id=row["transfer_id"],
        to_node=row["to_node"],
        state=GiverState(row["state"]),
        request_hash=row["request_hash"],
        prepare=prepare,
        prepare_hash=row["prepare_hash"],
        decide_by_ms=to_ms(row["decide_by"]),
        created_at_ms=to_ms(row["created_at"]),
        reject_code=None if row["reject_code"] is None else ErrorCode(row["reject_code"]),
        b_seen=row["b_seen"],
        vote=vote,
        vote_hash=row["vote_hash"],
        decision=decision,
        decision_hash=row["decision_hash"],
        acked=row["acked"],
    )


def _save_args(row: asyncpg.Record, new: GiverTransfer, now: dt.datetime) -> tuple[Any, ...]:
    """The arguments of `_SAVE` for the new state of a locked row."""
    vote_typ = None
    if new.vote is not None:
        vote_typ = "ACCEPT" if isinstance(new.vote, Accept) else "DECLINE"
    decided_at = row["decided_at"]
    if new.decision is not None and decided_at is None:
        decided_at = now
    return (
        new.transfer_id,
        row["version"],
        new.state.value,
        new.b_seen,
        vote_typ,
        encode(new.vote),
        new.vote_hash,
        encode(new.decision),
        new.decision_hash,
        new.acked,
        decided_at,
    )


async def _save(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    new: GiverTransfer,
    now: dt.datetime,
    writes: OutboxWrites,
) -> None:
    saved = await save_with_outbox(
        conn,
        _SAVE,
        _save_args(row, new, now),
        writes,
        now,
        subject=new.transfer_id,
        peer=row["to_node"],
    )
    if saved is None:  # the row is locked FOR UPDATE: this cannot happen, so never trust it
        raise AssertionError(f"grant_out {new.transfer_id} changed under its lock")


async def _apply(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    row: asyncpg.Record | None,
    old: GiverTransfer | None,
    new: GiverTransfer | None,
    effects: tuple[Effect, ...],
    now: dt.datetime,
    *,
    subject: str,
) -> Body | None:
    """Execute a step's effects and store the new state; return the Reply body, if any."""
    reply: Body | None = None
    peer = None if row is None else row["to_node"]  # the receiver's node
    writes = OutboxWrites()  # written with the row, in one statement
    for effect in effects:
        if writes.take(effect):
            continue
        match effect:
            case PostHold() | VoidHold():
                assert row is not None and row["hold_id"] is not None
                if isinstance(effect, PostHold):
                    await ledger.post_hold(conn, row["hold_id"], PURPOSE_GRANT)
                else:
                    await ledger.void_hold(conn, row["hold_id"], PURPOSE_GRANT_RETURNED)
                await audit_money(
                    conn,
                    at=now,
                    action="grant.commit" if isinstance(effect, PostHold) else "grant.abort",
                    transfer_id=subject,
                    side="giver",
                    amount_fen=row["amount_fen"],
                    peer=row["to_node"],
                    code=_code_of(new),
                )
            case NotifyGiver():
                log.info("grant_outcome", transfer_id=subject, state=effect.state)
                await notices.to_givers(conn, [(subject, effect.state, _code_of(new))], now)
            case Reply():
                reply = effect.body
            case _:  # Alert, StoreEvidence
                await execute_common_effect(
                    conn, effect, now, subject=subject, node=ctx.node_id, side="A"
                )
    if row is not None and new is not None and new != old:
        await _save(conn, row, new, now, writes)
    else:
        await writes.execute(conn, now, subject=subject, peer=peer)
    return reply


def _code_of(state: GiverTransfer | None) -> int | None:
    """The PLT/1 code of the DECISION's reason (an ABORT's: 3303 expired, ...), if any."""
    reason = None if state is None or state.decision is None else state.decision.reason
    return None if reason is None else int(reason.code)


async def lock_grant(conn: asyncpg.Connection, transfer_id: str) -> asyncpg.Record | None:
    """The grant_out row locked FOR UPDATE, for a step driven from outside this module (the
    operator's resolution, `wallet.plt.resolution`), which then calls `apply_step`."""
    row: asyncpg.Record | None = await conn.fetchrow(_LOAD_FOR_UPDATE, transfer_id)
    return row


apply_step = _apply  # execute a step's effects and save the row, in the caller's transaction


# --- the giver's instruction -------------------------------------------------------------------


def request_hash(transfer_id: str, giver_person_id: int, relation_id: str, amount_fen: int) -> str:
    """Digest of what the giver asked for (the payment password is not part of it)."""
    canonical = msgspec.json.encode([transfer_id, giver_person_id, relation_id, amount_fen])
    return hashlib.sha256(canonical).hexdigest()


async def _authorise(
    ctx: WalletContext,
    giver_person_id: int,
    transfer_id: str,
    relation_id: str,
    amount_fen: int,
    payment_password: str | None,
    device: DeviceSignature | None,
) -> tuple[UserAuth, WalletError | None]:
    """The PREPARE's `user_auth` for a verified instruction, and a staleness to raise unless
    the instruction turns out to be a replay."""
    verified = await devices.authorise(
        ctx, giver_person_id, payment_password=payment_password, device=device,
        action="grant.instruct", ids={"relation_id": relation_id, "transfer_id": transfer_id},
        amount_fen=amount_fen, fresh=False,
    )  # fmt: skip
    verified_at_ms = to_ms(ctx.clock.now())
    if verified is None:
        ref = f"pin-{giver_person_id}-{verified_at_ms}"
        return UserAuth(method="pin", verified_at_ms=verified_at_ms, ref=ref), None
    proof = verified.proof
    signed = UserAuth(method="device", verified_at_ms=verified_at_ms, ref=proof.kid, device=proof)
    return signed, verified.stale


def in_blackout(local: dt.datetime, rules: ProvinceRules) -> bool:
    """RULES 13: no grants between `grant_blackout_start_hour` and `grant_blackout_end_hour`."""
    start, end = rules.grant_blackout_start_hour, rules.grant_blackout_end_hour
    if start == end:
        return False
    if start < end:
        return start <= local.hour < end
    return local.hour >= start or local.hour < end


async def instruct(
    ctx: WalletContext,
    giver_person_id: int,
    *,
    transfer_id: str,
    relation_id: str,
    amount_fen: int,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> GrantView:
    """The giver grants a quota (RULES 11-13): checks, hold, PREPARE queued; or a refusal.

    Authorised by exactly one of a device signature (`wallet.devices`; the proof travels in
    the PREPARE's `user_auth` so B can check it) or the payment password (`method: "pin"`).
    Idempotent on `transfer_id`: the same instruction again returns the grant's current
    state (a stale device signature too: it is the same signed grant); another instruction
    under the same id is `idempotency_conflict` (3106) with the fields that differ. A rule
    refusal is stored (state REJECTED, nothing held) and raised.
    """
    if not is_uuid7(transfer_id):
        raise WalletError(
            WalletCode.INVALID_REQUEST, "transfer_id must be a canonical lowercase UUIDv7"
        )
    if not is_uuid7(relation_id):
        raise WalletError(WalletCode.NOT_FOUND, f"no relationship {relation_id}")
    # Verified before (and outside) the grant's transaction: a failure is counted in its
    # own committed transaction (wallet.payment_password).
    user_auth, stale = await _authorise(
        ctx, giver_person_id, transfer_id, relation_id, amount_fen, payment_password, device
    )
    wanted = request_hash(transfer_id, giver_person_id, relation_id, amount_fen)

    async def attempt() -> asyncpg.Record:
        return await _instruct_once(
            ctx, giver_person_id, transfer_id, relation_id, amount_fen, wanted, user_auth, stale
        )

    with grant_log_context(ctx.node_id, transfer_id):
        row = await retry_lost_races(attempt)
    if row["state"] == GiverState.REJECTED:
        raise rejection_error(row["transfer_id"], ErrorCode(row["reject_code"]))
    return _view(row)


async def _instruct_once(
    ctx: WalletContext,
    giver_person_id: int,
    transfer_id: str,
    relation_id: str,
    amount_fen: int,
    wanted_hash: str,
    user_auth: UserAuth,
    stale: WalletError | None,
) -> asyncpg.Record:
    now = ctx.clock.now()
    now_ms = to_ms(now)
    rules = ctx.rules
    local = now.astimezone(ZoneInfo(rules.timezone))
    slot = clearing_slot(transfer_id)
    async with ctx.pool.acquire() as conn, conn.transaction():
        existing = await conn.fetchrow(
            _LOCK_GIVER, transfer_id, _ADVISORY_CLASS, giver_person_id % 2_147_483_647
        )
        if existing is not None and existing["transfer_id"] is not None:
            return _replay(existing, giver_person_id, wanted_hash, relation_id, amount_fen)
        if stale is not None:  # a new grant needs a fresh signature; a replay did not
            raise stale
        context = await conn.fetchrow(
            _CONTEXT, giver_person_id, relation_id, local.date(), f"{slot:02d}"
        )
        assert context is not None  # one row, whatever exists
        _check_giver(context)
        relation = giver_relation_of(context)
        if relation is None or relation.giver_person_id != giver_person_id:
            raise WalletError(WalletCode.NOT_FOUND, f"no relationship {relation_id} of yours")
        if not relation.active:
            raise WalletError(
                WalletCode.RULE_VIOLATION,
                "the relationship is not a confirmed, active cross-province one",
                plt_code=int(ErrorCode.GIVER_PERMISSION),
                rule="relationship_active",
            )
        if context["peer_frozen"]:
            raise WalletError(
                WalletCode.SERVICE_UNAVAILABLE,
                "grants to the receiver's province are suspended; try again later",
                plt_code=int(ErrorCode.UNAVAILABLE),
            )
        personal: int = context["personal_account_id"]
        due_to: int = context["due_to"] or await clearing_account(
            conn, "due_to", relation.receiver_node, transfer_id
        )
        available = (await ledger.lock_balances(conn, [personal, due_to]))[personal].available_fen

        decide_by_ms = next_0600(now_ms, rules.timezone, rules.grant_expiry_hour)
        prepare = Prepare(
            transfer_id=transfer_id,
            giver=GiverRef(
                node=ctx.node_id,
                account_ref=relations.giver_account_ref(giver_person_id),
                masked_name=mask_name(context["name"])[:64],
            ),
            receiver=ReceiverRef(account_id=relation.receiver_account_ref),
            relation=RelationRef(
                relation_id=relation_id,
                type=RelationType(relation.relation_type),
                verified_by_A=True,
            ),
            amount_fen=amount_fen,
            currency="CNY",
            fee_fen=0,
            accept_within_ms=decide_by_ms - now_ms,
            window_id=window_id(now_ms, rules.timezone),
            user_auth=user_auth,
            a_hold_id=uuid7(),
        )
        event = giver.Instruct(
            prepare=prepare,
            request_hash=wanted_hash,
            to_node=relation.receiver_node,
            decide_by_ms=decide_by_ms,
            now_ms=now_ms,
            rejection=_rule_refusal(rules, context, amount_fen, local, available),
        )
        new, effects = giver.step(None, event)
        assert new is not None
        held = next((e.amount_fen for e in effects if isinstance(e, HoldGiver)), None)
        sent = next((e for e in effects if isinstance(e, Send)), None)
        assert held is None or held == amount_fen
        assert sent is None or (sent.typ, sent.to_node) == (MessageType.PREPARE, event.to_node)
        row = await conn.fetchrow(
            _WRITE,
            transfer_id,
            wanted_hash,
            relation_id,
            giver_person_id,
            relation.receiver_node,
            relation.receiver_account_ref,
            amount_fen,
            new.state.value,
            None if new.reject_code is None else int(new.reject_code),
            local.date(),
            from_ms(decide_by_ms),
            prepare.a_hold_id,
            encode_body(prepare),
            new.prepare_hash,
            prepare.window_id,
            now,
            # The hold and its audit event (grants_base.audit_money's fields), if any.
            None if held is None else personal,
            due_to,
            PURPOSE_GRANT,
            f"person:{giver_person_id}",
            current_request_id(),
            json.dumps(
                {
                    "side": "giver",
                    "amount_fen": amount_fen,
                    "peer": relation.receiver_node,
                    "relation_id": relation_id,
                }
            ),
            # The PREPARE; its retries stop at the deadline (PROTOCOL b.7).
            None if sent is None else encode_body(sent.body),
        )
        if row is None:
            raise LostRace  # another giver's request took this id first; replay it
        log.info(
            "grant_instructed",
            transfer_id=transfer_id,
            to_node=relation.receiver_node,
            amount_fen=amount_fen,
            state=new.state.value,
            code=None if new.reject_code is None else int(new.reject_code),
        )
        return row


def _check_giver(person: asyncpg.Record) -> None:
    if person["wallet_state"] != "open":
        raise WalletError(WalletCode.PERSON_NOT_ELIGIBLE, "the giver has no open wallet")
    if person["scheme"] != "employee" or person["personal_account_id"] is None:
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE, "only employee-scheme members can grant (RULES 1)"
        )
    if person["status"] != "normal":
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE, "the giver is not in normal insured status"
        )


def _rule_refusal(
    rules: ProvinceRules,
    context: asyncpg.Record,
    amount_fen: int,
    local: dt.datetime,
    available_fen: int,
) -> ErrorCode | None:
    """The first rule of RULES 13 (and the balance) the instruction breaks, or None; from the
    counts `_CONTEXT` read under the giver's lock and the balance read under the account's."""
    if in_blackout(local, rules):
        return ErrorCode.GIVER_PERMISSION
    if amount_fen > rules.grant_max_fen:
        return ErrorCode.GIVER_LIMIT
    if context["today"] >= rules.grants_per_giver_per_day:
        return ErrorCode.GIVER_LIMIT
    if context["pair_pending"]:
        return ErrorCode.GIVER_LIMIT
    if available_fen < amount_fen:
        return ErrorCode.GIVER_INSUFFICIENT_BALANCE
    return None


def rejection_error(transfer_id: str, code: ErrorCode) -> WalletError:
    """The problem a REJECTED instruction answers with (every time it is replayed)."""
    klass = ErrorClass.T if code is ErrorCode.GIVER_PERMISSION else code.error_class
    if code is ErrorCode.GIVER_INSUFFICIENT_BALANCE:
        return WalletError(
            WalletCode.INSUFFICIENT_FUNDS,
            "the personal account does not cover the grant",
            plt_code=int(code),
            plt_class=klass.value,
            transfer_id=transfer_id,
            state="REJECTED",
        )
    detail = {
        ErrorCode.GIVER_PERMISSION: "no grants between the blackout hours (RULES 13)",
        ErrorCode.GIVER_LIMIT: (
            "a grant limit is reached: the amount per grant, grants per day, "
            "or a pending grant on this pair (RULES 13)"
        ),
    }.get(code, code.title)
    return WalletError(
        WalletCode.RULE_VIOLATION,
        detail,
        plt_code=int(code),
        plt_class=klass.value,
        transfer_id=transfer_id,
        state="REJECTED",
    )


def _replay(
    row: asyncpg.Record, giver_person_id: int, wanted_hash: str, relation_id: str, amount_fen: int
) -> asyncpg.Record:
    if row["giver_person_id"] != giver_person_id:
        raise WalletError(
            WalletCode.IDEMPOTENCY_CONFLICT,
            "this transfer_id is already used; make a new one",
            plt_code=int(ErrorCode.MODIFIED_REQUEST),
        )
    if row["request_hash"] == wanted_hash:
        return row  # the client's retry reads the current state
    differs = [
        name
        for name, stored, sent in (
            ("relation_id", row["relation_id"], relation_id),
            ("amount_fen", row["amount_fen"], amount_fen),
        )
        if stored != sent
    ]
    log.warning("grant_instruction_modified", transfer_id=row["transfer_id"], differs=differs)
    raise WalletError(
        WalletCode.IDEMPOTENCY_CONFLICT,
        f"grant {row['transfer_id']} was instructed with other values: {', '.join(differs)}",
        plt_code=int(ErrorCode.MODIFIED_REQUEST),
        differs=differs,
    )


# --- B's replies and votes ---------------------------------------------------------------------


@handles(MessageType.RECEIVED, MessageType.DECLINE, MessageType.ACCEPT, MessageType.ACK)
async def on_receiver_message(ctx: WalletContext, msg: Incoming) -> Body | None:
    """RECEIVED or DECLINE answering PREPARE, a later ACCEPT or DECLINE, an ACK to DECISION."""
    body = msg.body
    assert isinstance(body, Received | Decline | Accept | Ack)
    tid = body.transfer_id
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOAD_FOR_UPDATE, tid)
        if row is not None and row["to_node"] != msg.from_node:
            row = None  # another node cannot speak for this grant
        old = None if row is None else machine(row)
        if isinstance(body, Accept) and old is not None:
            refusal = _acceptance_refusal(body, old.prepare, msg)
            if refusal is not None:
                return refusal  # nothing recorded: the vote proves nothing
        event = giver.MessageArrived(body=body, body_hash=msg.body_hash, now_ms=to_ms(now))
        new, effects = giver.step(old, event)
        reply = await _apply(ctx, conn, row, old, new, effects, now, subject=tid)
    metrics.observe_grant_phases(row, old, new, body, now)
    if new is not None and old is not None and new.state != old.state:
        log.info("grant_decided", transfer_id=tid, state=new.state.value, by=msg.typ.value)
    return None if msg.is_reply else reply


def _acceptance_refusal(accept: Accept, prepare: Prepare, msg: Incoming) -> ErrorReply | None:
    """A signed ERROR (3100, class F) for an ACCEPT whose device acceptance does not prove
    that the receiver signed accepting exactly this grant at B; None if it does (or if B
    recorded a pin/face acceptance, which is B's word)."""
    try:
        device_auth.check_accept_auth(accept, prepare, msg.from_node)
    except device_auth.DeviceAuthError as exc:
        log.warning("grant_acceptance_refused", transfer_id=accept.transfer_id, reason=exc.reason)
        return ErrorReply(
            ref_typ=MessageType.ACCEPT,
            ref_hash=msg.body_hash,
            transfer_id=accept.transfer_id,
            error=ErrorBody.of(ErrorCode.VALIDATION, f"acceptance: {exc}"[:500], ErrorClass.F),
        )
    return None


# --- expiry ----------------------------------------------------------------------------------


async def sweep_once(ctx: WalletContext, batch: int = SWEEP_BATCH) -> int:
    """Abort one batch of PREPARED_A grants past their deadline (presumed abort, 3303).

    SKIP LOCKED lets several replicas sweep side by side, and skips a row an ACCEPT is
    deciding right now (that transaction re-checks the deadline itself).
    """
    now = ctx.clock.now()
    now_ms = to_ms(now)
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_DUE, from_ms(now_ms), batch)
        if not rows:
            return 0
        holds = await conn.fetch(_HOLD_ACCOUNTS, [r["hold_id"] for r in rows])
        # Lock every account the voids touch, in id order, before the first void.
        await ledger.lock_accounts(
            conn, {a for h in holds for a in (h["debit_account_id"], h["credit_account_id"])}
        )
        # The same steps as one at a time, executed together (wallet.plt.grants_sweep).
        swept: list[grants_sweep.Swept] = []
        for row in rows:
            old = machine(row)
            new, effects = giver.step(old, giver.Sweep(now_ms=now_ms))
            step = None if new is None else grants_sweep.Swept(row, new, effects)
            if step is not None and new != old and grants_sweep.batchable(step):
                swept.append(step)
                continue
            with grant_log_context(ctx.node_id, row["transfer_id"]):
                await _apply(ctx, conn, row, old, new, effects, now, subject=row["transfer_id"])
        await grants_sweep.execute_batch(conn, swept, now, node=ctx.node_id)
        await _save_many(conn, [_save_args(s.row, s.new, now) for s in swept])
    log.info("grants_expired", count=len(rows))
    return len(rows)


async def run_sweeper_once(ctx: WalletContext) -> int:
    """Sweep until nothing is due (bounded); return the number of grants aborted."""
    total = 0
    for _ in range(SWEEP_BATCHES_MAX):
        done = await sweep_once(ctx)
        total += done
        if done < SWEEP_BATCH:
            break
    return total


# --- many rows in one statement (the sweep's batch, a batch of ACKs) ----------------------------

_SAVE_MANY = """
UPDATE grant_out AS g
SET state = s.state, b_seen = s.b_seen, vote_typ = s.vote_typ, vote = s.vote,
    vote_hash = s.vote_hash, decision = s.decision, decision_hash = s.decision_hash,
    acked = s.acked, decided_at = s.decided_at
FROM unnest($1::text[], $2::integer[], $3::text[], $4::boolean[], $5::text[], $6::bytea[],
            $7::text[], $8::bytea[], $9::text[], $10::boolean[], $11::timestamptz[])
    AS s(transfer_id, version, state, b_seen, vote_typ, vote, vote_hash, decision,
         decision_hash, acked, decided_at)
WHERE g.transfer_id = s.transfer_id AND g.version = s.version
RETURNING g.transfer_id
"""
_LOCK_MANY = _LOAD_MANY + " ORDER BY transfer_id FOR UPDATE"


async def _save_many(conn: asyncpg.Connection, saves: list[tuple[Any, ...]]) -> None:
    """`_save` for many locked rows (`_save_args` each) in one statement, not one each."""
    if not saves:
        return
    columns = [list(column) for column in zip(*saves, strict=True)]
    saved = await conn.fetch(_SAVE_MANY, *columns)
    if len(saved) != len(saves):  # every row is locked FOR UPDATE: never trust otherwise
        raise AssertionError(f"{len(saves) - len(saved)} grant_out rows changed under their lock")


def _ack_applies_alone(effects: tuple[Effect, ...]) -> bool:
    """Whether an ACK step's effects are the plain ones `on_acks` executes in sets: stop the
    DECISION's retries, keep the evidence (or nothing, for a duplicate)."""
    return all(
        isinstance(e, StoreEvidence)
        or (isinstance(e, StopRetries) and e.typ is MessageType.DECISION)
        for e in effects
    )


@handles_many(MessageType.ACK)
async def on_acks(ctx: WalletContext, messages: Sequence[Incoming]) -> dict[int, Body | None]:
    """B's ACKs (replies to our DECISIONs) of a large batch: one statement locks the rows,
    one stops the DECISIONs' retries, one saves the acknowledged rows.

    Each ACK is stepped through the same machine as `on_receiver_message` (a duplicate
    changes nothing); an ACK whose step does more (an alert: unknown grant, another
    DECISION, another node) or that is not a reply is left to that handler."""
    now = ctx.clock.now()
    taken: dict[int, Body | None] = {}
    stops: list[tuple[str, MessageType, str]] = []
    saves: list[tuple[Any, ...]] = []
    async with ctx.pool.acquire() as conn:
        ids = [m.body.transfer_id for m in messages if isinstance(m.body, Ack)]
        rows = {r["transfer_id"]: r for r in await conn.fetch(_LOCK_MANY, ids)}
        for position, msg in enumerate(messages):
            body = msg.body
            assert isinstance(body, Ack)
            row = rows.pop(body.transfer_id, None)  # popped: a repeated id goes alone
            if row is None or row["to_node"] != msg.from_node or not msg.is_reply:
                continue
            old = machine(row)
            event = giver.MessageArrived(body=body, body_hash=msg.body_hash, now_ms=to_ms(now))
            new, effects = giver.step(old, event)
            if new is None or not _ack_applies_alone(effects):
                continue
            stops.extend((row["to_node"], MessageType.DECISION, row["transfer_id"])
                         for e in effects if isinstance(e, StopRetries))  # fmt: skip
            if new != old:
                saves.append(_save_args(row, new, now))
            metrics.observe_grant_phases(row, old, new, body, now)
            taken[position] = None
        if stops:
            await outbox.stop_many(conn, stops, now=now)
        await _save_many(conn, saves)
    log.info("grants_acked", count=len(saves), duplicates=len(taken) - len(saves))
    return taken


# --- STATUS ------------------------------------------------------------------------------------


@handles(MessageType.STATUS_REQ)
async def on_status_request(ctx: WalletContext, msg: Incoming) -> Body | None:
    """B's resolver asks about grants it holds; answer with the stored signed DECISIONs.

    An id named more than once is answered once (first position): a repeated unknown id
    must not page an operator, or fill the audit trail, once per repetition.
    """
    request = msg.body
    assert isinstance(request, StatusReq)
    now = ctx.clock.now()
    items: list[StatusItem] = []
    asked = list(dict.fromkeys(request.transfer_ids))
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = {r["transfer_id"]: r for r in await conn.fetch(_LOAD_MANY, asked)}
        for tid in asked:
            row = rows.get(tid)
            if row is not None and row["to_node"] != msg.from_node:
                row = None
            state = None if row is None else machine(row)
            _, effects = giver.step(state, giver.StatusQuery(transfer_id=tid, now_ms=to_ms(now)))
            for effect in effects:
                if isinstance(effect, ReportStatus):
                    items.append(await _status_item(ctx, conn, effect, msg.from_node, row))
                elif isinstance(effect, Alert):
                    await raise_alert(
                        conn, effect, at=now, subject=f"grant:{tid}", node=ctx.node_id
                    )
    return Status(items=tuple(items))


async def _status_item(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    report: ReportStatus,
    peer: str,
    row: asyncpg.Record | None,
) -> StatusItem:
    envelope: bytes | None = None
    if report.decision is not None and row is not None:
        envelope = await conn.fetchval(_STORED_DECISION, report.transfer_id, peer)
        if envelope is None:
            # Decided but never sent yet (A crashed before the sender ran): sign it now.
            envelope = await sealed_envelope(ctx, MessageType.DECISION, peer, row["decision"])
    return StatusItem(
        transfer_id=report.transfer_id,
        state=report.state,
        decision=None if envelope is None else bytes(envelope),
        undecided_remaining_ms=report.undecided_remaining_ms,
        presumed=report.presumed,
    )


# --- RELEASE -----------------------------------------------------------------------------------


@handles(MessageType.RELEASE)
async def on_release(ctx: WalletContext, msg: Incoming) -> Body | None:
    """B closed quotas of an ended relationship: return the released part to the giver.

    Idempotent on `release_id` (the stored answer is repeated) and, per grant, on the
    cumulative `released_fen` (only an increase moves money).
    """
    release = msg.body
    assert isinstance(release, Release)
    now = ctx.clock.now()

    async def attempt() -> RelReply:
        async with ctx.pool.acquire() as conn, conn.transaction():
            return await _apply_release(ctx, conn, msg, release, now)

    reply = await retry_lost_races(attempt)
    return None if msg.is_reply else reply


async def _apply_release(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    msg: Incoming,
    release: Release,
    now: dt.datetime,
) -> RelReply:
    stored = await conn.fetchrow(_LOAD_RELEASE, release.release_id)
    if stored is not None:
        if stored["body_hash"] == msg.body_hash:
            answer = decode(MessageType.REL_REPLY, stored["reply"])
            assert isinstance(answer, RelReply)
            return answer
        return _release_reply(release, msg, now, ErrorCode.MODIFIED_REQUEST, "release_id reused")
    ids = [g.transfer_id for g in release.grants]
    rows = {r["transfer_id"]: r for r in await conn.fetch(_LOCK_RELEASED_GRANTS, ids)}
    problem = _release_problem(release, rows, msg.from_node)
    returned = 0
    if problem is None:
        moves: list[tuple[asyncpg.Record, int]] = []
        for g in release.grants:
            row = rows[g.transfer_id]
            if g.released_fen > row["released_fen"]:
                moves.append((row, g.released_fen))
        accounts: list[tuple[int, int]] = []
        for row, _ in moves:
            personal = await conn.fetchval(_GIVER_ACCOUNT, row["giver_person_id"])
            due_to = await clearing_account(conn, "due_to", row["to_node"], row["transfer_id"])
            accounts.append((due_to, personal))
        await ledger.lock_accounts(conn, [a for pair in accounts for a in pair])
        for (row, cumulative), (due_to, personal) in zip(moves, accounts, strict=True):
            delta = cumulative - row["released_fen"]
            if (
                await conn.fetchval(
                    _ADD_RELEASED, row["transfer_id"], row["released_fen"], cumulative
                )
                is None
            ):
                raise AssertionError(f"grant_out {row['transfer_id']} changed under its lock")
            await ledger.transfer(
                conn,
                debit_account_id=due_to,
                credit_account_id=personal,
                amount_fen=delta,
                purpose=PURPOSE_QUOTA_RELEASED,
            )
            returned += delta
            await audit_money(
                conn,
                at=now,
                action="grant.release",
                transfer_id=row["transfer_id"],
                side="giver",
                amount_fen=delta,
                peer=msg.from_node,
                release_id=release.release_id,
                released_fen=cumulative,
            )
            log.info("grant_released", transfer_id=row["transfer_id"], returned_fen=delta)
            await notices.quota_returned(conn, row["transfer_id"], delta, cumulative, now)
        reply = _release_reply(release, msg, now, None, None)
    else:
        code, text = problem
        await raise_alert(
            conn,
            Alert(kind=AlertKind.MODIFIED_REQUEST, detail=f"RELEASE {release.release_id}: {text}"),
            at=now,
            subject=f"release:{release.release_id}",
            node=ctx.node_id,
        )
        reply = _release_reply(release, msg, now, code, text)
    inserted = await conn.fetchval(
        _INSERT_RELEASE_IN,
        release.release_id,
        msg.from_node,
        release.relation_id,
        encode_body(release),
        msg.body_hash,
        encode_body(reply),
        returned,
        now,
    )
    if inserted is None:
        raise LostRace
    return reply


def _release_problem(
    release: Release, rows: dict[str, asyncpg.Record], peer: str
) -> tuple[ErrorCode, str] | None:
    for g in release.grants:
        row = rows.get(g.transfer_id)
        if row is None or row["to_node"] != peer or row["state"] != GiverState.COMMITTED:
            return ErrorCode.UNKNOWN_TRANSFER, f"no committed grant {g.transfer_id} to {peer}"
        if row["relation_id"] != release.relation_id or row["amount_fen"] != g.granted_fen:
            return ErrorCode.VALIDATION, f"grant {g.transfer_id} does not match our records"
    return None


def _release_reply(
    release: Release, msg: Incoming, now: dt.datetime, code: ErrorCode | None, text: str | None
) -> RelReply:
    return RelReply(
        relation_id=release.relation_id,
        ref_typ=MessageType.RELEASE,
        ref_hash=msg.body_hash,
        outcome="OK" if code is None else "REFUSED",
        error=None if code is None else ErrorBody.of(code, text),
        replied_at_ms=to_ms(now),
    )
