"""The giver node A's state machine, one per `transfer_id` (PROTOCOL b.6, first table).

A coordinates: it commits if and only if it records B's ACCEPT before its own deadline
`decide_by_ms`, on its own clock; otherwise it aborts (presumed abort). Pure: time comes
in the events, effects go out (see `protocol.effects`), nothing is read or written here.

    —           Instruct (checks pass)      -> PREPARED_A  HoldGiver, Send PREPARE
    —           Instruct (a check fails)    -> REJECTED    nothing held, nothing sent
    PREPARED_A  RECEIVED                    -> PREPARED_A  b_seen, StopRetries PREPARE
    PREPARED_A  DECLINE                     -> ABORTED     VoidHold, DECISION=ABORT
    PREPARED_A  ACCEPT, now <= decide_by    -> COMMITTED   PostHold, DECISION=COMMIT
    PREPARED_A  ACCEPT, now >  decide_by    -> ABORTED     VoidHold, DECISION=ABORT 3303
    PREPARED_A  Sweep,  now >  decide_by    -> ABORTED     VoidHold, DECISION=ABORT 3303
    decided     ACK (decision hash matches) -> same, acked StopRetries DECISION
    decided     same ACCEPT/DECLINE again   -> unchanged   Reply stored DECISION
    any         vote for another PREPARE,
                or a second, different vote -> unchanged   ERROR 3106, Alert

"Decided" is COMMITTED or ABORTED. A DECISION goes out both as the Reply to the vote that
caused it and through the outbox, which retries until the ACK.
"""

from enum import StrEnum

import msgspec

from protocol.clock import window_id
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
    error_reply,
)
from protocol.errors import ErrorCode
from protocol.messages import (
    Accept,
    Ack,
    Decision,
    Decline,
    ErrorBody,
    MessageType,
    Outcome,
    Prepare,
    Received,
    TransferState,
    differing_fields,
    hash_body,
)


class GiverState(StrEnum):
    """States of a transfer at the giver's node."""

    PREPARED_A = "PREPARED_A"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    REJECTED = "REJECTED"


DECIDED = frozenset({GiverState.COMMITTED, GiverState.ABORTED})
# Fields A fills in itself; a client retry may legitimately produce other values for them.
_NODE_MADE_FIELDS = frozenset({"a_hold_id", "window_id", "accept_within_ms", "user_auth"})


class GiverTransfer(msgspec.Struct, frozen=True, kw_only=True):
    """Everything A stores about one outgoing transfer (one row of `xfer_out`)."""

    transfer_id: str
    to_node: str
    state: GiverState
    request_hash: str  # hash of the client's instruction, for client-side dedup (b.8)
    prepare: Prepare
    prepare_hash: str
    decide_by_ms: int
    created_at_ms: int
    reject_code: ErrorCode | None = None
    b_seen: bool = False
    vote: Accept | Decline | None = None
    vote_hash: str | None = None
    decision: Decision | None = None
    decision_hash: str | None = None
    acked: bool = False

    @property
    def amount_fen(self) -> int:
        """The grant amount."""
        return self.prepare.amount_fen


# --- events ------------------------------------------------------------------------------


class Instruct(msgspec.Struct, frozen=True, kw_only=True):
    """The giver's confirmed instruction, as a PREPARE body A has built for it.

    `rejection` is the result of A's checks (balance, limits D1-D4, relation, blackout),
    None when they pass. The caller runs them, including the guarded hold, in the same
    transaction; if the hold UPDATE finds 0 rows it rolls back and steps again with 4000.
    """

    prepare: Prepare
    request_hash: str
    to_node: str
    decide_by_ms: int
    now_ms: int
    rejection: ErrorCode | None = None


class MessageArrived(msgspec.Struct, frozen=True, kw_only=True):
    """A verified message from B about this transfer; `body_hash` is over the bytes received."""

    body: Received | Decline | Accept | Ack
    body_hash: str
    now_ms: int


