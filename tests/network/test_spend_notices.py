"""Spending notices across provinces (QUOTA_USED, issue 12): a receiver at prov-31 pays from a
quota granted at prov-13, or is refunded, and the giver's node tells the giver exactly once,
with the exact amount, the category and the relative's masked name; replays add nothing,
and notices about grants prov-13 never committed to prov-31 are refused and write nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from msgspec.structs import replace

from nodes.network import LocalNetwork, LocalNode
from protocol.envelope import Envelope
from protocol.ids import uuid7
from protocol.messages import MessageType, NoticeAck, QuotaUsed, decode_body, encode_body
from tests.network.events import EventStream
from tests.network.grant_flow import Pair, answer, check_books, grant, linked_pair
from tests.network.support import app_post, client, now_ms, post_batch, rows, seal_from
from tests.network.test_grants import pharmacy_key
from tests.network.test_notifications import listed, workers_running
from tests.network.test_transport import error_of, replies
from wallet.plt import outbox

pytestmark = pytest.mark.network

NOTICES_OUT = """
SELECT dedup_key, body, done_at IS NOT NULL AS done, last_error FROM plt_outbox
WHERE typ = 'QUOTA_USED' ORDER BY id
"""
SHARED = "SELECT count(*) AS n FROM notification WHERE kind LIKE 'shared_money.%'"


async def pay(pair: Pair, api_key: str, amount_fen: int, reference: str) -> dict[str, Any]:
    """The receiver pays at prov-31's pharmacy; returns the request (to replay it)."""
    code = await app_post(pair.receiver, "/app/v1/payment-codes")
    assert code.status_code == 201, code.text
    request = {
        "payment_code": code.json()["code"],
        "amount_fen": amount_fen,
        "category": "pharmacy_drug",
        "reference": reference,
    }
    assert (await settle(pair.b, api_key, request)).status_code == 201
    return request


async def settle(node: LocalNode, api_key: str, request: dict[str, Any]) -> Any:
    async with client(node) as http:
        return await http.post(
            "/institution/v1/settlements",
            json=request,
            headers={"Authorization": f"Bearer {api_key}"},
        )


