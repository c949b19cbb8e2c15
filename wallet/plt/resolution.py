"""An operator resolves a grant in doubt (`plt-node grants resolve`), audited, and never
against a signed decision.

The node that coordinates a grant (A, the giver's) is the only one that decides, and it
decides once (PROTOCOL b.6). A manual resolution therefore only ever does what the protocol
itself would do, with the operator's name and reason in the audit trail:

at the giver's node (A)
    abort   a PREPARED_A grant past its deadline: exactly the sweeper's presumed abort
            (DECISION=ABORT 3303 queued for B). Before the deadline B may still accept, so
            it is refused.
    commit  only the repair of PROTOCOL b.9.5: A lost its COMMIT (a failover to a replica
            that lacked it) and B hands back a receipt (`GET /app/v1/grants/{id}/receipt` at
            B) holding A's own signed PREPARE and COMMIT and B's signed ACCEPT. Every
            signature is checked against the pinned root keys, the hashes must chain to
            this grant's stored PREPARE; then the hold is posted and the same DECISION is
            sent again (B answers with its stored ACK).

at the receiver's node (B)
    either  only the decision A signed: fetched now from A (STATUS_REQ), or handed in as
            evidence (A's signed DECISION envelope, or a receipt). A presumed ABORT in A's
            signed STATUS (A has no row) allows `abort` while B holds no COMMIT.

Refused, with nothing changed: an outcome that contradicts the decision this node holds or
the one A signed (`rule: contradicts_signed_decision`), a commit at A without evidence
(`evidence_required`), evidence that does not verify (`evidence_invalid`), an abort at A
before the deadline (`before_deadline`), a grant A has not decided yet (`no_signed_decision`),
a grant that is not in doubt any more and agrees (`already_resolved`, reported, not an error).
"""

from __future__ import annotations

from typing import Literal

import asyncpg
import httpx
import msgspec
import structlog

from protocol import giver, receiver
from protocol.effects import Alert, AlertKind, PostHold, Send, StopRetries
from protocol.envelope import decode_envelope, encode_envelope
from protocol.errors import ProtocolError
from protocol.giver import GiverState, GiverTransfer
from protocol.ids import is_uuid7
from protocol.messages import (
    Accept,
    Decision,
    MessageType,
    Outcome,
    Status,
    StatusReq,
    body_hash,
    decode_body,
)
from protocol.receiver import ReceiverTransfer
from wallet import audit, metrics
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.plt import grants_giver, grants_receiver, receipts, transport
from wallet.plt.grants_base import grant_log_context, to_ms

log = structlog.get_logger("wallet.plt.resolution")

ResolveOutcome = Literal["commit", "abort"]
Side = Literal["giver", "receiver"]
REASON_CHARS_MIN = 5
EVIDENCE_BYTES_MAX = 256 * 1024

_GIVER_ROW = "SELECT state FROM grant_out WHERE transfer_id = $1"
_RECEIVER_ROWS = "SELECT from_node, state FROM grant_in WHERE transfer_id = $1"
_RECEIVER_STATE = "SELECT state FROM grant_in WHERE from_node = $1 AND transfer_id = $2"
_RECEIVER_ROW = """
SELECT state, vote_typ, vote_hash, decision_hash FROM grant_in
WHERE from_node = $1 AND transfer_id = $2
"""


class Resolution(msgspec.Struct, frozen=True):
    """What a manual resolution did (`changed` false: the grant already agreed)."""

    side: Side
    transfer_id: str
    peer: str
    state_before: str
    state_after: str
    changed: bool
    detail: str


def _refuse(rule: str, detail: str, **extra: object) -> WalletError:
    return WalletError(ErrorCode.STATE_CONFLICT, detail, rule=rule, **extra)


def _final_of(outcome: ResolveOutcome) -> str:
    return "COMMITTED" if outcome == "commit" else "ABORTED"