class Sweep(msgspec.Struct, frozen=True, kw_only=True):
    """The expiry sweeper looks at this transfer."""

    now_ms: int


class StatusQuery(msgspec.Struct, frozen=True, kw_only=True):
    """A peer asked for this transfer's state (STATUS_REQ)."""

    transfer_id: str
    now_ms: int


class Repair(msgspec.Struct, frozen=True, kw_only=True):
    """Audited repair after data loss (b.9.5): B returned A's own signed PREPARE and COMMIT.

    The caller has verified both signatures as A's own before stepping.
    """

    prepare: Prepare
    decision: Decision
    to_node: str
    now_ms: int


GiverEvent = Instruct | MessageArrived | Sweep | StatusQuery | Repair
GiverStep = tuple[GiverTransfer | None, tuple[Effect, ...]]


def step(state: GiverTransfer | None, event: GiverEvent) -> GiverStep:
    """Apply one event to A's transfer state; return the new state and the effects."""
    match event:
        case Instruct():
            return _instruct(state, event)
        case MessageArrived(body=Received()):
            return _received(state, event)
        case MessageArrived(body=Accept() | Decline()):
            return _vote(state, event)
        case MessageArrived(body=Ack()):
            return _ack(state, event)
        case Sweep():
            return _sweep(state, event)
        case StatusQuery():
            return state, (_status(state, event), *_presumed_alert(state, event))
        case Repair():
            return _repair(state, event)
    raise TypeError(f"not a giver event: {event!r}")


# --- transitions -------------------------------------------------------------------------


def _instruct(state: GiverTransfer | None, ev: Instruct) -> GiverStep:
    if state is not None:
        if state.request_hash == ev.request_hash:
            return state, ()  # the client's retry: it reads the current state
        differs = [
            f
            for f in differing_fields(state.prepare, ev.prepare)
            if f.split(".")[0] not in _NODE_MADE_FIELDS
        ]
        if state.to_node != ev.to_node:
            differs.insert(0, "to_node")
        return state, (
            error_reply(
                MessageType.PREPARE,
                ev.request_hash,
                state.transfer_id,
                ErrorCode.MODIFIED_REQUEST,
                differs=tuple(differs),
            ),
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"instruction {state.transfer_id}: {differs}",
            ),
        )
    prepare = ev.prepare
    new = GiverTransfer(
        transfer_id=prepare.transfer_id,
        to_node=ev.to_node,
        state=GiverState.PREPARED_A,
        request_hash=ev.request_hash,
        prepare=prepare,
        prepare_hash=hash_body(prepare),
        decide_by_ms=ev.decide_by_ms,
        created_at_ms=ev.now_ms,
    )
    if ev.rejection is not None:
        return msgspec.structs.replace(new, state=GiverState.REJECTED, reject_code=ev.rejection), ()
    if ev.decide_by_ms <= ev.now_ms or prepare.accept_within_ms != ev.decide_by_ms - ev.now_ms:
        raise ValueError("PREPARE.accept_within_ms must be decide_by_ms - now_ms, in the future")
    return new, (
        HoldGiver(amount_fen=prepare.amount_fen),
        Send(typ=MessageType.PREPARE, to_node=ev.to_node, body=prepare),
    )


def _received(state: GiverTransfer | None, ev: MessageArrived) -> GiverStep:
    body = ev.body
    assert isinstance(body, Received)
    if state is None or state.state is GiverState.REJECTED:
        return state, (
            Alert(kind=AlertKind.UNKNOWN_TRANSFER, detail=f"RECEIVED for {body.transfer_id}"),
        )
    if body.prepare_hash != state.prepare_hash:
        return state, (
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"RECEIVED for another PREPARE of {state.transfer_id}",
            ),
        )
    if state.state is not GiverState.PREPARED_A or state.b_seen:
        return state, ()
    return msgspec.structs.replace(state, b_seen=True), (
        StoreEvidence(typ=MessageType.RECEIVED, body_hash=ev.body_hash),
        StopRetries(typ=MessageType.PREPARE),
    )


