"""Issue 13's drills: Hebei (prov-13) runs as a cluster, two node replicas behind HAProxy on
a primary PostgreSQL with a synchronous standby; Shanghai (prov-31) is one node.

1. A replica is killed (SIGKILL) mid-burst of grants and settlements, and restarted mid-burst
   later: every grant commits on both sides, every settlement is made once, balances are
   exact to the fen, nothing is in doubt after healing; in a burst without faults each phase
   of each grant is timed exactly once across the replicas (each scraped on its own).
2. The primary is killed (SIGKILL) mid-burst and the standby promoted: every request answered
   as accepted before and during the kill is still there after it, every retried request is
   accepted once, and the books balance.

The client retries what the cluster answers with "retry" (502, 503, 504, a cut connection)
with the same transfer id or settlement reference, as the app and institutions do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from protocol.ids import uuid7
from tests.containers.cluster import ClusterNetwork
from tests.containers.flow import Holder, balance, credit, enrol, link
from tests.containers.harness import OPERATOR, PROVINCES, wait_for
from tests.support import PASSWORD

pytestmark = pytest.mark.containers

HEBEI, SHANGHAI = "prov-13", "prov-31"
PAIRS = 8
CREDIT_FEN = 100_000
GRANT_FEN, PAY_FEN = 1_000, 250
RETRY_FOR_S = 90.0
DECIDE_FOR_S = 120.0
OUTAGE_S = 3.0
RETRY_STATUSES = {502, 503, 504}
PHASES = ("prepare_to_received", "accept_to_decision", "decision_to_ack")


@dataclass
class People:
    """Givers at Hebei (each with a linked receiver at Shanghai) and a Hebei pharmacy."""

    pairs: list[tuple[Holder, Holder, str]]
    pharmacy_key: str
    spent: dict[int, int]  # giver index -> fen granted and paid so far


@dataclass
class Item:
    """One giver's grant and settlement of a burst: ids, and the first answers."""

    giver: int
    transfer_id: str
    reference: str
    payment_code: str
    answers: list[int]


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, container_tier: None) -> Iterator[ClusterNetwork]:
    net = ClusterNetwork(name="cluster", provinces=PROVINCES[:2], cluster=HEBEI)
    request.addfinalizer(net.close)
    net.start()
    yield net


@pytest.fixture(scope="module")
def people(cluster: ClusterNetwork) -> People:
    pairs = []
    for i in range(PAIRS):
        giver = enrol(cluster, HEBEI, 300 + i, "张三丰")
        credit(giver, CREDIT_FEN)
        receiver = enrol(cluster, SHANGHAI, 700 + i, "李小龙", scheme="resident")
        pairs.append((giver, receiver, link(giver, receiver)))
    with cluster[HEBEI].http() as http:
        response = http.post(
            "/operator/v1/institutions",
            json={
                "code": "ph-13-001",
                "name": "河北某药房",
                "kind": "pharmacy",
                "categories": ["pharmacy_drug"],
            },
            headers=OPERATOR,
        )
    assert response.status_code == 201, response.text
    return People(pairs, response.json()["api_key"], dict.fromkeys(range(PAIRS), 0))


# --- a client that retries what the cluster asks it to retry -----------------------------------


def answered(what: str, call: Callable[[], httpx.Response]) -> httpx.Response:
    """`call` until it is answered with something other than "retry"."""

    def attempt() -> httpx.Response | None:
        try:
            response = call()
        except httpx.TransportError:
            return None
        return None if response.status_code in RETRY_STATUSES else response

    return wait_for(what, attempt, RETRY_FOR_S, every_s=0.5)


def first_answer(call: Callable[[], httpx.Response]) -> int:
    """The status of one attempt (0: the connection was cut, no answer at all)."""
    try:
        return call().status_code
    except httpx.TransportError:
        return 0


def instruct(people: People, item: Item) -> Callable[[], httpx.Response]:
    giver, _, relation_id = people.pairs[item.giver]
    body = {
        "transfer_id": item.transfer_id,
        "relation_id": relation_id,
        "amount_fen": GRANT_FEN,
        "payment_password": PASSWORD,
    }
    return lambda: giver.post("/app/v1/grants", body)


