"""Bad input to the settlement, refund, relationship and institution endpoints: refused with
a 4xx problem document and a precise code, never a 500, and nothing changes."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import (
    OPERATOR,
    PASSWORD,
    available_fen,
    bearer,
    import_persons,
    make_id_number,
    person,
)
from tests.wallet.test_settlement import Member, institution, member, pay, payment_code, share
from wallet.ledger import MAX_AMOUNT_FEN
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]
JSON = {"content-type": "application/json"}

_COUNTS = """
SELECT (SELECT count(*) FROM settlement) AS settlements,
       (SELECT count(*) FROM refund) AS refunds,
       (SELECT count(*) FROM relationship) AS relationships,
       (SELECT count(*) FROM institution) AS institutions,
       (SELECT count(*) FROM ledger_transfer) AS transfers,
       (SELECT count(*) FROM payment_code WHERE used_at IS NOT NULL) AS used_codes
"""


async def snapshot(db: asyncpg.Connection) -> dict[str, int]:
    return dict(await db.fetchrow(_COUNTS))


def assert_refused(response: Any, status: int, code: str, case: object) -> None:
    assert response.status_code == status, (case, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), case
    assert response.json()["code"] == code, (case, response.text)


async def test_bad_settlement_requests_are_refused_and_change_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    good: dict[str, Any] = {
        "payment_code": code,
        "amount_fen": 100,
        "category": "outpatient",
        "reference": "visit-1",
    }
    amount_cases = [0, -1, MAX_AMOUNT_FEN + 1, 2**70, "100", 1e2, 99.5, None, True]
    invalid_cases: list[dict[str, Any]] = [
        {**good, "unexpected": 1},
        {**good, "category": "spa"},
        {**good, "category": 7},
        {**good, "allow_partial": "true"},
        {**good, "payment_code": 123456789012345678},
        {**good, "payment_code": ""},
        {**good, "reference": ""},
        {**good, "reference": "has space"},
        {**good, "reference": "a/b"},
        {**good, "reference": "x" * 65},
        {**good, "reference": "nul\u0000"},
        {k: v for k, v in good.items() if k != "category"},
    ]
    before = await snapshot(db)

    for raw in (b"{", b"[]", b"null", b'"text"', b"\xff\xfe"):
        response = await client.post(
            "/institution/v1/settlements", content=raw, headers={**JSON, **bearer(key)}
        )
        assert_refused(response, 400, "invalid_request", raw)
    for amount in amount_cases:
        response = await client.post(
            "/institution/v1/settlements", json={**good, "amount_fen": amount}, headers=bearer(key)
        )
        assert_refused(response, 400, "amount_invalid", amount)
    for body in invalid_cases:
        response = await client.post("/institution/v1/settlements", json=body, headers=bearer(key))
        assert_refused(response, 400, "invalid_request", body)
    unknown_code = await client.post(
        "/institution/v1/settlements",
        json={**good, "payment_code": "000000000000000000"},
        headers=bearer(key),
    )
    no_key = await client.post("/institution/v1/settlements", json=good)

    assert_refused(unknown_code, 404, "not_found", "unknown code")
    assert_refused(no_key, 401, "unauthorized", "no key")
    assert await snapshot(db) == before
    assert await available_fen(client, patient.token) == 1000
    # The code survived all of it.
    assert (
        await client.post("/institution/v1/settlements", json=good, headers=bearer(key))
    ).status_code == 201


async def test_bad_refund_requests_are_refused_and_change_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    assert (await pay(client, key, patient, 500, "visit-1")).status_code == 201
    url = "/institution/v1/settlements/visit-1/refunds"
    before = await snapshot(db)

    for raw in (b"{", b"[1]", b"{'reference': 1}"):
        response = await client.post(url, content=raw, headers={**JSON, **bearer(key)})
        assert_refused(response, 400, "invalid_request", raw)
    for amount in (0, -5, MAX_AMOUNT_FEN + 1, "50", 5e1):
        response = await client.post(
            url, json={"reference": "refund-1", "amount_fen": amount}, headers=bearer(key)
        )
        assert_refused(response, 400, "amount_invalid", amount)
    for body in (
        {},
        {"reference": "refund-1", "extra": True},
        {"reference": "bad ref"},
        {"reference": 12},
    ):
        response = await client.post(url, json=body, headers=bearer(key))
        assert_refused(response, 400, "invalid_request", body)
    for settlement in ("nope", "x" * 65, "%00"):
        response = await client.post(
            f"/institution/v1/settlements/{settlement}/refunds",
            json={"reference": "refund-1"},
            headers=bearer(key),
        )
        assert_refused(response, 404, "not_found", settlement)

    assert await snapshot(db) == before
    assert await available_fen(client, patient.token) == 500


async def test_reading_an_impossible_settlement_reference_is_not_found(
    client: Client, otp: RecordingOtpSender
) -> None:
    key = await institution(client)

    for reference in ("%00", "x" * 200, "a%20b", "%E4%B8%AD"):
        response = await client.get(f"/institution/v1/settlements/{reference}", headers=bearer(key))
        assert_refused(response, 404, "not_found", reference)


async def test_filing_with_an_invalid_id_number_is_refused(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    valid = make_id_number(2)
    wrong_check = valid[:17] + ("0" if valid[17] != "0" else "1")
    before = await snapshot(db)

    for id_number in (wrong_check, valid[:15], "11010519491301002X", "abc", "1" * 18):
        response = await client.post(
            "/app/v1/relationships",
            json={
                "receiver_id_number": id_number,
                "receiver_name": "王小明",
                "relation_type": "child",
                "evidence_ref": "hukou-1",
                "payment_password": PASSWORD,
            },
            headers=giver.auth,
        )
        assert_refused(response, 400, "id_number_invalid", id_number)

    assert await snapshot(db) == before


async def test_bad_relationship_requests_are_refused_and_change_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    good: dict[str, Any] = {
        "receiver_id_number": receiver.id_number,
        "receiver_name": "王小明",
        "relation_type": "child",
        "evidence_ref": "hukou-1",
        "payment_password": PASSWORD,
    }
    before = await snapshot(db)

    response = await client.post(
        "/app/v1/relationships", content=b"{not json", headers={**JSON, **giver.auth}
    )
    assert_refused(response, 400, "invalid_request", "malformed")
    for body in (
        {**good, "extra": 1},
        {**good, "relation_type": "cousin"},
        {**good, "relation_type": 3},
        {**good, "payment_password": "12345"},
        {**good, "payment_password": 135790},
        {**good, "evidence_ref": ""},
        {**good, "evidence_ref": "x" * 65},
        {**good, "receiver_name": "王\u0000"},
        {**good, "receiver_name": ""},
        {**good, "receiver_province": "11"},
        {k: v for k, v in good.items() if k != "evidence_ref"},
    ):
        response = await client.post("/app/v1/relationships", json=body, headers=giver.auth)
        assert_refused(response, 400, "invalid_request", body)

    assert await snapshot(db) == before


async def test_bad_relationship_ids_are_refused_without_a_500(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)
    before = await snapshot(db)

    for relationship_id in (2**70, 2**63, 0, -1):
        response = await client.post(
            f"/app/v1/relationships/{relationship_id}/end",
            json={"payment_password": PASSWORD},
            headers=giver.auth,
        )
        assert response.status_code in (400, 404), (relationship_id, response.text)
        approve = await client.post(
            f"/operator/v1/relationships/{relationship_id}/approve", headers=OPERATOR
        )
        assert approve.status_code in (400, 404), (relationship_id, approve.text)
    for ids in ([2**70], [0], [rid, rid], ["x"], [rid] * 101):
        response = await client.put(
            "/app/v1/relationships/order", json={"relationship_ids": ids}, headers=receiver.auth
        )
        assert_refused(response, 400, "invalid_request", ids)
    for role, state in (("owner", None), (None, "dormant")):
        params = {k: v for k, v in (("role", role), ("state", state)) if v}
        response = await client.get("/app/v1/relationships", params=params, headers=giver.auth)
        assert_refused(response, 400, "invalid_request", params)

    assert await snapshot(db) == before


async def test_bad_institution_registrations_are_refused_and_change_nothing(
    client: Client, db: asyncpg.Connection
) -> None:
    good: dict[str, Any] = {
        "code": "H1",
        "name": "市第一医院",
        "kind": "hospital",
        "categories": ["outpatient"],
    }
    before = await snapshot(db)

    for body in (
        {**good, "code": ""},
        {**good, "code": "has space"},
        {**good, "code": "x" * 33},
        {**good, "name": ""},
        {**good, "name": "a\u0000b"},
        {**good, "kind": "gym"},
        {**good, "categories": "outpatient"},
        {**good, "categories": ["outpatient"] * 17},
        {**good, "api_key": "mine"},
    ):
        response = await client.post("/operator/v1/institutions", json=body, headers=OPERATOR)
        assert_refused(response, 400, "invalid_request", body)

    assert await snapshot(db) == before


async def test_payment_code_for_a_person_out_of_normal_status_is_refused(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient: Member = await member(client, otp, 1, "王小明", fen=100)
    await import_persons(client, person(1, "王小明", status="suspended"))

    response = await client.post("/app/v1/payment-codes", headers=patient.auth)

    assert_refused(response, 422, "person_not_eligible", "suspended")
    assert await db.fetchval("SELECT count(*) FROM payment_code") == 0
