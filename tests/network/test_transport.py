"""PLT/1 transport between real nodes over HTTP: what is refused, with which code, and that a
refusal changes nothing; delivery through outages; the evidence log."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt

import httpx
import msgspec
import pytest

from nodes.network import DEFAULT_PROVINCES, LocalNetwork, LocalNode
from nodes.workers import Worker, WorkerSet
from protocol.envelope import Envelope, Wire, decode_envelope, encode_envelope, seal
from protocol.ids import uuid7
from protocol.keys import open_keyset_document
from protocol.messages import (
    ErrorReply,
    GiverRef,
    MessageType,
    RelationType,
    RelReceiver,
    RelReply,
    RelRequest,
    Status,
    StatusReq,
    body_hash,
    decode_body,
)
from tests.conftest import TEMPLATE_DB, TEST_SCRYPT_N
from tests.network.support import (
    client,
    cross_state,
    enrol,
    file_cross,
    now_ms,
    post_batch,
    post_raw,
    rows,
    seal_from,
)
from tests.support import OPERATOR_TOKEN
from wallet.clock import ManualClock
from wallet.plt import outbox, transport, wakeup
from wallet.plt.node import NodeKeys, PltNode

pytestmark = [pytest.mark.network, pytest.mark.anyio]

CROSS_ROWS = "SELECT relation_id, state FROM cross_relationship"
MESSAGES_IN = "SELECT typ FROM plt_message WHERE direction = 'in'"


def request_body(a: LocalNode, id_number: str, name: str = "李四") -> RelRequest:
    return RelRequest(
        relation_id=uuid7(now_ms(a)),
        giver=GiverRef(node=a.node_id, account_ref="p-1", masked_name="张*"),
        receiver=RelReceiver(id_number=id_number, name=name),
        relation_type=RelationType.CHILD,
        evidence_ref="hukou-0001",
        filed_at_ms=now_ms(a),
    )


def replies(response: httpx.Response, wire: str = "msgpack") -> list[Envelope]:
    assert response.status_code == 200, response.text
    if wire == "json":
        raw = msgspec.json.decode(response.content, type=list[msgspec.Raw])
    else:
        raw = msgspec.msgpack.decode(response.content, type=list[msgspec.Raw])
    return [decode_envelope(bytes(item), wire) for item in raw]  # type: ignore[arg-type]


def error_of(env: Envelope) -> ErrorReply:
    assert env.typ is MessageType.ERROR, env.typ
    body = decode_body(env.typ, env.body)
    assert isinstance(body, ErrorReply)
    return body


async def assert_untouched(node: LocalNode) -> None:
    assert await rows(node, CROSS_ROWS) == []
    assert await rows(node, MESSAGES_IN) == []


# --- key sets ----------------------------------------------------------------------------


async def test_keyset_endpoint_serves_the_document_signed_by_the_pinned_root(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    async with client(b) as http:
        response = await http.get("/plt/v1/keyset")
    assert response.status_code == 200
    peer = a.plt.directory.peer("prov-31")
    keyset = open_keyset_document(
        msgspec.json.decode(response.content, type=type(b.keys.document)),
        root_kid=peer.root_kid,
        root_pub=peer.root_pub,
        expected_node="prov-31",
    )
    assert keyset == b.keys.keyset


# --- refusals: each with its code, each changing nothing -----------------------------------------


async def test_a_tampered_envelope_is_refused_with_3105_and_changes_nothing(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    env = seal_from(a, "prov-31", request_body(a, receiver.id_number))
    forged = msgspec.structs.replace(env, body=env.body.replace("李四".encode(), "王五".encode()))
    [reply] = replies(await post_batch(b, [forged]))
    error = error_of(reply)
    assert (error.error.code, error.error.class_) == (3105, "F")
    assert reply.to_node == "prov-13"
    await assert_untouched(b)


async def test_an_envelope_addressed_to_another_node_is_refused_with_3100(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    env = seal_from(a, "prov-51", request_body(a, receiver.id_number))
    [reply] = replies(await post_batch(b, [env]))
    assert error_of(reply).error.code == 3100
    await assert_untouched(b)


async def test_an_envelope_from_an_unknown_node_is_refused_with_3105(
    network: LocalNetwork,
) -> None:
    b = network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    stranger = PltNode(NodeKeys.generate("prov-99", now_ms(b)), network["prov-13"].directory)
    body = msgspec.structs.replace(
        request_body(network["prov-13"], receiver.id_number),
        giver=GiverRef(node="prov-99", account_ref="p-1", masked_name="张*"),
    )
    env = stranger.seal(MessageType.REL_REQUEST, "prov-31", body, now_ms(b))
    [reply] = replies(await post_batch(b, [env]))
    error = error_of(reply)
    assert (error.error.code, error.error.class_) == (3105, "F")
    assert reply.to_node == "prov-99"
    await assert_untouched(b)


async def test_a_message_replayed_as_another_typ_is_refused_with_3105(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    env = seal_from(a, "prov-31", request_body(a, receiver.id_number))
    replayed = msgspec.structs.replace(env, typ=MessageType.REL_END)
    [reply] = replies(await post_batch(b, [replayed]))
    assert error_of(reply).error.code == 3105
    await assert_untouched(b)


async def test_a_revoked_key_is_refused_once_the_peer_has_refreshed_the_keyset(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    old_kid = a.keys.current(now_ms(a)).kid
    network.rotate_keys("prov-13")
    old_key = a.keys.signing_keys[old_kid]
    network.revoke_key("prov-13", old_kid)
    await b.plt.refresh_keyset("prov-13", now_ms(b), force=True)  # the 10-minute job
    net_clock.advance(seconds=1)
    body = request_body(a, receiver.id_number)
    env = seal(body, MessageType.REL_REQUEST, "prov-13", "prov-31", old_key, now_ms(a))
    [reply] = replies(await post_batch(b, [env]))
    error = error_of(reply)
    assert (error.error.code, error.error.class_) == (3105, "F")
    assert "revoked" in error.error.text
    await assert_untouched(b)


async def test_a_rotated_key_is_learnt_by_one_keyset_fetch_and_the_message_is_applied(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    new = network.rotate_keys("prov-13")
    assert b.plt.directory.keyset("prov-13").seq == 1  # type: ignore[union-attr]
    filed = await file_cross(giver, receiver)
    assert filed.status_code == 201, filed.text

    report = await network.run_senders()

    assert (report.delivered, report.failed) == (1, 0)
    assert b.plt.directory.keyset("prov-13") == new.keyset
    [logged] = await rows(b, "SELECT envelope FROM plt_message WHERE direction = 'in'")
    assert decode_envelope(bytes(logged["envelope"]), "msgpack").kid == new.current(now_ms(a)).kid
    assert [r["state"] for r in await rows(b, CROSS_ROWS)] == ["pending_confirmation"]


async def test_a_malformed_item_gets_3101_in_its_position_and_the_others_are_applied(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    good = seal_from(a, "prov-31", request_body(a, receiver.id_number))
    batch = b"[" + b'{"v":1,"typ":"NOPE"}' + b"," + encode_envelope(good, "json") + b"]"
    first, second = replies(await post_raw(b, batch, "json"), "json")
    assert error_of(first).error.code == 3101
    assert first.to_node == "unknown"
    assert second.typ is MessageType.REL_REPLY
    reply = decode_body(second.typ, second.body)
    assert isinstance(reply, RelReply) and reply.outcome == "OK"
    assert [r["state"] for r in await rows(b, CROSS_ROWS)] == ["pending_confirmation"]


async def test_an_unreadable_batch_is_a_400_with_plt_code_3101(network: LocalNetwork) -> None:
    b = network["prov-31"]
    too_long = b"[" + b",".join([b"1"] * 257) + b"]"
    cases = [
        (b"not a batch", "application/json"),
        (b"\xc1", "application/msgpack"),
        (b'{"v":1}', "application/json"),
        (too_long, "application/json"),
    ]
    async with client(b) as http:
        for content, content_type in cases:
            response = await http.post(
                "/plt/v1/messages", content=content, headers={"content-type": content_type}
            )
            assert response.status_code == 400, (content[:20], response.text)
            assert response.json()["plt_code"] == 3101
        # A body in another media type: 415, and still malformed (3101) for the peer.
        response = await http.post(
            "/plt/v1/messages", content=b"[]", headers={"content-type": "text/plain"}
        )
        assert (response.status_code, response.json()["plt_code"]) == (415, 3101)
    await assert_untouched(b)


async def test_a_json_batch_is_answered_in_json_and_msgpack_in_msgpack(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    receiver = await enrol(b, 500, "李四")
    wires: tuple[Wire, ...] = ("json", "msgpack")
    for wire in wires:
        env = seal_from(a, "prov-31", request_body(a, receiver.id_number))
        response = await post_batch(b, [env], wire)
        assert response.headers["content-type"].startswith(f"application/{wire}")
        [reply] = replies(response, wire)
        assert reply.typ is MessageType.REL_REPLY


# --- delivery ------------------------------------------------------------------------------


async def test_a_peer_that_is_down_gets_the_message_after_it_restarts(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    await network.stop_node("prov-31")
    relation_id = (await file_cross(giver, receiver)).json()["relation_id"]

    down = await transport.run_once(a.ctx)
    [row] = await rows(a, "SELECT attempts, done_at, last_error, next_attempt_at FROM plt_outbox")
    assert (down.claimed, down.delivered, down.failed) == (1, 0, 1)
    assert (row["attempts"], row["done_at"]) == (1, None)
    assert "send to prov-31" in row["last_error"]
    assert row["next_attempt_at"] > network.clock.now()
    for _ in range(4):  # the outage lasts: the backoff grows to seconds
        net_clock.set(row["next_attempt_at"])
        assert (await transport.run_once(a.ctx)).failed == 1
        [row] = await rows(a, "SELECT next_attempt_at FROM plt_outbox")

    await network.start_node("prov-31")
    net_clock.advance(seconds=transport.PROBE_INTERVAL_MS / 1000)
    assert row["next_attempt_at"] > network.clock.now()  # the backoff would still wait
    up = await transport.run_once(a.ctx)  # the peer answers the probe: due at once

    assert (up.claimed, up.delivered, up.failed) == (1, 1, 0)
    [row] = await rows(a, "SELECT attempts, done_at, last_error FROM plt_outbox")
    assert (row["attempts"], row["done_at"], row["last_error"]) == (6, network.clock.now(), None)
    assert await rows(b, CROSS_ROWS) == [
        {"relation_id": relation_id, "state": "pending_confirmation"}
    ]


async def test_a_peer_answering_500_only_delays_delivery(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    await file_cross(giver, receiver)
    real = a.plt.http
    a.plt._http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(500, text="boom"))
    )
    failed = await transport.run_once(a.ctx)
    await a.plt._http.aclose()
    a.plt._http = real
    [row] = await rows(a, "SELECT attempts, done_at, last_error FROM plt_outbox")
    assert (failed.failed, row["attempts"], row["done_at"]) == (1, 1, None)
    assert "HTTP 500" in row["last_error"]

    net_clock.advance(seconds=2)
    assert (await transport.run_once(a.ctx)).delivered == 1
    assert [r["state"] for r in await rows(b, CROSS_ROWS)] == ["pending_confirmation"]


async def test_backoff_grows_and_is_capped_at_a_minute_with_jitter(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a = network["prov-13"]
    await network.stop_node("prov-31")
    async with a.ctx.pool.acquire() as conn:
        await outbox.enqueue(
            conn,
            to_node="prov-31",
            typ=MessageType.REL_END,
            key=uuid7(now_ms(a)),
            body=b"\x80",
            now=network.clock.now(),
        )
    delays = []
    for _ in range(12):
        await transport.run_once(a.ctx)
        next_at = await a.ctx.pool.fetchval("SELECT next_attempt_at FROM plt_outbox")
        delays.append((next_at - network.clock.now()) / dt.timedelta(milliseconds=1))
        net_clock.set(next_at)
    bases = [200, 500, 1000, 2000, 5000, 10000, 20000, 40000, 60000, 60000, 60000, 60000]
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= delay < min(base * 1.5, 60000) + 1


async def test_a_row_past_give_up_at_is_closed_by_the_sender_unsent(network: LocalNetwork) -> None:
    a = network["prov-13"]
    now = network.clock.now()
    async with a.ctx.pool.acquire() as conn:
        await outbox.enqueue(
            conn,
            to_node="prov-31",
            typ=MessageType.REL_END,
            key=uuid7(now_ms(a)),
            body=b"\x80",
            now=now,
            give_up_at=now,
        )
    report = await transport.run_once(a.ctx)
    [row] = await rows(a, "SELECT attempts, done_at, last_error FROM plt_outbox")
    assert (report.gave_up, report.claimed) == (1, 0)
    assert (row["attempts"], row["done_at"]) == (0, now)
    assert row["last_error"] == "gave up: give_up_at passed"


async def test_a_frozen_peer_is_refused_with_2003_and_not_sent_to(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    now = network.clock.now()
    await b.ctx.pool.execute(
        "INSERT INTO peer_link (node, frozen_at, reason) VALUES ('prov-13', $1, 'test')", now
    )
    [reply] = replies(
        await post_batch(b, [seal_from(a, "prov-31", request_body(a, receiver.id_number))])
    )
    assert (error_of(reply).error.code, error_of(reply).error.class_) == (2003, "T")
    await assert_untouched(b)

    await a.ctx.pool.execute(
        "INSERT INTO peer_link (node, frozen_at, reason) VALUES ('prov-31', $1, 'test')", now
    )
    await file_cross(giver, receiver)
    assert (await transport.run_once(a.ctx)).claimed == 0


# --- evidence ----------------------------------------------------------------------------


async def test_both_nodes_log_every_envelope_exactly_as_on_the_wire(network: LocalNetwork) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    relation_id = (await file_cross(giver, receiver)).json()["relation_id"]
    await network.run_senders()

    query = "SELECT direction, typ, dedup_key, body_hash, envelope FROM plt_message ORDER BY id"
    at_a, at_b = await rows(a, query), await rows(b, query)
    assert [(r["direction"], r["typ"]) for r in at_a] == [
        ("out", "REL_REQUEST"),
        ("in", "REL_REPLY"),
    ]
    assert [(r["direction"], r["typ"]) for r in at_b] == [
        ("in", "REL_REQUEST"),
        ("out", "REL_REPLY"),
    ]
    assert at_a[0]["envelope"] == at_b[0]["envelope"]
    assert at_a[1]["envelope"] == at_b[1]["envelope"]
    for r in at_a + at_b:
        env = decode_envelope(bytes(r["envelope"]), "msgpack")
        assert r["dedup_key"] == relation_id
        assert r["body_hash"] == body_hash(env.body)


# --- STATUS endpoints --------------------------------------------------------------------


async def test_status_answers_a_signed_status_request_with_a_signed_status(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    transfer_id = uuid7(now_ms(a))
    env = seal_from(a, "prov-31", StatusReq(transfer_ids=(transfer_id,)))
    async with client(b) as http:
        response = await http.post(
            "/plt/v1/status",
            content=encode_envelope(env, "json"),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200
    reply = await a.plt.open(response.content, now_ms(a), wire="json")
    assert reply.envelope.typ is MessageType.STATUS
    assert isinstance(reply.body, Status)
    assert [item.transfer_id for item in reply.body.items] == [transfer_id]

    # The same question without the outbox: `transport.call`, both envelopes logged at A.
    answer = await transport.call(a.ctx, "prov-31", StatusReq(transfer_ids=(transfer_id,)))
    assert (answer.typ, answer.from_node, answer.is_reply) == (MessageType.STATUS, "prov-31", True)
    assert await rows(a, "SELECT direction, typ FROM plt_message ORDER BY id") == [
        {"direction": "out", "typ": "STATUS_REQ"},
        {"direction": "in", "typ": "STATUS"},
    ]


async def test_a_status_request_repeating_ids_is_answered_once_per_id(
    network: LocalNetwork,
) -> None:
    a = network["prov-13"]
    unknown, other = uuid7(now_ms(a)), uuid7(now_ms(a))
    asked = (unknown,) * 200 + (other,) * 55 + (unknown,)  # 256 ids, two of them distinct
    env = seal_from(network["prov-31"], "prov-13", StatusReq(transfer_ids=asked))
    [reply] = replies(await post_batch(a, [env]))
    body = decode_body(reply.typ, reply.body)
    assert isinstance(body, Status)
    assert [item.transfer_id for item in body.items] == [unknown, other]
    alerts = await rows(
        a,
        "SELECT subject, count(*) AS n FROM audit_event WHERE action LIKE 'alert.%'"
        " GROUP BY subject ORDER BY subject",
    )
    assert alerts == sorted(
        [{"subject": f"grant:{unknown}", "n": 1}, {"subject": f"grant:{other}", "n": 1}],
        key=lambda r: str(r["subject"]),
    )


async def test_transfer_status_by_get_needs_a_signed_request_for_exactly_that_id(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    asked, other = uuid7(now_ms(a)), uuid7(now_ms(a))
    env = seal_from(a, "prov-31", StatusReq(transfer_ids=(asked,)))
    header = base64.b64encode(encode_envelope(env, "msgpack")).decode()
    async with client(b) as http:
        good = await http.get(f"/plt/v1/transfers/{asked}", headers={"PLT-Envelope": header})
        wrong = await http.get(f"/plt/v1/transfers/{other}", headers={"PLT-Envelope": header})
        missing = await http.get(f"/plt/v1/transfers/{asked}")
    assert (await a.plt.open(good.content, now_ms(a), wire="json")).envelope.typ is (
        MessageType.STATUS
    )
    assert error_of(decode_envelope(wrong.content, "json")).error.code == 3100
    assert missing.status_code == 400


async def test_a_message_that_is_only_ever_a_reply_is_refused_as_a_request(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    body = RelReply(
        relation_id=uuid7(now_ms(a)),
        ref_typ=MessageType.REL_END,
        ref_hash=body_hash(b""),
        outcome="OK",
        error=None,
        replied_at_ms=now_ms(a),
    )
    [reply] = replies(await post_batch(b, [seal_from(a, "prov-31", body)]))
    assert error_of(reply).error.code == 3100


# --- workers ---------------------------------------------------------------------------------


async def test_the_sender_worker_delivers_on_its_own_and_stops_with_the_node(
    admin_dsn: str, template_dsn: str, net_clock: ManualClock
) -> None:
    async with LocalNetwork(
        provinces=DEFAULT_PROVINCES[:2],
        admin_dsn=admin_dsn,
        template=TEMPLATE_DB,
        clock=net_clock,
        scrypt_n=TEST_SCRYPT_N,
        operator_token=OPERATOR_TOKEN,
        workers=True,
    ) as net:
        a, b = net["prov-13"], net["prov-31"]
        giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
        relation_id = (await file_cross(giver, receiver)).json()["relation_id"]
        for _ in range(200):
            if await cross_state(a, relation_id) and await rows(
                a, "SELECT 1 FROM plt_outbox WHERE done_at IS NOT NULL"
            ):
                break
            await asyncio.sleep(0.02)
        assert await cross_state(b, relation_id) == "pending_confirmation"
        assert await rows(a, "SELECT typ FROM plt_outbox WHERE done_at IS NULL") == []


async def test_the_sender_is_woken_by_the_commit_that_queued_a_message(
    network: LocalNetwork,
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    giver, receiver = await enrol(a, 100, "张三"), await enrol(b, 500, "李四")
    # Idle pause of a minute: only the wake-up (NOTIFY on commit, LISTEN) can send in time.
    sender = Worker("plt-sender", transport.run_once, 60.0, wake=wakeup.outbox_event)
    workers = WorkerSet(a.ctx, [sender])
    workers.start()
    try:
        await asyncio.sleep(0.3)  # the first pass found nothing; the sender now waits
        relation_id = (await file_cross(giver, receiver)).json()["relation_id"]
        started = asyncio.get_running_loop().time()
        while await cross_state(b, relation_id) is None:
            assert asyncio.get_running_loop().time() - started < 5.0, "the sender slept on"
            await asyncio.sleep(0.01)
    finally:
        stopping = asyncio.get_running_loop().time()
        await workers.stop()
        # Stopping ends the idle pause at once (not after the minute, nor the stop timeout).
        assert asyncio.get_running_loop().time() - stopping < 1.0
    assert await cross_state(b, relation_id) == "pending_confirmation"
