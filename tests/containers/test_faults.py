"""Faults only separate machines have, each followed by healing and the bank-style checker:
the receiver's node killed (SIGKILL) after PREPARE and again after ACCEPT; the giver's
PostgreSQL stopped during a burst of grants, and killed under concurrent instructions; the
receiver's node cut off from the other provinces mid-burst. Every grant reaches a final state, the same on both sides, and nothing
is left in doubt within the healing timeout."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nodes.checker import NetworkCheck
from protocol.ids import uuid7
from tests.containers.flow import (
    Holder,
    accept,
    balance,
    credit,
    enrol,
    grant,
    incoming_state,
    instruct,
    link,
    wait_decided,
    wait_offered,
)
from tests.containers.harness import ContainerNetwork

pytestmark = pytest.mark.containers

HEBEI, SHANGHAI = "prov-13", "prov-31"
OUTAGE_S = 5.0


def pairs(net: ContainerNetwork, first_seq: int, count: int) -> list[tuple[Holder, Holder, str]]:
    """`count` givers in Hebei, each with 100,000 fen and a linked receiver in Shanghai."""
    out = []
    for i in range(count):
        giver = enrol(net, HEBEI, first_seq + i, "张三丰")
        credit(giver, 100_000)
        receiver = enrol(net, SHANGHAI, first_seq + 400 + i, "李小龙", scheme="resident")
        out.append((giver, receiver, link(giver, receiver)))
    return out


def assert_settled(check: NetworkCheck, committed: list[str]) -> None:
    """Both sides COMMITTED for each grant; money conserved and clearing mirrored."""
    assert check.problems == []
    for tid in committed:
        assert check.ledgers[HEBEI].grants_out[tid][1] == "COMMITTED"
        assert check.ledgers[SHANGHAI].grants_in[(HEBEI, tid)][0] == "COMMITTED"
    assert check.funded_fen == check.customer_fen
    assert check.clearing_fen == 0


def test_receiver_killed_after_prepare_and_after_accept_the_grant_commits(
    provinces: ContainerNetwork,
) -> None:
    net = provinces
    [(giver, receiver, relation_id)] = pairs(net, 110, 1)
    tid = grant(giver, relation_id, 60_000)
    wait_offered(receiver, tid)

    net.kill_node(SHANGHAI)  # after PREPARE: the hold at B is in its database
    net.start_node(SHANGHAI)
    assert incoming_state(receiver, tid) == "PENDING_ACCEPT"
    accept(receiver, tid)
    net.kill_node(SHANGHAI)  # after ACCEPT: the vote and its message are committed at B
    net.start_node(SHANGHAI)

    assert wait_decided(giver, tid) == "COMMITTED"
    assert balance(giver) == 40_000
    assert_settled(net.wait_consistent(), [tid])


def test_giver_database_stopped_during_a_burst_every_grant_completes(
    provinces: ContainerNetwork,
) -> None:
    net = provinces
    burst = pairs(net, 120, 4)
    before = [grant(g, rel, 10_000 * (i + 1)) for i, (g, _, rel) in enumerate(burst[:2])]
    for (_, receiver, _), tid in zip(burst[:2], before, strict=True):
        wait_offered(receiver, tid)

    net.stop_database(HEBEI)
    try:
        during = []
        for i, (giver, _, relation_id) in enumerate(burst[2:], start=2):
            response = instruct(giver, relation_id, 10_000 * (i + 1))
            # Without its database the node refuses with a problem, and holds nothing.
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "service_unavailable"
            during.append(response.request.content)
        for (_, receiver, _), tid in zip(burst[:2], before, strict=True):
            accept(receiver, tid)  # B is up: the ACCEPTs wait in B's outbox for A's database
        time.sleep(OUTAGE_S)
    finally:
        net.start_database(HEBEI)  # healing, even if an assertion above failed
    net.wait_ready(HEBEI)

    after = []
    for (giver, _, relation_id), body in zip(burst[2:], during, strict=True):
        # The same instruction again (same transfer_id): now accepted once.
        sent = json.loads(body)
        response = instruct(giver, relation_id, sent["amount_fen"], sent["transfer_id"])
        assert response.status_code == 202, response.text
        after.append(sent["transfer_id"])
    for (_, receiver, _), tid in zip(burst[2:], after, strict=True):
        wait_offered(receiver, tid)
        accept(receiver, tid)

    tids = before + after
    for (giver, _, _), tid in zip(burst, tids, strict=True):
        assert wait_decided(giver, tid) == "COMMITTED"
    assert [balance(g) for g, _, _ in burst] == [90_000, 80_000, 70_000, 60_000]
    assert_settled(net.wait_consistent(), tids)


def test_receiver_cut_off_mid_burst_and_reconnected_every_grant_completes(
    provinces: ContainerNetwork,
) -> None:
    net = provinces
    burst = pairs(net, 130, 4)
    tids = [grant(g, rel, 5_000) for g, _, rel in burst[:2]]
    for (_, receiver, _), tid in zip(burst[:2], tids, strict=True):
        wait_offered(receiver, tid)

    net.disconnect_node(SHANGHAI)
    try:
        tids += [grant(g, rel, 5_000) for g, _, rel in burst[2:]]  # PREPAREs cannot leave Hebei
        for (_, receiver, _), tid in zip(burst[:2], tids[:2], strict=True):
            accept(receiver, tid)  # ACCEPTs cannot leave Shanghai
        time.sleep(OUTAGE_S)
        offered = [incoming_state(r, t) for (_, r, _), t in zip(burst[2:], tids[2:], strict=True)]
        assert offered == [None, None]
    finally:
        net.connect_node(SHANGHAI)  # healing, even if an assertion above failed

    for (_, receiver, _), tid in zip(burst[2:], tids[2:], strict=True):
        wait_offered(receiver, tid, timeout_s=90)
        accept(receiver, tid)
    for (giver, _, _), tid in zip(burst, tids, strict=True):
        assert wait_decided(giver, tid, timeout_s=90) == "COMMITTED"
    assert [balance(g) for g, _, _ in burst] == [95_000] * 4
    assert_settled(net.wait_consistent(), tids)


def test_giver_database_killed_under_concurrent_instructions_nothing_is_lost_or_doubled(
    provinces: ContainerNetwork,
) -> None:
    net = provinces
    burst = pairs(net, 140, 8)
    bodies = [
        {"relation_id": rel, "amount_fen": 1_000 * (i + 1), "transfer_id": uuid7()}
        for i, (_, _, rel) in enumerate(burst)
    ]

    def send(i: int) -> int:
        body = bodies[i]
        response = instruct(
            burst[i][0], body["relation_id"], body["amount_fen"], body["transfer_id"]
        )
        return response.status_code

    # Eight instructions in flight at once while the giver's PostgreSQL dies (SIGKILL: no
    # shutdown, crash recovery on start). Each answer is "accepted" or "unavailable, retry";
    # a connection cut during COMMIT leaves the outcome unknown to the client, never wrong.
    with ThreadPoolExecutor(max_workers=len(burst)) as pool:
        answers = pool.map(send, range(len(burst)))
        time.sleep(0.2)
        net.boxes[HEBEI].pg.get_wrapped_container().kill(signal="SIGKILL")
        try:
            statuses = list(answers)
        finally:
            net.start_database(HEBEI)  # healing, even if an answer above failed
    assert set(statuses) <= {202, 503}, statuses
    net.wait_ready(HEBEI)

    # The client retries every instruction with its own transfer_id: each is accepted once.
    for (giver, _, _), body in zip(burst, bodies, strict=True):
        response = instruct(giver, body["relation_id"], body["amount_fen"], body["transfer_id"])
        assert response.status_code == 202, response.text
        assert response.json()["transfer_id"] == body["transfer_id"]
    tids = [body["transfer_id"] for body in bodies]
    for (_, receiver, _), tid in zip(burst, tids, strict=True):
        wait_offered(receiver, tid, timeout_s=90)
        accept(receiver, tid)
    for (giver, _, _), tid in zip(burst, tids, strict=True):
        assert wait_decided(giver, tid, timeout_s=90) == "COMMITTED"
    assert [balance(g) for g, _, _ in burst] == [100_000 - 1_000 * (i + 1) for i in range(8)]
    assert_settled(net.wait_consistent(), tids)
