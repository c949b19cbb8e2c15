"""Node B's state machine, row by row of PROTOCOL b.6 (second table)."""

from protocol.clock import ACCEPT_MARGIN_MS, IN_DOUBT_PAGE_MS, RESOLVER_GRACE_MS
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
)
from protocol.errors import ErrorCode
from protocol.messages import (
    Accept,
    Acceptance,
    Ack,
    Decision,
    Decline,
    ErrorBody,
    ErrorReply,
    MessageType,
    Outcome,
    Prepare,
    Received,
    StatusItem,
    hash_body,
)
from protocol.receiver import (
    DecisionArrived,
    PrepareArrived,
    PresumedAbort,
    ReceiverAccepts,
    ReceiverDeclines,
    ReceiverState,
    ReceiverTransfer,
    RelationEnded,
    ResolverTick,
    StatusQuery,
    event_for_status,
    step,
)
from tests.protocol.factories import (
    DECIDE_BY_MS,
    T0_MS,
    TRANSFER_ID,
    A,
    fixed_id,
    make_decision,
    make_prepare,
    replace,
)

PREPARE = make_prepare()
PREPARE_HASH = hash_body(PREPARE)
B_HOLD_ID = fixed_id(600)
RECEIVED_AT_MS = T0_MS + 200  # B's clock
ACCEPTANCE = Acceptance(method="face", ref="face-9")
ACCEPT_AT_MS = T0_MS + 3_600_000
WITHIN_MS = PREPARE.accept_within_ms

Step = tuple[ReceiverTransfer | None, tuple[Effect, ...]]


def prepare_arrives(
    state: ReceiverTransfer | None = None,
    rejection: ErrorCode | None = None,
    prepare: Prepare = PREPARE,
) -> Step:
    return step(
        state,
        PrepareArrived(
            from_node=A,
            prepare=prepare,
            prepare_hash=hash_body(prepare),
            b_hold_id=B_HOLD_ID,
            now_ms=RECEIVED_AT_MS,
            rejection=rejection,
        ),
    )


def pending() -> ReceiverTransfer:
    state, _ = prepare_arrives()
    assert state is not None and state.state is ReceiverState.PENDING_ACCEPT
    return state


def accepted() -> ReceiverTransfer:
    state, _ = step(pending(), ReceiverAccepts(acceptance=ACCEPTANCE, now_ms=ACCEPT_AT_MS))
    assert state is not None and state.state is ReceiverState.ACCEPTED
    return state


def declined_pending() -> ReceiverTransfer:
    state, _ = step(pending(), ReceiverDeclines(now_ms=ACCEPT_AT_MS))
    assert state is not None and state.state is ReceiverState.DECLINED_PENDING
    return state


def commit_for(state: ReceiverTransfer) -> Decision:
    return make_decision(PREPARE, Outcome.COMMIT, vote_hash=state.vote_hash)


ABORT = make_decision(PREPARE, Outcome.ABORT, reason=ErrorBody.of(ErrorCode.EXPIRED))


def decision_arrives(
    state: ReceiverTransfer | None, decision: Decision, now_ms: int = ACCEPT_AT_MS + 500
) -> Step:
    return step(
        state,
        DecisionArrived(
            from_node=A, decision=decision, decision_hash=hash_body(decision), now_ms=now_ms
        ),
    )


def committed() -> ReceiverTransfer:
    state = accepted()
    new, _ = decision_arrives(state, commit_for(state))
    assert new is not None and new.state is ReceiverState.COMMITTED
    return new


def aborted() -> ReceiverTransfer:
    new, _ = decision_arrives(accepted(), ABORT)
    assert new is not None and new.state is ReceiverState.ABORTED
    return new


def error_of(effect: Effect) -> ErrorReply:
    assert isinstance(effect, Reply) and isinstance(effect.body, ErrorReply)
    return effect.body


def alert_kinds(effects: tuple[Effect, ...]) -> list[AlertKind]:
    return [e.kind for e in effects if isinstance(e, Alert)]


