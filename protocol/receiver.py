"""The receiver node B's state machine, one per (`from_node`, `transfer_id`) (PROTOCOL b.6).

B participates: after RECEIVED it holds an unspendable quota, and it never posts or voids
on its own. Only a DECISION from A (or A's presumed ABORT in a signed STATUS, while B holds
no COMMIT) resolves a hold. Pure: time comes in the events, effects go out.

    —                 PREPARE, checks pass        -> PENDING_ACCEPT   HoldQuota, Reply RECEIVED
    —                 PREPARE, a check fails      -> DECLINED         Reply DECLINE (tombstone)
    —                 DECISION=ABORT              -> ABORTED          tombstone, Reply ACK
    ABORTED tombstone PREPARE (late)              -> ABORTED          Reply DECLINE 3303
    PENDING_ACCEPT    receiver accepts (in time)  -> ACCEPTED         Send ACCEPT (binding)
    PENDING_ACCEPT    receiver declines           -> DECLINED_PENDING Send DECLINE, keep hold
    PENDING_ACCEPT    relationship ended          -> DECLINED_PENDING Send DECLINE 4300
    ACCEPTED          COMMIT, vote_hash = ACCEPT  -> COMMITTED        PostHold, Reply ACK
    in doubt          DECISION=ABORT              -> ABORTED          VoidHold, Reply ACK
    DECLINED          DECISION=ABORT              -> DECLINED         Reply ACK
    decided           the same DECISION again     -> unchanged        Reply stored ACK
    decided           the opposite DECISION       -> unchanged        keep both, FreezePeer,
                                                                      Alert EQUIVOCATION, ERROR 3106
    other             COMMIT without our ACCEPT   -> unchanged        ERROR 3208, Alert
    any               PREPARE, same hash          -> unchanged        Reply the stored reply
    any               PREPARE, other hash         -> unchanged        ERROR 3106 + differs, Alert
    in doubt          resolver tick, overdue      -> unchanged        QueryPeer (STATUS_REQ)

"In doubt" is PENDING_ACCEPT, ACCEPTED or DECLINED_PENDING: a hold waits for A.
"""

from enum import StrEnum

import msgspec

from protocol.clock import ACCEPT_MARGIN_MS, IN_DOUBT_PAGE_MS, RESOLVER_GRACE_MS, accept_deadline_ms
from protocol.effects import (
    Alert,
    AlertKind,
    Effect,
    FreezePeer,
    HoldQuota,
    NotifyReceiver,
    PostHold,
    QueryPeer,
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
    Acceptance,
    Ack,
    Decision,
    Decline,
    ErrorBody,
    MessageType,
    Outcome,
    Prepare,
    Received,
    StatusItem,
    TransferState,
    differing_fields,
    hash_body,
)


class ReceiverState(StrEnum):
    """States of a transfer at the receiver's node (no row is the state 'none')."""

    PENDING_ACCEPT = "PENDING_ACCEPT"
    ACCEPTED = "ACCEPTED"
    DECLINED_PENDING = "DECLINED_PENDING"
    DECLINED = "DECLINED"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


IN_DOUBT = frozenset(
    {ReceiverState.PENDING_ACCEPT, ReceiverState.ACCEPTED, ReceiverState.DECLINED_PENDING}
)
_WIRE_STATE: dict[ReceiverState, TransferState] = {
    ReceiverState.PENDING_ACCEPT: "PENDING_ACCEPT",
    ReceiverState.ACCEPTED: "ACCEPTED",
    ReceiverState.DECLINED_PENDING: "DECLINED_PENDING",
    ReceiverState.DECLINED: "DECLINED",
    ReceiverState.COMMITTED: "COMMITTED",
    ReceiverState.ABORTED: "ABORTED",
}


class ReceiverTransfer(msgspec.Struct, frozen=True, kw_only=True):
    """Everything B stores about one incoming transfer (one row of `xfer_in`).

    An ABORT tombstone has no `prepare` until a late PREPARE shows up.
    """

    from_node: str
    transfer_id: str
    state: ReceiverState
    received_at_ms: int
    prepare: Prepare | None = None
    prepare_hash: str | None = None
    prepare_reply: Received | Decline | None = None
    vote: Accept | Decline | None = None
    vote_hash: str | None = None
    decision: Decision | None = None
    decision_hash: str | None = None
    ack: Ack | None = None
    conflicting: tuple[Decision, ...] = ()  # equivocation evidence, kept forever
    presumed_abort: bool = False

    @property
    def amount_fen(self) -> int:
        """The held amount (0 for a tombstone)."""
        return self.prepare.amount_fen if self.prepare is not None else 0


