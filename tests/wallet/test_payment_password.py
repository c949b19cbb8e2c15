"""The payment password, hardened (issue 9): a pepper outside the database, hashes upgraded
on the next successful check, no pooled connection held while scrypt runs, and a burst of
parallel guesses bounded by the lockout."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.conftest import TEST_PEPPER
from tests.support import PASSWORD, import_persons, open_wallet, person
from tests.wallet.service_context import wallet_context
from wallet.clock import ManualClock
from wallet.credentials import hash_password_sync, verify_password_sync
from wallet.errors import ErrorCode, WalletError
from wallet.otp import RecordingOtpSender
from wallet.payment_password import verify_payment_password

Client = AsyncTestClient[Litestar]
HOLDER = person(1, "张三丰")


async def opened(client: Client, otp: RecordingOtpSender) -> None:
    await import_persons(client, HOLDER)
    await open_wallet(client, otp, HOLDER)


async def test_a_hash_made_before_the_pepper_is_upgraded_on_the_next_success(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, database_url: str,
    clock: ManualClock,
) -> None:  # fmt: skip
    await opened(client, otp)
    legacy = hash_password_sync(PASSWORD, 2**8)
    await db.execute("UPDATE wallet SET password_hash = $1 WHERE person_id = 1", legacy)
    async with wallet_context(database_url, clock, otp) as ctx:
        with pytest.raises(WalletError) as wrong:
            await verify_payment_password(ctx, 1, "246802")
        assert wrong.value.code is ErrorCode.PAYMENT_PASSWORD_WRONG
        assert await db.fetchval("SELECT password_hash FROM wallet") == legacy  # not upgraded
        await verify_payment_password(ctx, 1, PASSWORD)
    stored = await db.fetchval("SELECT password_hash FROM wallet")
    assert stored.startswith(f"scrypt-hmac${TEST_PEPPER.id}$256$")
    assert verify_password_sync(PASSWORD, stored, TEST_PEPPER)
    assert await db.fetchval("SELECT failed_password_attempts FROM wallet") == 0
    # A dump alone is useless: without the pepper the hash cannot even be checked.
    with pytest.raises(RuntimeError):
        verify_password_sync(PASSWORD, stored, None)


async def test_without_its_pepper_a_node_answers_503_and_counts_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, database_url: str,
    clock: ManualClock,
) -> None:  # fmt: skip
    await opened(client, otp)
    async with wallet_context(database_url, clock, otp) as ctx:
        ctx = dataclasses.replace(ctx, password_pepper=None)
        with pytest.raises(WalletError) as refused:
            await verify_payment_password(ctx, 1, PASSWORD)
    assert refused.value.code is ErrorCode.SERVICE_UNAVAILABLE
    assert await db.fetchval("SELECT failed_password_attempts FROM wallet") == 0


async def test_the_kdf_runs_with_no_pooled_connection_held(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, database_url: str,
    clock: ManualClock,
) -> None:  # fmt: skip
    """With a pool of one connection, a query issued while scrypt runs completes first."""
    await opened(client, otp)
    slow = hash_password_sync(PASSWORD, 2**15, TEST_PEPPER)  # ~0.1 s of a core
    await db.execute("UPDATE wallet SET password_hash = $1", slow)
    async with wallet_context(database_url, clock, otp) as ctx:
        await ctx.pool.close()
        ctx.pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        try:
            done: dict[str, float] = {}

            async def check() -> None:
                await verify_payment_password(ctx, 1, PASSWORD)
                done["check"] = time.perf_counter()

            async def query() -> None:
                await asyncio.sleep(0.02)  # the check has reserved its attempt and is hashing
                assert await ctx.pool.fetchval("SELECT 1") == 1
                done["query"] = time.perf_counter()

            await asyncio.wait_for(asyncio.gather(check(), query()), timeout=30)
        finally:
            await ctx.pool.close()
    assert done["query"] < done["check"]


async def test_a_burst_of_parallel_guesses_runs_the_kdf_at_most_the_limit_times(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection, database_url: str,
    clock: ManualClock,
) -> None:  # fmt: skip
    await opened(client, otp)
    async with wallet_context(database_url, clock, otp) as ctx:
        results = await asyncio.gather(
            *(verify_payment_password(ctx, 1, f"{246802 + i:06d}") for i in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(r, WalletError) for r in results)
        errors = [r for r in results if isinstance(r, WalletError)]
        # Checked (the KDF ran): a wrong answer, or the lock its failure caused.
        checked = [
            e for e in errors
            if e.code is ErrorCode.PAYMENT_PASSWORD_WRONG or "cause" in e.extensions
        ]  # fmt: skip
        assert len(checked) == 5
        assert Counter(e.code for e in errors)[ErrorCode.PAYMENT_PASSWORD_LOCKED] >= 16
        # Locked now: even the right password is refused until the lockout passes.
        with pytest.raises(WalletError) as locked:
            await verify_payment_password(ctx, 1, PASSWORD)
        assert locked.value.code is ErrorCode.PAYMENT_PASSWORD_LOCKED
    assert await db.fetchval("SELECT locked_until IS NOT NULL FROM wallet")
