"""Three provinces as containers, driven over HTTP only: a giver in Hebei grants quotas to
relatives in Shanghai and Sichuan, both accept, Hebei commits, and the Shanghai relative
pays at a pharmacy from the quota. Then the bank-style checker reads all three databases."""

from __future__ import annotations

import pytest

from nodes import cli
from tests.containers.flow import (
    accept,
    balance,
    credit,
    enrol,
    grant,
    link,
    wait_decided,
    wait_offered,
)
from tests.containers.harness import OPERATOR, ContainerNetwork

pytestmark = pytest.mark.containers


def test_grant_across_three_provinces_commits_and_is_spent(provinces: ContainerNetwork) -> None:
    net = provinces
    giver = enrol(net, "prov-13", 101, "张三丰")
    credit(giver, 500_000)
    in_shanghai = enrol(net, "prov-31", 501, "李小龙", scheme="resident")
    in_sichuan = enrol(net, "prov-51", 502, "王小明", scheme="resident")
    to_shanghai = link(giver, in_shanghai)
    to_sichuan = link(giver, in_sichuan)

    first = grant(giver, to_shanghai, 100_000)
    second = grant(giver, to_sichuan, 50_000)
    wait_offered(in_shanghai, first)
    wait_offered(in_sichuan, second)
    accept(in_shanghai, first)
    accept(in_sichuan, second)

    assert wait_decided(giver, first) == "COMMITTED"
    assert wait_decided(giver, second) == "COMMITTED"
    assert balance(giver) == 350_000

    with net["prov-31"].http() as http:
        registered = http.post(
            "/operator/v1/institutions",
            json={
                "code": "ph-31-001",
                "name": "上海某药房",
                "kind": "pharmacy",
                "categories": ["pharmacy_drug"],
            },
            headers=OPERATOR,
        )
        assert registered.status_code == 201, registered.text
        code = in_shanghai.post("/app/v1/payment-codes")
        assert code.status_code == 201, code.text
        paid = http.post(
            "/institution/v1/settlements",
            json={
                "payment_code": code.json()["code"],
                "amount_fen": 30_000,
                "category": "pharmacy_drug",
                "reference": "rx-1",
            },
            headers={"Authorization": f"Bearer {registered.json()['api_key']}"},
        )
    assert paid.status_code == 201, paid.text
    assert [(s["source"], s["amount_fen"]) for s in paid.json()["sources"]] == [("quota", 30_000)]

    check = net.wait_consistent()
    assert (check.funded_fen, check.customer_fen, check.clearing_fen) == (500_000, 500_000, 0)
    assert dict(check.grant_states()) == {"COMMITTED": 2}
    assert check.ledgers["prov-13"].clearing == {
        ("due_to", "prov-31"): (100_000, 0),
        ("due_to", "prov-51"): (50_000, 0),
    }
    assert check.ledgers["prov-31"].clearing == {("due_from", "prov-13"): (-100_000, 0)}
    # Operators run the same check from the console.
    argv = ["check-network", *(f"--db={node}={dsn}" for node, dsn in net.dsns().items())]
    assert cli.main(argv) == 0
