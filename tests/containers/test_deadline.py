"""The receiver's node frozen (`docker pause`) across the giver's deadline.

The giver's node runs with its clock shifted (`clock_offset_s`, a drill setting) so that its
grant deadline (`grant_expiry_hour`) falls about a minute after the network starts. The
grant is offered at the receiver's node, which is then paused: the giver's node decides
alone on its own clock (ABORT, the hold voided), and once the receiver's node thaws it
learns the decision. Both sides end ABORTED and the giver has every fen back.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.containers.flow import (
    balance,
    credit,
    enrol,
    giver_state,
    grant,
    incoming_state,
    link,
    wait_decided,
    wait_offered,
)
from tests.containers.harness import (
    PROVINCES,
    SHANGHAI,
    ContainerNetwork,
    rules_env,
    wait_for,
)

pytestmark = pytest.mark.containers

HEBEI, SICHUAN = "prov-13", "prov-51"
# How long before its deadline the giver's node stands when the network starts.
LEAD_S = 75.0
SWEEP_S = 10.0  # the giver's sweeper interval


def deadline_env() -> dict[str, str]:
    """The giver's clock shift and expiry hour: its deadline LEAD_S after now, on its clock."""
    now = dt.datetime.now(SHANGHAI)
    deadline = (now + dt.timedelta(minutes=5)).replace(minute=0, second=0, microsecond=0)
    deadline += dt.timedelta(hours=1)
    offset_s = (deadline - now).total_seconds() - LEAD_S
    return {**rules_env(expiry_hour=deadline.hour), "PLT_CLOCK_OFFSET_S": f"{offset_s:.3f}"}


@dataclass
class DeadlineNetwork:
    net: ContainerNetwork
    deadline_monotonic: float  # the giver's deadline, on this process's monotonic clock

    def seconds_left(self) -> float:
        return self.deadline_monotonic - time.monotonic()


@pytest.fixture(scope="module")
def drill(request: pytest.FixtureRequest, container_tier: None) -> Iterator[DeadlineNetwork]:
    started = time.monotonic()
    env = deadline_env()
    network = ContainerNetwork(
        name="test-deadline",
        provinces=tuple(p for p in PROVINCES if p.node_id != SICHUAN),
        node_env={HEBEI: env},
    )
    request.addfinalizer(network.close)
    network.start()
    yield DeadlineNetwork(network, started + LEAD_S)


def test_receiver_paused_across_the_deadline_both_sides_abort(drill: DeadlineNetwork) -> None:
    net = drill.net
    giver = enrol(net, HEBEI, 140, "张三丰")
    credit(giver, 100_000)
    receiver = enrol(net, "prov-31", 540, "李小龙", scheme="resident")
    relation_id = link(giver, receiver)
    tid = grant(giver, relation_id, 70_000)
    wait_offered(receiver, tid)
    assert drill.seconds_left() > 5, "the setup ran into the deadline"

    net.pause_node("prov-31")
    try:
        assert giver_state(giver, tid)[0] == "PREPARED_A"
        assert balance(giver) == 30_000
        wait_for(
            "the giver's node to abort at its deadline",
            lambda: giver_state(giver, tid)[0] == "ABORTED",
            drill.seconds_left() + SWEEP_S + 20,
            every_s=1.0,
        )
        assert balance(giver) == 100_000  # the hold is voided while B is still frozen
    finally:
        net.unpause_node("prov-31")

    assert wait_decided(giver, tid, timeout_s=90) == "ABORTED"
    assert incoming_state(receiver, tid) == "ABORTED"
    check = net.wait_consistent()
    assert check.problems == []
    assert dict(check.grant_states()) == {"ABORTED": 1}
    assert (check.funded_fen, check.customer_fen, check.clearing_fen) == (100_000, 100_000, 0)
