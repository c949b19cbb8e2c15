"""Helpers for reconciliation and clearing tests: three provinces, a month of grants and spending.

Hebei (prov-13) has a giver with a child in Shanghai (prov-31) and one in Sichuan (prov-51);
Shanghai has a giver with a parent in Hebei. Receivers are on the resident scheme (no
personal account), so every payment they make comes from their quotas.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from nodes.network import LocalNetwork, LocalNode
from protocol.ids import uuid7
from tests.network.grant_flow import credit, login
from tests.network.support import (
    GIVER_SEQ,
    RECEIVER_SEQ,
    Holder,
    app_post,
    client,
    cross_state,
    enrol,
    file_cross,
)
from tests.support import OPERATOR, PASSWORD
from wallet.clock import ManualClock
from wallet.plt import grants, statements

HEBEI, SHANGHAI, SICHUAN = "prov-13", "prov-31", "prov-51"
CST = dt.timezone(dt.timedelta(hours=8))


@dataclass
class Month:
    """The people, relationships and pharmacies of the scenario, and what happened."""

    net: LocalNetwork
    clock: ManualClock
    hebei_giver: Holder
    shanghai_giver: Holder
    sh_child: Holder
    sc_child: Holder
    hb_parent: Holder
    relations: dict[str, str]  # "sh" / "sc" / "hb" -> relation_id
    pharmacy_keys: dict[str, str]  # node -> api key
    grants: dict[str, list[str]] = field(default_factory=dict)  # "sh" / "sc" / "hb" -> ids
    settlements: list[str] = field(default_factory=list)

    @property
    def holders(self) -> list[Holder]:
        return [self.hebei_giver, self.shanghai_giver, self.sh_child, self.sc_child, self.hb_parent]


async def relate(net: LocalNetwork, giver: Holder, receiver: Holder, kind: str) -> str:
    filed = await file_cross(giver, receiver, relation_type=kind)
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
    assert await cross_state(giver.node, relation_id) == "active"
    return relation_id


async def pharmacy(node: LocalNode) -> str:
    async with client(node) as http:
        response = await http.post(
            "/operator/v1/institutions",
            json={
                "code": f"ph-{node.node_id}",
                "name": "某药房",
                "kind": "pharmacy",
                "categories": ["pharmacy_drug"],
            },
            headers=OPERATOR,
        )
    assert response.status_code == 201, response.text
    key: str = response.json()["api_key"]
    return key


async def setup_month(net: LocalNetwork, clock: ManualClock) -> Month:
    hebei, shanghai, sichuan = net[HEBEI], net[SHANGHAI], net[SICHUAN]
    hebei_giver = await enrol(hebei, GIVER_SEQ, "张三丰")
    shanghai_giver = await enrol(shanghai, GIVER_SEQ + 1, "王五")
    await credit(hebei, hebei_giver, 2_000_000)
    await credit(shanghai, shanghai_giver, 1_000_000)
    sh_child = await enrol(shanghai, RECEIVER_SEQ + 1, "李小龙", scheme="resident")
    sc_child = await enrol(sichuan, RECEIVER_SEQ + 2, "李小虎", scheme="resident")
    hb_parent = await enrol(hebei, RECEIVER_SEQ + 3, "王大妈", scheme="resident")
    relations = {
        "sh": await relate(net, hebei_giver, sh_child, "child"),
        "sc": await relate(net, hebei_giver, sc_child, "child"),
        "hb": await relate(net, shanghai_giver, hb_parent, "parent"),
    }
    keys = {node.node_id: await pharmacy(node) for node in (hebei, shanghai, sichuan)}
    return Month(
        net, clock, hebei_giver, shanghai_giver, sh_child, sc_child, hb_parent, relations, keys
    )


async def at(month: Month, when: dt.datetime) -> None:
    """Move the shared clock and log everyone in again."""
    month.clock.set(when)
    for who in month.holders:
        await login(who)


async def give(month: Month, giver: Holder, key: str, amount_fen: int) -> str:
    """Instruct a grant and deliver the PREPARE; returns the transfer id."""
    response = await app_post(
        giver,
        "/app/v1/grants",
        {
            "transfer_id": uuid7(),
            "relation_id": month.relations[key],
            "amount_fen": amount_fen,
            "payment_password": PASSWORD,
        },
    )
    assert response.status_code == 202, response.text
    await month.net.run_senders()
    tid: str = response.json()["transfer_id"]
    month.grants.setdefault(key, []).append(tid)
    return tid


async def respond(month: Month, receiver: Holder, tid: str, verb: str = "accept") -> None:
    response = await app_post(
        receiver, f"/app/v1/grants/incoming/{tid}/{verb}", {"payment_password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    await month.net.run_senders()


async def pay(month: Month, patient: Holder, amount_fen: int, reference: str) -> dict[str, Any]:
    code = await app_post(patient, "/app/v1/payment-codes")
    assert code.status_code == 201, code.text
    async with client(patient.node) as http:
        response = await http.post(
            "/institution/v1/settlements",
            json={
                "payment_code": code.json()["code"],
                "amount_fen": amount_fen,
                "category": "pharmacy_drug",
                "reference": reference,
            },
            headers={"Authorization": f"Bearer {month.pharmacy_keys[patient.node.node_id]}"},
        )
    assert response.status_code == 201, response.text
    paid: dict[str, Any] = response.json()
    assert [s["source"] for s in paid["sources"]] == ["quota"] * len(paid["sources"])
    return paid


async def refund(month: Month, node: LocalNode, reference: str, amount_fen: int) -> None:
    async with client(node) as http:
        response = await http.post(
            f"/institution/v1/settlements/{reference}/refunds",
            json={"reference": f"rf-{reference}", "amount_fen": amount_fen},
            headers={"Authorization": f"Bearer {month.pharmacy_keys[node.node_id]}"},
        )
    assert response.status_code == 201, response.text
    await month.net.run_senders()


async def state_windows(net: LocalNetwork) -> int:
    """Every node closes its ready windows, then the statements travel; windows closed."""
    closed = 0
    for node in net.nodes.values():
        closed += await statements.run_once(node.ctx)
    await net.run_senders()
    return closed


async def window_states(node: LocalNode, peer: str) -> dict[str, str]:
    rows = await node.ctx.pool.fetch(
        "SELECT window_id, state FROM recon_window WHERE peer = $1 ORDER BY window_id", peer
    )
    return {r["window_id"]: r["state"] for r in rows}


async def tamper(node: LocalNode, sql: str, *args: object) -> None:
    """Change a row behind the node's back (triggers off), as a corrupted database would."""
    async with node.ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, *args)


