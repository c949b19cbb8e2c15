"""A WalletContext on the test's own event loop, for calling services directly.

The app behind `client` runs its pool on the test client's loop; services called from a test
need a pool of their own on the same database.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from tests.conftest import TEST_PEPPER, TEST_SCRYPT_N
from wallet.clock import Clock
from wallet.context import OtpSender, WalletContext


async def _utc(conn: asyncpg.Connection) -> None:
    await conn.execute("SET TIME ZONE 'UTC'")


@contextlib.asynccontextmanager
async def wallet_context(
    database_url: str, clock: Clock, otp_sender: OtpSender
) -> AsyncIterator[WalletContext]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, init=_utc)
    try:
        yield WalletContext(
            province_code="130000",
            node_id="prov-13",
            pool=pool,
            otp_sender=otp_sender,
            clock=clock,
            scrypt_n=TEST_SCRYPT_N,
            password_pepper=TEST_PEPPER,
        )
    finally:
        await pool.close()
