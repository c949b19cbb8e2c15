"""The push worker against a real HTTP endpoint standing in for the province's push vendor:
HMAC-signed bodies with nothing personal in them, an endpoint that is down or slow (nothing
lost, retried with backoff, given up after the bound), and the gauges in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import asyncpg
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from nodes.settings import Settings, SettingsError
from tests.support import OPERATOR, person
from tests.wallet.service_context import wallet_context
from tests.wallet.test_settlement import member
from wallet import metrics, push
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]
KEY = b"vendor-shared-secret-0123456789"
Mode = Literal["ok", "error", "slow"]


@dataclass
class Vendor:
    """A minimal HTTP/1.1 server: records each POST, answers by `mode`."""

    mode: Mode = "ok"
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/push"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if self.mode == "slow":
            await asyncio.sleep(2)
        self.received.append((headers, body))
        status = "204 No Content" if self.mode == "ok" else "503 Service Unavailable"
        writer.write(
            f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def vendor_running(vendor: Vendor) -> AsyncIterator[Vendor]:
    server = await asyncio.start_server(vendor.handle, "127.0.0.1", vendor.port)
    vendor.port = server.sockets[0].getsockname()[1]
    try:
        yield vendor
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=1)


def webhook(ctx: WalletContext, url: str, **bounds: Any) -> None:
    """Point the context's pushes at `url` (HMAC key KEY), with these retry bounds."""
    ctx.notifications = msgspec.structs.replace(
        ctx.notifications,
        push_sender="webhook",
        push_webhook_url=url,
        push_hmac_key=KEY,
        **bounds,
    )
    push.use_sender(ctx, push.sender_for(ctx.notifications))


@contextlib.asynccontextmanager
async def credited(
    client: Client, otp: RecordingOtpSender, database_url: str, clock: ManualClock
) -> AsyncIterator[WalletContext]:
    """A holder with one `credit.arrived` notification, and a service context beside the app
    (whose own push worker is off in these tests: `settings` below)."""
    await member(client, otp, 1, "张三丰", fen=8_800)
    async with wallet_context(database_url, clock, otp) as ctx:
        yield ctx


@pytest.fixture
def settings(database_url: str) -> Settings:
    """The app without background workers: the tests run the push pass themselves."""
    return Settings(
        province_code="130000",
        node_id="prov-13",
        database_url=database_url,
        operator_token="op-test-token",
        db_pool_min=1,
        db_pool_max=20,
        workers_enabled=False,
    )


async def push_rows(db: asyncpg.Connection) -> list[tuple[str, int, str | None]]:
    rows = await db.fetch(
        "SELECT push_state, push_attempts, push_last_error FROM notification ORDER BY id"
    )
    return [(r["push_state"], r["push_attempts"], r["push_last_error"]) for r in rows]