def settle(people: People, item: Item) -> Callable[[], httpx.Response]:
    giver = people.pairs[item.giver][0]
    body = {
        "payment_code": item.payment_code,
        "amount_fen": PAY_FEN,
        "category": "pharmacy_drug",
        "reference": item.reference,
    }

    def call() -> httpx.Response:
        with giver.box.http() as http:
            return http.post(
                "/institution/v1/settlements",
                json=body,
                headers={"Authorization": f"Bearer {people.pharmacy_key}"},
            )

    return call


def new_items(people: People, tag: str, givers: range = range(PAIRS)) -> list[Item]:
    """One grant and one settlement per giver, with their ids and a fresh payment code."""
    items = []
    for i in givers:
        giver = people.pairs[i][0]
        code = answered("a payment code", lambda g=giver: g.post("/app/v1/payment-codes"))
        assert code.status_code == 201, code.text
        items.append(Item(i, uuid7(), f"{tag}-{i}", code.json()["code"], []))
    return items


def fire(people: People, items: list[Item], during: Callable[[], None] | None = None) -> None:
    """Every grant instruction and settlement of `items` at once, each attempted once; its
    answers are recorded. `during` runs while they are in flight."""
    calls = [(item, f(people, item)) for item in items for f in (instruct, settle)]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [(item, pool.submit(first_answer, call)) for item, call in calls]
        if during is not None:
            time.sleep(0.05)
            during()
        for item, future in futures:
            item.answers.append(future.result())


def complete(people: People, items: list[Item]) -> None:
    """Retry each until answered, the receivers accept, every grant is decided and ACKed."""
    for item in items:
        granted = answered(f"grant {item.transfer_id}", instruct(people, item))
        assert granted.status_code == 202, granted.text
        assert granted.json()["transfer_id"] == item.transfer_id
        paid = answered(f"settlement {item.reference}", settle(people, item))
        assert paid.status_code in (200, 201), paid.text
        assert paid.json()["amount_fen"] == PAY_FEN
        people.spent[item.giver] += GRANT_FEN + PAY_FEN
    for item in items:
        receiver = people.pairs[item.giver][1]
        wait_for(
            f"grant {item.transfer_id} accepted",
            lambda r=receiver, t=item.transfer_id: accepted(r, t),
            RETRY_FOR_S,
            every_s=0.5,
        )
    for item in items:
        giver = people.pairs[item.giver][0]
        assert (
            wait_for(
                f"grant {item.transfer_id} decided",
                lambda g=giver, t=item.transfer_id: decided(g, t),
                DECIDE_FOR_S,
            )
            == "COMMITTED"
        )


def accepted(receiver: Holder, transfer_id: str) -> bool:
    """Accept the grant once it is offered; True once it is (a retried accept whose first
    attempt committed finds it accepted already)."""
    path = f"/app/v1/grants/incoming/{transfer_id}/accept"
    response = answered("accept", lambda: receiver.post(path, {"payment_password": PASSWORD}))
    if response.status_code == 200:
        return True
    offered = answered("incoming grants", lambda: receiver.get("/app/v1/grants/incoming"))
    assert offered.status_code == 200, offered.text
    states = {g["transfer_id"]: g["state"] for g in offered.json()}
    return states.get(transfer_id) in ("ACCEPTED", "COMMITTED")


def decided(giver: Holder, transfer_id: str) -> str | None:
    """The giver's node's decision once the receiver's node acknowledged it."""
    response = answered("a grant", lambda: giver.get(f"/app/v1/grants/{transfer_id}"))
    assert response.status_code == 200, response.text
    view = response.json()
    return str(view["state"]) if view["acknowledged"] else None


def assert_books(net: ClusterNetwork, people: People, transfer_ids: list[str]) -> None:
    """Each giver's balance to the fen; both sides COMMITTED; the checker green at rest."""
    assert [balance(g) for g, _, _ in people.pairs] == [
        CREDIT_FEN - people.spent[i] for i in range(PAIRS)
    ]
    check = net.wait_consistent()
    assert check.problems == []
    for tid in transfer_ids:
        assert check.ledgers[HEBEI].grants_out[tid][1] == "COMMITTED"
        assert check.ledgers[SHANGHAI].grants_in[(HEBEI, tid)][0] == "COMMITTED"
    assert check.funded_fen == check.customer_fen