# --- — + PREPARE --------------------------------------------------------------------------


def test_prepare_that_passes_checks_holds_quota_and_replies_received() -> None:
    state, effects = prepare_arrives()
    received = Received(
        transfer_id=TRANSFER_ID,
        prepare_hash=PREPARE_HASH,
        b_hold_id=B_HOLD_ID,
        b_received_at_ms=RECEIVED_AT_MS,
    )
    assert state == ReceiverTransfer(
        from_node=A,
        transfer_id=TRANSFER_ID,
        state=ReceiverState.PENDING_ACCEPT,
        received_at_ms=RECEIVED_AT_MS,
        prepare=PREPARE,
        prepare_hash=PREPARE_HASH,
        prepare_reply=received,
    )
    assert effects == (
        StoreEvidence(typ=MessageType.PREPARE, body_hash=PREPARE_HASH),
        HoldQuota(amount_fen=50_000),
        Reply(typ=MessageType.RECEIVED, body=received),
        NotifyReceiver(kind="GRANT_OFFERED"),
    )


def test_prepare_that_fails_a_check_leaves_a_declined_tombstone_and_replies_decline() -> None:
    state, effects = prepare_arrives(rejection=ErrorCode.EXPOSURE_CAP)
    decline = Decline(
        transfer_id=TRANSFER_ID,
        prepare_hash=PREPARE_HASH,
        error=ErrorBody.of(ErrorCode.EXPOSURE_CAP),
    )
    assert state is not None
    assert (state.state, state.prepare_reply) == (ReceiverState.DECLINED, decline)
    assert decline.error.class_ == "T"
    assert effects == (
        StoreEvidence(typ=MessageType.PREPARE, body_hash=PREPARE_HASH),
        Reply(typ=MessageType.DECLINE, body=decline),
    )


def test_duplicate_prepare_gets_the_same_received_and_no_second_hold() -> None:
    state = pending()
    assert state.prepare_reply is not None
    assert prepare_arrives(state) == (
        state,
        (Reply(typ=MessageType.RECEIVED, body=state.prepare_reply),),
    )


def test_duplicate_prepare_after_a_declined_check_gets_the_same_decline() -> None:
    state, first = prepare_arrives(rejection=ErrorCode.RECEIVER_WALLET_NOT_OPEN)
    assert state is not None
    assert prepare_arrives(state, rejection=None) == (state, (first[1],))


def test_duplicate_prepare_after_commit_still_gets_the_stored_received() -> None:
    state = committed()
    _, effects = prepare_arrives(state)
    assert effects == (Reply(typ=MessageType.RECEIVED, body=state.prepare_reply),)  # type: ignore[arg-type]


def test_prepare_reusing_the_id_with_another_amount_gets_3106_naming_amount() -> None:
    state = pending()
    new, effects = prepare_arrives(state, prepare=replace(PREPARE, amount_fen=90_000))
    assert new == state
    body = error_of(effects[0])
    assert (body.error.code, body.differs) == (ErrorCode.MODIFIED_REQUEST, ("amount_fen",))
    assert alert_kinds(effects) == [AlertKind.MODIFIED_REQUEST]


# --- — + DECISION=ABORT (tombstone) -------------------------------------------------------


def test_abort_for_an_unknown_id_writes_an_aborted_tombstone_and_acks() -> None:
    state, effects = decision_arrives(None, ABORT)
    ack = Ack(
        transfer_id=TRANSFER_ID,
        decision_hash=hash_body(ABORT),
        final_state="ABORTED",
        completed_at_ms=ACCEPT_AT_MS + 500,
    )
    assert state == ReceiverTransfer(
        from_node=A,
        transfer_id=TRANSFER_ID,
        state=ReceiverState.ABORTED,
        received_at_ms=ACCEPT_AT_MS + 500,
        decision=ABORT,
        decision_hash=hash_body(ABORT),
        ack=ack,
    )
    assert effects == (
        StoreEvidence(typ=MessageType.DECISION, body_hash=hash_body(ABORT)),
        Reply(typ=MessageType.ACK, body=ack),
    )


