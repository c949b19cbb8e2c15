"""The failure scenarios of PROTOCOL (d), played step by step on the simulator's two nodes.

Each test steers `World` by hand (which message to deliver, lose or crash on) and checks
the invariants after every step, then heals and checks the at-rest and replay invariants.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from protocol.effects import AlertKind
from protocol.errors import ErrorCode
from protocol.giver import GiverState, GiverTransfer
from protocol.messages import Decline, MessageType, Outcome, Received, decode_body
from protocol.receiver import ReceiverState, ReceiverTransfer
from tests.protocol.sim import DAY0_MS, GIVER_BALANCE_FEN, HOUR_MS, A, B, Msg, World

TEN_AM_MS = DAY0_MS + 10 * HOUR_MS  # 2026-03-15 10:00 Asia/Shanghai
MINUTE_MS = 60_000


class Steered(World):
    """A World whose every action is followed by the invariant checks."""


def _checked(name: str) -> Callable[..., None]:
    action = getattr(World, name)

    def checked(self: World, *args: object, **kwargs: object) -> None:
        action(self, *args, **kwargs)
        self.check()

    return checked


for _name in ("instruct", "deliver", "outbox_tick", "sweep", "resolve", "receiver_acts", "advance"):
    setattr(Steered, _name, _checked(_name))


def world(start_ms: int = TEN_AM_MS, **options: object) -> Steered:
    return Steered(1, b_reject_rate=0.0, start_ms=start_ms, **options)  # type: ignore[arg-type]


@contextmanager
def finally_at_rest(w: World) -> Iterator[World]:
    yield w
    w.heal()
    w.check_at_rest()
    w.check_replay()


def a_of(w: World) -> GiverTransfer:
    state: GiverTransfer = w.a.transfers[w.created[-1]]
    return state


def b_of(w: World) -> ReceiverTransfer:
    state: ReceiverTransfer = w.b.transfers[w.created[-1]]
    return state


def giver_available_fen(w: World) -> int:
    g = w.a.ledger.accounts["giver"]
    return g.credits_posted - g.debits_posted - g.debits_pending


def in_flight(w: World, typ: MessageType) -> list[Msg]:
    return [m for m in w.in_flight if m.typ is typ]


def grant_to_pending(w: World, amount_fen: int = 30_000) -> None:
    w.instruct(amount_fen)
    w.outbox_tick(A)
    w.deliver_next(MessageType.PREPARE)
    w.deliver_next(MessageType.RECEIVED)


def test_happy_path_commits_both_sides_to_the_fen() -> None:
    with finally_at_rest(world()) as w:
        grant_to_pending(w, 30_000)
        w.receiver_acts(0, "accept")
        w.outbox_tick(B)
        w.deliver_next(MessageType.ACCEPT)
        w.deliver_next(MessageType.DECISION)
        assert (a_of(w).state, b_of(w).state) == (GiverState.COMMITTED, ReceiverState.COMMITTED)
        assert w.a.ledger.accounts["due_to"].credits_posted == 30_000
        assert w.b.ledger.accounts["quota"].credits_posted == 30_000
        assert giver_available_fen(w) == GIVER_BALANCE_FEN - 30_000


def test_d1_prepare_queued_before_a_crash_leaves_after_restart() -> None:
    with finally_at_rest(world()) as w:
        w.instruct(30_000)
        w.a.up = False  # crash: the hold and the outbox row are committed, nothing was sent
        w.outbox_tick(A)
        assert w.in_flight == []
        w.restart(A)
        w.outbox_tick(A)
        w.deliver_next(MessageType.PREPARE)
        assert b_of(w).state is ReceiverState.PENDING_ACCEPT


def test_d1_d7_deadline_first_returns_the_money_and_the_late_prepare_meets_a_tombstone() -> None:
    with finally_at_rest(world()) as w:
        w.instruct(30_000)
        w.outbox_tick(A)  # a PREPARE copy is now delayed in the network
        w.advance(21 * HOUR_MS)  # past 06:00
        w.sweep()
        assert a_of(w).state is GiverState.ABORTED and giver_available_fen(w) == GIVER_BALANCE_FEN
        w.outbox_tick(A)
        assert (
            len(in_flight(w, MessageType.PREPARE)) == 1
        )  # PREPARE retries stopped at the deadline
        w.deliver_next(MessageType.DECISION)
        assert (b_of(w).state, b_of(w).prepare) == (ReceiverState.ABORTED, None)
        w.deliver_next(MessageType.PREPARE)
        decline = decode_body(MessageType.DECLINE, in_flight(w, MessageType.DECLINE)[0].body)
        assert isinstance(decline, Decline) and decline.error.code is ErrorCode.EXPIRED
        assert w.b.ledger.accounts["quota"].credits_pending == 0


def test_d2_lost_received_is_answered_again_with_the_same_bytes_and_one_hold() -> None:
    with finally_at_rest(world()) as w:
        w.instruct(30_000)
        w.outbox_tick(A)
        w.deliver_next(MessageType.PREPARE)
        first = w.deliver_next(MessageType.RECEIVED, "drop")
        w.outbox_tick(A)
        w.deliver_next(MessageType.PREPARE)
        second = in_flight(w, MessageType.RECEIVED)[0]
        assert second.body == first.body
        assert isinstance(decode_body(MessageType.RECEIVED, second.body), Received)
        assert w.b.ledger.accounts["quota"].credits_pending == 30_000
        assert w.a.ledger.accounts["giver"].debits_pending == 30_000


def test_d3_accept_made_in_time_on_b_but_arriving_after_the_deadline_aborts_3303() -> None:
    with finally_at_rest(world(start_ms=DAY0_MS + 5 * HOUR_MS + 45 * MINUTE_MS)) as w:
        w.skew(B, -5 * MINUTE_MS)  # B's clock is behind; durations make it irrelevant
        grant_to_pending(w, 30_000)
        w.advance(11 * MINUTE_MS)  # 05:56 on A, 05:51 on B: still inside B's window
        w.receiver_acts(0, "accept")
        assert b_of(w).state is ReceiverState.ACCEPTED
        w.outbox_tick(B)
        w.advance(5 * MINUTE_MS)  # a slow link: the ACCEPT reaches A at 06:01
        w.deliver_next(MessageType.ACCEPT)
        decision = a_of(w).decision
        assert decision is not None and decision.outcome is Outcome.ABORT
        assert decision.reason is not None and decision.reason.code is ErrorCode.EXPIRED
        w.deliver_next(MessageType.DECISION)
        assert b_of(w).state is ReceiverState.ABORTED
        assert (
            giver_available_fen(w) == GIVER_BALANCE_FEN
            and w.b.ledger.accounts["quota"].credits_pending == 0
        )


def test_d4_commit_without_its_decision_message_reaches_b_through_the_resolver() -> None:
    with finally_at_rest(world()) as w:
        grant_to_pending(w, 30_000)
        w.receiver_acts(0, "accept")
        w.outbox_tick(B)
        w.deliver_next(MessageType.ACCEPT, "crash_after")  # A commits, the reply is lost
        assert a_of(w).state is GiverState.COMMITTED and not w.a.up
        w.restart(A)
        w.advance(21 * HOUR_MS)  # past accept_within + grace: B asks
        w.resolve()
        w.deliver_next(MessageType.STATUS_REQ)
        w.deliver_next(MessageType.STATUS)
        assert b_of(w).state is ReceiverState.COMMITTED
        w.outbox_tick(A)  # the outbox still re-sends the COMMIT; B answers with its stored ACK
        w.deliver_next(MessageType.DECISION)
        w.deliver_next(MessageType.ACK)
        assert a_of(w).acked


def test_d5a_b_crash_before_commit_leaves_no_row_and_the_retry_is_handled_fresh() -> None:
    with finally_at_rest(world()) as w:
        w.instruct(30_000)
        w.outbox_tick(A)
        w.deliver_next(MessageType.PREPARE, "crash_before")
        assert w.b.transfers == {}
        w.restart(B)
        w.outbox_tick(A)
        w.deliver_next(MessageType.PREPARE)
        assert b_of(w).state is ReceiverState.PENDING_ACCEPT
        assert w.b.ledger.accounts["quota"].credits_pending == 30_000


def test_d5b_accept_committed_before_a_b_crash_is_sent_after_restart() -> None:
    with finally_at_rest(world()) as w:
        grant_to_pending(w, 30_000)
        w.receiver_acts(0, "accept")
        w.b.up = False
        w.outbox_tick(B)
        assert in_flight(w, MessageType.ACCEPT) == []
        w.restart(B)
        w.outbox_tick(B)
        w.deliver_next(MessageType.ACCEPT)
        assert a_of(w).state is GiverState.COMMITTED


def test_d8_ten_hour_partition_across_0600_aborts_at_a_and_b_voids_on_heal() -> None:
    with finally_at_rest(world(start_ms=DAY0_MS + 22 * HOUR_MS)) as w:
        grant_to_pending(w, 30_000)
        w.receiver_acts(0, "accept")
        w.outbox_tick(B)
        w.deliver_next(MessageType.ACCEPT, "drop")  # the partition starts
        w.advance(10 * HOUR_MS)
        w.sweep()
        assert a_of(w).state is GiverState.ABORTED and giver_available_fen(w) == GIVER_BALANCE_FEN
        assert b_of(w).state is ReceiverState.ACCEPTED  # B holds the quota, unspendable
        assert w.b.ledger.accounts["quota"].credits_posted == 0
        w.resolve()
        assert AlertKind.IN_DOUBT in [a.kind for a in w.b.alerts]  # paged after an hour
        w.in_flight.clear()  # everything sent during the partition is lost
        w.outbox_tick(A)
        w.deliver_next(MessageType.DECISION)
        assert b_of(w).state is ReceiverState.ABORTED


def test_d10_key_rotation_during_traffic_refreshes_the_keyset_once_and_continues() -> None:
    with finally_at_rest(world(envelopes=True)) as w:
        grant_to_pending(w, 30_000)
        w.rotate_key(A, activate_ms=0, retire_ms=HOUR_MS)
        stale = w.directories[B].keyset(A)
        w.receiver_acts(0, "accept")
        w.outbox_tick(B)
        w.deliver_next(MessageType.ACCEPT)
        w.deliver_next(MessageType.DECISION)  # signed with A's new key, unknown to B's cache
        assert b_of(w).state is ReceiverState.COMMITTED
        refreshed = w.directories[B].keyset(A)
        assert stale is not None and refreshed is not None and refreshed.seq == stale.seq + 1


def test_two_grants_that_together_exceed_the_balance_hold_once_and_reject_4000() -> None:
    with finally_at_rest(world()) as w:
        w.instruct(100_000)
        w.instruct(100_000)
        first, second = (w.a.transfers[t] for t in w.created)
        assert (first.state, second.state) == (GiverState.PREPARED_A, GiverState.REJECTED)
        assert second.reject_code is ErrorCode.GIVER_INSUFFICIENT_BALANCE
        assert w.a.ledger.accounts["giver"].debits_pending == 100_000


def test_relationship_ending_declines_a_pending_grant_and_returns_the_money() -> None:
    with finally_at_rest(world()) as w:
        grant_to_pending(w, 30_000)
        w.receiver_acts(0, "end")
        w.outbox_tick(B)
        w.deliver_next(MessageType.DECLINE)
        decision = a_of(w).decision
        assert decision is not None and decision.reason is not None
        assert decision.reason.code is ErrorCode.GIVER_PERMISSION
        assert giver_available_fen(w) == GIVER_BALANCE_FEN
