"""Notifications in one province (issue 12): written with the change, once per recipient,
listed newest first with an unread count, marked read by their owner only."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, PASSWORD, person
from tests.wallet.service_context import wallet_context
from tests.wallet.test_relationships import confirm, filed
from tests.wallet.test_settlement import (
    Member,
    end_relationship,
    institution,
    member,
    pay,
    set_rules,
    share,
)
from wallet import notification_stream, notifications
from wallet.clock import ManualClock
from wallet.notifications import Kind, Notice
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]


async def listed(client: Client, who: Member, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/app/v1/notifications{query}", headers=who.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def kinds(page: dict[str, Any]) -> list[str]:
    return [item["kind"] for item in page["items"]]


async def post_credit(client: Client, batch_id: str, credits: list[dict[str, Any]]) -> Any:
    return await client.post(
        "/operator/v1/credit-batches",
        json={"batch_id": batch_id, "month": "2026-03", "credits": credits},
        headers=OPERATOR,
    )


# --- written with the change -------------------------------------------------------------------


async def test_a_monthly_credit_notifies_its_holder_once_even_when_replayed(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    credits = [{"id_number": holder.id_number, "amount_fen": 12_345}]
    assert (await post_credit(client, "b-2026-03", credits)).status_code == 201
    assert (await post_credit(client, "b-2026-03", credits)).status_code == 200  # replay
    page = await listed(client, holder)
    assert kinds(page) == ["credit.arrived"]
    item = page["items"][0]
    assert item["amount_fen"] == 12_345
    assert item["refs"] == {"batch_id": "b-2026-03"}
    assert item["detail"] == {"month": "2026-03"}
    assert item["read"] is False
    assert page["unread_count"] == 1


async def test_a_refused_credit_batch_notifies_no_one(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    credits = [
        {"id_number": holder.id_number, "amount_fen": 500},
        {"id_number": person(9, "无名氏")["id_number"], "amount_fen": 500},  # not on the roster
    ]
    response = await post_credit(client, "b-2026-03", credits)
    assert response.status_code == 404, response.text
    assert (await listed(client, holder))["items"] == []
    assert await db.fetchval("SELECT count(*) FROM notification") == 0


async def test_a_rolled_back_transaction_neither_writes_nor_wakes_anyone(
    client: Client,
    otp: RecordingOtpSender,
    db: asyncpg.Connection,
    database_url: str,
    clock: ManualClock,
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(notifications.CHANNEL, lambda *args: heard.append(args[3]))
    notice = Notice(person_id=1, kind=Kind.WALLET_LOCKED, event_key="test:rollback")
    async with wallet_context(database_url, clock, otp) as ctx, ctx.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await notifications.record(conn, notice, clock.now()) is not None
        await tx.rollback()
        async with conn.transaction():
            committed = await notifications.record(conn, notice, clock.now())
    await asyncio.sleep(0.2)
    await listener.close()
    assert heard == ["1"]  # only the committed one woke a listener
    page = await listed(client, holder)
    assert [item["id"] for item in page["items"]] == [committed]


async def test_a_record_without_notify_wakes_no_one_until_announced_after_the_commit(
    client: Client, otp: RecordingOtpSender, database_url: str, clock: ManualClock
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(notifications.CHANNEL, lambda *args: heard.append(args[3]))
    notice = Notice(person_id=1, kind=Kind.WALLET_LOCKED, event_key="test:quiet")
    try:
        async with wallet_context(database_url, clock, otp) as ctx:
            async with ctx.pool.acquire() as conn, conn.transaction():
                ids = await notifications.record_many(conn, [notice], clock.now(), notify=False)
            await asyncio.sleep(0.2)
            assert heard == []
            notification_stream.announce(ctx, [1])
            for _ in range(50):
                if heard:
                    break
                await asyncio.sleep(0.1)
    finally:
        await listener.close()
    assert heard == ["1"]
    page = await listed(client, holder)
    assert [item["id"] for item in page["items"]] == ids and len(ids) == 1


async def test_the_same_event_is_recorded_once_per_recipient(
    client: Client, otp: RecordingOtpSender, database_url: str, clock: ManualClock
) -> None:
    await member(client, otp, 1, "张三丰")
    await member(client, otp, 2, "李四")
    same = [
        Notice(person_id=1, kind=Kind.WALLET_LOCKED, event_key="test:same"),
        Notice(person_id=2, kind=Kind.WALLET_LOCKED, event_key="test:same"),
    ]
    async with wallet_context(database_url, clock, otp) as ctx, ctx.pool.acquire() as conn:
        first = await notifications.record_many(conn, same, clock.now())
        again = await notifications.record_many(conn, same, clock.now())
    assert len(first) == 2
    assert again == []


# --- the events of one province ----------------------------------------------------------------


async def test_relationship_events_reach_the_other_party_and_an_ending_both(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "张三丰")
    receiver = await member(client, otp, 2, "李小龙")
    relationship_id = await share(client, giver, receiver)
    assert (await end_relationship(client, receiver, relationship_id)).status_code == 200
    giver_page, receiver_page = await listed(client, giver), await listed(client, receiver)
    assert kinds(giver_page) == ["relationship.ended", "relationship.confirmed"]
    assert kinds(receiver_page) == ["relationship.ended", "relationship.requested"]
    requested = receiver_page["items"][1]
    assert requested["counterpart_name_masked"] == "张**"
    assert requested["refs"] == {"relationship_id": str(relationship_id)}
    assert giver_page["items"][0]["counterpart_name_masked"] == "李**"
    assert giver_page["items"][0]["detail"]["ended_by"] == "receiver"


async def test_a_declined_relationship_tells_the_giver(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "张三丰")
    receiver = await member(client, otp, 2, "李小龙")
    filed = await client.post(
        "/app/v1/relationships",
        json={
            "receiver_id_number": receiver.id_number,
            "receiver_name": receiver.who["name"],
            "relation_type": "child",
            "evidence_ref": "hukou-0001",
            "payment_password": PASSWORD,
        },
        headers=giver.auth,
    )
    relationship_id = filed.json()["id"]
    declined = await client.post(
        f"/app/v1/relationships/{relationship_id}/decline", headers=receiver.auth
    )
    assert declined.status_code == 200, declined.text
    assert kinds(await listed(client, giver)) == ["relationship.declined"]


async def test_an_operators_approval_tells_both_parties_once(
    client: Client, otp: RecordingOtpSender
) -> None:
    await reviewed_tells_both(client, otp, "approve", "relationship.approved", "active")


async def test_an_operators_rejection_tells_both_parties_once(
    client: Client, otp: RecordingOtpSender
) -> None:
    await reviewed_tells_both(client, otp, "reject", "relationship.rejected", "rejected")


async def reviewed_tells_both(
    client: Client, otp: RecordingOtpSender, verb: str, kind: str, state: str
) -> None:
    """A relationship under review is approved or rejected (twice: a replay) by an operator:
    each party is told once, with the other's masked name."""
    set_rules(client, relationship_review_required=True)
    giver = await member(client, otp, 1, "张三丰")
    receiver = await member(client, otp, 2, "李小龙")
    relationship_id = await filed(client, giver, receiver)
    await confirm(client, receiver, relationship_id)
    for _ in range(2):  # the same review again is a replay: nobody is told twice
        reviewed = await client.post(
            f"/operator/v1/relationships/{relationship_id}/{verb}", headers=OPERATOR
        )
        assert (reviewed.status_code, reviewed.json()["state"]) == (200, state)
    giver_page, receiver_page = await listed(client, giver), await listed(client, receiver)
    assert kinds(giver_page) == [kind, "relationship.confirmed"]
    assert kinds(receiver_page) == [kind, "relationship.requested"]
    for page, side, other in ((giver_page, "giver", "李**"), (receiver_page, "receiver", "张**")):
        told = page["items"][0]
        assert told["counterpart_name_masked"] == other
        assert told["refs"] == {"relationship_id": str(relationship_id)}
        assert told["detail"] == {"relation_type": "child", "as": side, "state": state}


