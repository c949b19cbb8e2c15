"""Device keys at one node (issue 9): registration, limits, listing, revocation, audit."""

from __future__ import annotations

from typing import Any

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from protocol.device_auth import b64url, new_device_key
from tests.devices import public_key_b64, register_phone
from tests.support import OPERATOR, PASSWORD, bearer, import_persons, open_wallet, person
from wallet.clock import ManualClock
from wallet.devices import filing_ids
from wallet.otp import RecordingOtpSender
from wallet.plt.grants_base import to_ms

Client = AsyncTestClient[Litestar]

HOLDER = person(1, "张三丰")
OTHER = person(2, "李四")


async def holder(
    client: Client, otp: RecordingOtpSender, who: dict[str, Any] = HOLDER
) -> dict[str, str]:
    await import_persons(client, who)
    return bearer(await open_wallet(client, otp, who))


async def device_otp(client: Client, headers: dict[str, str]) -> str:
    response = await client.post("/app/v1/devices/otp", headers=headers)
    assert response.status_code == 201, response.text
    otp_id: str = response.json()["otp_id"]
    return otp_id


async def register(
    client: Client, headers: dict[str, str], otp_id: str, code: str, **overrides: Any
) -> Any:
    body = {
        "otp_id": otp_id,
        "otp_code": code,
        "payment_password": PASSWORD,
        "public_key": public_key_b64(new_device_key()),
        "label": "my phone",
        **overrides,
    }
    return await client.post("/app/v1/devices", json=body, headers=headers)


