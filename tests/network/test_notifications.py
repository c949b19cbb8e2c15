"""Notifications across two real nodes (issue 12): each node tells only its own people, each
kind arrives exactly once to the right person through the list, the live event stream (also
resumed after a disconnect in the middle of a burst) and the development push sender.

The giver lives at prov-13 (Hebei), the receiver at prov-31 (Shanghai).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from nodes.network import LocalNetwork, LocalNode
from nodes.workers import WorkerSet
from tests.network.events import EventStream
from tests.network.grant_flow import (
    answer,
    check_books,
    credit,
    grant,
    instruct,
    linked_pair,
    set_clock,
)
from tests.network.support import (
    GIVER_SEQ,
    RECEIVER_SEQ,
    Holder,
    app_get,
    app_post,
    client,
    enrol,
    file_cross,
)
from tests.support import OPERATOR, PASSWORD
from wallet import push
from wallet.clock import ManualClock
from wallet.plt import grants

pytestmark = pytest.mark.network

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
OFFER_WITHIN_S = 1.0


async def listed(who: Holder) -> list[dict[str, Any]]:
    """Every notification of `who`, newest first (one page is enough here)."""
    response = await app_get(who, "/app/v1/notifications?limit=100")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def kinds(who: Holder) -> list[tuple[str, str | None]]:
    return [(n["kind"], n["refs"].get("transfer_id")) for n in await listed(who)]


@contextlib.asynccontextmanager
async def workers_running(network: LocalNetwork) -> AsyncIterator[None]:
    """Every node's background workers (outbox sender, push, ...), as in production."""
    sets = [WorkerSet(node.ctx) for node in network.nodes.values()]
    for workers in sets:
        workers.start()
    try:
        yield
    finally:
        await asyncio.gather(*(workers.stop() for workers in sets))


# --- live: the offer on the receiver's phone -----------------------------------------------------