async def test_shared_money_spent_and_refunded_tell_the_giver_who_how_much_and_what(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "张三丰", fen=100_000)
    patient = await member(client, otp, 2, "李小龙", scheme="resident")
    await share(client, giver, patient)
    key = await institution(client)
    paid = await pay(client, key, patient, 8_850, "ref-1")
    assert paid.status_code == 201, paid.text
    refunded = await client.post(
        "/institution/v1/settlements/ref-1/refunds",
        json={"reference": "rf-1", "amount_fen": 1_000},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert refunded.status_code == 201, refunded.text
    page = await listed(client, giver)
    assert kinds(page) == [
        "shared_money.refunded",
        "shared_money.spent",
        "relationship.confirmed",
        "credit.arrived",
    ]
    refund, spent = page["items"][0], page["items"][1]
    assert (spent["amount_fen"], spent["counterpart_name_masked"]) == (8_850, "李**")
    assert spent["detail"] == {"category": "outpatient"}
    assert spent["refs"]["settlement_id"] == str(paid.json()["settlement_id"])
    assert refund["amount_fen"] == 1_000
    # The patient paid with shared money only: nothing about it in their own list.
    assert "shared_money.spent" not in kinds(await listed(client, patient))


async def test_the_wallet_locked_by_wrong_passwords_tells_its_holder_until_when(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    statuses = []
    for _ in range(5):
        wrong = await client.post(
            "/app/v1/relationships",
            json={
                "receiver_id_number": person(2, "李四")["id_number"],
                "receiver_name": "李四",
                "relation_type": "child",
                "evidence_ref": "hukou-0001",
                "payment_password": "000000",
            },
            headers=holder.auth,
        )
        statuses.append(wrong.status_code)
    page = await listed(client, holder)
    assert kinds(page) == ["wallet.locked"]
    assert page["items"][0]["deadline"] is not None
    assert statuses == [403, 403, 403, 403, 423]


# --- the list ----------------------------------------------------------------------------------


async def test_the_list_pages_newest_first_and_marks_read(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    for month in range(1, 6):
        credits = [{"id_number": holder.id_number, "amount_fen": month}]
        assert (await post_credit(client, f"b-2026-0{month}", credits)).status_code == 201
    first = await listed(client, holder, "?limit=2")
    assert [i["amount_fen"] for i in first["items"]] == [5, 4]
    assert first["unread_count"] == 5
    second = await listed(client, holder, f"?limit=2&before={first['next_before']}")
    assert [i["amount_fen"] for i in second["items"]] == [3, 2]
    last = await listed(client, holder, f"?limit=1&before={second['next_before']}")
    assert ([i["amount_fen"] for i in last["items"]], last["next_before"]) == ([1], None)
    marked = await client.post(
        "/app/v1/notifications/read",
        json={"ids": [first["items"][0]["id"]]},
        headers=holder.auth,
    )
    assert marked.status_code == 200, marked.text
    assert marked.json() == {"marked": 1, "unread_count": 4}
    unread = await listed(client, holder, "?unread=true")
    assert [i["amount_fen"] for i in unread["items"]] == [4, 3, 2, 1]
    all_read = await client.post(
        "/app/v1/notifications/read", json={"up_to": first["items"][0]["id"]}, headers=holder.auth
    )
    assert all_read.json() == {"marked": 4, "unread_count": 0}


async def test_marking_someone_elses_notification_is_not_found_and_marks_nothing(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰", fen=100)
    other = await member(client, otp, 2, "李四", fen=100)
    mine = (await listed(client, holder))["items"][0]["id"]
    theirs = (await listed(client, other))["items"][0]["id"]
    response = await client.post(
        "/app/v1/notifications/read", json={"ids": [mine, theirs]}, headers=holder.auth
    )
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "not_found"
    assert (await listed(client, holder))["unread_count"] == 1
    assert (await listed(client, other))["unread_count"] == 1


async def test_bad_requests_to_the_list_are_problems_with_stable_codes(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    cases = [
        ("POST", "/app/v1/notifications/read", {"ids": [1], "up_to": 1}, 400, "invalid_request"),
        ("POST", "/app/v1/notifications/read", {}, 400, "invalid_request"),
        ("POST", "/app/v1/notifications/read", {"ids": [0]}, 400, "invalid_request"),
        ("POST", "/app/v1/notifications/read", {"person_id": 2}, 400, "invalid_request"),
        ("GET", "/app/v1/notifications?limit=0", None, 400, "invalid_request"),
        ("GET", "/app/v1/notifications?before=abc", None, 400, "invalid_request"),
    ]
    for method, path, body, status, code in cases:
        response = await client.request(method, path, json=body, headers=holder.auth)
        assert (response.status_code, response.json()["code"]) == (status, code), path
    anonymous = await client.get("/app/v1/notifications")
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")
    stream = await client.get("/app/v1/events")
    assert (stream.status_code, stream.json()["code"]) == (401, "unauthorized")


async def test_a_bad_last_event_id_is_refused_before_the_stream_opens(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "张三丰", fen=100)
    for bad in ("abc", "-1", "1.5", "99999999999999999999", "7"):
        response = await client.get("/app/v1/events", headers={**holder.auth, "Last-Event-ID": bad})
        assert response.status_code == 400, bad
        assert response.json()["code"] == "invalid_request"


async def test_every_kind_is_a_kind_the_table_accepts(
    client: Client, otp: RecordingOtpSender, database_url: str, clock: ManualClock
) -> None:
    await member(client, otp, 1, "张三丰")
    every = [Notice(person_id=1, kind=kind, event_key=f"test:{kind.value}") for kind in Kind]
    async with wallet_context(database_url, clock, otp) as ctx, ctx.pool.acquire() as conn:
        assert len(await notifications.record_many(conn, every, clock.now())) == len(Kind)


async def test_a_death_ends_relationships_automatically_and_tells_both(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "张三丰")
    receiver = await member(client, otp, 2, "李小龙")
    relationship_id = await share(client, giver, receiver)
    response = await client.patch(
        f"/operator/v1/persons/{giver.id_number}", json={"status": "deceased"}, headers=OPERATOR
    )
    assert response.status_code == 200, response.text
    newest = (await listed(client, receiver))["items"][0]
    assert (newest["kind"], newest["refs"]) == (
        "relationship.ended_automatically",
        {"relationship_id": str(relationship_id)},
    )
    assert newest["detail"]["ended_by"] == "system"


async def test_a_recipients_writers_are_serialised_so_ids_commit_in_order(
    client: Client, otp: RecordingOtpSender, database_url: str, clock: ManualClock
) -> None:
    """A stream reads `id > cursor`: an id drawn earlier must never commit later."""
    await member(client, otp, 1, "张三丰")
    await member(client, otp, 2, "李四")
    first = Notice(person_id=1, kind=Kind.WALLET_LOCKED, event_key="test:first")
    second = Notice(person_id=1, kind=Kind.WALLET_LOCKED, event_key="test:second")
    other = Notice(person_id=2, kind=Kind.WALLET_LOCKED, event_key="test:other")
    async with wallet_context(database_url, clock, otp) as ctx:
        async with ctx.pool.acquire() as slow, slow.transaction():
            first_id = await notifications.record(slow, first, clock.now())

            async def write(notice: Notice) -> int | None:
                async with ctx.pool.acquire() as conn, conn.transaction():
                    return await notifications.record(conn, notice, clock.now())

            waiting = asyncio.create_task(write(second))
            # Someone else's notification is not held up.
            assert await asyncio.wait_for(write(other), timeout=5) is not None
            await asyncio.sleep(0.2)
            assert not waiting.done()  # same recipient: waits for the first to commit
        second_id = await asyncio.wait_for(waiting, timeout=5)
    assert first_id is not None and second_id is not None and second_id > first_id
