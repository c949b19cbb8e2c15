"""Property: whatever sequence of credits, settlements, refunds and endings happens, no fen is
created or lost, no account goes below zero, and the ledger checks out.

Hypothesis examples cannot use function-scoped fixtures, so the test drives its own event
loop and node. Creating a database per example would dominate the run time, so examples
share one database but never share money: each example has its own people and its own
institutions, and its conservation is checked over exactly those accounts.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient

from nodes.app import create_app
from nodes.settings import Settings
from tests.conftest import START, TEST_SCRYPT_N, create_test_database, drop_test_database
from tests.support import OPERATOR_TOKEN, PASSWORD, bearer, credit
from tests.wallet.test_settlement import Member, institution, member, pay, share
from wallet.clock import ManualClock
from wallet.ledger import check_books
from wallet.otp import RecordingOtpSender
from wallet.rules import DeductionStrategy, ProvinceRules

Client: TypeAlias = AsyncTestClient[Litestar]
CATEGORIES = ("outpatient", "inpatient", "pharmacy_drug")
STRATEGIES: tuple[DeductionStrategy, ...] = ("filing_order", "giver_balance_desc", "receiver_order")


@dataclass(frozen=True)
class Credit:
    who: int
    amount_fen: int


@dataclass(frozen=True)
class Settle:
    patient: int
    at: int
    amount_fen: int
    allow_partial: bool
    category: str


@dataclass(frozen=True)
class Refund:
    pick: int
    amount_fen: int | None
    by_other_institution: bool


@dataclass(frozen=True)
class End:
    pick: int
    by_receiver: bool


Op = Credit | Settle | Refund | End

# Members: 0 and 1 employees who both give and receive, 2 an employee giver, 3 a resident.
MEMBERS = 4
# (giver, receiver) pairs filed and confirmed before the operations run.
RELATIONSHIPS = ((2, 0), (2, 3), (0, 1), (1, 0), (0, 3))
SETTLE = st.builds(
    Settle,
    st.integers(0, MEMBERS - 1),
    st.integers(0, 1),
    st.integers(1, 2_500),
    st.booleans(),
    st.sampled_from(CATEGORIES),
)
REFUND = st.builds(
    Refund,
    st.integers(0, 50),
    st.one_of(st.none(), st.integers(1, 800)),
    # Now and then another institution tries to refund it.
    st.sampled_from([False, False, False, True]),
)
OPS = st.one_of(
    st.builds(Credit, st.integers(0, 2), st.integers(1, 5_000)),
    SETTLE,
    SETTLE,
    REFUND,
    REFUND,
    st.builds(End, st.integers(0, 10), st.booleans()),
)
# Each example takes fresh roster numbers (ID number, phone), so examples never meet.
_example_numbers: Iterator[int] = itertools.count()


@dataclass
class World:
    number: int
    members: list[Member]
    keys: list[str]
    relationships: list[tuple[int, int, int]]  # (id, giver, receiver)
    settlements: list[tuple[str, int]] = field(default_factory=list)  # (reference, institution)
    credited_fen: int = 0

    @property
    def institution_codes(self) -> list[str]:
        return [f"H1-{self.number}", f"H2-{self.number}"]


async def build_world(client: Client, otp: RecordingOtpSender, opening_fen: list[int]) -> World:
    number = next(_example_numbers)
    seq = MEMBERS * number
    # person() keeps seq % 1000 in the ID number; the birth year keeps larger seqs apart.
    birth = f"{1950 + seq // 1000}0101"
    members = [
        await member(client, otp, seq, "王一", birth=birth),
        await member(client, otp, seq + 1, "王二", birth=birth),
        await member(client, otp, seq + 2, "王三", birth=birth),
        await member(client, otp, seq + 3, "王四", birth=birth, scheme="resident"),
    ]
    opening = {m.id_number: fen for m, fen in zip(members, opening_fen, strict=False) if fen}
    if opening:
        await credit(client, f"opening-{number}", opening)
    keys = [await institution(client, f"H1-{number}"), await institution(client, f"H2-{number}")]
    relationships = [(await share(client, members[g], members[r]), g, r) for g, r in RELATIONSHIPS]
    # Member 0 puts their later giver first (used by the receiver_order strategy).
    to_first = [rid for rid, _, receiver in reversed(relationships) if receiver == 0]
    ordered = await client.put(
        "/app/v1/relationships/order", json={"relationship_ids": to_first}, headers=members[0].auth
    )
    assert ordered.status_code == 200, ordered.text
    return World(number, members, keys, relationships, credited_fen=sum(opening.values()))


async def apply(client: Client, world: World, step: int, op: Op) -> None:
    """Run one operation; check its answer is one the API may give for it."""
    if isinstance(op, Credit):
        batch_id = f"b-{world.number}-{step}"
        await credit(client, batch_id, {world.members[op.who].id_number: op.amount_fen})
        world.credited_fen += op.amount_fen
    elif isinstance(op, Settle):
        await _settle(client, world, step, op)
    elif isinstance(op, Refund):
        await _refund(client, world, step, op)
    else:
        relationship_id, giver, receiver = world.relationships[op.pick % len(world.relationships)]
        by = world.members[receiver if op.by_receiver else giver]
        response = await client.post(
            f"/app/v1/relationships/{relationship_id}/end",
            json={"payment_password": PASSWORD},
            headers=by.auth,
        )
        assert response.status_code in (200, 409), response.text


async def _settle(client: Client, world: World, step: int, op: Settle) -> None:
    response = await pay(
        client,
        world.keys[op.at],
        world.members[op.patient],
        op.amount_fen,
        f"s-{step}",
        category=op.category,
        allow_partial=op.allow_partial,
    )
    _check_settlement(response, op)
    event(f"settlement {response.status_code}")
    if response.status_code == 201:
        world.settlements.append((f"s-{step}", op.at))


async def _refund(client: Client, world: World, step: int, op: Refund) -> None:
    if not world.settlements:
        return
    reference, at = world.settlements[op.pick % len(world.settlements)]
    key = world.keys[1 - at] if op.by_other_institution else world.keys[at]
    body: dict[str, Any] = {"reference": f"f-{step}"}
    if op.amount_fen is not None:
        body["amount_fen"] = op.amount_fen
    response = await client.post(
        f"/institution/v1/settlements/{reference}/refunds", json=body, headers=bearer(key)
    )
    expected = {404} if op.by_other_institution else {201, 422}
    assert response.status_code in expected, response.text
    event(f"refund {response.status_code}")


def _check_settlement(response: httpx.Response, op: Settle) -> None:
    assert response.status_code in (201, 409), response.text
    if response.status_code == 409:
        assert response.json()["code"] == "insufficient_funds"
        return
    body = response.json()
    assert sum(s["amount_fen"] for s in body["sources"]) == body["amount_fen"]
    assert 0 < body["amount_fen"] <= op.amount_fen
    if not op.allow_partial:
        assert body["amount_fen"] == op.amount_fen


_HELD_BY_WORLD = """
SELECT coalesce(sum(a.credits_posted - a.debits_posted), 0)::bigint FROM account a
WHERE a.id IN (SELECT personal_account_id FROM insured_person WHERE id_number = ANY($1::text[]))
   OR (a.kind = 'institution' AND split_part(a.code, ':', 2) = ANY($2::text[]))
