"""Cross-province grants between two real nodes over HTTP (prov-13 gives, prov-31 receives).

Each test files and confirms a relationship, then walks a grant through the protocol with
exact balances on both ledgers at every step, and ends with the bank-style checker.
Workers are off: `run_senders()` delivers the outboxes, the sweeper runs when called.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodes import cli
from nodes.network import LocalNetwork
from protocol.directory import encode_peers
from tests.network.grant_flow import (
    Pair,
    answer,
    check_books,
    expect_money,
    giver_view,
    grant,
    instruct,
    linked_pair,
    set_clock,
    states,
)
from tests.network.support import app_get, app_post, client
from tests.support import OPERATOR, PASSWORD
from wallet.clock import ManualClock
from wallet.plt import grants
from wallet.plt.receipts import verify_receipt

pytestmark = pytest.mark.network

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def pharmacy_key(pair: Pair) -> str:
    async with client(pair.b) as http:
        response = await http.post(
            "/operator/v1/institutions",
            json={
                "code": "ph-31-001",
                "name": "上海某药房",
                "kind": "pharmacy",
                "categories": ["pharmacy_drug"],
            },
            headers=OPERATOR,
        )
        assert response.status_code == 201, response.text
        key: str = response.json()["api_key"]
        return key


async def pay_at_pharmacy(pair: Pair, api_key: str, amount_fen: int, reference: str) -> dict:  # type: ignore[type-arg]
    code = await app_post(pair.receiver, "/app/v1/payment-codes")
    assert code.status_code == 201, code.text
    async with client(pair.b) as http:
        response = await http.post(
            "/institution/v1/settlements",
            json={
                "payment_code": code.json()["code"],
                "amount_fen": amount_fen,
                "category": "pharmacy_drug",
                "reference": reference,
            },
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert response.status_code == 201, response.text
    result: dict = response.json()  # type: ignore[type-arg]
    return result


async def test_grant_accept_spend_end_and_the_unused_quota_goes_home(
    pair: Pair, tmp_path: Path
) -> None:
    network = pair.network
    await expect_money(pair, giver=500_000)
    tid = await grant(pair, 100_000)
    await expect_money(pair, giver=400_000, held=100_000)
    offered = (await app_get(pair.receiver, "/app/v1/grants/incoming")).json()
    assert [(g["transfer_id"], g["state"], g["acceptable"]) for g in offered] == [
        (tid, "PENDING_ACCEPT", True)
    ]
    assert (await giver_view(pair, tid))["receiver_seen"] is True

    accepted = await answer(pair, tid)
    assert accepted.status_code == 200, accepted.text
    await network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await expect_money(pair, giver=400_000, frozen=100_000, quota=100_000)
    view = await giver_view(pair, tid)
    assert (view["state"], view["acknowledged"]) == ("COMMITTED", True)
    await check_books(network)

    # The receiver pays 30,000 at a pharmacy in Shanghai: no own personal account
    # (resident scheme), so all of it comes from the quota.
    key = await pharmacy_key(pair)
    paid = await pay_at_pharmacy(pair, key, 30_000, "rx-1")
    assert [(s["source"], s["amount_fen"]) for s in paid["sources"]] == [("quota", 30_000)]
    await expect_money(pair, giver=400_000, frozen=100_000, quota=70_000)
    quotas = (await app_get(pair.receiver, "/app/v1/quotas")).json()
    assert (quotas["granted_fen"], quotas["used_fen"], quotas["available_fen"]) == (
        100_000,
        30_000,
        70_000,
    )

    # The receipt of the committed grant verifies offline with the two pinned roots.
    receipt = await app_get(pair.giver, f"/app/v1/grants/{tid}/receipt")
    assert receipt.status_code == 200, receipt.text
    roots = {n.node_id: (n.keys.root.kid, n.keys.root.public_b64) for n in (pair.a, pair.b)}
    verdict = verify_receipt(receipt.json(), roots)
    assert verdict.valid, verdict.problems
    assert (verdict.amount_fen, verdict.outcome) == (100_000, "COMMIT")
    tampered = verify_receipt({**receipt.json(), "amount_fen": 1_000_000}, roots)
    assert not tampered.valid
    # The operator's offline check: `plt-node receipt verify FILE --peers peers.json`.
    (tmp_path / "receipt.json").write_bytes(receipt.content)
    (tmp_path / "peers.json").write_bytes(
        encode_peers([n.keys.peer_entry(n.url) for n in (pair.a, pair.b)])
    )
    args = ["receipt", "verify", str(tmp_path / "receipt.json"), "--peers"]
    assert await asyncio.to_thread(cli.main, [*args, str(tmp_path / "peers.json")]) == 0
    (tmp_path / "other.json").write_bytes(encode_peers([pair.b.keys.peer_entry(pair.b.url)]))
    assert await asyncio.to_thread(cli.main, [*args, str(tmp_path / "other.json")]) == 1

    # The giver ends the relationship: B closes the quota, releases 70,000, A returns it.
    ended = await app_post(
        pair.giver,
        f"/app/v1/cross-relationships/{pair.relation_id}/end",
        {"payment_password": PASSWORD},
    )
    assert ended.status_code == 200, ended.text
    await network.run_senders()
    await expect_money(pair, giver=470_000, frozen=30_000, quota=0)
    assert (await giver_view(pair, tid))["released_fen"] == 70_000
    quotas = (await app_get(pair.receiver, "/app/v1/quotas")).json()
    assert [(q["state"], q["used_fen"], q["released_fen"]) for q in quotas["quotas"]] == [
        ("closed", 30_000, 70_000)
    ]
    # A refund of the spent part after the close goes to the quota, and on to the giver.
    async with client(pair.b) as http:
        refund = await http.post(
            "/institution/v1/settlements/rx-1/refunds",
            json={"reference": "rf-1", "amount_fen": 10_000},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert refund.status_code == 201, refund.text
    await network.run_senders()
    await expect_money(pair, giver=480_000, frozen=20_000, quota=0)


async def test_the_receiver_declines_and_the_amount_comes_back(pair: Pair) -> None:
    tid = await grant(pair, 50_000)
    declined = await answer(pair, tid, "decline")
    assert declined.status_code == 200, declined.text
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    view = await giver_view(pair, tid)
    assert (view["state"], view["code"]) == ("ABORTED", 5104)
    await expect_money(pair, giver=500_000)


async def test_an_unaccepted_grant_expires_at_06_00(pair: Pair, net_clock: ManualClock) -> None:
    tid = await grant(pair, 50_000)
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 17, 5, 59, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(pair.a.ctx) == 0
    await expect_money(pair, giver=450_000, held=50_000)
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 17, 6, 1, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(pair.a.ctx) == 1
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    await expect_money(pair, giver=500_000)
    offered = (await app_get(pair.receiver, "/app/v1/grants/incoming")).json()
    assert (offered[0]["state"], offered[0]["code"]) == ("ABORTED", 3303)


async def test_the_sweeper_aborts_a_batch_exactly_as_one_at_a_time(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    pairs = [await linked_pair(network, seq=seq) for seq in range(3)]
    tids = [await grant(pair, 10_000 * (n + 1)) for n, pair in enumerate(pairs)]
    a = network["prov-13"]
    net_clock.set(dt.datetime(2026, 3, 17, 6, 1, tzinfo=SHANGHAI))
    assert await grants.sweeper_run_once(a.ctx) == 3
    audit = await a.ctx.pool.fetch(
        "SELECT subject, detail->>'amount_fen' AS fen, detail->>'code' AS code, "
        "detail->>'peer' AS peer FROM audit_event WHERE action = 'grant.abort' ORDER BY subject"
    )
    assert [dict(r) for r in audit] == sorted(
        [
            {"subject": f"grant:{tid}", "fen": str(10_000 * (n + 1)), "code": "3303"}
            | {"peer": "prov-31"}
            for n, tid in enumerate(tids)
        ],
        key=lambda r: r["subject"],
    )
    queued = await a.ctx.pool.fetch(
        "SELECT typ, dedup_key, done_at IS NOT NULL AS done FROM plt_outbox"
        " WHERE typ IN ('PREPARE', 'DECISION') ORDER BY typ, dedup_key"
    )
    assert [(r["typ"], r["dedup_key"], r["done"]) for r in queued] == [
        ("DECISION", tid, False) for tid in sorted(tids)
    ] + [("PREPARE", tid, True) for tid in sorted(tids)]
    await network.run_senders()
    for pair, tid in zip(pairs, tids, strict=True):
        assert await states(pair, tid) == ("ABORTED", "ABORTED")
        await expect_money(pair, giver=500_000)
    assert await grants.sweeper_run_once(a.ctx) == 0
    await check_books(network)


async def test_an_accept_that_reaches_a_after_its_deadline_aborts(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 50_000)
    # Accepted at 05:57 B-time (still offered: two minutes' margin) ...
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 17, 5, 57, tzinfo=SHANGHAI))
    assert (await answer(pair, tid)).status_code == 200
    # ... but the link is slow: the ACCEPT reaches A at 06:00:00.001.
    await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(milliseconds=1))
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    assert (await giver_view(pair, tid))["code"] == 3303
    await expect_money(pair, giver=500_000)


async def test_grant_limits_over_the_network(pair: Pair, net_clock: ManualClock) -> None:
    over = await instruct(pair, 200_001)
    assert (over.status_code, over.json()["plt_code"]) == (422, 4200)
    first = await grant(pair, 200_000)
    pending = await instruct(pair, 1_000)  # one pending grant per pair
    assert (pending.status_code, pending.json()["plt_code"]) == (422, 4200)
    await answer(pair, first)
    await pair.network.run_senders()
    await grant(pair, 1_000)
    # The third of the day, then the limit.
    second = (await app_get(pair.giver, "/app/v1/grants")).json()[0]["transfer_id"]
    await answer(pair, second, "decline")
    await pair.network.run_senders()  # declined: no longer counts
    third = await grant(pair, 1_000)
    await answer(pair, third)
    await pair.network.run_senders()
    await grant(pair, 1_000)
    fourth = await instruct(pair, 1_000)
    assert fourth.status_code == 422, fourth.text  # pending pair or the daily limit
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 16, 22, 0, tzinfo=SHANGHAI))
    night = await instruct(pair, 1_000)
    assert (night.json()["plt_code"], night.json()["plt_class"]) == (4300, "T")


async def test_a_node_restarts_between_steps_and_the_flow_completes(
    pair: Pair, net_clock: ManualClock
) -> None:
    network = pair.network
    await network.stop_node("prov-31")
    response = await instruct(pair, 60_000)
    assert response.status_code == 202
    tid = response.json()["transfer_id"]
    await network.run_senders()  # B is down: the PREPARE waits in A's outbox
    await network.start_node("prov-31")
    net_clock.advance(seconds=1)  # past the first retry delay
    await network.run_senders()
    assert await states(pair, tid) == ("PREPARED_A", "PENDING_ACCEPT")
    await network.stop_node("prov-13")
    assert (await answer(pair, tid)).status_code == 200
    await network.run_senders()  # A is down: the ACCEPT waits in B's outbox
    await network.start_node("prov-13")
    net_clock.advance(seconds=1)
    await network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    await expect_money(pair, giver=440_000, frozen=60_000, quota=60_000)
