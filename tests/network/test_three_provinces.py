"""Three provinces in one process: a giver in Hebei with relatives in Shanghai and Sichuan.

Each node has its own database and keys and talks real HTTP with real signatures. The
giver's clearing positions are kept per peer, and his balance is one: two grants sent at
once to two provinces that together exceed it cannot both hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nodes.network import DEFAULT_PROVINCES, LocalNetwork
from protocol.ids import uuid7
from tests.conftest import TEMPLATE_DB, TEST_SCRYPT_N
from tests.network.grant_flow import credit
from tests.network.support import (
    GIVER_SEQ,
    RECEIVER_SEQ,
    Holder,
    app_post,
    cross_state,
    enrol,
    file_cross,
)
from tests.support import OPERATOR_TOKEN, PASSWORD
from wallet import ledger
from wallet.clock import ManualClock
from wallet.plt.quota import clearing_position

HEBEI, SHANGHAI, SICHUAN = "prov-13", "prov-31", "prov-51"


@pytest.fixture
async def net(
    admin_dsn: str, template_dsn: str, net_clock: ManualClock
) -> AsyncIterator[LocalNetwork]:
    async with LocalNetwork(
        provinces=DEFAULT_PROVINCES,
        admin_dsn=admin_dsn,
        template=TEMPLATE_DB,
        clock=net_clock,
        scrypt_n=TEST_SCRYPT_N,
        operator_token=OPERATOR_TOKEN,
    ) as network:
        yield network


async def _relative(net: LocalNetwork, giver: Holder, node_id: str, seq: int) -> tuple[Holder, str]:
    """A receiver at `node_id` with a confirmed cross-province relationship to `giver`."""
    receiver = await enrol(net[node_id], RECEIVER_SEQ + seq, "李小龙", scheme="resident")
    filed = await file_cross(giver, receiver)
    assert filed.status_code == 201, filed.text
    relation_id: str = filed.json()["relation_id"]
    await net.run_senders()
    confirmed = await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert confirmed.status_code == 200, confirmed.text
    await net.run_senders()
    assert await cross_state(net[HEBEI], relation_id) == "active"
    assert await cross_state(net[node_id], relation_id) == "active"
    return receiver, relation_id


async def _instruct(
    giver: Holder, relation_id: str, amount_fen: int
) -> tuple[int, dict[str, object]]:
    response = await app_post(
        giver,
        "/app/v1/grants",
        {
            "transfer_id": uuid7(),
            "relation_id": relation_id,
            "amount_fen": amount_fen,
            "payment_password": PASSWORD,
        },
    )
    return response.status_code, response.json()


async def test_two_simultaneous_grants_to_two_provinces_over_the_balance_hold_exactly_once(
    net: LocalNetwork,
) -> None:
    hebei = net[HEBEI]
    giver = await enrol(hebei, GIVER_SEQ, "张三丰")
    await credit(hebei, giver, 100_000)
    to_shanghai, shanghai_relation = await _relative(net, giver, SHANGHAI, 1)
    to_sichuan, sichuan_relation = await _relative(net, giver, SICHUAN, 2)

    results = await asyncio.gather(
        _instruct(giver, shanghai_relation, 70_000), _instruct(giver, sichuan_relation, 70_000)
    )

    codes = sorted(status for status, _ in results)
    assert codes == [202, 409], results
    refused = next(body for status, body in results if status == 409)
    assert refused["plt_code"] == 4000
    held = next(body for status, body in results if status == 202)
    assert held["state"] == "PREPARED_A"
    winner = SHANGHAI if held["relation_id"] == shanghai_relation else SICHUAN
    loser = SICHUAN if winner == SHANGHAI else SHANGHAI
    receiver = to_shanghai if winner == SHANGHAI else to_sichuan

    await net.run_senders()
    accepted = await app_post(
        receiver,
        f"/app/v1/grants/incoming/{held['transfer_id']}/accept",
        {"payment_password": PASSWORD},
    )
    assert accepted.status_code == 200, accepted.text
    await net.run_senders()

    async with hebei.ctx.pool.acquire() as conn:
        account = await conn.fetchval(
            "SELECT personal_account_id FROM insured_person WHERE id_number = $1", giver.id_number
        )
        balance = await ledger.balance(conn, account)
        to_winner = await clearing_position(conn, "due_to", winner)
        to_loser = await clearing_position(conn, "due_to", loser)
        assert (await ledger.check_books(conn)).balanced
    assert (balance.available_fen, balance.debits_pending) == (30_000, 0)
    assert (to_winner.posted_fen, to_winner.pending_fen) == (70_000, 0)
    assert (to_loser.posted_fen, to_loser.pending_fen) == (0, 0)
    async with net[winner].ctx.pool.acquire() as conn:
        from_hebei = await clearing_position(conn, "due_from", HEBEI)
        state = await conn.fetchval(
            "SELECT state FROM grant_in WHERE transfer_id = $1", held["transfer_id"]
        )
        assert (await ledger.check_books(conn)).balanced
    assert (state, from_hebei.posted_fen, from_hebei.pending_fen) == ("COMMITTED", -70_000, 0)
    # The province that got nothing never heard of a grant.
    assert await net[loser].ctx.pool.fetchval("SELECT count(*) FROM grant_in") == 0