# --- events ------------------------------------------------------------------------------


class PrepareArrived(msgspec.Struct, frozen=True, kw_only=True):
    """A verified PREPARE. `rejection` is the result of B's checks (wallet open C3, status,
    relationship confirmed, limits, exposure cap), None when they pass."""

    from_node: str
    prepare: Prepare
    prepare_hash: str
    b_hold_id: str
    now_ms: int
    rejection: ErrorCode | None = None


class DecisionArrived(msgspec.Struct, frozen=True, kw_only=True):
    """A verified DECISION from A, as a request, as the reply to ACCEPT, or inside a STATUS."""

    from_node: str
    decision: Decision
    decision_hash: str
    now_ms: int


class ReceiverAccepts(msgspec.Struct, frozen=True, kw_only=True):
    """The receiver confirmed acceptance in the app (face or PIN)."""

    acceptance: Acceptance
    now_ms: int
    margin_ms: int = ACCEPT_MARGIN_MS


class ReceiverDeclines(msgspec.Struct, frozen=True, kw_only=True):
    """The receiver refused the grant in the app."""

    now_ms: int


class RelationEnded(msgspec.Struct, frozen=True, kw_only=True):
    """The relationship the grant is under ended (RULES 6-7)."""

    now_ms: int


class ResolverTick(msgspec.Struct, frozen=True, kw_only=True):
    """B's in-doubt resolver looks at this transfer."""

    now_ms: int
    grace_ms: int = RESOLVER_GRACE_MS
    page_after_ms: int = IN_DOUBT_PAGE_MS


class PresumedAbort(msgspec.Struct, frozen=True, kw_only=True):
    """A's signed STATUS says it has no row for this id: ABORT by presumption (b.9.4)."""

    now_ms: int


class StatusQuery(msgspec.Struct, frozen=True, kw_only=True):
    """A peer asked for this transfer's state."""

    transfer_id: str
    now_ms: int


ReceiverEvent = (
    PrepareArrived
    | DecisionArrived
    | ReceiverAccepts
    | ReceiverDeclines
    | RelationEnded
    | ResolverTick
    | PresumedAbort
    | StatusQuery
)
ReceiverStep = tuple[ReceiverTransfer | None, tuple[Effect, ...]]


def step(state: ReceiverTransfer | None, event: ReceiverEvent) -> ReceiverStep:
    """Apply one event to B's transfer state; return the new state and the effects."""
    match event:
        case PrepareArrived():
            return _prepare(state, event)
        case DecisionArrived():
            return _decision(state, event)
        case ReceiverAccepts():
            return _accepts(state, event)
        case ReceiverDeclines():
            return _refuse(
                state, ErrorBody.of(ErrorCode.RECEIVER_DECLINED), event.now_ms, from_app=True
            )
        case RelationEnded():
            error = ErrorBody.of(ErrorCode.GIVER_PERMISSION, "relationship ended")
            return _refuse(state, error, event.now_ms, from_app=False)
        case ResolverTick():
            return state, _resolve(state, event)
        case PresumedAbort():
            return _presumed_abort(state, event)
        case StatusQuery():
            return state, (_status(state, event),)
    raise TypeError(f"not a receiver event: {event!r}")


def event_for_status(
    from_node: str,
    item: StatusItem,
    decision: Decision | None,
    decision_hash: str | None,
    now_ms: int,
) -> DecisionArrived | PresumedAbort | None:
    """The event a STATUS item from A means for B.

    `decision` is the body of the DECISION envelope in `item.decision`, already verified
    as signed by `from_node` and addressed to us. Returns None when there is nothing to apply.
    """
    if decision is not None and decision_hash is not None:
        return DecisionArrived(
            from_node=from_node, decision=decision, decision_hash=decision_hash, now_ms=now_ms
        )
    if item.presumed:
        return PresumedAbort(now_ms=now_ms)
    return None


# --- transitions -------------------------------------------------------------------------


