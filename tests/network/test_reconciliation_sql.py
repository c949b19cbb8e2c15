"""What SQL holds for reconciliation and clearing (migrations/0006), tried directly against a
node's database after a real grant: each violating statement raises and changes nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest

from nodes.network import LocalNetwork
from protocol.messages import Decision, MessageType, decode_body
from tests.network.grant_flow import Pair, answer, check_books, grant, linked_pair, set_clock
from tests.network.support import rows
from wallet import ledger
from wallet.clock import ManualClock
from wallet.plt import statements
from wallet.plt.quota import clearing_account, open_account_on_demand

pytestmark = pytest.mark.network

CST = dt.timezone(dt.timedelta(hours=8))


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def test_windows_statements_and_clearing_lines_are_guarded_in_sql(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 100_000)
    assert (await answer(pair, tid)).status_code == 200
    await pair.network.run_senders()

    # Both sides read the window from A's signed DECISION bytes.
    for node, table in ((pair.a, "grant_out"), (pair.b, "grant_in")):
        [row] = await rows(node, f"SELECT decision, decision_window_id FROM {table}")
        decision = decode_body(MessageType.DECISION, bytes(row["decision"]))
        assert isinstance(decision, Decision)
        assert row["decision_window_id"] == decision.window_id == "2026-03-16T10"
    async with pair.a.ctx.pool.acquire() as conn:
        with pytest.raises(asyncpg.GeneratedAlwaysError):
            await conn.execute("UPDATE grant_out SET decision_window_id = '2026-03-16T11'")

    await set_clock(pair, net_clock, dt.datetime(2026, 3, 16, 12, 0, tzinfo=CST))
    assert await statements.run_once(pair.a.ctx) == 1
    assert await statements.run_once(pair.b.ctx) == 1
    await pair.network.run_senders()
    key = ("prov-31", "2026-03-16T10")
    windows = (
        "SELECT state, our_hash, peer_hash FROM recon_window WHERE peer = $1 AND window_id = $2"
    )
    [before] = await rows(pair.a, windows, *key)
    assert before["state"] == "RECONCILED" and before["our_hash"] == before["peer_hash"]

    async with pair.a.ctx.pool.acquire() as conn:
        bad = [
            ("UPDATE recon_window SET state = 'CLOSED'", "cannot go back"),
            ("UPDATE recon_window SET our_statement = '\\x00'", "never changes"),
            ("UPDATE recon_window SET peer_envelope = '\\x00'", "never changes"),
            ("UPDATE recon_window SET state = 'INCLUDED_IN_CLEARING'", "recon_window_cleared"),
            ("DELETE FROM recon_window", "never deleted"),
            (
                "INSERT INTO recon_window (peer, window_id, state, opened_at) "
                "VALUES ('prov-31', '2026-03-16T09', 'RECONCILED', now())",
                "recon_window_ours",
            ),
        ]
        for sql, message in bad:
            with pytest.raises(asyncpg.CheckViolationError, match=message):
                await conn.execute(sql)
    assert await rows(pair.a, windows, *key) == [before]

    # Clearing lines: one per grant and month; within the frozen amount; tied to their
    # own ledger movement.
    async with pair.a.ctx.pool.acquire() as conn:
        due_to = await clearing_account(conn, "due_to", "prov-31", tid)
        payable = await open_account_on_demand(conn, "payable", "payable:prov-31")

        async def line(month: str, used_fen: int, moved_fen: int | None = None) -> None:
            async with conn.transaction():
                moved = await ledger.transfer(
                    conn,
                    debit_account_id=due_to,
                    credit_account_id=payable,
                    amount_fen=moved_fen or used_fen,
                    purpose="cross_province_payable",
                )
                await conn.execute(
                    "INSERT INTO clearing_payable (month, transfer_id, peer, granted_fen,"
                    " used_fen, ledger_transfer_id, booked_at) VALUES ($1, $2, 'prov-31',"
                    " 100000, $3, $4, now())",
                    month,
                    tid,
                    used_fen,
                    moved,
                )

        with pytest.raises(asyncpg.CheckViolationError, match=r"outside 0\.\.100000"):
            await line("2026-03", 100_001)
        with pytest.raises(asyncpg.CheckViolationError, match="does not book"):
            await line("2026-03", 30_000, moved_fen=29_000)
        await line("2026-03", 30_000)
        with pytest.raises(asyncpg.UniqueViolationError):
            await line("2026-03", 1_000)
        with pytest.raises(asyncpg.CheckViolationError, match=r"outside 0\.\.100000"):
            await line("2026-04", 70_001)
        with pytest.raises(asyncpg.CheckViolationError, match="never changes"):
            await conn.execute("UPDATE clearing_payable SET used_fen = 1")
        assert await conn.fetchval("SELECT sum(used_fen) FROM clearing_payable") == 30_000
        await conn.execute(
            "INSERT INTO clearing_run (month, windows, grants, cleared_at, actor)"
            " VALUES ('2026-03', 1, 1, now(), 'test')"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO clearing_run (month, windows, grants, cleared_at, actor)"
                " VALUES ('2026-03', 1, 1, now(), 'again')"
            )
        # Undo the hand-made payable so the pair's books stay comparable for the checker.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("DELETE FROM clearing_payable")
        await conn.execute("SET session_replication_role = origin")
        await ledger.transfer(
            conn,
            debit_account_id=payable,
            credit_account_id=due_to,
            amount_fen=30_000,
            purpose="cross_province_payable",
        )
