"""Helpers for single-node grant tests: a fake peer node that signs real envelopes.

The node under test is `prov-13` (tests/conftest.py). The fake peer `prov-11` plays the
other side of each grant: its messages are built with protocol/ helpers, sealed with its
own Ed25519 key, and handed to the node's handlers through `wallet.plt.dispatch`, as the
transport would after verifying them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import asyncpg
import pytest

from nodes.settings import Settings
from protocol.directory import Peer, PeerDirectory
from protocol.envelope import encode_envelope, seal
from protocol.ids import uuid7
from protocol.keys import SigningKey, initial_keyset, sign_keyset
from protocol.messages import Body, MessageType, decode_body, hash_body, typ_of
from tests.support import OPERATOR_TOKEN
from wallet import ledger
from wallet.context import WalletContext
from wallet.plt import dispatch as dispatch_module
from wallet.plt.dispatch import Incoming, dispatch
from wallet.plt.grants_base import to_ms
from wallet.plt.node import NodeKeys, PltNode
from wallet.plt.quota import clearing_position
from wallet.rules import ProvinceRules

NODE = "prov-13"  # the node under test (tests/conftest.py settings)
PEER = "prov-11"  # the fake other side


def grant_node_settings(database_url: str) -> Settings:
    """The node of tests/conftest.py, with sessions that outlive the clock's jumps."""
    return Settings(
        province_code="130000",
        node_id=NODE,
        database_url=database_url,
        operator_token=OPERATOR_TOKEN,
        db_pool_min=1,
        db_pool_max=20,
        rules=ProvinceRules(session_ttl_s=7 * 86_400),
    )


def count_one_message_handler(monkeypatch: pytest.MonkeyPatch, typ: MessageType) -> list[str]:
    """The transfer ids of the `typ` messages its one-message handler applies from now on
    (it still applies them): which messages of a batch a set-oriented handler left alone."""
    handler = dispatch_module._HANDLERS[typ]
    seen: list[str] = []

    async def counting(ctx: WalletContext, msg: Incoming) -> Body | None:
        seen.append(msg.body.transfer_id)
        return await handler(ctx, msg)

    monkeypatch.setitem(dispatch_module._HANDLERS, typ, counting)
    return seen


def node_key(node: str) -> SigningKey:
    """A fake node's signing key, from a fixed seed."""
    return SigningKey.from_seed(f"{node}/2026-03-1", f"{node} node key".encode().ljust(32, b"."))


def root_key(node: str) -> SigningKey:
    """A fake node's root key, from a fixed seed."""
    return SigningKey.from_seed(f"{node}/root-1", f"{node} root key".encode().ljust(32, b"#"))


PEER_KEY = node_key(PEER)
PEER_ROOT = root_key(PEER)
PEER_KEYSET_DOC = sign_keyset(initial_keyset(PEER, PEER_KEY, 0), PEER_ROOT)


def attach_plt(ctx: WalletContext) -> PltNode:
    """Give a test context node keys and a directory that knows (and trusts) the fake peer."""
    directory = PeerDirectory(
        [
            Peer(
                node=PEER,
                url="http://127.0.0.1:9",
                root_kid=PEER_ROOT.kid,
                root_pub=PEER_ROOT.public_b64,
            )
        ]
    )
    directory.install(PEER, PEER_KEYSET_DOC)
    node = PltNode(NodeKeys.generate(NODE, 0), directory)
    ctx.plt = node
    return node


def sealed(body: Body, *, now_ms: int, from_node: str = PEER, to_node: str = NODE) -> bytes:
    """The body as a signed envelope from the fake peer (msgpack wire bytes)."""
    key = node_key(from_node)
    return encode_envelope(seal(body, typ_of(body), from_node, to_node, key, now_ms), "msgpack")


def incoming(
    body: Body, *, now: dt.datetime, is_reply: bool = False, from_node: str = PEER
) -> Incoming:
    """A verified message from the fake peer, as the transport hands it over."""
    now_ms = to_ms(now)
    return Incoming(
        from_node=from_node,
        typ=typ_of(body),
        body=body,
        body_hash=hash_body(body),
        envelope=sealed(body, now_ms=now_ms, from_node=from_node),
        msg_id=uuid7(),
        now_ms=now_ms,
        is_reply=is_reply,
    )


