"""Node A at the 06:00 herd: the sweeper's wake-up, a sweep racing an ACCEPT, ACKs in sets.

B's ACKs come back as replies to A's DECISIONs; a batch of them goes through
`transport.apply_in_one_transaction` as the sender hands it over (`_reply_step`), with the
bound for one transaction lowered so that a few grants make a batch. Signed envelopes from
the fake receiver node prov-11, real PostgreSQL, balances to the fen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from nodes.settings import Settings
from protocol.errors import ErrorCode
from protocol.messages import Ack, Body, Decision, MessageType, Outcome, Prepare, hash_body
from tests.wallet.grants_support import (
    count_one_message_handler,
    deliver,
    grant_node_settings,
    incoming,
    outbox,
    outbox_body,
)
from tests.wallet.service_context import wallet_context
from tests.wallet.test_grants_giver import (
    BALANCE,
    DECIDE_BY,
    Client,
    accept_of,
    assert_money,
    granted,
    make_giver,
)
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender
from wallet.plt import grants, grants_giver, transport
from wallet.plt.grants_base import to_ms

_GRANTS = "SELECT transfer_id, state, acked, version FROM grant_out ORDER BY transfer_id"
_OUTBOX_ROW = """
SELECT id, to_node, typ, dedup_key, body, attempts FROM plt_outbox
WHERE typ = 'DECISION' AND dedup_key = $1
"""


@pytest.fixture
def settings(database_url: str) -> Settings:
    return grant_node_settings(database_url)


@pytest.fixture
async def svc(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as ctx:
        yield ctx


@pytest.fixture
def one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The transfer ids of the ACKs the one-message handler applied (it still does)."""
    return count_one_message_handler(monkeypatch, MessageType.ACK)


async def _replies(svc: WalletContext, db: Any, acks: Sequence[Ack]) -> None:
    """The ACKs as the sender hands B's replies to its DECISIONs over: one batch."""
    steps = []
    for ack in acks:
        row = await db.fetchrow(_OUTBOX_ROW, ack.transfer_id)
        sent = transport._Row(**dict(row))
        reply = incoming(ack, now=svc.clock.now(), is_reply=True)
        steps.append(transport._reply_step(svc, sent, reply))
    await transport.apply_in_one_transaction(svc, steps, together_from=2)


def _ack(decision: Body, at: dt.datetime, decision_hash: str | None = None) -> Ack:
    assert isinstance(decision, Decision)
    return Ack(
        transfer_id=decision.transfer_id,
        decision_hash=decision_hash or hash_body(decision),
        final_state="ABORTED",
        completed_at_ms=to_ms(at),
    )


async def test_the_sweeper_wakes_at_the_earliest_deadline(
    client: Client, otp: RecordingOtpSender, db: Any, clock: ManualClock, svc: WalletContext
) -> None:
    assert await grants.sweeper_due_in(svc) is None  # nothing pending: the usual pause
    giver = await make_giver(client, otp, db)
    await granted(client, giver, 1_000)
    clock.set(DECIDE_BY - dt.timedelta(seconds=3))
    assert await grants.sweeper_due_in(svc) == pytest.approx(3 + grants.SWEEP_AFTER_DEADLINE_S)
    clock.set(DECIDE_BY + dt.timedelta(seconds=1))  # due, and a pass left it: look again soon
    assert await grants.sweeper_due_in(svc) == grants.SWEEP_RECHECK_S
    assert await grants.sweeper_run_once(svc) == 1
    assert await grants.sweeper_due_in(svc) is None


