"""Shared fixtures: a real PostgreSQL and province nodes driven through their HTTP API.

One PostgreSQL server serves the whole session: the embedded one from the wheel, or the
server of `DATABASE_URL` when it is set. Migrations run once into a template database and
every test gets a fresh copy of it (CREATE DATABASE ... TEMPLATE), so tests never share
rows and never pay for migrations twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from nodes.app import create_app
from nodes.embedded_pg import EmbeddedPostgres
from nodes.migrate import migrate
from nodes.settings import Settings
from tests.support import OPERATOR_TOKEN
from wallet.clock import ManualClock
from wallet.credentials import Pepper
from wallet.otp import RecordingOtpSender

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "plt_test_template"

# 10:00 in Shanghai on a Monday: inside the grant hours, far from 06:00.
START = dt.datetime(2026, 3, 16, 2, 0, tzinfo=dt.UTC)
# Tests hash many passwords; a lower scrypt cost keeps them fast (the node default is 2**14).
TEST_SCRYPT_N = 2**8
TEST_PEPPER = Pepper(bytes(range(32)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: `DATABASE_URL`'s, or an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    server = EmbeddedPostgres(ROOT / "data" / f"test-pg-{os.getpid()}").start()
    try:
        yield server.dsn()
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def template_dsn(admin_dsn: str) -> str:
    async def build() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_database(admin_dsn, TEMPLATE_DB))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return _with_database(admin_dsn, TEMPLATE_DB)


async def create_test_database(admin_dsn: str) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    return _with_database(admin_dsn, name)


async def drop_test_database(admin_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    dsn = await create_test_database(admin_dsn)
    try:
        yield dsn
    finally:
        await drop_test_database(admin_dsn, dsn)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for setup and for asserting on rows."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def otp() -> RecordingOtpSender:
    return RecordingOtpSender()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        province_code="130000",
        node_id="prov-13",
        database_url=database_url,
        operator_token=OPERATOR_TOKEN,
        db_pool_min=1,
        db_pool_max=20,
    )


@pytest.fixture
async def client(
    settings: Settings, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    """The node's app, lifespan and all, behind an HTTP client."""
    app = create_app(
        settings, clock=clock, otp_sender=otp, scrypt_n=TEST_SCRYPT_N, password_pepper=TEST_PEPPER
    )
    async with AsyncTestClient(app=app, timeout=30) as test_client:
        yield test_client