def _prepare(state: ReceiverTransfer | None, ev: PrepareArrived) -> ReceiverStep:
    prepare = ev.prepare
    tid = prepare.transfer_id
    if state is not None and state.prepare is not None:
        if state.prepare_hash == ev.prepare_hash:
            assert state.prepare_reply is not None
            typ = (
                MessageType.RECEIVED
                if isinstance(state.prepare_reply, Received)
                else MessageType.DECLINE
            )
            return state, (Reply(typ=typ, body=state.prepare_reply),)
        differs = differing_fields(state.prepare, prepare)
        return state, (
            error_reply(
                MessageType.PREPARE,
                ev.prepare_hash,
                tid,
                ErrorCode.MODIFIED_REQUEST,
                differs=tuple(differs),
            ),
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"PREPARE {tid} from {ev.from_node} differs: {differs}",
            ),
        )
    if state is not None:
        # An ABORT tombstone: the PREPARE came after A's ABORT (reordering, PROTOCOL d.7).
        if state.decision is not None and state.decision.prepare_hash != ev.prepare_hash:
            return state, (
                error_reply(
                    MessageType.PREPARE,
                    ev.prepare_hash,
                    tid,
                    ErrorCode.MODIFIED_REQUEST,
                    differs=("prepare_hash",),
                ),
                Alert(
                    kind=AlertKind.MODIFIED_REQUEST,
                    detail=f"PREPARE {tid} does not match the ABORT we hold",
                ),
            )
        decline = _decline(
            prepare, ev.prepare_hash, ErrorBody.of(ErrorCode.EXPIRED, "already aborted")
        )
        late = msgspec.structs.replace(
            state, prepare=prepare, prepare_hash=ev.prepare_hash, prepare_reply=decline
        )
        return late, (
            StoreEvidence(typ=MessageType.PREPARE, body_hash=ev.prepare_hash),
            Reply(typ=MessageType.DECLINE, body=decline),
        )
    row = ReceiverTransfer(
        from_node=ev.from_node,
        transfer_id=tid,
        state=ReceiverState.PENDING_ACCEPT,
        received_at_ms=ev.now_ms,
        prepare=prepare,
        prepare_hash=ev.prepare_hash,
    )
    evidence = StoreEvidence(typ=MessageType.PREPARE, body_hash=ev.prepare_hash)
    if ev.rejection is not None:
        decline = _decline(prepare, ev.prepare_hash, ErrorBody.of(ev.rejection))
        declined = msgspec.structs.replace(row, state=ReceiverState.DECLINED, prepare_reply=decline)
        return declined, (evidence, Reply(typ=MessageType.DECLINE, body=decline))
    received = Received(
        transfer_id=tid,
        prepare_hash=ev.prepare_hash,
        b_hold_id=ev.b_hold_id,
        b_received_at_ms=ev.now_ms,
    )
    return msgspec.structs.replace(row, prepare_reply=received), (
        evidence,
        HoldQuota(amount_fen=prepare.amount_fen),
        Reply(typ=MessageType.RECEIVED, body=received),
        NotifyReceiver(kind="GRANT_OFFERED"),
    )


def _decision(state: ReceiverTransfer | None, ev: DecisionArrived) -> ReceiverStep:
    d = ev.decision
    commit = d.outcome is Outcome.COMMIT
    if state is None:
        if commit:
            return None, _unknown_commit(ev, "no such transfer")
        return _tombstone(ev)
    if state.prepare_hash is not None and d.prepare_hash != state.prepare_hash:
        return state, (
            error_reply(
                MessageType.DECISION,
                ev.decision_hash,
                d.transfer_id,
                ErrorCode.MODIFIED_REQUEST,
                differs=("prepare_hash",),
            ),
            Alert(
                kind=AlertKind.MODIFIED_REQUEST,
                detail=f"DECISION {d.transfer_id} is for another PREPARE",
            ),
        )
    if state.decision is not None or state.presumed_abort:
        return _decided_again(state, ev)
    if commit:
        if state.state is not ReceiverState.ACCEPTED or d.vote_hash != state.vote_hash:
            return state, _unknown_commit(ev, f"we are {state.state} and hold no matching ACCEPT")
        return _finish(
            state,
            ev,
            ReceiverState.COMMITTED,
            PostHold(amount_fen=state.amount_fen),
            "GRANT_COMMITTED",
        )
    if state.state in IN_DOUBT:
        return _finish(
            state,
            ev,
            ReceiverState.ABORTED,
            VoidHold(amount_fen=state.amount_fen),
            "GRANT_RETURNED",
        )
    # DECLINED at PREPARE: nothing was held; record A's ABORT and acknowledge it.
    return _finish(state, ev, state.state, None, None)


