"""Node B, the receiver's node, on one database: PREPARE, acceptance, DECISION, STATUS, endings.

The node under test is prov-13; the fake giver node prov-11 sends PREPAREs and DECISIONs
built by protocol/ and signed with its own key. Balances are checked to the fen on the
receiver's quota and on the due_from:prov-11 clearing sub-accounts after every step.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from nodes.settings import Settings
from protocol.clock import ACCEPT_MARGIN_MS, RESOLVER_GRACE_MS, next_0600, window_id
from protocol.errors import ErrorCode
from protocol.ids import uuid7
from protocol.messages import (
    Accept,
    Ack,
    Decision,
    Decline,
    ErrorBody,
    ErrorReply,
    GiverRef,
    MessageType,
    Outcome,
    Prepare,
    Received,
    ReceiverRef,
    RelationRef,
    RelationType,
    Release,
    Status,
    StatusItem,
    StatusReq,
    UserAuth,
    decode_body,
    hash_body,
)
from tests.support import (
    OPERATOR,
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
    attach_plt,
    books_balanced,
    clearing,
    deliver,
    grant_node_settings,
    outbox,
    outbox_body,
    person_id,
    sealed,
)
from tests.wallet.service_context import wallet_context
from wallet import ledger
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender
from wallet.plt import grants
from wallet.plt.grants_base import to_ms

Client = AsyncTestClient[Any]
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)


@dataclass
class Receiver:
    who: dict[str, Any]
    token: str
    person_id: int
    relation_id: str


@pytest.fixture
def settings(database_url: str) -> Settings:
    return grant_node_settings(database_url)


@pytest.fixture
async def svc(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as ctx:
        attach_plt(ctx)
        yield ctx


async def make_receiver(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
) -> Receiver:
    who = person(2, "李小龙", scheme="resident")
    await import_persons(client, who)
    token = await open_wallet(client, otp, who)
    pid = await person_id(db, who)
    relation_id = await add_relation(db, "receiver", pid, other_ref="p-7")
    return Receiver(who, token, pid, relation_id)


def prepare_for(
    who: Receiver, now: dt.datetime, amount_fen: int = 100_000, **changes: Any
) -> Prepare:
    now_ms = to_ms(now)
    fields: dict[str, Any] = {
        "transfer_id": uuid7(),
        "giver": GiverRef(node=PEER, account_ref="p-7", masked_name="张**"),
        "receiver": ReceiverRef(account_id=f"w-{who.person_id}"),
        "relation": RelationRef(
            relation_id=who.relation_id, type=RelationType.CHILD, verified_by_A=True
        ),
        "amount_fen": amount_fen,
        "currency": "CNY",
        "fee_fen": 0,
        "accept_within_ms": next_0600(now_ms) - now_ms,
        "window_id": window_id(now_ms),
        "user_auth": UserAuth(method="pin", verified_at_ms=now_ms, ref="pin-1"),
        "a_hold_id": uuid7(),
    }
    fields.update(changes)
    return Prepare(**fields)


def decision_for(
    prepare: Prepare, outcome: Outcome, at: dt.datetime, vote_hash: str | None = None
) -> Decision:
    return Decision(
        transfer_id=prepare.transfer_id,
        prepare_hash=hash_body(prepare),
        vote_hash=vote_hash,
        outcome=outcome,
        reason=None if outcome is Outcome.COMMIT else ErrorBody.of(ErrorCode.EXPIRED),
        decided_at_ms=to_ms(at),
        window_id=window_id(to_ms(at)),
    )


async def quota_of(db: Any, transfer_id: str) -> tuple[str, ledger.Balance]:
    row = await db.fetchrow(
        "SELECT account_id, state FROM quota WHERE transfer_id = $1", transfer_id
    )
    return row["state"], await ledger.balance(db, row["account_id"])


async def assert_quota(
    db: Any,
    transfer_id: str,
    *,
    state: str,
    available: int,
    pending: int,
    due_posted: int,
    due_pending: int,
) -> None:
    quota_state, b = await quota_of(db, transfer_id)
    assert (quota_state, b.available_fen, b.credits_pending) == (state, available, pending)
    assert await clearing(db, "due_from") == (due_posted, due_pending)
    await books_balanced(db)


async def prepared(svc: WalletContext, receiver: Receiver, amount_fen: int = 100_000) -> Prepare:
    prepare = prepare_for(receiver, svc.clock.now(), amount_fen)
    reply = await deliver(svc, prepare)
    assert isinstance(reply, Received), reply
    return prepare


async def accept_in_app(client: Client, receiver: Receiver, transfer_id: str) -> Any:
    return await client.post(
        f"/app/v1/grants/incoming/{transfer_id}/accept",
        json={"payment_password": PASSWORD},
        headers=bearer(receiver.token),
    )


# --- PREPARE -----------------------------------------------------------------------------------


async def test_prepare_holds_an_unspendable_quota_and_answers_received(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = prepare_for(receiver, svc.clock.now(), 100_000)
    reply = await deliver(svc, prepare)
    assert isinstance(reply, Received)
    assert reply.prepare_hash == hash_body(prepare)
    await assert_quota(
        db,
        prepare.transfer_id,
        state="pending",
        available=0,
        pending=100_000,
        due_posted=0,
        due_pending=-100_000,
    )
    offered = (await client.get("/app/v1/grants/incoming", headers=bearer(receiver.token))).json()
    assert len(offered) == 1
    assert (offered[0]["state"], offered[0]["acceptable"], offered[0]["amount_fen"]) == (
        "PENDING_ACCEPT",
        True,
        100_000,
    )
    assert offered[0]["giver_name_masked"] == "张**"
    accept_by = to_ms(dt.datetime.fromisoformat(offered[0]["accept_by"]))
    assert accept_by == to_ms(DECIDE_BY) - ACCEPT_MARGIN_MS
    quotas = (await client.get("/app/v1/quotas", headers=bearer(receiver.token))).json()
    assert (quotas["available_fen"], quotas["quotas"][0]["state"]) == (0, "pending")
    # The same PREPARE again gets the same signed answer's body; one hold only.
    assert await deliver(svc, prepare) == reply
    await assert_quota(
        db,
        prepare.transfer_id,
        state="pending",
        available=0,
        pending=100_000,
        due_posted=0,
        due_pending=-100_000,
    )


async def test_a_modified_prepare_is_3106(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    changed = Prepare(**{**_fields(prepare), "amount_fen": 150_000})
    reply = await deliver(svc, changed)
    assert isinstance(reply, ErrorReply)
    assert (reply.error.code, reply.differs) == (ErrorCode.MODIFIED_REQUEST, ("amount_fen",))
    await assert_quota(
        db,
        prepare.transfer_id,
        state="pending",
        available=0,
        pending=100_000,
        due_posted=0,
        due_pending=-100_000,
    )


async def test_prepare_checks_fail_with_a_decline_and_no_hold(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    now = svc.clock.now()
    cases = [
        (
            prepare_for(
                receiver,
                now,
                relation=RelationRef(
                    relation_id=uuid7(), type=RelationType.CHILD, verified_by_A=True
                ),
            ),
            ErrorCode.GIVER_PERMISSION,
        ),
        (
            prepare_for(receiver, now, receiver=ReceiverRef(account_id="w-999")),
            ErrorCode.RECEIVER_WALLET_NOT_OPEN,
        ),
        (
            prepare_for(
                receiver,
                now,
                relation=RelationRef(
                    relation_id=receiver.relation_id, type=RelationType.SPOUSE, verified_by_A=True
                ),
            ),
            ErrorCode.VALIDATION,
        ),
    ]
    for prepare, code in cases:
        reply = await deliver(svc, prepare)
        assert isinstance(reply, Decline) and reply.error.code is code, (code, reply)
    await db.execute(
        "UPDATE insured_person SET status = 'suspended' WHERE id = $1", receiver.person_id
    )
    reply = await deliver(svc, prepare_for(receiver, now))
    assert isinstance(reply, Decline) and reply.error.code is ErrorCode.RECEIVER_CHECK_FAILED
    assert await db.fetchval("SELECT count(*) FROM grant_in WHERE state = 'DECLINED'") == 4
    assert await db.fetchval("SELECT count(*) FROM quota") == 0
    assert await clearing(db, "due_from") == (0, 0)


async def test_a_prepare_claiming_another_giver_node_is_refused(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = prepare_for(
        receiver,
        svc.clock.now(),
        giver=GiverRef(node="prov-41", account_ref="p-7", masked_name="张**"),
    )
    reply = await deliver(svc, prepare)
    assert isinstance(reply, ErrorReply) and reply.error.code is ErrorCode.VALIDATION
    assert await db.fetchval("SELECT count(*) FROM grant_in") == 0


# --- the receiver's answer and A's decision --------------------------------------------------------


async def test_accept_then_commit_makes_the_quota_spendable(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver, 100_000)
    tid = prepare.transfer_id
    response = await accept_in_app(client, receiver, tid)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "ACCEPTED"
    accept = await outbox_body(db, MessageType.ACCEPT, tid)
    assert isinstance(accept, Accept) and accept.prepare_hash == hash_body(prepare)
    assert accept.acceptance.method == "pin"
    # Accepting twice is harmless.
    assert (await accept_in_app(client, receiver, tid)).json()["state"] == "ACCEPTED"
    await assert_quota(
        db, tid, state="pending", available=0, pending=100_000, due_posted=0, due_pending=-100_000
    )
    commit = decision_for(prepare, Outcome.COMMIT, svc.clock.now(), vote_hash=hash_body(accept))
    ack = await deliver(svc, commit, is_reply=True)  # the DECISION answering our ACCEPT
    assert ack is None
    await assert_quota(
        db, tid, state="active", available=100_000, pending=0, due_posted=-100_000, due_pending=0
    )
    assert (await outbox(db, MessageType.ACCEPT, tid))["done_at"] is not None  # type: ignore[index]
    # A's outbox sends the same DECISION again: the stored ACK answers it.
    again = await deliver(svc, commit)
    assert isinstance(again, Ack) and again.decision_hash == hash_body(commit)
    assert again.final_state == "COMMITTED"
    # The same answer while another step holds the grant's row: a decided grant's stored ACK
    # needs no row lock (and no commit).
    async with db.transaction():
        await db.execute("SELECT 1 FROM grant_in WHERE transfer_id = $1 FOR UPDATE", tid)
        assert await asyncio.wait_for(deliver(svc, commit), timeout=10) == again
    quotas = (await client.get("/app/v1/quotas", headers=bearer(receiver.token))).json()
    assert (quotas["granted_fen"], quotas["used_fen"], quotas["available_fen"]) == (
        100_000,
        0,
        100_000,
    )
    assert quotas["quotas"][0]["giver_name_masked"] == "张**"
    await assert_quota(
        db, tid, state="active", available=100_000, pending=0, due_posted=-100_000, due_pending=0
    )


async def test_decline_then_abort_returns_nothing_spendable(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver, 100_000)
    tid = prepare.transfer_id
    response = await client.post(
        f"/app/v1/grants/incoming/{tid}/decline",
        json={"payment_password": PASSWORD},
        headers=bearer(receiver.token),
    )
    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["code"]) == ("DECLINED_PENDING", 5104)
    decline = await outbox_body(db, MessageType.DECLINE, tid)
    assert isinstance(decline, Decline) and decline.error.code is ErrorCode.RECEIVER_DECLINED
    # The hold stays until A decides.
    await assert_quota(
        db, tid, state="pending", available=0, pending=100_000, due_posted=0, due_pending=-100_000
    )
    abort = decision_for(prepare, Outcome.ABORT, svc.clock.now(), vote_hash=hash_body(decline))
    ack = await deliver(svc, abort)
    assert isinstance(ack, Ack) and ack.final_state == "ABORTED"
    await assert_quota(db, tid, state="void", available=0, pending=0, due_posted=0, due_pending=0)
    # Accepting now is refused.
    assert (await accept_in_app(client, receiver, tid)).status_code == 409


async def test_acceptance_stops_two_minutes_before_the_deadline(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    clock.set(DECIDE_BY - dt.timedelta(milliseconds=ACCEPT_MARGIN_MS - 1))
    response = await accept_in_app(client, receiver, prepare.transfer_id)
    assert response.status_code == 409
    assert (response.json()["code"], response.json()["plt_code"]) == ("state_conflict", 3303)
    assert await outbox(db, MessageType.ACCEPT, prepare.transfer_id) is None
    assert (await client.get("/app/v1/grants/incoming", headers=bearer(receiver.token))).json()[0][
        "acceptable"
    ] is False


async def test_an_abort_before_the_prepare_leaves_a_tombstone(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = prepare_for(receiver, svc.clock.now())
    ack = await deliver(svc, decision_for(prepare, Outcome.ABORT, svc.clock.now()))
    assert isinstance(ack, Ack) and ack.final_state == "ABORTED"
    late = await deliver(svc, prepare)
    assert isinstance(late, Decline) and late.error.code is ErrorCode.EXPIRED
    assert await db.fetchval("SELECT count(*) FROM quota") == 0
    assert await clearing(db, "due_from") == (0, 0)
    await books_balanced(db)


async def test_a_commit_without_our_accept_is_3208(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    reply = await deliver(
        svc, decision_for(prepare, Outcome.COMMIT, svc.clock.now(), vote_hash="0" * 64)
    )
    assert isinstance(reply, ErrorReply) and reply.error.code is ErrorCode.UNKNOWN_TRANSFER
    await assert_quota(
        db,
        prepare.transfer_id,
        state="pending",
        available=0,
        pending=100_000,
        due_posted=0,
        due_pending=-100_000,
    )


async def test_equivocation_keeps_both_decisions_and_freezes_the_peer(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    await accept_in_app(client, receiver, prepare.transfer_id)
    accept = await outbox_body(db, MessageType.ACCEPT, prepare.transfer_id)
    await deliver(
        svc, decision_for(prepare, Outcome.COMMIT, svc.clock.now(), vote_hash=hash_body(accept))
    )
    abort = decision_for(prepare, Outcome.ABORT, svc.clock.now(), vote_hash=hash_body(accept))
    reply = await deliver(svc, abort)
    assert isinstance(reply, ErrorReply)
    assert (reply.error.code, reply.differs) == (ErrorCode.MODIFIED_REQUEST, ("outcome",))
    row = await db.fetchrow("SELECT state, cardinality(conflicting) AS n FROM grant_in")
    assert (row["state"], row["n"]) == ("COMMITTED", 1)
    assert await db.fetchval("SELECT node FROM peer_link") == PEER
    assert (
        await db.fetchval("SELECT count(*) FROM audit_event WHERE action = 'alert.equivocation'")
        == 1
    )
    await assert_quota(
        db,
        prepare.transfer_id,
        state="active",
        available=100_000,
        pending=0,
        due_posted=-100_000,
        due_pending=0,
    )


# --- the in-doubt resolver -----------------------------------------------------------------------


async def test_the_resolver_asks_a_after_the_deadline_and_applies_its_signed_decision(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    await accept_in_app(client, receiver, prepare.transfer_id)
    accept = await outbox_body(db, MessageType.ACCEPT, prepare.transfer_id)
    clock.set(DECIDE_BY + dt.timedelta(milliseconds=RESOLVER_GRACE_MS - 1))
    assert await grants.resolver_run_once(svc) == 0
    clock.set(DECIDE_BY + dt.timedelta(milliseconds=RESOLVER_GRACE_MS))
    assert await grants.resolver_run_once(svc) == 1
    request = await db.fetchrow(
        "SELECT dedup_key, body, to_node FROM plt_outbox WHERE typ = 'STATUS_REQ'"
    )
    assert request["to_node"] == PEER
    assert StatusReq(transfer_ids=(prepare.transfer_id,)) == __import__(
        "protocol.messages", fromlist=["decode_body"]
    ).decode_body(MessageType.STATUS_REQ, bytes(request["body"]))
    assert await grants.resolver_run_once(svc) == 0  # backed off: not asked again at once
    clock.advance(minutes=2)  # due again: the operator's list shows it
    (doubt,) = await grants.in_doubt(svc)
    assert (doubt.side, doubt.transfer_id, doubt.peer, doubt.state) == (
        "receiver",
        prepare.transfer_id,
        PEER,
        "ACCEPTED",
    )
    commit = decision_for(prepare, Outcome.COMMIT, clock.now(), vote_hash=hash_body(accept))
    envelope = sealed(commit, now_ms=to_ms(clock.now()))
    status = Status(
        items=(StatusItem(transfer_id=prepare.transfer_id, state="COMMITTED", decision=envelope),)
    )
    assert await deliver(svc, status, is_reply=True) is None
    await assert_quota(
        db,
        prepare.transfer_id,
        state="active",
        available=100_000,
        pending=0,
        due_posted=-100_000,
        due_pending=0,
    )
    stopped = await db.fetchval("SELECT done_at FROM plt_outbox WHERE typ = 'STATUS_REQ'")
    assert stopped is not None


async def test_a_presumed_abort_voids_a_hold_but_never_a_commit(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    pending = await prepared(svc, receiver, 10_000)
    status = Status(
        items=(StatusItem(transfer_id=pending.transfer_id, state="ABORTED", presumed=True),)
    )
    await deliver(svc, status, is_reply=True)
    await assert_quota(
        db, pending.transfer_id, state="void", available=0, pending=0, due_posted=0, due_pending=0
    )
    assert await db.fetchval("SELECT presumed_abort FROM grant_in") is True


async def test_a_status_decision_signed_by_someone_else_is_ignored(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    prepare = await prepared(svc, receiver)
    forged = sealed(
        decision_for(prepare, Outcome.ABORT, svc.clock.now()),
        now_ms=to_ms(svc.clock.now()),
        from_node="prov-41",
    )
    status = Status(
        items=(StatusItem(transfer_id=prepare.transfer_id, state="ABORTED", decision=forged),)
    )
    await deliver(svc, status, is_reply=True)
    await assert_quota(
        db,
        prepare.transfer_id,
        state="pending",
        available=0,
        pending=100_000,
        due_posted=0,
        due_pending=-100_000,
    )


# --- the relationship ends ---------------------------------------------------------------------------


async def test_ending_the_relationship_declines_pending_grants_and_releases_unused_quota(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    svc: WalletContext,
) -> None:
    receiver = await make_receiver(client, otp, db)
    committed = await prepared(svc, receiver, 100_000)
    await accept_in_app(client, receiver, committed.transfer_id)
    accept = await outbox_body(db, MessageType.ACCEPT, committed.transfer_id)
    await deliver(
        svc, decision_for(committed, Outcome.COMMIT, svc.clock.now(), vote_hash=hash_body(accept))
    )
    pending = await prepared(svc, receiver, 30_000)
    # Spend 40,000 of the quota (as a settlement would).
    account = await db.fetchval(
        "SELECT account_id FROM quota WHERE transfer_id = $1", committed.transfer_id
    )
    institution = await ledger.open_account(db, "institution", "institution:test")
    await ledger.transfer(
        db,
        debit_account_id=account,
        credit_account_id=institution,
        amount_fen=40_000,
        purpose="pharmacy_drug",
    )
    response = await client.post(
        f"/app/v1/cross-relationships/{receiver.relation_id}/end",
        json={"payment_password": PASSWORD},
        headers=bearer(receiver.token),
    )
    assert response.status_code == 200, response.text
    decline = await outbox_body(db, MessageType.DECLINE, pending.transfer_id)
    assert isinstance(decline, Decline) and decline.error.code is ErrorCode.GIVER_PERMISSION
    release_row = await db.fetchrow("SELECT dedup_key, body FROM plt_outbox WHERE typ = 'RELEASE'")
    release = decode_body(MessageType.RELEASE, bytes(release_row["body"]))
    assert isinstance(release, Release)
    (grant,) = release.grants
    assert (grant.transfer_id, grant.granted_fen, grant.used_fen, grant.released_fen) == (
        committed.transfer_id,
        100_000,
        40_000,
        60_000,
    )
    quota_state, b = await quota_of(db, committed.transfer_id)
    assert (quota_state, b.available_fen) == ("closed", 0)
    # 100,000 owed by A, 60,000 of it released back: 40,000 remain to clear (spent).
    assert await clearing(db, "due_from") == (-40_000, -30_000)
    quotas = (await client.get("/app/v1/quotas", headers=bearer(receiver.token))).json()
    closed = next(q for q in quotas["quotas"] if q["state"] == "closed")
    assert (closed["used_fen"], closed["released_fen"], closed["available_fen"]) == (
        40_000,
        60_000,
        0,
    )
    await books_balanced(db)


def _fields(body: Any) -> dict[str, Any]:
    return {name: getattr(body, name) for name in body.__struct_fields__}


# --- spending a quota (RULES 19-20) ----------------------------------------------------------------


async def test_a_quota_pays_after_the_own_account_in_filing_order_and_takes_refunds(
    client: Client, otp: RecordingOtpSender, db: Any, svc: WalletContext
) -> None:
    patient = person(3, "王五", scheme="employee")
    parent = person(4, "王大")
    await import_persons(client, patient, parent)
    token = await open_wallet(client, otp, patient)
    parent_token = await open_wallet(client, otp, parent)
    await credit(client, "2026-03-q", {patient["id_number"]: 10_000, parent["id_number"]: 20_000})
    pid = await person_id(db, patient)
    # The cross-province relationship was filed on 1 March, the in-province one today:
    # by filing order the quota pays before the in-province giver.
    receiver = Receiver(patient, token, pid, await add_relation(db, "receiver", pid))
    filed = await client.post(
        "/app/v1/relationships",
        json={
            "receiver_id_number": patient["id_number"],
            "receiver_name": patient["name"],
            "relation_type": "child",
            "evidence_ref": "hukou-9",
            "payment_password": PASSWORD,
        },
        headers=bearer(parent_token),
    )
    assert filed.status_code == 201, filed.text
    confirmed = await client.post(
        f"/app/v1/relationships/{filed.json()['id']}/confirm",
        json={"payment_password": PASSWORD},
        headers=bearer(token),
    )
    assert confirmed.status_code == 200, confirmed.text
    prepare = await prepared(svc, receiver, 30_000)
    await accept_in_app(client, receiver, prepare.transfer_id)
    accept = await outbox_body(db, MessageType.ACCEPT, prepare.transfer_id)
    await deliver(svc, decision_for(prepare, Outcome.COMMIT, svc.clock.now(), hash_body(accept)))

    registered = await client.post(
        "/operator/v1/institutions",
        json={"code": "ph-1", "name": "药房", "kind": "pharmacy", "categories": ["pharmacy_drug"]},
        headers=OPERATOR,
    )
    key = {"Authorization": f"Bearer {registered.json()['api_key']}"}
    code = (await client.post("/app/v1/payment-codes", headers=bearer(token))).json()["code"]
    paid = await client.post(
        "/institution/v1/settlements",
        json={
            "payment_code": code,
            "amount_fen": 50_000,
            "category": "pharmacy_drug",
            "reference": "rx-9",
        },
        headers=key,
    )
    assert paid.status_code == 201, paid.text
    sources = [
        (s["source"], s["amount_fen"], s["giver_name_masked"]) for s in paid.json()["sources"]
    ]
    assert sources == [("own", 10_000, None), ("quota", 30_000, "张**"), ("giver", 10_000, "王*")]
    await assert_quota(
        db,
        prepare.transfer_id,
        state="active",
        available=0,
        pending=0,
        due_posted=-30_000,
        due_pending=0,
    )
    # A refund goes back last source first: the in-province giver, then the quota.
    refund = await client.post(
        "/institution/v1/settlements/rx-9/refunds",
        json={"reference": "rf-9", "amount_fen": 15_000},
        headers=key,
    )
    assert refund.status_code == 201, refund.text
    back = [(s["source"], s["amount_fen"]) for s in refund.json()["sources"]]
    assert back == [("giver", 10_000), ("quota", 5_000)]
    await assert_quota(
        db,
        prepare.transfer_id,
        state="active",
        available=5_000,
        pending=0,
        due_posted=-30_000,
        due_pending=0,
    )
