"""Hypothesis drives the simulator: it chooses every delivery, fault, timer and clock move,
and shrinks any failing run to a short sequence of actions (PROTOCOL b.14)."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.protocol.sim import CLOCK_SKEW_MS_MAX, DAY0_MS, HOUR_MS, A, B, World

NODES = st.sampled_from([A, B])


class ProtocolMachine(RuleBasedStateMachine):
    """Two nodes and a network; every rule is one atomic step of one node."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World(0)

    # Half the runs start in the hour before 06:00, where deadlines bite.
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        start_ms=st.one_of(st.integers(5 * HOUR_MS, 6 * HOUR_MS), st.integers(0, 24 * HOUR_MS - 1)),
    )
    def start(self, seed: int, start_ms: int) -> None:
        self.world = World(seed, transfers=4, start_ms=DAY0_MS + start_ms)

    @rule(amount_fen=st.integers(1, 50).map(lambda n: n * 1_000))
    def instruct(self, amount_fen: int) -> None:
        self.world.instruct(amount_fen)

    @precondition(lambda self: self.world.in_flight)
    @rule(index=st.integers(0, 64))
    def deliver(self, index: int) -> None:
        self.world.deliver(index)

    @precondition(lambda self: self.world.in_flight)
    @rule(
        index=st.integers(0, 64),
        fate=st.sampled_from(["drop", "dup", "crash_before", "crash_after"]),
    )
    def deliver_with_fault(self, index: int, fate: str) -> None:
        self.world.deliver(index, fate)

    @rule()
    def network_round(self) -> None:
        """Both outboxes send, and everything in flight is delivered once, in order."""
        self.world.outbox_tick(A)
        self.world.outbox_tick(B)
        for _ in range(len(self.world.in_flight)):
            self.world.deliver(0)
            self.world.check()

    @rule(node=NODES)
    def outbox_tick(self, node: str) -> None:
        self.world.outbox_tick(node)

    @rule()
    def sweep(self) -> None:
        self.world.sweep()

    @rule()
    def resolve(self) -> None:
        self.world.resolve()

    @precondition(
        lambda self: any(t.state.value == "PENDING_ACCEPT" for t in self.world.b.transfers.values())
    )
    @rule(index=st.integers(0, 8), choice=st.sampled_from(["accept", "accept", "decline", "end"]))
    def receiver_acts(self, index: int, choice: str) -> None:
        self.world.receiver_acts(index, choice)

    @rule(ms=st.integers(0, 1_800_000))
    def advance(self, ms: int) -> None:
        self.world.advance(ms)

    @rule(hours=st.integers(1, 12))
    def wait_hours(self, hours: int) -> None:
        self.world.advance(hours * HOUR_MS)  # often across 06:00

    @rule(node=NODES, offset_ms=st.integers(-CLOCK_SKEW_MS_MAX, CLOCK_SKEW_MS_MAX))
    def skew(self, node: str, offset_ms: int) -> None:
        self.world.skew(node, offset_ms)

    @precondition(lambda self: not (self.world.a.up and self.world.b.up))
    @rule()
    def restart(self) -> None:
        self.world.restart(A)
        self.world.restart(B)

    @invariant()
    def invariants_hold(self) -> None:
        self.world.check()

    def teardown(self) -> None:
        self.world.heal()
        self.world.check_at_rest()
        self.world.check_replay()


ProtocolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_protocol_state_machine = ProtocolMachine.TestCase
