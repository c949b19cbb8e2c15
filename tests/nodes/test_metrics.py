"""/metrics: who may scrape, the exposition format, HTTP and worker counters, settlements."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient

from nodes.app import create_app
from nodes.settings import Settings
from nodes.workers import Worker, WorkerSet
from tests.conftest import TEST_SCRYPT_N
from tests.support import OPERATOR
from wallet import metrics
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.otp import RecordingOtpSender


def parse(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_need_the_operator_or_the_metrics_token(
    settings: Settings, clock: ManualClock, otp: RecordingOtpSender
) -> None:
    app = create_app(
        msgspec_replace(settings, metrics_token="scrape-me"),
        clock=clock,
        otp_sender=otp,
        scrypt_n=TEST_SCRYPT_N,
    )
    async with AsyncTestClient(app=app) as http:
        anonymous = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        scraper = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        operator = await http.get("/metrics", headers=OPERATOR)
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")
    assert (wrong.status_code, wrong.json()["code"]) == (401, "unauthorized")
    assert (scraper.status_code, operator.status_code) == (200, 200)


def msgspec_replace(settings: Settings, **changes: object) -> Settings:
    import msgspec

    return msgspec.structs.replace(settings, **changes)


async def test_a_scrape_counts_requests_by_route_and_reads_the_books(
    client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    label = 'plt_http_requests_total{method="GET",route="/health",status="200"}'
    before = parse((await client.get("/metrics", headers=OPERATOR)).text).get(label, 0)
    for _ in range(3):
        assert (await client.get("/health")).status_code == 200
    assert (await client.get("/app/v1/wallet")).status_code == 401
    response = await client.get("/metrics", headers=OPERATOR)
    assert response.headers["content-type"] == metrics.CONTENT_TYPE
    assert "# TYPE plt_http_requests_total counter" in response.text
    assert "# TYPE plt_grants_in_doubt gauge" in response.text
    samples = parse(response.text)
    assert samples[label] == before + 3
    assert samples['plt_http_requests_total{method="GET",route="/app/v1/wallet",status="401"}'] >= 1
    assert samples['plt_grants_in_doubt{side="giver"}'] == 0
    assert samples['plt_grants{side="receiver",state="COMMITTED"}'] == 0
    assert samples["plt_settlements"] == 0
    assert samples['plt_settlements_amount_fen{kind="settled"}'] == 0


def test_render_escapes_label_values() -> None:
    family = metrics.gauge("plt_x", "help", {(("peer", 'a"b\\c\nd'),): 2})
    text = metrics.render([family])
    assert text.endswith(
        '# HELP plt_x help\n# TYPE plt_x gauge\nplt_x{peer="a\\"b\\\\c\\nd"} 2.0\n'
    )


async def test_requests_are_timed_by_route_and_settlements_on_their_own(
    client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    count = 'plt_http_request_duration_seconds_count{method="GET",route="/health"}'
    slow = 'plt_http_request_duration_seconds_bucket{le="10.0",method="GET",route="/health"}'
    settled = 'plt_settlement_duration_seconds_count{status="400"}'
    before = parse((await client.get("/metrics", headers=OPERATOR)).text)
    for _ in range(2):
        assert (await client.get("/health")).status_code == 200
    # A malformed settlement is refused, and still timed as one.
    refused = await client.post("/institution/v1/settlements", json={})
    assert refused.status_code == 400, refused.text
    samples = parse((await client.get("/metrics", headers=OPERATOR)).text)
    assert samples[count] == before.get(count, 0) + 2
    assert samples[slow] == before.get(slow, 0) + 2
    assert samples[settled] == before.get(settled, 0) + 1
    assert (
        "# TYPE plt_grant_phase_seconds histogram"
        in (await client.get("/metrics", headers=OPERATOR)).text
    )


async def test_pool_usage_is_read_from_this_process_pool(
    settings: Settings, clock: ManualClock, otp: RecordingOtpSender
) -> None:
    # No background workers: nothing but the scrape itself uses the pool.
    quiet = msgspec_replace(settings, workers_enabled=False, db_pool_min=2, db_pool_max=7)
    app = create_app(quiet, clock=clock, otp_sender=otp, scrypt_n=TEST_SCRYPT_N)
    async with AsyncTestClient(app=app) as http:
        samples = parse((await http.get("/metrics", headers=OPERATOR)).text)
    assert samples["plt_db_pool_max_connections"] == 7
    # Read before the database gauges take their connection: every open one is idle.
    assert samples['plt_db_pool_connections{state="in_use"}'] == 0
    assert samples['plt_db_pool_connections{state="idle"}'] >= 2


async def test_a_registered_database_gauge_is_read_at_every_scrape(
    client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    async def wallets(scrape: metrics.ScrapeContext) -> list[metrics.Family]:
        n = await scrape.conn.fetchval("SELECT count(*) FROM account")
        return [metrics.gauge("plt_test_accounts", "Accounts (test).", {(): n})]

    metrics.register_database_gauges(wallets)
    try:
        first = parse((await client.get("/metrics", headers=OPERATOR)).text)
        second = parse((await client.get("/metrics", headers=OPERATOR)).text)
    finally:
        metrics.DATABASE_GAUGES.remove(wallets)
    assert first["plt_test_accounts"] == second["plt_test_accounts"] >= 0
    third = (await client.get("/metrics", headers=OPERATOR)).text
    assert "plt_test_accounts" not in third


async def test_worker_passes_are_counted_by_outcome(settings: Settings) -> None:
    passes = {"n": 0}
    done = asyncio.Event()

    async def busy_then_idle_then_broken(ctx: WalletContext) -> int:
        passes["n"] += 1
        if passes["n"] == 1:
            return 1
        if passes["n"] == 2:
            return 0
        done.set()
        raise RuntimeError("boom")

    name = "test-counting-worker"
    before = {
        o: metrics.COUNTERS.value(metrics.WORKER_RUNS, worker=name, outcome=o)
        for o in ("work", "idle", "error")
    }
    ctx = WalletContext(
        province_code="130000", node_id="prov-13", pool=None, otp_sender=RecordingOtpSender()
    )  # type: ignore[arg-type]
    workers = WorkerSet(ctx, [Worker(name, busy_then_idle_then_broken, 0.01, needs_plt=False)])
    workers.start()
    await asyncio.wait_for(done.wait(), timeout=10)
    await workers.stop()
    after = {
        o: metrics.COUNTERS.value(metrics.WORKER_RUNS, worker=name, outcome=o)
        for o in ("work", "idle", "error")
    }
    assert {o: after[o] - before[o] for o in after} == {"work": 1, "idle": 1, "error": 1}
