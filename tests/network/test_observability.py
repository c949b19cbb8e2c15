"""Observability over a real network: /metrics and /ready while a peer is down and after.

Two givers at A (prov-13) grant to two receivers at B (prov-31); both receivers accept
while A is down, and A stays down across the 06:00 deadline. B's in-doubt gauge rises to
exactly 2, its outbox holds the two ACCEPTs for A, and /ready says "degraded" naming A.
When A is back and the senders run, the late ACCEPTs are answered with ABORT (3303) and
every gauge falls back to 0.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.clock import RESOLVER_GRACE_MS
from tests.network.grant_flow import (
    A,
    B,
    answer,
    check_books,
    grant,
    instruct,
    linked_pair,
    set_clock,
    states,
)
from tests.network.support import client
from tests.support import OPERATOR
from wallet import metrics
from wallet.clock import ManualClock
from wallet.readiness import PROBE_TTL_MS

pytestmark = pytest.mark.network

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)


async def scrape(node: LocalNode) -> dict[str, float]:
    """`/metrics` as {'name{labels}': value}, checking the exposition format on the way."""
    async with client(node) as http:
        response = await http.get("/metrics", headers=OPERATOR)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


async def ready(node: LocalNode) -> dict[str, Any]:
    async with client(node) as http:
        response = await http.get("/ready")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def in_doubt(samples: dict[str, float], side: str) -> float:
    return samples[f'plt_grants_in_doubt{{side="{side}"}}']


async def test_grants_in_doubt_rise_while_a_peer_is_down_and_fall_after(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    first = await linked_pair(network, seq=0)
    second = await linked_pair(network, seq=1)
    a, b = network[A], network[B]
    tids = [await grant(first, 80_000), await grant(second, 60_000)]
    before = await scrape(b)
    assert in_doubt(before, "receiver") == 0
    assert before['plt_grants{side="receiver",state="PENDING_ACCEPT"}'] == 2
    assert before['plt_grants_amount_fen{side="receiver",state="PENDING_ACCEPT"}'] == 140_000
    assert (await ready(b))["status"] == "ready"

    await network.stop_node(A)
    for pair, tid in zip((first, second), tids, strict=True):
        assert (await answer(pair, tid)).status_code == 200
    await network.run_senders()  # A is down: both ACCEPTs wait in B's outbox
    await set_clock(
        first, net_clock, DECIDE_BY + dt.timedelta(milliseconds=RESOLVER_GRACE_MS, minutes=1)
    )
    down = await scrape(b)
    assert in_doubt(down, "receiver") == 2
    assert down['plt_grants{side="receiver",state="ACCEPTED"}'] == 2
    assert down[f'plt_outbox_unsent{{peer="{A}"}}'] == 2
    assert down[f'plt_outbox_oldest_unsent_age_seconds{{peer="{A}"}}'] > 0
    degraded = await ready(b)
    assert degraded["status"] == "degraded"
    assert [(p["node"], p["reachable"]) for p in degraded["peers"]] == [(A, False)]

    await network.start_node(A)
    net_clock.advance(milliseconds=PROBE_TTL_MS)
    back_at_a = await scrape(a)
    assert in_doubt(back_at_a, "giver") == 2  # past decide_by, not swept yet
    assert back_at_a['plt_grants{side="giver",state="PREPARED_A"}'] == 2
    await network.run_senders()  # the late ACCEPTs get ABORT 3303; B applies it

    after_b, after_a = await scrape(b), await scrape(a)
    assert (in_doubt(after_b, "receiver"), in_doubt(after_a, "giver")) == (0, 0)
    assert after_b['plt_grants{side="receiver",state="ABORTED"}'] == 2
    assert after_a['plt_grants{side="giver",state="ABORTED"}'] == 2
    assert after_b[f'plt_outbox_unsent{{peer="{A}"}}'] == 0
    assert after_a[f'plt_outbox_unsent{{peer="{B}"}}'] == 0
    back = await ready(b)
    assert back["status"] == "ready"
    assert [(p["node"], p["reachable"], p["outbox_unsent"]) for p in back["peers"]] == [
        (A, True, 0)
    ]
    await check_books(network)


def phase(name: str, stat: str) -> float:
    """A sample of this process's grant-phase histogram (both nodes run in this process)."""
    value = metrics.REGISTRY.get_sample_value(f"plt_grant_phase_seconds_{stat}", {"phase": name})
    return value or 0.0


async def test_each_phase_of_a_grant_cycle_is_timed_once_at_the_giver(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    pair = await linked_pair(network, seq=7)
    before = {(p, s): phase(p, s) for p in metrics.PHASES for s in ("count", "sum")}
    response = await instruct(pair, 30_000)
    assert response.status_code == 202, response.text
    tid = response.json()["transfer_id"]
    net_clock.advance(milliseconds=1_500)  # the PREPARE waits 1.5 s in A's outbox
    await network.run_senders()
    assert (await answer(pair, tid)).status_code == 200
    net_clock.advance(milliseconds=2_500)  # the ACCEPT waits 2.5 s in B's outbox
    await network.run_senders()  # ACCEPT, DECISION and its ACK
    await network.run_senders()  # a duplicate delivery would be observed here: none is
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    delta = {key: phase(*key) - value for key, value in before.items()}
    assert delta == {
        ("prepare_to_received", "count"): 1,
        ("prepare_to_received", "sum"): 1.5,
        ("accept_to_decision", "count"): 1,
        ("accept_to_decision", "sum"): 2.5,
        ("decision_to_ack", "count"): 1,
        ("decision_to_ack", "sum"): 0.0,
    }
    await check_books(network)