async def resolve(
    ctx: WalletContext,
    transfer_id: str,
    *,
    outcome: ResolveOutcome,
    reason: str,
    actor: str,
    evidence: bytes | None = None,
    side: Side | None = None,
    request_id: str | None = None,
) -> Resolution:
    """Resolve a grant in doubt at this node as the protocol would (module docstring)."""
    if outcome not in ("commit", "abort"):
        raise WalletError(ErrorCode.INVALID_REQUEST, "the outcome is `commit` or `abort`")
    if len(reason.strip()) < REASON_CHARS_MIN:
        raise WalletError(
            ErrorCode.INVALID_REQUEST, f"give a reason of at least {REASON_CHARS_MIN} characters"
        )
    if not actor.strip():
        raise WalletError(ErrorCode.INVALID_REQUEST, "name the operator (--actor)")
    if evidence is not None and len(evidence) > EVIDENCE_BYTES_MAX:
        raise WalletError(ErrorCode.INVALID_REQUEST, "the evidence file is too large")
    if not is_uuid7(transfer_id):
        raise WalletError(ErrorCode.NOT_FOUND, f"no grant {transfer_id} at this node")
    if ctx.plt is None:
        raise WalletError(ErrorCode.SERVICE_UNAVAILABLE, "this node has no PLT/1 keys")
    at_giver = await ctx.pool.fetchval(_GIVER_ROW, transfer_id) is not None
    at_receiver = await ctx.pool.fetch(_RECEIVER_ROWS, transfer_id)
    who = _Who(actor=actor.strip()[:64], reason=reason.strip()[:500], request_id=request_id)
    with grant_log_context(ctx.node_id, transfer_id):
        result = await _resolve(
            ctx, transfer_id, outcome, evidence, side, at_giver, at_receiver, who
        )
    metrics.COUNTERS.inc(
        metrics.RESOLUTIONS, side=result.side, outcome=outcome, changed=str(result.changed).lower()
    )
    log.info(
        "grant_resolved_by_operator",
        transfer_id=transfer_id,
        side=result.side,
        outcome=outcome,
        changed=result.changed,
        state=result.state_after,
        actor=who.actor,
    )
    return result


async def _resolve(
    ctx: WalletContext,
    transfer_id: str,
    outcome: ResolveOutcome,
    evidence: bytes | None,
    side: Side | None,
    at_giver: bool,
    at_receiver: list[asyncpg.Record],
    who: _Who,
) -> Resolution:
    if side != "receiver" and at_giver:
        result = await _at_giver(ctx, transfer_id, outcome, evidence, who)
    elif side != "giver" and len(at_receiver) == 1:
        result = await _at_receiver(
            ctx, at_receiver[0]["from_node"], transfer_id, outcome, evidence, who
        )
    elif side != "giver" and len(at_receiver) > 1:
        raise WalletError(
            ErrorCode.STATE_CONFLICT, f"two giver nodes used the id {transfer_id}; resolve by hand"
        )
    else:
        raise WalletError(
            ErrorCode.NOT_FOUND,
            f"no grant {transfer_id} at this node"
            + (" on that side" if side else "")
            + "; a grant row lost entirely (PROTOCOL b.9.5) is restored from backup, not here",
        )
    return result


class _Who(msgspec.Struct, frozen=True):
    actor: str
    reason: str
    request_id: str | None


async def _audit(
    conn: asyncpg.Connection,
    ctx: WalletContext,
    who: _Who,
    transfer_id: str,
    *,
    side: Side,
    outcome: ResolveOutcome,
    before: str,
    after: str,
    basis: str,
) -> None:
    await audit.record(
        conn,
        at=ctx.clock.now(),
        actor=who.actor,
        action="grant.resolve",
        subject=f"grant:{transfer_id}",
        request_id=who.request_id,
        side=side,
        outcome=outcome,
        reason=who.reason,
        state_before=before,
        state_after=after,
        basis=basis,
    )


# --- at the giver's node (A) -------------------------------------------------------------------


