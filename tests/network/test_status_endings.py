"""Death and loss of insurance across provinces (RULES 6-7): a change of insured status at
either person's node ends the cross-province relationship on BOTH nodes through PLT/1
(REL_END), declines the grant still pending (A aborts it and the giver gets it back) and
closes the receiver's quota, whose unused part goes back to the giver's personal account
(RELEASE), to the fen. What was spent stays spent.

Each case: a committed grant of 1,000.00 of which 300.00 was spent at a pharmacy, and a
second grant of 500.00 still waiting for the receiver when the status changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodes import cli
from nodes.network import LocalNetwork
from tests.network.grant_flow import (
    Pair,
    answer,
    check_books,
    expect_money,
    giver_view,
    grant,
    linked_pair,
    states,
)
from tests.network.support import client, cross_state, rows
from tests.network.test_console import console_config, wide_console
from tests.network.test_grants import pay_at_pharmacy, pharmacy_key
from tests.support import OPERATOR
from wallet.clock import ManualClock

pytestmark = [pytest.mark.network, pytest.mark.anyio, pytest.mark.usefixtures("wide_console")]
_ = wide_console  # the fixture, imported for `usefixtures`


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def committed_spent_and_pending(pair: Pair) -> tuple[str, str]:
    """1,000.00 committed (300.00 spent), 500.00 pending: the state every case starts in."""
    first = await grant(pair, 100_000)
    assert (await answer(pair, first)).status_code == 200
    await pair.network.run_senders()
    paid = await pay_at_pharmacy(pair, await pharmacy_key(pair), 30_000, "rx-1")
    charged = await rows(
        pair.b,
        "SELECT actor, (detail->>'amount_fen')::bigint AS fen, detail->'sources'->0->>'source' AS src"
        " FROM audit_event WHERE action = 'settlement.charge' AND subject = $1",
        f"settlement:{paid['settlement_id']}",
    )
    assert [(r["fen"], r["src"]) for r in charged] == [(30_000, "quota")]
    assert charged[0]["actor"].startswith("institution:")
    second = await grant(pair, 50_000)
    assert await states(pair, first) == ("COMMITTED", "COMMITTED")
    assert await states(pair, second) == ("PREPARED_A", "PENDING_ACCEPT")
    await expect_money(pair, giver=350_000, held=50_000, frozen=100_000, quota=70_000)
    return first, second


async def expect_ended_and_returned(pair: Pair, first: str, second: str) -> None:
    assert await cross_state(pair.a, pair.relation_id) == "ended"
    assert await cross_state(pair.b, pair.relation_id) == "ended"
    assert await states(pair, second) == ("ABORTED", "ABORTED")
    assert await states(pair, first) == ("COMMITTED", "COMMITTED")
    quota = await rows(
        pair.b, "SELECT state, granted_fen, released_fen FROM quota WHERE transfer_id = $1", first
    )
    assert quota == [{"state": "closed", "granted_fen": 100_000, "released_fen": 70_000}]
    # 500.00 aborted + 700.00 released; the 300.00 spent stays with the pharmacy.
    await expect_money(pair, giver=470_000, frozen=30_000, quota=0)


@pytest.mark.parametrize(
    ("whose", "status"),
    [
        ("giver", "deceased"),
        ("giver", "terminated"),
        ("receiver", "deceased"),
        ("receiver", "terminated"),
    ],
)
async def test_a_status_change_at_either_node_ends_it_on_both_and_returns_unused_quota(
    pair: Pair, whose: str, status: str
) -> None:
    first, second = await committed_spent_and_pending(pair)
    person = pair.giver if whose == "giver" else pair.receiver
    async with client(person.node) as http:
        response = await http.patch(
            f"/operator/v1/persons/{person.id_number}", json={"status": status}, headers=OPERATOR
        )
    assert response.status_code == 200, response.text
    await pair.network.run_senders()
    await expect_ended_and_returned(pair, first, second)
    view = await giver_view(pair, first) if whose == "receiver" else None
    if view is not None:
        assert view["released_fen"] == 70_000
    ended_by = await rows(
        pair.a,
        "SELECT ended_by FROM cross_relationship WHERE relation_id = $1",
        pair.relation_id,
    )
    assert ended_by == [{"ended_by": "system"}]


async def test_a_death_recorded_with_the_console_at_the_receivers_node(
    pair: Pair, tmp_path: Path, net_clock: ManualClock
) -> None:
    first, second = await committed_spent_and_pending(pair)
    config = console_config(tmp_path, pair.network, pair.b)
    argv = ["--config", config, "person", "status", pair.receiver.id_number, "deceased"]
    assert await asyncio.to_thread(cli.main, [*argv, "--actor", "ops-zhao"]) == 0
    # The console stamps its messages with the system clock: bring the network there.
    # (No new sessions: the receiver can no longer log in.)
    net_clock.set(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    await pair.network.run_senders()
    await expect_ended_and_returned(pair, first, second)
    audited = await rows(
        pair.b,
        "SELECT actor, detail->>'status_after' AS status FROM audit_event"
        " WHERE action = 'person.set_status'",
    )
    assert audited == [{"actor": "ops-zhao", "status": "deceased"}]
