"""Node B applying a large batch of DECISIONs in sets (`grants_receiver.on_decisions`).

The 06:00 herd reaches B as POSTs of hundreds of ABORTs, mostly for grants B never saw
(tombstones). A batch of 32 or more goes through `inbox.receive_batch` exactly as from the
wire: signed envelopes from the fake giver node prov-11, real PostgreSQL. The set path takes
the tombstones and the replays; a DECISION that moves money or is refused goes through the
one-message handler, and every position still gets its exact answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from nodes.settings import Settings
from protocol.envelope import decode_envelope
from protocol.errors import ErrorCode
from protocol.messages import (
    Ack,
    Body,
    Decision,
    Decline,
    ErrorReply,
    MessageType,
    Outcome,
    decode_body,
    hash_body,
)
from tests.wallet.grants_support import (
    attach_plt,
    books_balanced,
    count_one_message_handler,
    deliver,
    grant_node_settings,
    sealed,
)
from tests.wallet.service_context import wallet_context
from tests.wallet.test_grants_receiver import (
    Client,
    assert_quota,
    decision_for,
    make_receiver,
    prepare_for,
    prepared,
)
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender
from wallet.plt import dispatch, inbox
from wallet.plt.dispatch import Incoming
from wallet.plt.grants_base import to_ms
from wallet.plt.transport import join_batch, split_batch

_ROWS = """
SELECT transfer_id, state, prepare IS NULL AS tombstone, decision_hash, ack, version
FROM grant_in ORDER BY transfer_id
"""


@pytest.fixture
def settings(database_url: str) -> Settings:
    return grant_node_settings(database_url)


@pytest.fixture
async def svc(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as ctx:
        attach_plt(ctx)
        yield ctx


@pytest.fixture
def one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The transfer ids of the DECISIONs the one-message handler applied (it still does)."""
    return count_one_message_handler(monkeypatch, MessageType.DECISION)


async def _post(svc: WalletContext, bodies: Sequence[Decision]) -> list[Body]:
    """POST the DECISIONs as one batch from prov-11; the reply bodies, by position."""
    assert svc.plt is not None
    now_ms = to_ms(svc.clock.now())
    raw = join_batch([sealed(body, now_ms=now_ms) for body in bodies], "msgpack")
    answer = await inbox.receive_batch(svc, svc.plt, raw, "msgpack")
    replies = []
    for item in split_batch(answer, "msgpack"):
        env = decode_envelope(item, "msgpack")
        replies.append(decode_body(env.typ, env.body))
    return replies


def _assert_acked(decision: Decision, reply: Body, completed_at: dt.datetime) -> None:
    assert reply == Ack(
        transfer_id=decision.transfer_id,
        decision_hash=hash_body(decision),
        final_state="ABORTED",
        completed_at_ms=to_ms(completed_at),
    )


async def test_a_batch_of_aborts_leaves_tombstones_in_sets_and_the_rest_goes_alone(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
    one_at_a_time: list[str],
) -> None:
    receiver = await make_receiver(client, otp, db)
    known = await prepared(svc, receiver, 100_000)
    now = clock.now()
    never_seen = [prepare_for(receiver, now) for _ in range(40)]
    unknown = [decision_for(prepare, Outcome.ABORT, now) for prepare in never_seen]
    # The bad one: a COMMIT for a grant B never saw (3208); the known one moves money.
    bad = decision_for(prepare_for(receiver, now), Outcome.COMMIT, now, vote_hash="0" * 64)
    abort_known = decision_for(known, Outcome.ABORT, now)
    batch = [*unknown[:7], bad, *unknown[7:20], abort_known, *unknown[20:]]

    replies = await _post(svc, batch)

    assert len(replies) == 42
    for decision, reply in zip(batch, replies, strict=True):
        if decision is bad:
            assert isinstance(reply, ErrorReply)
            assert (reply.error.code, reply.transfer_id) == (
                ErrorCode.UNKNOWN_TRANSFER,
                bad.transfer_id,
            )
        else:
            _assert_acked(decision, reply, now)
    # Only the COMMIT and the known grant's ABORT went through the one-message handler.
    assert sorted(one_at_a_time) == sorted([bad.transfer_id, known.transfer_id])
    rows = {r["transfer_id"]: r for r in await db.fetch(_ROWS)}
    assert set(rows) == {d.transfer_id for d in unknown} | {known.transfer_id}
    for decision, reply in zip(batch, replies, strict=True):
        if decision is bad:
            continue
        row = rows[decision.transfer_id]
        assert (row["state"], row["decision_hash"]) == ("ABORTED", hash_body(decision))
        assert row["tombstone"] is (decision is not abort_known)
        assert decode_body(MessageType.ACK, row["ack"]) == reply
    await assert_quota(
        db, known.transfer_id, state="void", available=0, pending=0, due_posted=0, due_pending=0
    )

    # The same batch again, a minute later: the same answers (the stored ACKs), nothing new.
    clock.set(now + dt.timedelta(minutes=1))
    one_at_a_time.clear()
    again = await _post(svc, batch)
    assert again == replies
    assert one_at_a_time == [bad.transfer_id]  # the replay of the known one is a set's too
    assert {r["transfer_id"]: r for r in await db.fetch(_ROWS)} == rows
    await assert_quota(
        db, known.transfer_id, state="void", available=0, pending=0, due_posted=0, due_pending=0
    )
    # A PREPARE arriving after its ABORT is declined (the tombstone, PROTOCOL d.7).
    late = await deliver(svc, never_seen[0])
    assert isinstance(late, Decline) and late.error.code is ErrorCode.EXPIRED
    await books_balanced(db)


async def test_a_failing_set_handler_leaves_every_message_to_the_one_message_path(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
    monkeypatch: pytest.MonkeyPatch,
    one_at_a_time: list[str],
) -> None:
    receiver = await make_receiver(client, otp, db)
    now = clock.now()
    batch = [decision_for(prepare_for(receiver, now), Outcome.ABORT, now) for _ in range(32)]
    real = dispatch._MANY_HANDLERS[MessageType.DECISION]

    async def half_then_fail(
        ctx: WalletContext, messages: Sequence[Incoming]
    ) -> dict[int, Body | None]:
        await real(ctx, messages[: len(messages) // 2])  # writes, then the savepoint goes
        raise RuntimeError("set handler failed")

    monkeypatch.setitem(dispatch._MANY_HANDLERS, MessageType.DECISION, half_then_fail)
    replies = await _post(svc, batch)
    for decision, reply in zip(batch, replies, strict=True):
        _assert_acked(decision, reply, now)
    assert sorted(one_at_a_time) == sorted(d.transfer_id for d in batch)
    rows = await db.fetch(_ROWS)
    assert [(r["transfer_id"], r["state"], r["version"]) for r in rows] == sorted(
        (d.transfer_id, "ABORTED", 0) for d in batch
    )
