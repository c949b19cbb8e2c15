"""In-province relationships: a decline or an operator's review sent again after it took
effect answers the current state; the opposite request is a conflict; one audit event."""

from __future__ import annotations

import pytest

from tests.support import OPERATOR
from tests.wallet.test_relationships import Client, confirm, filed
from tests.wallet.test_settlement import member, set_rules
from wallet.otp import RecordingOtpSender

pytestmark = pytest.mark.anyio


async def audited(client: Client, action: str) -> int:
    response = await client.get(f"/operator/v1/audit?action={action}", headers=OPERATOR)
    assert response.status_code == 200, response.text
    return len(response.json())


async def test_decline_replayed(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)
    path = f"/app/v1/relationships/{rid}"

    first = await client.post(f"{path}/decline", headers=receiver.auth)
    again = await client.post(f"{path}/decline", headers=receiver.auth)
    confirmed_late = await client.post(
        f"{path}/confirm", json={"payment_password": "135790"}, headers=receiver.auth
    )

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == first.json()
    assert first.json()["state"] == "declined"
    assert (confirmed_late.status_code, confirmed_late.json()["code"]) == (409, "state_conflict")
    assert await audited(client, "relationship.decline") == 1


async def test_review_replayed(client: Client, otp: RecordingOtpSender) -> None:
    set_rules(client, relationship_review_required=True)
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)
    await confirm(client, receiver, rid)
    path = f"/operator/v1/relationships/{rid}"

    first = await client.post(f"{path}/approve", headers=OPERATOR)
    again = await client.post(f"{path}/approve", headers=OPERATOR)
    rejected_late = await client.post(f"{path}/reject", headers=OPERATOR)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["state"] == "active"
    assert (rejected_late.status_code, rejected_late.json()["code"]) == (409, "state_conflict")
    assert await audited(client, "relationship.approve") == 1