async def test_a_webhook_push_is_hmac_signed_and_carries_nothing_personal(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    async with credited(client, otp, database_url, clock) as ctx, vendor_running(Vendor()) as v:
        webhook(ctx, v.url)
        assert await push.run_once(ctx) == 1
        assert await push.run_once(ctx) == 0
    [(headers, body)] = v.received
    timestamp, mac = (part.split("=", 1)[1] for part in headers["x-plt-signature"].split(","))
    expected = hmac.new(KEY, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected)
    assert headers["x-plt-delivery"] == f"prov-13:{json.loads(body)['notification']['id']}"
    sent = json.loads(body)
    assert (sent["recipient"], sent["node"]) == ("person-1", "prov-13")
    assert (sent["notification"]["kind"], sent["notification"]["amount_fen"]) == (
        "credit.arrived",
        8_800,
    )
    holder = person(1, "张三丰")
    assert holder["id_number"].encode() not in body and "张三丰".encode() not in body
    assert await push_rows(db) == [("sent", 1, None)]


async def test_an_endpoint_that_is_down_is_retried_with_backoff_and_nothing_is_lost(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    down = Vendor()
    async with vendor_running(down):
        pass  # the port is free again: connections are refused
    async with credited(client, otp, database_url, clock) as ctx:
        webhook(ctx, down.url, push_backoff_s_min=10.0, push_backoff_s_max=15.0)
        assert await push.run_once(ctx) == 1
        [(state, attempts, error)] = await push_rows(db)
        assert (state, attempts) == ("pending", 1) and error
        assert await push.run_once(ctx) == 0  # not due before its backoff
        clock.advance(seconds=10)
        assert await push.run_once(ctx) == 1  # second failure: next in 15 s (the cap)
        next_at = await db.fetchval("SELECT push_next_at FROM notification")
        assert next_at == clock.now() + dt.timedelta(seconds=15)
        async with vendor_running(Vendor()) as up:
            webhook(ctx, up.url, push_backoff_s_min=10.0, push_backoff_s_max=15.0)
            clock.advance(seconds=15)
            assert await push.run_once(ctx) == 1
    assert len(up.received) == 1
    assert await push_rows(db) == [("sent", 3, None)]


async def test_a_slow_endpoint_times_out_and_the_node_keeps_answering(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    async with (
        credited(client, otp, database_url, clock) as ctx,
        vendor_running(Vendor(mode="slow")) as v,
    ):
        webhook(ctx, v.url, push_timeout_s=0.3)
        pushing = asyncio.create_task(push.run_once(ctx))
        await asyncio.sleep(0.05)
        # While the push waits on the vendor, the node's API and database are free.
        health = await client.get("/health")
        credit = await client.post(
            "/operator/v1/credit-batches",
            json={
                "batch_id": "b-2",
                "month": "2026-04",
                "credits": [{"id_number": person(1, "张三丰")["id_number"], "amount_fen": 1}],
            },
            headers=OPERATOR,
        )
        assert (health.status_code, credit.status_code) == (200, 201)
        assert not pushing.done()
        assert await asyncio.wait_for(pushing, timeout=5) == 1
    [(state, attempts, error), second] = await push_rows(db)
    assert (state, attempts) == ("pending", 1)
    assert error is not None and "Timeout" in error
    assert second == ("pending", 0, None)


async def test_a_push_is_given_up_after_its_attempts_and_counted_in_the_metrics(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    async with (
        credited(client, otp, database_url, clock) as ctx,
        vendor_running(Vendor(mode="error")) as v,
    ):
        before = await _gauges(ctx)
        assert before["plt_push_backlog"] == 1
        clock.advance(seconds=30)
        assert (await _gauges(ctx))["plt_push_oldest_unsent_age_seconds"] == 30
        webhook(ctx, v.url, push_attempts_max=2, push_backoff_s_min=1.0)
        assert await push.run_once(ctx) == 1
        assert (await _gauges(ctx))["plt_push_retrying"] == 1
        clock.advance(seconds=1)
        assert await push.run_once(ctx) == 1
        clock.advance(hours=1)
        assert await push.run_once(ctx) == 0
        after = await _gauges(ctx)
    assert len(v.received) == 2
    assert [(s, a) for s, a, _ in await push_rows(db)] == [("failed", 2)]
    assert after == {
        "plt_push_backlog": 0,
        "plt_push_oldest_unsent_age_seconds": 0,
        "plt_push_retrying": 0,
        "plt_push_failed": 1,
    }
    scraped = await client.get("/metrics", headers=OPERATOR)
    assert scraped.status_code == 200
    assert "\nplt_push_failed 1.0\n" in scraped.text  # prometheus_client writes floats
    assert "\nplt_push_backlog 0.0\n" in scraped.text


async def _gauges(ctx: WalletContext) -> dict[str, float]:
    families = await metrics.database_gauges(ctx)
    return {f.name: f.samples[()] for f in families if f.name.startswith("plt_push_")}


def test_a_webhook_sender_needs_its_url_and_key(tmp_path: Any) -> None:
    with pytest.raises(SettingsError, match="push_webhook_url"):
        Settings(push_sender="webhook").notification_settings()
    key_file = tmp_path / "push.key"
    key_file.write_bytes(KEY + b"\n")
    config = Settings(
        push_sender="webhook",
        push_webhook_url="https://push.example/v1",
        push_hmac_key_file=str(key_file),
    ).notification_settings()
    assert (config.push_hmac_key, config.push_sender) == (KEY, "webhook")
    with pytest.raises(SettingsError, match="push_hmac_key_file"):
        Settings(push_hmac_key_file=str(tmp_path / "missing.key")).notification_settings()


class RecordingSender:
    """A push sender that takes a while and records what it was given."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    async def send(self, message: push.PushMessage) -> None:
        await asyncio.sleep(0.1)
        self.ids.append(message.notification.id)


async def test_replicas_share_the_backlog_and_push_each_row_once(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    holder = await member(client, otp, 1, "张三丰")
    for n in range(10):
        response = await client.post(
            "/operator/v1/credit-batches",
            json={
                "batch_id": f"b-{n}",
                "month": "2026-03",
                "credits": [{"id_number": holder.id_number, "amount_fen": 1}],
            },
            headers=OPERATOR,
        )
        assert response.status_code == 201, response.text
    async with (
        wallet_context(database_url, clock, otp) as one,
        wallet_context(database_url, clock, otp) as two,
    ):
        senders = [RecordingSender(), RecordingSender()]
        for ctx, sender in zip((one, two), senders, strict=True):
            ctx.notifications = msgspec.structs.replace(ctx.notifications, push_batch_max=5)
            push.use_sender(ctx, sender)
        handled = await asyncio.gather(push.run_once(one), push.run_once(two))
    assert handled == [5, 5]
    assert sorted(senders[0].ids + senders[1].ids) == list(range(1, 11))
    assert await push_rows(db) == [("sent", 1, None)] * 10


@dataclass
class FailsFor:
    """A push service that refuses the pushes to one recipient and takes the others."""

    recipient: str
    taken: list[str] = field(default_factory=list)

    async def send(self, message: push.PushMessage) -> None:
        if message.recipient == self.recipient:
            raise push.PushFailed("recipient unknown to the vendor")
        self.taken.append(message.recipient)


async def test_one_failed_push_in_a_pass_leaves_the_delivered_ones_sent(
    client: Client,
    otp: RecordingOtpSender,
    database_url: str,
    clock: ManualClock,
    db: asyncpg.Connection,
) -> None:
    await member(client, otp, 1, "张三丰", fen=8_800)
    await member(client, otp, 2, "李四", fen=100)
    await member(client, otp, 3, "王五", fen=200)
    people = [
        r["person_id"] for r in await db.fetch("SELECT person_id FROM notification ORDER BY id")
    ]
    assert len(people) == 3
    failing = FailsFor(f"person-{people[1]}")
    async with wallet_context(database_url, clock, otp) as ctx:
        push.use_sender(ctx, failing)
        assert await push.run_once(ctx) == 3
    assert sorted(failing.taken) == sorted(f"person-{p}" for p in (people[0], people[2]))
    assert await push_rows(db) == [
        ("sent", 1, None),
        ("pending", 1, "PushFailed('recipient unknown to the vendor')"),
        ("sent", 1, None),
    ]
    done = await db.fetch("SELECT push_done_at FROM notification ORDER BY id")
    assert [r["push_done_at"] for r in done] == [clock.now(), None, clock.now()]
