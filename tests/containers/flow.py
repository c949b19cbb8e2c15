"""What the container tests do to nodes, over HTTP only: enrol, open wallets, relationships,
grants, payments. OTPs are read from the node's own log (the `log` OTP sender)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from protocol.ids import uuid7
from tests.containers.harness import OPERATOR, Box, ContainerNetwork, wait_for
from tests.support import PASSWORD, person

STEP_TIMEOUT_S = 60.0


@dataclass
class Holder:
    """An insured person at one province's node, with an app session."""

    net: ContainerNetwork
    box: Box
    row: dict[str, Any]
    token: str

    @property
    def id_number(self) -> str:
        return str(self.row["id_number"])

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        with self.box.http() as http:
            return http.post(path, json=body, headers={"Authorization": f"Bearer {self.token}"})

    def get(self, path: str) -> httpx.Response:
        with self.box.http() as http:
            return http.get(path, headers={"Authorization": f"Bearer {self.token}"})


def enrol(
    net: ContainerNetwork, node_id: str, seq: int, name: str, scheme: str = "employee"
) -> Holder:
    """Roster entry (operator API), then the app's wallet opening with an OTP from the log."""
    box = net[node_id]
    row = person(seq, name, scheme=scheme, pooling_region=box.province.code[:2] + "0100")
    with box.http() as http:
        response = http.post("/operator/v1/roster", json={"persons": [row]}, headers=OPERATOR)
        assert response.status_code == 200, response.text
        seen = net.otp_count(node_id, row["phone"], "open_wallet")
        response = http.post(
            "/app/v1/otp",
            json={"id_number": row["id_number"], "name": name, "purpose": "open_wallet"},
        )
        assert response.status_code == 201, response.text
        code = net.otp_code(node_id, row["phone"], "open_wallet", seen)
        response = http.post(
            "/app/v1/wallets",
            json={
                "otp_id": response.json()["otp_id"],
                "otp_code": code,
                "payment_password": PASSWORD,
            },
        )
        assert response.status_code == 201, response.text
    return Holder(net, box, row, response.json()["token"])


def credit(giver: Holder, amount_fen: int) -> None:
    with giver.box.http() as http:
        response = http.post(
            "/operator/v1/credit-batches",
            json={
                "batch_id": f"c-{giver.id_number[-6:]}",
                "month": "2026-03",
                "credits": [{"id_number": giver.id_number, "amount_fen": amount_fen}],
            },
            headers=OPERATOR,
        )
    assert response.status_code == 201, response.text


def link(giver: Holder, receiver: Holder) -> str:
    """File a cross-province relationship at the giver's node; the receiver confirms it at
    theirs once it has arrived; wait until both nodes hold it active."""
    filed = giver.post(
        "/app/v1/cross-relationships",
        {
            "receiver_province": receiver.box.province.code,
            "receiver_id_number": receiver.id_number,
            "receiver_name": receiver.row["name"],
            "relation_type": "child",
            "evidence_ref": "hukou-0001",
            "payment_password": PASSWORD,
        },
    )
    assert filed.status_code == 201, filed.text
    relation_id: str = filed.json()["relation_id"]

    def confirmed() -> bool:
        response = receiver.post(
            f"/app/v1/cross-relationships/{relation_id}/confirm", {"payment_password": PASSWORD}
        )
        assert response.status_code in (200, 404), response.text
        return response.status_code == 200

    wait_for(
        f"relationship {relation_id} to reach {receiver.box.node_id}", confirmed, STEP_TIMEOUT_S
    )
    for who in (giver, receiver):
        wait_for(
            f"relationship {relation_id} active at {who.box.node_id}",
            lambda who=who: (
                who.get(f"/app/v1/cross-relationships/{relation_id}").json()["state"] == "active"
            ),
            STEP_TIMEOUT_S,
        )
    return relation_id


def instruct(
    giver: Holder, relation_id: str, amount_fen: int, transfer_id: str | None = None
) -> httpx.Response:
    return giver.post(
        "/app/v1/grants",
        {
            "transfer_id": transfer_id or uuid7(),
            "relation_id": relation_id,
            "amount_fen": amount_fen,
            "payment_password": PASSWORD,
        },
    )


def grant(giver: Holder, relation_id: str, amount_fen: int) -> str:
    response = instruct(giver, relation_id, amount_fen)
    assert response.status_code == 202, response.text
    transfer_id: str = response.json()["transfer_id"]
    return transfer_id


def incoming_state(receiver: Holder, transfer_id: str) -> str | None:
    response = receiver.get("/app/v1/grants/incoming")
    assert response.status_code == 200, response.text
    for offered in response.json():
        if offered["transfer_id"] == transfer_id:
            return str(offered["state"])
    return None


def wait_offered(receiver: Holder, transfer_id: str, timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Until the PREPARE has reached the receiver's node."""
    wait_for(
        f"grant {transfer_id} offered at {receiver.box.node_id}",
        lambda: incoming_state(receiver, transfer_id) == "PENDING_ACCEPT",
        timeout_s,
    )


def accept(receiver: Holder, transfer_id: str) -> None:
    response = receiver.post(
        f"/app/v1/grants/incoming/{transfer_id}/accept", {"payment_password": PASSWORD}
    )
    assert response.status_code == 200, response.text


def giver_state(giver: Holder, transfer_id: str) -> tuple[str, bool]:
    response = giver.get(f"/app/v1/grants/{transfer_id}")
    assert response.status_code == 200, response.text
    view = response.json()
    return str(view["state"]), bool(view["acknowledged"])


def wait_decided(giver: Holder, transfer_id: str, timeout_s: float = STEP_TIMEOUT_S) -> str:
    """Until the giver's node decided and the receiver's node acknowledged; the decision."""

    def decided() -> str | None:
        state, acked = giver_state(giver, transfer_id)
        return state if acked else None

    return wait_for(f"grant {transfer_id} decided and acknowledged", decided, timeout_s)


def balance(holder: Holder) -> int:
    """The giver's available personal-account balance, from the operator API."""
    with holder.box.http() as http:
        response = http.get(f"/operator/v1/persons/{holder.id_number}", headers=OPERATOR)
    assert response.status_code == 200, response.text
    account = response.json()["personal_account"]
    return int(account["available_fen"])