async def test_the_receivers_stream_shows_the_offer_within_a_second_of_the_instruction(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    async with (
        workers_running(network),
        EventStream(pair.receiver) as receiver_phone,
        EventStream(pair.giver) as giver_phone,
    ):
        started = time.monotonic()
        response = await instruct(pair, 30_000)
        assert response.status_code == 202, response.text
        offer = await receiver_phone.next(timeout_s=5)
        elapsed_s = time.monotonic() - started
        tid = response.json()["transfer_id"]
        assert offer.kind == "grant.offered"
        assert elapsed_s < OFFER_WITHIN_S, f"the offer took {elapsed_s:.3f} s"
        assert offer.data["amount_fen"] == 30_000
        assert offer.data["counterpart_name_masked"] == "张**"
        assert offer.data["counterpart_province"] == "130000"
        assert offer.data["refs"] == {"transfer_id": tid, "relation_id": pair.relation_id}
        offered = (await app_get(pair.receiver, "/app/v1/grants/incoming")).json()[0]
        assert dt.datetime.fromisoformat(offer.data["deadline"]) == dt.datetime.fromisoformat(
            offered["accept_by"]
        )

        assert (await answer(pair, tid)).status_code == 200
        committed = await receiver_phone.next()
        accepted = await giver_phone.next()
        assert (committed.kind, committed.data["refs"]["transfer_id"]) == ("grant.committed", tid)
        assert (accepted.kind, accepted.data["amount_fen"]) == ("grant.accepted", 30_000)
        assert accepted.data["counterpart_name_masked"] == "李**"
        assert accepted.data["counterpart_province"] == "310000"
    await check_books(network)


# --- every kind, exactly once, to the right person ------------------------------------------------


async def test_each_grant_and_relationship_event_reaches_its_person_once(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    pair = await linked_pair(network)
    accepted = await grant(pair, 100_000)
    assert (await answer(pair, accepted)).status_code == 200
    await network.run_senders()
    declined = await grant(pair, 20_000)
    assert (await answer(pair, declined, "decline")).status_code == 200
    await network.run_senders()
    expired = await grant(pair, 30_000)
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 17, 6, 1, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(pair.a.ctx) == 1
    await network.run_senders()
    ended = await app_post(
        pair.giver,
        f"/app/v1/cross-relationships/{pair.relation_id}/end",
        {"payment_password": PASSWORD},
    )
    assert ended.status_code == 200, ended.text
    await network.run_senders()
    await network.run_senders()  # nothing new: replays notify nobody

    assert await kinds(pair.giver) == [
        ("quota.returned", accepted),
        ("relationship.ended", None),
        ("grant.expired", expired),
        ("grant.declined", declined),
        ("grant.accepted", accepted),
        ("relationship.confirmed", None),
        ("credit.arrived", None),
    ]
    assert await kinds(pair.receiver) == [
        ("relationship.ended", None),
        ("grant.returned", expired),
        ("grant.offered", expired),
        ("grant.returned", declined),
        ("grant.offered", declined),
        ("grant.committed", accepted),
        ("grant.offered", accepted),
        ("relationship.requested", None),
    ]
    giver_list, receiver_list = await listed(pair.giver), await listed(pair.receiver)
    returned = giver_list[0]
    assert (returned["amount_fen"], returned["detail"]["released_fen"]) == (100_000, 100_000)
    assert giver_list[2]["detail"] == {"plt_code": 3303}
    assert giver_list[3]["detail"] == {"plt_code": 5104}
    assert receiver_list[0]["detail"]["ended_by"] == "giver"
    assert receiver_list[-1]["counterpart_name_masked"] == "张**"
    # Nobody's ID number or full name is in any of them.
    for item in giver_list + receiver_list:
        text = str(item)
        assert pair.giver.id_number not in text and pair.receiver.id_number not in text
        assert pair.giver.name not in text and pair.receiver.name not in text
    # The same notifications, once each, on the stream (replayed from 0) and pushed.
    with capture_logs() as logs:
        assert await push.run_once(pair.a.ctx) == len(giver_list)
        assert await push.run_once(pair.b.ctx) == len(receiver_list)
    pushed = [
        (e["node"], e["recipient"], e["notification_id"])
        for e in logs
        if e["event"] == "notification_pushed"
    ]
    for who, node, items in (
        (pair.giver, pair.a, giver_list),
        (pair.receiver, pair.b, receiver_list),
    ):
        expected = [(n["id"], n["kind"]) for n in reversed(items)]
        async with EventStream(who, last_event_id=0) as phone:
            assert [(e.id, e.kind) for e in await phone.take(len(items))] == expected
            with pytest.raises(TimeoutError):
                await phone.next(timeout_s=0.3)
        ref = await _ref(node, who)
        mine = [i for n, r, i in pushed if (n, r) == (node.node_id, ref)]
        assert sorted(mine) == [i for i, _ in expected]


async def test_the_development_push_sender_pushes_each_notification_once(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    tid = await grant(pair, 10_000)
    with capture_logs() as logs:
        pushed = [await push.run_once(node.ctx) for node in (pair.a, pair.b)]
        again = [await push.run_once(node.ctx) for node in (pair.a, pair.b)]
    assert again == [0, 0]
    sent = [e for e in logs if e["event"] == "notification_pushed"]
    giver_ref, receiver_ref = await _ref(pair.a, pair.giver), await _ref(pair.b, pair.receiver)
    assert sorted((e["recipient"], e["kind"]) for e in sent) == sorted(
        [
            (giver_ref, "credit.arrived"),
            (giver_ref, "relationship.confirmed"),
            (receiver_ref, "relationship.requested"),
            (receiver_ref, "grant.offered"),
        ]
    )
    assert pushed == [2, 2]
    offer = next(e for e in sent if e["kind"] == "grant.offered")
    assert (offer["amount_fen"], offer["counterpart"], offer["refs"]["transfer_id"]) == (
        10_000,
        "张**",
        tid,
    )
    for node in (pair.a, pair.b):
        states = await node.ctx.pool.fetch("SELECT push_state, push_attempts FROM notification")
        assert [(r["push_state"], r["push_attempts"]) for r in states] == [("sent", 1)] * 2


async def _ref(node: LocalNode, who: Holder) -> str:
    """The push recipient handle of `who` at their node."""
    person_id = await node.ctx.pool.fetchval(
        "SELECT id FROM insured_person WHERE id_number = $1", who.id_number
    )
    return f"person-{person_id}"


# --- the stream: resume, bounds ------------------------------------------------------------------


async def test_a_stream_resumed_with_last_event_id_loses_nothing_of_a_burst(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    giver = pair.giver
    burst = 20
    async with EventStream(giver) as phone:
        sending = asyncio.gather(
            *(credit(pair.a, giver, 100 + n, batch=f"burst-{n}") for n in range(burst))
        )
        first = await phone.take(7)
    # Disconnected in the middle of the burst; the rest keeps committing.
    async with EventStream(giver, last_event_id=first[-1].id) as phone:
        rest = await phone.take(burst - 7)
    await sending
    got = first + rest
    ids = [e.id for e in got]
    assert ids == sorted(ids) and len(set(ids)) == burst
    assert sorted(e.data["amount_fen"] for e in got) == [100 + n for n in range(burst)]
    in_list = [
        n["id"] for n in await listed(giver) if n["refs"].get("batch_id", "").startswith("b-burst")
    ]
    assert sorted(ids) == sorted(in_list)


async def test_streams_per_session_are_bounded_and_a_closed_one_frees_its_place(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    async with (
        EventStream(pair.giver) as one,
        EventStream(pair.giver) as two,
        EventStream(pair.giver) as three,
    ):
        assert [s.response.status_code for s in (one, two, three) if s.response] == [200] * 3
        async with EventStream(pair.giver) as fourth:
            assert fourth.response is not None
            assert fourth.response.status_code == 429
            await fourth.response.aread()
            assert fourth.response.headers["content-type"].startswith("application/problem+json")
            assert fourth.response.json()["code"] == "stream_limit_reached"
        # Another person's session has its own places, and sees only its own events.
        async with EventStream(pair.receiver, last_event_id=0) as theirs:
            assert theirs.response is not None and theirs.response.status_code == 200
            event = await theirs.next()
            assert event.kind == "relationship.requested"
    await asyncio.sleep(0.1)  # the server notices the closed connections
    async with EventStream(pair.giver, last_event_id=0) as again:
        assert again.response is not None and again.response.status_code == 200
        assert (await again.next()).kind == "credit.arrived"


async def test_a_declined_cross_province_request_tells_the_giver_once(
    network: LocalNetwork,
) -> None:
    giver = await enrol(network["prov-13"], GIVER_SEQ, "张三丰")
    receiver = await enrol(network["prov-31"], RECEIVER_SEQ, "李小龙", scheme="resident")
    filed = await file_cross(giver, receiver)
    relation_id = filed.json()["relation_id"]
    await network.run_senders()
    declined = await app_post(receiver, f"/app/v1/cross-relationships/{relation_id}/decline")
    assert declined.status_code == 200, declined.text
    await network.run_senders()
    [notice] = await listed(giver)
    assert (notice["kind"], notice["refs"]) == (
        "relationship.declined",
        {"relation_id": relation_id},
    )
    assert (notice["counterpart_name_masked"], notice["counterpart_province"]) == ("李**", "310000")
    assert await kinds(receiver) == [("relationship.requested", None)]


async def test_a_death_at_the_receivers_node_ends_it_automatically_for_both(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    async with client(pair.b) as http:
        response = await http.patch(
            f"/operator/v1/persons/{pair.receiver.id_number}",
            json={"status": "deceased"},
            headers=OPERATOR,
        )
    assert response.status_code == 200, response.text
    await network.run_senders()
    giver_newest, receiver_newest = (await listed(pair.giver))[0], (await listed(pair.receiver))[0]
    assert (giver_newest["kind"], giver_newest["detail"]["ended_by"]) == (
        "relationship.ended_automatically",
        "system",
    )
    assert receiver_newest["kind"] == "relationship.ended_automatically"
    ended = [n for n in await listed(pair.giver) if n["kind"].startswith("relationship.ended")]
    assert len(ended) == 1


async def test_a_quiet_stream_sends_heartbeats_and_reads_at_each_without_a_wake_up(
    network: LocalNetwork,
) -> None:
    pair = await linked_pair(network)
    ctx = pair.a.ctx
    ctx.notifications = msgspec.structs.replace(ctx.notifications, sse_heartbeat_s=0.2)
    lines: list[str] = []
    async with (
        httpx.AsyncClient(base_url=pair.a.url, timeout=10) as http,
        http.stream("GET", "/app/v1/events", headers=pair.giver.headers) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            lines.append(line)
            if line == ": heartbeat" and lines.count(line) == 1:
                # A row committed without NOTIFY (a lost wake-up): found at the next read.
                await ctx.pool.execute(
                    "INSERT INTO notification (person_id, kind, event_key, created_at,"
                    " push_next_at) SELECT person_id, 'wallet.locked', 'test:silent', now(), now()"
                    " FROM notification LIMIT 1"
                )
            if line.startswith("data:"):
                break
    assert lines[:2] == [": stream open", "retry: 2000"]
    assert lines[-3].startswith("id: ") and lines[-2] == "event: wallet.locked"
    assert '"kind":"wallet.locked"' in lines[-1]


async def test_a_request_refused_by_the_receivers_node_tells_the_giver_why(
    network: LocalNetwork,
) -> None:
    giver = await enrol(network["prov-13"], GIVER_SEQ, "张三丰")
    receiver = await enrol(network["prov-31"], RECEIVER_SEQ, "李小龙", wallet=False)
    filed = await file_cross(giver, receiver)
    relation_id = filed.json()["relation_id"]
    await network.run_senders()
    await network.run_senders()
    [notice] = await listed(giver)
    assert (notice["kind"], notice["refs"]) == (
        "relationship.declined",
        {"relation_id": relation_id},
    )
    assert notice["detail"]["plt_code"] == 3204


async def test_a_refused_instruction_notifies_no_one_at_either_node(network: LocalNetwork) -> None:
    pair = await linked_pair(network, balance_fen=10_000)
    before = (len(await listed(pair.giver)), len(await listed(pair.receiver)))
    refused = await instruct(pair, 20_000)  # more than the giver has
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "insufficient_funds"
    await network.run_senders()
    assert (len(await listed(pair.giver)), len(await listed(pair.receiver))) == before


async def test_a_stream_ends_at_the_first_heartbeat_after_logout(network: LocalNetwork) -> None:
    pair = await linked_pair(network)
    ctx = pair.a.ctx
    ctx.notifications = msgspec.structs.replace(ctx.notifications, sse_heartbeat_s=0.2)
    async with EventStream(pair.giver) as phone:
        async with httpx.AsyncClient(base_url=pair.a.url) as http:
            logout = await http.delete("/app/v1/sessions/current", headers=pair.giver.headers)
        assert logout.status_code == 204
        ended = await phone.next(timeout_s=5)
        assert (ended.kind, ended.data["code"]) == ("error", "unauthorized")
        with pytest.raises(EOFError):
            await phone.next(timeout_s=5)
