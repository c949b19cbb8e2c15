"""Cross-province relationships between two real nodes (RULES 5-7): filing at the giver's
node, the receiver's answer at theirs, endings from either side or by a status change,
refusals by the receiver's node, and idempotent message handling."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import msgspec
import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.envelope import decode_envelope, encode_envelope
from protocol.messages import ErrorReply, MessageType, RelReply, RelRequest, decode_body
from tests.network.support import (
    Holder,
    app_get,
    app_post,
    client,
    enrol,
    file_cross,
    now_ms,
    post_batch,
    rows,
    seal_from,
)
from tests.support import OPERATOR, PASSWORD
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.plt import relations, transport
from wallet.plt.relations import CrossRelation

pytestmark = [pytest.mark.network, pytest.mark.anyio]

SIDE_ROW = """
SELECT state, person_id, other_ref, refusal_code, ended_by, delivered_at IS NOT NULL AS delivered
FROM cross_relationship WHERE relation_id = $1
"""
OPEN_OUTBOX = "SELECT typ FROM plt_outbox WHERE done_at IS NULL ORDER BY id"


async def side(node: LocalNode, relation_id: str) -> dict[str, Any]:
    [row] = await rows(node, SIDE_ROW, relation_id)
    return row


async def pair(network: LocalNetwork, *, receiver_wallet: bool = True) -> tuple[Holder, Holder]:
    giver = await enrol(network["prov-13"], 100, "张三")
    receiver = await enrol(network["prov-31"], 500, "李四", wallet=receiver_wallet)
    return giver, receiver


async def filed(network: LocalNetwork, giver: Holder, receiver: Holder) -> str:
    response = await file_cross(giver, receiver)
    assert response.status_code == 201, response.text
    await network.run_senders()
    relation_id: str = response.json()["relation_id"]
    return relation_id


async def active(network: LocalNetwork) -> tuple[Holder, Holder, str]:
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    confirmed = await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert confirmed.status_code == 200, confirmed.text
    await network.run_senders()
    return giver, receiver, relation_id


# --- the life of a relationship ----------------------------------------------------------


async def test_filed_then_confirmed_is_active_on_both_nodes(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    response = await file_cross(giver, receiver)
    relation_id = response.json()["relation_id"]
    assert (response.status_code, response.json()["state"]) == (201, "requested")

    await network.run_senders()
    assert await side(a, relation_id) == {
        "state": "requested",
        "person_id": 1,
        "other_ref": None,
        "refusal_code": None,
        "ended_by": None,
        "delivered": True,
    }
    assert (await side(b, relation_id))["state"] == "pending_confirmation"
    waiting = await app_get(
        receiver, "/app/v1/cross-relationships?role=receiver&state=pending_confirmation"
    )
    assert [r["relation_id"] for r in waiting.json()] == [relation_id]

    confirmed = await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert (confirmed.status_code, confirmed.json()["state"]) == (200, "active")
    await network.run_senders()

    assert await side(a, relation_id) == {
        "state": "active",
        "person_id": 1,
        "other_ref": "w-1",
        "refusal_code": None,
        "ended_by": None,
        "delivered": True,
    }
    assert (await side(b, relation_id))["state"] == "active"
    assert await rows(a, OPEN_OUTBOX) == await rows(b, OPEN_OUTBOX) == []


async def test_declined_by_the_receiver_is_declined_on_both_nodes(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)

    declined = await app_post(receiver, f"/app/v1/cross-relationships/{relation_id}/decline")
    assert (declined.status_code, declined.json()["state"]) == (200, "declined")
    await network.run_senders()

    assert (await side(a, relation_id))["state"] == "declined"
    assert (await side(b, relation_id))["state"] == "declined"
    assert await rows(a, OPEN_OUTBOX) == await rows(b, OPEN_OUTBOX) == []


async def test_ended_by_the_giver_is_ended_on_both_nodes(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, _, relation_id = await active(network)

    ended = await app_post(
        giver, f"/app/v1/cross-relationships/{relation_id}/end", {"payment_password": PASSWORD}
    )
    assert (ended.status_code, ended.json()["state"], ended.json()["ended_by"]) == (
        200,
        "ended",
        "giver",
    )
    await network.run_senders()

    assert ((await side(a, relation_id))["state"], (await side(a, relation_id))["ended_by"]) == (
        "ended",
        "giver",
    )
    assert ((await side(b, relation_id))["state"], (await side(b, relation_id))["ended_by"]) == (
        "ended",
        "giver",
    )
    assert await rows(a, OPEN_OUTBOX) == await rows(b, OPEN_OUTBOX) == []


async def test_ended_by_the_receiver_is_ended_on_both_nodes(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    _, receiver, relation_id = await active(network)

    ended = await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/end",
        {"payment_password": PASSWORD},
    )
    assert (ended.status_code, ended.json()["ended_by"]) == (200, "receiver")
    await network.run_senders()

    assert (await side(a, relation_id))["state"] == "ended"
    assert (await side(a, relation_id))["ended_by"] == "receiver"
    assert (await side(b, relation_id))["state"] == "ended"


async def test_receiver_deceased_ends_it_on_both_nodes(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    _, receiver, relation_id = await active(network)

    async with client(b) as http:
        response = await http.patch(
            f"/operator/v1/persons/{receiver.id_number}",
            json={"status": "deceased"},
            headers=OPERATOR,
        )
    assert response.status_code == 200, response.text
    await network.run_senders()

    assert ((await side(b, relation_id))["state"], (await side(b, relation_id))["ended_by"]) == (
        "ended",
        "system",
    )
    assert ((await side(a, relation_id))["state"], (await side(a, relation_id))["ended_by"]) == (
        "ended",
        "system",
    )


async def test_giver_leaving_normal_status_by_roster_import_ends_it_on_both_nodes(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, _, relation_id = await active(network)

    async with client(a) as http:
        response = await http.post(
            "/operator/v1/roster",
            json={"persons": [{**giver.row, "status": "terminated"}]},
            headers=OPERATOR,
        )
    assert response.status_code == 200, response.text
    await network.run_senders()

    assert (await side(a, relation_id))["state"] == "ended"
    assert (await side(b, relation_id))["state"] == "ended"


# --- refusals ------------------------------------------------------------------------------


async def test_receiver_without_an_open_wallet_is_refused_with_3204_on_both_nodes(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network, receiver_wallet=False)
    relation_id = await filed(network, giver, receiver)

    assert (await side(a, relation_id))["state"] == "refused"
    assert (await side(a, relation_id))["refusal_code"] == 3204
    assert (await side(b, relation_id))["state"] == "refused"
    assert (await side(b, relation_id))["refusal_code"] == 3204
    view = (await app_get(giver, f"/app/v1/cross-relationships/{relation_id}")).json()
    assert view["refusal"] == {"code": 3204, "text": "receiver wallet not found or not open"}
    assert await rows(a, OPEN_OUTBOX) == []


async def test_a_name_that_does_not_match_the_roster_is_refused_with_5105(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    response = await file_cross(giver, receiver, name="王五")
    await network.run_senders()
    relation_id = response.json()["relation_id"]

    assert (await side(a, relation_id))["refusal_code"] == 5105
    assert (await side(b, relation_id)) | {"delivered": None} == {
        "state": "refused",
        "person_id": 1,
        "other_ref": "p-1",
        "refusal_code": 5105,
        "ended_by": None,
        "delivered": None,
    }


async def test_a_province_without_a_peer_node_or_the_own_province_is_refused_with_422(
    network: LocalNetwork,
) -> None:
    giver, receiver = await pair(network)
    for province, reason in (("440000", "province_not_connected"), ("130000", "same_province")):
        response = await file_cross(giver, receiver, province=province)
        assert response.status_code == 422, response.text
        assert response.json()["reason"] == reason
    assert await rows(network["prov-13"], "SELECT 1 FROM cross_relationship") == []


async def test_a_wrong_payment_password_files_nothing(network: LocalNetwork) -> None:
    a = network["prov-13"]
    giver, receiver = await pair(network)
    response = await file_cross(giver, receiver, password="000000")
    assert (response.status_code, response.json()["code"]) == (403, "payment_password_wrong")
    assert await rows(a, "SELECT 1 FROM cross_relationship") == []
    assert await rows(a, "SELECT 1 FROM plt_outbox") == []


async def test_a_resident_scheme_member_cannot_be_a_giver(network: LocalNetwork) -> None:
    giver = await enrol(network["prov-13"], 101, "赵六", scheme="resident")
    receiver = await enrol(network["prov-31"], 500, "李四")
    response = await file_cross(giver, receiver)
    assert (response.status_code, response.json()["code"]) == (422, "person_not_eligible")


async def test_a_second_live_filing_for_the_same_relative_is_refused(
    network: LocalNetwork,
) -> None:
    giver, receiver = await pair(network)
    first = await file_cross(giver, receiver)
    assert first.status_code == 201
    # The same filing again (its answer lost) is the relationship as it stands.
    replay = await file_cross(giver, receiver)
    assert replay.status_code == 201, replay.text
    assert (replay.json()["relation_id"], replay.json()["state"]) == (
        first.json()["relation_id"],
        "requested",
    )
    again = await file_cross(giver, receiver, relation_type="spouse")
    assert (again.status_code, again.json()["code"]) == (409, "already_exists")


async def test_only_the_receiver_can_confirm(network: LocalNetwork) -> None:
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    response = await app_post(
        giver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert response.status_code == 404
    bogus = await app_post(receiver, "/app/v1/cross-relationships/not-an-id/decline")
    assert bogus.status_code == 404


# --- idempotency and ordering ----------------------------------------------------------------


async def test_a_duplicate_request_gets_the_stored_reply_and_changes_nothing(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    [sent] = await rows(a, "SELECT envelope FROM plt_message WHERE direction = 'out'")
    [first] = await rows(a, "SELECT envelope FROM plt_message WHERE direction = 'in'")
    replay = decode_envelope(bytes(sent["envelope"]), "msgpack")

    response = await post_batch(b, [replay])
    [again] = msgspec.msgpack.decode(response.content, type=list[msgspec.Raw])

    first_env = decode_envelope(bytes(first["envelope"]), "msgpack")
    again_env = decode_envelope(bytes(again), "msgpack")
    assert again_env.body == first_env.body  # the stored signed answer, not a new one
    assert await rows(b, "SELECT state FROM cross_relationship") == [
        {"state": "pending_confirmation"}
    ]
    assert len(await rows(b, "SELECT 1 FROM cross_relationship_message")) == 1
    assert (await side(b, relation_id))["state"] == "pending_confirmation"


async def test_the_same_relation_id_with_another_body_gets_3106_naming_the_fields(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    [sent] = await rows(a, "SELECT envelope FROM plt_message WHERE direction = 'out'")
    original = decode_body(
        MessageType.REL_REQUEST, decode_envelope(bytes(sent["envelope"]), "msgpack").body
    )
    assert isinstance(original, RelRequest)
    changed = msgspec.structs.replace(original, evidence_ref="forged-9999")

    response = await post_batch(b, [seal_from(a, "prov-31", changed)])
    [raw] = msgspec.msgpack.decode(response.content, type=list[msgspec.Raw])
    reply = decode_envelope(bytes(raw), "msgpack")
    error = decode_body(reply.typ, reply.body)
    assert isinstance(error, ErrorReply)
    assert (error.error.code, error.differs) == (3106, ("evidence_ref",))
    assert (await side(b, relation_id))["state"] == "pending_confirmation"


async def test_an_end_arriving_before_its_request_leaves_a_tombstone_that_refuses_it(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    await network.stop_node("prov-31")
    relation_id = (await file_cross(giver, receiver)).json()["relation_id"]
    await network.run_senders()  # the REQUEST fails: prov-31 is down
    await app_post(
        giver, f"/app/v1/cross-relationships/{relation_id}/end", {"payment_password": PASSWORD}
    )
    await network.start_node("prov-31")
    # Deliver the END alone first, as a reordering network would.
    end_body = await a.ctx.pool.fetchval("SELECT body FROM plt_outbox WHERE typ = 'REL_END'")
    await post_batch(b, [a.plt.seal(MessageType.REL_END, "prov-31", bytes(end_body), now_ms(a))])
    assert (await side(b, relation_id))["state"] == "ended"

    net_clock.advance(minutes=2)
    await network.run_senders()

    assert (await side(b, relation_id))["state"] == "ended"
    assert (await side(a, relation_id))["state"] == "ended"
    assert await rows(a, OPEN_OUTBOX) == []


async def test_a_confirmation_the_giver_node_refuses_ends_the_receiver_side(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    await network.stop_node("prov-31")
    await app_post(
        giver, f"/app/v1/cross-relationships/{relation_id}/end", {"payment_password": PASSWORD}
    )
    await network.start_node("prov-31")
    # The receiver confirms before the giver's END arrives; A refuses the confirmation.
    await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert (await transport.run_once(b.ctx)).delivered == 1
    assert (await side(b, relation_id))["state"] == "ended"
    net_clock.advance(minutes=2)
    await network.run_senders()
    assert (await side(a, relation_id))["state"] == "ended"
    assert (await side(b, relation_id))["state"] == "ended"


# --- hooks and lookups for the grants code ------------------------------------------------------


async def test_end_hooks_run_inside_the_ending_transaction_on_each_side(
    network: LocalNetwork,
) -> None:
    giver, _, relation_id = await active(network)
    seen: list[tuple[str, str, str, bool]] = []

    async def hook(
        ctx: WalletContext, conn: asyncpg.Connection, rel: CrossRelation, now: dt.datetime
    ) -> None:
        state = await conn.fetchval("SELECT state FROM cross_relationship WHERE id = $1", rel.id)
        seen.append((ctx.node_id, rel.side, state, conn.is_in_transaction()))

    relations.ON_RELATION_ENDED.append(hook)
    relations.ON_GIVER_RELATION_ENDED.append(hook)
    try:
        await app_post(
            giver, f"/app/v1/cross-relationships/{relation_id}/end", {"payment_password": PASSWORD}
        )
        await network.run_senders()
    finally:
        relations.ON_RELATION_ENDED.remove(hook)
        relations.ON_GIVER_RELATION_ENDED.remove(hook)
    assert seen == [("prov-13", "giver", "ended", True), ("prov-31", "receiver", "ended", True)]


async def test_grant_lookups_see_only_active_relationships_of_the_right_party(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    _, _, relation_id = await active(network)
    async with a.ctx.pool.acquire() as conn:
        found = await relations.active_relation_for_grant(conn, relation_id, 1)
        assert found is not None
        assert (found.peer_node, found.other_ref, found.relation_type) == (
            "prov-31",
            "w-1",
            "child",
        )
        assert await relations.active_relation_for_grant(conn, relation_id, 2) is None
        assert await relations.active_relation_for_grant(conn, "nonsense", 1) is None
    async with b.ctx.pool.acquire() as conn:
        mine = await relations.receiver_side(conn, "prov-13", relation_id)
        assert mine is not None and mine.active and mine.person_id == 1
        assert await relations.receiver_side(conn, "prov-51", relation_id) is None
        assert [r.relation_id for r in await relations.active_for_receiver(conn, 1)] == [
            relation_id
        ]


async def test_views_show_only_the_other_party_masked(network: LocalNetwork) -> None:
    giver, receiver, relation_id = await active(network)
    at_a = (await app_get(giver, f"/app/v1/cross-relationships/{relation_id}")).json()
    at_b = (await app_get(receiver, f"/app/v1/cross-relationships/{relation_id}")).json()
    assert (at_a["viewer"], at_a["other_name_masked"], at_a["other_province"]) == (
        "giver",
        "李*",
        "310000",
    )
    assert (
        at_a["other_id_number_masked"]
        == receiver.id_number[:4] + "*" * 10 + receiver.id_number[-4:]
    )
    assert at_a["evidence_ref"] == "hukou-0001"
    assert (at_b["viewer"], at_b["other_name_masked"], at_b["other_province"]) == (
        "receiver",
        "张*",
        "130000",
    )
    assert (at_b["other_id_number_masked"], at_b["evidence_ref"]) == (None, None)
    encoded = str(at_a) + str(at_b)
    assert receiver.id_number not in encoded and giver.id_number not in encoded
    assert "李四" not in encoded and "张三" not in encoded


async def test_the_receiver_nodes_reply_is_signed_and_opens_at_the_giver_node(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await pair(network)
    relation_id = await filed(network, giver, receiver)
    [reply] = await rows(b, "SELECT envelope FROM plt_message WHERE direction = 'out'")
    env = decode_envelope(bytes(reply["envelope"]), "msgpack")
    opened = await a.plt.open(encode_envelope(env, "json"), now_ms(a), wire="json")
    assert isinstance(opened.body, RelReply)
    assert (opened.body.relation_id, opened.body.outcome) == (relation_id, "OK")
