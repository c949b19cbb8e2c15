"""Helpers for network tests: people enrolled at a node over its HTTP API, raw envelopes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import httpx

from nodes.network import LocalNode
from protocol.envelope import Envelope, Wire, encode_batch, encode_envelope
from protocol.messages import Body, typ_of
from tests.support import OPERATOR, PASSWORD, bearer, person
from wallet.otp import RecordingOtpSender
from wallet.plt.transport import CONTENT_TYPES, EPOCH

# Every node's own people use their own ID number ranges; the address code of the ID number
# is deliberately Hebei's for everyone (RULES 22: routing never looks at it).
GIVER_SEQ = 100
RECEIVER_SEQ = 500


@dataclass
class Holder:
    """An insured person at one node, with a session token if they opened a wallet."""

    node: LocalNode
    row: dict[str, Any]
    token: str | None

    @property
    def id_number(self) -> str:
        return str(self.row["id_number"])

    @property
    def name(self) -> str:
        return str(self.row["name"])

    @property
    def headers(self) -> dict[str, str]:
        assert self.token is not None, "this person has no wallet"
        return bearer(self.token)


def client(node: LocalNode) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, timeout=30)


async def enrol(
    node: LocalNode,
    seq: int,
    name: str,
    *,
    scheme: str = "employee",
    wallet: bool = True,
) -> Holder:
    """Put a person on the node's roster (operator API) and open their wallet (app flow)."""
    row = person(seq, name, scheme=scheme, pooling_region=node.province.code[:2] + "0100")
    async with client(node) as http:
        response = await http.post("/operator/v1/roster", json={"persons": [row]}, headers=OPERATOR)
        assert response.status_code == 200, response.text
        token = None
        if wallet:
            otp = node.otp
            assert isinstance(otp, RecordingOtpSender)
            response = await http.post(
                "/app/v1/otp",
                json={"id_number": row["id_number"], "name": name, "purpose": "open_wallet"},
            )
            assert response.status_code == 201, response.text
            response = await http.post(
                "/app/v1/wallets",
                json={
                    "otp_id": response.json()["otp_id"],
                    "otp_code": otp.last[row["phone"]],
                    "payment_password": PASSWORD,
                },
            )
            assert response.status_code == 201, response.text
            token = response.json()["token"]
    return Holder(node=node, row=row, token=token)


async def file_cross(
    giver: Holder,
    receiver: Holder,
    *,
    relation_type: str = "child",
    password: str = PASSWORD,
    province: str | None = None,
    name: str | None = None,
) -> httpx.Response:
    async with client(giver.node) as http:
        return await http.post(
            "/app/v1/cross-relationships",
            json={
                "receiver_province": province or receiver.node.province.code,
                "receiver_id_number": receiver.id_number,
                "receiver_name": name or receiver.name,
                "relation_type": relation_type,
                "evidence_ref": "hukou-0001",
                "payment_password": password,
            },
            headers=giver.headers,
        )


async def app_post(who: Holder, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with client(who.node) as http:
        return await http.post(path, json=body, headers=who.headers)


async def app_get(who: Holder, path: str) -> httpx.Response:
    async with client(who.node) as http:
        return await http.get(path, headers=who.headers)


async def rows(node: LocalNode, sql: str, *args: object) -> list[dict[str, Any]]:
    """Rows of a query on the node's own database, as dicts."""
    return [dict(r) for r in await node.ctx.pool.fetch(sql, *args)]


async def cross_state(node: LocalNode, relation_id: str) -> str | None:
    value: str | None = await node.ctx.pool.fetchval(
        "SELECT state FROM cross_relationship WHERE relation_id = $1", relation_id
    )
    return value


def now_ms(node: LocalNode) -> int:
    return (node.ctx.clock.now() - EPOCH) // dt.timedelta(milliseconds=1)


def seal_from(sender: LocalNode, to_node: str, body: Body) -> Envelope:
    """An envelope signed by `sender`'s current key (as its sender would make it)."""
    return sender.plt.seal(typ_of(body), to_node, body, now_ms(sender))


async def post_batch(
    node: LocalNode, envelopes: list[Envelope], wire: Wire = "msgpack"
) -> httpx.Response:
    async with client(node) as http:
        return await http.post(
            "/plt/v1/messages",
            content=encode_batch(envelopes, wire),
            headers={"content-type": CONTENT_TYPES[wire]},
        )


async def post_raw(node: LocalNode, content: bytes, wire: Wire = "msgpack") -> httpx.Response:
    async with client(node) as http:
        return await http.post(
            "/plt/v1/messages", content=content, headers={"content-type": CONTENT_TYPES[wire]}
        )


def wire_bytes(env: Envelope, wire: Wire = "msgpack") -> bytes:
    return encode_envelope(env, wire)