def test_prepare_after_the_abort_tombstone_is_declined_3303_and_holds_nothing() -> None:
    tomb, _ = decision_arrives(None, ABORT)
    state, effects = prepare_arrives(tomb)
    decline = Decline(
        transfer_id=TRANSFER_ID,
        prepare_hash=PREPARE_HASH,
        error=ErrorBody.of(ErrorCode.EXPIRED, "already aborted"),
    )
    assert state is not None
    assert (state.state, state.prepare_reply) == (ReceiverState.ABORTED, decline)
    assert not any(isinstance(e, HoldQuota) for e in effects)
    assert effects[-1] == Reply(typ=MessageType.DECLINE, body=decline)


def test_prepare_that_does_not_match_the_abort_tombstone_gets_3106() -> None:
    tomb, _ = decision_arrives(None, ABORT)
    new, effects = prepare_arrives(tomb, prepare=replace(PREPARE, amount_fen=1))
    assert new == tomb
    assert error_of(effects[0]).differs == ("prepare_hash",)


# --- PENDING_ACCEPT + receiver ------------------------------------------------------------


def test_receiver_accepting_in_time_sends_a_binding_accept() -> None:
    state, effects = step(pending(), ReceiverAccepts(acceptance=ACCEPTANCE, now_ms=ACCEPT_AT_MS))
    accept = Accept(
        transfer_id=TRANSFER_ID,
        prepare_hash=PREPARE_HASH,
        b_hold_id=B_HOLD_ID,
        accepted_at_ms=ACCEPT_AT_MS,
        acceptance=ACCEPTANCE,
    )
    assert state is not None
    assert (state.state, state.vote, state.vote_hash) == (
        ReceiverState.ACCEPTED,
        accept,
        hash_body(accept),
    )
    assert effects == (Send(typ=MessageType.ACCEPT, to_node=A, body=accept),)


def test_receiver_can_accept_until_the_margin_before_as_deadline() -> None:
    last_ms = RECEIVED_AT_MS + WITHIN_MS - ACCEPT_MARGIN_MS
    state, _ = step(pending(), ReceiverAccepts(acceptance=ACCEPTANCE, now_ms=last_ms))
    assert state is not None and state.state is ReceiverState.ACCEPTED


def test_receiver_accepting_inside_the_margin_is_told_3303_and_nothing_changes() -> None:
    state = pending()
    new, effects = step(
        state,
        ReceiverAccepts(
            acceptance=ACCEPTANCE, now_ms=RECEIVED_AT_MS + WITHIN_MS - ACCEPT_MARGIN_MS + 1
        ),
    )
    assert new == state
    assert error_of(effects[0]).error.code is ErrorCode.EXPIRED


def test_accepting_twice_does_nothing() -> None:
    state = accepted()
    assert step(state, ReceiverAccepts(acceptance=ACCEPTANCE, now_ms=ACCEPT_AT_MS + 9)) == (
        state,
        (),
    )


def test_receiver_refusing_sends_decline_5104_and_keeps_the_hold() -> None:
    state, effects = step(pending(), ReceiverDeclines(now_ms=ACCEPT_AT_MS))
    decline = Decline(
        transfer_id=TRANSFER_ID,
        prepare_hash=PREPARE_HASH,
        error=ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
    )
    assert state is not None
    assert (state.state, state.vote) == (ReceiverState.DECLINED_PENDING, decline)
    assert effects == (Send(typ=MessageType.DECLINE, to_node=A, body=decline),)


def test_refusing_after_accepting_is_an_error_because_accept_is_binding() -> None:
    state = accepted()
    new, effects = step(state, ReceiverDeclines(now_ms=ACCEPT_AT_MS + 1))
    assert new == state
    assert error_of(effects[0]).error.code is ErrorCode.VALIDATION


