"""The same request again gets the same answer: an app action replayed after it took effect
(its first answer lost) answers the current state as a success, changes nothing and sends
nothing again; only a request that contradicts what happened is a conflict."""

from __future__ import annotations

import pytest

from nodes.network import LocalNetwork
from tests.network.grant_flow import answer, grant, linked_pair, money, states
from tests.network.support import app_post, cross_state, rows
from tests.support import PASSWORD

pytestmark = [pytest.mark.network, pytest.mark.anyio]

OUTBOX = "SELECT typ FROM plt_outbox ORDER BY id"  # sent and unsent messages alike


async def test_accept_replayed_after_the_grant_committed(network: LocalNetwork) -> None:
    pair = await linked_pair(network)
    transfer_id = await grant(pair, 30_000)
    first = await answer(pair, transfer_id, "accept")
    assert first.status_code == 200, first.text
    await network.run_senders()
    assert await states(pair, transfer_id) == ("COMMITTED", "COMMITTED")
    before, sent = await money(pair), await rows(pair.b, OUTBOX)

    again = await answer(pair, transfer_id, "accept")

    assert again.status_code == 200, again.text
    assert (again.json()["transfer_id"], again.json()["state"]) == (transfer_id, "COMMITTED")
    assert await money(pair) == before
    assert await rows(pair.b, OUTBOX) == sent
    contradicting = await answer(pair, transfer_id, "decline")
    assert (contradicting.status_code, contradicting.json()["code"]) == (409, "state_conflict")


async def test_decline_replayed_after_the_grant_aborted(network: LocalNetwork) -> None:
    pair = await linked_pair(network)
    transfer_id = await grant(pair, 30_000)
    assert (await answer(pair, transfer_id, "decline")).status_code == 200
    await network.run_senders()
    assert await states(pair, transfer_id) == ("ABORTED", "ABORTED")
    before = await money(pair)

    again = await answer(pair, transfer_id, "decline")

    assert again.status_code == 200, again.text
    assert again.json()["state"] == "ABORTED"
    assert await money(pair) == before
    contradicting = await answer(pair, transfer_id, "accept")
    assert (contradicting.status_code, contradicting.json()["code"]) == (409, "state_conflict")


async def test_cross_relationship_confirm_and_end_replayed(network: LocalNetwork) -> None:
    pair = await linked_pair(network)
    path = f"/app/v1/cross-relationships/{pair.relation_id}"
    sent_b = await rows(pair.b, OUTBOX)

    confirm = await app_post(pair.receiver, f"{path}/confirm", {"payment_password": PASSWORD})
    assert confirm.status_code == 200, confirm.text
    assert confirm.json()["state"] == "active"
    assert await rows(pair.b, OUTBOX) == sent_b
    declined_late = await app_post(pair.receiver, f"{path}/decline")
    assert (declined_late.status_code, declined_late.json()["code"]) == (409, "state_conflict")

    ended = await app_post(pair.giver, f"{path}/end", {"payment_password": PASSWORD})
    assert ended.status_code == 200, ended.text
    await network.run_senders()
    sent_a = await rows(pair.a, OUTBOX)
    again = await app_post(pair.giver, f"{path}/end", {"payment_password": PASSWORD})
    assert (again.status_code, again.json()["state"]) == (200, "ended")
    assert await rows(pair.a, OUTBOX) == sent_a
    assert await cross_state(pair.b, pair.relation_id) == "ended"
