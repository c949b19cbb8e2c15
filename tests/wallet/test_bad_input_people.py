"""Bad input to the people, credit and wallet endpoints: always a 400 problem, never a 500,
and nothing in the database changes."""

from __future__ import annotations

from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, PASSWORD, bearer, import_persons, open_wallet, person
from wallet.otp import RecordingOtpSender

Client = AsyncTestClient[Litestar]

FATHER = person(1, "张三丰")
TABLES = (
    "insured_person",
    "account",
    "ledger_transfer",
    "credit_batch",
    "wallet",
    "otp_challenge",
    "app_session",
    "audit_event",
    "relationship",
)


async def _snapshot(db: asyncpg.Connection) -> dict[str, Any]:
    counts = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    balances = [tuple(r) for r in await db.fetch("SELECT * FROM account ORDER BY id")]
    people = [tuple(r) for r in await db.fetch("SELECT * FROM insured_person ORDER BY id")]
    return {"counts": counts, "balances": balances, "people": people}


async def _all_refused(
    client: Client,
    db: asyncpg.Connection,
    method: str,
    path: str,
    bodies: list[Any],
    *,
    headers: dict[str, str] | None = None,
    codes: tuple[str, ...] = ("invalid_request",),
    key: str | None = None,
) -> None:
    before = await _snapshot(db)
    for body in bodies:
        content = body if isinstance(body, bytes) else None
        response = await client.request(
            method,
            path,
            content=content,
            json=None if content is not None else body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        assert response.status_code == 400, (body, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] in codes, (body, response.json())
        if key is not None:
            assert [e["key"] for e in response.json()["errors"]] == [key], body
    assert await _snapshot(db) == before


def _credits(amount: Any) -> dict[str, Any]:
    return {
        "batch_id": "b1",
        "month": "2026-03",
        "credits": [{"id_number": FATHER["id_number"], "amount_fen": amount}],
    }


async def test_bad_credit_amounts_are_refused_naming_the_amount(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    amounts = (0, -1, 10**12 + 1, 2**63, 2**64 + 5, 10**30, 1.5, True, [1], None)
    # wallet.api.problems gives amount_invalid when the message names a *_fen field;
    # litestar reports nested paths in `key`, so these come back as invalid_request.
    await _all_refused(
        client,
        db,
        "POST",
        "/operator/v1/credit-batches",
        [_credits(a) for a in amounts],
        headers=OPERATOR,
        codes=("amount_invalid", "invalid_request"),
        key="credits[0].amount_fen",
    )


async def test_bad_credit_batches_are_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    good = _credits(100)
    bodies: list[Any] = [
        b"{not json",
        b"",
        b"[]",
        {**good, "month": "2026-13"},
        {**good, "month": 202603},
        {**good, "batch_id": "has space"},
        {**good, "batch_id": ""},
        {**good, "credits": []},
        {**good, "credits": "all"},
        {**good, "extra": 1},
        {**good, "credits": [{"id_number": FATHER["id_number"], "amount_fen": 1, "memo": "x"}]},
        {"batch_id": "b1", "month": "2026-03"},
    ]
    await _all_refused(client, db, "POST", "/operator/v1/credit-batches", bodies, headers=OPERATOR)


async def test_bad_roster_bodies_are_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    bodies: list[Any] = [
        b'{"persons": [',
        {"persons": []},
        {"persons": "everyone"},
        {"persons": [{**FATHER, "scheme": "military"}]},
        {"persons": [{**FATHER, "status": 1}]},
        {"persons": [{**FATHER, "phone": "call me"}]},
        {"persons": [{**FATHER, "pooling_region": "13010"}]},
        {"persons": [{**FATHER, "name": ""}]},
        {"persons": [{**FATHER, "email": "a@b.c"}]},
        {"persons": [{k: v for k, v in FATHER.items() if k != "name"}]},
        {"persons": [FATHER], "source": "hr"},
    ]
    await _all_refused(client, db, "POST", "/operator/v1/roster", bodies, headers=OPERATOR)


async def test_bad_roster_rows_name_their_line(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    bodies = [
        {"persons": [person(2, "李四"), {**FATHER, "id_number": "11010519491231002"}]},
        {"persons": [person(2, "李四"), {**FATHER, "name": "   "}]},
    ]
    await _all_refused(
        client,
        db,
        "POST",
        "/operator/v1/roster",
        bodies,
        headers=OPERATOR,
        codes=("roster_file_invalid",),
    )


async def test_bad_status_changes_are_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    path = f"/operator/v1/persons/{FATHER['id_number']}"
    bodies: list[Any] = [
        b"nope",
        {"status": "retired"},
        {"status": None},
        {},
        {"status": "normal", "x": 1},
    ]
    await _all_refused(client, db, "PATCH", path, bodies, headers=OPERATOR)


async def test_malformed_id_number_in_the_path_is_refused(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    for bad in ("110105194912310021", "123", "11010519491231002Y"):
        response = await client.get(f"/operator/v1/persons/{bad}", headers=OPERATOR)
        assert (response.status_code, response.json()["code"]) == (400, "id_number_invalid")
    await _all_refused(
        client,
        db,
        "PATCH",
        "/operator/v1/persons/110105194912310021",
        [{"status": "deceased"}],
        headers=OPERATOR,
        codes=("id_number_invalid",),
    )


async def test_bad_counter_openings_are_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    good = {"id_number": FATHER["id_number"], "name": FATHER["name"], "payment_password": PASSWORD}
    bodies: list[Any] = [
        b"[",
        {**good, "opened_via": "bank"},
        {**good, "payment_password": 135790},
        {**good, "payment_password": "111111"},
        {**good, "payment_password": "13579"},
        {**good, "opened_via": "counter", "guardian_id_number": FATHER["id_number"]},
        {**good, "nickname": "x"},
    ]
    await _all_refused(client, db, "POST", "/operator/v1/wallets", bodies, headers=OPERATOR)


async def test_bad_otp_requests_are_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    good = {"id_number": FATHER["id_number"], "name": FATHER["name"], "purpose": "open_wallet"}
    bodies: list[Any] = [
        b"id_number=1",
        {**good, "purpose": "reset"},
        {**good, "name": None},
        {**good, "id_number": 11010519491231002},
        {**good, "phone": "13800000001"},
        {k: v for k, v in good.items() if k != "purpose"},
    ]
    await _all_refused(client, db, "POST", "/app/v1/otp", bodies)


async def test_bad_wallet_openings_and_logins_are_refused(
    client: Client, db: asyncpg.Connection, otp: RecordingOtpSender
) -> None:
    await import_persons(client, FATHER)
    good = {"otp_id": "6f1c1f7e-3f38-4a4c-9a9e-0d6f3b0f4b61", "otp_code": "123456"}
    bodies: list[Any] = [
        {**good, "otp_id": "not-a-uuid", "payment_password": PASSWORD},
        {**good, "otp_code": "12a456", "payment_password": PASSWORD},
        {**good, "otp_code": 123456, "payment_password": PASSWORD},
        {**good, "payment_password": PASSWORD, "device": "x"},
    ]
    await _all_refused(client, db, "POST", "/app/v1/wallets", bodies)
    await _all_refused(client, db, "POST", "/app/v1/sessions", [b"{", {**good, "otp_code": "1"}])


async def test_bad_record_queries_are_refused(
    client: Client, db: asyncpg.Connection, otp: RecordingOtpSender
) -> None:
    await import_persons(client, FATHER)
    token = await open_wallet(client, otp, FATHER)
    for params in (
        {"limit": 0},
        {"limit": 201},
        {"limit": "many"},
        {"before_id": -1},
        {"before_id": 2**64},
        {"direction": "sideways"},
        {"since": "yesterday"},
        {"since": "2026-03-16T10:00:00"},
        {"purpose": "x" * 41},
    ):
        response = await client.get("/app/v1/wallet/records", params=params, headers=bearer(token))
        assert (response.status_code, response.json()["code"]) == (400, "invalid_request"), params


async def test_an_amount_sent_as_a_string_is_a_wrong_type_not_a_number(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    before = await _snapshot(db)
    response = await client.post(
        "/operator/v1/credit-batches",
        json={
            "batch_id": "b-str",
            "month": "2026-03",
            "credits": [{"id_number": FATHER["id_number"], "amount_fen": "100"}],
        },
        headers=OPERATOR,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "amount_invalid"
    assert body["errors"][0]["key"] == "credits[0].amount_fen"
    assert "Expected `int`, got `str`" in body["detail"]
    assert await _snapshot(db) == before
