"""The givers' `shared_money.spent` notifications, written by the settlement's own statement.

A settlement drawing on in-province relatives writes one notification per giver inside the
statement that writes the settlement (no round trip of its own), under the same recipient
lock as every other notification writer, and wakes the event streams after its commit
(`notification_stream.announce`) rather than with a NOTIFY inside its transaction.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

import asyncpg
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.conftest import START
from tests.support import available_fen
from tests.wallet.service_context import wallet_context
from tests.wallet.test_settlement import (
    Member,
    assert_books_balanced,
    institution,
    institution_balance,
    member,
    pay,
    payment_code,
    share,
)
from wallet import notification_stream, notifications
from wallet.clock import ManualClock
from wallet.errors import ErrorCode, WalletError
from wallet.notifications import Kind, Notice
from wallet.otp import RecordingOtpSender
from wallet.settlement import SettlingInstitution, settle

Client: TypeAlias = AsyncTestClient[Litestar]

_ROWS = """
SELECT id, person_id, kind, event_key, amount_fen, counterpart_name_masked, counterpart_province,
       deadline, refs, detail, read_at, push_state, created_at = push_next_at AS due_at_once
FROM notification WHERE kind = 'shared_money.spent' ORDER BY id
"""


async def person_id(db: asyncpg.Connection, who: Member) -> int:
    found: int = await db.fetchval(
        "SELECT id FROM insured_person WHERE id_number = $1", who.id_number
    )
    return found


async def spent_rows(db: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = [dict(r) for r in await db.fetch(_ROWS)]
    for row in rows:
        row["refs"] = msgspec.json.decode(row["refs"])
        row["detail"] = msgspec.json.decode(row["detail"])
    return rows


async def test_a_settlement_on_two_givers_writes_one_notification_each_and_none_for_own_money(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "李小龙", scheme="resident")
    first = await member(client, otp, 2, "张三丰", fen=5_000)
    second = await member(client, otp, 3, "王大山", fen=100_000)
    own = await member(client, otp, 4, "赵六", fen=10_000)
    first_rid = await share(client, first, patient)
    second_rid = await share(client, second, patient)
    key = await institution(client)

    paid = await pay(client, key, patient, 8_000, "visit-1")
    assert (await pay(client, key, own, 2_500, "visit-2")).status_code == 201

    assert paid.status_code == 201, paid.text
    settlement_id = paid.json()["settlement_id"]
    first_id, second_id = await person_id(db, first), await person_id(db, second)
    rows = await spent_rows(db)
    for row in rows:
        del row["id"]
    expected = [
        (first_id, f"settlement:{settlement_id}:0", 5_000, first_rid),
        (second_id, f"settlement:{settlement_id}:1", 3_000, second_rid),
    ]
    assert rows == [
        {
            "person_id": giver,
            "kind": "shared_money.spent",
            "event_key": event_key,
            "amount_fen": fen,
            "counterpart_name_masked": "李**",
            "counterpart_province": None,
            "deadline": None,
            "refs": {"settlement_id": str(settlement_id), "relationship_id": str(rid)},
            "detail": {"category": "outpatient"},
            "read_at": None,
            "push_state": "pending",
            "due_at_once": True,
        }
        for giver, event_key, fen, rid in expected
    ]
    # Own money paid the second settlement: nobody was told about it.
    assert (
        await db.fetchval("SELECT count(*) FROM notification WHERE event_key LIKE 'settlement:%'")
        == 2
    )
    assert await available_fen(client, first.token) == 0
    assert await available_fen(client, second.token) == 97_000
    assert await available_fen(client, own.token) == 7_500
    assert await institution_balance(client) == 10_500
    await assert_books_balanced(db)


HOLD_S = 0.5


def hold_a_notification(database_url: str, notice: Notice, ready: threading.Event) -> int | None:
    """In a thread of its own (the test client blocks the test's event loop while a request
    runs): record `notice` and keep its transaction open for HOLD_S before committing."""

    async def hold() -> int | None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                held_id = await notifications.record(conn, notice, START)
                ready.set()
                await asyncio.sleep(HOLD_S)
            return held_id
        finally:
            await conn.close()

    return asyncio.run(hold())


async def test_a_settlements_notification_waits_for_another_writer_of_the_same_giver(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, database_url: str
) -> None:
    """The stream reads `id > cursor`: the settlement's notification, drawn while another
    writer of the giver's notifications has not committed, must commit after it."""
    patient = await member(client, otp, 1, "李小龙", scheme="resident")
    giver = await member(client, otp, 2, "张三丰", fen=10_000)
    await share(client, giver, patient)
    key = await institution(client)
    giver_id = await person_id(db, giver)
    held = Notice(person_id=giver_id, kind=Kind.WALLET_LOCKED, event_key="test:held")
    ready = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(hold_a_notification, database_url, held, ready)
        assert ready.wait(timeout=10)
        started = time.monotonic()
        paid = await pay(client, key, patient, 700, "visit-1")
        waited_s = time.monotonic() - started
        held_id = holding.result(timeout=10)
    assert paid.status_code == 201, paid.text
    assert waited_s >= HOLD_S * 0.8  # it waited for the other writer's commit
    (row,) = await spent_rows(db)
    assert held_id is not None and row["id"] > held_id
    assert (row["person_id"], row["amount_fen"]) == (giver_id, 700)
    assert await available_fen(client, giver.token) == 9_300


async def settling(db: asyncpg.Connection, code: str = "H1") -> SettlingInstitution:
    row = await db.fetchrow(
        "SELECT id, account_id, categories, code FROM institution WHERE code = $1", code
    )
    return SettlingInstitution(row["id"], row["account_id"], tuple(row["categories"]), row["code"])


async def test_a_settlement_wakes_the_givers_stream_after_it_commits_and_a_refused_one_does_not(
    client: Client,
    otp: RecordingOtpSender,
    db: asyncpg.Connection,
    database_url: str,
    clock: ManualClock,
) -> None:
    patient = await member(client, otp, 1, "李小龙", scheme="resident")
    giver = await member(client, otp, 2, "张三丰", fen=1_000)
    await share(client, giver, patient)
    await institution(client)
    hospital = await settling(db)
    giver_id = await person_id(db, giver)
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(notifications.CHANNEL, lambda *args: heard.append(args[3]))
    try:
        async with wallet_context(database_url, clock, otp) as ctx:
            hub = notification_stream.hub_of(ctx)
            async with hub.subscribe(giver_id, b"test-session") as wake:
                await asyncio.sleep(0.3)  # the hub's LISTEN is up; it wakes the stream once
                wake.clear()
                code = await payment_code(client, patient)
                with pytest.raises(WalletError) as refused:
                    await settle(ctx, hospital, payment_code=code, amount_fen=1_001,
                                 category="outpatient", reference="visit-1")  # fmt: skip
                assert refused.value.code is ErrorCode.INSUFFICIENT_FUNDS
                await asyncio.sleep(0.3)
                assert (wake.is_set(), heard) == (False, [])

                view, made = await settle(ctx, hospital, payment_code=code, amount_fen=1_000,
                                          category="outpatient", reference="visit-2")  # fmt: skip
                assert made and view.amount_fen == 1_000
                assert wake.is_set()  # this process's stream: woken before the answer
                for _ in range(50):  # other processes: by a NOTIFY sent after the commit
                    if heard:
                        break
                    await asyncio.sleep(0.1)
                assert heard == [str(giver_id)]
    finally:
        await listener.close()
    assert [r["amount_fen"] for r in await spent_rows(db)] == [1_000]
    assert await available_fen(client, giver.token) == 0
