"""Fixed keys, ids and bodies for protocol tests. Everything is deterministic."""

from typing import TypeVar

import msgspec

from protocol.clock import next_0600, window_id
from protocol.ids import uuid7
from protocol.keys import KeySet, SigningKey, initial_keyset
from protocol.messages import (
    Accept,
    Acceptance,
    Decision,
    Decline,
    ErrorBody,
    GiverRef,
    Outcome,
    Prepare,
    ReceiverRef,
    RelationRef,
    RelationType,
    UserAuth,
    hash_body,
)

A = "prov-11"  # the giver's node (北京)
B = "prov-13"  # the receiver's node (河北)
C = "prov-41"  # a third node (河南)

T0_MS = 1_773_540_000_000  # 2026-03-15 10:00:00 Asia/Shanghai
DECIDE_BY_MS = 1_773_612_000_000  # 2026-03-16 06:00:00 Asia/Shanghai, next_0600(T0_MS)
assert next_0600(T0_MS) == DECIDE_BY_MS


def fixed_id(n: int, at_ms: int = T0_MS) -> str:
    """A deterministic UUIDv7 number `n`."""
    return uuid7(at_ms, n.to_bytes(10, "big"))


def node_key(node: str, n: int = 1, month: str = "2026-03") -> SigningKey:
    """A node key from a fixed seed."""
    seed = (node + "/" + str(n)).encode().ljust(32, b".")[:32]
    return SigningKey.from_seed(f"{node}/{month}-{n}", seed)


def root_key(node: str) -> SigningKey:
    """A node's offline root key from a fixed seed."""
    return SigningKey.from_seed(f"{node}/root-1", (node + "/root").encode().ljust(32, b"#")[:32])


def keyset_of(node: str, now_ms: int = T0_MS) -> KeySet:
    """The first keyset of `node`, with `node_key(node)` active from `now_ms`."""
    return initial_keyset(node, node_key(node), now_ms)


TRANSFER_ID = fixed_id(1)


def make_prepare(
    transfer_id: str = TRANSFER_ID,
    *,
    amount_fen: int = 50_000,
    now_ms: int = T0_MS,
    decide_by_ms: int | None = None,
    giver_node: str = A,
) -> Prepare:
    """A PREPARE for 500.00 CNY made at `now_ms`, deadline the next 06:00."""
    decide_by = decide_by_ms if decide_by_ms is not None else next_0600(now_ms)
    return Prepare(
        transfer_id=transfer_id,
        giver=GiverRef(node=giver_node, account_ref="pa-110105-0001", masked_name="张*"),
        receiver=ReceiverRef(account_id="w-130102-0042"),
        relation=RelationRef(
            relation_id=fixed_id(900), type=RelationType.PARENT, verified_by_A=True
        ),
        amount_fen=amount_fen,
        currency="CNY",
        fee_fen=0,
        accept_within_ms=decide_by - now_ms,
        window_id=window_id(now_ms),
        user_auth=UserAuth(method="pin", verified_at_ms=now_ms - 1_000, ref="pin-check-77"),
        a_hold_id=fixed_id(500),
    )


def make_accept(
    prepare: Prepare, *, at_ms: int = T0_MS + 3_600_000, b_hold_id: str | None = None
) -> Accept:
    """The receiver's ACCEPT of `prepare`."""
    return Accept(
        transfer_id=prepare.transfer_id,
        prepare_hash=hash_body(prepare),
        b_hold_id=b_hold_id if b_hold_id is not None else fixed_id(600),
        accepted_at_ms=at_ms,
        acceptance=Acceptance(method="face", ref="face-9"),
    )


def make_decline(prepare: Prepare, error: ErrorBody) -> Decline:
    """B's DECLINE of `prepare`."""
    return Decline(transfer_id=prepare.transfer_id, prepare_hash=hash_body(prepare), error=error)


def make_decision(
    prepare: Prepare,
    outcome: Outcome,
    *,
    vote_hash: str | None = None,
    reason: ErrorBody | None = None,
    at_ms: int = T0_MS + 3_600_000,
) -> Decision:
    """A DECISION for `prepare` decided at `at_ms`."""
    return Decision(
        transfer_id=prepare.transfer_id,
        prepare_hash=hash_body(prepare),
        vote_hash=vote_hash,
        outcome=outcome,
        reason=reason,
        decided_at_ms=at_ms,
        window_id=window_id(at_ms),
    )


S = TypeVar("S", bound=msgspec.Struct)


def replace(struct: S, **changes: object) -> S:
    """`msgspec.structs.replace` with a short name."""
    return msgspec.structs.replace(struct, **changes)
