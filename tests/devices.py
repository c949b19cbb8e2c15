"""A phone for tests: a P-256 key registered through the HTTP API, signing the way an app
would (`protocol.device_auth`). Works with the test client and with httpx clients alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device_auth import (
    Action,
    b64url,
    instruction,
    new_device_key,
    sec1,
    sign,
)
from tests.support import PASSWORD
from wallet.otp import RecordingOtpSender


class Http(Protocol):
    async def post(self, url: str, **kwargs: Any) -> Any: ...


@dataclass
class Phone:
    key: ec.EllipticCurvePrivateKey
    kid: str
    node: str
    person: str  # as giver and for relationship actions
    receiver: str  # when accepting or declining a grant

    def auth(
        self,
        action: Action,
        ids: dict[str, str],
        amount_fen: int | None,
        created_at_ms: int,
        *,
        node: str | None = None,
        person: str | None = None,
    ) -> dict[str, str]:
        """The `device` member of a request body: what the app sends."""
        if person is None:
            person = self.receiver if action in ("grant.accept", "grant.decline") else self.person
        what = instruction(
            action,
            node=node or self.node,
            person=person,
            ids=ids,
            amount_fen=amount_fen,
            created_at_ms=created_at_ms,
        )
        signed, sig = sign(self.key, what)
        return {"kid": self.kid, "signed": b64url(signed), "sig": b64url(sig)}


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    return b64url(sec1(key.public_key()))


async def register_phone(
    http: Http,
    headers: dict[str, str],
    otp: RecordingOtpSender,
    phone_number: str,
    *,
    label: str = "my phone",
    key: ec.EllipticCurvePrivateKey | None = None,
    password: str = PASSWORD,
) -> Phone:
    """Register a new device key for the holder behind `headers`; return the phone."""
    key = key or new_device_key()
    response = await http.post("/app/v1/devices/otp", headers=headers)
    assert response.status_code == 201, response.text
    body = {
        "otp_id": response.json()["otp_id"],
        "otp_code": otp.last[phone_number],
        "payment_password": password,
        "public_key": public_key_b64(key),
        "label": label,
    }
    response = await http.post("/app/v1/devices", json=body, headers=headers)
    assert response.status_code == 201, response.text
    view = response.json()
    return Phone(
        key=key,
        kid=view["kid"],
        node=view["node"],
        person=view["person"],
        receiver=view["receiver"],
    )
