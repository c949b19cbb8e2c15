"""Node A, the giver's node, on one database: instructions, B's answers, expiry, RELEASE.

The node under test is prov-13; the fake receiver node prov-11 answers with messages built
by protocol/ and signed with its own key. Balances are checked to the fen on the giver's
personal account and on the due_to:prov-11 clearing sub-accounts after every step.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from nodes.settings import Settings
from protocol.clock import HOUR_MS
from protocol.errors import ErrorCode
from protocol.ids import uuid7
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
    Release,
    ReleasedGrant,
    RelReply,
    Status,
    StatusReq,
    hash_body,
)
from tests.support import (
    PASSWORD,
    bearer,
    credit,
    import_persons,
    open_wallet,
    person,
)
from tests.wallet.grants_support import (
    PEER,
    add_relation,
    balance,
    books_balanced,
    clearing,
    deliver,
    grant_node_settings,
    outbox,
    outbox_body,
    person_id,
    personal_account,
)
from tests.wallet.service_context import wallet_context
from wallet import ledger
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.errors import WalletError
from wallet.otp import RecordingOtpSender
from wallet.plt import grants
from wallet.plt.grants_base import to_ms

Client = AsyncTestClient[Any]
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
# START (tests/conftest.py) is 2026-03-16 10:00 in Shanghai: the grant's deadline is the
# next 06:00, 2026-03-17 06:00 Shanghai.
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)
BALANCE = 500_000


@dataclass
class Giver:
    token: str
    person_id: int
    account_id: int
    relations: list[str]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return grant_node_settings(database_url)


@pytest.fixture
async def svc(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as ctx:
        yield ctx


async def make_giver(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    *,
    balance_fen: int = BALANCE,
    relations: int = 1,
) -> Giver:
    giver = person(1, "张三丰")
    await import_persons(client, giver)
    token = await open_wallet(client, otp, giver)
    await credit(client, "2026-03-a", {giver["id_number"]: balance_fen})
    pid = await person_id(db, giver)
    rels = [
        await add_relation(db, "giver", pid, other_ref=f"w-{40 + i}", seq=i + 1)
        for i in range(relations)
    ]
    return Giver(token, pid, await personal_account(db, giver), rels)


async def instruct(
    client: Client,
    giver: Giver,
    amount_fen: int,
    *,
    relation: int = 0,
    transfer_id: str | None = None,
) -> Any:
    return await client.post(
        "/app/v1/grants",
        json={
            "transfer_id": transfer_id or uuid7(),
            "relation_id": giver.relations[relation],
            "amount_fen": amount_fen,
            "payment_password": PASSWORD,
        },
        headers=bearer(giver.token),
    )


async def granted(client: Client, giver: Giver, amount_fen: int, relation: int = 0) -> str:
    response = await instruct(client, giver, amount_fen, relation=relation)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "PREPARED_A"
    tid: str = response.json()["transfer_id"]
    return tid


async def assert_money(
    db: Any, giver: Giver, *, available: int, pending: int, due_posted: int, due_pending: int
) -> None:
    b = await balance(db, giver.account_id)
    assert (b.available_fen, b.debits_pending) == (available, pending)
    assert await clearing(db, "due_to") == (due_posted, due_pending)
    await books_balanced(db)


def accept_of(prepare: Prepare, at: dt.datetime) -> Accept:
    return Accept(
        transfer_id=prepare.transfer_id,
        prepare_hash=hash_body(prepare),
        b_hold_id=uuid7(),
        accepted_at_ms=to_ms(at),
        acceptance=Acceptance(method="pin", ref="pin-9"),
    )


# --- the instruction -----------------------------------------------------------------------------


async def test_instruction_holds_the_amount_and_queues_prepare(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    response = await instruct(client, giver, 120_000)
    assert response.status_code == 202, response.text
    view = response.json()
    assert view["state"] == "PREPARED_A"
    assert view["amount_fen"] == 120_000
    assert view["to_node"] == PEER
    assert dt.datetime.fromisoformat(view["decide_by"]) == DECIDE_BY
    await assert_money(
        db, giver, available=380_000, pending=120_000, due_posted=0, due_pending=120_000
    )
    row = await outbox(db, MessageType.PREPARE, view["transfer_id"])
    assert row is not None and row["to_node"] == PEER
    assert row["give_up_at"] == DECIDE_BY
    prepare = await outbox_body(db, MessageType.PREPARE, view["transfer_id"])
    assert isinstance(prepare, Prepare)
    assert prepare.amount_fen == 120_000
    assert prepare.receiver.account_id == "w-40"
    assert prepare.accept_within_ms == to_ms(DECIDE_BY) - to_ms(
        dt.datetime(2026, 3, 16, 2, tzinfo=dt.UTC)
    )
    assert prepare.giver.masked_name == "张**"
    assert "张三丰" not in repr(prepare)
    # The hold is the grant's, in the audit trail with the instruction's request id.
    held = await db.fetchrow(
        "SELECT t.amount_fen, t.phase, t.purpose, g.hold_ref FROM grant_out g"
        " JOIN ledger_transfer t ON t.id = g.hold_id WHERE g.transfer_id = $1",
        view["transfer_id"],
    )
    assert dict(held) == {
        "amount_fen": 120_000,
        "phase": "pending",
        "purpose": "cross_province_grant",
        "hold_ref": prepare.a_hold_id,
    }
    event = await db.fetchrow(
        "SELECT actor, action, detail::text, request_id IS NOT NULL AS has_request_id"
        " FROM audit_event WHERE subject = $1",
        f"grant:{view['transfer_id']}",
    )
    assert event["actor"] == f"person:{giver.person_id}"
    assert event["action"] == "grant.hold"
    assert json.loads(event["detail"]) == {
        "side": "giver",
        "amount_fen": 120_000,
        "peer": PEER,
        "relation_id": prepare.relation.relation_id,
    }
    assert event["has_request_id"]


async def test_the_same_instruction_again_returns_the_grant_and_holds_once(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = uuid7()
    first = await instruct(client, giver, 50_000, transfer_id=tid)
    again = await instruct(client, giver, 50_000, transfer_id=tid)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    await assert_money(
        db, giver, available=450_000, pending=50_000, due_posted=0, due_pending=50_000
    )
    assert await db.fetchval("SELECT count(*) FROM plt_outbox WHERE typ = 'PREPARE'") == 1


async def test_a_modified_instruction_is_3106_and_names_what_differs(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = uuid7()
    await instruct(client, giver, 50_000, transfer_id=tid)
    response = await instruct(client, giver, 60_000, transfer_id=tid)
    assert response.status_code == 409
    problem = response.json()
    assert problem["code"] == "idempotency_conflict"
    assert problem["plt_code"] == 3106
    assert problem["differs"] == ["amount_fen"]
    await assert_money(
        db, giver, available=450_000, pending=50_000, due_posted=0, due_pending=50_000
    )


async def test_wrong_payment_password_holds_nothing(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    response = await client.post(
        "/app/v1/grants",
        json={
            "transfer_id": uuid7(),
            "relation_id": giver.relations[0],
            "amount_fen": 1_000,
            "payment_password": "000111",
        },
        headers=bearer(giver.token),
    )
    assert response.status_code == 403
    assert response.json()["code"] == "payment_password_wrong"
    assert await db.fetchval("SELECT count(*) FROM grant_out") == 0


async def test_bad_instructions_are_400_never_500(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    good = {
        "transfer_id": uuid7(),
        "relation_id": giver.relations[0],
        "amount_fen": 1_000,
        "payment_password": PASSWORD,
    }
    for change, code in (
        ({"amount_fen": "100"}, "amount_invalid"),
        ({"amount_fen": 0}, "amount_invalid"),
        ({"amount_fen": 2**63}, "amount_invalid"),
        ({"transfer_id": "not-a-uuid-but-36-characters-long!!!"}, "invalid_request"),
        ({"transfer_id": "01a203a4-06e1-482f-9242-7c260bbddf70"}, "invalid_request"),
        ({"payment_password": 135790}, "invalid_request"),
        ({"extra": 1}, "invalid_request"),
    ):
        response = await client.post(
            "/app/v1/grants", json={**good, **change}, headers=bearer(giver.token)
        )
        assert response.status_code == 400, (change, response.text)
        assert response.json()["code"] == code, change
    assert await db.fetchval("SELECT count(*) FROM grant_out") == 0


async def test_an_unknown_or_unconfirmed_relationship_is_refused(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db)
    unknown = await client.post(
        "/app/v1/grants",
        json={
            "transfer_id": uuid7(),
            "relation_id": uuid7(),
            "amount_fen": 1_000,
            "payment_password": PASSWORD,
        },
        headers=bearer(giver.token),
    )
    assert unknown.status_code == 404
    ended = await add_relation(db, "giver", giver.person_id, state="ended", seq=9, other_ref="w-9")
    giver.relations.append(ended)
    response = await instruct(client, giver, 1_000, relation=1)
    assert response.status_code == 422
    assert response.json()["plt_code"] == 4300
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)


# --- limits (RULES 13) -----------------------------------------------------------------------------


async def test_a_grant_is_at_most_2000_cny(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db, relations=2)
    over = await instruct(client, giver, 200_001)
    assert over.status_code == 422
    assert (over.json()["plt_code"], over.json()["state"]) == (4200, "REJECTED")
    # A rejection is stored: the same instruction again gets the same answer.
    again = await instruct(client, giver, 200_001, transfer_id=over.json()["transfer_id"])
    assert again.status_code == 422 and again.json()["plt_code"] == 4200
    await granted(client, giver, 200_000, relation=1)
    await assert_money(
        db, giver, available=300_000, pending=200_000, due_posted=0, due_pending=200_000
    )


async def test_three_grants_a_day_counting_pending_and_committed_not_rejected(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db, relations=5)
    first = await granted(client, giver, 1_000, relation=0)
    rejected = await instruct(client, giver, 999_999_999, relation=1)
    assert rejected.json()["plt_code"] == 4200  # rejected: does not count
    await granted(client, giver, 1_000, relation=1)
    # The first one is committed: it still counts.
    prepare = await outbox_body(db, MessageType.PREPARE, first)
    assert isinstance(prepare, Prepare)
    await deliver(svc, accept_of(prepare, clock.now()))
    await granted(client, giver, 1_000, relation=2)
    fourth = await instruct(client, giver, 1_000, relation=3)
    assert (fourth.status_code, fourth.json()["plt_code"]) == (422, 4200)
    # 21:59 the same day in Shanghai: still the same calendar day.
    clock.set(dt.datetime(2026, 3, 16, 21, 59, tzinfo=SHANGHAI))
    late = await instruct(client, giver, 1_000, relation=3)
    assert late.json()["plt_code"] == 4200
    # 06:00 the next day (the blackout ends): a new day, three more.
    clock.set(dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI))
    await grants.sweeper_run_once(svc)  # the pending ones of yesterday expire now
    await granted(client, giver, 1_000, relation=3)


async def test_an_aborted_grant_does_not_count_for_the_day(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db, relations=4)
    declined = await granted(client, giver, 1_000, relation=0)
    prepare = await outbox_body(db, MessageType.PREPARE, declined)
    assert isinstance(prepare, Prepare)
    await deliver(
        svc,
        Decline(
            transfer_id=declined,
            prepare_hash=hash_body(prepare),
            error=ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
        ),
    )
    for relation in (1, 2, 3):
        await granted(client, giver, 1_000, relation=relation)


async def test_no_grants_between_22_00_and_06_00(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
) -> None:
    giver = await make_giver(client, otp, db, relations=2)
    relation = 0
    for local, allowed in (
        (dt.datetime(2026, 3, 16, 21, 59, 59, tzinfo=SHANGHAI), True),
        (dt.datetime(2026, 3, 16, 22, 0, tzinfo=SHANGHAI), False),
        (dt.datetime(2026, 3, 17, 2, 30, tzinfo=SHANGHAI), False),
        (dt.datetime(2026, 3, 17, 5, 59, tzinfo=SHANGHAI), False),
        (dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI), True),
    ):
        clock.set(local)
        response = await instruct(client, giver, 1_000, relation=relation)
        if allowed:
            assert response.status_code == 202, (local, response.text)
            relation += 1
            continue
        assert response.status_code == 422, local
        problem = response.json()
        assert (problem["plt_code"], problem["plt_class"], problem["state"]) == (
            4300,
            "T",
            "REJECTED",
        )
    await assert_money(
        db, giver, available=BALANCE - 2_000, pending=2_000, due_posted=0, due_pending=2_000
    )


async def test_one_pending_grant_per_pair(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db, relations=2)
    first = await granted(client, giver, 10_000)
    second = await instruct(client, giver, 10_000)
    assert (second.status_code, second.json()["plt_code"]) == (422, 4200)
    await granted(client, giver, 10_000, relation=1)  # another relative: fine
    prepare = await outbox_body(db, MessageType.PREPARE, first)
    assert isinstance(prepare, Prepare)
    await deliver(svc, accept_of(prepare, clock.now()))
    await granted(client, giver, 10_000)  # the pair's grant is decided: a new one may go


async def test_insufficient_balance_is_4000_and_stored(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    giver = await make_giver(client, otp, db, balance_fen=100_000)
    response = await instruct(client, giver, 100_001)
    assert response.status_code == 409
    problem = response.json()
    assert (problem["code"], problem["plt_code"], problem["state"]) == (
        "insufficient_funds",
        4000,
        "REJECTED",
    )
    row = await db.fetchrow("SELECT state, reject_code, hold_id FROM grant_out")
    assert dict(row) == {"state": "REJECTED", "reject_code": 4000, "hold_id": None}
    await assert_money(db, giver, available=100_000, pending=0, due_posted=0, due_pending=0)


async def test_two_concurrent_instructions_beyond_the_balance_hold_exactly_one(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db, balance_fen=150_000, relations=2)

    async def one(relation: int) -> str:
        try:
            view = await grants.instruct(
                svc,
                giver.person_id,
                transfer_id=uuid7(),
                relation_id=giver.relations[relation],
                amount_fen=100_000,
                payment_password=PASSWORD,
            )
        except WalletError as exc:
            return f"{exc.code.value}:{exc.extensions['plt_code']}"
        return view.state.value

    outcomes = sorted(await asyncio.gather(one(0), one(1)))
    assert outcomes == ["PREPARED_A", "insufficient_funds:4000"]
    await assert_money(
        db, giver, available=50_000, pending=100_000, due_posted=0, due_pending=100_000
    )


# --- B's answers -----------------------------------------------------------------------------------


async def test_received_marks_the_grant_seen_and_stops_prepare_retries(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 30_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    received = Received(
        transfer_id=tid,
        prepare_hash=hash_body(prepare),
        b_hold_id=uuid7(),
        b_received_at_ms=to_ms(clock.now()),
    )
    assert await deliver(svc, received, is_reply=True) is None
    row = await outbox(db, MessageType.PREPARE, tid)
    assert row is not None and row["done_at"] is not None
    view = (await client.get(f"/app/v1/grants/{tid}", headers=bearer(giver.token))).json()
    assert (view["state"], view["receiver_seen"]) == ("PREPARED_A", True)


async def test_accept_before_the_deadline_commits_and_ack_stops_the_decision(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 80_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    clock.set(DECIDE_BY)  # the very deadline still commits
    accept = accept_of(prepare, clock.now())
    decision = await deliver(svc, accept)
    assert isinstance(decision, Decision)
    assert (decision.outcome, decision.vote_hash) == (Outcome.COMMIT, hash_body(accept))
    await assert_money(db, giver, available=420_000, pending=0, due_posted=80_000, due_pending=0)
    queued = await outbox_body(db, MessageType.DECISION, tid)
    assert queued == decision
    # The same ACCEPT again gets the same DECISION; nothing moves twice.
    assert await deliver(svc, accept) == decision
    ack = Ack(
        transfer_id=tid,
        decision_hash=hash_body(decision),
        final_state="COMMITTED",
        completed_at_ms=to_ms(clock.now()),
    )
    assert await deliver(svc, ack, is_reply=True) is None
    row = await outbox(db, MessageType.DECISION, tid)
    assert row is not None and row["done_at"] is not None
    view = (await client.get(f"/app/v1/grants/{tid}", headers=bearer(giver.token))).json()
    assert (view["state"], view["acknowledged"]) == ("COMMITTED", True)
    await assert_money(db, giver, available=420_000, pending=0, due_posted=80_000, due_pending=0)


async def test_accept_after_the_deadline_aborts_with_3303(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 80_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    clock.set(DECIDE_BY + dt.timedelta(milliseconds=1))  # the sweeper has not run yet
    decision = await deliver(svc, accept_of(prepare, clock.now()))
    assert isinstance(decision, Decision) and decision.outcome is Outcome.ABORT
    assert decision.reason is not None and decision.reason.code is ErrorCode.EXPIRED
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)
    view = (await client.get(f"/app/v1/grants/{tid}", headers=bearer(giver.token))).json()
    assert (view["state"], view["code"]) == ("ABORTED", 3303)


async def test_decline_aborts_and_returns_the_amount(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 80_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    decline = Decline(
        transfer_id=tid,
        prepare_hash=hash_body(prepare),
        error=ErrorBody.of(ErrorCode.RECEIVER_DECLINED),
    )
    decision = await deliver(svc, decline)
    assert isinstance(decision, Decision) and decision.outcome is Outcome.ABORT
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)
    assert (await outbox(db, MessageType.PREPARE, tid))["done_at"] is not None  # type: ignore[index]


async def test_a_second_different_vote_is_3106_and_changes_nothing(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 80_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    await deliver(svc, accept_of(prepare, clock.now()))
    other = await deliver(svc, accept_of(prepare, clock.now() + dt.timedelta(seconds=1)))
    assert isinstance(other, ErrorReply) and other.error.code is ErrorCode.MODIFIED_REQUEST
    await assert_money(db, giver, available=420_000, pending=0, due_posted=80_000, due_pending=0)
    alerts = await db.fetchval(
        "SELECT count(*) FROM audit_event WHERE action = 'alert.modified_request'"
    )
    assert alerts == 1


async def test_a_vote_from_another_node_is_unknown(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    from tests.wallet.grants_support import incoming
    from wallet.plt.dispatch import dispatch

    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 80_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    reply = await dispatch(
        svc, incoming(accept_of(prepare, clock.now()), now=clock.now(), from_node="prov-41")
    )
    assert isinstance(reply, ErrorReply) and reply.error.code is ErrorCode.UNKNOWN_TRANSFER
    await assert_money(
        db, giver, available=420_000, pending=80_000, due_posted=0, due_pending=80_000
    )


# --- expiry ------------------------------------------------------------------------------------------


async def test_the_sweeper_expires_at_06_00_not_before(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 70_000)
    clock.set(dt.datetime(2026, 3, 17, 5, 59, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(svc) == 0
    await assert_money(
        db, giver, available=430_000, pending=70_000, due_posted=0, due_pending=70_000
    )
    clock.set(dt.datetime(2026, 3, 17, 6, 1, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(svc) == 1
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)
    decision = await outbox_body(db, MessageType.DECISION, tid)
    assert isinstance(decision, Decision) and decision.outcome is Outcome.ABORT
    assert decision.reason is not None and decision.reason.code is ErrorCode.EXPIRED
    assert (await outbox(db, MessageType.PREPARE, tid))["done_at"] is not None  # type: ignore[index]
    assert await grants.sweeper_run_once(svc) == 0
    # A late ACCEPT now gets the stored ABORT.
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    assert await deliver(svc, accept_of(prepare, clock.now())) == decision
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)


async def test_the_sweeper_works_in_batches(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    from wallet.plt import grants_giver

    giver = await make_giver(client, otp, db, relations=3)
    for relation in range(3):
        await granted(client, giver, 1_000, relation=relation)
    clock.set(DECIDE_BY + dt.timedelta(minutes=1))
    assert await grants_giver.sweep_once(svc, batch=2) == 2
    assert await grants_giver.sweep_once(svc, batch=2) == 1
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)


# --- STATUS ------------------------------------------------------------------------------------------


async def test_status_reports_the_state_and_presumes_abort_for_unknown_ids(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 1_000)
    stranger = uuid7()
    clock.advance(hours=1)
    status = await deliver(svc, StatusReq(transfer_ids=(tid, stranger)))
    assert isinstance(status, Status)
    pending, unknown = status.items
    assert (pending.state, pending.undecided_remaining_ms) == ("PREPARED_A", 19 * HOUR_MS)
    assert (unknown.transfer_id, unknown.state, unknown.presumed) == (stranger, "ABORTED", True)


# --- RELEASE -------------------------------------------------------------------------------------------


async def test_release_returns_the_unused_part_once(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 100_000)
    prepare = await outbox_body(db, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    await deliver(svc, accept_of(prepare, clock.now()))
    relation_id = giver.relations[0]
    release = Release(
        release_id=uuid7(),
        relation_id=relation_id,
        grants=(
            ReleasedGrant(
                transfer_id=tid, granted_fen=100_000, used_fen=30_000, released_fen=70_000
            ),
        ),
        closed_at_ms=to_ms(clock.now()),
    )
    reply = await deliver(svc, release)
    assert isinstance(reply, RelReply) and reply.outcome == "OK"
    await assert_money(db, giver, available=470_000, pending=0, due_posted=30_000, due_pending=0)
    assert await deliver(svc, release) == reply  # a duplicate changes nothing
    # A later RELEASE (a refund after the close) says 80,000 released in all: 10,000 more.
    later = Release(
        release_id=uuid7(),
        relation_id=relation_id,
        grants=(
            ReleasedGrant(
                transfer_id=tid, granted_fen=100_000, used_fen=20_000, released_fen=80_000
            ),
        ),
        closed_at_ms=to_ms(clock.now()),
    )
    assert (await deliver(svc, later)).outcome == "OK"  # type: ignore[union-attr]
    await assert_money(db, giver, available=480_000, pending=0, due_posted=20_000, due_pending=0)
    # An older cumulative figure arriving late moves nothing.
    assert (
        await deliver(svc, release.__class__(**{**_fields(release), "release_id": uuid7()}))
    ).outcome == "OK"  # type: ignore[union-attr]
    await assert_money(db, giver, available=480_000, pending=0, due_posted=20_000, due_pending=0)
    view = (await client.get(f"/app/v1/grants/{tid}", headers=bearer(giver.token))).json()
    assert view["released_fen"] == 80_000


async def test_release_for_a_grant_that_is_not_committed_is_refused(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 100_000)
    release = Release(
        release_id=uuid7(),
        relation_id=giver.relations[0],
        grants=(
            ReleasedGrant(transfer_id=tid, granted_fen=100_000, used_fen=0, released_fen=100_000),
        ),
        closed_at_ms=to_ms(clock.now()),
    )
    reply = await deliver(svc, release)
    assert isinstance(reply, RelReply) and reply.outcome == "REFUSED"
    assert reply.error is not None and reply.error.code is ErrorCode.UNKNOWN_TRANSFER
    await assert_money(
        db, giver, available=400_000, pending=100_000, due_posted=0, due_pending=100_000
    )


def _fields(body: Any) -> dict[str, Any]:
    return {name: getattr(body, name) for name in body.__struct_fields__}


async def test_grant_rows_and_holds_agree_in_sql(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> None:
    """The deferred constraint trigger refuses a COMMITTED row whose hold is not posted."""
    import asyncpg

    giver = await make_giver(client, otp, db)
    tid = await granted(client, giver, 1_000)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE grant_out SET state = 'ABORTED' WHERE transfer_id = $1", tid)
    hold = await db.fetchval("SELECT hold_id FROM grant_out WHERE transfer_id = $1", tid)
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await ledger.void_hold(db, hold, "test")
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("DELETE FROM grant_out WHERE transfer_id = $1", tid)
