"""Grants under faults (PROTOCOL d): replays, lost replies, a partition across 06:00,
the in-doubt resolver, a modified PREPARE, an equivocating giver node.

Messages are taken from a node's outbox and sent by hand where a fault needs it (a reply
that is "lost" is simply not handed back); everything else goes through the real sender.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.clock import RESOLVER_GRACE_MS
from protocol.envelope import Envelope, decode_batch, open_envelope
from protocol.errors import ErrorCode
from protocol.messages import (
    Body,
    Decision,
    ErrorReply,
    MessageType,
    Outcome,
    Prepare,
    Received,
    decode_body,
    hash_body,
)
from tests.network.grant_flow import (
    A,
    B,
    Pair,
    answer,
    check_books,
    expect_money,
    grant,
    linked_pair,
    set_clock,
    states,
)
from tests.network.support import post_batch, seal_from
from wallet.clock import ManualClock
from wallet.plt import grants, transport
from wallet.plt.grants_base import to_ms

pytestmark = pytest.mark.network

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def queued(node: LocalNode, typ: MessageType, key: str) -> Body:
    raw = await node.ctx.pool.fetchval(
        "SELECT body FROM plt_outbox WHERE typ = $1 AND dedup_key = $2", typ.value, key
    )
    assert raw is not None, f"no {typ} queued at {node.node_id} for {key}"
    return decode_body(typ, bytes(raw))


async def send_by_hand(sender: LocalNode, receiver: LocalNode, body: Body) -> Body:
    """Seal `body` as `sender` and POST it to `receiver`; return the verified reply body."""
    response = await post_batch(receiver, [seal_from(sender, receiver.node_id, body)])
    assert response.status_code == 200, response.text
    (item,) = decode_batch(response.content, "msgpack")
    assert isinstance(item, Envelope)
    opened = open_envelope(
        item, sender.node_id, sender.plt.directory.verifying_key, to_ms(sender.ctx.clock.now())
    )
    return opened.body


async def test_a_replayed_prepare_gets_the_same_received_and_holds_once(pair: Pair) -> None:
    tid = await grant(pair, 80_000)
    prepare = await queued(pair.a, MessageType.PREPARE, tid)
    first = await send_by_hand(pair.a, pair.b, prepare)
    second = await send_by_hand(pair.a, pair.b, prepare)
    assert isinstance(first, Received) and first == second
    await expect_money(pair, giver=420_000, held=80_000)


async def test_a_modified_prepare_is_refused_with_3106(pair: Pair) -> None:
    tid = await grant(pair, 80_000)
    prepare = await queued(pair.a, MessageType.PREPARE, tid)
    assert isinstance(prepare, Prepare)
    forged = msgspec.structs.replace(prepare, amount_fen=180_000)
    reply = await send_by_hand(pair.a, pair.b, forged)
    assert isinstance(reply, ErrorReply)
    assert (reply.error.code, reply.differs) == (ErrorCode.MODIFIED_REQUEST, ("amount_fen",))
    await expect_money(pair, giver=420_000, held=80_000)


async def test_a_lost_decision_reply_is_recovered_by_the_accept_retry(pair: Pair) -> None:
    tid = await grant(pair, 80_000)
    assert (await answer(pair, tid)).status_code == 200
    accept = await queued(pair.b, MessageType.ACCEPT, tid)
    decision = await send_by_hand(pair.b, pair.a, accept)  # A commits; the reply is "lost"
    assert isinstance(decision, Decision) and decision.outcome is Outcome.COMMIT
    assert await states(pair, tid) == ("COMMITTED", "ACCEPTED")
    await transport.run_once(pair.b.ctx)  # B sends its ACCEPT again: the stored DECISION
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await pair.network.run_senders()  # A's DECISION from its outbox gets B's stored ACK
    acked = await pair.a.ctx.pool.fetchval(
        "SELECT acked FROM grant_out WHERE transfer_id = $1", tid
    )
    assert acked is True
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)


async def test_the_resolver_learns_a_commit_from_a_signed_status(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 80_000)
    assert (await answer(pair, tid)).status_code == 200
    accept = await queued(pair.b, MessageType.ACCEPT, tid)
    await send_by_hand(pair.b, pair.a, accept)  # A commits; B never hears the answer
    later = DECIDE_BY + dt.timedelta(hours=3)
    # Neither the ACCEPT retry nor A's DECISION gets through for a while.
    for node in (pair.a, pair.b):
        await node.ctx.pool.execute(
            "UPDATE plt_outbox SET next_attempt_at = $1 WHERE done_at IS NULL", later
        )
    await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(milliseconds=RESOLVER_GRACE_MS))
    assert await grants.resolver_run_once(pair.b.ctx) == 1
    await transport.run_once(pair.b.ctx)  # STATUS_REQ -> STATUS with A's signed COMMIT
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)
    await set_clock(pair, net_clock, later)
    await pair.network.run_senders()


async def test_a_partition_across_06_00_ends_in_abort_on_both_sides(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 80_000)
    await pair.network.stop_node(B)
    await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(minutes=1))
    assert await grants.sweeper_run_once(pair.a.ctx) == 1
    await pair.network.run_senders()  # B is unreachable: the ABORT waits
    await pair.network.start_node(B)
    await set_clock(pair, net_clock, net_clock.now())
    b_state = await pair.b.ctx.pool.fetchval(
        "SELECT state FROM grant_in WHERE transfer_id = $1", tid
    )
    assert b_state == "PENDING_ACCEPT"  # B never expires a hold on its own
    net_clock.advance(minutes=1)
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    await expect_money(pair, giver=500_000)


async def test_grants_in_flight_are_final_within_5_s_of_the_giver_node_returning(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    pairs = [await linked_pair(network, seq=seq) for seq in range(3)]
    tids = [await grant(pair, 80_000) for pair in pairs]
    await network.stop_node(A)
    for pair, tid in zip(pairs, tids, strict=True):
        assert (await answer(pair, tid)).status_code == 200  # ACCEPT queued at B, A is down
    b = network[B]
    last_due = "SELECT max(next_attempt_at) FROM plt_outbox WHERE done_at IS NULL"
    for _ in range(7):  # the outage lasts: B's backoff grows to half a minute and more
        assert (await transport.run_once(b.ctx)).failed == 3
        net_clock.set(await b.ctx.pool.fetchval(last_due))
    assert (await transport.run_once(b.ctx)).failed == 3
    waiting = await b.ctx.pool.fetchval(last_due.replace("max", "min"))
    await network.start_node(A)
    returned = net_clock.now()
    assert waiting - returned > dt.timedelta(seconds=5)  # the old backoff would wait this long

    net_clock.advance(seconds=transport.PROBE_INTERVAL_MS / 1000)
    await network.run_senders()

    assert net_clock.now() - returned <= dt.timedelta(seconds=5)
    for pair, tid in zip(pairs, tids, strict=True):
        assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    acked = await network[A].ctx.pool.fetch("SELECT acked FROM grant_out")
    assert [r["acked"] for r in acked] == [True, True, True]
    await check_books(network)


async def test_an_equivocating_giver_node_is_frozen(pair: Pair) -> None:
    tid = await grant(pair, 80_000)
    await answer(pair, tid)
    await pair.network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    prepare = await queued(pair.a, MessageType.PREPARE, tid)
    committed = await queued(pair.a, MessageType.DECISION, tid)
    assert isinstance(committed, Decision)
    abort = Decision(
        transfer_id=tid,
        prepare_hash=hash_body(prepare),
        vote_hash=committed.vote_hash,
        outcome=Outcome.ABORT,
        reason=committed.reason or _expired(),
        decided_at_ms=committed.decided_at_ms,
        window_id=committed.window_id,
    )
    reply = await send_by_hand(pair.a, pair.b, abort)
    assert isinstance(reply, ErrorReply) and reply.differs == ("outcome",)
    frozen = await pair.b.ctx.pool.fetchval("SELECT node FROM peer_link")
    assert frozen == A
    # Nothing but evidence flows with a frozen peer.
    refused = await send_by_hand(pair.a, pair.b, prepare)
    assert isinstance(refused, ErrorReply) and refused.error.code is ErrorCode.UNAVAILABLE
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)


def _expired() -> Any:
    from protocol.messages import ErrorBody

    return ErrorBody.of(ErrorCode.EXPIRED)
