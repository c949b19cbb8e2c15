"""Settlements and refunds racing on the same accounts: no overdraft, no double spend, no
deadlock, and the books stay balanced."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TypeAlias

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, available_fen, bearer, person
from tests.wallet.test_settlement import (
    assert_books_balanced,
    end_relationship,
    institution,
    member,
    pay,
    payment_code,
    settle,
    share,
)
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]


async def customer_money_fen(db: asyncpg.Connection) -> int:
    """Everything held in personal and institution accounts."""
    value: int = await db.fetchval(
        "SELECT coalesce(sum(credits_posted - debits_posted), 0)::bigint FROM account "
        "WHERE kind IN ('personal', 'institution')"
    )
    return value


async def test_fifty_simultaneous_payments_against_ten_payments_worth(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    codes = [await payment_code(client, patient) for _ in range(50)]

    responses = await asyncio.gather(
        *(settle(client, key, code, 100, reference=f"r-{i}") for i, code in enumerate(codes))
    )

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 409: 40}
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"insufficient_funds"}
    assert await available_fen(client, patient.token) == 0
    assert await db.fetchval("SELECT count(*) FROM settlement") == 10
    # Refused payments leave their codes unused.
    assert await db.fetchval("SELECT count(*) FROM payment_code WHERE used_at IS NOT NULL") == 10
    await assert_books_balanced(db)


async def test_settlements_refunds_an_ending_and_a_reordering_race_without_deadlock(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    # One institution account older and one younger than the personal accounts, so lock
    # order by id interleaves institution and personal accounts.
    early = await institution(client, "EARLY")
    patient = await member(client, otp, 1, "王小明", fen=1000)
    g1 = await member(client, otp, 2, "王大山", fen=1000)
    g2 = await member(client, otp, 3, "李秀英", fen=1000)
    r1 = await share(client, g1, patient)
    r2 = await share(client, g2, patient)
    late = await institution(client, "LATE")
    keys = [early, late]
    for i in range(10):
        made = await pay(client, keys[i % 2], patient, 150, f"before-{i}")
        assert made.status_code == 201, made.text

    refunds = [
        client.post(
            f"/institution/v1/settlements/before-{i}/refunds",
            json={"reference": f"refund-{i}"},
            headers=bearer(keys[i % 2]),
        )
        for i in range(10)
    ]
    payments = [pay(client, keys[i % 2], patient, 250, f"during-{i}") for i in range(10)]
    ending = end_relationship(client, g2, r2)
    reordering = client.put(
        "/app/v1/relationships/order", json={"relationship_ids": [r1]}, headers=patient.auth
    )
    responses = await asyncio.gather(*refunds, *payments, ending, reordering)

    assert [r.status_code for r in responses[:10]] == [201] * 10
    assert {r.status_code for r in responses[10:20]} <= {201, 409}
    assert responses[20].status_code == 200
    assert responses[21].status_code == 200
    assert await customer_money_fen(db) == 3000
    await assert_books_balanced(db)


async def test_one_payment_code_raced_by_two_references_pays_once(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)

    responses = await asyncio.gather(
        settle(client, key, code, 100, reference="a"), settle(client, key, code, 100, reference="b")
    )

    assert sorted(r.status_code for r in responses) == [201, 410]
    assert await available_fen(client, patient.token) == 900


async def test_the_same_request_sent_twice_at_once_pays_once(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)

    responses = await asyncio.gather(
        *(settle(client, key, code, 100, reference="visit-1") for _ in range(4))
    )

    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["settlement_id"] for r in responses}) == 1
    assert await available_fen(client, patient.token) == 900
    assert await db.fetchval("SELECT count(*) FROM settlement") == 1


async def test_the_same_refund_sent_twice_at_once_refunds_once(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    assert (await pay(client, key, patient, 400, "visit-1")).status_code == 201

    responses = await asyncio.gather(
        *(
            client.post(
                "/institution/v1/settlements/visit-1/refunds",
                json={"reference": "refund-1", "amount_fen": 300},
                headers=bearer(key),
            )
            for _ in range(4)
        )
    )

    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert await available_fen(client, patient.token) == 900


async def test_competing_refunds_never_exceed_the_settlement(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    assert (await pay(client, key, patient, 500, "visit-1")).status_code == 201

    responses = await asyncio.gather(
        *(
            client.post(
                "/institution/v1/settlements/visit-1/refunds",
                json={"reference": f"refund-{i}", "amount_fen": 200},
                headers=bearer(key),
            )
            for i in range(5)
        )
    )

    assert sorted(r.status_code for r in responses) == [201, 201, 422, 422, 422]
    assert await available_fen(client, patient.token) == 900


async def test_payments_racing_a_roster_status_change_never_fail_with_an_error(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=500)
    giver = await member(client, otp, 2, "王大山", fen=500)
    await share(client, giver, patient)
    key = await institution(client)
    codes = [await payment_code(client, patient) for _ in range(8)]

    suspend = client.post(
        "/operator/v1/roster",
        json={"persons": [person(1, "王小明", status="suspended")]},
        headers=OPERATOR,
    )
    payments = [settle(client, key, code, 100, reference=f"r-{i}") for i, code in enumerate(codes)]
    responses = await asyncio.gather(*payments[:4], suspend, *payments[4:])

    assert responses[4].status_code == 200, responses[4].text
    paid = [r for r in responses if r.status_code == 201]
    assert {r.status_code for r in responses if r is not responses[4]} <= {201, 422}
    assert await customer_money_fen(db) == 1000
    assert await db.fetchval("SELECT count(*) FROM settlement") == len(paid)
    await assert_books_balanced(db)