def phase_counts(net: ClusterNetwork) -> dict[str, float]:
    """Each grant phase's observation count, summed over the replicas' own scrapes."""
    totals = dict.fromkeys(PHASES, 0.0)
    for replica in range(net.replicas):
        samples = net.scrape(replica)
        for phase in PHASES:
            totals[phase] += samples.get(f'plt_grant_phase_seconds_count{{phase="{phase}"}}', 0)
    return totals


# --- the drills ---------------------------------------------------------------------------------


def test_a_replica_killed_mid_burst_every_grant_and_settlement_completes_once(
    cluster: ClusterNetwork, people: People
) -> None:
    net = cluster
    rounds: list[list[Item]] = []
    faults: dict[int, Callable[[], None]] = {
        1: lambda: net.kill_replica(0),  # SIGKILL mid-burst
        3: lambda: net.start_replica(0),  # back mid-burst
    }
    for r in range(4):
        items = new_items(people, f"rep{r}")
        fire(people, items, faults.get(r))
        complete(people, items)
        rounds.append(items)

    # A round without faults: each phase of each grant is timed exactly once in the cluster
    # (on whichever replica handled the message), summed over the replicas' own scrapes.
    before = phase_counts(net)
    items = new_items(people, "rep4")
    fire(people, items)
    complete(people, items)
    rounds.append(items)
    assert all(a in (202, 201) for item in items for a in item.answers), items
    after = phase_counts(net)
    assert {p: after[p] - before[p] for p in PHASES} == dict.fromkeys(PHASES, PAIRS)

    tids = [item.transfer_id for items in rounds for item in items]
    assert len(set(tids)) == 5 * PAIRS
    assert_books(net, people, tids)
    # The books, read by each replica at its own scrape, are the same: the province's.
    for replica in range(net.replicas):
        samples = net.scrape(replica)
        assert samples['plt_grants{side="giver",state="COMMITTED"}'] == 5 * PAIRS
        assert samples['plt_grants_in_doubt{side="giver"}'] == 0
        assert samples["plt_settlements"] == 5 * PAIRS
        assert samples["plt_db_pool_max_connections"] == 10  # db_pool_max, per process


def test_the_primary_killed_mid_burst_the_standby_promoted_nothing_accepted_is_lost(
    cluster: ClusterNetwork, people: People
) -> None:
    net = cluster
    assert net.standby_state() == "sync"  # every commit waits for the standby's disk
    # Half the givers' grants are pending (one per pair at a time), the others' in flight.
    half = PAIRS // 2
    before = new_items(people, "fo0", range(half))
    fire(people, before)
    assert [item.answers for item in before] == [[202, 201]] * half

    during = new_items(people, "fo1", range(half, PAIRS))
    fire(people, during, net.kill_primary)  # SIGKILL: no shutdown, no last words
    time.sleep(OUTAGE_S)
    net.promote_standby()

    # Whatever was answered as accepted, before the kill or while it happened, is there.
    for item in before + during:
        granted, paid = item.answers
        if granted == 202:
            assert grant_found(people, item), item
        if paid in (200, 201):
            assert settlement_found(people, item), item

    # Retried with the same ids, each is accepted once; then every grant completes.
    complete(people, before + during)
    assert_books(net, people, [item.transfer_id for item in before + during])


def grant_found(people: People, item: Item) -> bool:
    giver = people.pairs[item.giver][0]
    seen = answered("a grant", lambda: giver.get(f"/app/v1/grants/{item.transfer_id}"))
    return seen.status_code == 200 and seen.json()["amount_fen"] == GRANT_FEN


def settlement_found(people: People, item: Item) -> bool:
    giver = people.pairs[item.giver][0]

    def call() -> httpx.Response:
        with giver.box.http() as http:
            return http.get(
                f"/institution/v1/settlements/{item.reference}",
                headers={"Authorization": f"Bearer {people.pharmacy_key}"},
            )

    seen = answered("a settlement", call)
    return seen.status_code == 200 and seen.json()["amount_fen"] == PAY_FEN