async def test_a_sweep_racing_an_accept_aborts_the_grant_once(
    client: Client, otp: RecordingOtpSender, db: Any, clock: ManualClock, svc: WalletContext
) -> None:
    giver = await make_giver(client, otp, db, relations=2)
    raced = await granted(client, giver, 30_000, relation=0)
    other = await granted(client, giver, 20_000, relation=1)
    prepare = await outbox_body(db, MessageType.PREPARE, raced)
    assert isinstance(prepare, Prepare)
    clock.set(DECIDE_BY + dt.timedelta(milliseconds=1))
    # An ACCEPT's transaction holds the row: the sweep skips it, takes the other one.
    async with db.transaction():
        await db.execute("SELECT 1 FROM grant_out WHERE transfer_id = $1 FOR UPDATE", raced)
        assert await grants_giver.sweep_once(svc) == 1
        assert await grants.sweeper_due_in(svc) == grants.SWEEP_RECHECK_S
    await assert_money(
        db, giver, available=BALANCE - 30_000, pending=30_000, due_posted=0, due_pending=30_000
    )
    # Now both at once: whichever locks first decides; the grant is aborted once (3303).
    decision, swept = await asyncio.gather(
        deliver(svc, accept_of(prepare, clock.now())), grants_giver.sweep_once(svc)
    )
    assert isinstance(decision, Decision) and decision.outcome is Outcome.ABORT
    assert decision.reason is not None and decision.reason.code is ErrorCode.EXPIRED
    assert swept in (0, 1)
    assert await outbox_body(db, MessageType.DECISION, raced) == decision
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)
    aborts = await db.fetch(
        "SELECT subject FROM audit_event WHERE action = 'grant.abort' ORDER BY subject"
    )
    assert [r["subject"] for r in aborts] == sorted([f"grant:{raced}", f"grant:{other}"])
    states = {r["transfer_id"]: r["state"] for r in await db.fetch(_GRANTS)}
    assert states == {raced: "ABORTED", other: "ABORTED"}


async def test_acks_of_a_batch_are_applied_in_sets_and_a_bad_one_alone(
    client: Client,
    otp: RecordingOtpSender,
    db: Any,
    clock: ManualClock,
    svc: WalletContext,
    one_at_a_time: list[str],
) -> None:
    giver = await make_giver(client, otp, db, relations=3)
    tids = [await granted(client, giver, 1_000 * (i + 1), relation=i) for i in range(3)]
    clock.set(DECIDE_BY + dt.timedelta(minutes=1))
    assert await grants.sweeper_run_once(svc) == 3
    decisions = [await outbox_body(db, MessageType.DECISION, tid) for tid in tids]
    now = clock.now()
    good = [_ack(decisions[0], now), _ack(decisions[1], now)]
    wrong = _ack(decisions[2], now, decision_hash="0" * 64)  # an ACK of another DECISION

    await _replies(svc, db, [good[0], wrong, good[1]])

    assert one_at_a_time == [tids[2]]  # the wrong one only; it changes nothing but alerts
    before = {r["transfer_id"]: r for r in await db.fetch(_GRANTS)}
    assert {t: (r["state"], r["acked"]) for t, r in before.items()} == {
        tids[0]: ("ABORTED", True),
        tids[1]: ("ABORTED", True),
        tids[2]: ("ABORTED", False),
    }
    for tid, done in zip(tids, (True, True, False), strict=True):
        row = await outbox(db, MessageType.DECISION, tid)
        assert row is not None and (row["done_at"] is not None) is done
    alerts = await db.fetch("SELECT subject, action FROM audit_event WHERE action LIKE 'alert.%'")
    assert [(r["subject"], r["action"]) for r in alerts] == [
        (f"grant:{tids[2]}", "alert.modified_request")
    ]

    # The same ACKs again: nothing changes (a duplicate is answered by the set path too).
    one_at_a_time.clear()
    await _replies(svc, db, good)
    assert one_at_a_time == []
    assert {r["transfer_id"]: r for r in await db.fetch(_GRANTS)} == before
    # The right ACK of the third one, beside a duplicate: now it is acknowledged too.
    await _replies(svc, db, [good[0], _ack(decisions[2], now)])
    assert [r["acked"] for r in await db.fetch(_GRANTS)] == [True, True, True]
    row = await outbox(db, MessageType.DECISION, tids[2])
    assert row is not None and row["done_at"] is not None
    await assert_money(db, giver, available=BALANCE, pending=0, due_posted=0, due_pending=0)