def test_relationship_ending_declines_a_pending_grant_with_4300() -> None:
    state, effects = step(pending(), RelationEnded(now_ms=ACCEPT_AT_MS))
    assert state is not None and isinstance(state.vote, Decline)
    assert (state.state, state.vote.error.code) == (
        ReceiverState.DECLINED_PENDING,
        ErrorCode.GIVER_PERMISSION,
    )
    assert effects == (Send(typ=MessageType.DECLINE, to_node=A, body=state.vote),)


def test_relationship_ending_after_accept_waits_for_the_decision() -> None:
    state = accepted()
    assert step(state, RelationEnded(now_ms=ACCEPT_AT_MS + 1)) == (state, ())


# --- ACCEPTED + COMMIT --------------------------------------------------------------------


def test_commit_matching_our_accept_posts_and_acks() -> None:
    state = accepted()
    commit = commit_for(state)
    new, effects = decision_arrives(state, commit)
    ack = Ack(
        transfer_id=TRANSFER_ID,
        decision_hash=hash_body(commit),
        final_state="COMMITTED",
        completed_at_ms=ACCEPT_AT_MS + 500,
    )
    assert new == replace(
        state,
        state=ReceiverState.COMMITTED,
        decision=commit,
        decision_hash=hash_body(commit),
        ack=ack,
    )
    assert effects == (
        StoreEvidence(typ=MessageType.DECISION, body_hash=hash_body(commit)),
        PostHold(amount_fen=50_000),
        StopRetries(typ=MessageType.ACCEPT),
        Reply(typ=MessageType.ACK, body=ack),
        NotifyReceiver(kind="GRANT_COMMITTED"),
    )


def test_commit_with_another_vote_hash_is_refused_3208() -> None:
    state = accepted()
    new, effects = decision_arrives(
        state, make_decision(PREPARE, Outcome.COMMIT, vote_hash="e" * 64)
    )
    assert new == state
    assert error_of(effects[0]).error.code is ErrorCode.UNKNOWN_TRANSFER
    assert alert_kinds(effects) == [AlertKind.UNKNOWN_COMMIT]


def test_commit_while_pending_is_refused_3208() -> None:
    state = pending()
    new, effects = decision_arrives(
        state, make_decision(PREPARE, Outcome.COMMIT, vote_hash="e" * 64)
    )
    assert new == state
    assert error_of(effects[0]).error.code is ErrorCode.UNKNOWN_TRANSFER


def test_commit_after_we_declined_is_refused_3208() -> None:
    state = declined_pending()
    new, effects = decision_arrives(
        state, make_decision(PREPARE, Outcome.COMMIT, vote_hash=state.vote_hash)
    )
    assert new == state
    assert error_of(effects[0]).error.code is ErrorCode.UNKNOWN_TRANSFER


def test_commit_for_an_unknown_id_is_refused_3208_and_writes_nothing() -> None:
    new, effects = decision_arrives(
        None, make_decision(PREPARE, Outcome.COMMIT, vote_hash="e" * 64)
    )
    assert new is None
    assert error_of(effects[0]).error.code is ErrorCode.UNKNOWN_TRANSFER
    assert alert_kinds(effects) == [AlertKind.UNKNOWN_COMMIT]


def test_decision_for_another_prepare_gets_3106() -> None:
    state = accepted()
    other = make_decision(replace(PREPARE, amount_fen=1), Outcome.COMMIT, vote_hash=state.vote_hash)
    new, effects = decision_arrives(state, other)
    assert new == state
    assert error_of(effects[0]).differs == ("prepare_hash",)


# --- in doubt + ABORT ---------------------------------------------------------------------


def test_abort_while_pending_voids_and_acks() -> None:
    state = pending()
    new, effects = decision_arrives(state, ABORT)
    assert new is not None and new.state is ReceiverState.ABORTED
    assert effects[:2] == (
        StoreEvidence(typ=MessageType.DECISION, body_hash=hash_body(ABORT)),
        VoidHold(amount_fen=50_000),
    )
    assert (
        isinstance(effects[2], Reply)
        and isinstance(effects[2].body, Ack)
        and effects[2].body.final_state == "ABORTED"
    )
    assert effects[3] == NotifyReceiver(kind="GRANT_RETURNED")


