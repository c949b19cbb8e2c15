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
    assert metrics.render([family]) == (
        '# HELP plt_x help\n# TYPE plt_x gauge\nplt_x{peer="a\\"b\\\\c\\nd"} 2\n'
    )


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