def _accepts(state: ReceiverTransfer | None, ev: ReceiverAccepts) -> ReceiverStep:
    if state is None:
        return None, (error_reply(None, None, None, ErrorCode.UNKNOWN_TRANSFER),)
    if state.state is ReceiverState.ACCEPTED:
        return state, ()
    if state.state is not ReceiverState.PENDING_ACCEPT:
        return state, (
            error_reply(
                None,
                None,
                state.transfer_id,
                ErrorCode.VALIDATION,
                f"grant is {state.state}, not awaiting acceptance",
            ),
        )
    assert state.prepare is not None and state.prepare_hash is not None
    assert isinstance(state.prepare_reply, Received)
    if ev.now_ms > accept_deadline_ms(
        state.received_at_ms, state.prepare.accept_within_ms, ev.margin_ms
    ):
        # UI only: A's clock decides; this just avoids "accepted, then expired".
        return state, (
            error_reply(
                None, None, state.transfer_id, ErrorCode.EXPIRED, "acceptance period is over"
            ),
        )
    accept = Accept(
        transfer_id=state.transfer_id,
        prepare_hash=state.prepare_hash,
        b_hold_id=state.prepare_reply.b_hold_id,
        accepted_at_ms=ev.now_ms,
        acceptance=ev.acceptance,
    )
    accepted = msgspec.structs.replace(
        state, state=ReceiverState.ACCEPTED, vote=accept, vote_hash=hash_body(accept)
    )
    return accepted, (Send(typ=MessageType.ACCEPT, to_node=state.from_node, body=accept),)


def _refuse(
    state: ReceiverTransfer | None, error: ErrorBody, now_ms: int, *, from_app: bool
) -> ReceiverStep:
    if state is None:
        return None, (
            (error_reply(None, None, None, ErrorCode.UNKNOWN_TRANSFER),) if from_app else ()
        )
    if state.state is not ReceiverState.PENDING_ACCEPT:
        # Declining twice is a no-op; after ACCEPT the vote is binding and waits for A.
        if not from_app or state.state is ReceiverState.DECLINED_PENDING:
            return state, ()
        return state, (
            error_reply(
                None,
                None,
                state.transfer_id,
                ErrorCode.VALIDATION,
                f"grant is {state.state}, not awaiting acceptance",
            ),
        )
    assert state.prepare is not None and state.prepare_hash is not None
    decline = _decline(state.prepare, state.prepare_hash, error)
    declined = msgspec.structs.replace(
        state, state=ReceiverState.DECLINED_PENDING, vote=decline, vote_hash=hash_body(decline)
    )
    return declined, (Send(typ=MessageType.DECLINE, to_node=state.from_node, body=decline),)


def _resolve(state: ReceiverTransfer | None, ev: ResolverTick) -> tuple[Effect, ...]:
    if state is None or state.state not in IN_DOUBT:
        return ()
    assert state.prepare is not None
    due_ms = state.received_at_ms + state.prepare.accept_within_ms
    if ev.now_ms < due_ms + ev.grace_ms:
        return ()
    effects: list[Effect] = [QueryPeer(to_node=state.from_node, transfer_id=state.transfer_id)]
    if ev.now_ms >= due_ms + ev.page_after_ms:
        effects.append(
            Alert(
                kind=AlertKind.IN_DOUBT,
                detail=f"{state.transfer_id} from {state.from_node} undecided",
            )
        )
    return tuple(effects)


def _presumed_abort(state: ReceiverTransfer | None, ev: PresumedAbort) -> ReceiverStep:
    if state is None:
        return None, ()
    if state.state is ReceiverState.COMMITTED:
        # We hold A's signed COMMIT; A lost it. Never void: A repairs from our evidence.
        return state, (
            Alert(
                kind=AlertKind.PEER_LOST_COMMIT,
                detail=f"{state.from_node} has no row for committed {state.transfer_id}",
            ),
        )
    if state.state not in IN_DOUBT:
        return state, ()
    aborted = msgspec.structs.replace(state, state=ReceiverState.ABORTED, presumed_abort=True)
    return aborted, (
        VoidHold(amount_fen=state.amount_fen),
        *_stop_vote_retries(state),
        Alert(
            kind=AlertKind.PRESUMED_ABORT,
            detail=f"{state.from_node} presumes ABORT for {state.transfer_id}",
        ),
        NotifyReceiver(kind="GRANT_RETURNED"),
    )


def _status(state: ReceiverTransfer | None, ev: StatusQuery) -> ReportStatus:
    if state is None:
        return ReportStatus(transfer_id=ev.transfer_id, state="UNKNOWN")
    return ReportStatus(
        transfer_id=ev.transfer_id, state=_WIRE_STATE[state.state], decision=state.decision
    )


# --- helpers -----------------------------------------------------------------------------


def _decline(prepare: Prepare, prepare_hash: str, error: ErrorBody) -> Decline:
    return Decline(transfer_id=prepare.transfer_id, prepare_hash=prepare_hash, error=error)