def test_abort_after_accept_voids_and_stops_accept_retries() -> None:
    new, effects = decision_arrives(accepted(), ABORT)
    assert new is not None and new.state is ReceiverState.ABORTED
    assert VoidHold(amount_fen=50_000) in effects and StopRetries(typ=MessageType.ACCEPT) in effects


def test_abort_after_we_declined_voids_and_stops_decline_retries() -> None:
    new, effects = decision_arrives(declined_pending(), ABORT)
    assert new is not None and new.state is ReceiverState.ABORTED
    assert (
        VoidHold(amount_fen=50_000) in effects and StopRetries(typ=MessageType.DECLINE) in effects
    )


def test_abort_after_a_declined_check_records_it_without_ledger_effects() -> None:
    state, _ = prepare_arrives(rejection=ErrorCode.RECEIVER_LIMIT)
    new, effects = decision_arrives(state, ABORT)
    assert new is not None
    assert (new.state, new.decision) == (ReceiverState.DECLINED, ABORT)
    assert not any(isinstance(e, HoldQuota | PostHold | VoidHold) for e in effects)
    assert isinstance(effects[-1], Reply) and isinstance(effects[-1].body, Ack)


# --- decided + DECISION again / equivocation ----------------------------------------------


def test_the_same_commit_again_gets_the_stored_ack() -> None:
    state = committed()
    assert state.decision is not None and state.ack is not None
    assert decision_arrives(state, state.decision, now_ms=DECIDE_BY_MS) == (
        state,
        (Reply(typ=MessageType.ACK, body=state.ack),),
    )


def test_the_same_abort_again_gets_the_stored_ack() -> None:
    state = aborted()
    assert state.ack is not None
    assert decision_arrives(state, ABORT, now_ms=DECIDE_BY_MS) == (
        state,
        (Reply(typ=MessageType.ACK, body=state.ack),),
    )


def test_abort_after_commit_is_equivocation_keeps_both_and_freezes_the_link() -> None:
    state = committed()
    new, effects = decision_arrives(state, ABORT)
    assert new == replace(state, conflicting=(ABORT,))
    assert new is not None and new.state is ReceiverState.COMMITTED
    assert FreezePeer(node=A) in effects
    assert alert_kinds(effects) == [AlertKind.EQUIVOCATION]
    assert error_of(effects[-1]).differs == ("outcome",)
    assert not any(isinstance(e, PostHold | VoidHold) for e in effects)


def test_commit_after_abort_is_equivocation_too() -> None:
    state = aborted()
    new, effects = decision_arrives(state, commit_for(accepted()))
    assert new is not None and new.state is ReceiverState.ABORTED and len(new.conflicting) == 1
    assert FreezePeer(node=A) in effects


def test_the_same_equivocating_decision_again_does_not_page_twice() -> None:
    state, _ = decision_arrives(committed(), ABORT)
    new, effects = decision_arrives(state, ABORT)
    assert new == state
    assert alert_kinds(effects) == [] and len(effects) == 1


def test_a_second_abort_with_another_body_is_kept_as_evidence_and_alerts() -> None:
    state = aborted()
    other = replace(ABORT, decided_at_ms=ABORT.decided_at_ms + 1)
    new, effects = decision_arrives(state, other)
    assert new == state
    assert alert_kinds(effects) == [AlertKind.DECISION_MISMATCH]
    assert effects[-1] == Reply(typ=MessageType.ACK, body=state.ack)  # type: ignore[arg-type]


# --- resolver and STATUS ------------------------------------------------------------------


def test_resolver_waits_until_accept_within_plus_grace() -> None:
    state = accepted()
    due_ms = RECEIVED_AT_MS + WITHIN_MS + RESOLVER_GRACE_MS
    assert step(state, ResolverTick(now_ms=due_ms - 1)) == (state, ())
    assert step(state, ResolverTick(now_ms=due_ms)) == (
        state,
        (QueryPeer(to_node=A, transfer_id=TRANSFER_ID),),
    )


