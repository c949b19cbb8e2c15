"""The network checker (`nodes.checker`, `plt-node check-network`) on two real nodes.

It runs here without Docker, on the in-process network, so it is exercised everywhere; the
container tier runs it after every scenario. Each test also shows that it can fail: a
ledger edited behind the ledger's back, clearing positions that no longer mirror, a grant
still in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nodes import cli
from nodes.checker import check_network
from nodes.network import LocalNetwork
from tests.network.grant_flow import A, B, Pair, answer, grant, instruct, linked_pair
from wallet import ledger
from wallet.plt.quota import clearing_account, open_account_on_demand

pytestmark = pytest.mark.network


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    yield await linked_pair(network)


def dsns(network: LocalNetwork) -> dict[str, str]:
    return {node_id: node.database_url for node_id, node in network.nodes.items()}


async def committed_grant(pair: Pair, amount_fen: int) -> str:
    tid = await grant(pair, amount_fen)
    accepted = await answer(pair, tid)
    assert accepted.status_code == 200, accepted.text
    await pair.network.run_senders()
    return tid


async def test_a_committed_grant_checks_out_with_exact_totals(pair: Pair) -> None:
    await committed_grant(pair, 100_000)

    check = await check_network(dsns(pair.network))

    assert check.problems == []
    assert check.ok
    assert (check.funded_fen, check.customer_fen, check.clearing_fen) == (500_000, 500_000, 0)
    assert dict(check.grant_states()) == {"COMMITTED": 1}
    assert check.ledgers[A].clearing == {("due_to", B): (100_000, 0)}
    assert check.ledgers[B].clearing == {("due_from", A): (-100_000, 0)}


async def test_the_cli_command_reports_consistent_and_exits_0(pair: Pair) -> None:
    await committed_grant(pair, 20_000)
    argv = ["check-network"] + [f"--db={node}={dsn}" for node, dsn in dsns(pair.network).items()]

    assert await cli.cmd_check_network(cli.build_parser().parse_args(argv), cli.Settings()) == 0
    bad = cli.build_parser().parse_args(["check-network", "--db", "prov-13"])
    assert await cli.cmd_check_network(bad, cli.Settings()) == 2


async def test_a_grant_in_flight_is_in_doubt_at_rest_but_not_while_moving(pair: Pair) -> None:
    response = await instruct(pair, 30_000)  # held at A, PREPARE not yet delivered
    assert response.status_code == 202, response.text
    tid = response.json()["transfer_id"]

    moving = await check_network(dsns(pair.network), at_rest=False)
    at_rest = await check_network(dsns(pair.network))

    assert moving.problems == []
    assert at_rest.problems == [
        f"{A}: 1 message(s) wait in the outbox",
        f"{A} due_to:{B} is (0, 30000) but {B} due_from:{A} is (0, 0)",
        f"grant {tid}: {A} is still PREPARED_A (in doubt)",
    ]
    await pair.network.run_senders()
    declined = await answer(pair, tid, "decline")
    assert declined.status_code == 200, declined.text
    await pair.network.run_senders()
    assert (await check_network(dsns(pair.network))).problems == []


async def test_an_account_edited_behind_the_ledger_is_money_created(pair: Pair) -> None:
    await committed_grant(pair, 10_000)
    async with pair.a.ctx.pool.acquire() as conn:
        account = await conn.fetchval(
            "SELECT personal_account_id FROM insured_person WHERE id_number = $1",
            pair.giver.id_number,
        )
        await conn.execute(
            "UPDATE account SET credits_posted = credits_posted + 1 WHERE id = $1", account
        )

    check = await check_network(dsns(pair.network))

    assert not check.ok
    assert check.problems[0].startswith(f"{A}: ledger not balanced")
    assert check.problems[1] == (
        "money created or lost: provinces paid in 500000 fen, customers hold 500001 fen "
        "and clearing holds 0 fen"
    )
    argv = ["check-network"] + [f"--db={node}={dsn}" for node, dsn in dsns(pair.network).items()]
    assert await cli.cmd_check_network(cli.build_parser().parse_args(argv), cli.Settings()) == 1


async def test_clearing_that_no_longer_mirrors_is_caught(pair: Pair) -> None:
    tid = await committed_grant(pair, 10_000)
    # A balanced, legal-looking transfer on A alone: the giver pays 1 fen into due_to:B.
    async with pair.a.ctx.pool.acquire() as conn, conn.transaction():
        account = await conn.fetchval(
            "SELECT personal_account_id FROM insured_person WHERE id_number = $1",
            pair.giver.id_number,
        )
        due_to = await clearing_account(conn, "due_to", B, tid)
        await ledger.transfer(
            conn,
            debit_account_id=account,
            credit_account_id=due_to,
            amount_fen=1,
            purpose="tampered",
        )

    check = await check_network(dsns(pair.network))

    assert check.problems == [f"{A} due_to:{B} is (10001, 0) but {B} due_from:{A} is (-10000, 0)"]


async def test_a_payable_without_the_peers_receivable_is_caught(pair: Pair) -> None:
    tid = await committed_grant(pair, 10_000)
    # A books 4,000 of the grant as payable to B (as a USAGE would), B books no receivable.
    async with pair.a.ctx.pool.acquire() as conn, conn.transaction():
        due_to = await clearing_account(conn, "due_to", B, tid)
        payable = await open_account_on_demand(conn, "payable", f"payable:{B}")
        await ledger.transfer(
            conn,
            debit_account_id=due_to,
            credit_account_id=payable,
            amount_fen=4_000,
            purpose="cross_province_payable",
        )

    check = await check_network(dsns(pair.network))

    assert check.problems == [
        f"{A} due_to:{B} is (6000, 0) but {B} due_from:{A} is (-10000, 0)",
        f"{A} payable:{B} is (4000, 0) but {B} receivable:{A} is (0, 0)",
    ]


async def test_a_receivable_the_giver_never_booked_is_caught(pair: Pair) -> None:
    tid = await committed_grant(pair, 10_000)
    # B books 2,500 of the grant as receivable from A; A never books the payable.
    async with pair.b.ctx.pool.acquire() as conn, conn.transaction():
        due_from = await clearing_account(conn, "due_from", A, tid)
        receivable = await open_account_on_demand(conn, "receivable", f"receivable:{A}")
        await ledger.transfer(
            conn,
            debit_account_id=receivable,
            credit_account_id=due_from,
            amount_fen=2_500,
            purpose="cross_province_receivable",
        )

    check = await check_network(dsns(pair.network))

    assert check.problems == [
        f"{A} due_to:{B} is (10000, 0) but {B} due_from:{A} is (-7500, 0)",
        f"{B} receivable:{A} is (-2500, 0) but {A} has no payable:{B}",
    ]
