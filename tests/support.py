"""Helpers for tests that drive a node through its HTTP API (the fixed API contract).

These call real endpoints only; nothing here writes to the database directly.
"""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from wallet.idnumber import check_character
from wallet.otp import RecordingOtpSender

OPERATOR_TOKEN = "op-test-token"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
PASSWORD = "135790"


def make_id_number(seq: int, birth: str = "19800101", region: str = "130102") -> str:
    """A valid 18-character ID number (GB 11643 check character computed)."""
    first17 = f"{region}{birth}{seq % 1000:03d}"
    return first17 + check_character(first17)


def person(
    seq: int,
    name: str,
    *,
    scheme: str = "employee",
    status: str = "normal",
    birth: str = "19800101",
    pooling_region: str = "130100",
    phone: str | None = None,
) -> dict[str, Any]:
    return {
        "id_number": make_id_number(seq, birth),
        "name": name,
        "scheme": scheme,
        "status": status,
        "pooling_region": pooling_region,
        "phone": phone or f"138{seq:08d}",
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def import_persons(client: AsyncTestClient, *persons: dict[str, Any]) -> dict[str, Any]:  # type: ignore[type-arg]
    response = await client.post(
        "/operator/v1/roster", json={"persons": list(persons)}, headers=OPERATOR
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def open_wallet(
    client: AsyncTestClient,  # type: ignore[type-arg]
    otp: RecordingOtpSender,
    who: dict[str, Any],
    password: str = PASSWORD,
) -> str:
    """Open a wallet through the app flow (OTP, then password); return the session token."""
    response = await client.post(
        "/app/v1/otp",
        json={"id_number": who["id_number"], "name": who["name"], "purpose": "open_wallet"},
    )
    assert response.status_code == 201, response.text
    otp_id = response.json()["otp_id"]
    response = await client.post(
        "/app/v1/wallets",
        json={"otp_id": otp_id, "otp_code": otp.last[who["phone"]], "payment_password": password},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


async def credit(
    client: AsyncTestClient,  # type: ignore[type-arg]
    batch_id: str,
    amounts: dict[str, int],
    month: str = "2026-03",
) -> dict[str, Any]:
    """Post a monthly credit batch: {id_number: amount_fen}."""
    response = await client.post(
        "/operator/v1/credit-batches",
        json={
            "batch_id": batch_id,
            "month": month,
            "credits": [{"id_number": k, "amount_fen": v} for k, v in amounts.items()],
        },
        headers=OPERATOR,
    )
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


async def available_fen(client: AsyncTestClient, token: str) -> int:  # type: ignore[type-arg]
    response = await client.get("/app/v1/wallet", headers=bearer(token))
    assert response.status_code == 200, response.text
    value: int = response.json()["personal_account"]["available_fen"]
    return value
