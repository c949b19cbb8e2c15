"""PLT/1 input that once crashed a node or was answered "send it again" (2003): refused for
good. An unreadable batch is a 400 problem with `plt_code` 3101; a correctly signed message
with a value no node can store is a signed 3101 ERROR, and nothing is stored."""

from __future__ import annotations

import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.envelope import Envelope, Wire
from protocol.ids import uuid7
from protocol.messages import (
    Body,
    GiverRef,
    RelationType,
    RelEnd,
    RelReceiver,
    RelRequest,
)
from tests.network.support import client, now_ms, post_batch, post_raw, rows, seal_from
from tests.network.test_transport import error_of, replies
from tests.protocol.factories import make_prepare, replace
from tests.support import make_id_number

pytestmark = [pytest.mark.network, pytest.mark.anyio]

STORED_IN = "SELECT typ FROM plt_message WHERE direction = 'in'"
NESTED = {
    "json": b"[" * 100_000 + b"]" * 100_000,
    "msgpack": b"\x91" * 100_000 + b"\x90",  # fixarray of one, 100,000 deep
}


async def send(to: LocalNode, env: Envelope) -> Envelope:
    [reply] = replies(await post_batch(to, [env]))
    return reply


def rel_request(a: LocalNode, **giver: str) -> RelRequest:
    fields = {"node": a.node_id, "account_ref": "p-1", "masked_name": "张*", **giver}
    return RelRequest(
        relation_id=uuid7(now_ms(a)),
        giver=GiverRef(**fields),
        receiver=RelReceiver(id_number=make_id_number(500), name="李四"),
        relation_type=RelationType.CHILD,
        evidence_ref="hukou-0001",
        filed_at_ms=now_ms(a),
    )


async def assert_refused_as_malformed(network: LocalNetwork, body: Body, field: str) -> None:
    a, b = network["prov-13"], network["prov-31"]
    error = error_of(await send(b, seal_from(a, "prov-31", body)))
    assert (error.error.code, error.error.class_) == (3101, "F")
    assert field in error.error.text
    assert await rows(b, STORED_IN) == []


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_deeply_nested_batch_is_a_400_problem(network: LocalNetwork, wire: Wire) -> None:
    response = await post_raw(network["prov-31"], NESTED[wire], wire)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert (problem["code"], problem["plt_code"]) == ("invalid_request", 3101)


@pytest.mark.parametrize("field", ["masked_name", "account_ref"])
async def test_nul_in_rel_request_giver_is_malformed(network: LocalNetwork, field: str) -> None:
    body = rel_request(network["prov-13"], **{field: "p\x001"})
    await assert_refused_as_malformed(network, body, "giver." + field)


async def test_nul_in_rel_request_evidence_is_malformed(network: LocalNetwork) -> None:
    body = replace(rel_request(network["prov-13"]), evidence_ref="hukou\x00")
    await assert_refused_as_malformed(network, body, "evidence_ref")


async def test_nul_in_rel_end_reason_is_malformed(network: LocalNetwork) -> None:
    a = network["prov-13"]
    body = RelEnd(
        relation_id=uuid7(now_ms(a)), ended_by="giver", reason="moved\x00", ended_at_ms=now_ms(a)
    )
    await assert_refused_as_malformed(network, body, "reason")


async def test_prepare_with_endless_accept_window_is_malformed(network: LocalNetwork) -> None:
    a = network["prov-13"]
    prepare = make_prepare(uuid7(now_ms(a)), now_ms=now_ms(a), giver_node=a.node_id)
    body = replace(prepare, accept_within_ms=2**63 - 1)
    await assert_refused_as_malformed(network, body, "accept_within_ms")


async def test_a_json_body_refused_as_text_plain(network: LocalNetwork) -> None:
    async with client(network["prov-31"]) as http:
        response = await http.post(
            "/plt/v1/messages", content=b"[]", headers={"content-type": "text/plain"}
        )
    assert response.status_code == 415, response.text
    assert (response.json()["code"], response.json()["plt_code"]) == (
        "unsupported_media_type",
        3101,
    )