async def _at_giver(
    ctx: WalletContext,
    transfer_id: str,
    outcome: ResolveOutcome,
    evidence: bytes | None,
    who: _Who,
) -> Resolution:
    now = ctx.clock.now()
    now_ms = to_ms(now)
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await grants_giver.lock_grant(conn, transfer_id)
        assert row is not None
        old = grants_giver.machine(row)
        state = old.state
        if state is GiverState.REJECTED:
            raise _refuse(
                "already_resolved",
                f"grant {transfer_id} was rejected at instruction: nothing is held, nothing "
                "was sent",
                state=state.value,
            )
        if state in (GiverState.COMMITTED, GiverState.ABORTED):
            if state.value != _final_of(outcome):
                raise _refuse(
                    "contradicts_signed_decision",
                    f"grant {transfer_id} is {state.value} by the DECISION this node signed; "
                    f"--outcome {outcome} would contradict it",
                    state=state.value,
                )
            proof = (
                None
                if evidence is None or outcome != "commit"
                else _commit_proof(ctx, old, evidence)
            )
            if proof is not None and proof[1] != old.decision_hash:
                raise _refuse(
                    "evidence_invalid",
                    "the evidence holds another DECISION than the one this node stored",
                )
            await _audit(
                conn, ctx, who, transfer_id, side="giver", outcome=outcome,
                before=state.value, after=state.value, basis="already decided",
            )  # fmt: skip
            return Resolution(
                "giver",
                transfer_id,
                old.to_node,
                state.value,
                state.value,
                False,
                f"already {state.value} by this node's signed DECISION; the DECISION is "
                "retried until the receiver's node acknowledges it",
            )
        # PREPARED_A
        if outcome == "abort":
            if now_ms <= old.decide_by_ms:
                raise _refuse(
                    "before_deadline",
                    f"grant {transfer_id} is undecided until {row['decide_by'].isoformat()}: "
                    "the receiver may still accept; only the expiry abort after that is allowed",
                    decide_by=row["decide_by"].isoformat(),
                )
            new, effects = giver.step(old, giver.Sweep(now_ms=now_ms))
            basis = "deadline passed (the sweeper's presumed abort, 3303)"
        elif evidence is None:
            raise _refuse(
                "evidence_required",
                f"the giver's node commits {transfer_id} only on the receiver's ACCEPT before "
                "the deadline, or by repair from its own signed COMMIT: pass --evidence with "
                "the grant's receipt from the receiver's node",
            )
        else:
            new, effects = _repaired(old, *_commit_proof(ctx, old, evidence))
            basis = "repair from this node's own signed COMMIT (PROTOCOL b.9.5)"
        assert new is not None
        await grants_giver.apply_step(ctx, conn, row, old, new, effects, now, subject=transfer_id)
        await _audit(
            conn, ctx, who, transfer_id, side="giver", outcome=outcome,
            before=state.value, after=new.state.value, basis=basis,
        )  # fmt: skip
    return Resolution("giver", transfer_id, old.to_node, state.value, new.state.value, True, basis)


def _commit_proof(
    ctx: WalletContext, old: GiverTransfer, evidence: bytes
) -> tuple[Decision, str, Accept, str]:
    """A's own signed COMMIT and B's ACCEPT from a receipt, checked against this grant."""
    assert ctx.plt is not None
    try:
        receipt = msgspec.json.decode(evidence, type=receipts.Receipt)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _refuse(
            "evidence_invalid", f"the evidence is not a grant receipt (PLT/1 JSON): {exc}"
        ) from None
    directory = ctx.plt.directory
    roots = {ctx.node_id: (ctx.plt.keys.root.kid, ctx.plt.keys.root.public_b64)}
    try:
        peer = directory.peer(old.to_node)
        roots[peer.node] = (peer.root_kid, peer.root_pub)
    except ProtocolError:
        pass
    verdict = receipts.verify_receipt(receipt, roots)
    if not verdict.valid:
        raise _refuse(
            "evidence_invalid",
            "the receipt does not verify: " + "; ".join(verdict.problems),
            problems=list(verdict.problems),
        )
    if (verdict.giver_node, verdict.receiver_node, verdict.transfer_id) != (
        ctx.node_id,
        old.to_node,
        old.transfer_id,
    ):
        raise _refuse(
            "evidence_invalid",
            f"the receipt is for {verdict.transfer_id} from {verdict.giver_node} to "
            f"{verdict.receiver_node}, not for this grant",
        )
    bodies = {
        item.typ: decode_body(item.typ, decode_envelope(item.envelope).body)
        for item in receipt.envelopes
    }
    decision, accept = bodies[MessageType.DECISION], bodies[MessageType.ACCEPT]
    assert isinstance(decision, Decision) and isinstance(accept, Accept)
    if decision.prepare_hash != old.prepare_hash or decision.outcome is not Outcome.COMMIT:
        raise _refuse(
            "evidence_invalid", "the receipt's COMMIT is for another PREPARE than this grant's"
        )
    accept_hash = _hash_of(receipt, MessageType.ACCEPT)
    decision_hash = _hash_of(receipt, MessageType.DECISION)
    return decision, decision_hash, accept, accept_hash


