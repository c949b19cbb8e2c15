"""Helpers for grant network tests: a linked giver/receiver pair, money snapshots, the checker.

The giver lives at prov-13 (node A, Hebei), the receiver at prov-31 (node B, Shanghai).
`check_books` is the bank-style checker run after every test: each ledger balanced and
matching its transfers, nothing overdrawn, A's `due_to:prov-31` equal to B's
`due_from:prov-13` (posted and pending), customer money over both ledgers equal to what the
provinces paid in, and both sides' grant states agreeing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from nodes.network import LocalNetwork, LocalNode
from protocol.ids import uuid7
from tests.network.support import (
    GIVER_SEQ,
    RECEIVER_SEQ,
    Holder,
    app_get,
    app_post,
    client,
    cross_state,
    enrol,
    file_cross,
)
from tests.support import OPERATOR, PASSWORD
from wallet import ledger
from wallet.clock import ManualClock
from wallet.otp import RecordingOtpSender
from wallet.plt.quota import clearing_position

A, B = "prov-13", "prov-31"
GIVER_BALANCE = 500_000


@dataclass
class Pair:
    network: LocalNetwork
    a: LocalNode
    b: LocalNode
    giver: Holder
    receiver: Holder
    relation_id: str


async def credit(node: LocalNode, who: Holder, amount_fen: int, batch: str = "2026-03") -> None:
    async with client(node) as http:
        response = await http.post(
            "/operator/v1/credit-batches",
            json={
                "batch_id": f"b-{batch}-{who.id_number[-4:]}",
                "month": "2026-03",
                "credits": [{"id_number": who.id_number, "amount_fen": amount_fen}],
            },
            headers=OPERATOR,
        )
        assert response.status_code in (200, 201), response.text


async def linked_pair(
    network: LocalNetwork, *, balance_fen: int = GIVER_BALANCE, seq: int = 0
) -> Pair:
    """A giver at A with `balance_fen`, a receiver at B, a confirmed cross relationship."""
    a, b = network[A], network[B]
    giver = await enrol(a, GIVER_SEQ + seq, "张三丰")
    receiver = await enrol(b, RECEIVER_SEQ + seq, "李小龙", scheme="resident")
    await credit(a, giver, balance_fen, batch=str(seq))
    filed = await file_cross(giver, receiver)
    assert filed.status_code in (200, 201), filed.text
    relation_id: str = filed.json()["relation_id"]
    await network.run_senders()
    confirmed = await app_post(
        receiver,
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        {"payment_password": PASSWORD},
    )
    assert confirmed.status_code == 200, confirmed.text
    await network.run_senders()
    assert await cross_state(a, relation_id) == "active"
    assert await cross_state(b, relation_id) == "active"
    return Pair(network, a, b, giver, receiver, relation_id)


async def login(who: Holder) -> None:
    """A fresh session for `who` (after the clock jumped past the old one's lifetime)."""
    otp = who.node.otp
    assert isinstance(otp, RecordingOtpSender)
    async with client(who.node) as http:
        response = await http.post(
            "/app/v1/otp",
            json={"id_number": who.id_number, "name": who.name, "purpose": "login"},
        )
        assert response.status_code == 201, response.text
        response = await http.post(
            "/app/v1/sessions",
            json={"otp_id": response.json()["otp_id"], "otp_code": otp.last[who.row["phone"]]},
        )
        assert response.status_code == 201, response.text
        who.token = response.json()["token"]


async def set_clock(pair: Pair, clock: ManualClock, at: dt.datetime) -> None:
    """Move the network's clock and log in again whoever's node is running."""
    clock.set(at)
    for who in (pair.giver, pair.receiver):
        if who.node.running:
            await login(who)


async def instruct(pair: Pair, amount_fen: int, transfer_id: str | None = None) -> Any:
    return await app_post(
        pair.giver,
        "/app/v1/grants",
        {
            "transfer_id": transfer_id or uuid7(),
            "relation_id": pair.relation_id,
            "amount_fen": amount_fen,
            "payment_password": PASSWORD,
        },
    )


async def grant(pair: Pair, amount_fen: int) -> str:
    """Instruct and deliver: the grant is offered at B."""
    response = await instruct(pair, amount_fen)
    assert response.status_code == 202, response.text
    await pair.network.run_senders()
    tid: str = response.json()["transfer_id"]
    return tid


async def answer(pair: Pair, transfer_id: str, verb: str = "accept") -> Any:
    return await app_post(
        pair.receiver,
        f"/app/v1/grants/incoming/{transfer_id}/{verb}",
        {"payment_password": PASSWORD},
    )


async def giver_view(pair: Pair, transfer_id: str) -> dict[str, Any]:
    response = await app_get(pair.giver, f"/app/v1/grants/{transfer_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def states(pair: Pair, transfer_id: str) -> tuple[str | None, str | None]:
    a_state = await pair.a.ctx.pool.fetchval(
        "SELECT state FROM grant_out WHERE transfer_id = $1", transfer_id
    )
    b_state = await pair.b.ctx.pool.fetchval(
        "SELECT state FROM grant_in WHERE transfer_id = $1", transfer_id
    )
    return a_state, b_state


@dataclass(frozen=True)
class Money:
    """What a grant test watches, in fen."""

    giver_available: int
    giver_pending: int
    due_to: tuple[int, int]  # A's due_to:B net credit (posted, pending)
    due_from: tuple[int, int]  # B's due_from:A net credit (posted, pending): negative
    quota_available: int  # the receiver's spendable quota, all quotas together


async def money(pair: Pair) -> Money:
    async with pair.a.ctx.pool.acquire() as conn:
        account = await conn.fetchval(
            "SELECT personal_account_id FROM insured_person WHERE id_number = $1",
            pair.giver.id_number,
        )
        giver = await ledger.balance(conn, account)
        due_to = await clearing_position(conn, "due_to", B)
    async with pair.b.ctx.pool.acquire() as conn:
        due_from = await clearing_position(conn, "due_from", A)
        quota = await conn.fetchval(
            """SELECT coalesce(sum(a.credits_posted - a.debits_posted - a.debits_pending), 0)
               FROM quota q JOIN account a ON a.id = q.account_id
               JOIN insured_person p ON p.id = q.receiver_person_id
               WHERE p.id_number = $1 AND q.state = 'active'""",
            pair.receiver.id_number,
        )
    return Money(
        giver_available=giver.available_fen,
        giver_pending=giver.debits_pending,
        due_to=(due_to.posted_fen, due_to.pending_fen),
        due_from=(due_from.posted_fen, due_from.pending_fen),
        quota_available=int(quota),
    )


async def expect_money(
    pair: Pair, *, giver: int, held: int = 0, frozen: int = 0, quota: int = 0
) -> None:
    """Exact balances: the giver's available and held amounts, the frozen (committed)
    amount in clearing on both sides, the receiver's spendable quota."""
    got = await money(pair)
    want = Money(
        giver_available=giver,
        giver_pending=held,
        due_to=(frozen, held),
        due_from=(-frozen, -held),
        quota_available=quota,
    )
    assert got == want, f"\n got {got}\nwant {want}"


# --- the checker ---------------------------------------------------------------------------------

_CUSTOMER_MONEY = """
SELECT coalesce(sum(credits_posted - debits_posted), 0)::bigint FROM account
WHERE kind IN ('personal', 'quota', 'institution')
"""
_FUNDED = "SELECT (debits_posted - credits_posted)::bigint FROM account WHERE kind = 'funding'"
_A_STATES = "SELECT transfer_id, state FROM grant_out WHERE state <> 'REJECTED'"
_B_STATES = "SELECT transfer_id, state FROM grant_in"


async def check_books(network: LocalNetwork, *, at_rest: bool = True) -> None:
    """Bank-style check over both ledgers (run after every test, and between steps)."""
    a, b = network[A], network[B]
    customer = funded = 0
    for node in (a, b):
        async with node.ctx.pool.acquire() as conn:
            books = await ledger.check_books(conn)
            assert books.balanced, (node.node_id, books)
            customer += await conn.fetchval(_CUSTOMER_MONEY)
            funded += await conn.fetchval(_FUNDED)
    async with a.ctx.pool.acquire() as conn:
        due_to = await clearing_position(conn, "due_to", B)
        a_states = {r["transfer_id"]: r["state"] for r in await conn.fetch(_A_STATES)}
    async with b.ctx.pool.acquire() as conn:
        due_from = await clearing_position(conn, "due_from", A)
        b_states = {r["transfer_id"]: r["state"] for r in await conn.fetch(_B_STATES)}
    in_flight = due_to.posted_fen + due_from.posted_fen  # a RELEASE on its way
    assert customer + in_flight == funded, (customer, in_flight, funded)
    if not at_rest:
        return
    assert (due_to.posted_fen, due_to.pending_fen) == (-due_from.posted_fen, -due_from.pending_fen)
    for tid, state in a_states.items():
        other = b_states.get(tid)
        if state == "COMMITTED":
            assert other == "COMMITTED", (tid, state, other)
        elif state == "ABORTED":
            assert other in (None, "ABORTED", "DECLINED"), (tid, state, other)
        else:
            assert other in ("PENDING_ACCEPT", "ACCEPTED", "DECLINED_PENDING"), (tid, state, other)
    for tid, state in b_states.items():
        if state == "COMMITTED":
            assert a_states.get(tid) == "COMMITTED", (tid, state)
