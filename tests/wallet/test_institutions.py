"""Designated institutions: registration, API keys, suspension (operator surface)."""

from __future__ import annotations

import hashlib
from typing import TypeAlias

import asyncpg
import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, bearer
from tests.wallet.test_settlement import institution, member, pay
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]


async def register(client: Client, **fields: object) -> httpx.Response:
    body: dict[str, object] = {
        "code": "H1",
        "name": "市第一医院",
        "kind": "hospital",
        "categories": ["outpatient"],
    }
    body.update(fields)
    return await client.post("/operator/v1/institutions", json=body, headers=OPERATOR)


async def test_registration_shows_the_api_key_once_and_stores_its_digest(
    client: Client, db: asyncpg.Connection
) -> None:
    response = await register(client, categories=["outpatient", "inpatient"])
    listed = await client.get("/operator/v1/institutions", headers=OPERATOR)

    assert response.status_code == 201, response.text
    body = response.json()
    api_key = body["api_key"]
    assert api_key.startswith("inst_")
    institution = {k: v for k, v in body.items() if k != "api_key"}
    assert institution == {
        "code": "H1",
        "name": "市第一医院",
        "kind": "hospital",
        "categories": ["outpatient", "inpatient"],
        "state": "active",
        "balance_fen": 0,
        "created_at": body["created_at"],
    }
    assert api_key not in listed.text
    assert listed.json() == [institution]
    stored = await db.fetchval("SELECT api_key_hash FROM institution WHERE code = 'H1'")
    assert stored == hashlib.sha256(api_key.encode()).digest()


async def test_registration_opens_an_institution_account(
    client: Client, db: asyncpg.Connection
) -> None:
    await register(client)

    row = await db.fetchrow(
        "SELECT a.kind, a.code, a.debits_must_not_exceed_credits FROM institution i "
        "JOIN account a ON a.id = i.account_id WHERE i.code = 'H1'"
    )

    assert tuple(row) == ("institution", "institution:H1", True)


async def test_registration_is_audited(client: Client, db: asyncpg.Connection) -> None:
    await client.post(
        "/operator/v1/institutions",
        json={"code": "H1", "name": "市第一医院", "kind": "hospital", "categories": ["outpatient"]},
        headers={**OPERATOR, "X-Operator-Name": "alice"},
    )

    row = await db.fetchrow("SELECT actor, action, subject FROM audit_event")

    assert tuple(row) == ("alice", "institution.register", "institution:H1")


async def test_duplicate_code_already_exists(client: Client, db: asyncpg.Connection) -> None:
    await register(client)

    response = await register(client, name="另一家")

    assert response.status_code == 409
    assert response.json()["code"] == "already_exists"
    assert await db.fetchval("SELECT count(*) FROM institution") == 1


async def test_forbidden_category_cannot_be_registered(
    client: Client, db: asyncpg.Connection
) -> None:
    response = await register(client, code="GYM", categories=["pharmacy_drug", "fitness"])

    assert response.status_code == 422
    assert response.json()["code"] == "category_forbidden"
    assert await db.fetchval("SELECT count(*) FROM institution") == 0
    assert await db.fetchval("SELECT count(*) FROM account WHERE kind = 'institution'") == 0


async def test_unknown_category_or_kind_is_invalid(client: Client) -> None:
    category = await register(client, categories=["massage"])
    kind = await register(client, kind="spa")
    empty = await register(client, categories=[])

    for response in (category, kind, empty):
        assert response.status_code == 400


async def test_suspended_institution_key_is_refused_until_reactivated(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)

    suspended = await client.post("/operator/v1/institutions/H1/suspend", headers=OPERATOR)
    refused = await pay(client, key, patient, 100, "visit-1")
    reactivated = await client.post("/operator/v1/institutions/H1/reactivate", headers=OPERATOR)
    accepted = await pay(client, key, patient, 100, "visit-2")

    assert suspended.json()["state"] == "suspended"
    assert refused.status_code == 403
    assert reactivated.json()["state"] == "active"
    assert accepted.status_code == 201


async def test_suspending_twice_answers_the_current_state(client: Client) -> None:
    await register(client)
    first = await client.post("/operator/v1/institutions/H1/suspend", headers=OPERATOR)

    response = await client.post("/operator/v1/institutions/H1/suspend", headers=OPERATOR)

    assert response.status_code == 200, response.text
    assert response.json() == first.json()
    assert response.json()["state"] == "suspended"
    audit = await client.get("/operator/v1/audit?action=institution.suspended", headers=OPERATOR)
    assert len(audit.json()) == 1


async def test_unknown_institution_is_not_found(client: Client) -> None:
    suspend = await client.post("/operator/v1/institutions/NOPE/suspend", headers=OPERATOR)
    rotate = await client.post("/operator/v1/institutions/NOPE/api-key", headers=OPERATOR)
    weird = await client.post("/operator/v1/institutions/%00%20x/suspend", headers=OPERATOR)

    assert (suspend.status_code, rotate.status_code, weird.status_code) == (404, 404, 404)


async def test_rotating_the_key_retires_the_old_one_at_once(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    old_key = await institution(client)

    rotated = await client.post("/operator/v1/institutions/H1/api-key", headers=OPERATOR)
    new_key = rotated.json()["api_key"]
    with_old = await pay(client, old_key, patient, 100, "visit-1")
    with_new = await pay(client, new_key, patient, 100, "visit-2")

    assert rotated.status_code == 200
    assert new_key != old_key
    assert with_old.status_code == 401
    assert with_new.status_code == 201


async def test_institution_and_app_credentials_do_not_reach_operator_endpoints(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "王小明")
    key = await institution(client)

    for headers in (bearer(key), holder.auth, {}):
        listed = await client.get("/operator/v1/institutions", headers=headers)
        created = await client.post(
            "/operator/v1/institutions",
            json={"code": "X", "name": "X", "kind": "clinic", "categories": ["outpatient"]},
            headers=headers,
        )
        assert (listed.status_code, created.status_code) == (401, 401)


async def test_operator_and_app_credentials_do_not_reach_institution_endpoints(
    client: Client, otp: RecordingOtpSender
) -> None:
    holder = await member(client, otp, 1, "王小明")

    for headers in (OPERATOR, holder.auth):
        response = await client.get("/institution/v1/settlements/visit-1", headers=headers)
        assert response.status_code == 401