async def run_month(month: Month) -> None:
    """Five days of grants and spending, 16-20 March 2026; each day's windows stated the next morning
    (the last day's are left to the caller).

    Per day d (0..4): Hebei's giver grants 100,000 + 10,000 d to Shanghai (accepted) and
    50,000 + 5,000 d to Sichuan (day 1 declined, day 2 left to expire at 06:00); Shanghai's
    giver grants 80,000 to Hebei at 14:00 (accepted). The Shanghai child pays
    30,000 + 1,000 d, the Sichuan child 20,000 on days 0, 3 and 4, the Hebei parent 25,000.
    On day 4 the pharmacy refunds 5,000 of the Shanghai child's first payment.
    """
    hebei = month.net[HEBEI]
    for d in range(5):
        day = 16 + d
        await at(month, dt.datetime(2026, 3, day, 10, 0, tzinfo=CST))
        if d > 0:
            # 06:00 has passed: the sweeper ends yesterday's unanswered grant; yesterday's
            # windows are stated now that everything in them is decided and acknowledged.
            await grants.sweeper_run_once(hebei.ctx)
            await month.net.run_senders()
            await state_windows(month.net)
        tid = await give(month, month.hebei_giver, "sh", 100_000 + 10_000 * d)
        await respond(month, month.sh_child, tid)
        await pay(month, month.sh_child, 30_000 + 1_000 * d, f"sh-{d}")
        tid = await give(month, month.hebei_giver, "sc", 50_000 + 5_000 * d)
        if d == 1:
            await respond(month, month.sc_child, tid, "decline")
        elif d != 2:
            await respond(month, month.sc_child, tid)
            await pay(month, month.sc_child, 20_000, f"sc-{d}")
        await at(month, dt.datetime(2026, 3, day, 14, 0, tzinfo=CST))
        tid = await give(month, month.shanghai_giver, "hb", 80_000)
        await respond(month, month.hb_parent, tid)
        await pay(month, month.hb_parent, 25_000, f"hb-{d}")
        if d == 4:
            await refund(month, month.sh_child.node, "sh-0", 5_000)
