"""Grants authorised by device keys, end to end over two nodes (issue 9).

The giver's phone signs the instruction at A, the signed instruction travels in the PREPARE
and B checks it before holding anything; the receiver's phone signs the acceptance at B, it
travels in the ACCEPT and A checks it. Every refusal is a 4xx with a stable code, and
nothing is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from nodes import cli
from nodes.network import LocalNetwork, LocalNode
from protocol.device_auth import b64url, instruction, new_device_key, sec1, sign, unb64url
from protocol.directory import encode_peers
from protocol.envelope import Envelope, decode_batch, open_envelope
from protocol.errors import ErrorClass, ErrorCode
from protocol.ids import uuid7
from protocol.messages import (
    Accept,
    DeviceProof,
    ErrorReply,
    MessageType,
    Prepare,
    decode_body,
)
from tests.devices import Phone, register_phone
from tests.network.grant_flow import (
    Pair,
    check_books,
    expect_money,
    linked_pair,
    states,
)
from tests.network.support import (
    GIVER_SEQ,
    RECEIVER_SEQ,
    Holder,
    app_get,
    app_post,
    client,
    cross_state,
    enrol,
    post_batch,
    seal_from,
)
from tests.support import OPERATOR, PASSWORD
from wallet.otp import RecordingOtpSender
from wallet.plt.grants_base import to_ms
from wallet.plt.receipts import verify_receipt

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def phone_of(who: Holder, label: str = "my phone") -> Phone:
    otp = who.node.otp
    assert isinstance(otp, RecordingOtpSender)
    async with client(who.node) as http:
        return await register_phone(http, who.headers, otp, who.row["phone"], label=label)


def now_ms(node: LocalNode) -> int:
    return to_ms(node.ctx.clock.now())


def grant_body(
    pair: Pair, phone: Phone, amount_fen: int, tid: str | None = None, **sign_as: Any
) -> dict[str, Any]:
    tid = tid or uuid7()
    ids = {"relation_id": pair.relation_id, "transfer_id": tid}
    ids.update(sign_as.pop("ids", {}))
    return {
        "transfer_id": tid,
        "relation_id": pair.relation_id,
        "amount_fen": amount_fen,
        "device": phone.auth(
            sign_as.pop("action", "grant.instruct"),
            ids,
            sign_as.pop("signed_amount", amount_fen),
            sign_as.pop("created_at_ms", now_ms(pair.a)),
            **sign_as,
        ),
    }


def accept_body(pair: Pair, phone: Phone, tid: str, amount_fen: int, **kw: Any) -> dict[str, Any]:
    return {
        "device": phone.auth(
            kw.pop("action", "grant.accept"), {"transfer_id": tid}, amount_fen, now_ms(pair.b), **kw
        )
    }


async def grant_count(pair: Pair) -> int:
    n: int = await pair.a.ctx.pool.fetchval("SELECT count(*) FROM grant_out")
    return n


async def test_a_grant_signed_on_both_phones_commits_and_its_receipt_proves_both(
    pair: Pair, tmp_path: Path
) -> None:
    giver_phone = await phone_of(pair.giver)
    receiver_phone = await phone_of(pair.receiver)
    body = grant_body(pair, giver_phone, 100_000)
    tid = body["transfer_id"]
    response = await app_post(pair.giver, "/app/v1/grants", body)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "PREPARED_A"

    # The PREPARE carries the signed instruction; B checked it and holds.
    raw = await pair.a.ctx.pool.fetchval(
        "SELECT prepare FROM grant_out WHERE transfer_id = $1", tid
    )
    prepare = decode_body(MessageType.PREPARE, bytes(raw))
    assert isinstance(prepare, Prepare) and prepare.user_auth.device is not None
    assert (prepare.user_auth.method, prepare.user_auth.ref) == ("device", giver_phone.kid)
    assert prepare.user_auth.device.signed == unb64url(body["device"]["signed"])
    await pair.network.run_senders()
    assert await states(pair, tid) == ("PREPARED_A", "PENDING_ACCEPT")
    await expect_money(pair, giver=400_000, held=100_000)

    # The same signed instruction again is the idempotent replay of its transfer_id.
    again = await app_post(pair.giver, "/app/v1/grants", body)
    assert again.status_code == 202, again.text
    assert again.json()["transfer_id"] == tid

    accepted = await app_post(
        pair.receiver,
        f"/app/v1/grants/incoming/{tid}/accept",
        accept_body(pair, receiver_phone, tid, 100_000),
    )
    assert accepted.status_code == 200, accepted.text
    await pair.network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await expect_money(pair, giver=400_000, frozen=100_000, quota=100_000)

    receipt = await app_get(pair.giver, f"/app/v1/grants/{tid}/receipt")
    assert receipt.status_code == 200, receipt.text
    roots = {n.node_id: (n.keys.root.kid, n.keys.root.public_b64) for n in (pair.a, pair.b)}
    verdict = verify_receipt(receipt.json(), roots)
    assert verdict.valid, verdict.problems
    assert (verdict.giver_auth, verdict.receiver_auth) == (
        f"device:{giver_phone.kid}",
        f"device:{receiver_phone.kid}",
    )
    (tmp_path / "receipt.json").write_bytes(receipt.content)
    (tmp_path / "peers.json").write_bytes(
        encode_peers([n.keys.peer_entry(n.url) for n in (pair.a, pair.b)])
    )
    args = ["receipt", "verify", str(tmp_path / "receipt.json"), "--peers"]
    assert await asyncio.to_thread(cli.main, [*args, str(tmp_path / "peers.json")]) == 0


async def test_a_changed_instruction_under_the_same_id_is_the_idempotency_conflict(
    pair: Pair,
) -> None:
    phone = await phone_of(pair.giver)
    first = grant_body(pair, phone, 80_000)
    assert (await app_post(pair.giver, "/app/v1/grants", first)).status_code == 202
    changed = grant_body(pair, phone, 90_000, tid=first["transfer_id"])
    response = await app_post(pair.giver, "/app/v1/grants", changed)
    assert response.status_code == 409, response.text
    assert (response.json()["code"], response.json()["differs"]) == (
        "idempotency_conflict",
        ["amount_fen"],
    )
    await pair.network.run_senders()
    await expect_money(pair, giver=420_000, held=80_000)


async def test_a_stale_signature_replays_its_grant_but_starts_no_new_one(
    pair: Pair,
) -> None:
    phone = await phone_of(pair.giver)
    body = grant_body(pair, phone, 50_000)
    assert (await app_post(pair.giver, "/app/v1/grants", body)).status_code == 202
    old = now_ms(pair.a) - 301_000
    stale_new = grant_body(pair, phone, 10_000, created_at_ms=old)
    response = await app_post(pair.giver, "/app/v1/grants", stale_new)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "device_signature_stale"
    future = grant_body(pair, phone, 10_000, created_at_ms=now_ms(pair.a) + 61_000)
    response = await app_post(pair.giver, "/app/v1/grants", future)
    assert response.json()["code"] == "device_signature_stale"
    # The first grant's own signature, replayed once it is old, still reads the grant back.
    stale_replay = grant_body(pair, phone, 50_000, tid=body["transfer_id"], created_at_ms=old)
    response = await app_post(pair.giver, "/app/v1/grants", stale_replay)
    assert response.status_code == 202, response.text
    assert await grant_count(pair) == 1
    await pair.network.run_senders()
    await expect_money(pair, giver=450_000, held=50_000)


async def test_bad_device_signatures_are_refused_with_stable_codes_and_nothing_held(
    pair: Pair,
) -> None:
    phone = await phone_of(pair.giver)
    receiver_phone = await phone_of(pair.receiver)
    other_relation = uuid7()
    tid = uuid7()
    forged_sig = grant_body(pair, phone, 10_000)
    other_sig = grant_body(pair, phone, 20_000, tid=forged_sig["transfer_id"])["device"]["sig"]
    forged_sig["device"]["sig"] = other_sig
    not_der = grant_body(pair, phone, 10_000)
    not_der["device"]["sig"] = b64url(b"\x30\x03\x02\x01\x01")
    not_b64 = grant_body(pair, phone, 10_000)
    not_b64["device"]["sig"] = "***"
    unknown = grant_body(pair, phone, 10_000)
    unknown["device"]["kid"] = "dk_AAAAAAAAAAAAAAAAAAAAAA"
    cases: list[tuple[dict[str, Any], int, str, list[str] | None]] = [
        # Another person's device (the receiver's phone, registered at B, unknown at A).
        (grant_body(pair, receiver_phone, 10_000), 403, "device_key_unknown", None),
        (unknown, 403, "device_key_unknown", None),
        (grant_body(pair, phone, 10_000, signed_amount=1), 403, "device_signature_mismatch",
         ["amount_fen"]),
        (grant_body(pair, phone, 10_000, ids={"relation_id": other_relation}), 403,
         "device_signature_mismatch", ["ids.relation_id"]),
        (grant_body(pair, phone, 10_000, node="prov-31"), 403, "device_signature_mismatch",
         ["node"]),
        (grant_body(pair, phone, 10_000, action="grant.accept"), 403,
         "device_signature_mismatch", ["action", "person"]),
        # A signature for one transfer_id replayed under another.
        (grant_body(pair, phone, 10_000, ids={"transfer_id": tid}), 403,
         "device_signature_mismatch", ["ids.transfer_id"]),
        (forged_sig, 403, "device_signature_invalid", None),
        (not_der, 400, "device_signature_malformed", None),
        (not_b64, 400, "device_signature_malformed", None),
    ]  # fmt: skip
    for body, status, code, differs in cases[:4]:
        response = await app_post(pair.giver, "/app/v1/grants", body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
        if differs is not None:
            assert response.json()["differs"] == differs
        assert response.json()["attempts_left"] >= 1
    # Four failures so far: the fifth locks, like wrong payment passwords do.
    response = await app_post(pair.giver, "/app/v1/grants", cases[4][0])
    assert (response.status_code, response.json()["code"]) == (423, "payment_password_locked")
    locked = await app_post(pair.giver, "/app/v1/grants", grant_body(pair, phone, 10_000))
    assert (locked.status_code, locked.json()["code"]) == (423, "payment_password_locked")
    await pair.a.ctx.pool.execute("UPDATE wallet SET locked_until = NULL")  # the lockout passes
    for body, status, code, differs in cases[5:]:
        response = await app_post(pair.giver, "/app/v1/grants", body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
        if differs is not None:
            assert response.json()["differs"] == differs
        await pair.a.ctx.pool.execute("UPDATE wallet SET failed_password_attempts = 0")
    # Nothing held, no grant row, and every refusal is in the audit trail.
    assert await grant_count(pair) == 0
    await expect_money(pair, giver=500_000)
    refused = await pair.a.ctx.pool.fetchval(
        "SELECT count(*) FROM audit_event WHERE action = 'device.refused'"
    )
    assert refused == len(cases)


async def test_a_revoked_phone_signs_nothing_and_an_operator_revokes_all(pair: Pair) -> None:
    lost = await phone_of(pair.giver, "lost phone")
    spare = await phone_of(pair.giver, "spare phone")
    revoked = await app_post(pair.giver, f"/app/v1/devices/{lost.kid}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    response = await app_post(pair.giver, "/app/v1/grants", grant_body(pair, lost, 10_000))
    assert (response.status_code, response.json()["code"]) == (403, "device_key_revoked")
    ok = await app_post(pair.giver, "/app/v1/grants", grant_body(pair, spare, 10_000))
    assert ok.status_code == 202, ok.text
    async with client(pair.a) as http:
        response = await http.post(
            f"/operator/v1/persons/{pair.giver.id_number}/devices/revoke",
            headers={**OPERATOR, "X-Operator-Name": "counter-7"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == [spare.kid]
    response = await app_post(pair.giver, "/app/v1/grants", grant_body(pair, spare, 10_000))
    assert (response.status_code, response.json()["code"]) == (403, "device_key_revoked")
    listed = (await app_get(pair.giver, "/app/v1/devices")).json()
    assert [(d["label"], d["revoked_at"] is not None) for d in listed] == [
        ("lost phone", True),
        ("spare phone", True),
    ]
    actions = [
        r["action"]
        for r in await pair.a.ctx.pool.fetch(
            "SELECT action FROM audit_event WHERE action LIKE 'device.%' ORDER BY id"
        )
    ]
    assert actions == [
        "device.register",
        "device.register",
        "device.revoke",
        "device.refused",
        "device.revoke_all",
        "device.refused",
    ]
    await pair.network.run_senders()
    await expect_money(pair, giver=490_000, held=10_000)


async def test_the_receiver_accepts_only_with_a_signature_over_this_grant(pair: Pair) -> None:
    giver_phone = await phone_of(pair.giver)
    phone = await phone_of(pair.receiver)
    body = grant_body(pair, giver_phone, 60_000)
    tid = body["transfer_id"]
    assert (await app_post(pair.giver, "/app/v1/grants", body)).status_code == 202
    await pair.network.run_senders()
    path = f"/app/v1/grants/incoming/{tid}/accept"
    for wrong, differs in (
        (accept_body(pair, phone, tid, 6_000), ["amount_fen"]),
        (accept_body(pair, phone, tid, 60_000, action="grant.decline"), ["action"]),
        (accept_body(pair, phone, tid, 60_000, node="prov-13"), ["node"]),
    ):
        response = await app_post(pair.receiver, path, wrong)
        assert (response.status_code, response.json()["code"]) == (
            403,
            "device_signature_mismatch",
        ), response.text
        assert response.json()["differs"] == differs
    both = {**accept_body(pair, phone, tid, 60_000), "payment_password": PASSWORD}
    response = await app_post(pair.receiver, path, both)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    assert await states(pair, tid) == ("PREPARED_A", "PENDING_ACCEPT")
    declined = await app_post(
        pair.receiver,
        f"/app/v1/grants/incoming/{tid}/decline",
        accept_body(pair, phone, tid, 60_000, action="grant.decline"),
    )
    assert declined.status_code == 200, declined.text
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    await expect_money(pair, giver=500_000)


async def _send(sender: LocalNode, receiver: LocalNode, body: Any) -> Any:
    response = await post_batch(receiver, [seal_from(sender, receiver.node_id, body)])
    assert response.status_code == 200, response.text
    (item,) = decode_batch(response.content, "msgpack")
    assert isinstance(item, Envelope)
    opened = open_envelope(item, sender.node_id, sender.plt.directory.verifying_key, now_ms(sender))
    return opened.body


async def test_b_refuses_a_prepare_whose_signed_instruction_does_not_match(pair: Pair) -> None:
    """A node cannot invent a grant its user never signed: B checks user_auth first."""
    phone = await phone_of(pair.giver)
    body = grant_body(pair, phone, 70_000)
    tid = body["transfer_id"]
    assert (await app_post(pair.giver, "/app/v1/grants", body)).status_code == 202
    raw = await pair.a.ctx.pool.fetchval("SELECT body FROM plt_outbox WHERE dedup_key = $1", tid)
    prepare = decode_body(MessageType.PREPARE, bytes(raw))
    assert isinstance(prepare, Prepare) and prepare.user_auth.device is not None
    proof = prepare.user_auth.device
    # A inflates the amount: the signature covers 70,000.
    inflated = msgspec.structs.replace(prepare, transfer_id=uuid7(), amount_fen=170_000)
    # A re-signs with a key of its own making: the kid no longer matches it.
    own = instruction(
        "grant.instruct", node="prov-13", person=phone.person,
        ids={"relation_id": pair.relation_id, "transfer_id": tid}, amount_fen=70_000,
        created_at_ms=now_ms(pair.a),
    )  # fmt: skip
    foreign = new_device_key()
    signed, sig = sign(foreign, own)
    swapped_key = msgspec.structs.replace(
        prepare,
        transfer_id=uuid7(),
        user_auth=msgspec.structs.replace(
            prepare.user_auth,
            device=DeviceProof(
                kid=proof.kid, alg="ES256", public_key=sec1(foreign.public_key()),
                sig=sig, signed=signed,
            ),
        ),
    )  # fmt: skip
    r, s = decode_dss_signature(proof.sig)
    bad_sig = msgspec.structs.replace(
        prepare,
        transfer_id=uuid7(),
        user_auth=msgspec.structs.replace(
            prepare.user_auth,
            device=msgspec.structs.replace(
                proof, sig=encode_dss_signature(r, (s + 1) % P256_ORDER)
            ),
        ),
    )
    no_proof = msgspec.structs.replace(
        prepare,
        transfer_id=uuid7(),
        user_auth=msgspec.structs.replace(prepare.user_auth, device=None),
    )
    for forged in (inflated, swapped_key, bad_sig, no_proof):
        reply = await _send(pair.a, pair.b, forged)
        assert isinstance(reply, ErrorReply), reply
        assert (reply.error.code, reply.error.class_) == (ErrorCode.VALIDATION, ErrorClass.F)
        assert reply.error.text.startswith("user_auth:")
    assert reply.differs == ()
    held = await pair.b.ctx.pool.fetchval("SELECT count(*) FROM grant_in")
    assert held == 0
    # The real one still goes through.
    await pair.network.run_senders()
    assert await states(pair, tid) == ("PREPARED_A", "PENDING_ACCEPT")


async def test_a_refuses_an_accept_whose_signed_acceptance_does_not_match(pair: Pair) -> None:
    giver_phone = await phone_of(pair.giver)
    phone = await phone_of(pair.receiver)
    body = grant_body(pair, giver_phone, 40_000)
    tid = body["transfer_id"]
    assert (await app_post(pair.giver, "/app/v1/grants", body)).status_code == 202
    await pair.network.run_senders()
    accepted = await app_post(
        pair.receiver,
        f"/app/v1/grants/incoming/{tid}/accept",
        accept_body(pair, phone, tid, 40_000),
    )
    assert accepted.status_code == 200, accepted.text
    raw = await pair.b.ctx.pool.fetchval(
        "SELECT body FROM plt_outbox WHERE dedup_key = $1 AND typ = 'ACCEPT'", tid
    )
    accept = decode_body(MessageType.ACCEPT, bytes(raw))
    assert isinstance(accept, Accept) and accept.acceptance.device is not None
    # B claims an acceptance its receiver signed for another grant's amount.
    other = instruction(
        "grant.accept", node="prov-31", person=phone.receiver, ids={"transfer_id": tid},
        amount_fen=4_000, created_at_ms=now_ms(pair.b),
    )  # fmt: skip
    signed, sig = sign(phone.key, other)
    forged = msgspec.structs.replace(
        accept,
        acceptance=msgspec.structs.replace(
            accept.acceptance,
            device=msgspec.structs.replace(accept.acceptance.device, signed=signed, sig=sig),
        ),
    )
    reply = await _send(pair.b, pair.a, forged)
    assert isinstance(reply, ErrorReply), reply
    assert (reply.error.code, reply.error.class_) == (ErrorCode.VALIDATION, ErrorClass.F)
    assert await states(pair, tid) == ("PREPARED_A", "ACCEPTED")
    # The real ACCEPT commits.
    await pair.network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await expect_money(pair, giver=460_000, frozen=40_000, quota=40_000)


async def test_a_cross_province_relationship_is_filed_confirmed_and_ended_by_phones(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver = await enrol(a, GIVER_SEQ + 7, "张三丰")
    receiver = await enrol(b, RECEIVER_SEQ + 7, "李小龙", scheme="resident")
    giver_phone, receiver_phone = await phone_of(giver), await phone_of(receiver)
    body = {
        "receiver_province": "310000",
        "receiver_id_number": receiver.id_number,
        "receiver_name": receiver.name,
        "relation_type": "child",
        "evidence_ref": "hukou-0001",
    }
    ids = {
        "receiver_id_number": receiver.id_number,
        "receiver_province": "310000",
        "relation_type": "child",
    }
    wrong = await app_post(
        giver,
        "/app/v1/cross-relationships",
        {**body, "device": giver_phone.auth("relation.file", {**ids, "relation_type": "parent"},
                                            None, now_ms(a))},
    )  # fmt: skip
    assert (wrong.status_code, wrong.json()["differs"]) == (403, ["ids.relation_type"])
    filed = await app_post(
        giver,
        "/app/v1/cross-relationships",
        {**body, "device": giver_phone.auth("relation.file", ids, None, now_ms(a))},
    )
    assert filed.status_code == 201, filed.text
    relation_id = filed.json()["relation_id"]
    await network.run_senders()
    confirm = f"/app/v1/cross-relationships/{relation_id}/confirm"
    signed = {"relation_id": relation_id}
    stolen = await app_post(
        receiver, confirm, {"device": giver_phone.auth("relation.confirm", signed, None, now_ms(b))}
    )
    assert (stolen.status_code, stolen.json()["code"]) == (403, "device_key_unknown")
    confirmed = await app_post(
        receiver,
        confirm,
        {"device": receiver_phone.auth("relation.confirm", signed, None, now_ms(b))},
    )
    assert confirmed.status_code == 200, confirmed.text
    await network.run_senders()
    assert await cross_state(a, relation_id) == "active"
    ended = await app_post(
        giver,
        f"/app/v1/cross-relationships/{relation_id}/end",
        {"device": giver_phone.auth("relation.end", signed, None, now_ms(a))},
    )
    assert (ended.status_code, ended.json()["state"]) == (200, "ended"), ended.text
    await network.run_senders()
    assert await cross_state(b, relation_id) == "ended"