async def test_a_holder_registers_a_phone_with_password_and_otp_and_lists_it(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    headers = await holder(client, otp)
    phone = await register_phone(client, headers, otp, HOLDER["phone"], label="Mate 60")
    assert phone.kid.startswith("dk_")
    assert (phone.node, phone.person, phone.receiver) == ("prov-13", "p-1", "w-1")
    listed = (await client.get("/app/v1/devices", headers=headers)).json()
    assert [(d["kid"], d["label"], d["alg"], d["revoked_at"]) for d in listed] == [
        (phone.kid, "Mate 60", "ES256", None)
    ]
    event = await db.fetchrow("SELECT actor, action, subject, detail FROM audit_event "
                              "WHERE action = 'device.register'")  # fmt: skip
    assert (event["actor"], event["subject"]) == ("person:1", "person:1")
    # An SPKI DER key (what Android exports) is accepted and stored as the same point.
    key = new_device_key()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    response = await register(
        client, headers, await device_otp(client, headers), otp.last[HOLDER["phone"]],
        public_key=b64url(spki),
    )  # fmt: skip
    assert response.status_code == 201, response.text
    assert response.json()["public_key"] == public_key_b64(key)


async def test_registration_needs_the_right_password_and_a_fresh_otp_of_its_own(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    headers = await holder(client, otp)
    other = await holder(client, otp, OTHER)
    otp_id = await device_otp(client, headers)
    code = otp.last[HOLDER["phone"]]
    wrong = await register(client, headers, otp_id, code, payment_password="246802")
    assert (wrong.status_code, wrong.json()["code"]) == (403, "payment_password_wrong")
    assert wrong.json()["attempts_left"] == 4
    bad_code = f"{(int(code) + 1) % 1_000_000:06d}"
    wrong = await register(client, headers, otp_id, bad_code)
    assert (wrong.status_code, wrong.json()["code"]) == (403, "otp_wrong")
    # Another holder's code is not mine.
    stolen = await register(client, other, otp_id, code)
    assert (stolen.status_code, stolen.json()["code"]) == (403, "forbidden")
    # A login code does not register devices.
    response = await client.post(
        "/app/v1/otp",
        json={"id_number": HOLDER["id_number"], "name": HOLDER["name"], "purpose": "login"},
    )
    login_otp = response.json()["otp_id"]
    response = await register(client, headers, login_otp, otp.last[HOLDER["phone"]])
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    # Unauthenticated OTP requests cannot ask for add_device.
    response = await client.post(
        "/app/v1/otp",
        json={"id_number": HOLDER["id_number"], "name": HOLDER["name"], "purpose": "add_device"},
    )
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    ok = await register(client, headers, otp_id, code)
    assert ok.status_code == 201, ok.text
    again = await register(client, headers, otp_id, code)
    assert (again.status_code, again.json()["code"]) == (410, "otp_expired")
    assert await db.fetchval("SELECT count(*) FROM device_key") == 1


async def test_keys_that_are_not_p256_are_refused_and_a_key_registers_once(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    headers = await holder(client, otp)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    wrong_curve = b64url(
        p384.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    otp_id = await device_otp(client, headers)
    code = otp.last[HOLDER["phone"]]
    for bad in (wrong_curve, b64url(b"\x04" + b"\x01" * 64), "not base64!"):
        response = await register(client, headers, otp_id, code, public_key=bad)
        assert (response.status_code, response.json()["code"]) == (400, "device_key_invalid")
    response = await register(client, headers, otp_id, code, alg="ES384")
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    key = public_key_b64(new_device_key())
    first = await register(client, headers, otp_id, code, public_key=key)
    assert first.status_code == 201
    # The same registration again (its answer lost, its OTP used up) answers the device.
    replay = await register(client, headers, otp_id, code, public_key=key)
    assert (replay.status_code, replay.json()) == (201, first.json())
    response = await register(
        client, headers, await device_otp(client, headers), otp.last[HOLDER["phone"]],
        public_key=key, label="another name",
    )  # fmt: skip
    assert (response.status_code, response.json()["code"]) == (409, "already_exists")
    assert await db.fetchval("SELECT count(*) FROM device_key") == 1


async def test_at_most_five_active_devices_and_revoking_one_frees_a_place(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    headers = await holder(client, otp)
    other = await holder(client, otp, OTHER)
    phones = [
        await register_phone(client, headers, otp, HOLDER["phone"], label=f"phone {i}")
        for i in range(5)
    ]
    sixth = await register(
        client, headers, await device_otp(client, headers), otp.last[HOLDER["phone"]]
    )
    assert (sixth.status_code, sixth.json()["code"], sixth.json()["limit"]) == (
        409,
        "device_limit_reached",
        5,
    )
    # Nobody revokes another holder's device; unknown ids are not found.
    for who, kid in ((other, phones[0].kid), (headers, "dk_nope")):
        response = await client.post(f"/app/v1/devices/{kid}/revoke", headers=who)
        assert (response.status_code, response.json()["code"]) == (404, "not_found")
    revoked = await client.post(f"/app/v1/devices/{phones[0].kid}/revoke", headers=headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = await client.post(f"/app/v1/devices/{phones[0].kid}/revoke", headers=headers)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]  # idempotent
    await register_phone(client, headers, otp, HOLDER["phone"], label="new phone")
    assert (
        await db.fetchval(
            "SELECT count(*) FROM device_key WHERE person_id = 1 AND revoked_at IS NULL"
        )
        == 5
    )
    # The operator revokes them all (a stolen phone reported at a counter), audited.
    response = await client.post(
        f"/operator/v1/persons/{HOLDER['id_number']}/devices/revoke", headers=OPERATOR
    )
    assert response.status_code == 200, response.text
    assert (response.json()["person_id"], len(response.json()["revoked"])) == (1, 5)
    response = await client.post(
        f"/operator/v1/persons/{person(9, '王五')['id_number']}/devices/revoke", headers=OPERATOR
    )
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    response = await client.post(f"/operator/v1/persons/{HOLDER['id_number']}/devices/revoke")
    assert response.status_code == 401
    actions = [r["action"] for r in await db.fetch(
        "SELECT action FROM audit_event WHERE action LIKE 'device.%' ORDER BY id")]  # fmt: skip
    assert actions == ["device.register"] * 5 + ["device.revoke", "device.register",
                                                 "device.revoke_all"]  # fmt: skip


# --- the other sensitive actions, signed -----------------------------------------------------


async def test_relationships_and_payment_codes_are_authorised_by_device_signatures(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, clock: ManualClock
) -> None:
    giver = await holder(client, otp)
    receiver = await holder(client, otp, OTHER)
    giver_phone = await register_phone(client, giver, otp, HOLDER["phone"])
    receiver_phone = await register_phone(client, receiver, otp, OTHER["phone"])
    now = to_ms(clock.now())
    ids = filing_ids("130000", OTHER["id_number"], "child")
    body = {
        "receiver_id_number": OTHER["id_number"],
        "receiver_name": OTHER["name"],
        "relation_type": "child",
        "evidence_ref": "hukou-0001",
    }
    # A signature for another relative (or relation type) files nothing.
    for wrong_ids, differs in (
        ({**ids, "receiver_id_number": person(7, "x")["id_number"]}, ["ids.receiver_id_number"]),
        ({**ids, "relation_type": "parent"}, ["ids.relation_type"]),
    ):
        signed = giver_phone.auth("relation.file", wrong_ids, None, now)
        response = await client.post(
            "/app/v1/relationships", json={**body, "device": signed}, headers=giver
        )
        assert (response.status_code, response.json()["code"]) == (
            403,
            "device_signature_mismatch",
        )
        assert response.json()["differs"] == differs
    assert await db.fetchval("SELECT count(*) FROM relationship") == 0
    signed = giver_phone.auth("relation.file", ids, None, now)
    response = await client.post(
        "/app/v1/relationships", json={**body, "device": signed}, headers=giver
    )
    assert response.status_code == 201, response.text
    rid = response.json()["id"]
    # Confirming with the giver's phone, or a signature over another relationship: refused.
    for phone, signed_rid in ((giver_phone, rid), (receiver_phone, rid + 1)):
        response = await client.post(
            f"/app/v1/relationships/{rid}/confirm",
            json={"device": phone.auth("relation.confirm", {"relationship_id": str(signed_rid)},
                                       None, now)},
            headers=receiver,
        )  # fmt: skip
        assert response.status_code == 403, response.text
    response = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"device": receiver_phone.auth("relation.confirm", {"relationship_id": str(rid)},
                                            None, now)},
        headers=receiver,
    )  # fmt: skip
    assert (response.status_code, response.json()["state"]) == (200, "active"), response.text
    response = await client.post(
        f"/app/v1/relationships/{rid}/end",
        json={"device": giver_phone.auth("relation.end", {"relationship_id": str(rid)}, None,
                                         now)},
        headers=giver,
    )  # fmt: skip
    assert (response.status_code, response.json()["state"]) == (200, "ended"), response.text

    # A payment code: without a body as before; with a device signature, it must verify.
    response = await client.post(
        "/app/v1/payment-codes",
        json={"device": giver_phone.auth("payment_code.issue", {}, None, now)},
        headers=giver,
    )
    assert response.status_code == 201, response.text
    response = await client.post(
        "/app/v1/payment-codes",
        json={"device": giver_phone.auth("payment_code.issue", {}, None, now - 301_000)},
        headers=giver,
    )
    assert (response.status_code, response.json()["code"]) == (403, "device_signature_stale")
    response = await client.post(
        "/app/v1/payment-codes",
        json={"device": giver_phone.auth("relation.end", {}, None, now)},
        headers=giver,
    )
    assert (response.status_code, response.json()["differs"]) == (403, ["action"])
    response = await client.post("/app/v1/payment-codes", json={"device": 1}, headers=giver)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    assert await db.fetchval("SELECT count(*) FROM payment_code") == 1