def _hash_of(receipt: receipts.Receipt, typ: MessageType) -> str:
    item = next(e for e in receipt.envelopes if e.typ is typ)
    return body_hash(decode_envelope(item.envelope).body)


def _repaired(
    old: GiverTransfer, decision: Decision, decision_hash: str, accept: Accept, accept_hash: str
) -> giver.GiverStep:
    """PREPARED_A -> COMMITTED from this node's own signed COMMIT: what the lost step did."""
    new = msgspec.structs.replace(
        old,
        state=GiverState.COMMITTED,
        b_seen=True,
        vote=accept,
        vote_hash=accept_hash,
        decision=decision,
        decision_hash=decision_hash,
    )
    return new, (
        PostHold(amount_fen=old.amount_fen),
        StopRetries(typ=MessageType.PREPARE),
        Send(typ=MessageType.DECISION, to_node=old.to_node, body=decision),
        Alert(
            kind=AlertKind.REPAIRED,
            detail=f"re-applied COMMIT of {old.transfer_id} from signed evidence",
        ),
    )


# --- at the receiver's node (B) ----------------------------------------------------------------


async def _at_receiver(
    ctx: WalletContext,
    from_node: str,
    transfer_id: str,
    outcome: ResolveOutcome,
    evidence: bytes | None,
    who: _Who,
) -> Resolution:
    row = await ctx.pool.fetchrow(_RECEIVER_ROW, from_node, transfer_id)
    assert row is not None
    state: str = row["state"]
    if state in ("COMMITTED", "ABORTED", "DECLINED"):
        agrees = (state == "COMMITTED") == (outcome == "commit")
        if not agrees:
            raise _refuse(
                "contradicts_signed_decision",
                f"grant {transfer_id} is {state} at this node"
                + (" by the DECISION its giver's node signed" if state != "DECLINED" else "")
                + f"; --outcome {outcome} would contradict it",
                state=state,
            )
        async with ctx.pool.acquire() as conn, conn.transaction():
            await _audit(
                conn, ctx, who, transfer_id, side="receiver", outcome=outcome,
                before=state, after=state, basis="already decided",
            )  # fmt: skip
        return Resolution(
            "receiver", transfer_id, from_node, state, state, False, f"already {state}"
        )
    decision: Decision | None
    decision_hash: str | None
    if evidence is not None:
        decision, decision_hash, basis = await _decision_from_evidence(
            ctx, from_node, transfer_id, evidence
        )
        presumed = False
    else:
        decision, decision_hash, presumed = await _ask_giver_node(ctx, from_node, transfer_id)
        basis = (
            f"{from_node}'s signed STATUS: no such grant, presumed ABORT (PROTOCOL b.9.4)"
            if presumed
            else f"{from_node}'s signed DECISION, fetched now"
        )
    signed = "commit" if decision is not None and decision.outcome is Outcome.COMMIT else "abort"
    if signed != outcome:
        raise _refuse(
            "contradicts_signed_decision",
            f"{from_node} signed {signed.upper()} for {transfer_id}"
            + (" (presumed: it has no such grant)" if presumed else "")
            + f"; --outcome {outcome} would contradict it",
            signed=signed,
        )
    if outcome == "commit" and (
        row["vote_typ"] != "ACCEPT" or decision is None or decision.vote_hash != row["vote_hash"]
    ):
        raise _refuse(
            "contradicts_signed_decision",
            f"the COMMIT {from_node} signed does not answer this node's ACCEPT of {transfer_id}",
        )
    after: dict[str, str] = {}

    async def audited(
        conn: asyncpg.Connection, old: ReceiverTransfer | None, new: ReceiverTransfer | None
    ) -> None:
        before_state = state if old is None else old.state.value
        after["state"] = before_state if new is None else new.state.value
        await _audit(
            conn, ctx, who, transfer_id, side="receiver", outcome=outcome,
            before=before_state, after=after["state"], basis=basis,
        )  # fmt: skip

    if decision is not None and decision_hash is not None:
        await grants_receiver.apply_decision(
            ctx, from_node, decision, decision_hash, on_applied=audited
        )
    else:
        await grants_receiver.step_existing(
            ctx,
            from_node,
            transfer_id,
            receiver.PresumedAbort(now_ms=to_ms(ctx.clock.now())),
            on_applied=audited,
        )
    final = after.get("state", state)
    if final != _final_of(outcome):
        # The row moved under us (the resolver got there first): report what is true now.
        final = await ctx.pool.fetchval(_RECEIVER_STATE, from_node, transfer_id)
    return Resolution("receiver", transfer_id, from_node, state, str(final), final != state, basis)