async def refund(pair: Pair, api_key: str, settlement: str, amount_fen: int) -> Any:
    async with client(pair.b) as http:
        response = await http.post(
            f"/institution/v1/settlements/{settlement}/refunds",
            json={"reference": f"rf-{settlement}", "amount_fen": amount_fen},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert response.status_code == 201, response.text
    return response.json()


async def funded(network: LocalNetwork, amount_fen: int = 100_000) -> tuple[Pair, str, str]:
    """A linked pair whose receiver holds an accepted quota of `amount_fen`; and a pharmacy."""
    pair = await linked_pair(network)
    tid = await grant(pair, amount_fen)
    assert (await answer(pair, tid)).status_code == 200
    await network.run_senders()
    return pair, tid, await pharmacy_key(pair)


async def shared(pair: Pair) -> list[dict[str, Any]]:
    """The giver's shared-money notifications, oldest first."""
    return [n for n in reversed(await listed(pair.giver)) if n["kind"].startswith("shared_money")]


async def test_spending_and_a_refund_of_a_quota_tell_the_giver_once_each(
    network: LocalNetwork,
) -> None:
    pair, tid, key = await funded(network)
    request = await pay(pair, key, 30_000, "rx-1")
    settlement_id = (await rows(pair.b, "SELECT id FROM settlement"))[0]["id"]
    await network.run_senders()

    [spent] = await shared(pair)
    assert spent["kind"] == "shared_money.spent"
    assert spent["amount_fen"] == 30_000
    assert (spent["counterpart_name_masked"], spent["counterpart_province"]) == ("李**", "310000")
    assert spent["refs"] == {
        "transfer_id": tid,
        "relation_id": pair.relation_id,
        "settlement_ref": str(settlement_id),
    }
    assert spent["detail"] == {
        "category": "pharmacy_drug",
        "used_total_fen": 30_000,
        "granted_fen": 100_000,
    }

    # The same settlement request again is a replay: no new notice, at either node.
    replayed = await settle(pair.b, key, request)
    assert replayed.status_code == 200, replayed.text
    await network.run_senders()
    assert len(await shared(pair)) == 1
    assert len(await rows(pair.b, NOTICES_OUT)) == 1

    refunded = await refund(pair, key, "rx-1", 10_000)
    await network.run_senders()
    first, back = await shared(pair)
    assert first["id"] == spent["id"]
    assert (back["kind"], back["amount_fen"]) == ("shared_money.refunded", 10_000)
    assert back["counterpart_name_masked"] == "李**"
    assert back["refs"] == {
        "transfer_id": tid,
        "relation_id": pair.relation_id,
        "settlement_ref": str(settlement_id),
        "refund_ref": str(refunded["refund_id"]),
    }
    assert back["detail"] == {
        "category": "pharmacy_drug",
        "used_total_fen": 20_000,
        "granted_fen": 100_000,
    }
    # Each notice was acknowledged: B stopped sending it.
    sent = await rows(pair.b, NOTICES_OUT)
    assert [(r["done"], r["last_error"]) for r in sent] == [(True, None), (True, None)]
    # Nobody's ID number or full name is in them.
    for item in (spent, back):
        assert pair.receiver.id_number not in str(item) and pair.receiver.name not in str(item)
    await check_books(network)


async def test_a_refused_payment_sends_no_notice_and_one_that_drains_the_quota_one(
    network: LocalNetwork,
) -> None:
    pair, _, key = await funded(network, 10_000)
    code = await app_post(pair.receiver, "/app/v1/payment-codes")
    request = {
        "payment_code": code.json()["code"],
        "amount_fen": 10_001,
        "category": "pharmacy_drug",
        "reference": "rx-over",
    }
    refused = await settle(pair.b, key, request)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "insufficient_funds"
    assert await rows(pair.b, NOTICES_OUT) == []

    await pay(pair, key, 10_000, "rx-all")
    [only] = await rows(pair.b, NOTICES_OUT)
    body = decode_body(MessageType.QUOTA_USED, bytes(only["body"]))
    assert isinstance(body, QuotaUsed)
    assert (body.kind, body.amount_fen, body.used_total_fen) == ("spent", 10_000, 10_000)
    await network.run_senders()
    [spent] = await shared(pair)
    assert spent["detail"]["used_total_fen"] == spent["detail"]["granted_fen"] == 10_000
    await check_books(network)


async def send(to: LocalNode, env: Envelope) -> Envelope:
    [reply] = replies(await post_batch(to, [env]))
    return reply


async def test_a_notice_delivered_again_adds_nothing_and_is_acknowledged_again(
    network: LocalNetwork,
) -> None:
    pair, _, key = await funded(network)
    await pay(pair, key, 25_000, "rx-2")
    [queued] = await rows(pair.b, NOTICES_OUT)
    notice = decode_body(MessageType.QUOTA_USED, bytes(queued["body"]))
    assert isinstance(notice, QuotaUsed)
    await network.run_senders()
    assert len(await shared(pair)) == 1
    for _ in range(2):  # re-signed, so a new envelope: the notice id is what counts
        reply = await send(pair.a, seal_from(pair.b, pair.a.node_id, notice))
        assert reply.typ is MessageType.NOTICE_ACK
        ack = decode_body(reply.typ, reply.body)
        assert ack == NoticeAck(notice_id=notice.notice_id, transfer_id=notice.transfer_id)
    [only] = await shared(pair)
    assert only["amount_fen"] == 25_000
    await check_books(network)


async def test_forged_notices_are_refused_for_good_and_write_nothing(
    network: LocalNetwork,
) -> None:
    pair, tid, _ = await funded(network)
    declined = await grant(pair, 5_000)
    assert (await answer(pair, declined, "decline")).status_code == 200
    other = await linked_pair(network, seq=1)  # another giver and receiver, same two nodes
    others = await grant(other, 50_000)
    assert (await answer(other, others)).status_code == 200
    await network.run_senders()
    before = await rows(pair.a, SHARED)
    good = QuotaUsed(
        notice_id=uuid7(now_ms(pair.b)),
        transfer_id=tid,
        relation_id=pair.relation_id,
        kind="spent",
        settlement_ref="1",
        refund_ref=None,
        amount_fen=1_000,
        category="pharmacy_drug",
        used_total_fen=1_000,
        at_ms=now_ms(pair.b),
    )
    cases = [
        (replace(good, transfer_id=uuid7(now_ms(pair.b))), 3208, "no grant"),
        (replace(good, relation_id=uuid7(now_ms(pair.b))), 3100, "not a committed grant"),
        (replace(good, transfer_id=declined), 3100, "not a committed grant"),
        # another receiver's grant, under our pair's relationship
        (replace(good, transfer_id=others), 3100, "not a committed grant"),
        (replace(good, amount_fen=100_001), 3100, "exceeds the 100000 fen granted"),
        (replace(good, used_total_fen=100_001), 3100, "exceeds the 100000 fen granted"),
    ]
    for forged, code, text in cases:
        error = error_of(await send(pair.a, seal_from(pair.b, pair.a.node_id, forged)))
        assert (error.error.code, error.error.class_) == (code, "F")
        assert text in error.error.text
    assert await rows(pair.a, SHARED) == before

    # Queued at B, a refused notice is given up (with an alert), not retried for ever.
    forged = replace(good, transfer_id=uuid7(now_ms(pair.b)))
    async with pair.b.ctx.pool.acquire() as conn:
        await outbox.enqueue(
            conn,
            to_node=pair.a.node_id,
            typ=MessageType.QUOTA_USED,
            key=forged.notice_id,
            body=encode_body(forged),
            now=pair.b.ctx.clock.now(),
        )
    await network.run_senders()
    [row] = await rows(pair.b, NOTICES_OUT)
    assert row["done"] is True
    assert row["last_error"].startswith("peer refused: 3208 F")
    assert await rows(pair.a, SHARED) == before
    await check_books(network)


async def test_with_the_workers_running_the_givers_phone_shows_the_spending_live(
    network: LocalNetwork,
) -> None:
    pair, tid, key = await funded(network)
    async with workers_running(network), EventStream(pair.giver) as giver_phone:
        await pay(pair, key, 8_850, "rx-live")  # the sender wakes when the payment commits
        spent = await giver_phone.next(timeout_s=10)
    assert (spent.kind, spent.data["amount_fen"]) == ("shared_money.spent", 8_850)
    assert spent.data["refs"]["transfer_id"] == tid
    assert spent.data["detail"]["category"] == "pharmacy_drug"
    await check_books(network)
