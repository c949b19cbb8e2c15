"""Refunds go back to the exact sources of a settlement, last source first (RULES 20)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import available_fen, bearer
from tests.wallet.test_settlement import (
    Member,
    assert_books_balanced,
    end_relationship,
    institution,
    institution_balance,
    member,
    pay,
    share,
)
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]


async def refund(
    client: Client, api_key: str, settlement: str, reference: str, amount_fen: int | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"reference": reference}
    if amount_fen is not None:
        body["amount_fen"] = amount_fen
    return await client.post(
        f"/institution/v1/settlements/{settlement}/refunds", json=body, headers=bearer(api_key)
    )


class Family:
    """A patient with 100 fen of their own and two givers (200 and 300 fen), and a payment
    of 600 fen drawn own 100 -> first giver 200 -> second giver 300."""

    patient: Member
    first: Member
    second: Member
    r1: int
    r2: int
    key: str

    async def balances(self, client: Client) -> tuple[int, int, int]:
        return (
            await available_fen(client, self.patient.token),
            await available_fen(client, self.first.token),
            await available_fen(client, self.second.token),
        )


async def family_paid_600(client: Client, otp: RecordingOtpSender) -> Family:
    family = Family()
    family.patient = await member(client, otp, 1, "王小明", fen=100)
    family.first = await member(client, otp, 2, "王大山", fen=200)
    family.second = await member(client, otp, 3, "李秀英", fen=500)
    family.r1 = await share(client, family.first, family.patient)
    family.r2 = await share(client, family.second, family.patient)
    family.key = await institution(client)
    response = await pay(client, family.key, family.patient, 600, "visit-1")
    assert response.status_code == 201, response.text
    assert await family.balances(client) == (0, 0, 200)
    return family


def refunded_to(body: dict[str, Any]) -> list[tuple[str, int, int | None]]:
    return [(s["source"], s["amount_fen"], s["relationship_id"]) for s in body["sources"]]


async def test_full_refund_returns_every_fen_to_its_source(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    family = await family_paid_600(client, otp)

    response = await refund(client, family.key, "visit-1", "refund-1")

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["amount_fen"] == 600
    assert body["settlement_reference"] == "visit-1"
    assert refunded_to(body) == [
        ("giver", 300, family.r2),
        ("giver", 200, family.r1),
        ("own", 100, None),
    ]
    assert await family.balances(client) == (100, 200, 500)
    assert await institution_balance(client) == 0
    await assert_books_balanced(db)


async def test_partial_refund_goes_back_to_the_last_source_first(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)

    response = await refund(client, family.key, "visit-1", "refund-1", 350)

    assert response.status_code == 201, response.text
    assert refunded_to(response.json()) == [("giver", 300, family.r2), ("giver", 50, family.r1)]
    assert await family.balances(client) == (0, 50, 500)


async def test_successive_partial_refunds_continue_where_the_last_stopped(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)
    await refund(client, family.key, "visit-1", "refund-1", 250)

    second = await refund(client, family.key, "visit-1", "refund-2", 100)
    rest = await refund(client, family.key, "visit-1", "refund-3")

    assert refunded_to(second.json()) == [("giver", 50, family.r2), ("giver", 50, family.r1)]
    assert refunded_to(rest.json()) == [("giver", 150, family.r1), ("own", 100, None)]
    assert await family.balances(client) == (100, 200, 500)


async def test_settlement_shows_what_was_refunded_per_source(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)
    await refund(client, family.key, "visit-1", "refund-1", 350)

    response = await client.get("/institution/v1/settlements/visit-1", headers=bearer(family.key))

    body = response.json()
    assert body["refunded_fen"] == 350
    assert [(s["amount_fen"], s["refunded_fen"]) for s in body["sources"]] == [
        (100, 0),
        (200, 50),
        (300, 300),
    ]


async def test_over_refund_is_refused_and_changes_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    family = await family_paid_600(client, otp)
    await refund(client, family.key, "visit-1", "refund-1", 500)

    response = await refund(client, family.key, "visit-1", "refund-2", 101)

    assert response.status_code == 422
    assert response.json()["code"] == "refund_exceeds_settlement"
    assert response.json()["refundable_fen"] == 100
    assert await family.balances(client) == (0, 200, 500)
    assert await db.fetchval("SELECT count(*) FROM refund") == 1


async def test_nothing_left_to_refund_is_refused(client: Client, otp: RecordingOtpSender) -> None:
    family = await family_paid_600(client, otp)
    await refund(client, family.key, "visit-1", "refund-1")

    response = await refund(client, family.key, "visit-1", "refund-2")

    assert response.status_code == 422
    assert response.json()["code"] == "refund_exceeds_settlement"


async def test_refund_by_another_institution_is_not_found(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)
    other = await institution(client, "H2")

    response = await refund(client, other, "visit-1", "refund-1")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert await family.balances(client) == (0, 0, 200)


async def test_refund_of_unknown_settlement_is_not_found(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)

    response = await refund(client, family.key, "visit-404", "refund-1")

    assert response.status_code == 404


async def test_same_refund_request_is_replayed_not_paid_twice(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)

    first = await refund(client, family.key, "visit-1", "refund-1", 100)
    again = await refund(client, family.key, "visit-1", "refund-1", 100)

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert await family.balances(client) == (0, 0, 300)


async def test_refund_reference_reused_for_another_request_is_a_conflict(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)
    await refund(client, family.key, "visit-1", "refund-1", 100)

    other_amount = await refund(client, family.key, "visit-1", "refund-1", 200)
    whole = await refund(client, family.key, "visit-1", "refund-1")

    assert other_amount.status_code == 409
    assert other_amount.json()["code"] == "idempotency_conflict"
    assert whole.status_code == 409
    assert await family.balances(client) == (0, 0, 300)


async def test_refund_reaches_a_giver_whose_relationship_has_ended(
    client: Client, otp: RecordingOtpSender
) -> None:
    family = await family_paid_600(client, otp)
    ended = await end_relationship(client, family.second, family.r2)
    assert ended.json()["state"] == "ended"

    response = await refund(client, family.key, "visit-1", "refund-1", 300)

    assert refunded_to(response.json()) == [("giver", 300, family.r2)]
    assert await family.balances(client) == (0, 0, 500)


async def test_refund_transfers_link_the_refund_and_the_settlement(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    family = await family_paid_600(client, otp)
    body = (await refund(client, family.key, "visit-1", "refund-1", 350)).json()

    rows = await db.fetch(
        "SELECT t.amount_fen, t.purpose, "
        "(a.kind = 'institution' AND split_part(a.code, ':', 2) = 'H1') AS from_inst, "
        "t.settlement_id IS NOT NULL AS linked FROM ledger_transfer t "
        "JOIN account a ON a.id = t.debit_account_id WHERE t.refund_id = $1 ORDER BY t.id",
        body["refund_id"],
    )

    assert [tuple(r) for r in rows] == [(300, "refund", True, True), (50, "refund", True, True)]