async def _decision_from_evidence(
    ctx: WalletContext, from_node: str, transfer_id: str, evidence: bytes
) -> tuple[Decision, str, str]:
    """A's signed DECISION from a file: the envelope itself, or the one in a receipt."""
    raw = evidence
    try:
        receipt = msgspec.json.decode(evidence, type=receipts.Receipt)
    except (msgspec.DecodeError, msgspec.ValidationError):
        receipt = None
    if receipt is not None:
        found = [e.envelope for e in receipt.envelopes if e.typ is MessageType.DECISION]
        if not found:
            raise _refuse("evidence_invalid", "the receipt holds no DECISION")
        raw = found[0]
    try:
        raw = encode_envelope(decode_envelope(raw), "msgpack")
    except ProtocolError as exc:
        raise _refuse(
            "evidence_invalid", f"the evidence is not a PLT/1 envelope: {exc.message}"
        ) from None
    verified = await grants_receiver.verified_decision(ctx, from_node, transfer_id, raw)
    if isinstance(verified, str):
        raise _refuse("evidence_invalid", f"the evidence is not {from_node}'s DECISION: {verified}")
    decision, decision_hash = verified
    return decision, decision_hash, f"{from_node}'s signed DECISION, handed in as evidence"


async def _ask_giver_node(
    ctx: WalletContext, from_node: str, transfer_id: str
) -> tuple[Decision | None, str | None, bool]:
    """STATUS_REQ to A now: its signed decision, or a presumed abort; else a refusal."""
    try:
        answer = await transport.call(ctx, from_node, StatusReq(transfer_ids=(transfer_id,)))
    except (httpx.HTTPError, ProtocolError, RuntimeError) as exc:
        raise WalletError(
            ErrorCode.SERVICE_UNAVAILABLE,
            f"cannot reach {from_node} for its signed decision ({type(exc).__name__}); try "
            "again later, or pass --evidence with its signed DECISION",
            rule="giver_node_unreachable",
        ) from None
    status = answer.body
    item = None
    if isinstance(status, Status):
        item = next((i for i in status.items if i.transfer_id == transfer_id), None)
    if item is None:
        raise WalletError(
            ErrorCode.SERVICE_UNAVAILABLE, f"{from_node} did not answer about {transfer_id}"
        )
    if item.decision is not None:
        verified = await grants_receiver.verified_decision(
            ctx, from_node, transfer_id, item.decision
        )
        if isinstance(verified, str):
            raise _refuse("evidence_invalid", f"{from_node}'s DECISION does not verify: {verified}")
        return verified[0], verified[1], False
    if item.presumed and item.state == "ABORTED":
        return None, None, True
    remaining = item.undecided_remaining_ms
    raise _refuse(
        "no_signed_decision",
        f"{from_node} has not decided {transfer_id} yet ({item.state}"
        + (f", {remaining // 1000} s until its deadline" if remaining is not None else "")
        + "); it aborts by itself after its deadline",
        giver_state=item.state,
    )