def _vote(state: GiverTransfer | None, ev: MessageArrived) -> GiverStep:
    vote = ev.body
    assert isinstance(vote, Accept | Decline)
    typ = MessageType.ACCEPT if isinstance(vote, Accept) else MessageType.DECLINE
    if state is None or state.state is GiverState.REJECTED:
        return state, (
            error_reply(typ, ev.body_hash, vote.transfer_id, ErrorCode.UNKNOWN_TRANSFER),
            Alert(kind=AlertKind.UNKNOWN_TRANSFER, detail=f"{typ} for {vote.transfer_id}"),
        )
    if vote.prepare_hash != state.prepare_hash:
        return _modified(state, typ, ev.body_hash, ["prepare_hash"])
    if state.vote is not None and state.vote_hash != ev.body_hash:
        return _modified(state, typ, ev.body_hash, differing_fields(state.vote, vote))
    if state.state in DECIDED:
        # A duplicate, or a first vote that arrives after the sweeper aborted: the answer is
        # the stored decision; a late vote is kept as evidence.
        assert state.decision is not None
        reply = Reply(typ=MessageType.DECISION, body=state.decision)
        if state.vote is not None:
            return state, (reply,)
        stored = msgspec.structs.replace(state, vote=vote, vote_hash=ev.body_hash)
        return stored, (StoreEvidence(typ=typ, body_hash=ev.body_hash), reply)
    voted = msgspec.structs.replace(state, vote=vote, vote_hash=ev.body_hash)
    evidence = StoreEvidence(typ=typ, body_hash=ev.body_hash)
    if isinstance(vote, Decline):
        new, effects = _decide(voted, Outcome.ABORT, vote.error, ev.now_ms)
    elif ev.now_ms <= state.decide_by_ms:
        new, effects = _decide(voted, Outcome.COMMIT, None, ev.now_ms)
    else:
        new, effects = _decide(voted, Outcome.ABORT, _expired(state), ev.now_ms)
    assert new.decision is not None
    return new, (evidence, *effects, Reply(typ=MessageType.DECISION, body=new.decision))


def _ack(state: GiverTransfer | None, ev: MessageArrived) -> GiverStep:
    ack = ev.body
    assert isinstance(ack, Ack)
    if state is None or state.state not in DECIDED:
        return state, (
            Alert(kind=AlertKind.UNKNOWN_TRANSFER, detail=f"ACK for undecided {ack.transfer_id}"),
        )
    if ack.decision_hash != state.decision_hash:
        return state, (
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"ACK for another DECISION of {state.transfer_id}",
            ),
        )
    if state.acked:
        return state, ()
    return msgspec.structs.replace(state, acked=True), (
        StoreEvidence(typ=MessageType.ACK, body_hash=ev.body_hash),
        StopRetries(typ=MessageType.DECISION),
    )


def _sweep(state: GiverTransfer | None, ev: Sweep) -> GiverStep:
    if state is None or state.state is not GiverState.PREPARED_A or ev.now_ms <= state.decide_by_ms:
        return state, ()
    return _decide(state, Outcome.ABORT, _expired(state), ev.now_ms)


def _status(state: GiverTransfer | None, ev: StatusQuery) -> ReportStatus:
    if state is None:
        # A writes its row before PREPARE leaves, so no row means no hold: presumed abort.
        return ReportStatus(transfer_id=ev.transfer_id, state="ABORTED", presumed=True)
    if state.state is GiverState.REJECTED:
        return ReportStatus(transfer_id=ev.transfer_id, state="REJECTED", presumed=True)
    if state.state is GiverState.PREPARED_A:
        remaining = max(0, state.decide_by_ms - ev.now_ms)
        return ReportStatus(
            transfer_id=ev.transfer_id, state="PREPARED_A", undecided_remaining_ms=remaining
        )
    final: TransferState = "COMMITTED" if state.state is GiverState.COMMITTED else "ABORTED"
    return ReportStatus(transfer_id=ev.transfer_id, state=final, decision=state.decision)


