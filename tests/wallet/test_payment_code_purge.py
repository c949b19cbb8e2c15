"""Payment codes are purged once long expired, used or not, in bounded passes that replicas
may run at once (issue 14: the table grew by one row per code forever)."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg

from nodes.workers import WORKERS
from tests.wallet.service_context import wallet_context
from tests.wallet.test_settlement import (
    Client,
    institution,
    member,
    payment_code,
    settle,
)
from wallet import settlement
from wallet.clock import ManualClock
from wallet.otp import RecordingOtpSender


def _digest(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


async def _codes(db: asyncpg.Connection) -> set[bytes]:
    return {r["code_hash"] for r in await db.fetch("SELECT code_hash FROM payment_code")}


async def test_long_expired_codes_are_purged_in_bounded_passes(
    client: Client,
    otp: RecordingOtpSender,
    clock: ManualClock,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    patient = await member(client, otp, 1, "王五", fen=10_000)
    key = await institution(client)
    used = await payment_code(client, patient)
    assert (await settle(client, key, used, 100, reference="r1")).status_code == 201
    unused = [await payment_code(client, patient) for _ in range(4)]
    clock.advance(seconds=client.app.state.ctx.rules.payment_code_ttl_s + 1)
    fresh = await payment_code(client, patient)  # issued now, still valid

    async with wallet_context(database_url, clock, otp) as ctx:
        # Expired, but within the retention: a spent code is still told apart from a typo.
        assert await settlement.purge_payment_codes(ctx) == 0
        assert len(await _codes(db)) == 6
        response = await settle(client, key, used, 100, reference="r2")
        assert response.json()["code"] == "payment_code_used"

        clock.advance(seconds=settlement.PAYMENT_CODE_RETENTION.total_seconds())
        assert await settlement.purge_payment_codes(ctx, limit=3) == 3
        assert await settlement.purge_payment_codes(ctx, limit=3) == 2
        assert await settlement.purge_payment_codes(ctx, limit=3) == 0
    assert await _codes(db) == {_digest(fresh)}
    assert _digest(used) not in await _codes(db)
    assert not {_digest(c) for c in unused} & await _codes(db)
    # The settlement made with the purged code is untouched, and its replay still answers.
    assert await db.fetchval("SELECT count(*) FROM settlement") == 1
    replay = await settle(client, key, used, 100, reference="r1")
    assert replay.status_code == 200
    assert replay.json()["amount_fen"] == 100


async def test_concurrent_purges_take_disjoint_rows(
    client: Client,
    otp: RecordingOtpSender,
    clock: ManualClock,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    patient = await member(client, otp, 1, "王五")
    person_id = await db.fetchval("SELECT id FROM insured_person")
    now = clock.now()
    await db.executemany(
        "INSERT INTO payment_code (code_hash, person_id, created_at, expires_at) "
        "VALUES ($1, $2, $3, $3)",
        [(_digest(f"{i:018d}"), person_id, now) for i in range(500)],
    )
    clock.advance(seconds=settlement.PAYMENT_CODE_RETENTION.total_seconds() + 1)
    async with wallet_context(database_url, clock, otp) as ctx:
        purged = await asyncio.gather(
            *(settlement.purge_payment_codes(ctx, limit=40) for _ in range(4))
        )
        assert sum(purged) == 160
        while await settlement.purge_payment_codes(ctx, limit=40):
            pass
    assert await _codes(db) == set()
    assert patient.token


def test_the_purge_runs_as_a_node_worker_without_plt_keys() -> None:
    worker = next(w for w in WORKERS if w.name == "payment-codes-purge")
    assert worker.run_once is settlement.purge_payment_codes
    assert not worker.needs_plt
    assert worker.interval_s == settlement.PURGE_INTERVAL_S