def _ack(ev: DecisionArrived, final: ReceiverState) -> Ack:
    return Ack(
        transfer_id=ev.decision.transfer_id,
        decision_hash=ev.decision_hash,
        final_state="COMMITTED" if final is ReceiverState.COMMITTED else "ABORTED",
        completed_at_ms=ev.now_ms,
    )


def _stop_vote_retries(state: ReceiverTransfer) -> tuple[Effect, ...]:
    if state.vote is None:
        return ()
    return (
        StopRetries(
            typ=MessageType.ACCEPT if isinstance(state.vote, Accept) else MessageType.DECLINE
        ),
    )


def _finish(
    state: ReceiverTransfer,
    ev: DecisionArrived,
    final: ReceiverState,
    ledger: Effect | None,
    notify: str | None,
) -> ReceiverStep:
    ack = _ack(ev, final)
    new = msgspec.structs.replace(
        state, state=final, decision=ev.decision, decision_hash=ev.decision_hash, ack=ack
    )
    effects: list[Effect] = [StoreEvidence(typ=MessageType.DECISION, body_hash=ev.decision_hash)]
    if ledger is not None:
        effects.append(ledger)
    effects.extend(_stop_vote_retries(state))
    effects.append(Reply(typ=MessageType.ACK, body=ack))
    if notify is not None:
        effects.append(NotifyReceiver(kind=notify))
    return new, tuple(effects)


def _tombstone(ev: DecisionArrived) -> ReceiverStep:
    ack = _ack(ev, ReceiverState.ABORTED)
    row = ReceiverTransfer(
        from_node=ev.from_node,
        transfer_id=ev.decision.transfer_id,
        state=ReceiverState.ABORTED,
        received_at_ms=ev.now_ms,
        decision=ev.decision,
        decision_hash=ev.decision_hash,
        ack=ack,
    )
    return row, (
        StoreEvidence(typ=MessageType.DECISION, body_hash=ev.decision_hash),
        Reply(typ=MessageType.ACK, body=ack),
    )


def _decided_again(state: ReceiverTransfer, ev: DecisionArrived) -> ReceiverStep:
    d = ev.decision
    if state.decision_hash == ev.decision_hash:
        assert state.ack is not None
        return state, (Reply(typ=MessageType.ACK, body=state.ack),)
    held = state.decision.outcome if state.decision is not None else Outcome.ABORT  # presumed
    if held is not d.outcome:
        # Equivocation: A signed both outcomes. Keep the first (it was applied), keep the
        # second as evidence, stop trading with A, page a human.
        known = d in state.conflicting
        kept = (
            state if known else msgspec.structs.replace(state, conflicting=(*state.conflicting, d))
        )
        effects: tuple[Effect, ...] = (
            error_reply(
                MessageType.DECISION,
                ev.decision_hash,
                d.transfer_id,
                ErrorCode.MODIFIED_REQUEST,
                differs=("outcome",),
            ),
        )
        if not known:
            effects = (
                StoreEvidence(typ=MessageType.DECISION, body_hash=ev.decision_hash),
                FreezePeer(node=state.from_node),
                Alert(
                    kind=AlertKind.EQUIVOCATION,
                    detail=f"{state.from_node} sent {held} and {d.outcome} for {d.transfer_id}",
                ),
                *effects,
            )
        return kept, effects
    if state.decision is None:
        # We had applied A's presumed ABORT; here is a signed one: record it, acknowledge.
        ack = _ack(ev, ReceiverState.ABORTED)
        recorded = msgspec.structs.replace(
            state, decision=d, decision_hash=ev.decision_hash, ack=ack
        )
        return recorded, (
            StoreEvidence(typ=MessageType.DECISION, body_hash=ev.decision_hash),
            Reply(typ=MessageType.ACK, body=ack),
        )
    assert state.ack is not None
    return state, (
        StoreEvidence(typ=MessageType.DECISION, body_hash=ev.decision_hash),
        Alert(
            kind=AlertKind.DECISION_MISMATCH,
            detail=f"second {d.outcome} with another body for {d.transfer_id}",
        ),
        Reply(typ=MessageType.ACK, body=state.ack),
    )


def _unknown_commit(ev: DecisionArrived, why: str) -> tuple[Effect, ...]:
    tid = ev.decision.transfer_id
    return (
        error_reply(
            MessageType.DECISION,
            ev.decision_hash,
            tid,
            ErrorCode.UNKNOWN_TRANSFER,
            f"COMMIT refused: {why}",
        ),
        Alert(kind=AlertKind.UNKNOWN_COMMIT, detail=f"COMMIT for {tid} from {ev.from_node}: {why}"),
    )
