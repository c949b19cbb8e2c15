"""One grant can be followed through both nodes' JSON logs by its transfer id.

Every line the grant code writes while it handles the giver's instruction, a peer's message
or the receiver's answer carries `transfer_id` and `node` (structlog contextvars bound in
`wallet.plt.dispatch` and at the grant entry points), and personal data stays masked.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from nodes.logging import configure_logging
from nodes.network import LocalNetwork
from tests.network.grant_flow import A, B, answer, check_books, grant, linked_pair, states

pytestmark = pytest.mark.network


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    yield stream
    structlog.reset_defaults()


async def test_both_nodes_log_the_grant_under_its_transfer_id(
    network: LocalNetwork, log_lines: io.StringIO
) -> None:
    pair = await linked_pair(network)
    start = len(log_lines.getvalue())
    tid = await grant(pair, 80_000)
    assert (await answer(pair, tid)).status_code == 200
    await network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")

    lines: list[dict[str, Any]] = [
        json.loads(line) for line in log_lines.getvalue()[start:].splitlines() if line
    ]
    about = [line for line in lines if line.get("transfer_id") == tid]
    seen = {(line.get("node"), line["event"]) for line in about}
    assert {
        (A, "grant_instructed"),
        (B, "grant_prepared"),
        (B, "grant_receiver_answered"),
        (A, "grant_decided"),
        (B, "grant_decided_at_receiver"),
    } <= seen, seen
    # Every grant line of either node names the grant and the node that wrote it.
    grant_lines = [line for line in lines if line["event"].startswith("grant_")]
    assert grant_lines and all(
        line.get("transfer_id") == tid and line.get("node") in (A, B) for line in grant_lines
    ), grant_lines
    assert pair.giver.id_number not in log_lines.getvalue()
    assert pair.receiver.id_number not in log_lines.getvalue()
    await check_books(network)
