"""Node A's state machine, row by row of PROTOCOL b.6 (first table)."""

from protocol.effects import (
    Alert,
    AlertKind,
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
from protocol.giver import (
    GiverState,
    GiverTransfer,
    Instruct,
    MessageArrived,
    Repair,
    StatusQuery,
    Sweep,
    step,
)
from protocol.messages import (
    Ack,
    Body,
    Decision,
    ErrorBody,
    ErrorReply,
    FinalState,
    MessageType,
    Outcome,
    Received,
    hash_body,
)
from tests.protocol.factories import (
    DECIDE_BY_MS,
    T0_MS,
    TRANSFER_ID,
    B,
    fixed_id,
    make_accept,
    make_decision,
    make_decline,
    make_prepare,
    replace,
)

PREPARE = make_prepare()
PREPARE_HASH = hash_body(PREPARE)
REQUEST_HASH = "a" * 64
ACCEPT = make_accept(PREPARE)
DECLINED = make_decline(PREPARE, ErrorBody.of(ErrorCode.RECEIVER_DECLINED))


def instruct(rejection: ErrorCode | None = None) -> tuple[GiverTransfer | None, tuple[object, ...]]:
    return step(
        None,
        Instruct(
            prepare=PREPARE,
            request_hash=REQUEST_HASH,
            to_node=B,
            decide_by_ms=DECIDE_BY_MS,
            now_ms=T0_MS,
            rejection=rejection,
        ),
    )


def prepared() -> GiverTransfer:
    state, _ = instruct()
    assert state is not None
    return state


def arrive(
    state: GiverTransfer | None, body: Body, now_ms: int = T0_MS + 60_000
) -> tuple[GiverTransfer | None, tuple[object, ...]]:
    assert isinstance(body, Received | type(ACCEPT) | type(DECLINED) | Ack)
    return step(state, MessageArrived(body=body, body_hash=hash_body(body), now_ms=now_ms))


def committed() -> GiverTransfer:
    state, _ = arrive(prepared(), ACCEPT)
    assert state is not None and state.state is GiverState.COMMITTED
    return state


def aborted_by_sweeper() -> GiverTransfer:
    state, _ = step(prepared(), Sweep(now_ms=DECIDE_BY_MS + 1))
    assert state is not None and state.state is GiverState.ABORTED
    return state


def error_of(effect: object) -> ErrorReply:
    assert isinstance(effect, Reply) and isinstance(effect.body, ErrorReply)
    return effect.body


# --- — -> PREPARED_A / REJECTED -----------------------------------------------------------


def test_instruction_that_passes_checks_holds_the_giver_and_queues_prepare() -> None:
    state, effects = instruct()
    assert state is not None
    assert state.state is GiverState.PREPARED_A
    assert (state.prepare_hash, state.decide_by_ms, state.b_seen, state.acked) == (
        PREPARE_HASH,
        DECIDE_BY_MS,
        False,
        False,
    )
    assert effects == (
        HoldGiver(amount_fen=50_000),
        Send(typ=MessageType.PREPARE, to_node=B, body=PREPARE),
    )


def test_instruction_that_fails_a_check_is_rejected_with_no_hold_and_no_message() -> None:
    state, effects = instruct(rejection=ErrorCode.GIVER_INSUFFICIENT_BALANCE)
    assert state is not None
    assert (state.state, state.reject_code) == (
        GiverState.REJECTED,
        ErrorCode.GIVER_INSUFFICIENT_BALANCE,
    )
    assert effects == ()


def test_retried_instruction_with_the_same_request_hash_changes_nothing() -> None:
    state = prepared()
    again = Instruct(
        prepare=PREPARE,
        request_hash=REQUEST_HASH,
        to_node=B,
        decide_by_ms=DECIDE_BY_MS,
        now_ms=T0_MS + 5,
    )
    assert step(state, again) == (state, ())


def test_instruction_reusing_an_id_with_another_amount_gets_3106_naming_amount() -> None:
    state = prepared()
    other = replace(PREPARE, amount_fen=60_000, a_hold_id=fixed_id(501))
    new, effects = step(
        state,
        Instruct(
            prepare=other, request_hash="b" * 64, to_node=B, decide_by_ms=DECIDE_BY_MS, now_ms=T0_MS
        ),
    )
    assert new == state
    body = error_of(effects[0])
    assert (body.error.code, body.differs) == (ErrorCode.MODIFIED_REQUEST, ("amount_fen",))
    assert isinstance(effects[1], Alert) and effects[1].kind is AlertKind.MODIFIED_REQUEST


def test_instruction_whose_accept_within_disagrees_with_decide_by_is_a_bug() -> None:
    bad = Instruct(
        prepare=PREPARE,
        request_hash=REQUEST_HASH,
        to_node=B,
        decide_by_ms=DECIDE_BY_MS + 1,
        now_ms=T0_MS,
    )
    try:
        step(None, bad)
    except ValueError:
        return
    raise AssertionError("expected ValueError")


# --- PREPARED_A + RECEIVED ----------------------------------------------------------------

RECEIVED = Received(
    transfer_id=TRANSFER_ID,
    prepare_hash=PREPARE_HASH,
    b_hold_id=fixed_id(600),
    b_received_at_ms=T0_MS + 100,
)


def test_received_marks_b_seen_and_stops_prepare_retries() -> None:
    state, effects = arrive(prepared(), RECEIVED)
    assert state is not None
    assert (state.state, state.b_seen) == (GiverState.PREPARED_A, True)
    assert effects == (
        StoreEvidence(typ=MessageType.RECEIVED, body_hash=hash_body(RECEIVED)),
        StopRetries(typ=MessageType.PREPARE),
    )


def test_duplicate_received_does_nothing() -> None:
    state, _ = arrive(prepared(), RECEIVED)
    assert arrive(state, RECEIVED) == (state, ())


def test_received_for_another_prepare_alerts_and_changes_nothing() -> None:
    state = prepared()
    new, effects = arrive(state, replace(RECEIVED, prepare_hash="0" * 64))
    assert new == state
    assert (
        len(effects) == 1
        and isinstance(effects[0], Alert)
        and effects[0].kind is AlertKind.MODIFIED_REQUEST
    )


# --- PREPARED_A + DECLINE -----------------------------------------------------------------


def test_decline_aborts_voids_the_hold_and_sends_abort_with_the_receivers_reason() -> None:
    state, effects = arrive(prepared(), DECLINED, now_ms=T0_MS + 60_000)
    assert state is not None and state.decision is not None
    assert state.state is GiverState.ABORTED
    decision = state.decision
    assert (decision.outcome, decision.reason, decision.vote_hash) == (
        Outcome.ABORT,
        ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
        hash_body(DECLINED),
    )
    assert (decision.decided_at_ms, decision.window_id) == (T0_MS + 60_000, "2026-03-15T10")
    assert effects == (
        StoreEvidence(typ=MessageType.DECLINE, body_hash=hash_body(DECLINED)),
        VoidHold(amount_fen=50_000),
        StopRetries(typ=MessageType.PREPARE),
        Send(typ=MessageType.DECISION, to_node=B, body=decision),
        NotifyGiver(state="ABORTED"),
        Reply(typ=MessageType.DECISION, body=decision),
    )


# --- PREPARED_A + ACCEPT ------------------------------------------------------------------


def test_accept_before_the_deadline_commits_posts_and_sends_commit() -> None:
    state, effects = arrive(prepared(), ACCEPT, now_ms=T0_MS + 3_600_000)
    assert state is not None and state.decision is not None
    decision = state.decision
    assert state.state is GiverState.COMMITTED
    assert (decision.outcome, decision.vote_hash, decision.reason) == (
        Outcome.COMMIT,
        hash_body(ACCEPT),
        None,
    )
    assert state.decision_hash == hash_body(decision)
    assert effects == (
        StoreEvidence(typ=MessageType.ACCEPT, body_hash=hash_body(ACCEPT)),
        PostHold(amount_fen=50_000),
        StopRetries(typ=MessageType.PREPARE),
        Send(typ=MessageType.DECISION, to_node=B, body=decision),
        NotifyGiver(state="COMMITTED"),
        Reply(typ=MessageType.DECISION, body=decision),
    )


def test_accept_at_exactly_the_deadline_commits() -> None:
    state, _ = arrive(prepared(), ACCEPT, now_ms=DECIDE_BY_MS)
    assert state is not None and state.state is GiverState.COMMITTED


def test_accept_one_ms_after_the_deadline_aborts_with_3303() -> None:
    state, effects = arrive(prepared(), ACCEPT, now_ms=DECIDE_BY_MS + 1)
    assert state is not None and state.decision is not None
    assert state.state is GiverState.ABORTED
    assert (state.decision.outcome, state.decision.reason and state.decision.reason.code) == (
        Outcome.ABORT,
        ErrorCode.EXPIRED,
    )
    assert state.decision.reason is not None and state.decision.reason.class_ is ErrorClass.R
    assert VoidHold(amount_fen=50_000) in effects
    assert Reply(typ=MessageType.DECISION, body=state.decision) in effects


# --- PREPARED_A + sweeper -----------------------------------------------------------------


def test_sweeper_after_the_deadline_aborts_with_3303_and_no_reply() -> None:
    state, effects = step(prepared(), Sweep(now_ms=DECIDE_BY_MS + 1))
    assert state is not None and state.decision is not None
    assert (state.state, state.decision.outcome, state.decision.vote_hash) == (
        GiverState.ABORTED,
        Outcome.ABORT,
        None,
    )
    assert state.decision.reason is not None and state.decision.reason.code is ErrorCode.EXPIRED
    assert effects == (
        VoidHold(amount_fen=50_000),
        StopRetries(typ=MessageType.PREPARE),
        Send(typ=MessageType.DECISION, to_node=B, body=state.decision),
        NotifyGiver(state="ABORTED"),
    )


def test_sweeper_at_the_deadline_does_nothing() -> None:
    state = prepared()
    assert step(state, Sweep(now_ms=DECIDE_BY_MS)) == (state, ())


def test_sweeper_ignores_decided_transfers() -> None:
    state = committed()
    assert step(state, Sweep(now_ms=DECIDE_BY_MS + 10)) == (state, ())


# --- decided + ACK ------------------------------------------------------------------------


def ack_for(state: GiverTransfer) -> Ack:
    assert state.decision_hash is not None
    final: FinalState = "COMMITTED" if state.state is GiverState.COMMITTED else "ABORTED"
    return Ack(
        transfer_id=TRANSFER_ID,
        decision_hash=state.decision_hash,
        final_state=final,
        completed_at_ms=T0_MS + 4_000_000,
    )


def test_ack_of_the_commit_sets_acked_and_stops_decision_retries() -> None:
    state = committed()
    ack = ack_for(state)
    new, effects = arrive(state, ack)
    assert new == replace(state, acked=True)
    assert effects == (
        StoreEvidence(typ=MessageType.ACK, body_hash=hash_body(ack)),
        StopRetries(typ=MessageType.DECISION),
    )


def test_ack_of_the_abort_sets_acked() -> None:
    state = aborted_by_sweeper()
    new, _ = arrive(state, ack_for(state))
    assert new == replace(state, acked=True)


def test_duplicate_ack_does_nothing() -> None:
    state = committed()
    acked, _ = arrive(state, ack_for(state))
    assert arrive(acked, ack_for(state)) == (acked, ())


def test_ack_for_another_decision_alerts_and_changes_nothing() -> None:
    state = committed()
    new, effects = arrive(state, replace(ack_for(state), decision_hash="f" * 64))
    assert new == state
    assert len(effects) == 1 and isinstance(effects[0], Alert)


def test_ack_before_any_decision_alerts() -> None:
    state = prepared()
    new, effects = arrive(
        state,
        Ack(
            transfer_id=TRANSFER_ID,
            decision_hash="f" * 64,
            final_state="COMMITTED",
            completed_at_ms=T0_MS,
        ),
    )
    assert new == state
    assert isinstance(effects[0], Alert) and effects[0].kind is AlertKind.UNKNOWN_TRANSFER


# --- decided + duplicate vote -------------------------------------------------------------


def test_duplicate_accept_after_commit_is_answered_with_the_stored_decision() -> None:
    state = committed()
    assert state.decision is not None
    assert arrive(state, ACCEPT, now_ms=DECIDE_BY_MS + 99) == (
        state,
        (Reply(typ=MessageType.DECISION, body=state.decision),),
    )


def test_duplicate_decline_after_abort_is_answered_with_the_stored_decision() -> None:
    state, _ = arrive(prepared(), DECLINED)
    assert state is not None and state.decision is not None
    assert arrive(state, DECLINED) == (
        state,
        (Reply(typ=MessageType.DECISION, body=state.decision),),
    )


def test_first_accept_after_the_sweeper_aborted_is_kept_and_answered_with_the_abort() -> None:
    state = aborted_by_sweeper()
    assert state.decision is not None
    new, effects = arrive(state, ACCEPT, now_ms=DECIDE_BY_MS + 5_000)
    assert new == replace(state, vote=ACCEPT, vote_hash=hash_body(ACCEPT))
    assert effects == (
        StoreEvidence(typ=MessageType.ACCEPT, body_hash=hash_body(ACCEPT)),
        Reply(typ=MessageType.DECISION, body=state.decision),
    )


# --- any + vote with a different hash -----------------------------------------------------


def test_accept_for_another_prepare_gets_3106_and_a_security_alert() -> None:
    state = prepared()
    new, effects = arrive(state, replace(ACCEPT, prepare_hash="0" * 64))
    assert new == state
    body = error_of(effects[0])
    assert (body.error.code, body.differs, body.ref_typ) == (
        ErrorCode.MODIFIED_REQUEST,
        ("prepare_hash",),
        MessageType.ACCEPT,
    )
    assert isinstance(effects[1], Alert) and effects[1].kind is AlertKind.MODIFIED_REQUEST


def test_a_second_accept_with_another_body_gets_3106_naming_the_fields() -> None:
    state = committed()
    other = replace(ACCEPT, accepted_at_ms=ACCEPT.accepted_at_ms + 1)
    new, effects = arrive(state, other)
    assert new == state
    assert error_of(effects[0]).differs == ("accepted_at_ms",)


def test_decline_after_an_accept_gets_3106() -> None:
    state = committed()
    new, effects = arrive(state, DECLINED)
    assert new == state
    assert error_of(effects[0]).differs == ("typ",)


def test_vote_for_an_unknown_transfer_gets_3208() -> None:
    new, effects = arrive(None, ACCEPT)
    assert new is None
    assert error_of(effects[0]).error.code is ErrorCode.UNKNOWN_TRANSFER
    assert isinstance(effects[1], Alert) and effects[1].kind is AlertKind.UNKNOWN_TRANSFER


# --- STATUS -------------------------------------------------------------------------------


def test_status_of_an_unknown_id_is_a_presumed_abort_and_a_p1_alert() -> None:
    tid = fixed_id(77)
    state, effects = step(None, StatusQuery(transfer_id=tid, now_ms=T0_MS))
    assert state is None
    assert effects[0] == ReportStatus(transfer_id=tid, state="ABORTED", presumed=True)
    assert isinstance(effects[1], Alert) and effects[1].kind is AlertKind.PRESUMED_ABORT


def test_status_of_a_prepared_transfer_reports_the_time_left_on_a() -> None:
    _, effects = step(prepared(), StatusQuery(transfer_id=TRANSFER_ID, now_ms=DECIDE_BY_MS - 1_000))
    assert effects == (
        ReportStatus(transfer_id=TRANSFER_ID, state="PREPARED_A", undecided_remaining_ms=1_000),
    )


def test_status_of_a_committed_transfer_carries_the_decision() -> None:
    state = committed()
    _, effects = step(state, StatusQuery(transfer_id=TRANSFER_ID, now_ms=DECIDE_BY_MS))
    assert effects == (
        ReportStatus(transfer_id=TRANSFER_ID, state="COMMITTED", decision=state.decision),
    )


# --- audited repair (PROTOCOL b.9.5) ------------------------------------------------------


def test_repair_re_applies_a_commit_from_our_own_signed_evidence() -> None:
    decision = make_decision(PREPARE, Outcome.COMMIT, vote_hash=hash_body(ACCEPT))
    state, effects = step(
        None, Repair(prepare=PREPARE, decision=decision, to_node=B, now_ms=T0_MS + 9)
    )
    assert state is not None
    assert (state.state, state.decision, state.decision_hash) == (
        GiverState.COMMITTED,
        decision,
        hash_body(decision),
    )
    assert effects[:2] == (HoldGiver(amount_fen=50_000), PostHold(amount_fen=50_000))
    assert isinstance(effects[2], Alert) and effects[2].kind is AlertKind.REPAIRED


def test_repair_evidence_that_contradicts_our_row_is_an_equivocation_alert() -> None:
    state = aborted_by_sweeper()
    decision = make_decision(PREPARE, Outcome.COMMIT, vote_hash=hash_body(ACCEPT))
    new, effects = step(state, Repair(prepare=PREPARE, decision=decision, to_node=B, now_ms=T0_MS))
    assert new == state
    assert isinstance(effects[0], Alert) and effects[0].kind is AlertKind.EQUIVOCATION


def test_every_decision_answers_with_a_decision_struct() -> None:
    # The DECISION sent and the one replied are the same body, so B sees one decision hash.
    _, effects = arrive(prepared(), ACCEPT)
    bodies = [e.body for e in effects if isinstance(e, Send | Reply)]
    assert len(bodies) == 2 and bodies[0] == bodies[1] and isinstance(bodies[0], Decision)