"""
_NEGATIVE = """
SELECT count(*) FROM account
WHERE kind <> 'funding' AND credits_posted - debits_posted - debits_pending < 0
"""
_SOURCES_DISAGREE = """
SELECT count(*) FROM settlement s
WHERE amount_fen <> (SELECT sum(amount_fen) FROM settlement_source WHERE settlement_id = s.id)
   OR refunded_fen <> (SELECT sum(refunded_fen) FROM settlement_source WHERE settlement_id = s.id)
"""


async def check_money(dsn: str, world: World) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        books = await check_books(conn)
        assert books.balanced, books
        id_numbers = [m.id_number for m in world.members]
        held = await conn.fetchval(_HELD_BY_WORLD, id_numbers, world.institution_codes)
        assert held == world.credited_fen
        assert await conn.fetchval(_NEGATIVE) == 0
        assert await conn.fetchval(_SOURCES_DISAGREE) == 0
    finally:
        await conn.close()


async def run_example(
    dsn: str, strategy: DeductionStrategy, opening_fen: list[int], ops: list[Op]
) -> None:
    node = Settings(
        database_url=dsn,
        operator_token=OPERATOR_TOKEN,
        db_pool_min=1,
        db_pool_max=4,
        rules=ProvinceRules(deduction_strategy=strategy),
    )
    otp = RecordingOtpSender()
    app = create_app(node, clock=ManualClock(START), otp_sender=otp, scrypt_n=TEST_SCRYPT_N)
    async with AsyncTestClient(app=app, timeout=30) as client:
        world = await build_world(client, otp, opening_fen)
        for step, op in enumerate(ops):
            await apply(client, world, step, op)
    await check_money(dsn, world)


@pytest.fixture(scope="module")
def shared_dsn(admin_dsn: str, template_dsn: str) -> Iterator[str]:
    dsn = asyncio.run(create_test_database(admin_dsn))
    yield dsn
    asyncio.run(drop_test_database(admin_dsn, dsn))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(STRATEGIES),
    # What the three employees hold before the operations start.
    opening_fen=st.lists(st.integers(0, 3_000), min_size=3, max_size=3),
    ops=st.lists(OPS, min_size=4, max_size=25),
)
def test_money_is_conserved_whatever_happens(
    shared_dsn: str, strategy: DeductionStrategy, opening_fen: list[int], ops: list[Op]
) -> None:
    asyncio.run(run_example(shared_dsn, strategy, opening_fen, ops))