async def deliver(ctx: WalletContext, body: Body, *, is_reply: bool = False) -> Body | None:
    """Dispatch a message from the fake peer to the node; return its answer."""
    return await dispatch(ctx, incoming(body, now=ctx.clock.now(), is_reply=is_reply))


async def person_id(db: asyncpg.Connection, who: dict[str, Any]) -> int:
    value: int = await db.fetchval(
        "SELECT id FROM insured_person WHERE id_number = $1", who["id_number"]
    )
    return value


async def personal_account(db: asyncpg.Connection, who: dict[str, Any]) -> int:
    value: int = await db.fetchval(
        "SELECT personal_account_id FROM insured_person WHERE id_number = $1", who["id_number"]
    )
    return value


async def add_relation(
    db: asyncpg.Connection,
    side: str,
    person: int,
    *,
    peer: str = PEER,
    other_ref: str = "w-42",
    state: str = "active",
    relation_type: str = "child",
    seq: int = 1,
    filed_at: dt.datetime | None = None,
) -> str:
    """A cross-province relationship row as the transport's relations code leaves it."""
    relation_id = uuid7()
    at = filed_at or dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    digest = hashlib.sha256(relation_id.encode()).hexdigest()
    if side == "giver":
        await db.execute(
            """INSERT INTO cross_relationship
               (relation_id, side, peer_node, person_id, other_name, other_id_number, other_ref,
                other_province, relation_type, evidence_ref, state, request_hash, filed_at,
                confirmed_at, ended_at)
               VALUES ($1, 'giver', $2, $3, '李四', $4, $5, '110000', $6, 'hukou-1', $7::text, $8,
                       $9::timestamptz, $9::timestamptz,
                       CASE WHEN $7::text = 'ended' THEN $9::timestamptz END)""",
            relation_id,
            peer,
            person,
            f"11010519491231{seq:03d}X"[:17] + "X",
            other_ref,
            relation_type,
            state,
            digest,
            at,
        )
    else:
        await db.execute(
            """INSERT INTO cross_relationship
               (relation_id, side, peer_node, person_id, other_name, other_ref, relation_type,
                state, request_hash, filed_at, confirmed_at, ended_at)
               VALUES ($1, 'receiver', $2, $3, '张*', $4, $5, $6::text, $7, $8::timestamptz,
                       $8::timestamptz, CASE WHEN $6::text = 'ended' THEN $8::timestamptz END)""",
            relation_id,
            peer,
            person,
            other_ref,
            relation_type,
            state,
            digest,
            at,
        )
    return relation_id


async def balance(db: asyncpg.Connection, account_id: int) -> ledger.Balance:
    return await ledger.balance(db, account_id)


async def clearing(db: asyncpg.Connection, kind: str, node: str = PEER) -> tuple[int, int]:
    """(posted, pending) net credit of the clearing sub-accounts with `node`."""
    pos = await clearing_position(db, kind, node)  # type: ignore[arg-type]
    return pos.posted_fen, pos.pending_fen


async def outbox(db: asyncpg.Connection, typ: MessageType, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM plt_outbox WHERE typ = $1 AND dedup_key = $2", typ.value, key
    )
    return row


async def outbox_body(db: asyncpg.Connection, typ: MessageType, key: str) -> Body:
    row = await outbox(db, typ, key)
    assert row is not None, f"no {typ} queued for {key}"
    return decode_body(typ, bytes(row["body"]))


async def books_balanced(db: asyncpg.Connection) -> None:
    check = await ledger.check_books(db)
    assert check.balanced, check


async def login(client: Any, otp: Any, who: dict[str, Any]) -> str:
    """A fresh session (the clock moved past the old one's lifetime)."""
    response = await client.post(
        "/app/v1/otp",
        json={"id_number": who["id_number"], "name": who["name"], "purpose": "login"},
    )
    assert response.status_code == 201, response.text
    response = await client.post(
        "/app/v1/sessions",
        json={"otp_id": response.json()["otp_id"], "otp_code": otp.last[who["phone"]]},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token