def test_resolver_pages_after_an_hour_in_doubt() -> None:
    state = declined_pending()
    _, effects = step(state, ResolverTick(now_ms=RECEIVED_AT_MS + WITHIN_MS + IN_DOUBT_PAGE_MS))
    assert effects[0] == QueryPeer(to_node=A, transfer_id=TRANSFER_ID)
    assert alert_kinds(effects) == [AlertKind.IN_DOUBT]


def test_resolver_never_asks_about_decided_transfers() -> None:
    state = committed()
    assert step(state, ResolverTick(now_ms=DECIDE_BY_MS * 2)) == (state, ())


def test_a_signed_decision_in_status_is_applied_like_a_decision() -> None:
    state = accepted()
    commit = commit_for(state)
    item = StatusItem(transfer_id=TRANSFER_ID, state="COMMITTED", decision=b"<envelope>")
    event = event_for_status(A, item, commit, hash_body(commit), ACCEPT_AT_MS + 500)
    assert event == DecisionArrived(
        from_node=A, decision=commit, decision_hash=hash_body(commit), now_ms=ACCEPT_AT_MS + 500
    )


def test_undecided_status_means_nothing_to_apply() -> None:
    item = StatusItem(transfer_id=TRANSFER_ID, state="PREPARED_A", undecided_remaining_ms=5)
    assert event_for_status(A, item, None, None, T0_MS) is None


def test_presumed_abort_voids_a_hold_without_a_signed_commit() -> None:
    state = accepted()
    item = StatusItem(transfer_id=TRANSFER_ID, state="ABORTED", presumed=True)
    event = event_for_status(A, item, None, None, DECIDE_BY_MS)
    assert event == PresumedAbort(now_ms=DECIDE_BY_MS)
    new, effects = step(state, event)
    assert new == replace(state, state=ReceiverState.ABORTED, presumed_abort=True)
    assert effects[:2] == (VoidHold(amount_fen=50_000), StopRetries(typ=MessageType.ACCEPT))
    assert alert_kinds(effects) == [AlertKind.PRESUMED_ABORT]


def test_presumed_abort_never_undoes_a_signed_commit() -> None:
    state = committed()
    new, effects = step(state, PresumedAbort(now_ms=DECIDE_BY_MS))
    assert new == state
    assert alert_kinds(effects) == [AlertKind.PEER_LOST_COMMIT]


def test_signed_abort_after_a_presumed_abort_is_recorded_and_acked() -> None:
    state, _ = step(accepted(), PresumedAbort(now_ms=DECIDE_BY_MS))
    new, effects = decision_arrives(state, ABORT)
    assert new is not None and (new.state, new.decision) == (ReceiverState.ABORTED, ABORT)
    assert isinstance(effects[-1], Reply) and isinstance(effects[-1].body, Ack)
    assert not any(isinstance(e, VoidHold) for e in effects)


def test_commit_after_a_presumed_abort_is_equivocation() -> None:
    state = accepted()
    presumed, _ = step(state, PresumedAbort(now_ms=DECIDE_BY_MS))
    new, effects = decision_arrives(presumed, commit_for(state))
    assert new is not None and new.state is ReceiverState.ABORTED
    assert FreezePeer(node=A) in effects


def test_status_reports_our_state_and_the_decision_we_hold() -> None:
    state = committed()
    _, effects = step(state, StatusQuery(transfer_id=TRANSFER_ID, now_ms=DECIDE_BY_MS))
    assert effects == (
        ReportStatus(transfer_id=TRANSFER_ID, state="COMMITTED", decision=state.decision),
    )
    _, unknown = step(None, StatusQuery(transfer_id=TRANSFER_ID, now_ms=DECIDE_BY_MS))
    assert unknown == (ReportStatus(transfer_id=TRANSFER_ID, state="UNKNOWN"),)