def _presumed_alert(state: GiverTransfer | None, ev: StatusQuery) -> tuple[Effect, ...]:
    if state is not None:
        return ()
    return (
        Alert(
            kind=AlertKind.PRESUMED_ABORT,
            detail=f"STATUS for {ev.transfer_id}: no row, presumed ABORT",
        ),
    )


def _repair(state: GiverTransfer | None, ev: Repair) -> GiverStep:
    decision, prepare = ev.decision, ev.prepare
    if decision.outcome is not Outcome.COMMIT or decision.prepare_hash != hash_body(prepare):
        raise ValueError("repair needs A's COMMIT for exactly this PREPARE")
    if state is not None:
        if state.decision == decision:
            return state, ()
        return state, (
            Alert(
                kind=AlertKind.EQUIVOCATION,
                detail=f"repair evidence for {state.transfer_id} contradicts our row",
            ),
        )
    new = GiverTransfer(
        transfer_id=prepare.transfer_id,
        to_node=ev.to_node,
        state=GiverState.COMMITTED,
        request_hash="",
        prepare=prepare,
        prepare_hash=decision.prepare_hash,
        decide_by_ms=ev.now_ms,
        created_at_ms=ev.now_ms,
        b_seen=True,
        vote_hash=decision.vote_hash,
        decision=decision,
        decision_hash=hash_body(decision),
        acked=True,  # B holds the decision already: it is where the evidence came from
    )
    return new, (
        HoldGiver(amount_fen=prepare.amount_fen),
        PostHold(amount_fen=prepare.amount_fen),
        Alert(
            kind=AlertKind.REPAIRED,
            detail=f"re-applied COMMIT of {prepare.transfer_id} from signed evidence",
        ),
    )


# --- helpers -----------------------------------------------------------------------------


def _expired(state: GiverTransfer) -> ErrorBody:
    return ErrorBody.of(ErrorCode.EXPIRED, f"not accepted before {state.decide_by_ms}")


def _decide(
    state: GiverTransfer, outcome: Outcome, reason: ErrorBody | None, now_ms: int
) -> tuple[GiverTransfer, tuple[Effect, ...]]:
    """COMMIT or ABORT, durably, in this step: the commit point of the protocol."""
    decision = Decision(
        transfer_id=state.transfer_id,
        prepare_hash=state.prepare_hash,
        vote_hash=state.vote_hash,
        outcome=outcome,
        reason=reason,
        decided_at_ms=now_ms,
        window_id=window_id(now_ms),
    )
    committed = outcome is Outcome.COMMIT
    new = msgspec.structs.replace(
        state,
        state=GiverState.COMMITTED if committed else GiverState.ABORTED,
        decision=decision,
        decision_hash=hash_body(decision),
    )
    ledger: Effect = (
        PostHold(amount_fen=state.amount_fen)
        if committed
        else VoidHold(amount_fen=state.amount_fen)
    )
    return new, (
        ledger,
        StopRetries(typ=MessageType.PREPARE),
        Send(typ=MessageType.DECISION, to_node=state.to_node, body=decision),
        NotifyGiver(state=new.state.value),
    )


def _modified(
    state: GiverTransfer, typ: MessageType, body_hash: str, differs: list[str]
) -> GiverStep:
    return state, (
        error_reply(
            typ, body_hash, state.transfer_id, ErrorCode.MODIFIED_REQUEST, differs=tuple(differs)
        ),
        Alert(
            kind=AlertKind.MODIFIED_REQUEST,
            detail=f"{typ} for {state.transfer_id} differs: {differs}",
        ),
    )
