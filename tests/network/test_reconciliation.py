"""Reconciliation and monthly clearing between real province nodes (PROTOCOL b.10, RULES 16).

A month of grants and spending between three provinces; every window reconciled by signed
statements; a row corrupted behind one node's back found by the drill-down, named by its
transfer id; the clearing refused while the month is open or a window is not reconciled,
then run at every node, with the same net per pair of provinces on both sides, to the fen.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import msgspec
import pytest

from nodes.checker import check_network
from nodes.network import DEFAULT_PROVINCES, LocalNetwork
from protocol.messages import statement_bucket
from tests.conftest import TEMPLATE_DB, TEST_SCRYPT_N
from tests.network.recon_flow import (
    CST,
    HEBEI,
    SHANGHAI,
    SICHUAN,
    at,
    refund,
    run_month,
    setup_month,
    state_windows,
    tamper,
    window_states,
)
from tests.network.support import client
from tests.support import OPERATOR, OPERATOR_TOKEN
from wallet import ledger
from wallet.clock import ManualClock
from wallet.errors import WalletError
from wallet.plt import clearing, statements
from wallet.plt.clearing import PairLine
from wallet.plt.statements import Difference

pytestmark = pytest.mark.network

SH_WINDOWS = [f"2026-03-{d}T{h}" for d in range(16, 21) for h in (10, 14)]
SC_WINDOWS = ["2026-03-16T10", "2026-03-17T10", "2026-03-19T10", "2026-03-20T10"]
CORRUPTED = "2026-03-20T10"
_SET_AMOUNT = "UPDATE grant_in SET amount_fen = $2 WHERE transfer_id = $1"
_ACCOUNT = "SELECT credits_posted - debits_posted FROM account WHERE code = $1"


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


def _pair(a: str, b: str, a_owes_b: int, b_owes_a: int, month: str = "2026-03") -> PairLine:
    net = a_owes_b - b_owes_a
    return PairLine(
        month=month,
        node_a=a,
        node_b=b,
        a_owes_b_fen=a_owes_b,
        b_owes_a_fen=b_owes_a,
        net_payer=None if net == 0 else a if net > 0 else b,
        net_payee=None if net == 0 else b if net > 0 else a,
        net_fen=abs(net),
        complete=True,
        status="agreed",
    )


async def test_a_month_reconciles_a_corrupted_row_is_found_and_the_clearing_agrees_to_the_fen(
    net: LocalNetwork, net_clock: ManualClock
) -> None:
    hebei, shanghai, sichuan = net[HEBEI], net[SHANGHAI], net[SICHUAN]
    month = await setup_month(net, net_clock)
    await run_month(month)
    corrupted = month.grants["sc"][4]  # 70,000 fen, committed on 20 March
    # Sichuan's database loses 1,000 fen of that grant before the day is stated.
    await tamper(sichuan, _SET_AMOUNT, corrupted, 69_000)
    await at(month, dt.datetime(2026, 3, 21, 12, 0, tzinfo=CST))
    await state_windows(net)

    # Every window between Hebei and Shanghai, both directions, agrees on both sides.
    assert await window_states(hebei, SHANGHAI) == dict.fromkeys(SH_WINDOWS, "RECONCILED")
    assert await window_states(shanghai, HEBEI) == dict.fromkeys(SH_WINDOWS, "RECONCILED")
    assert await window_states(sichuan, SHANGHAI) == {}
    expected_sc = {**dict.fromkeys(SC_WINDOWS, "RECONCILED"), CORRUPTED: "CLOSED"}
    assert await window_states(hebei, SICHUAN) == expected_sc
    assert await window_states(sichuan, HEBEI) == expected_sc

    # The drill-down names the one transfer, from both sides.
    [report] = await statements.reconcile(hebei.ctx, SICHUAN)
    assert (report.window_id, report.state, report.buckets) == (
        CORRUPTED,
        "CLOSED",
        (statement_bucket(corrupted),),
    )
    agrees = "our row agrees with the PREPARE and DECISION we hold"
    assert report.differences == (
        Difference(corrupted, HEBEI, "COMMIT 70000", "COMMIT 69000", agrees),
    )
    # Sichuan's own evidence shows its row is the one that is wrong.
    [mirror] = await statements.reconcile(sichuan.ctx, HEBEI, CORRUPTED)
    assert mirror.differences == (
        Difference(
            corrupted,
            HEBEI,
            "COMMIT 69000",
            "COMMIT 70000",
            "our row says 69000, the PREPARE 70000",
        ),
    )
    views = await statements.list_windows(hebei.ctx, SICHUAN, CORRUPTED)
    assert [(v.our_count, v.our_sum_fen, v.peer_count, v.peer_sum_fen) for v in views] == [
        (1, 70_000, 1, 69_000)
    ]

    # The month cannot be cleared while it is open ...
    with pytest.raises(WalletError) as open_month:
        await clearing.run_clearing(hebei.ctx, "2026-03")
    assert open_month.value.extensions["reason"] == "month_open"
    # ... nor after its end while a window is not reconciled; nothing is booked.
    await at(month, dt.datetime(2026, 4, 1, 12, 0, tzinfo=CST))
    await state_windows(net)
    with pytest.raises(WalletError) as unreconciled:
        await clearing.run_clearing(hebei.ctx, "2026-03")
    assert unreconciled.value.extensions["reason"] == "windows_not_reconciled"
    assert unreconciled.value.extensions["windows"] == [f"{SICHUAN}/{CORRUPTED}"]
    assert f"{SICHUAN} {CORRUPTED} (CLOSED)" in unreconciled.value.detail
    assert await hebei.ctx.pool.fetchval("SELECT count(*) FROM clearing_run") == 0
    async with client(hebei) as http:
        refused = await http.post("/operator/v1/clearing/2026-03", headers=OPERATOR)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "state_conflict"
    assert refused.json()["reason"] == "windows_not_reconciled"
    # The statements worker drilled down on its own and kept what differs.
    found = "SELECT transfer_id, giver, ours, theirs FROM recon_difference"
    assert [tuple(r) for r in await sichuan.ctx.pool.fetch(found)] == [
        (corrupted, HEBEI, "COMMIT 69000", "COMMIT 70000")
    ]

    # The operator repairs Sichuan's row; the drill-down now finds the rows agree.
    await tamper(sichuan, _SET_AMOUNT, corrupted, 70_000)
    [fixed] = await statements.reconcile(hebei.ctx, SICHUAN)
    assert (fixed.state, fixed.differences) == ("RECONCILED", ())
    [fixed] = await statements.reconcile(sichuan.ctx, HEBEI)
    assert (fixed.state, fixed.differences) == ("RECONCILED", ())

    runs = {n: await clearing.run_clearing(net[n].ctx, "2026-03") for n in net.nodes}
    await net.run_senders()
    # Shanghai's child spent 30,000 + 31,000 + ... + 34,000 less a 5,000 refund of Hebei's
    # grants; Sichuan's child 3 x 20,000 of Hebei's; Hebei's parent 5 x 25,000 of Shanghai's.
    assert runs[SHANGHAI].receivable_fen == {HEBEI: 155_000}
    assert runs[SICHUAN].receivable_fen == {HEBEI: 60_000}
    assert runs[HEBEI].receivable_fen == {SHANGHAI: 125_000, SICHUAN: 0}
    assert (runs[HEBEI].windows, runs[SHANGHAI].windows, runs[SICHUAN].windows) == (14, 10, 4)
    hebei_shanghai = _pair(HEBEI, SHANGHAI, 155_000, 125_000)
    hebei_sichuan = _pair(HEBEI, SICHUAN, 60_000, 0)
    assert (hebei_shanghai.net_payer, hebei_shanghai.net_fen) == (HEBEI, 30_000)
    reports = {n: await clearing.clearing_report(net[n].ctx, "2026-03") for n in net.nodes}
    assert reports[HEBEI].pairs == (hebei_shanghai, hebei_sichuan)
    assert reports[SHANGHAI].pairs == (hebei_shanghai,)
    assert reports[SICHUAN].pairs == (hebei_sichuan,)
    for node in (hebei, shanghai):  # the operator endpoint serves the same report
        async with client(node) as http:
            served = await http.get("/operator/v1/clearing/2026-03", headers=OPERATOR)
        assert served.status_code == 200, served.text
        assert served.json()["pairs"][0] == msgspec.to_builtins(hebei_shanghai)

    # The books: payables at the giver's node equal receivables at the receiver's.
    assert await hebei.ctx.pool.fetchval(_ACCOUNT, f"payable:{SHANGHAI}") == 155_000
    assert await shanghai.ctx.pool.fetchval(_ACCOUNT, f"receivable:{HEBEI}") == -155_000
    assert await hebei.ctx.pool.fetchval(_ACCOUNT, f"payable:{SICHUAN}") == 60_000
    assert await sichuan.ctx.pool.fetchval(_ACCOUNT, f"receivable:{HEBEI}") == -60_000
    assert await shanghai.ctx.pool.fetchval(_ACCOUNT, f"payable:{HEBEI}") == 125_000
    assert await hebei.ctx.pool.fetchval(_ACCOUNT, f"receivable:{SHANGHAI}") == -125_000
    for node in net.nodes.values():
        async with node.ctx.pool.acquire() as conn:
            books = await ledger.check_books(conn)
        assert books.balanced, (node.node_id, books)
    # The network checker agrees: payables mirror receivables, no fen created or lost.
    dsns = {n: net[n].database_url for n in net.nodes}
    assert (await check_network(dsns)).problems == []

    # A month is cleared once.
    lines_before = await shanghai.ctx.pool.fetchval("SELECT count(*) FROM clearing_receivable")
    with pytest.raises(WalletError) as twice:
        await clearing.run_clearing(shanghai.ctx, "2026-03")
    assert twice.value.extensions["reason"] == "cleared"
    booked = "SELECT count(*), sum(used_fen) FROM clearing_receivable"
    assert tuple(await shanghai.ctx.pool.fetchrow(booked)) == (lines_before, 155_000)

    # Settled: the operators confirm the net payments.
    assert await clearing.settle_month(hebei.ctx, "2026-03") == 14
    assert set((await window_states(hebei, SICHUAN)).values()) == {"SETTLED"}

    # April: no grants, but the pharmacy refunds 10,000 of a March payment of the Shanghai
    # child. April's usage of that grant is negative: the payable shrinks, Shanghai owes.
    await at(month, dt.datetime(2026, 4, 10, 10, 0, tzinfo=CST))
    await refund(month, shanghai, "sh-1", 10_000)
    await at(month, dt.datetime(2026, 5, 1, 12, 0, tzinfo=CST))
    for n in net.nodes:
        await clearing.run_clearing(net[n].ctx, "2026-04")
    await net.run_senders()
    april = {n: await clearing.clearing_report(net[n].ctx, "2026-04") for n in net.nodes}
    back = _pair(HEBEI, SHANGHAI, -10_000, 0, "2026-04")
    assert (back.net_payer, back.net_payee, back.net_fen) == (SHANGHAI, HEBEI, 10_000)
    even = _pair(HEBEI, SICHUAN, 0, 0, "2026-04")
    assert april[HEBEI].pairs == (back, even)
    assert april[SHANGHAI].pairs == (back,)
    assert april[SICHUAN].pairs == (even,)
    assert await hebei.ctx.pool.fetchval(_ACCOUNT, f"payable:{SHANGHAI}") == 145_000
    assert await shanghai.ctx.pool.fetchval(_ACCOUNT, f"receivable:{HEBEI}") == -145_000
    assert (await check_network(dsns)).problems == []
