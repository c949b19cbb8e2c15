"""Opening wallets and sessions (RULES 9): roster match, one-time passwords, payment passwords."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, PASSWORD, bearer, import_persons, open_wallet, person
from wallet.clock import ManualClock
from wallet.credentials import digest
from wallet.otp import RecordingOtpSender

Client = AsyncTestClient[Litestar]

FATHER = person(1, "张三丰")
CHILD = person(2, "张小宝", scheme="resident", birth="20150601")


async def _otp(client: Client, who: dict[str, Any], purpose: str = "open_wallet") -> Any:
    return await client.post(
        "/app/v1/otp", json={"id_number": who["id_number"], "name": who["name"], "purpose": purpose}
    )


async def _otp_id(client: Client, who: dict[str, Any], purpose: str = "open_wallet") -> str:
    response = await _otp(client, who, purpose)
    assert response.status_code == 201, response.text
    otp_id: str = response.json()["otp_id"]
    return otp_id


async def _open(client: Client, otp_id: str, code: str, password: str = PASSWORD) -> Any:
    return await client.post(
        "/app/v1/wallets", json={"otp_id": otp_id, "otp_code": code, "payment_password": password}
    )


def _wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def _wallet_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM wallet")
    return count


# --- opening in the app ----------------------------------------------------------------------


async def test_otp_goes_to_the_roster_phone_and_expires_after_the_ttl(
    client: Client, otp: RecordingOtpSender, clock: ManualClock
) -> None:
    await import_persons(client, FATHER)
    response = await _otp(client, FATHER)
    assert response.status_code == 201
    body = response.json()
    assert body["phone_masked"] == "138****0001"
    assert body["expires_at"] == "2026-03-16T02:05:00Z"
    assert len(otp.last[FATHER["phone"]]) == 6


async def test_wallet_opens_with_the_otp_and_a_payment_password(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    response = await _open(client, otp_id, otp.last[FATHER["phone"]])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["expires_at"] == "2026-03-16T02:30:00Z"
    assert body["wallet"]["wallet"]["state"] == "open"
    assert body["wallet"]["wallet"]["opened_via"] == "app"
    assert (
        body["wallet"]["person"]["id_number_masked"]
        == FATHER["id_number"][:4] + "*" * 10 + FATHER["id_number"][-4:]
    )
    assert body["wallet"]["personal_account"] == {
        "available_fen": 0,
        "pending_fen": 0,
        "posted_fen": 0,
    }
    stored = await db.fetchrow("SELECT password_hash, opened_via FROM wallet")
    assert (
        stored["password_hash"].startswith("scrypt-hmac$")
        and PASSWORD not in stored["password_hash"]
    )
    assert await db.fetchval("SELECT token_hash FROM app_session") == digest(body["token"])


async def test_resident_wallet_has_no_personal_account(
    client: Client, otp: RecordingOtpSender
) -> None:
    await import_persons(client, CHILD)
    token = await open_wallet(client, otp, CHILD)
    response = await client.get("/app/v1/wallet", headers=bearer(token))
    assert response.json()["personal_account"] is None
    assert response.json()["person"]["scheme"] == "resident"


async def test_wrong_otp_is_refused_counted_and_opens_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    response = await _open(client, otp_id, _wrong(otp.last[FATHER["phone"]]))
    assert response.status_code == 403
    assert (response.json()["code"], response.json()["attempts_left"]) == ("otp_wrong", 4)
    assert await db.fetchval("SELECT attempts FROM otp_challenge") == 1
    assert await _wallet_count(db) == 0


async def test_otp_is_used_up_after_the_maximum_wrong_attempts(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    code = otp.last[FATHER["phone"]]
    answers = [(await _open(client, otp_id, _wrong(code))).json() for _ in range(5)]
    assert [a["attempts_left"] for a in answers] == [4, 3, 2, 1, 0]
    response = await _open(client, otp_id, code)
    assert (response.status_code, response.json()["code"]) == (410, "otp_expired")
    assert await _wallet_count(db) == 0


async def test_expired_otp_is_refused(
    client: Client, otp: RecordingOtpSender, clock: ManualClock, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    clock.advance(seconds=300)
    response = await _open(client, otp_id, otp.last[FATHER["phone"]])
    assert (response.status_code, response.json()["code"]) == (410, "otp_expired")
    assert await _wallet_count(db) == 0


async def test_used_otp_cannot_be_used_again(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    code = otp.last[FATHER["phone"]]
    assert (await _open(client, otp_id, code)).status_code == 201
    response = await _open(client, otp_id, code)
    assert (response.status_code, response.json()["code"]) == (410, "otp_expired")


async def test_login_otp_cannot_open_a_wallet(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    await open_wallet(client, otp, FATHER)
    otp_id = await _otp_id(client, FATHER, "login")
    response = await _open(client, otp_id, otp.last[FATHER["phone"]])
    assert (response.status_code, response.json()["code"]) == (404, "not_found")


async def test_name_mismatch_and_unknown_id_number_get_the_same_answer(
    client: Client, otp: RecordingOtpSender
) -> None:
    await import_persons(client, FATHER)
    wrong_name = await _otp(client, {**FATHER, "name": "张三"})
    unknown = await _otp(client, person(9, "张三丰"))
    assert (wrong_name.status_code, unknown.status_code) == (404, 404)
    assert wrong_name.json()["detail"] == unknown.json()["detail"]
    assert wrong_name.json()["code"] == "not_found"
    assert otp.last == {}


async def test_second_wallet_is_refused(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    await open_wallet(client, otp, FATHER)
    response = await _otp(client, FATHER)
    assert (response.status_code, response.json()["code"]) == (409, "already_exists")


async def test_person_not_in_normal_status_cannot_open_a_wallet(
    client: Client, otp: RecordingOtpSender
) -> None:
    await import_persons(client, {**FATHER, "status": "suspended"})
    response = await _otp(client, FATHER)
    assert (response.status_code, response.json()["code"]) == (422, "person_not_eligible")
    assert otp.last == {}


async def test_status_change_after_the_otp_still_stops_the_opening(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    await import_persons(client, {**FATHER, "status": "terminated"})
    response = await _open(client, otp_id, otp.last[FATHER["phone"]])
    assert (response.status_code, response.json()["code"]) == (422, "person_not_eligible")
    assert await _wallet_count(db) == 0


async def test_weak_payment_password_is_refused_and_the_otp_stays_usable(
    client: Client, otp: RecordingOtpSender
) -> None:
    await import_persons(client, FATHER)
    otp_id = await _otp_id(client, FATHER)
    code = otp.last[FATHER["phone"]]
    for weak in ("123456", "999999", "654321", "12345"):
        response = await _open(client, otp_id, code, password=weak)
        assert (response.status_code, response.json()["code"]) == (400, "invalid_request"), weak
    assert (await _open(client, otp_id, code)).status_code == 201


# --- sessions ----------------------------------------------------------------------------------


async def _login(client: Client, otp: RecordingOtpSender, who: dict[str, Any]) -> Any:
    otp_id = await _otp_id(client, who, "login")
    return await client.post(
        "/app/v1/sessions", json={"otp_id": otp_id, "otp_code": otp.last[who["phone"]]}
    )


async def test_login_gives_a_working_session(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    await open_wallet(client, otp, FATHER)
    response = await _login(client, otp, FATHER)
    assert response.status_code == 201, response.text
    wallet = await client.get("/app/v1/wallet", headers=bearer(response.json()["token"]))
    assert wallet.status_code == 200
    assert wallet.json()["person"]["name"] == "张三丰"


async def test_login_without_a_wallet_is_refused(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    response = await _otp(client, FATHER, "login")
    assert (response.status_code, response.json()["code"]) == (422, "person_not_eligible")


async def test_logout_ends_the_session(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, FATHER)
    token = await open_wallet(client, otp, FATHER)
    response = await client.delete("/app/v1/sessions/current", headers=bearer(token))
    assert response.status_code == 204
    after = await client.get("/app/v1/wallet", headers=bearer(token))
    assert (after.status_code, after.json()["code"]) == (401, "unauthorized")
    # The same logout again (its answer lost) gets the same answer; a made-up token does not.
    again = await client.delete("/app/v1/sessions/current", headers=bearer(token))
    assert again.status_code == 204
    unknown = await client.delete("/app/v1/sessions/current", headers=bearer("no-such-token"))
    assert (unknown.status_code, unknown.json()["code"]) == (401, "unauthorized")


async def test_expired_session_is_refused(
    client: Client, otp: RecordingOtpSender, clock: ManualClock
) -> None:
    await import_persons(client, FATHER)
    token = await open_wallet(client, otp, FATHER)
    clock.advance(seconds=1799)
    assert (await client.get("/app/v1/wallet", headers=bearer(token))).status_code == 200
    clock.advance(seconds=1)
    response = await client.get("/app/v1/wallet", headers=bearer(token))
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


async def test_wallet_needs_a_session_token(client: Client) -> None:
    response = await client.get("/app/v1/wallet")
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


# --- opening at a counter ----------------------------------------------------------------------


async def _counter(client: Client, body: dict[str, Any]) -> Any:
    return await client.post(
        "/operator/v1/wallets",
        json={"payment_password": PASSWORD, **body},
        headers={**OPERATOR, "X-Operator-Name": "counter-3"},
    )


async def test_counter_opens_a_wallet_without_a_phone_and_audits_it(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    response = await _counter(
        client, {"id_number": FATHER["id_number"], "name": FATHER["name"], "opened_via": "counter"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["wallet"]["opened_via"] == "counter"
    event = await db.fetchrow(
        "SELECT actor, action, detail FROM audit_event WHERE action = 'wallet.open'"
    )
    assert (event["actor"], json.loads(event["detail"])) == (
        "counter-3",
        {"opened_via": "counter", "guardian": None},
    )


async def test_guardian_opens_a_wallet_for_a_child(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER, CHILD)
    response = await _counter(
        client,
        {
            "id_number": CHILD["id_number"],
            "name": CHILD["name"],
            "opened_via": "guardian",
            "guardian_id_number": FATHER["id_number"],
        },
    )
    assert response.status_code == 201, response.text
    row = await db.fetchrow(
        "SELECT w.opened_via, g.id_number FROM wallet w JOIN insured_person g ON g.id = w.guardian_person_id"
    )
    assert (row["opened_via"], row["id_number"]) == ("guardian", FATHER["id_number"])


async def test_unknown_guardian_is_refused(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, CHILD)
    response = await _counter(
        client,
        {
            "id_number": CHILD["id_number"],
            "name": CHILD["name"],
            "opened_via": "guardian",
            "guardian_id_number": FATHER["id_number"],
        },
    )
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert await _wallet_count(db) == 0


async def test_guardian_not_in_normal_status_is_refused(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, {**FATHER, "status": "deceased"}, CHILD)
    response = await _counter(
        client,
        {
            "id_number": CHILD["id_number"],
            "name": CHILD["name"],
            "opened_via": "guardian",
            "guardian_id_number": FATHER["id_number"],
        },
    )
    assert (response.status_code, response.json()["code"]) == (422, "person_not_eligible")
    assert await _wallet_count(db) == 0


async def test_guardian_opening_needs_the_guardian(client: Client) -> None:
    await import_persons(client, CHILD)
    response = await _counter(
        client, {"id_number": CHILD["id_number"], "name": CHILD["name"], "opened_via": "guardian"}
    )
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")


async def test_counter_opening_checks_the_roster_name(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    response = await _counter(client, {"id_number": FATHER["id_number"], "name": "张三"})
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert await _wallet_count(db) == 0
