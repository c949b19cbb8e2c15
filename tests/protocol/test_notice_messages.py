"""The spending notice bodies (QUOTA_USED, NOTICE_ACK): canonical round trips, and the bounds
a peer's bytes must hold (anything else is malformed, 3101, before a handler sees it)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol.errors import MalformedMessage
from protocol.ids import uuid7
from protocol.messages import (
    FEN_MAX,
    TIME_MS_MAX,
    MessageType,
    NoticeAck,
    QuotaUsed,
    decode_body,
    encode_body,
    typ_of,
)

T0 = 1_773_626_400_000  # 2026-03-16T10:00+08:00
# A body's fields in their declared order, as msgpack: the canonical bytes when unchanged.
CANONICAL = msgspec.msgpack.Encoder()


def spent(**changes: Any) -> QuotaUsed:
    fields: dict[str, Any] = {
        "notice_id": uuid7(T0),
        "transfer_id": uuid7(T0),
        "relation_id": uuid7(T0),
        "kind": "spent",
        "settlement_ref": "42",
        "refund_ref": None,
        "amount_fen": 8_850,
        "category": "pharmacy_drug",
        "used_total_fen": 8_850,
        "at_ms": T0,
    }
    return QuotaUsed(**(fields | changes))


@pytest.mark.parametrize(
    "body",
    [
        spent(),
        spent(kind="refunded", refund_ref="7", amount_fen=1, used_total_fen=0),
        NoticeAck(notice_id=uuid7(T0), transfer_id=uuid7(T0)),
    ],
)
def test_notice_bodies_round_trip_canonically(body: QuotaUsed | NoticeAck) -> None:
    raw = encode_body(body)
    assert decode_body(typ_of(body), raw) == body
    assert typ_of(body) in (MessageType.QUOTA_USED, MessageType.NOTICE_ACK)
    with pytest.raises(MalformedMessage):
        decode_body(typ_of(body), raw + b"\x00")


def test_a_refund_reference_goes_with_a_refund_only() -> None:
    with pytest.raises(ValueError, match="exactly for a refund"):
        spent(refund_ref="7")
    with pytest.raises(ValueError, match="exactly for a refund"):
        spent(kind="refunded")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount_fen", 0),
        ("amount_fen", FEN_MAX + 1),
        ("used_total_fen", -1),
        ("at_ms", TIME_MS_MAX + 1),
        ("kind", "moved"),
        ("category", "Pharmacy"),
        ("category", "x" * 33),
        ("settlement_ref", ""),
        ("settlement_ref", "x" * 129),
        ("settlement_ref", "a\x00b"),
        ("notice_id", "not-a-uuid"),
        ("transfer_id", "0195b2d0-0000-4000-8000-000000000000"),  # a UUIDv4
        ("refund_ref", "7"),  # on a `spent` notice
    ],
)
def test_out_of_bounds_fields_are_malformed(field: str, value: object) -> None:
    good = spent()
    fields = msgspec.to_builtins(good)
    assert decode_body(MessageType.QUOTA_USED, CANONICAL.encode(fields)) == good
    raw = CANONICAL.encode({**fields, field: value})
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.QUOTA_USED, raw)


def test_unknown_fields_are_malformed() -> None:
    raw = CANONICAL.encode({**msgspec.to_builtins(spent()), "giver": "张三丰"})
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.QUOTA_USED, raw)
